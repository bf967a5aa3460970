"""`RemoteExecutor`: the client of `cryomamba serve`, behaving exactly like `local`.

One background thread per job: validate the source locally, upload it in parts (bounded
parallelism, per-part retry with backoff, resume of an interrupted upload), create the job,
follow its WebSocket (Progress and Preview as they come, reconnect with backoff), then
download the signed artifacts, check their sha256 and return a `Segmentation` whose labels
are memory-mapped from the downloaded mask.mrc.

This module holds the executor's interface and its sources. It is built from parts that
live beside it, each an object it owns: an `HttpSession` (`_http.py`: the shared client,
requests with retries, errors), an `Uploader` (`_upload.py`), a `Follower` (`_follow.py`,
the job's WebSocket) and a `Downloader` (`_download.py`, the artifacts and the result), the
last three given the session.

Downloads: into `download_dir/<server job id>/` when the caller names a folder (the files
stay: they are the caller's), else into a temporary folder per job that is removed when
the result is garbage-collected or the executor is closed, whichever comes first. The
result's labels are memory-mapped from that folder's mask.mrc; on POSIX systems they stay
readable after the folder is removed, but `result.artifacts` then names files that are
gone: `result.save(folder)` or a `download_dir` keeps them. httpx and websockets are
imported inside the methods that need them; the executor is only offered when both are
installed (the `server` extra).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from ...config import JobConfig
from ...errors import ConfigError, CryoMambaError, InvalidVolumeError
from ...events import Canceled, Completed
from ...hookspecs import hookimpl
from ...job import Job, JobState
from ...registry import Registry
from ...volume import Volume
from ..base import Executor, failure, is_bug, job_for
from ._download import Downloader
from ._follow import Follower
from ._http import (
    HttpSession,
    RemoteError,
    _CanceledSignal,
    _tmpdir,
)
from ._upload import Uploader, _write_mrc

log = logging.getLogger(__name__)

__all__ = ["RemoteExecutor", "ServerPath", "UploadedFile"]


@dataclass(frozen=True)
class ServerPath:
    """A file that is already on the server (under one of its `--root` folders): no upload."""

    path: str


@dataclass(frozen=True)
class UploadedFile:
    """A file already uploaded to the server, by its file id (what `upload()` returns):
    `submit(UploadedFile(id), ...)` runs a job on it without sending it again."""

    id: str

    def __str__(self) -> str:
        return self.id


@dataclass
class _Remote:
    """What one job thread shares with `Job.cancel()`: the server's job id, once known."""

    cancel: threading.Event
    job_id: str | None = None
    delete_sent: bool = False
    last_fraction: float = -1.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def claim_delete(self) -> str | None:
        """The server job id if a DELETE is due now (once, and only once cancel was asked)."""
        with self.lock:
            if self.job_id is None or self.delete_sent or not self.cancel.is_set():
                return None
            self.delete_sent = True
            return self.job_id


