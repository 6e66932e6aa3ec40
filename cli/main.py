"""The `flamingo-export` command: a group of thin commands over library functions that the
tests call too. Every command module imports torch, onnx or TensorRT only inside its commands,
so `flamingo-export run` works with the base (torch-free) install."""

from __future__ import annotations

import contextlib
import sys

import click

from exporter.output import unwinding_signals

from . import bench, model, precision, run, serve, trt
from . import eval as evaluation


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="flamingo-export")
@click.pass_context
def main(ctx: click.Context) -> None:
    """Export Flamingo (OpenFlamingo) models to ONNX/TensorRT and run few-shot inference."""
    # SIGTERM/SIGHUP (kill, timeout, docker stop, CI cancellation) unwind like Ctrl-C, so every
    # command's cleanup runs (exit status 128 + signal)
    signals = contextlib.ExitStack()
    signals.enter_context(unwinding_signals())
    ctx.call_on_close(signals.close)


for module in (model, run, serve, precision, trt, bench, evaluation):
    for command in module.COMMANDS:
        main.add_command(command)


if __name__ == "__main__":
    sys.exit(main())
