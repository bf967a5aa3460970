"""`DaskExecutor`: one job = one Dask task on one worker, events streamed back live.

What travels: the source as a path on shared storage (or an array scattered to the cluster,
below `scatter_limit` bytes), the `JobConfig` as plain JSON, and the `out` folder where the
worker writes the artifacts. What comes back: Progress and Preview as Dask *worker events*
(`Worker.log_event` on the worker, `Client.subscribe_topic` here), then the task's small
result dict; the caller's `Segmentation` memory-maps `out/mask.mrc`.

Why worker events: they are pushed (the scheduler forwards each one to the subscribed
client at once, no polling), and `log_event` is fire-and-forget on the worker's batched
stream, so a slow consumer never slows inference; the `Job` then keeps only the latest
Progress and Preview for each reader. A `distributed.Queue` costs a scheduler round trip per
put on the inference thread and piles up when nobody reads; a `Variable` is latest-only but
must be polled; Pub/Sub is gone from `distributed`.

Cancel: a queued task is cancelled in the scheduler and never starts; a running one is told
through a Dask `Event` its worker waits on, and stops between tile batches, freeing its slot.
A worker that dies mid-job ends it as `Failed(worker_lost, retryable)`, or reruns it once
more per `reruns`.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import tempfile
import threading
import uuid
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cryomamba.config import JobConfig
from cryomamba.errors import ConfigError, InvalidVolumeError
from cryomamba.events import Canceled, Completed, Failed
from cryomamba.executors.base import failure, job_for
from cryomamba.job import Job, JobState
from cryomamba.segmentation import Segmentation
from cryomamba.sinks.file import FileSink
from cryomamba.volume import Volume

from .cluster import ClusterError, connect
from .wire import decode

__all__ = ["SCATTER_LIMIT", "DaskExecutor"]

log = logging.getLogger(__name__)

SCATTER_LIMIT = 256 << 20
"""In-memory volumes up to this many bytes are scattered to the cluster; larger ones must be
files on shared storage (a 10 GB array must not travel through the scheduler)."""

_DRAIN_TIMEOUT_S = 10.0


@dataclass
class _Run:
    """The client's view of one job: its future, what has arrived, where it runs."""

    job: Job
    out: Path
    future: Any = None
    started: bool = False
    worker: dict[str, Any] = field(default_factory=dict)
    seen: int = 0
    cond: threading.Condition = field(default_factory=threading.Condition)
    names: tuple[str, str] = ("", "")  # the Dask Variable (runs) and Event (cancel)
    source: str | None = None  # the source's path, when it is a file


