"""Small routes: health, server info, signed artifact downloads, metrics, the OpenAPI document."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response

from .._version import __version__
from ..config import ARTIFACT_MEDIA_TYPES
from ..job import JobState
from .auth import check_signature
from .errors import ApiError, not_found
from .openapi import openapi_document

__all__ = ["artifact", "health", "info", "metrics", "openapi"]

MEDIA_TYPES = ARTIFACT_MEDIA_TYPES


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok", "version": __version__})


async def info(request: Request) -> JSONResponse:
    request.state.principal.require("read")
    server = request.app.state.server
    s = server.settings
    return JSONResponse(
        {
            "version": __version__,
            "devices": list(server.devices),
            "models": server.model_infos(),
            "roots": [str(r) for r in s.roots],
            "limits": {
                "part_size_default": s.part_size,
                "part_size_min": s.part_size_min,
                "part_size_max": s.part_size_max,
                "max_upload_bytes": s.max_upload_bytes,
                "upload_ttl_s": s.upload_ttl_s,
                "upload_concurrency": s.upload_concurrency,
                "rate_limit_per_min": s.rate_limit_per_min,
                "jobs_per_device": s.jobs_per_device,
                "url_ttl_s": s.url_ttl_s,
            },
        }
    )


async def artifact(request: Request) -> Response:
    server = request.app.state.server
    job_id, name = request.path_params["job_id"], request.path_params["artifact"]
    if name not in ARTIFACT_MEDIA_TYPES:
        raise ApiError(
            404,
            "not_found",
            f"no artifact named {name!r}",
            f"artifacts are: {', '.join(ARTIFACT_MEDIA_TYPES)}",
        )
    check_signature(
        server.secret,
        job_id,
        name,
        request.query_params.get("exp"),
        request.query_params.get("sig"),
    )
    row = server.storage.job(job_id)
    if row is None or row["state"] != JobState.COMPLETED or name not in (row["artifacts"] or {}):
        raise not_found("artifact", f"{job_id}/{name}")
    path = server.settings.artifacts_dir / job_id / name
    if not path.is_file():
        raise ApiError(
            410,
            "artifact_gone",
            f"{name} of job {job_id} is no longer on the server",
            "run the job again",
        )
    return FileResponse(
        path,
        media_type=MEDIA_TYPES[name],
        filename=name,
        headers={"X-Checksum-SHA256": row["artifacts"][name]["sha256"]},
    )


async def metrics(request: Request) -> Response:
    m = request.app.state.server.metrics
    return Response(m.render(), media_type=m.content_type)


async def openapi(request: Request) -> JSONResponse:
    server = request.app.state.server
    return JSONResponse(
        openapi_document(
            server.settings,
            models=server.model_names(),
            devices=server.devices,
        )
    )
