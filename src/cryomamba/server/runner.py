"""The job queue: worker threads (one per device slot) that claim queued jobs and run them.

Inference runs on the executor's threads, never on the event loop. A server job is one
`Job` from the moment it is queued to its end: WebSocket readers follow it, the runner
hands it to the executor (from the registry: `local` unless the server says otherwise) to
feed, and a `_Recorder` on the job writes every state change to the database before any
reader sees it.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..config import JobConfig
from ..errors import CryoMambaError
from ..events import Canceled, Completed, Event, Failed, Preview, Progress
from ..executors.base import Executor, failure, make_executor
from ..job import Job, JobState
from .paths import open_job_source, public_provenance
from .storage import Storage

__all__ = ["JobRunner", "detect_devices"]

log = logging.getLogger(__name__)

PROGRESS_WRITE_INTERVAL_S = 1.0


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
    """Runs queued jobs on `devices` × `per_device` worker threads, in submission order.

    `executor` names the back end in the executor registry (`local` runs jobs in this
    process, as many at once as there are slots); `executor_options` go to its factory.
    """

    def __init__(
        self,
        storage: Storage,
        artifacts_dir: Path,
        devices: tuple[str, ...],
        *,
        per_device: int = 1,
        metrics: Any = None,
        executor: str = "local",
        executor_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.storage, self.artifacts_dir = storage, artifacts_dir
        self.devices, self.per_device, self.metrics = devices, per_device, metrics
        self.live: dict[str, Job] = {}  # queued and running jobs, by id
        self._recorders: dict[str, _Recorder] = {}
        self._running: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._wake = threading.Condition()
        self._stopping = False
        self._threads: list[threading.Thread] = []
        options = dict(executor_options or {})
        if executor == "local":  # one in-process slot per worker thread
            options.setdefault("max_workers", len(devices) * per_device)
        self.executor_name = executor
        self.executor: Executor = make_executor(executor, **options)
        slots = getattr(self.executor, "slots", None)
        if executor != "local" and callable(slots):  # a cluster: its workers pick devices
            self.devices, self.per_device = ("auto",), max(per_device, int(slots()))

    # -- lifecycle --------------------------------------------------------------------------
    def recover(self, on_restart: str) -> dict[str, int]:
        """After a restart: interrupted jobs fail (retryable) or go back to the queue."""
        counts = {"failed": 0, "requeued": 0, "queued": 0}
        now = time.time()
        for row in self.storage.jobs_in(JobState.RUNNING, JobState.PREVIEWING):
            if on_restart == "requeue":
                self.storage.update_job(
                    row["id"],
                    state=JobState.QUEUED,
                    started_at=None,
                    progress=None,
                    device=_requested_device(row),
                )
                counts["requeued"] += 1
            else:
                self.storage.update_job(
                    row["id"],
                    state=JobState.FAILED,
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
        for row in self.storage.jobs_in(JobState.QUEUED):
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
        for job in list(self._running.values()):
            job.cancel()
        for t in self._threads:
            t.join(timeout)
        self.executor.close()

    # -- what routes call -------------------------------------------------------------------
    def track(self, job_id: str) -> Job:
        """The live `Job` that readers follow (created when the job is queued)."""
        with self._lock:  # the route that queued the job and the worker may race here
            job = self.live.get(job_id)
            if job is None:
                recorder = self._recorders[job_id] = _Recorder(self, job_id)
                job = self.live[job_id] = Job(job_id, record=recorder)
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
            job = self.live.get(job_id)
            if job is not None:
                job.emit(Canceled())
            self._recorders.pop(job_id, None)
            return True
        job = self.live.get(job_id)
        return job.cancel() if job is not None else False

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
            job = self.track(row["id"])
            try:
                self._run(job, row, device)
            except Exception:  # a bug must not kill the worker; the job is marked failed
                log.exception("job %s crashed its worker", row["id"])
                job.emit(
                    Failed(
                        code="internal_error",
                        message="the server hit an unexpected error",
                        hint="this is a bug in CryoMamba; please report it with the server log",
                    )
                )
            finally:
                self._running.pop(row["id"], None)
                self._recorders.pop(row["id"], None)

    def _run(self, job: Job, row: dict[str, Any], device: str) -> None:
        """Hand the job to the executor and wait (this slot stays taken) until it has ended."""
        recorder = self._recorders[job.id]
        if job.cancel_requested.is_set():
            job.emit(Canceled())
            return
        job.set_state(JobState.RUNNING)
        log.info("job %s started on %s", job.id, device)
        config = JobConfig.from_dict(row["config"]).replace(device=device)
        recorder.begin(device, config)
        try:
            volume = open_job_source(row["source"])  # the file checked at submit, no link followed
        except (CryoMambaError, OSError) as exc:
            job.emit(
                failure(
                    exc,
                    io_hint="the job's file is gone or unreadable on the server; tell its "
                    "operator, or upload the file again",
                )
            )
            return
        try:
            self._running[job.id] = job
            self.executor.submit(volume, config, job=job)
            recorder.ended.wait()
        finally:
            volume.close()

    # -- what the recorder calls ----------------------------------------------------------------
    def _save(self, job_id: str, event: Completed, config: JobConfig) -> Event:
        """Write the artifacts and the completed record; the event readers get (Failed if the
        artifacts could not be written)."""
        result = event.result
        if result is None:
            return self._end(
                job_id,
                failure(RuntimeError("the executor completed without a result"), io_hint=""),
            )
        row = self.storage.job(job_id)
        assert row is not None  # the job's own record: it exists while the job runs
        source = row["source"]  # stats.json names files, not server paths:
        result.provenance = public_provenance(result.provenance, source["filename"])
        try:
            paths = result.save(self.artifacts_dir / job_id, formats=config.formats)
        except CryoMambaError as exc:
            return self._end(
                job_id, Failed(code=exc.code, message=exc.message, hint=exc.hint, retryable=True)
            )
        except OSError as exc:
            return self._end(
                job_id,
                Failed(
                    code="output_not_writable",
                    message=f"the job's results could not be written: {exc.strerror or exc}",
                    hint="the server's artifacts folder is not writable or full; tell its operator",
                    retryable=True,
                ),
            )
        paths = {f: _one_file(p) for f, p in paths.items()}  # a zarr folder → one .zip
        artifacts = {
            path.name: {"sha256": _sha256(path), "size": path.stat().st_size}
            for path in paths.values()
        }
        row = self.storage.job(job_id)
        assert row is not None
        source = row["source"]
        if source.get("sha256") is None:  # a server path: the engine hashed it for provenance
            source = {**source, "sha256": result.provenance.get("source", {}).get("sha256")}
        # the voxel sizes it ran at (the tomogram's, the model's) and whether it resampled
        source = {**source, "spacing": result.provenance.get("spacing")}
        self.storage.update_job(
            job_id,
            state=JobState.COMPLETED,
            finished_at=time.time(),
            artifacts=artifacts,
            progress={**(row["progress"] or {}), "fraction": 1.0, "eta_s": 0.0},
            model={**row["model"], "sha256": result.provenance.get("model", {}).get("sha256")},
            source=source,
        )
        log.info("job %s completed", job_id)
        self.live.pop(job_id, None)
        # readers get the artifacts' names; the in-memory result is the executor's to drop
        return Completed(result=None, artifacts={name: name for name in artifacts})

    def _end(self, job_id: str, event: Failed | Canceled) -> Failed | Canceled:
        """Record a failed or canceled job; the event readers get."""
        fields: dict[str, Any] = {"finished_at": time.time()}
        if isinstance(event, Failed):
            fields.update(
                state=JobState.FAILED,
                error={
                    "code": event.code,
                    "message": event.message,
                    "hint": event.hint,
                    "retryable": event.retryable,
                },
            )
            log.info("job %s failed: %s", job_id, event.code)
        else:
            fields["state"] = JobState.CANCELED
            log.info("job %s canceled", job_id)
        self.storage.update_job(job_id, **fields)
        self.live.pop(job_id, None)
        return event


class _Recorder:
    """One job's observer (`Job(record=...)`): each event reaches the database, and the
    metrics, before the job hands it to readers. Runs in whichever thread emits."""

    def __init__(self, runner: JobRunner, job_id: str) -> None:
        self.runner, self.job_id = runner, job_id
        self.device = "queued"
        self.config: JobConfig | None = None
        self.ended = threading.Event()
        self._last_write = 0.0
        self._last_tiles, self._last_t = 0, time.monotonic()
        self._previewing = False

    def begin(self, device: str, config: JobConfig) -> None:
        self.device, self.config = device, config
        self._last_t = time.monotonic()

    def __call__(self, event: Event) -> Event | None:
        try:
            out = self._record(event)
        except Exception as exc:  # the job must still end, and its reader hear of it
            log.exception("job %s: recording %s failed", self.job_id, event.kind)
            if not event.terminal:
                return event
            out = self._fallback(exc)
        if event.terminal:
            self.ended.set()
            metrics = self.runner.metrics
            if metrics is not None and self.config is not None:
                metrics.tiles_per_second.labels(self.device).set(0)
        return out

    def _record(self, event: Event) -> Event | None:
        runner, job_id = self.runner, self.job_id
        if isinstance(event, Progress):
            self._progress(event)
        elif isinstance(event, Preview):
            if not self._previewing:
                runner.storage.update_job(job_id, state=JobState.PREVIEWING)
                self._previewing = True
        elif isinstance(event, Completed):
            assert self.config is not None
            return runner._save(job_id, event, self.config)
        elif isinstance(event, Canceled) and runner._stopping:
            log.warning("job %s interrupted by shutdown", job_id)
            return None  # left `running`: recovery on the next boot decides
        elif isinstance(event, (Failed, Canceled)):
            return runner._end(job_id, event)
        return event

    def _progress(self, event: Progress) -> None:
        now = time.monotonic()
        metrics = self.runner.metrics
        if metrics is not None:
            metrics.tiles.labels(self.device).inc(max(0, event.tiles_done - self._last_tiles))
            if now > self._last_t:
                rate = (event.tiles_done - self._last_tiles) / (now - self._last_t)
                metrics.tiles_per_second.labels(self.device).set(rate)
        self._last_tiles, self._last_t = event.tiles_done, now
        if now - self._last_write >= PROGRESS_WRITE_INTERVAL_S or event.fraction >= 1:
            self.runner.storage.update_job(self.job_id, progress=event.record())
            self._last_write = now

    def _fallback(self, exc: BaseException) -> Event:
        event = Failed(
            code="internal_error",
            message="the server hit an unexpected error",
            hint="this is a bug in CryoMamba; please report it with the server log",
        )
        try:
            return self.runner._end(self.job_id, event)
        except Exception:  # the database itself is failing: readers still hear the end
            log.exception("job %s: could not record its failure", self.job_id)
            return event


def _requested_device(row: dict[str, Any]) -> str | None:
    device = row["config"].get("device", "auto")
    return None if device == "auto" else device


def _one_file(path: Path) -> Path:
    """A folder artifact (mask.zarr, probabilities.zarr) zipped beside it, the folder removed."""
    if not path.is_dir():
        return path
    from ..folder_zip import zip_folder

    archive = zip_folder(path, path.with_name(path.name + ".zip"))
    shutil.rmtree(path, ignore_errors=True)
    return archive