class DaskExecutor:
    """Runs jobs on a Dask cluster (`cluster`: None, an address, a Client or "slurm").

    - `out`: where artifacts go, `out/<job id>/`, on storage the workers share with you
      (default: a temporary folder, fine for a LocalCluster). A `FileSink` among a job's sinks
      names that job's folder instead, and the worker writes there directly.
    - `workers`: CPU workers of a LocalCluster (torch threads split fairly), or SLURM jobs.
    - `reruns`: how many times a job whose worker died runs again (0: it fails as
      `worker_lost`, retryable).
    - `scatter_limit`: the largest in-memory volume (bytes) sent to the cluster.
    - `connect_timeout_s`: how long to try reaching a scheduler before `ClusterError`.
    """

    def __init__(
        self,
        cluster: Any = None,
        *,
        out: str | os.PathLike[str] | None = None,
        workers: int | None = None,
        reruns: int = 0,
        scatter_limit: int = SCATTER_LIMIT,
        connect_timeout_s: float = 10.0,
    ) -> None:
        if reruns < 0:
            raise ConfigError(f"reruns must be 0 or more, got {reruns}", hint="e.g. reruns=1")
        self.reruns, self.scatter_limit = reruns, scatter_limit
        self._own_out = out is None
        self.out = (
            Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="cryomamba-dask-"))
        )
        if self._own_out:  # removed on close(), or at exit for an executor nobody closed
            self._remove_out = weakref.finalize(self, shutil.rmtree, self.out, True)
        self._conn = connect(cluster, workers=workers, connect_timeout_s=connect_timeout_s)
        self.client = self._conn.client
        self.topic = f"cryomamba-{uuid.uuid4().hex}"
        self._runs: dict[str, _Run] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._inbox: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self._dispatcher = threading.Thread(
            target=self._dispatch, name="cryomamba-dask-events", daemon=True
        )
        self._dispatcher.start()
        self.client.subscribe_topic(self.topic, self._on_event)

    def __repr__(self) -> str:
        return f"DaskExecutor(scheduler={self.client.scheduler.address!r}, out={str(self.out)!r})"

    # -- the executor interface -----------------------------------------------------------------
    def submit(
        self, source: Any, config: JobConfig, sinks: Sequence[Any] = (), *, job: Job | None = None
    ) -> Job:
        """Queue `source` (an MRC path, a Volume or an array) as one task; return its `Job`.

        `job`: a `Job` the caller made (the server's runner does) to feed instead of a new one.
        """
        if self._closed:
            raise ConfigError("this DaskExecutor is closed", hint="create a new one")
        files = [s for s in sinks if isinstance(s, FileSink)]
        others = [s for s in sinks if not isinstance(s, FileSink)]
        payload, geometry = self._source(source)
        holder: list[_Run] = []
        job = job_for(job, others, lambda: self._cancel(holder[0]))
        out = files[0].out_dir if files else self.out / job.id
        formats = tuple(files[0].formats or config.formats) if files else config.formats
        run = _Run(job=job, out=Path(out).absolute())
        run.source = payload if isinstance(payload, str) else None
        run.names = (f"cryomamba-runs-{job.id}", f"cryomamba-cancel-{job.id}")
        holder.append(run)
        with self._lock:
            self._runs[job.id] = run
        spec = {
            "job": job.id,
            "topic": self.topic,
            "config": config.to_dict(),
            "out": str(run.out),
            "formats": list(formats),
            "runs": run.names[0],
            "cancel": run.names[1],
            "max_runs": 1 + self.reruns,
            "torch_threads": self._conn.torch_threads,
            **geometry,
        }
        from distributed import Variable

        try:
            Variable(run.names[0], client=self.client).set(0)
            if not isinstance(payload, str):
                payload = self.client.scatter(payload, direct=False)
            run.future = self.client.submit(
                _task(),
                spec,
                payload,
                key=f"cryomamba-job-{job.id}",
                pure=False,
                resources=self._resources(),
            )
        except (OSError, TimeoutError) as exc:
            with self._lock:
                self._runs.pop(job.id, None)
            raise ClusterError(
                f"the Dask scheduler {self.client.scheduler.address} stopped answering: {exc}",
                hint="check that the scheduler is still running",
            ) from None
        run.future.add_done_callback(lambda fut: self._finished(run, fut))
        return job

    def close(self) -> None:
        """Cancel what is still running, disconnect, stop a cluster we started."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            runs = list(self._runs.values())
        for run in runs:
            run.job.cancel()
        for run in runs:
            run.job.wait(30)
        try:
            self.client.unsubscribe_topic(self.topic)
        except Exception:  # the scheduler may be gone already
            pass
        self._conn.close()
        self._inbox.put(None)
        if self._own_out:
            self._remove_out()

    def slots(self) -> int:
        """Jobs the cluster can run at once now: its GPUs, else its workers' task slots."""
        workers = self.client.scheduler_info(n_workers=-1).get("workers", {}).values()
        gpus = sum(int((w.get("resources") or {}).get("GPU", 0)) for w in workers)
        return gpus or sum(int(w.get("nthreads", 1)) for w in workers)

    def worker_of(self, job: Job) -> dict[str, Any]:
        """Where a started job runs: `{"worker": address, "pid": ..., "run": n}` ({} if queued)."""
        run = self._runs.get(job.id)
        return dict(run.worker) if run is not None else {}

    # -- internals ------------------------------------------------------------------------------
    def _source(self, source: Any) -> tuple[Any, dict[str, Any]]:
        """What goes to the worker: a path (str) or an array, and the array's geometry."""
        if isinstance(source, Volume) and source.path is not None:
            return _shared_path(Path(source.path))
        if isinstance(source, (str, os.PathLike)):
            return str(Path(source).absolute()), {}
        if isinstance(source, (np.ndarray, Volume)):
            volume = source if isinstance(source, Volume) else Volume.from_array(source)
            if volume.nbytes > self.scatter_limit:
                raise ConfigError(
                    f"an in-memory volume of {volume.nbytes / 2**20:.0f} MiB is over the "
                    f"{self.scatter_limit / 2**20:.0f} MiB the dask executor sends through "
                    "the scheduler",
                    hint="write it to an MRC file on storage the workers share and submit the "
                    "path (or raise scatter_limit=)",
                )
            geometry = {"voxel_size": volume.voxel_size, "origin": volume.origin}
            return np.asarray(volume.data), geometry
        raise InvalidVolumeError(
            f"cannot segment a {type(source).__name__} on a Dask cluster",
            hint="pass an MRC path on shared storage, a Volume, or a 3D array",
        )

    def _resources(self) -> dict[str, float] | None:
        """`{"GPU": 1}` when some worker offers GPUs: one job per GPU; else one task slot."""
        workers = self.client.scheduler_info(n_workers=-1).get("workers", {})
        if any((w.get("resources") or {}).get("GPU") for w in workers.values()):
            return {"GPU": 1}
        return None

    def _on_event(self, event: tuple[float, dict[str, Any]]) -> None:
        """Runs on the client's event loop for every worker event of this executor's topic:
        only queues it, so no job reader, sink or recorder ever blocks Dask's loop."""
        _, msg = event
        run = self._runs.get(msg.get("job", ""))
        if run is not None and msg.get("type") == "started":
            run.started = True  # at once: cancel() must know whether the task still waits
            run.worker = {k: msg[k] for k in ("worker", "pid", "run")}
        self._inbox.put(msg)

    def _dispatch(self) -> None:
        """The one thread that feeds worker events to their jobs, in arrival order."""
        while (msg := self._inbox.get()) is not None:
            run = self._runs.get(msg.get("job", ""))
            if run is None:
                continue
            try:
                if msg["type"] == "started":
                    if run.job.state == JobState.QUEUED:
                        run.job.set_state(JobState.RUNNING)
                else:
                    run.job.emit(decode(msg))
            except Exception:  # a bad message must not stop the other jobs' events
                log.exception("job %s: could not handle a worker event", run.job.id)
            with run.cond:
                run.seen = max(run.seen, int(msg.get("seq", 0)))
                run.cond.notify_all()

    def _cancel(self, run: _Run) -> None:
        from distributed import Event

        try:
            Event(run.names[1], client=self.client).set()  # a running task stops
            if not run.started and run.future is not None:
                run.future.cancel()  # a queued one never starts
        except Exception as exc:
            log.warning("job %s: could not reach the scheduler to cancel: %s", run.job.id, exc)

    def _finished(self, run: _Run, fut: Any) -> None:
        """Runs in Dask's callback thread once the task ended: emit the terminal event."""
        job = run.job
        try:
            if fut.status == "finished":
                outcome = fut.result()
                with run.cond:  # every event the task sent arrives before the end
                    run.cond.wait_for(lambda: run.seen >= outcome["events"], _DRAIN_TIMEOUT_S)
                job.emit(self._terminal(run, outcome))
            elif fut.status == "cancelled":
                job.emit(
                    Canceled()
                    if job.cancel_requested.is_set()
                    else Failed(
                        code="cluster_lost",
                        message="the Dask scheduler dropped this job (did it restart?)",
                        hint="submit it again",
                        retryable=True,
                    )
                )
            else:
                job.emit(self._error(run, fut.exception()))
        except Exception as exc:
            log.exception("job %s: could not finish", job.id)
            job.emit(failure(exc, io_hint="check the output folder on shared storage"))
        finally:
            self._forget(run)

    def _terminal(self, run: _Run, outcome: dict[str, Any]) -> Any:
        state = outcome["state"]
        if state == "canceled":
            return Canceled()
        if state == "failed":
            _clean_partial(run.out)
            return Failed(
                code=outcome["code"],
                message=outcome["message"],
                hint=outcome.get("hint", ""),
                retryable=bool(outcome.get("retryable", False)),
            )
        artifacts = {k: Path(v) for k, v in outcome["artifacts"].items()}
        mask = Volume.open(artifacts["mrc"])
        labels = mask.data.view(np.uint8) if mask.dtype == np.int8 else mask.data  # mode 0
        result = Segmentation(
            labels=labels,
            voxel_size=tuple(outcome["voxel_size"]),  # type: ignore[arg-type]
            origin=tuple(outcome["origin"]),  # type: ignore[arg-type]
            label_names=dict(outcome["label_names"]),
            provenance=outcome["provenance"],
            image=_image(run.source),
            header=mask.header,
            artifacts=artifacts,
            _stats=outcome.get("stats"),
        )
        return Completed(result=result, artifacts={k: str(v) for k, v in artifacts.items()})

    def _error(self, run: _Run, exc: BaseException | None) -> Failed:
        from distributed import KilledWorker

        _clean_partial(run.out)
        if isinstance(exc, KilledWorker):
            return Failed(
                code="worker_lost",
                message=f"the worker running this job died: {exc}",
                hint="submit it again; if workers keep dying, check their memory limit and logs",
                retryable=True,
            )
        if exc is None:
            return Failed(code="internal_error", message="the task ended without a result")
        return failure(exc, io_hint="check the output folder on shared storage")

    def _forget(self, run: _Run) -> None:
        from distributed import Event, Variable

        with self._lock:
            self._runs.pop(run.job.id, None)
        if run.future is not None:  # the scheduler may forget the task's small result now
            run.future.release()
        if self._closed and self.client.status != "running":
            return
        try:
            Variable(run.names[0], client=self.client).delete()
            Event(run.names[1], client=self.client).clear()
        except Exception as exc:  # the scheduler may be gone; nothing to free then
            log.debug("job %s: could not free its Dask names: %s", run.job.id, exc)


def _shared_path(path: Path) -> tuple[str, dict[str, Any]]:
    """The path a worker opens. A volume read through an open descriptor (the server opens
    job files that way, so a swapped link cannot redirect it) goes by the file's real path,
    with its size and mtime for the worker to check that it still is the same file."""
    if path.parent == Path("/proc/self/fd"):
        st = os.stat(path)
        return os.readlink(path), {"expect": [st.st_size, st.st_mtime_ns]}
    return str(path.absolute()), {}


def _image(path: str | None) -> Any:
    """The source, memory-mapped, when this machine can read it (for overview.png on save)."""
    if path is None:
        return None
    try:
        return Volume.open(path).data
    except Exception:  # on a cluster the client may not see the workers' storage
        return None


def _clean_partial(out: Path) -> None:
    """Temporaries of a writer that died with its worker never stay in `out`."""
    if out.is_dir():
        for leftover in out.glob(".tmp-*"):
            leftover.unlink(missing_ok=True)


def _task() -> Any:
    from .task import run_job

    return run_job