class RemoteExecutor:
    """Runs jobs on a CryoMamba server (`server` URL, bearer `token` or $CRYOMAMBA_TOKEN).

    Results are downloaded into `download_dir/<server job id>/` and stay there; without a
    `download_dir`, into a temporary folder per job, removed once the result is dropped or
    the executor closed (see the module docstring).
    """

    def __init__(
        self,
        server: str,
        token: str | None = None,
        *,
        parallel_uploads: int = 4,
        part_size: int | None = None,
        retries: int = 6,
        backoff_s: float = 0.5,
        timeout_s: float = 60.0,
        download_dir: str | os.PathLike[str] | None = None,
        verify: bool | str = True,
    ) -> None:
        if not isinstance(server, str) or urlsplit(server).scheme not in ("http", "https"):
            raise ConfigError(
                f"server must be an http:// or https:// URL, got {server!r}",
                hint="e.g. server='http://127.0.0.1:8000'",
            )
        if parallel_uploads < 1 or retries < 0 or backoff_s < 0 or timeout_s <= 0:
            raise ConfigError(
                "need parallel_uploads >= 1, retries >= 0, backoff_s >= 0 and timeout_s > 0"
            )
        self.server = server.rstrip("/")
        self.http = HttpSession(
            self.server,
            token if token is not None else os.environ.get("CRYOMAMBA_TOKEN"),
            retries=retries,
            backoff_s=backoff_s,
            timeout_s=timeout_s,
            verify=verify,
            max_connections=max(10, 2 * parallel_uploads),
            make_client=self._make_client,
        )
        self.uploader = Uploader(self.http, part_size=part_size, parallel_uploads=parallel_uploads)
        self.follower = Follower(self.http)
        self.download_dir = Path(download_dir) if download_dir is not None else None
        self.downloader = Downloader(self.http, self.download_dir)
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._closed = False

    def __repr__(self) -> str:  # never the token
        return f"RemoteExecutor({self.server!r})"

    # -- the executor interface -----------------------------------------------------------
    def submit(
        self, source: Any, config: JobConfig, sinks: Sequence[Any] = (), *, job: Job | None = None
    ) -> Job:
        """Start uploading and segmenting `source` on the server; returns the `Job` at once."""
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")

        def on_cancel() -> None:  # an upload notices the flag itself; a server job needs DELETE
            job_id = remote.claim_delete()
            if job_id is not None:
                threading.Thread(target=self._delete, args=(job_id,), daemon=True).start()

        if "probabilities" not in config.formats and any(
            "probabilities" in (getattr(s, "formats", None) or ()) for s in sinks
        ):  # a FileSink asks for them: the server can only make them while the job runs
            config = config.replace(formats=(*config.formats, "probabilities"))
        job = job_for(job, sinks, on_cancel)
        remote = _Remote(cancel=job.cancel_requested)
        thread = threading.Thread(
            target=self._run,
            args=(job, remote, source, config),
            name=f"cryomamba-remote-{job.id[:8]}",
            daemon=True,
        )
        with self._lock:
            self._threads.add(thread)
        thread.start()
        return job

    def close(self) -> None:
        """Wait for the jobs' threads to end, close the HTTP client, and remove the temporary
        download folders (a `download_dir` of the caller's is left as it is)."""
        self._closed = True
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join()
        self.http.close()
        self.downloader.close()

    def _make_client(self, **kwargs: Any) -> Any:
        """The httpx client the session shares; tests override this to wrap the transport."""
        return self.http.new_client(**kwargs)

    def upload(self, path: str | os.PathLike[str]) -> UploadedFile:
        """Upload one MRC file (resuming a partial upload of it); the server's file, by id.

        `submit(uploaded, config)` then runs a job on it without sending it again (`submit`
        uploads a path itself); `uploaded.id` is the server's file id.
        """
        path = Path(path)
        Volume.open(path).close()  # a corrupt file fails here, before any request
        return UploadedFile(self.uploader.upload(path, threading.Event()))

    # -- one job ----------------------------------------------------------------------------
    def _run(self, job: Job, remote: _Remote, source: Any, config: JobConfig) -> None:
        try:
            job.emit(self._segment(job, remote, source, config))
        except _CanceledSignal:
            job.emit(Canceled())
        except Exception as exc:  # the job must end with an event whatever happens
            if is_bug(exc):
                log.exception("remote job %s failed", job.id)
            job.emit(
                failure(
                    exc,
                    io_hint="check that the file exists and is readable, and that the "
                    "temporary and download folders have space",
                )
            )
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _segment(self, job: Job, remote: _Remote, source: Any, config: JobConfig) -> Completed:
        """Upload, submit, follow to the end, download: the `Completed` event, or raise."""
        local = _local_volume(source)
        target = self._upload_source(source, local, remote.cancel)
        if remote.cancel.is_set():
            raise _CanceledSignal
        # the result is built from mask.mrc and stats.json, so the server must write them
        formats = tuple(dict.fromkeys(("mrc", "stats", *config.formats)))
        sent = config.replace(formats=formats)
        if _array_without_voxel_size(local, config):
            # as with the local executor, it is taken to be at the model's voxel size; on the
            # server it is a file saying 1 Å, which would be refused
            sent = sent.replace(resample="off")
        body = {**target, "config": sent.to_dict()}
        record = self.http.request("POST", "/v1/jobs", json=body, idempotent=False).json()
        with remote.lock:
            remote.job_id = str(record["id"])
        log.info("job %s runs on %s as %s", job.id, self.server, remote.job_id)
        if remote.claim_delete() is not None:  # canceled while the job was being created
            self._delete(remote.job_id)
        record = self.follower.follow(job, remote)
        if record["state"] == JobState.FAILED:
            raise RemoteError.from_dict(record.get("error"))
        if record["state"] == JobState.CANCELED:
            raise _CanceledSignal
        return self.downloader.result(record, config, local)

    def _upload_source(
        self, source: Any, local: Volume | None, cancel: threading.Event
    ) -> dict[str, str]:
        """{"server_path": ...} for a ServerPath, {"file_id": ...} for an uploaded file, else
        upload the file (an array is written to a temporary MRC first) and give its id."""
        if isinstance(source, ServerPath):
            return {"server_path": source.path}
        if isinstance(source, UploadedFile):
            return {"file_id": source.id}
        assert local is not None
        if local.path is not None and Path(local.path).is_file():  # an MRC: sent as it is
            return {"file_id": self.uploader.upload(Path(local.path), cancel)}
        folder = Path(tempfile.mkdtemp(prefix="cryomamba-upload-", dir=_tmpdir()))
        try:
            upload = _write_mrc(local, folder / "volume.mrc")
            return {"file_id": self.uploader.upload(upload, cancel)}
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _delete(self, job_id: str | None) -> None:
        """Ask the server to cancel; 409 (already ended) is fine: the WebSocket tells the end."""
        try:
            self.http.request("DELETE", f"/v1/jobs/{job_id}", ok=(409,))
        except CryoMambaError as exc:
            log.warning("could not cancel job %s on %s: %s", job_id, self.server, exc)


# -- helpers ----------------------------------------------------------------------------------
def _array_without_voxel_size(local: Volume | None, config: JobConfig) -> bool:
    """An in-memory volume whose voxel size is unknown or 1 Å, with no override."""
    from ...spacing import header_trusted

    return (
        local is not None
        and local.path is None
        and config.voxel_size is None
        and not header_trusted(local.voxel_size, local.voxel_size_known)
    )


def _local_volume(source: Any) -> Volume | None:
    """The source as a local `Volume` (validated: a corrupt file fails here), or None."""
    from ...sources import open_source

    if isinstance(source, (ServerPath, UploadedFile)):
        return None
    if isinstance(source, (str, os.PathLike, np.ndarray, Volume)):
        return open_source(source)
    raise InvalidVolumeError(
        f"cannot segment a {type(source).__name__}",
        hint="pass an MRC path, a Volume, a 3D array, a ServerPath for a file on the server, "
        "or the UploadedFile that upload() returned",
    )


@hookimpl
def cryomamba_register_executors(registry: Registry[Callable[..., Executor]]) -> None:
    # an executor whose packages are missing is simply not offered
    if all(importlib.util.find_spec(m) is not None for m in ("httpx", "websockets")):
        registry.add("remote", RemoteExecutor)
