"""Resumable chunked uploads, the HTTP side: init (or resume by fingerprint), parts, complete.

These handlers check who asks and what they send; `PartStore` (part_store.py) writes the
parts into each upload's data file and turns it into a file. A part PUT and `complete` on
the same upload meet at one gate: `complete` waits for parts already being written, and a
part that arrives once `complete` has begun finds the upload closed (409), so a completed
upload never gains a part.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
import weakref
from pathlib import Path
from typing import Any

import anyio
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse

from . import audit
from .errors import ApiError, not_found
from .part_store import PartStore
from .settings import ServerSettings
from .storage import Storage, new_id

__all__ = ["UploadService", "json_body"]

log = logging.getLogger(__name__)

SHA256_RE = re.compile(r"[0-9a-f]{64}")  # always with fullmatch: `$` lets a newline through
MAX_PARTS = 10_000
MAX_JSON_BYTES = 1 << 20


def upload_record(row: dict[str, Any], parts: dict[int, Any]) -> dict[str, Any]:
    """The public view of an upload. `parts_received` lists part indices, in every answer.

    A completed upload lists every part (they became its file); a rejected or expired one
    lists none (its parts were deleted, and it cannot be resumed).
    """
    received = list(range(row["parts_total"])) if row["state"] == "completed" else sorted(parts)
    return {
        "upload_id": row["id"],
        "filename": row["filename"],
        "size": row["size"],
        "sha256": row["sha256"],
        "fingerprint": row.get("fingerprint"),
        "part_size": row["part_size"],
        "parts_total": row["parts_total"],
        "parts_received": received,
        "parts_received_count": len(received),
        "state": row["state"],
        "file_id": row["file_id"],
        "created_at": row["created_at"],
        "expires_at": row["expires_at"],
    }


def file_record(row: dict[str, Any]) -> dict[str, Any]:
    meta = row["meta"]
    return {
        "file_id": row["id"],
        "filename": row["filename"],
        "size": row["size"],
        "sha256": row["sha256"],
        "shape": meta["shape"],
        "voxel_size": meta["voxel_size"],
        "dtype": meta["dtype"],
        "created_at": row["created_at"],
    }


def _bad(message: str, hint: str = "", code: str = "invalid_request") -> ApiError:
    return ApiError(422, code, message, hint)


async def json_body(request: Request, *, optional: bool = False) -> dict[str, Any]:
    """The request's JSON object, or a 400/413/422 that says what is wrong with it.

    With `optional`, an empty body is an empty object.
    """
    too_large = ApiError(
        413,
        "request_too_large",
        f"the JSON body is larger than {MAX_JSON_BYTES} bytes",
        "send a small JSON object; file data goes to PUT /v1/uploads/{id}/part/{idx}",
    )
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_JSON_BYTES:
        raise too_large
    raw = bytearray()
    try:
        async for chunk in request.stream():  # not request.body(): that reads any size
            raw += chunk
            if len(raw) > MAX_JSON_BYTES:
                raise too_large
    except ClientDisconnect:
        raise ApiError(
            400,
            "client_disconnected",
            "the connection closed mid-request",
            "send the request again",
            retryable=True,
        ) from None
    if optional and not raw.strip():
        return {}
    try:
        body = json.loads(raw or b"null")
    except ValueError as exc:
        raise ApiError(
            400,
            "invalid_json",
            f"the request body is not JSON: {exc}",
            "send a JSON object with Content-Type: application/json",
        ) from None
    except RecursionError:  # a thousand nested arrays: the decoder recurses once per level
        raise ApiError(
            400,
            "invalid_json",
            "the request body nests arrays or objects too deeply",
            "send a flat JSON object; no request needs more than a few levels",
        ) from None
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    return body


class _Gate:
    """Where part PUTs and `complete` of one upload meet (see the module docstring)."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()  # held by complete; parts hold it only to check and enter
        self.writing = 0  # parts past the check, being written
        self.idle = asyncio.Event()
        self.idle.set()

    def enter(self) -> None:
        self.writing += 1
        self.idle.clear()

    def leave(self) -> None:
        self.writing -= 1
        if self.writing == 0:
            self.idle.set()


