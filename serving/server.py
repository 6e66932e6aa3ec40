"""`flamingo-export serve` on one machine: the app on uvicorn, the engine loading behind it.

uvicorn starts at once (GET /health answers 503 "loading"); the pipeline is built on a thread
and /health turns 200 when its engines are loaded. A load failure stops the server with the
error (`ServeError`).
"""

from __future__ import annotations

import logging
import threading
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
    `on_ready({"model", "url"})` is called once the engines are loaded."""
    engine = Engine(factory, engine_settings)
    server: uvicorn.Server

    def load() -> None:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", RuntimeWarning)
                engine.load()
            for w in caught:
                log.warning("%s", w.message)
            log.warning(
                "flamingo-export serve: %s ready on http://%s:%d", app_settings.model_id, host, port
            )
            if on_ready is not None:
                on_ready({"model": app_settings.model_id, "url": f"http://{host}:{port}/v1"})
        except Exception:
            log.error("flamingo-export serve: cannot load the export: %s", engine.load_error)
            server.should_exit = True

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


def model_id(export_dir: str | Path) -> str:
    """The id /v1/models lists: the export folder's name."""
    return Path(export_dir).resolve().name
