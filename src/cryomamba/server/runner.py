"""The job queue: worker threads (one per device slot) that claim queued jobs and run them.

Inference runs on these threads, never on the event loop. Each server job has a core
`Job` here that WebSocket readers follow; the worker feeds it from the local executor's
events, saves the artifacts, and records every state change in the database first.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from pathlib import Path
from typing import Any

from ..config import JobConfig
from ..errors import CryoMambaError
from ..events import Canceled, Completed, Failed, Preview, Progress
from ..executors.base import failure
from ..job import Job
from .storage import Storage

__all__ = ["JobRunner", "detect_devices"]

log = logging.getLogger(__name__)

PROGRESS_WRITE_INTERVAL_S = 1.0
ARTIFACT_NAMES = {
    "mrc": "mask.mrc",
    "nifti": "mask.nii.gz",
    "nrrd": "mask.nrrd",
    "stats": "stats.json",
    "png": "overview.png",
}


def detect_devices() -> tuple[str, ...]:
    """Every CUDA device, or the CPU when there is none."""
    import torch

    if torch.cuda.is_available():
        return tuple(f"cuda:{i}" for i in range(torch.cuda.device_count()))
    return ("cpu",)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


class JobRunner:
    """Runs queued jobs on `devices` × `per_device` worker threads, in submission order."""

    def __init__(
        self,
        storage: Storage,
        artifacts_dir: Path,
        devices: tuple[str, ...],
        *,
        per_device: int = 1,
        metrics=None,
    ) -> None:
        self.storage, self.artifacts_dir = storage, artifacts_dir
        self.devices, self.per_device, self.metrics = devices, per_device, metrics
        self.live: dict[str, Job] = {}
        self._inner: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._wake = threading.Condition()
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self._executors: dict[str, Any] = {}

    # -- lifecycle --------------------------------------------------------------------------
    def recover(self, on_restart: str) -> dict[str, int]:
        """After a restart: interrupted jobs fail (retryable) or go back to the queue."""
        counts = {"failed": 0, "requeued": 0, "queued": 0}
        now = time.time()
        for row in self.storage.jobs_in("running", "previewing"):
            if on_restart == "requeue":
                self.storage.update_job(
                    row["id"],
                    state="queued",
                    started_at=None,
                    progress=None,
                    device=_requested_device(row),
                )
                counts["requeued"] += 1
            else:
                self.storage.update_job(
                    row["id"],
                    state="failed",
                    finished_at=now,
                    error={
                        "code": "server_restarted",
                        "message": "the server restarted while this job was running",
                        "hint": "submit the job again (the server can re-queue such jobs "
                        "itself: --on-restart requeue)",
                        "retryable": True,
                    },
                )
                counts["failed"] += 1
        for row in self.storage.jobs_in("queued"):
            self.track(row["id"])
            counts["queued"] += 1
        return counts

    def start(self) -> None:
        for device in self.devices:
            for slot in range(self.per_device):
                t = threading.Thread(
                    target=self._work,
                    args=(device,),
                    name=f"cryomamba-{device}-{slot}",
                    daemon=True,
                )
                t.start()
                self._threads.append(t)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop taking jobs and cancel running ones; their records stay `running` for recovery."""
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        for inner in list(self._inner.values()):
            inner.cancel()
        for t in self._threads:
            t.join(timeout)
        for ex in self._executors.values():
            ex.close()

    # -- what routes call -------------------------------------------------------------------
    def track(self, job_id: str) -> Job:
        """The live `Job` that readers follow (created when the job is queued)."""
        with self._lock:  # the route that queued the job and the worker may race here
            job = self.live.get(job_id)
            if job is None:
                job = Job(job_id, on_cancel=lambda: self._cancel_inner(job_id))
                self.live[job_id] = job
            return job

    def enqueue(self, row: dict[str, Any]) -> Job:
        job = self.track(row["id"])  # before the row exists, so no worker can get there first
        try:
            self.storage.add_job(row)
        except BaseException:
            self.live.pop(row["id"], None)
            raise
        with self._wake:
            self._wake.notify_all()
        return job

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued or running job; False when it had already ended."""
        if self.storage.cancel_if_queued(job_id, time.time()):
            job = self.live.pop(job_id, None)
            if job is not None:
                job.emit(Canceled())
            return True
        job = self.live.get(job_id)
        return job.cancel() if job is not None else False

    def _cancel_inner(self, job_id: str) -> None:
        inner = self._inner.get(job_id)
        if inner is not None:
            inner.cancel()

    # -- workers ----------------------------------------------------------------------------
    def _work(self, device: str) -> None:
        while True:
            with self._wake:
                if self._stopping:
                    return
                row = self.storage.claim_next(device, time.time())
                if row is None:
                    self._wake.wait(timeout=5.0)
                    continue
            try:
                self._run(row, device)
            except Exception:  # a bug must not kill the worker; the job is marked failed
                log.exception("job %s crashed its worker", row["id"])
                self._finish(
                    row["id"],
                    Failed(
                        code="internal_error",
                        message="the server hit an unexpected error",
                        hint="this is a bug in CryoMamba; please report it with the server log",
                    ),
                )

    def _executor(self, device: str):
        from ..executors.local import LocalExecutor

        with self._lock:
            ex = self._executors.get(device)
            if ex is None:  # one executor per device, running as many jobs as it has slots
                ex = self._executors[device] = LocalExecutor(max_workers=self.per_device)
            return ex

    def _run(self, row: dict[str, Any], device: str) -> None:
        from ..volume import Volume

        job_id = row["id"]
        job = self.track(job_id)
        if job.cancel_requested.is_set():
            self._finish(job_id, Canceled())
            return
        job.set_state("running")
        log.info("job %s started on %s", job_id, device)
        config = JobConfig.from_dict(row["config"]).replace(device=device)
        try:
            volume = Volume.open(row["source"]["path"], sha256=row["source"].get("sha256"))
        except (CryoMambaError, OSError) as exc:
            self._finish(
                job_id,
                failure(
                    exc,
                    io_hint="the job's file is gone or unreadable on the server; tell its "
                    "operator, or upload the file again",
                ),
            )
            return
        inner = self._executor(device).submit(volume, config)
        self._inner[job_id] = inner
        if job.cancel_requested.is_set():
            inner.cancel()
        try:
            self._follow(job_id, job, inner, device, config)
        finally:
            self._inner.pop(job_id, None)
            volume.close()

    def _follow(self, job_id: str, job: Job, inner: Job, device: str, config: JobConfig) -> None:
        last_write = 0.0
        last_tiles, last_t = 0, time.monotonic()
        previewing = False
        for event in inner.events():
            if isinstance(event, Progress):
                now = time.monotonic()
                if self.metrics is not None:
                    self.metrics.tiles.labels(device).inc(event.tiles_done - last_tiles)
                    if now > last_t:
                        rate = (event.tiles_done - last_tiles) / (now - last_t)
                        self.metrics.tiles_per_second.labels(device).set(rate)
                last_tiles, last_t = event.tiles_done, now
                if now - last_write >= PROGRESS_WRITE_INTERVAL_S or event.fraction >= 1:
                    self.storage.update_job(job_id, progress=_progress(event))
                    last_write = now
                job.emit(event)
            elif isinstance(event, Preview):
                if not previewing:
                    self.storage.update_job(job_id, state="previewing")
                    previewing = True
                job.emit(event)
            elif isinstance(event, Completed):
                self._complete(job_id, event, config)
            elif isinstance(event, (Failed, Canceled)):
                if self._stopping and isinstance(event, Canceled):
                    log.warning("job %s interrupted by shutdown", job_id)
                    return  # left `running`: recovery on the next boot decides
                self._finish(job_id, event)
        if self.metrics is not None:
            self.metrics.tiles_per_second.labels(device).set(0)

    def _complete(self, job_id: str, event: Completed, config: JobConfig) -> None:
        result = event.result
        out = self.artifacts_dir / job_id
        try:
            paths = result.save(out, formats=config.formats)
        except CryoMambaError as exc:
            self._finish(
                job_id, Failed(code=exc.code, message=exc.message, hint=exc.hint, retryable=True)
            )
            return
        except OSError as exc:
            self._finish(
                job_id,
                Failed(
                    code="output_not_writable",
                    message=str(exc),
                    hint="the server's artifacts folder is not writable or full; tell its operator",
                    retryable=True,
                ),
            )
            return
        artifacts = {
            path.name: {"sha256": _sha256(path), "size": path.stat().st_size}
            for path in paths.values()
        }
        row = self.storage.job(job_id)
        source = row["source"]
        if source.get("sha256") is None:  # a server path: the engine hashed it for provenance
            source = {**source, "sha256": result.provenance.get("source", {}).get("sha256")}
        self.storage.update_job(
            job_id,
            state="completed",
            finished_at=time.time(),
            artifacts=artifacts,
            progress={**(row["progress"] or {}), "fraction": 1.0, "eta_s": 0.0},
            model={**row["model"], "sha256": result.provenance.get("model", {}).get("sha256")},
            source=source,
        )
        log.info("job %s completed", job_id)
        job = self.live.pop(job_id, None)
        if job is not None:
            job.emit(Completed(result=None, artifacts={k: k for k in artifacts}))

    def _finish(self, job_id: str, event: Failed | Canceled) -> None:
        fields: dict[str, Any] = {"finished_at": time.time()}
        if isinstance(event, Failed):
            fields.update(
                state="failed",
                error={
                    "code": event.code,
                    "message": event.message,
                    "hint": event.hint,
                    "retryable": event.retryable,
                },
            )
            log.info("job %s failed: %s", job_id, event.code)
        else:
            fields["state"] = "canceled"
            log.info("job %s canceled", job_id)
        self.storage.update_job(job_id, **fields)
        job = self.live.pop(job_id, None)
        if job is not None:
            job.emit(event)


def _progress(event: Progress) -> dict[str, Any]:
    return {
        "fraction": event.fraction,
        "tiles_done": event.tiles_done,
        "tiles_total": event.tiles_total,
        "eta_s": event.eta_s,
    }


def _requested_device(row: dict[str, Any]) -> str | None:
    device = row["config"].get("device", "auto")
    return None if device == "auto" else device
