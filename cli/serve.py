"""`serve`: an export as an OpenAI-compatible HTTP server (serving/), on one machine or on Ray
Serve replicas. The pipeline factory lives here: only the CLI picks the engine (runtime or
trt), and it must be picklable for Ray (a module-level function under functools.partial)."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import click

from .options import (
    EXPORT_DIR,
    FiniteFloatRange,
    engine_options,
    output_options,
    provider_names,
    user_errors,
)


def make_pipeline(
    export_dir: str,
    engine: str,
    providers: tuple[str, ...],
    threads: int | None,
    allow_other_device: bool = False,
    allow_spinning: bool = True,
) -> Any:
    """FlamingoPipeline over onnxruntime (`allow_spinning`: its intra-op workers', see
    cli.options.spinning_option), or over the TensorRT engines `build` wrote."""
    from runtime.pipeline import FlamingoPipeline

    if engine == "tensorrt":
        from trt.engine import TrtFlamingo

        trt_engine = TrtFlamingo(export_dir, strict_device=not allow_other_device)
        return FlamingoPipeline(export_dir, engine=trt_engine)
    return FlamingoPipeline(
        export_dir, providers=providers, threads=threads, allow_spinning=allow_spinning
    )


def _need(module: str, extra: str, what: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise click.ClickException(
            f"{what} needs {module!r}: pip install -c constraints.txt -e '.[{extra}]'"
        )


@click.command()
@EXPORT_DIR
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to bind (0.0.0.0 exposes the server to the network).",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8000,
    show_default=True,
    help="TCP port (0: one the system picks; the ready line and --json give the bound one).",
)
@engine_options
@click.option(
    "--max-batch-size",
    type=int,
    default=16,
    show_default=True,
    help="Most requests (rows) micro-batched into one generate_batch.",
)
@click.option(
    "--max-queue",
    type=int,
    default=64,
    show_default=True,
    help="Most waiting rows; a full queue answers 429.",
)
@click.option(
    "--batch-wait-ms",
    type=FiniteFloatRange(0),
    default=10.0,
    show_default=True,
    help="Under load, longest wait for batch-mates (a lone request never waits).",
)
@click.option(
    "--api-key",
    envvar="FLAMINGO_API_KEY",
    default=None,
    help="Require 'Authorization: Bearer KEY' on /v1 routes (env FLAMINGO_API_KEY; printable "
    "ASCII, no surrounding spaces).",
)
@click.option(
    "--allowed-media-dir",
    default=None,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Folder whose images file:// URLs may name (default: file URLs refused).",
)
@click.option(
    "--max-body-mb",
    type=FiniteFloatRange(0, 4096, min_open=True),
    default=16.0,
    show_default=True,
    help="Largest request body; larger ones get 413. Also the largest file a file:// URL may name.",
)
@click.option(
    "--max-request-megapixels",
    type=FiniteFloatRange(0, 100_000, min_open=True),
    default=64.0,
    show_default=True,
    help="Decoded pixels (millions) of all images of one request together; more get 400.",
)
@click.option("--ray", "use_ray", is_flag=True, help="Serve through Ray Serve (the ray extra).")
@click.option(
    "--replicas",
    type=click.IntRange(1, 1024),
    default=1,
    show_default=True,
    help="Engine replicas (--ray), each with its own pipeline.",
)
@click.option(
    "--ray-address",
    default=None,
    help="Join a running Ray cluster (e.g. 10.0.0.1:6379; default: start a local "
    "instance on 127.0.0.1 and stop it on exit).",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
    help="The HTTP server's log level.",
)
@output_options
@user_errors()
def serve(
    export_dir: Path,
    host: str,
    port: int,
    engine: str,
    providers: tuple[str, ...],
    threads: int | None,
    allow_spinning: bool,
    allow_other_device: bool,
    max_batch_size: int,
    max_queue: int,
    batch_wait_ms: float,
    api_key: str | None,
    allowed_media_dir: Path | None,
    max_body_mb: float,
    max_request_megapixels: float,
    use_ray: bool,
    replicas: int,
    ray_address: str | None,
    log_level: str,
    as_json: bool,
    quiet: bool,
) -> None:
    """Serve EXPORT_DIR over HTTP in the OpenAI Chat Completions format (docs/serving.md).
    With --json, one JSON line {"model", "url"} on stdout once the engines are loaded."""
    _need("fastapi", "serve", "serve")
    _need("uvicorn", "serve", "serve")
    if engine == "tensorrt":
        _need("tensorrt", "tensorrt", "--engine tensorrt")
        if providers:
            raise click.UsageError("--provider is onnxruntime's: not with --engine tensorrt")
    if (replicas != 1 or ray_address) and not use_ray:
        raise click.UsageError("--replicas and --ray-address need --ray")
    if use_ray and port == 0:
        raise click.BadParameter(
            "--ray needs a fixed port (Ray Serve's proxy)", param_hint="--port"
        )
    if api_key is None and os.environ.get("FLAMINGO_API_KEY") == "":
        raise click.BadParameter(
            "FLAMINGO_API_KEY is set but empty; unset it to serve without a key",
            param_hint="--api-key",
        )
    from serving.app import AppSettings, check_api_key
    from serving.engine import EngineSettings
    from serving.server import ServeError, end_of_chunk, model_id, serve_local

    if api_key is not None:
        try:
            check_api_key(api_key)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--api-key") from None
    try:
        engine_settings = EngineSettings(max_batch_size, max_queue, batch_wait_ms)
    except ValueError as e:  # the message starts with the setting's name
        name = str(e).split()[0]
        raise click.BadParameter(str(e), param_hint="--" + name.replace("_", "-")) from None
    app_settings = AppSettings(
        model_id=model_id(export_dir),
        api_key=api_key,
        allowed_media_dir=allowed_media_dir.resolve() if allowed_media_dir else None,
        max_body_bytes=int(max_body_mb * (1 << 20)),
        max_request_pixels=max(1, int(max_request_megapixels * 1e6)),
        end_of_chunk=end_of_chunk(export_dir),
    )
    factory = functools.partial(
        make_pipeline, str(export_dir.resolve()), engine, tuple(provider_names(providers)),
        threads, allow_other_device, allow_spinning,
    )  # fmt: skip

    def ready(info: dict[str, Any]) -> None:
        if as_json:
            click.echo(json.dumps(info))

    if use_ray:
        _need("ray", "ray", "--ray")
        from serving.ray_deploy import run_ray

        try:
            run_ray(factory, app_settings, engine_settings, replicas, host, port, ray_address,
                    cpus_per_replica=float(threads or 1))  # fmt: skip
        except Exception as e:  # a replica that cannot load, a cluster that cannot be reached
            raise click.ClickException(f"cannot serve {export_dir} on Ray: {e}") from e
        return
    try:
        serve_local(
            factory, app_settings, engine_settings, host, port,
            "error" if quiet else log_level, on_ready=ready,
        )  # fmt: skip
    except ServeError as e:
        raise click.ClickException(f"cannot serve {export_dir}: {e}") from e


COMMANDS = (serve,)
