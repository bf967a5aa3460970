"""Job routes: submit (from an uploaded file or a server path), list, status, cancel."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse

from ..config import JobConfig
from ..errors import CryoMambaError
from ..job import TERMINAL_STATES, JobState
from . import audit
from .auth import sign_artifact
from .errors import ApiError, not_found
from .job_checks import ModelFacts
from .paths import file_identity, open_job_source, open_nofollow, resolve_server_path
from .storage import new_id
from .uploads import json_body
from .webhooks import check_url

__all__ = ["JobRoutes", "job_record"]

STATES = tuple(JobState)


def job_record(server, row: dict[str, Any]) -> dict[str, Any]:
    """The public view of a job: what GET /v1/jobs/{id} returns (artifact URLs freshly signed)."""
    live = server.runner.live.get(row["id"])
    progress = row["progress"]
    if live is not None and live.last_progress is not None:
        progress = live.last_progress.record()
    artifacts = {}
    if row["state"] == JobState.COMPLETED and row["artifacts"]:
        for name, info in row["artifacts"].items():
            url, exp = sign_artifact(server.secret, row["id"], name, server.settings.url_ttl_s)
            artifacts[name] = {**info, "url": url, "expires_at": exp}
    source = {k: v for k, v in row["source"].items() if k not in ("path", "identity")}
    return {
        "id": row["id"],
        "state": row["state"],
        "owner": row["owner"],
        "created_at": row["created_at"],
        "started_at": row["started_at"],
        "finished_at": row["finished_at"],
        "device": row["device"],
        "queue_position": (
            server.storage.queue_position(row["id"], row["created_at"])
            if row["state"] == JobState.QUEUED
            else None
        ),
        "source": source,
        "config": row["config"],
        "model": row["model"],
        "progress": progress,
        "error": row["error"],
        "artifacts": artifacts,
        "notify_url": row.get("notify_url"),
        "webhook": _webhook_status(server.storage.webhook(row["id"])),
    }


def _webhook_status(row: dict[str, Any] | None) -> dict[str, Any] | None:
    """The delivery of the job's webhook: pending, delivered or failed (given up)."""
    if row is None:
        return None
    keys = ("state", "attempts", "created_at", "next_at", "delivered_at", "last_error")
    return {k: row[k] for k in keys}


