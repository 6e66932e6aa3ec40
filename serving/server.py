"""`flamingo-export serve` on one machine: the app on uvicorn, the engine loading behind it.

uvicorn starts at once (GET /health answers 503 "loading"); the pipeline is built on a thread
and /health turns 200 when its engines are loaded. A load failure stops the server with the
error (`ServeError`).
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvicorn

from runtime.errors import FlamingoExportError

from .app import AppSettings, create_app
from .engine import Engine, EngineSettings, PipelineFactory

log = logging.getLogger("serving.server")


class ServeError(FlamingoExportError, RuntimeError):
    """The export could not be served (it failed to load)."""


def serve_local(
    factory: PipelineFactory,
    app_settings: AppSettings,
    engine_settings: EngineSettings,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    on_ready: Callable[[dict[str, Any]], None] | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM; raises ServeError if the export cannot be loaded.
    `on_ready({"model", "url"})` is called once the engines are loaded and the socket is bound;
    the URL has the port actually bound (`port=0`: one the system picked)."""
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be in 0..65535, got {port}")
    engine = Engine(factory, engine_settings)
    server: uvicorn.Server

    def load() -> None:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", RuntimeWarning)
                engine.load()
            for w in caught:
                log.warning("%s", w.message)
        except Exception:
            log.error("flamingo-export serve: cannot load the export: %s", engine.load_error)
            server.should_exit = True
            return
        while not server.started:  # the lifespan (which started this thread) runs before bind
            if server.should_exit:
                return
            time.sleep(0.05)
        url = http_url(host, bound_port(server, port))
        log.warning("flamingo-export serve: %s ready on %s", app_settings.model_id, url)
        if on_ready is not None:
            on_ready({"model": app_settings.model_id, "url": f"{url}/v1"})

    def startup() -> None:
        threading.Thread(target=load, name="flamingo-load", daemon=True).start()

    app = create_app(
        engine, app_settings, startup=startup, shutdown=engine.close, engine_stats=engine.stats
    )
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5
    )
    server = uvicorn.Server(config)
    server.run()
    if engine.load_error is not None:
        raise ServeError(engine.load_error)


def bound_port(server: uvicorn.Server, default: int) -> int:
    """The port a started uvicorn server listens on (its first socket)."""
    for listener in getattr(server, "servers", []):
        for sock in listener.sockets or ():
            return int(sock.getsockname()[1])
    return default


def http_url(host: str, port: int) -> str:
    """`http://host:port`, an IPv6 address in brackets (RFC 3986: http://[::1]:8000)."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}"


def model_id(export_dir: str | Path) -> str:
    """The id /v1/models lists: the export folder's name."""
    return Path(export_dir).resolve().name


def end_of_chunk(export_dir: str | Path) -> str:
    """What ends a chat demonstration for this export (its manifest's prompt format:
    runtime.idefics.few_shot_end_of_chunk). An export that does not load gets OpenFlamingo's
    marker here: the engine's load reports why, and the server serves nothing."""
    from runtime.errors import FlamingoExportError
    from runtime.idefics import few_shot_end_of_chunk
    from runtime.manifest import load_manifest

    try:
        return few_shot_end_of_chunk(load_manifest(export_dir).prompt)
    except (FlamingoExportError, OSError, ValueError):
        return few_shot_end_of_chunk(None)
