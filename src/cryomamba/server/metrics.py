"""Prometheus metrics (prometheus-client), one registry per app so tests can build many apps."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ..job import JobState

__all__ = ["Metrics"]


class _JobStates(Collector):
    """Jobs by state and the queue depth, read from the database at scrape time."""

    def __init__(self, count_by_state: Callable[[], dict[str, int]]) -> None:
        self.count_by_state = count_by_state

    def collect(self):
        counts = self.count_by_state()
        jobs = GaugeMetricFamily("cryomamba_jobs", "Jobs by state", labels=["state"])
        for state in JobState:
            jobs.add_metric([state], counts.get(state, 0))
        yield jobs
        yield GaugeMetricFamily(
            "cryomamba_queue_depth",
            "Jobs waiting for a device",
            value=counts.get(JobState.QUEUED, 0),
        )


class Metrics:
    """The server's metrics; `render()` is the /metrics body."""

    content_type = "text/plain; version=0.0.4; charset=utf-8"

    def __init__(self, count_by_state: Callable[[], dict[str, int]]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "cryomamba_http_requests",
            "HTTP requests by route and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "cryomamba_http_request_duration_seconds",
            "Time to answer a request, by route",
            ["route"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
        )
        self.upload_bytes = Counter(
            "cryomamba_upload_bytes", "Bytes of upload parts accepted", registry=self.registry
        )
        self.tiles = Counter(
            "cryomamba_tiles", "Tiles predicted", ["device"], registry=self.registry
        )
        self.tiles_per_second = Gauge(
            "cryomamba_tiles_per_second",
            "Tile rate of the job running on a device",
            ["device"],
            registry=self.registry,
        )
        self.registry.register(_JobStates(count_by_state))

    def render(self) -> bytes:
        return generate_latest(self.registry)