class UploadService:
    """The upload routes; parts and files go to a `PartStore`."""

    def __init__(self, settings: ServerSettings, storage: Storage, metrics: Any = None) -> None:
        self.settings, self.storage, self.metrics = settings, storage, metrics
        self.store = PartStore(settings, storage)
        self._in_flight: dict[str, int] = {}
        # One gate per upload in use; an entry lives as long as a request holds it.
        self._gates: weakref.WeakValueDictionary[str, _Gate] = weakref.WeakValueDictionary()

    def clean(self) -> dict[str, int]:
        return self.store.clean()

    def _gate(self, upload_id: str) -> _Gate:
        return self._gates.setdefault(upload_id, _Gate())

    # -- routes -----------------------------------------------------------------------------
    async def init(self, request: Request) -> JSONResponse:
        principal = request.state.principal
        principal.require("upload")
        body = await json_body(request)
        filename, size, sha256, part_size = self._check_init(body)
        fingerprint = _checksum(body, "fingerprint")
        now = time.time()
        # Name and size do not identify the content: two tomograms of one name and shape
        # have the same size, and resuming one with the other's parts would mix them. A
        # checksum does; a fingerprint makes it likely, and `complete` then demands the
        # whole SHA-256, so a wrong guess is refused instead of mixed.
        row = self.storage.resumable_upload(
            principal.subject, filename, size, sha256, now, fingerprint=fingerprint
        )
        if row is not None:
            if row["state"] == "open":
                self.storage.update_upload(row["id"], expires_at=now + self.settings.upload_ttl_s)
                row = self._row(row["id"])
            log.info("upload %s resumed by %s", row["id"], principal.subject)
            audit.note(request, row["id"])
            return JSONResponse(upload_record(row, self.storage.parts(row["id"])), 200)
        upload_id = new_id()
        row = {
            "id": upload_id,
            "owner": principal.subject,
            "filename": filename,
            "size": size,
            "sha256": sha256,
            "fingerprint": fingerprint,
            "part_size": part_size,
            "parts_total": math.ceil(size / part_size),
            "state": "open",
            "file_id": None,
            "created_at": now,
            "expires_at": now + self.settings.upload_ttl_s,
        }
        await anyio.to_thread.run_sync(self.store.open_upload, row)
        audit.note(request, upload_id)
        return JSONResponse(upload_record(row, {}), 201)

    async def status(self, request: Request) -> JSONResponse:
        principal = request.state.principal
        principal.require("upload")
        row = self._owned(request)
        return JSONResponse(upload_record(row, self.storage.parts(row["id"])))

    async def put_part(self, request: Request) -> JSONResponse:
        principal = request.state.principal
        principal.require("upload")
        row = self._owned(request)
        self._check_open(row)
        idx = self._index(request, row)
        expected = self._part_length(row, idx)
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) != expected:
            raise _part_size_error(idx, expected, int(length))
        claimed = request.headers.get("x-part-sha256")
        if claimed is not None and not SHA256_RE.fullmatch(claimed.lower()):
            raise _bad(
                "X-Part-SHA256 must be 64 hexadecimal characters",
                "send the part's SHA-256 as lowercase hex, or leave the header out",
            )
        key = principal.subject
        if self._in_flight.get(key, 0) >= self.settings.upload_concurrency:
            raise ApiError(
                429,
                "too_many_parts_in_flight",
                f"at most {self.settings.upload_concurrency} parts may upload at once per user",
                "upload fewer parts in parallel, or retry after a second",
                retryable=True,
                headers={"Retry-After": "1"},
            )
        gate = self._gate(row["id"])
        self._in_flight[key] = self._in_flight.get(key, 0) + 1
        try:
            data = await self._read_part(request, idx, expected)
            async with gate.lock:  # complete may have begun while the body arrived
                self._check_open(self._row(row["id"]))
                gate.enter()
            try:
                digest = await anyio.to_thread.run_sync(
                    self.store.store_part, row, idx, data, claimed
                )
            finally:
                gate.leave()
        finally:
            self._in_flight[key] -= 1
        if self.metrics is not None:
            self.metrics.upload_bytes.inc(expected)
        self.storage.update_upload(row["id"], expires_at=time.time() + self.settings.upload_ttl_s)
        received = sorted(self.storage.parts(row["id"]))
        return JSONResponse(
            {
                "index": idx,
                "size": expected,
                "sha256": digest,
                "parts_received": received,
                "parts_received_count": len(received),
            }
        )

    async def complete(self, request: Request) -> JSONResponse:
        principal = request.state.principal
        principal.require("upload")
        row = self._owned(request)
        claimed = _checksum(await json_body(request, optional=True), "sha256")
        gate = self._gate(row["id"])
        async with gate.lock:
            await gate.idle.wait()  # parts that passed their check are written first
            row = self._row(row["id"])
            if row["state"] == "completed":
                file_row = self.storage.file(row["file_id"])
                assert file_row is not None  # a completed upload always has its file
                return JSONResponse(file_record(file_row), 200)
            self._check_open(row)
            parts = self.storage.parts(row["id"])
            missing = [i for i in range(row["parts_total"]) if i not in parts]
            if missing:
                shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
                raise ApiError(
                    409,
                    "missing_parts",
                    f"{len(missing)} of {row['parts_total']} parts are missing: {shown}",
                    "PUT the missing parts, then complete again",
                    retryable=True,
                    details={"missing": missing[:1000]},
                )
            if row["fingerprint"] and not (row["sha256"] or claimed):
                raise _bad(
                    "this upload was started with a fingerprint, so `complete` needs the "
                    "whole file's SHA-256",
                    'send {"sha256": "<64 hex>"} with complete',
                    code="sha256_required",
                )
            file_row = await anyio.to_thread.run_sync(self.store.assemble, row, claimed)
        return JSONResponse(file_record(file_row), 201)

    # -- checks -----------------------------------------------------------------------------
    @staticmethod
    async def _read_part(request: Request, idx: int, expected: int) -> bytearray:
        data = bytearray()
        try:
            async for chunk in request.stream():
                data += chunk
                if len(data) > expected:
                    raise _part_size_error(idx, expected, len(data), more=True)
        except ClientDisconnect:  # the client gave up on this part: nothing to store
            raise ApiError(
                400,
                "client_disconnected",
                f"the connection closed after {len(data)} bytes of part {idx}",
                "send the part again",
                retryable=True,
            ) from None
        if len(data) != expected:
            raise _part_size_error(idx, expected, len(data))
        return data

    def _check_init(self, body: dict[str, Any]) -> tuple[str, int, str | None, int]:
        s = self.settings
        filename = body.get("filename")
        if not isinstance(filename, str) or not filename.strip():
            raise _bad("`filename` must be a non-empty string", 'e.g. {"filename": "tomo.mrc"}')
        filename = Path(filename.replace("\\", "/")).name
        if (
            filename in ("", ".", "..")
            or len(filename) > 255
            or "\x00" in filename
            or not _utf8(filename)
        ):
            raise _bad(f"`filename` {body['filename']!r} is not a usable file name")
        size = body.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise _bad("`size` must be a positive integer (bytes)")
        if size > s.max_upload_bytes:
            raise ApiError(
                413,
                "upload_too_large",
                f"the file is {size} bytes; this server accepts at most {s.max_upload_bytes}",
                "ask the operator to raise --max-upload-size, or put the file under a server "
                "root and submit it by path",
            )
        sha256 = _checksum(body, "sha256")
        part_size = body.get("part_size", s.part_size)
        if (
            not isinstance(part_size, int)
            or isinstance(part_size, bool)
            or not s.part_size_min <= part_size <= s.part_size_max
        ):
            raise _bad(
                f"`part_size` must be an integer from {s.part_size_min} to {s.part_size_max}",
                "leave it out to get the server's default",
                code="invalid_part_size",
            )
        if math.ceil(size / part_size) > MAX_PARTS:
            raise _bad(
                f"{size} bytes in parts of {part_size} would exceed {MAX_PARTS} parts",
                "use a larger part_size",
                code="invalid_part_size",
            )
        return filename, size, sha256, part_size

    def _owned(self, request: Request) -> dict[str, Any]:
        upload_id = request.path_params["upload_id"]
        row = self.storage.upload(upload_id)
        if row is None or not request.state.principal.owns(row["owner"]):
            raise not_found("upload", upload_id)
        return row

    def _row(self, upload_id: str) -> dict[str, Any]:
        """The upload's row, read again (it exists: uploads are never deleted)."""
        row = self.storage.upload(upload_id)
        assert row is not None
        return row

    def _check_open(self, row: dict[str, Any]) -> None:
        if row["state"] == "open" and row["expires_at"] <= time.time():
            raise ApiError(
                410,
                "upload_expired",
                "this upload has expired",
                "start again with POST /v1/uploads/init",
            )
        if row["state"] != "open":
            raise ApiError(
                409,
                "upload_not_open",
                f"this upload is {row['state']}",
                "start a new upload with POST /v1/uploads/init",
            )

    def _index(self, request: Request, row: dict[str, Any]) -> int:
        raw = request.path_params["idx"]
        try:
            idx = int(raw)
        except ValueError:
            idx = -1
        if not 0 <= idx < row["parts_total"]:
            raise _bad(
                f"part index {raw} is out of range 0..{row['parts_total'] - 1}",
                "parts are numbered from 0",
                code="part_out_of_range",
            )
        return idx

    @staticmethod
    def _part_length(row: dict[str, Any], idx: int) -> int:
        start = idx * row["part_size"]
        return min(row["part_size"], row["size"] - start)


def _checksum(body: dict[str, Any], key: str) -> str | None:
    """`body[key]` if it is 64 lowercase hex characters (a SHA-256), None if absent."""
    value = body.get(key)
    if value is not None and (not isinstance(value, str) or not SHA256_RE.fullmatch(value)):
        raise _bad(f"`{key}` must be 64 lowercase hexadecimal characters")
    return value


def _utf8(text: str) -> bool:
    """False for text with lone surrogates, which JSON allows but no file name or database can."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _part_size_error(idx: int, expected: int, got: int, more: bool = False) -> ApiError:
    got_text = f"more than {expected}" if more else str(got)
    return ApiError(
        422,
        "part_size_mismatch",
        f"part {idx} must be {expected} bytes, got {got_text}",
        "every part is part_size bytes except the last, which holds the rest",
    )
