"""Following a server job over its WebSocket: events in, reconnect with backoff."""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from ...events import Progress, event_from_dict
from ...job import TERMINAL_STATES, Job, JobState
from ._http import (
    _UNREACHABLE_HINT,
    HttpSession,
    RemoteError,
    _error_from_body,
    _ssl_context,
    _unreachable,
)

if TYPE_CHECKING:
    from .executor import _Remote

log = logging.getLogger(__name__)
# websockets logs request headers (the bearer token among them) at DEBUG: give it a logger
# of its own that never emits DEBUG, whatever the root level is.
_ws_log = logging.getLogger(__name__ + ".websocket")
_ws_log.setLevel(logging.INFO)

_WS_CLOSE_CODES = {4401: "invalid_token", 4403: "forbidden", 4404: "not_found"}


class Follower:
    """Turn a server job's WebSocket messages into `Job` events until the job ends."""

    def __init__(self, http: HttpSession) -> None:
        self.http = http

    def follow(self, job: Job, remote: _Remote) -> dict[str, Any]:
        """Emit progress and previews until the job ends; return its terminal record.

        A dropped socket is reopened with backoff; the server then sends the current state
        first, so a job that ended meanwhile is seen at once.
        """
        from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
        from websockets.sync.client import connect

        http = self.http
        url = f"{_ws_base(http.server)}/v1/ws/jobs/{remote.job_id}"
        options: dict[str, Any] = {
            "additional_headers": http.auth(),
            "max_size": None,
            "open_timeout": http.timeout_s,
            "logger": _ws_log,
        }
        if url.startswith("wss:") and http.verify is not True:
            options["ssl"] = _ssl_context(http.verify)
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
                    f"lost the connection to {http.server} "
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
                error = _unreachable(http.server, exc)
            failures += 1
            if failures > http.retries:
                raise error
            log.info(
                "job %s: %s; reconnecting (%d/%d)", job.id, error.message, failures, http.retries
            )
            time.sleep(http.delay(failures - 1))

    def _on_message(
        self, job: Job, remote: _Remote, message: dict[str, Any]
    ) -> dict[str, Any] | None:
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
                self._progress(job, remote, Progress.from_record(progress))
            if state in TERMINAL_STATES:
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


def _ws_base(server: str) -> str:
    parts = urlsplit(server)
    scheme = "wss" if parts.scheme == "https" else "ws"
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/"), "", ""))
