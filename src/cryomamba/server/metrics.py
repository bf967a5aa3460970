"""Prometheus metrics (prometheus-client), one registry per app so tests can build many apps.

Counters and histograms are updated as things happen; what the database or the disk
knows (jobs by state, the oldest running job, the data folder's free space) is read at
scrape time by collectors, so it is never stale and costs nothing between scrapes.
deploy/grafana/cryomamba.json and deploy/prometheus/alerts.yml use these names; a test
(tests/test_deploy.py) checks that every name they use is exported here.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..job import JobState

__all__ = ["Metrics"]

RUNNING_STATES = (JobState.RUNNING, JobState.PREVIEWING)


class _JobStates(Collector):
    """Jobs by state and the queue depth, read from the database at scrape time."""

    def __init__(self, count_by_state: Callable[[], dict[str, int]]) -> None:
        self.count_by_state = count_by_state

    def collect(self) -> Iterator[Metric]:
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


class _OldestRunningJob(Collector):
    """The oldest running job's age and how long its last ETA said the whole job would take.

    A job whose age passes a few times its expected duration is stuck (an alert in
    deploy/prometheus/alerts.yml). The expected duration comes from the last progress
    record: `eta_s / (1 - fraction)`, the total the ETA implies; 0 while no ETA is known.
    With nothing running both are 0.
    """

    def __init__(self, running_jobs: Callable[[], list[dict[str, Any]]]) -> None:
        self.running_jobs = running_jobs

    def collect(self) -> Iterator[Metric]:
        rows = [r for r in self.running_jobs() if r.get("started_at") is not None]
        oldest = min(rows, key=lambda r: r["started_at"], default=None)
        age = expected = 0.0
        if oldest is not None:
            age = max(0.0, time.time() - float(oldest["started_at"]))
            expected = expected_seconds(oldest.get("progress"))
        yield GaugeMetricFamily(
            "cryomamba_oldest_running_job_age_seconds",
            "Seconds since the oldest running job started (0: none running)",
            value=age,
        )
        yield GaugeMetricFamily(
            "cryomamba_oldest_running_job_expected_seconds",
            "Total run time the oldest running job's last ETA implies (0: not known yet)",
            value=expected,
        )


def expected_seconds(progress: dict[str, Any] | None) -> float:
    """The whole job's duration implied by a progress record's ETA; 0.0 when unknown."""
    if not progress or progress.get("eta_s") is None:
        return 0.0
    fraction = float(progress.get("fraction") or 0.0)
    if not 0.0 < fraction < 1.0:
        return 0.0
    return float(progress["eta_s"]) / (1.0 - fraction)


class _DataDirDisk(Collector):
    """Free and total bytes of the file system holding the data folder (`shutil.disk_usage`)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir

    def collect(self) -> Iterator[Metric]:
        try:
            usage = shutil.disk_usage(self.data_dir)
        except OSError:  # the folder went away: export nothing rather than fail the scrape
            return
        yield GaugeMetricFamily(
            "cryomamba_data_dir_free_bytes",
            "Bytes free (for this user) on the data folder's file system",
            value=usage.free,
        )
        yield GaugeMetricFamily(
            "cryomamba_data_dir_size_bytes",
            "Total bytes of the data folder's file system",
            value=usage.total,
        )


class Metrics:
    """The server's metrics; `render()` is the /metrics body."""

    content_type = "text/plain; version=0.0.4; charset=utf-8"

    def __init__(
        self,
        count_by_state: Callable[[], dict[str, int]],
        *,
        running_jobs: Callable[[], list[dict[str, Any]]] | None = None,
        data_dir: Path | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "cryomamba_http_requests",
            "HTTP requests by route and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.errors = Counter(
            "cryomamba_http_errors",
            "Error responses by error code (the `code` of the error envelope) and status",
            ["code", "status"],
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
        if running_jobs is not None:
            self.registry.register(_OldestRunningJob(running_jobs))
        if data_dir is not None:
            self.registry.register(_DataDirDisk(data_dir))

    def add_devices(self, devices: tuple[str, ...] | list[str]) -> None:
        """Export the per-device series (at 0) from the start, so `rate()` and the
        queue-stalled alert see a device that has not predicted a tile yet."""
        for device in devices:
            self.tiles.labels(device)
            self.tiles_per_second.labels(device).set(0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
