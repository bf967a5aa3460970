"""WS /v1/ws/jobs/{id}: the current state first, then progress, previews and the end.

Each socket follows the job's coalescing subscription, so a slow client skips to the
latest preview and never slows the job. A ping goes out every `keepalive_s` of silence.
Protocol errors are sent as `{"type": "error", ...}` before closing with 4401/4403/4404, and
a handshake beyond the rate limits with 4429.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import weakref
from typing import Any

import anyio
from starlette.websockets import WebSocket, WebSocketDisconnect

from ..events import Completed, Event
from ..job import TERMINAL_STATES, JobState
from .errors import ApiError
from .jobs import job_record

__all__ = ["job_socket"]

log = logging.getLogger(__name__)

CLOSE_CODES = {401: 4401, 403: 4403, 404: 4404, 429: 4429}


def terminal_message(server, row: dict[str, Any]) -> dict[str, Any]:
    if row["state"] == JobState.COMPLETED:
        return {"type": "completed", "job": job_record(server, row)}
    if row["state"] == JobState.FAILED:
        return {"type": "failed", **(row["error"] or {})}
    return {"type": "canceled"}


async def job_socket(websocket: WebSocket) -> None:
    server = websocket.app.state.server
    await websocket.accept()
    try:
        row = _authorize(websocket, server)
    except ApiError as exc:
        await websocket.send_json({"type": "error", **exc.envelope()})
        await websocket.close(CLOSE_CODES.get(exc.status, 4400))
        return
    lock = asyncio.Lock()

    async def send(message: dict[str, Any] | str) -> None:
        text = message if isinstance(message, str) else json.dumps(message)
        async with lock:
            await websocket.send_text(text)

    stream = asyncio.create_task(_stream(server, row, send))
    keepalive = asyncio.create_task(_keepalive(send, server.settings.keepalive_s))
    listen = asyncio.create_task(_until_disconnect(websocket))
    try:
        done, _ = await asyncio.wait({stream, listen}, return_when=asyncio.FIRST_COMPLETED)
        if stream in done and stream.exception() is None:
            await websocket.close(1000)
    except (WebSocketDisconnect, RuntimeError, OSError):
        pass
    finally:
        for task in (stream, keepalive, listen):
            task.cancel()
        await asyncio.gather(stream, keepalive, listen, return_exceptions=True)


def _authorize(websocket: WebSocket, server) -> dict[str, Any]:
    state = websocket.scope.get("state", {})
    if "auth_error" in state:
        raise state["auth_error"]
    principal = state["principal"]
    principal.require("read")
    job_id = websocket.path_params["job_id"]
    row = server.storage.job(job_id)
    if row is None or not principal.owns(row["owner"]):
        raise ApiError(404, "not_found", f"no job {job_id!r}", "check the job id")
    return row


async def _stream(server, row: dict[str, Any], send) -> None:
    job_id = row["id"]
    await send({"type": "state", "job": job_record(server, row)})
    if row["state"] in TERMINAL_STATES:
        await send(terminal_message(server, row))
        return
    job = server.runner.live.get(job_id)
    if job is None:  # it ended between the read above and now
        await send(terminal_message(server, server.storage.job(job_id)))
        return
    async for event in job.aevents():
        if isinstance(event, Completed):
            await send(terminal_message(server, server.storage.job(job_id)))
        else:  # progress, preview, failed, canceled: the event's own wire form
            await send(await anyio.to_thread.run_sync(wire_text, event))


_wire_cache: weakref.WeakKeyDictionary[Event, str] = weakref.WeakKeyDictionary()
_wire_lock = threading.Lock()


def wire_text(event: Event) -> str:
    """An event's JSON text, made once however many sockets follow the job.

    A preview of a 10 GB tomogram is tens of MB of base64: it is encoded on a worker thread,
    not on the event loop, and kept only as long as the event itself is.
    """
    with _wire_lock:
        text = _wire_cache.get(event)
    if text is None:
        text = json.dumps(event.to_dict())
        with _wire_lock:
            _wire_cache[event] = text
    return text


async def _keepalive(send, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        await send({"type": "ping", "t": time.time()})


async def _until_disconnect(websocket: WebSocket) -> None:
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
