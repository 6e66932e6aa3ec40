"""The same app on Ray Serve: N engine replicas behind one ingress, routed by demonstrations.

Two deployments: `FlamingoIngress` runs the FastAPI app of serving.app (parsing, API key, body
limit, metrics) and forwards each request to `FlamingoEngine`, whose replicas each own a
pipeline and its queue (serving.engine). Requests go through
`serving.ray_router.DemonstrationAffinityRouter`: rendezvous hashing of the request's affinity
key (serving.chat.affinity_key: the demonstrations' text and image bytes) over the running
replicas, so requests with the same demonstrations reach the replica that holds their
prefix-cache entry; when a replica dies only its keys move. A busy first choice falls back to
the others (Ray tries the next rank).

Ray is imported here only (the `ray` extra). A local instance started by `run_ray` binds
127.0.0.1 only: `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` stops Ray from replacing 127.0.0.1 by
the machine's outward address (ray._private.services.resolve_ip_for_localhost), and the node,
dashboard agent and HTTP proxy are given 127.0.0.1.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import AsyncIterator
from typing import Any

from .app import AppSettings, create_app
from .engine import Engine, EngineSettings, Event, GenerateRequest, PipelineFactory
from .server import http_url

log = logging.getLogger("serving.ray")

APP_NAME = "flamingo"
LOCAL_ONLY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def _ray() -> Any:
    """Import Ray once the local-only environment is set (it is read at import)."""
    import ray
    from ray import serve

    return ray, serve


class RayBackend:
    """serving.app.Backend over the engine deployment's handle."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.load_error: str | None = None

    @property
    def ready(self) -> bool:
        return True  # serve.run returns once every replica's engine is loaded

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Event]:
        stream = self.handle.options(stream=True).generate.remote(
            request, affinity_key=request.affinity_key
        )
        finished = False
        try:
            async for event in stream:
                yield event
            finished = True
        finally:
            if not finished:
                stream.cancel()


def build_app(
    factory: PipelineFactory,
    app_settings: AppSettings,
    engine_settings: EngineSettings,
    replicas: int,
    cpus_per_replica: float = 1.0,
) -> Any:
    """The bound Ray Serve application (ingress + engine replicas)."""
    _, serve = _ray()
    from ray.serve.config import RequestRouterConfig

    @serve.deployment(
        name="FlamingoEngine",
        num_replicas=replicas,
        max_ongoing_requests=engine_settings.max_queue + engine_settings.max_batch_size,
        ray_actor_options={"num_cpus": cpus_per_replica},
        request_router_config=RequestRouterConfig(
            request_router_class="serving.ray_router.DemonstrationAffinityRouter"
        ),
    )
    class FlamingoEngine:
        def __init__(self) -> None:
            self.engine = Engine(factory, engine_settings)
            self.engine.load()
            context = serve.get_replica_context()
            self.engine.replica = f"{context.replica_id.unique_id}:{os.getpid()}"

        async def generate(self, request: GenerateRequest, affinity_key: str = "") -> Any:
            async for event in self.engine.generate(request):
                yield event

        def check_health(self) -> None:
            if not self.engine.ready:
                raise RuntimeError(self.engine.load_error or "engine not ready")

    @serve.deployment(
        name="FlamingoIngress", max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0}
    )
    @serve.ingress()
    class FlamingoIngress:
        def __init__(self, engine: Any) -> None:
            self.engine_handle = engine

        def __serve_build_asgi_app__(self) -> Any:
            return create_app(RayBackend(self.engine_handle), app_settings)

    return FlamingoIngress.bind(FlamingoEngine.bind())


def run_ray(
    factory: PipelineFactory,
    app_settings: AppSettings,
    engine_settings: EngineSettings,
    replicas: int,
    host: str = "127.0.0.1",
    port: int = 8000,
    address: str | None = None,
    cpus_per_replica: float = 1.0,
) -> None:
    """Deploy and serve until SIGINT/SIGTERM, then shut Serve (and a Ray started here) down."""
    if address is None:
        for name, value in LOCAL_ONLY_ENV.items():
            os.environ.setdefault(name, value)
    ray, serve = _ray()
    if address is None:
        ray.init(
            _node_ip_address="127.0.0.1",
            include_dashboard=False,
            dashboard_host="127.0.0.1",
            configure_logging=False,
        )
    else:
        ray.init(address=address)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        app = build_app(factory, app_settings, engine_settings, replicas, cpus_per_replica)
        serve.run(app, name=APP_NAME, route_prefix="/")
        log.warning(
            "flamingo-export serve: %s ready on %s (Ray Serve, %d replicas)",
            app_settings.model_id, http_url(host, port), replicas,
        )  # fmt: skip
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
