"""HTTP for the remote executor: requests with retries and backoff, the server's error
envelopes as `RemoteError`, TLS contexts, and keeping secrets out of httpx's log.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from ...errors import CryoMambaError

log = logging.getLogger(__name__)

_BLOCK = 1 << 20
_MAX_DELAY_S = 30.0
_CONNECT_TIMEOUT_S = 10.0
_UNREACHABLE_HINT = "check the URL and that `cryomamba serve` is running"


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


class HttpSession:
    """The server's address and credentials, one shared httpx client, and `request` with
    retries: the part every other part of the executor (uploader, follower, downloads) uses.

    `make_client(**kwargs)` builds the httpx client (tests pass one that records or injects
    faults); by default `new_client`.
    """

    def __init__(
        self,
        server: str,
        token: str | None,
        *,
        retries: int,
        backoff_s: float,
        timeout_s: float,
        verify: bool | str,
        max_connections: int = 10,
        make_client: Callable[..., Any] | None = None,
    ) -> None:
        self.server, self._token = server, token
        self.retries, self.backoff_s, self.timeout_s = retries, backoff_s, timeout_s
        self.verify, self.max_connections = verify, max_connections
        self._make_client = make_client or self.new_client
        self._client: Any = None
        self._lock = threading.Lock()
        self._reached = False  # has the server ever answered? (an unreachable one fails fast)

    def __repr__(self) -> str:  # never the token
        return f"HttpSession({self.server!r})"

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token}"} if self._token else {}

    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                self._client = self._make_client()
            return self._client

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def new_client(self, **kwargs: Any) -> Any:
        """The one httpx.Client all threads share."""
        import httpx

        _redact_httpx_log()
        verify = self.verify if self.verify is True else _ssl_context(self.verify)
        limits = httpx.Limits(max_connections=self.max_connections)
        # connecting takes milliseconds when the server is up: a wrong or down address should
        # not hold the user for the whole read timeout
        timeout = httpx.Timeout(self.timeout_s, connect=min(self.timeout_s, _CONNECT_TIMEOUT_S))
        return httpx.Client(timeout=timeout, verify=verify, limits=limits, **kwargs)

    def long_timeout(self) -> Any:
        """For `complete`: quick, unless the server restarted mid-upload and must hash the
        parts it holds again before it answers."""
        import httpx

        return httpx.Timeout(self.timeout_s, read=max(600.0, self.timeout_s))

    def delay(self, attempt: int) -> float:
        """Exponential backoff with jitter, capped at 30 s."""
        return float(min(self.backoff_s * 2**attempt, _MAX_DELAY_S)) + random.uniform(
            0, self.backoff_s
        )

    def request(
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

        client = self.client()
        events = cancel if isinstance(cancel, tuple) else (cancel,) if cancel else ()
        headers = {**self.auth(), **(headers or {})}
        timeout = timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT
        for attempt in range(self.retries + 1):
            wait = None
            try:
                request = client.build_request(
                    method, self.server + path, headers=headers, timeout=timeout, **kwargs
                )
                resp = client.send(request, stream=stream)
                self._reached = True
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
                if refused and not self._reached:  # never reached: a wrong URL or a server
                    raise error from None  # that is down; retries only help one restarting
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
            wait = wait if wait is not None else self.delay(attempt)
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


def _error_from_body(status: int, body: bytes | bytearray | None, what: str) -> RemoteError:
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
                _SIG_RE.sub(r"\1<redacted>", str(a)) if "sig=" in str(a) else a for a in record.args
            )
        return True


_redactor = _RedactSignatures()


def _redact_httpx_log() -> None:
    logger = logging.getLogger("httpx")
    if _redactor not in logger.filters:
        logger.addFilter(_redactor)
