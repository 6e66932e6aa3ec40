"""Prometheus metrics of one server (`GET /metrics`), in their own registry.

Counted where the HTTP requests are answered, from the engine's events, so the same numbers
exist on one machine and behind Ray Serve's ingress (one registry per ingress replica).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self, engine_stats: Callable[[], dict[str, Any] | None] | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "flamingo_requests", "HTTP requests by endpoint", ["endpoint"], registry=r
        )
        self.errors = Counter(
            "flamingo_request_errors", "Error responses by HTTP status", ["code"], registry=r
        )
        self.prompt_tokens = Counter("flamingo_prompt_tokens", "Prompt tokens", registry=r)
        self.cached_tokens = Counter(
            "flamingo_prompt_cached_tokens", "Prompt tokens taken from the prefix cache", registry=r
        )
        self.generated_tokens = Counter(
            "flamingo_generated_tokens", "Generated (completion) tokens", registry=r
        )
        self.queue_depth = Gauge(
            "flamingo_queue_depth", "Accepted requests waiting for a batch", registry=r
        )
        self.completed = 0
        self.cache_hits = 0
        Gauge(
            "flamingo_prefix_cache_hit_rate",
            "Share of completed requests that reused a cached prefix (cached_tokens > 0)",
            registry=r,
        ).set_function(lambda: self.cache_hits / self.completed if self.completed else 0.0)
        self.latency = Histogram(
            "flamingo_request_latency_seconds",
            "Generation requests, arrival to last byte",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "flamingo_time_to_first_token_seconds",
            "Generation requests, arrival to first text",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        if engine_stats is not None:
            r.register(_EngineCollector(engine_stats))

    def usage(self, prompt: int, cached: int, generated: int) -> None:
        self.prompt_tokens.inc(prompt)
        self.cached_tokens.inc(cached)
        self.generated_tokens.inc(generated)
        self.completed += 1
        self.cache_hits += cached > 0

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    """The local engine's own counters (absent behind Ray: they live in the replicas)."""

    def __init__(self, stats: Callable[[], dict[str, Any] | None]) -> None:
        self.stats = stats

    def collect(self) -> Any:
        s = self.stats()
        if not s:
            return
        for name, doc in (
            ("generated_tokens", "Tokens the engine generated, cancelled rows included"),
            ("cancelled_jobs", "Rows stopped because their client went away"),
            ("batches", "generate_batch calls"),
            ("rows", "Rows over all batches"),
        ):
            c = CounterMetricFamily(f"flamingo_engine_{name}", doc)
            c.add_metric([], s[name])
            yield c
        prefix = s.get("caches", {}).get("prefix", {})
        lookups = prefix.get("hits", 0) + prefix.get("misses", 0)
        g = GaugeMetricFamily(
            "flamingo_engine_prefix_cache_lookup_hit_rate", "Prefix-cache lookups that hit"
        )
        g.add_metric([], prefix.get("hits", 0) / lookups if lookups else 0.0)
        yield g
