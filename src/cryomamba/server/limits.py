"""Connection limits uvicorn does not set by itself: header size and header-read time.

uvicorn's httptools protocol reads headers of any size (httptools buffers a header until it
ends: a 128 MiB header is 128 MiB of memory) and waits for them forever (slowloris). This
protocol counts the bytes that arrive before a request's headers end, answers 431 beyond
`max_header_bytes`, and closes a connection whose headers have not ended `header_timeout_s`
after its first byte (or after it opened). The rest is uvicorn's own: `limit_concurrency`
(503 beyond) and `timeout_keep_alive` for idle connections.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

__all__ = ["uvicorn_limits"]

log = logging.getLogger(__name__)

STATUS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


def uvicorn_limits(settings: Any) -> dict[str, Any]:
    """Keyword arguments for `uvicorn.run` that apply `settings`' connection limits."""
    options: dict[str, Any] = {
        "limit_concurrency": settings.max_connections,
        "timeout_keep_alive": settings.idle_timeout_s,
    }
    try:
        options["http"] = limited_protocol(settings.max_header_bytes, settings.header_timeout_s)
    except ImportError:  # pragma: no cover - the server extra brings httptools
        log.warning("httptools is missing: no header-read timeout (pip install httptools)")
        options["http"] = "h11"
        options["h11_max_incomplete_event_size"] = settings.max_header_bytes
    return options


def limited_protocol(max_header_bytes: int, header_timeout_s: float) -> type[Any]:
    """uvicorn's httptools protocol with a header size limit and a header-read timeout."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class LimitedHttpToolsProtocol(HttpToolsProtocol):  # type: ignore[misc]
        _reading_headers = True
        _header_bytes = 0
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._reading_headers:
                self._header_bytes += len(data)
                self._arm()
            super().data_received(data)
            if (
                self._reading_headers
                and self._header_bytes > max_header_bytes
                and not self.transport.is_closing()
            ):
                self._refuse(431, f"request headers larger than {max_header_bytes} bytes")

        def on_headers_complete(self) -> None:
            self._reading_headers, self._header_bytes = False, 0
            self._disarm()
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._reading_headers, self._header_bytes = True, 0  # the next request's turn

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(header_timeout_s, self._timed_out)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _timed_out(self) -> None:
            self._header_timer = None
            if self._reading_headers and not self.transport.is_closing():
                if self._header_bytes:  # a request began: say why it ends
                    self._refuse(408, f"request headers not received within {header_timeout_s} s")
                else:
                    self.transport.close()

        def _refuse(self, status: int, message: str) -> None:
            log.warning("closing a connection from %s: %s", _client(self.client), message)
            body = message.encode()
            self.transport.write(
                b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\n"
                b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                % (status, STATUS[status], len(body), body)
            )
            self.transport.close()
            self._disarm()

    return LimitedHttpToolsProtocol


def _client(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "?"