class JobRoutes:
    def __init__(self, server) -> None:
        self.server = server
        self._models: dict[str, ModelFacts] = {}

    async def create(self, request: Request) -> JSONResponse:
        principal = request.state.principal
        principal.require("submit")
        body = await json_body(request)
        unknown = sorted(set(body) - {"file_id", "server_path", "config", "notify_url"})
        if unknown:
            raise ApiError(
                422,
                "invalid_request",
                f"unknown field(s): {', '.join(unknown)}",
                "send {file_id or server_path, config, notify_url (optional)}",
            )
        config = self._config(body.get("config", {}))
        notify_url = None
        if "notify_url" in body:  # checked first: a refused URL must not cost a model read
            notify_url = check_url(body["notify_url"], self.server.webhooks.rules)
        source = await self._source(request, body)
        facts = await anyio.to_thread.run_sync(self._model, config.model)
        facts.check(config, source, self.server.settings.max_tiles)
        model = {"name": config.model, "sha256": facts.sha256}
        now = time.time()
        row = {
            "id": new_id(),
            "owner": principal.subject,
            "state": JobState.QUEUED,
            "device": None if config.device == "auto" else config.device,
            "created_at": now,
            "started_at": None,
            "finished_at": None,
            "source": source,
            "config": config.to_dict(),
            "model": model,
            "progress": None,
            "error": None,
            "artifacts": None,
            "notify_url": notify_url,
        }
        self.server.runner.enqueue(row)
        audit.note(request, row["id"])
        return JSONResponse(job_record(self.server, self.server.storage.job(row["id"])), 201)

    async def list(self, request: Request) -> JSONResponse:
        principal = request.state.principal
        principal.require("read")
        state = request.query_params.get("state")
        if state is not None and state not in STATES:
            raise ApiError(
                422,
                "invalid_request",
                f"unknown state {state!r}",
                f"choose from {', '.join(STATES)}",
            )
        try:
            limit = int(request.query_params.get("limit", "100"))
        except ValueError:
            limit = -1
        if not 1 <= limit <= 1000:
            raise ApiError(422, "invalid_request", "`limit` must be an integer from 1 to 1000")
        owner = None if principal.admin else principal.subject
        rows = self.server.storage.jobs(owner=owner, state=state, limit=limit)
        return JSONResponse({"jobs": [job_record(self.server, r) for r in rows]})

    async def get(self, request: Request) -> JSONResponse:
        request.state.principal.require("read")
        return JSONResponse(job_record(self.server, self.owned(request)))

    async def cancel(self, request: Request) -> JSONResponse:
        request.state.principal.require("submit")
        row = self.owned(request)
        if row["state"] in TERMINAL_STATES or not self.server.runner.cancel(row["id"]):
            raise ApiError(
                409,
                "job_finished",
                f"the job has already ended ({row['state']})",
                "nothing to cancel",
            )
        return JSONResponse(job_record(self.server, self.server.storage.job(row["id"])), 202)

    def owned(self, request: Request) -> dict[str, Any]:
        job_id = request.path_params["job_id"]
        row = self.server.storage.job(job_id)
        if row is None or not request.state.principal.owns(row["owner"]):
            raise not_found("job", job_id)
        return row

    # -- helpers ----------------------------------------------------------------------------
    def _config(self, data: Any) -> JobConfig:
        if not isinstance(data, dict):
            raise ApiError(
                422,
                "invalid_config",
                "`config` must be a JSON object",
                'e.g. {"model": "demo-membrane", "tile_step": 0.5}',
            )
        try:
            config = JobConfig.from_dict(data)
        except CryoMambaError as exc:
            raise ApiError.from_core(exc) from None
        allowed = self.server.model_names()
        if config.model not in allowed:
            raise ApiError(
                422,
                "invalid_model",
                f"unknown model {config.model!r} on this server",
                f"available: {', '.join(allowed)} (GET /v1/server/info lists them)",
            )
        devices = self.server.devices
        if config.device not in ("auto", *devices):
            raise ApiError(
                422,
                "invalid_config",
                f"device {config.device!r} is not one of this server's devices",
                f"use auto or one of: {', '.join(devices)}",
            )
        return config

    async def _source(self, request: Request, body: dict[str, Any]) -> dict[str, Any]:
        file_id, server_path = body.get("file_id"), body.get("server_path")
        if (file_id is None) == (server_path is None):
            raise ApiError(
                422,
                "invalid_request",
                "give exactly one of `file_id` or `server_path`",
                "upload first (POST /v1/uploads/init) to get a file_id",
            )
        if file_id is not None:
            if not isinstance(file_id, str):
                raise ApiError(422, "invalid_request", "`file_id` must be a string")
            row = self.server.storage.file(file_id)
            if row is None or not request.state.principal.owns(row["owner"]):
                raise not_found("file", file_id)
            path = os.path.realpath(row["path"])  # the server's own file: links are its own
            identity = await anyio.to_thread.run_sync(_identity, path)
            return {
                "file_id": file_id,
                "filename": row["filename"],
                "path": path,
                "identity": identity,
                "sha256": row["sha256"],
                **row["meta"],
            }
        if not isinstance(server_path, str):
            raise ApiError(422, "invalid_request", "`server_path` must be a string")
        path = resolve_server_path(server_path, self.server.settings.roots)
        meta = await anyio.to_thread.run_sync(_describe, path)
        return {
            "server_path": server_path,
            "filename": path.name,
            "path": str(path),
            "sha256": None,
            **meta,
        }

    def _model(self, name: str) -> ModelFacts:
        if name not in self._models:
            self._models[name] = ModelFacts.read(name)
        return self._models[name]


def _describe(path: Path) -> dict[str, Any]:
    """Shape, voxel size and dtype of the file at `path`, and its identity for the worker.

    The file is opened once, without following links, and described from that open file,
    so the identity recorded is that of the file whose header was checked.
    """
    try:
        with open_job_source({"path": str(path), "filename": path.name}) as volume:
            return {
                "identity": file_identity(volume.fd),
                "shape": list(volume.shape),
                "voxel_size": list(volume.voxel_size),
                "dtype": str(volume.dtype),
            }
    except CryoMambaError as exc:
        raise ApiError.from_core(exc, status=_STATUS.get(exc.code, 422)) from None


def _identity(path: str) -> list[int]:
    try:
        fd = open_nofollow(path)
    except CryoMambaError as exc:
        raise ApiError.from_core(exc, status=_STATUS.get(exc.code, 422)) from None
    try:
        return file_identity(fd)
    finally:
        os.close(fd)


_STATUS = {"path_not_allowed": 403, "file_not_found": 404}
