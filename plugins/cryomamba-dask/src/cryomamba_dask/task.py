"""What runs on a Dask worker: one job, through the same engine as `executor="local"`.

`run_job` opens the source (a path on shared storage, or a scattered array), runs it on a
per-process `LocalExecutor` (models stay loaded between jobs), streams Progress and Preview
back with `Worker.log_event`, and writes the artifacts into the job's `out` folder with
`Segmentation.save` (the all-or-nothing writer `FileSink` uses). It returns a small dict:
the terminal state plus what the client needs to build the `Segmentation` from `out`.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from cryomamba.config import JobConfig
from cryomamba.errors import CryoMambaError
from cryomamba.events import Canceled, Completed, Failed, Preview, Progress
from cryomamba.executors.base import failure, is_bug

from .wire import encode

__all__ = ["PROGRESS_INTERVAL_S", "run_job"]

log = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 0.1
"""At most ten Progress events a second per job cross the wire (the last one always does)."""

_lock = threading.Lock()
_executor: Any = None
_threads_set: int | None = None


def _local_executor(nthreads: int) -> Any:
    """This worker process's `LocalExecutor`, as many slots as the worker has threads."""
    global _executor
    from cryomamba.executors.local import LocalExecutor

    with _lock:
        if _executor is None:
            _executor = LocalExecutor(max_workers=max(1, nthreads))
        return _executor


def _undo_malloc_trim() -> None:
    """Give glibc back its own allocation thresholds if Dask's nanny set MALLOC_TRIM_THRESHOLD_.

    Setting that variable (Dask does, so idle workers return memory to the OS) also switches
    off glibc's adaptive mmap threshold: every tensor over 128 KiB is then mmap'd and unmapped
    again, and each tile's buffers fault in fresh zeroed pages. Measured on the bundled model:
    3.4× the system time and 1.5× the wall time of the same jobs in a plain process. The
    values below are where glibc's adaptive thresholds settle for blocks of up to 32 MiB.
    """
    global _malloc_fixed
    if _malloc_fixed or "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        return
    _malloc_fixed = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): the variable means nothing there
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 << 20)
    libc.mallopt(m_trim_threshold, 64 << 20)


_malloc_fixed = False


def _set_torch_threads(threads: int | None) -> None:
    global _threads_set
    if threads and threads != _threads_set:
        import torch

        torch.set_num_threads(threads)
        _threads_set = threads


class _Sender:
    """Numbered worker events for one job on the executor's topic; never blocks the engine."""

    def __init__(self, worker: Any, topic: str, job_id: str) -> None:
        self.worker, self.topic, self.job_id, self.seq = worker, topic, job_id, 0
        self._last_progress = 0.0
        self._held: Progress | None = None

    def send(self, msg: dict[str, Any]) -> None:
        self.seq += 1
        self.worker.log_event(self.topic, {**msg, "job": self.job_id, "seq": self.seq})

    def event(self, event: Progress | Preview) -> None:
        if isinstance(event, Progress):
            now = time.monotonic()
            if now - self._last_progress < PROGRESS_INTERVAL_S and event.fraction < 1:
                self._held = event  # latest only; flushed before the next preview or the end
                return
            self._last_progress, self._held = now, None
        else:
            self.flush()
        self.seq += 1
        self.worker.log_event(self.topic, encode(self.job_id, self.seq, event))

    def flush(self) -> None:
        if self._held is not None:
            held, self._held = self._held, None
            self._last_progress = time.monotonic()
            self.seq += 1
            self.worker.log_event(self.topic, encode(self.job_id, self.seq, held))


def _where(worker: Any) -> str:
    return f"worker {worker.address} on {socket.gethostname()}"


def _count_run(name: str) -> int:
    """This job's run number (1 = first), kept in a Dask Variable the client created."""
    from distributed import Variable

    var = Variable(name)
    runs = int(var.get(timeout=30)) + 1
    var.set(runs)
    return runs


def _watch_cancel(
    name: str, job: Any, done: threading.Event, worker: Any, key: Any
) -> threading.Thread:
    """Cancel `job` as soon as the client sets the Dask Event `name` (a blocking wait on the
    scheduler, renewed every second until the job is over: no file or flag polling), or
    when the scheduler no longer wants the task (its client is gone, e.g. a server killed
    mid-job): an orphan never runs on, nor writes artifacts nobody will record."""
    from distributed import Event

    flag = Event(name)

    def watch() -> None:
        while not done.is_set():
            try:
                # a short wait, so that none outlives the job by much
                if flag.wait(timeout=1) or _abandoned(worker, key):
                    job.cancel()
                    return
            except Exception:  # the scheduler went away: the task ends with the worker
                return

    thread = threading.Thread(target=watch, name=f"cryomamba-cancel-{name[-8:]}", daemon=True)
    thread.start()
    return thread


