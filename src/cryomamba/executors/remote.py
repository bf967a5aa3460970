"""The `remote` executor: the client of `cryomamba serve`, behaving exactly like `local`.

One background thread per job: validate the source locally, upload it in parts (bounded
parallelism, per-part retry with backoff, resume of an interrupted upload), create the job,
follow its WebSocket (Progress and Preview as they come, reconnect with backoff), then
download the signed artifacts, check their sha256 and return a `Segmentation` whose labels
are memory-mapped from the downloaded mask.mrc.

httpx and websockets are imported inside the methods that need them; the executor is only
offered when both are installed (the `server` extra).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import os
import random
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from ..config import JobConfig
from ..errors import ConfigError, CryoMambaError, InvalidVolumeError
from ..events import Canceled, Completed, Failed, Progress, event_from_dict
from ..hookspecs import hookimpl
from ..job import Job, JobState
from ..segmentation import Segmentation
from ..sinks.base import as_sink
from ..volume import Volume

__all__ = ["RemoteExecutor", "ServerPath"]

log = logging.getLogger(__name__)
# websockets logs request headers (the bearer token among them) at DEBUG: give it a logger
# of its own that never emits DEBUG, whatever the root level is.
_ws_log = logging.getLogger(__name__ + ".websocket")
_ws_log.setLevel(logging.INFO)

_BLOCK = 1 << 20
_MAX_DELAY_S = 30.0
_WS_CLOSE_CODES = {4401: "invalid_token", 4403: "forbidden", 4404: "not_found"}
_UNREACHABLE_HINT = "check the URL and that `cryomamba serve` is running"


@dataclass(frozen=True)
class ServerPath:
    """A file that is already on the server (under one of its `--root` folders): no upload."""

    path: str


class RemoteError(CryoMambaError):
    """An error envelope from the server, or a transport failure, as a stable code and hint."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        hint: str = "",
        retryable: bool = False,
        status: int | None = None,
    ) -> None:
        super().__init__(message, hint=hint, code=code)
        self.retryable, self.status = retryable, status

    @classmethod
    def from_dict(cls, error: Any, status: int | None = None) -> RemoteError:
        """From `{"code", "message", "hint", "retryable"}` (an envelope's or a job's error)."""
        error = error if isinstance(error, dict) else {}
        return cls(
            str(error.get("code") or "server_error"),
            str(error.get("message") or "the server reported an error without a message"),
            hint=str(error.get("hint") or ""),
            retryable=bool(error.get("retryable")),
            status=status,
        )


