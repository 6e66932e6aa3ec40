"""The `flamingo-export` command: a group of thin commands over library functions that the
tests call too. Every command module imports torch, onnx or TensorRT only inside its commands,
so `flamingo-export run` works with the base (torch-free) install."""

from __future__ import annotations

import sys

import click

from . import bench, model, precision, run, serve, trt
from . import eval as evaluation


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="flamingo-export")
def main() -> None:
    """Export Flamingo (OpenFlamingo) models to ONNX/TensorRT and run few-shot inference."""


for module in (model, run, serve, precision, trt, bench, evaluation):
    for command in module.COMMANDS:
        main.add_command(command)


if __name__ == "__main__":
    sys.exit(main())