def _abandoned(worker: Any, key: Any) -> bool:
    """Whether the scheduler released the running task (no client wants its result)."""
    ts = worker.state.tasks.get(key)
    return ts is None or ts.state in ("cancelled", "released", "forgotten")


def _open(source: Any, spec: dict[str, Any], worker: Any) -> Any:
    from cryomamba.volume import Volume

    if isinstance(source, str):
        try:
            if spec.get("expect") is not None:
                _check_same_file(source, spec["expect"])
            return Volume.open(source)
        except CryoMambaError:
            raise
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise _WorkerIOError(f"{_where(worker)} cannot read {source}: {reason}") from None
    return Volume.from_array(source, voxel_size=spec["voxel_size"], origin=spec["origin"])


def _check_same_file(path: str, expect: list[int]) -> None:
    """The file the client checked (size, mtime) is still the one at `path`."""
    st = os.stat(path)
    if [st.st_size, st.st_mtime_ns] != list(expect):
        raise CryoMambaError(
            "the job's file changed after it was checked",
            hint="submit the job again",
            code="path_not_allowed",
        )


class _WorkerIOError(CryoMambaError):
    code = "io_error"
    retryable = True

    def __init__(self, message: str) -> None:
        super().__init__(
            message,
            hint="the workers must see the tomogram at the same absolute path: put it on "
            "storage shared with them (docs/cluster.md)",
        )


def _clean_temporaries(out: Path) -> None:
    """Leftovers of a writer killed with its worker (`.tmp-*` in `out`) go before a new run."""
    if out.is_dir():
        for leftover in out.glob(".tmp-*"):
            leftover.unlink(missing_ok=True)


def run_job(spec: dict[str, Any], source: Any) -> dict[str, Any]:
    """Run one job on this worker and return its outcome (never raises for a job's failure)."""
    from distributed import get_worker

    worker = get_worker()
    sender = _Sender(worker, spec["topic"], spec["job"])
    runs = _count_run(spec["runs"])
    sender.send({"type": "started", "worker": worker.address, "pid": os.getpid(), "run": runs})
    if runs > spec["max_runs"]:
        return _outcome(
            sender,
            Failed(
                code="worker_lost",
                message=f"the worker running this job died (run {runs - 1} of {spec['max_runs']})",
                hint="submit it again; if workers keep dying, check their memory limit and "
                "the worker logs (a GPU or host out of memory is the usual cause)",
                retryable=True,
            ),
        )
    out = Path(spec["out"])
    _clean_temporaries(out)
    done = threading.Event()
    try:
        _undo_malloc_trim()
        _set_torch_threads(spec.get("torch_threads"))
        config = JobConfig.from_dict(spec["config"])
        volume = _open(source, spec, worker)
        job = _local_executor(worker.state.nthreads).submit(volume, config)
        _watch_cancel(spec["cancel"], job, done, worker, worker.get_current_task())
        for event in job.events():
            if isinstance(event, (Progress, Preview)):
                sender.event(event)
        sender.flush()
        terminal = job.terminal_event
        if isinstance(terminal, Completed) and terminal.result is not None:
            return _completed(sender, terminal, spec, volume, worker)
        return _outcome(sender, terminal)
    except Exception as exc:
        if is_bug(exc):
            log.exception("job %s failed on %s", spec["job"], worker.address)
        return _outcome(sender, failure(exc, io_hint=_IO_HINT))
    finally:
        done.set()


_IO_HINT = "check that the output folder is on storage the workers can write, with free space"


def _completed(
    sender: _Sender, event: Completed, spec: dict[str, Any], volume: Any, worker: Any
) -> dict[str, Any]:
    result = event.result
    assert result is not None
    result.provenance["dask"] = {
        "worker": worker.address,
        "host": socket.gethostname(),
        "slurm_job": os.environ.get("SLURM_JOB_ID"),  # set when sbatch started the worker
    }
    formats = tuple(dict.fromkeys(("mrc", "stats", *spec["formats"])))
    paths = result.save(spec["out"], formats)
    return {
        "state": "completed",
        "events": sender.seq,
        "artifacts": {fmt: str(path) for fmt, path in paths.items()},
        "voxel_size": tuple(result.voxel_size),
        "origin": tuple(result.origin),
        "label_names": dict(result.label_names),
        "provenance": result.provenance,
        "stats": result.stats,
    }


def _outcome(sender: _Sender, event: Any) -> dict[str, Any]:
    if isinstance(event, Failed):
        return {"state": "failed", "events": sender.seq, **event.to_dict()}
    if isinstance(event, Canceled):
        return {"state": "canceled", "events": sender.seq}
    return {
        "state": "failed",
        "events": sender.seq,
        **Failed(code="internal_error", message=f"job ended with {event!r}").to_dict(),
    }
