"""Prometheus metrics of the HTTP server, served as text by GET /metrics."""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from adapters.serving.engine import InferenceEngine


class EngineCollector:
    """Prometheus collector reading the engine's adapter-cache counters and residency at scrape time."""

    def __init__(self, engine: InferenceEngine):
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        """Yield cache hits, misses, loads and evictions and the prefix cache's lookups, hits and reused tokens
        (counters), resident adapters, capacity and the prefix cache's bytes (gauges)."""
        s, p = self.engine.stats, self.engine.prefix_cache.stats()
        for name, value, doc in (
            ("adapterkit_adapter_cache_hits", s.hits, "Adapter look-ups served by a resident adapter."),
            ("adapterkit_adapter_cache_misses", s.misses, "Adapter look-ups that had to load the adapter."),
            ("adapterkit_adapter_loads", s.loads, "Adapters loaded."),
            ("adapterkit_adapter_evictions", s.evictions, "Adapters deleted from memory (LRU or unload)."),
            ("adapterkit_prefix_cache_lookups", p["lookups"], "Prompts looked up in the prefix cache."),
            ("adapterkit_prefix_cache_hits", p["hits"], "Prompts that reused a cached prefix."),
            ("adapterkit_prefix_cache_hit_tokens", p["hit_tokens"], "Prompt tokens copied, not computed."),
        ):
            family = CounterMetricFamily(name, doc)
            family.add_metric([], value)
            yield family
        resident = GaugeMetricFamily("adapterkit_resident_adapters", "Adapters resident in memory.")
        resident.add_metric([], len(self.engine.resident()))
        yield resident
        capacity = GaugeMetricFamily("adapterkit_adapter_capacity", "Most adapters resident at once.")
        capacity.add_metric([], self.engine.capacity)
        yield capacity
        held = GaugeMetricFamily("adapterkit_prefix_cache_bytes", "Bytes of keys and values in the prefix cache.")
        held.add_metric([], p["bytes"])
        yield held


class ServerMetrics:
    """The server's metrics, in a registry of their own (so several apps in one process do not clash).

    Requests by endpoint and status, latency in seconds by endpoint, tokens by kind, rows per adapter,
    rows and distinct adapters per engine batch, and the engine's cache counters (EngineCollector).
    """

    def __init__(self, engine: InferenceEngine):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "adapterkit_requests",
            "HTTP requests by endpoint and status.",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "adapterkit_request_latency_seconds",
            "Request latency by endpoint.",
            ["endpoint"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.tokens = Counter(
            "adapterkit_tokens", "Tokens processed, by kind (prompt, completion).", ["kind"], registry=self.registry
        )
        self.adapter_requests = Counter(
            "adapterkit_adapter_requests", "Served rows per adapter reference.", ["adapter"], registry=self.registry
        )
        self.batch_rows = Histogram(
            "adapterkit_batch_rows", "Rows per engine batch.", registry=self.registry, buckets=(1, 2, 4, 8, 16, 32, 64)
        )
        self.batch_adapters = Histogram(
            "adapterkit_batch_adapters",
            "Distinct adapters per engine batch.",
            registry=self.registry,
            buckets=(1, 2, 4, 8, 16, 32),
        )
        self.registry.register(EngineCollector(engine))

    def observe_batch(self, rows: int, adapters: int) -> None:
        """Count one engine batch of ``rows`` rows for ``adapters`` distinct adapters (the Batcher's on_batch)."""
        self.batch_rows.observe(rows)
        self.batch_adapters.observe(adapters)

    def observe_request(self, endpoint: str, ref: str, started: float, status: int, fields: dict) -> None:
        """Count one request to ``endpoint`` for adapter ``ref`` that began at ``started`` (time.perf_counter()).

        For a success (status < 400) also count its rows and its "input_tokens" / "output_tokens" from ``fields``.
        """
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(time.perf_counter() - started)
        if status < 400:
            self.adapter_requests.labels(ref).inc(fields.get("rows", 1))
            self.tokens.labels("prompt").inc(fields.get("input_tokens", 0))
            self.tokens.labels("completion").inc(fields.get("output_tokens", 0))

    def render(self) -> bytes:
        """All metrics in Prometheus' text exposition format."""
        return generate_latest(self.registry)
