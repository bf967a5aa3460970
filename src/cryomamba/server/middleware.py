"""Pure-ASGI middleware: request ids and JSON access logs, authentication, rate limits.

Query strings are never logged (signed URLs carry their signature there) and neither is
the Authorization header, so no token or signature reaches the logs. A WebSocket's
`?token=` is taken out of the scope's query string before uvicorn logs the handshake.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from typing import Any
from urllib.parse import parse_qsl, urlencode

from starlette.datastructures import Headers
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import audit
from .auth import decode_token, missing_token
from .errors import ERROR_CODE_HEADER, ApiError, error_response

__all__ = ["AuthMiddleware", "RateLimitMiddleware", "RequestContextMiddleware", "TokenBucket"]

access_log = logging.getLogger("cryomamba.server.access")

_ERROR_CODE = ERROR_CODE_HEADER.encode()
PUBLIC_PATHS = frozenset({"/v1/healthz", "/v1/openapi.json", "/metrics"})


def _is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith("/v1/files/") or not path.startswith("/v1/")


class RequestContextMiddleware:
    """Gives each request an id (X-Request-ID), logs one JSON line, counts it in the metrics."""

    def __init__(self, app: ASGIApp, metrics=None, routes: list | None = None) -> None:
        self.app, self.metrics, self.routes = app, metrics, routes or []

    def _route(self, scope: Scope) -> tuple[str, dict[str, Any]]:
        """The matched route's path template and its path parameters."""
        for route in self.routes:
            match, child = route.matches(scope)
            if match == Match.FULL:
                return getattr(route, "path", "?"), dict(child.get("path_params", {}))
        return "unmatched", {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        rid = Headers(scope=scope).get("x-request-id") or uuid.uuid4().hex[:16]
        rid = "".join(c for c in rid if c.isalnum() or c in "-_")[:64] or uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = rid
        start = time.perf_counter()
        status = [0]
        error_code: list[str | None] = [None]

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                headers = []
                for name, value in message.get("headers", []):
                    if name.lower() == _ERROR_CODE:  # internal: counted here, never sent
                        error_code[0] = value.decode("latin-1")
                    else:
                        headers.append((name, value))
                message["headers"] = [*headers, (b"x-request-id", rid.encode())]
            elif message["type"] == "websocket.accept":
                status[0] = 101
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - start
            route, params = self._route(scope)
            principal = scope.get("state", {}).get("principal")
            client = scope.get("client") or ("?", 0)  # the real one behind a trusted proxy
            access_log.info(
                "%s %s %s",
                scope.get("method", "WS"),
                scope["path"],
                status[0],
                extra={
                    "fields": {
                        "request_id": rid,
                        "method": scope.get("method", "WS"),
                        "path": scope["path"],  # never the query string: it may hold a signature
                        "route": route,
                        "status": status[0],
                        "ms": round(elapsed * 1000, 2),
                        "subject": principal.subject if principal else None,
                        "client": client[0],
                    }
                },
            )
            method = scope.get("method", "WS")
            audit.record(scope, audit.action_for(method, route), params, status[0], error_code[0])
            if self.metrics is not None:
                self.metrics.requests.labels(method, route, str(status[0])).inc()
                self.metrics.latency.labels(route).observe(elapsed)
                if error_code[0] is not None:
                    self.metrics.errors.labels(error_code[0], str(status[0])).inc()


class AuthMiddleware:
    """Puts the caller's `Principal` in `scope["state"]`; 401 for HTTP routes without one.

    WebSockets pass through with `auth_error` set instead, so the socket can be accepted
    and told why it is being closed (browsers cannot read a refused handshake's reason).
    Failed authentications are counted per client address: beyond `failures_per_min`, a
    failing request answers 429 with Retry-After instead of 401 (a valid token still passes).
    """

    def __init__(self, app: ASGIApp, secret: bytes, failures_per_min: int = 20) -> None:
        self.app, self.secret = app, secret
        self.failures = TokenBucket(failures_per_min)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        query_token = _take_query_token(scope) if scope["type"] == "websocket" else None
        if scope["type"] not in ("http", "websocket") or _is_public(scope["path"]):
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        try:
            state["principal"] = decode_token(self.secret, self._token(scope, query_token))
        except ApiError as refused:
            exc = refused
            client = scope.get("client") or ("?", 0)
            wait = self.failures.take(f"ip:{client[0]}")
            if wait > 0:
                retry = max(1, math.ceil(wait))
                exc = ApiError(
                    429,
                    "too_many_auth_failures",
                    f"more than {self.failures.per_minute} failed authentications per minute "
                    "from this address",
                    f"check the token, then wait {retry} s; clients should honour Retry-After",
                    retryable=True,
                    headers={"Retry-After": str(retry)},
                )
            if scope["type"] == "websocket":
                state["auth_error"] = exc
            else:
                await error_response(exc)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    @staticmethod
    def _token(scope: Scope, query_token: str | None) -> str:
        header = Headers(scope=scope).get("authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        if query_token:  # browsers cannot set headers on a WebSocket
            return query_token
        raise missing_token()


def _take_query_token(scope: Scope) -> str | None:
    """Take `token` out of the scope's query string, which uvicorn logs at a WebSocket handshake."""
    query = scope.get("query_string", b"")
    if b"token" not in query:
        return None
    pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True)
    tokens = [v for k, v in pairs if k == "token"]
    scope["query_string"] = urlencode([(k, v) for k, v in pairs if k != "token"]).encode()
    return tokens[0] if tokens else None


class _Bucket:
    __slots__ = ("stamp", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens, self.stamp = tokens, stamp


class TokenBucket:
    """`per_minute` events per key, refilled continuously; full buckets are forgotten."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def take(self, key: str, now: float | None = None) -> float:
        """Spend one event for `key`: 0 if allowed, else seconds until the next one is."""
        now = time.monotonic() if now is None else now
        rate = self.per_minute / 60.0
        with self._lock:
            if len(self._buckets) > 10_000:  # many addresses: drop those that are full again
                self._buckets = {
                    k: b
                    for k, b in self._buckets.items()
                    if b.tokens + (now - b.stamp) * rate < self.per_minute
                }
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = self._buckets[key] = _Bucket(float(self.per_minute), now)
            bucket.tokens = min(self.per_minute, bucket.tokens + (now - bucket.stamp) * rate)
            bucket.stamp = now
            if bucket.tokens >= 1:
                bucket.tokens -= 1
                return 0.0
            return (1 - bucket.tokens) / rate


class RateLimitMiddleware:
    """`per_minute` requests per user (token subject), a token bucket; 429 + Retry-After beyond.

    WebSocket handshakes spend from the same budget (a refused one is accepted, told why,
    and closed with 4429, like an authentication error). Upload parts are exempt: they are
    limited by how many may be in flight at once instead, so a big upload is not throttled
    by its own part count.
    """

    def __init__(self, app: ASGIApp, per_minute: int) -> None:
        self.app, self.per_minute = app, per_minute
        self.buckets = TokenBucket(per_minute)

    def _exempt(self, scope: Scope) -> bool:
        path = scope["path"]
        return _is_public(path) or (scope.get("method") == "PUT" and "/part/" in path)

    def take(self, key: str, now: float | None = None) -> float:
        """Spend one request for `key`: 0 if allowed, else seconds until the next one is."""
        return self.buckets.take(key, now)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or self._exempt(scope):
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        if "auth_error" in state:  # a refused WebSocket: the failure budget counted it
            await self.app(scope, receive, send)
            return
        principal: Any = state.get("principal")
        client = scope.get("client") or ("?", 0)
        key = f"sub:{principal.subject}" if principal else f"ip:{client[0]}"
        wait = self.take(key)
        if wait > 0:
            retry = max(1, math.ceil(wait))
            exc = ApiError(
                429,
                "rate_limited",
                f"more than {self.per_minute} requests per minute with this token",
                f"wait {retry} s; clients should honour Retry-After",
                retryable=True,
                headers={"Retry-After": str(retry)},
            )
            if scope["type"] == "websocket":
                state["auth_error"] = exc
            else:
                await error_response(exc)(scope, receive, send)
                return
        await self.app(scope, receive, send)