class _CanceledSignal(Exception):
    pass


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

    Results are downloaded into `download_dir/<server job id>/` (default: a temporary folder
    per executor, left in place because the result's labels are memory-mapped from it).
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
        self._token = token if token is not None else os.environ.get("CRYOMAMBA_TOKEN")
        self.parallel_uploads, self.part_size = parallel_uploads, part_size
        self.retries, self.backoff_s, self.timeout_s = retries, backoff_s, timeout_s
        self.download_dir = Path(download_dir) if download_dir is not None else None
        self.verify = verify
        self._client: Any = None
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._labels: dict[str, dict[int, str]] = {}
        self._closed = False

    def __repr__(self) -> str:  # never the token
        return f"RemoteExecutor({self.server!r})"

    # -- the executor interface -----------------------------------------------------------
    def submit(self, source: Any, config: JobConfig, sinks: Sequence[Any] = ()) -> Job:
        """Start uploading and segmenting `source` on the server; returns the `Job` at once."""
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")

        def on_cancel() -> None:  # an upload notices the flag itself; a server job needs DELETE
            job_id = remote.claim_delete()
            if job_id is not None:
                threading.Thread(target=self._delete, args=(job_id,), daemon=True).start()

        job = Job(on_cancel=on_cancel, sinks=[as_sink(s) for s in sinks])
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
        """Wait for the jobs' threads to end, then close the HTTP client."""
        self._closed = True
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join()
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def upload(self, path: str | os.PathLike[str]) -> str:
        """Upload one MRC file (resuming a partial upload of it) and return its server file id.

        Jobs can then name it without sending it again; `submit` calls this itself.
        """
        path = Path(path)
        Volume.open(path).close()  # a corrupt file fails here, before any request
        return self._upload(path, threading.Event())

    # -- one job ----------------------------------------------------------------------------
    def _run(self, job: Job, remote: _Remote, source: Any, config: JobConfig) -> None:
        try:
            job.emit(self._segment(job, remote, source, config))
        except _CanceledSignal:
            job.emit(Canceled())
        except CryoMambaError as exc:
            job.emit(
                Failed(
                    code=exc.code,
                    message=exc.message,
                    hint=exc.hint,
                    retryable=bool(getattr(exc, "retryable", False)),
                )
            )
        except OSError as exc:
            job.emit(
                Failed(
                    code="io_error",
                    message=str(exc),
                    retryable=True,
                    hint="check that the file exists and is readable, and that the "
                    "temporary and download folders have space",
                )
            )
        except Exception as exc:  # the job must end with an event whatever happens
            log.exception("remote job %s failed", job.id)
            job.emit(
                Failed(
                    code="internal_error",
                    message=f"{type(exc).__name__}: {exc}",
                    hint="this is a bug in CryoMamba; please report it with the log",
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
        body = {**target, "config": config.replace(formats=formats).to_dict()}
        record = self._request("POST", "/v1/jobs", json=body, idempotent=False).json()
        with remote.lock:
            remote.job_id = str(record["id"])
        log.info("job %s runs on %s as %s", job.id, self.server, remote.job_id)
        if remote.claim_delete() is not None:  # canceled while the job was being created
            self._delete(remote.job_id)
        record = self._follow(job, remote)
        if record["state"] == JobState.FAILED:
            raise RemoteError.from_dict(record.get("error"))
        if record["state"] == JobState.CANCELED:
            raise _CanceledSignal
        return self._download_result(record, config, local)

    def _upload_source(self, source: Any, local: Volume | None, cancel: threading.Event) -> dict:
        """{"server_path": ...} for a ServerPath, else upload the file and give {"file_id": ...}."""
        if local is None:
            return {"server_path": source.path}
        if local.path is not None:
            return {"file_id": self._upload(Path(local.path), cancel)}
        folder = Path(tempfile.mkdtemp(prefix="cryomamba-upload-", dir=_tmpdir()))
        try:
            return {"file_id": self._upload(_write_mrc(local, folder / "volume.mrc"), cancel)}
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    # -- upload -----------------------------------------------------------------------------
    def _upload(self, path: Path, cancel: threading.Event) -> str:
        """Upload `path` in parts (resuming what the server already has); returns its file id."""
        size = path.stat().st_size
        body: dict[str, Any] = {
            "filename": path.name,
            "size": size,
            "sha256": _sha256_file(path, cancel),
        }
        if self.part_size:
            body["part_size"] = int(self.part_size)
        record = self._request("POST", "/v1/uploads/init", json=body, cancel=cancel).json()
        upload_id = record["upload_id"]
        for _ in range(self.retries + 1):
            if record.get("state") == "completed" and record.get("file_id"):
                log.info("%s is already on the server as %s", path.name, record["file_id"])
                return str(record["file_id"])
            have = set(record.get("parts_received") or ())
            missing = [i for i in range(int(record["parts_total"])) if i not in have]
            log.info(
                "uploading %s: %d of %d parts to send",
                path.name,
                len(missing),
                record["parts_total"],
            )
            self._put_parts(path, size, upload_id, int(record["part_size"]), missing, cancel)
            resp = self._request(
                "POST",
                f"/v1/uploads/{upload_id}/complete",
                ok=(409,),
                cancel=cancel,
                timeout=self._long_timeout(),
            )
            if resp.status_code != 409:
                return str(resp.json()["file_id"])
            error = _error_from(resp)
            if error.code != "missing_parts":
                raise error
            record = self._request("GET", f"/v1/uploads/{upload_id}", cancel=cancel).json()
        raise error

    def _put_parts(
        self,
        path: Path,
        size: int,
        upload_id: str,
        part_size: int,
        parts: list[int],
        cancel: threading.Event,
    ) -> None:
        """PUT `parts` with at most `parallel_uploads` in flight; the first failure stops all."""
        if not parts:
            return
        stop = (cancel, threading.Event())
        workers = min(self.parallel_uploads, len(parts))
        with ThreadPoolExecutor(workers, thread_name_prefix="cryomamba-upload") as pool:
            futures = [
                pool.submit(self._put_part, path, size, upload_id, part_size, i, stop)
                for i in parts
            ]
            try:
                for future in as_completed(futures):
                    future.result()
            except BaseException:
                stop[1].set()
                for future in futures:
                    future.cancel()
                raise

    def _put_part(
        self,
        path: Path,
        size: int,
        upload_id: str,
        part_size: int,
        index: int,
        stop: tuple[threading.Event, ...],
    ) -> None:
        if any(e.is_set() for e in stop):
            raise _CanceledSignal
        offset = index * part_size
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(min(part_size, size - offset))
        digest = hashlib.sha256(data).hexdigest()
        headers = {"X-Part-SHA256": digest, "Content-Type": "application/octet-stream"}
        resp = self._request(
            "PUT",
            f"/v1/uploads/{upload_id}/part/{index}",
            content=data,
            headers=headers,
            cancel=stop,
        )
        if resp.json().get("sha256", digest) != digest:
            raise RemoteError(
                "checksum_mismatch",
                f"part {index} of {path.name} arrived damaged",
                hint="submit again",
                retryable=True,
            )
        log.debug("part %d of %s uploaded (%d bytes)", index, path.name, len(data))

    # -- following the job ----------------------------------------------------------------
    def _follow(self, job: Job, remote: _Remote) -> dict:
        """Emit progress and previews until the job ends; return its terminal record.

        A dropped socket is reopened with backoff; the server then sends the current state
        first, so a job that ended meanwhile is seen at once.
        """
        from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
        from websockets.sync.client import connect

        url = f"{_ws_base(self.server)}/v1/ws/jobs/{remote.job_id}"
        options: dict[str, Any] = {
            "additional_headers": self._auth(),
            "max_size": None,
            "open_timeout": self.timeout_s,
            "logger": _ws_log,
        }
        if url.startswith("wss:") and self.verify is not True:
            options["ssl"] = _ssl_context(self.verify)
        failures = 0
        while True:
            try:
                with connect(url, **options) as ws:
                    while True:
                        message = json.loads(ws.recv())
                        if message.get("type") != "state":  # the socket stays up: all is well
                            failures = 0
                        record = self._on_message(job, remote, message)
                        if record is not None:
                            return record
            except RemoteError as exc:  # an error message from the server
                if not exc.retryable:
                    raise
                error = exc
            except ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd is not None else None
                if code in _WS_CLOSE_CODES:
                    raise RemoteError(
                        _WS_CLOSE_CODES[code],
                        f"the server closed the job's WebSocket with code {code}",
                    ) from None
                error = RemoteError(
                    "connection_lost",
                    f"lost the connection to {self.server} "
                    f"while following job {remote.job_id}: {exc}",
                    hint=_UNREACHABLE_HINT,
                    retryable=True,
                )
            except InvalidStatus as exc:  # the handshake was refused
                status = exc.response.status_code
                error = _error_from_body(status, exc.response.body, "the job's WebSocket")
                if not (error.retryable or status in (429, 503)):
                    raise error from None
            except (OSError, TimeoutError, InvalidHandshake) as exc:
                error = _unreachable(self.server, exc)
            failures += 1
            if failures > self.retries:
                raise error
            log.info(
                "job %s: %s; reconnecting (%d/%d)", job.id, error.message, failures, self.retries
            )
            time.sleep(self._delay(failures - 1))

    def _on_message(self, job: Job, remote: _Remote, message: dict) -> dict | None:
        """Turn one WebSocket message into events; the terminal record once the job ended."""
        kind = message.get("type")
        if kind == "progress":
            self._progress(job, remote, event_from_dict(message))  # type: ignore[arg-type]
        elif kind == "preview":
            job.emit(event_from_dict(message))
        elif kind in ("state", "completed"):
            record = message["job"]
            state = JobState.COMPLETED if kind == "completed" else record.get("state")
            if state in (JobState.RUNNING, JobState.PREVIEWING) and job.state == JobState.QUEUED:
                job.set_state(JobState.RUNNING)
            progress = record.get("progress")
            if progress and state in (JobState.RUNNING, JobState.PREVIEWING, JobState.COMPLETED):
                self._progress(job, remote, _progress(progress))
            if state in JobState.TERMINAL:
                return {**record, "state": state}
        elif kind == "failed":
            return {"state": JobState.FAILED, "error": message}
        elif kind == "canceled":
            return {"state": JobState.CANCELED}
        elif kind == "error":
            raise RemoteError.from_dict(message.get("error"))
        elif kind != "ping":
            log.debug("job %s: ignoring a %r message", job.id, kind)
        return None

    @staticmethod
    def _progress(job: Job, remote: _Remote, event: Progress) -> None:
        """Emit progress that moves forward; repeats after a reconnect are dropped."""
        if event.fraction > remote.last_fraction:
            remote.last_fraction = event.fraction
            job.emit(event)

    # -- results ------------------------------------------------------------------------------
    def _download_result(self, record: dict, config: JobConfig, local: Volume | None) -> Completed:
        """Download the artifacts (checked) and build the `Segmentation` from them."""
        from ..artifacts import FORMATS

        job_id = str(record["id"])
        available = dict(record.get("artifacts") or {})
        wanted = {f: FORMATS[f] for f in ("mrc", "stats", *config.formats)}
        lacking = [n for f, n in wanted.items() if f in ("mrc", "stats") and n not in available]
        if lacking:
            raise RemoteError(
                "missing_artifact",
                f"job {job_id} finished without {', '.join(lacking)}",
                hint="this is a server bug; please report it with the server log",
            )
        folder = self._download_root() / job_id
        folder.mkdir(parents=True, exist_ok=True)
        paths = {
            f: self._download(job_id, n, available, folder / n)
            for f, n in wanted.items()
            if n in available
        }
        mask = Volume.open(paths["mrc"])
        labels = mask.data.view(np.uint8) if mask.dtype == np.int8 else mask.data  # mode 0
        stats = json.loads(paths["stats"].read_text(encoding="utf-8"))
        provenance = {
            **(stats.pop("provenance", None) or {}),
            "remote": {"server": self.server, "job_id": job_id},
        }
        label_names = self._label_names(config.model) or {
            int(e["label"]): str(e["name"]) for e in stats.get("labels", ())
        }
        geometry = local if local is not None else mask
        result = Segmentation(
            labels=labels,
            voxel_size=geometry.voxel_size,
            origin=geometry.origin,
            label_names=label_names,
            provenance=provenance,
            image=local.data if local is not None else None,
            header=geometry.header if geometry.header is not None else mask.header,
            artifacts=paths,
            _stats=stats,
        )
        return Completed(result=result, artifacts={f: str(p) for f, p in paths.items()})

    def _download(self, job_id: str, name: str, available: dict, dest: Path) -> Path:
        """Fetch one artifact to a temporary name, check its sha256, rename it into place.

        An expired or refused signature gets fresh URLs once (`available` is updated).
        """
        tmp = dest.with_name(f".part-{dest.name}")
        try:
            digest = self._fetch(str(available[name]["url"]), tmp)
        except RemoteError as exc:
            if exc.status not in (403, 404, 410):
                raise
            available.update(self._request("GET", f"/v1/jobs/{job_id}").json()["artifacts"])
            digest = self._fetch(str(available[name]["url"]), tmp)
        expected = available[name].get("sha256")
        if expected and digest != expected:
            tmp.unlink(missing_ok=True)
            raise RemoteError(
                "checksum_mismatch",
                f"{name} of job {job_id} does not match "
                "its sha256 from the server: the download was damaged",
                hint="submit the job again",
                retryable=True,
            )
        os.replace(tmp, dest)
        return dest

    def _fetch(self, url: str, dest: Path) -> str:
        """Stream `url` into `dest`, again from the start if the stream breaks; its sha256."""
        import httpx

        for attempt in range(self.retries + 1):
            digest = hashlib.sha256()
            resp = self._request("GET", url, stream=True)
            try:
                with open(dest, "wb") as f:
                    for chunk in resp.iter_bytes(_BLOCK):
                        f.write(chunk)
                        digest.update(chunk)
                return digest.hexdigest()
            except httpx.TransportError as exc:
                if attempt >= self.retries:
                    raise RemoteError(
                        "network_error",
                        f"downloading {urlsplit(url).path} failed: {exc}",
                        hint=_UNREACHABLE_HINT,
                        retryable=True,
                    ) from None
            finally:
                resp.close()
            time.sleep(self._delay(attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    def _label_names(self, model: str) -> dict[int, str]:
        """The model's label names as the server lists them (every label, background too)."""
        with self._lock:
            if model in self._labels:
                return self._labels[model]
        try:
            info = self._request("GET", "/v1/server/info").json()
            found = {m.get("name"): m.get("labels") for m in info.get("models", ())}
            names = {int(k): str(v) for k, v in (found.get(model) or {}).items()}
        except (CryoMambaError, ValueError, TypeError, AttributeError) as exc:
            log.debug("no label names for %s from the server: %s", model, exc)
            return {}
        with self._lock:
            self._labels[model] = names
        return names

    def _download_root(self) -> Path:
        with self._lock:
            if self.download_dir is None:
                self.download_dir = Path(
                    tempfile.mkdtemp(prefix="cryomamba-remote-", dir=_tmpdir())
                )
            return self.download_dir

    def _delete(self, job_id: str | None) -> None:
        """Ask the server to cancel; 409 (already ended) is fine: the WebSocket tells the end."""
        try:
            self._request("DELETE", f"/v1/jobs/{job_id}", ok=(409,))
        except CryoMambaError as exc:
            log.warning("could not cancel job %s on %s: %s", job_id, self.server, exc)

    # -- HTTP -----------------------------------------------------------------------------------
    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token}"} if self._token else {}

    def _http(self) -> Any:
        with self._lock:
            if self._client is None:
                self._client = self._make_client()
            return self._client

    def _make_client(self, **kwargs: Any) -> Any:
        """The one httpx.Client all threads share; tests override this to wrap the transport."""
        import httpx

        _redact_httpx_log()
        verify = self.verify if self.verify is True else _ssl_context(self.verify)
        limits = httpx.Limits(max_connections=max(10, 2 * self.parallel_uploads))
        return httpx.Client(timeout=self.timeout_s, verify=verify, limits=limits, **kwargs)

    def _long_timeout(self) -> Any:
        """For `complete`: the server hashes and checks the whole file before it answers."""
        import httpx

        return httpx.Timeout(self.timeout_s, read=max(600.0, self.timeout_s))

    def _delay(self, attempt: int) -> float:
        """Exponential backoff with jitter, capped at 30 s."""
        return min(self.backoff_s * 2**attempt, _MAX_DELAY_S) + random.uniform(0, self.backoff_s)

    def _request(
        self,
        method: str,
        path: str,
        *,
        ok: tuple[int, ...] = (),
        idempotent: bool = True,
        cancel: threading.Event | tuple[threading.Event, ...] | None = None,
        stream: bool = False,
        timeout: Any = None,
        headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Send with retries: connection errors, timeouts, 429 (after Retry-After), 5xx, and
        error envelopes that say `retryable`. A request that is not idempotent is retried only
        when the server surely did not act on it. Returns a response below 400 or with a status
        in `ok`; raises `RemoteError` otherwise, `_CanceledSignal` when `cancel` is set."""
        import httpx

        client = self._http()
        events = cancel if isinstance(cancel, tuple) else (cancel,) if cancel else ()
        headers = {**self._auth(), **(headers or {})}
        timeout = timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT
        for attempt in range(self.retries + 1):
            wait = None
            try:
                request = client.build_request(
                    method, self.server + path, headers=headers, timeout=timeout, **kwargs
                )
                resp = client.send(request, stream=stream)
            except httpx.TransportError as exc:
                refused = isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout))
                error = (
                    _unreachable(self.server, exc)
                    if refused
                    else RemoteError(
                        "network_error",
                        f"{method} {urlsplit(path).path} failed: {type(exc).__name__}: {exc}",
                        hint=_UNREACHABLE_HINT,
                        retryable=True,
                    )
                )
                if not (refused or idempotent):
                    raise error from None
            else:
                status = resp.status_code
                if status < 400 or status in ok:
                    return resp
                if stream:
                    resp.read()
                    resp.close()
                error = _error_from(resp)
                if not (status in (429, 503) or error.retryable or (idempotent and status >= 500)):
                    raise error
                wait = _retry_after(resp)
            if attempt >= self.retries:
                raise error
            wait = wait if wait is not None else self._delay(attempt)
            log.info(
                "%s %s: %s; retry %d/%d in %.1f s",
                method,
                urlsplit(path).path,
                error.code,
                attempt + 1,
                self.retries,
                wait,
            )
            if _sleep(wait, events):
                raise _CanceledSignal
        raise AssertionError("unreachable")  # pragma: no cover


# -- helpers ----------------------------------------------------------------------------------
def _local_volume(source: Any) -> Volume | None:
    """The source as a local `Volume` (validated: a corrupt file fails here), or None."""
    from .local import open_source

    if isinstance(source, ServerPath):
        return None
    if isinstance(source, (str, os.PathLike, np.ndarray, Volume)):
        return open_source(source)
    raise InvalidVolumeError(
        f"cannot segment a {type(source).__name__}",
        hint="pass an MRC path, a Volume, a 3D array, or a ServerPath for a file on the server",
    )


def _unreachable(server: str, exc: BaseException) -> RemoteError:
    return RemoteError(
        "server_unreachable",
        f"cannot reach the CryoMamba server at {server}: {exc}",
        hint=_UNREACHABLE_HINT,
        retryable=True,
    )


def _error_from(resp: Any) -> RemoteError:
    """The server's error envelope, or a code made from the HTTP status when there is none."""
    return _error_from_body(
        resp.status_code, resp.content, f"{resp.request.method} {resp.request.url.path}"
    )


def _error_from_body(status: int, body: bytes | None, what: str) -> RemoteError:
    try:
        error = json.loads(body or b"").get("error")
    except (ValueError, AttributeError):
        error = None
    if isinstance(error, dict) and "code" in error:
        return RemoteError.from_dict(error, status)
    codes = {401: "unauthorized", 403: "forbidden", 404: "not_found", 429: "rate_limited"}
    return RemoteError(
        codes.get(status, f"http_{status}"),
        f"{what} answered HTTP {status}",
        status=status,
        retryable=status == 429 or status >= 500,
    )


def _retry_after(resp: Any) -> float | None:
    try:
        return max(0.0, float(resp.headers["Retry-After"])) + random.uniform(0, 0.1)
    except (KeyError, ValueError):
        return None


def _sleep(seconds: float, events: tuple[threading.Event, ...]) -> bool:
    """Sleep, waking early (and returning True) when any of `events` is set."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if not events:
            time.sleep(left)
            return False
        if events[0].wait(min(left, 0.1)) or any(e.is_set() for e in events):
            return True
    return any(e.is_set() for e in events)


def _sha256_file(path: Path, cancel: threading.Event) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            if cancel.is_set():
                raise _CanceledSignal
            digest.update(block)
    return digest.hexdigest()


_MRC_MODES = {
    np.dtype(t): m
    for t, m in ((np.int8, 0), (np.int16, 1), (np.float32, 2), (np.uint16, 6), (np.float16, 12))
}


def _write_mrc(volume: Volume, path: Path) -> Path:
    """Write an in-memory volume as MRC (keeping voxel size and origin) so it can be uploaded.

    uint8 becomes int16 (mode 0 would read back as int8) and other types float32.
    """
    import mrcfile

    dtype = (
        volume.dtype
        if volume.dtype in _MRC_MODES
        else np.dtype(np.int16 if volume.dtype == np.uint8 else np.float32)
    )
    depth = max(1, (64 << 20) // max(1, math.prod(volume.shape[1:]) * dtype.itemsize))
    with mrcfile.new_mmap(path, shape=volume.shape, mrc_mode=_MRC_MODES[dtype]) as mrc:
        for z0, slab in volume.iter_slabs(depth):
            mrc.data[z0 : z0 + slab.shape[0]] = slab.astype(dtype, copy=False)
        mrc.voxel_size = tuple(volume.voxel_size[::-1])
        z, y, x = volume.origin
        mrc.header.origin.x, mrc.header.origin.y, mrc.header.origin.z = x, y, z
    return path


def _progress(data: dict) -> Progress:
    return Progress(
        fraction=float(data["fraction"]),
        tiles_done=int(data.get("tiles_done", 0)),
        tiles_total=int(data.get("tiles_total", 0)),
        eta_s=data.get("eta_s"),
    )


def _ws_base(server: str) -> str:
    parts = urlsplit(server)
    scheme = "wss" if parts.scheme == "https" else "ws"
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/"), "", ""))


def _ssl_context(verify: bool | str) -> Any:
    """An SSLContext for `verify` (False: no checks; a path: that CA bundle)."""
    import ssl

    if verify is False:
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        return ctx
    return ssl.create_default_context(cafile=verify if isinstance(verify, str) else None)


def _tmpdir() -> str | None:
    return os.environ.get("CRYOMAMBA_TMPDIR") or None


_SIG_RE = re.compile(r"([?&]sig=)[^&\s]+")


class _RedactSignatures(logging.Filter):
    """httpx logs each request's URL at INFO; keep signed URLs' signatures out of the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and record.args:
            record.args = tuple(
                _SIG_RE.sub(r"\1<redacted>", str(a)) if "sig=" in str(a) else a
                for a in record.args
            )
        return True


_redactor = _RedactSignatures()


def _redact_httpx_log() -> None:
    logger = logging.getLogger("httpx")
    if _redactor not in logger.filters:
        logger.addFilter(_redactor)


@hookimpl
def cryomamba_register_executors(registry) -> None:
    # an executor whose packages are missing is simply not offered
    if all(importlib.util.find_spec(m) is not None for m in ("httpx", "websockets")):
        registry.add("remote", RemoteExecutor)
