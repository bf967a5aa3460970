"""The OpenAPI 3.0 document for /v1: what the server accepts and returns, route by route.

Written by hand next to the routes it describes, and checked against the running server
by a schemathesis test, so the two cannot drift apart unnoticed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .._version import __version__
from ..config import ARTIFACT_MEDIA_TYPES
from .openapi_schemas import component_schemas, ref

__all__ = ["openapi_document"]


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    text = {
        400: "The body is not JSON",
        401: "Missing, invalid or expired token",
        403: "The token lacks a scope, or the path or signature is not allowed",
        404: "No such object (or it belongs to someone else)",
        409: "The object is in a state that does not allow this",
        410: "Expired",
        413: "Too large",
        507: "The server's disk is full; nothing was kept, retry once space is freed",
        422: "The request is well-formed but its values are not acceptable",
        429: "Rate limited; see Retry-After",
    }
    out = {str(s): _json(ref("Error"), text[s]) for s in statuses}
    if 429 in statuses:
        out["429"]["headers"] = {
            "Retry-After": {
                "description": "Seconds to wait",
                "required": True,
                "schema": {"type": "integer"},
            }
        }
    return out


AUTH: list[dict[str, list[str]]] = [{"bearer": []}]
_ID = {"type": "string"}


def _linked(response: dict[str, Any], links: dict[str, Any]) -> dict[str, Any]:
    return {**response, "links": links}


def _link(operation: str, **parameters: str) -> dict[str, Any]:
    return {"operationId": operation, "parameters": parameters}


UPLOAD_LINKS = {
    "GetUpload": _link("getUpload", upload_id="$response.body#/upload_id"),
    "PutPart": _link("putUploadPart", upload_id="$response.body#/upload_id"),
    "Complete": _link("completeUpload", upload_id="$response.body#/upload_id"),
}
FILE_LINKS = {
    "SubmitJob": {"operationId": "submitJob", "requestBody": {"file_id": "$response.body#/file_id"}}
}
JOB_LINKS = {
    "GetJob": _link("getJob", job_id="$response.body#/id"),
    "CancelJob": _link("cancelJob", job_id="$response.body#/id"),
}


def _path_param(name: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema or _ID}


def openapi_document(
    settings=None, *, models: Sequence[str] = (), devices: Sequence[str] = ()
) -> dict[str, Any]:
    """The whole document, served at /v1/openapi.json; `settings`, `models` and `devices`
    narrow it to one server (its upload limits, model names and devices)."""
    schemas = component_schemas(settings, models=models, devices=devices)
    paths: dict[str, Any] = {
        "/v1/healthz": {
            "get": {
                "operationId": "health",
                "summary": "Liveness",
                "security": [],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["status"],
                            "properties": {
                                "status": {"type": "string"},
                                "version": {"type": "string"},
                            },
                        },
                        "Alive",
                    )
                },
            }
        },
        "/v1/server/info": {
            "get": {
                "operationId": "serverInfo",
                "summary": "Version, devices, models and limits",
                "security": AUTH,
                "responses": {
                    "200": _json(ref("ServerInfo"), "Server info"),
                    **_errors(401, 403, 429),
                },
            }
        },
        "/v1/uploads/init": {
            "post": {
                "operationId": "initUpload",
                "summary": "Start an upload, or resume the one with the same fingerprint",
                "security": AUTH,
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": ref("UploadInit")}},
                },
                "responses": {
                    "200": _linked(_json(ref("Upload"), "Resumed"), UPLOAD_LINKS),
                    "201": _linked(_json(ref("Upload"), "Created"), UPLOAD_LINKS),
                    **_errors(400, 401, 403, 413, 422, 429),
                },
            }
        },
        "/v1/uploads/{upload_id}": {
            "get": {
                "operationId": "getUpload",
                "summary": "Parts received so far",
                "security": AUTH,
                "parameters": [_path_param("upload_id")],
                "responses": {
                    "200": _json(ref("Upload"), "The upload"),
                    **_errors(401, 403, 404, 429),
                },
            }
        },
        "/v1/uploads/{upload_id}/part/{idx}": {
            "put": {
                "operationId": "putUploadPart",
                "summary": "Write one part into the upload's file, durably (idempotent)",
                "security": AUTH,
                "parameters": [
                    _path_param("upload_id"),
                    _path_param("idx", {"type": "integer", "minimum": 0}),
                    {
                        "name": "X-Part-SHA256",
                        "in": "header",
                        "required": False,
                        "schema": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                    },
                ],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/octet-stream": {
                            "schema": {"type": "string", "format": "binary"}
                        }
                    },
                },
                "responses": {
                    "200": _json(ref("PartReceipt"), "Stored"),
                    **_errors(401, 403, 404, 409, 410, 422, 429, 507),
                },
            }
        },
        "/v1/uploads/{upload_id}/complete": {
            "post": {
                "operationId": "completeUpload",
                "summary": "Verify the whole SHA-256 (kept as parts arrived) and the MRC "
                "header, store the file",
                "security": AUTH,
                "parameters": [_path_param("upload_id")],
                "requestBody": {
                    "required": False,
                    "content": {"application/json": {"schema": ref("UploadComplete")}},
                },
                "responses": {
                    "200": _linked(_json(ref("File"), "Already complete"), FILE_LINKS),
                    "201": _linked(_json(ref("File"), "Complete"), FILE_LINKS),
                    **_errors(400, 401, 403, 404, 409, 410, 413, 422, 429),
                },
            }
        },
        "/v1/jobs": {
            "post": {
                "operationId": "submitJob",
                "summary": "Submit a job on an uploaded file or a server path",
                "security": AUTH,
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": ref("JobSubmit")}},
                },
                "responses": {
                    "201": _linked(_json(ref("Job"), "Queued"), JOB_LINKS),
                    **_errors(400, 401, 403, 404, 413, 422, 429),
                },
            },
            "get": {
                "operationId": "listJobs",
                "summary": "Your jobs, newest first (every job for admins)",
                "security": AUTH,
                "parameters": [
                    {
                        "name": "state",
                        "in": "query",
                        "required": False,
                        "schema": {
                            "type": "string",
                            "enum": [
                                "queued",
                                "running",
                                "previewing",
                                "completed",
                                "failed",
                                "canceled",
                            ],
                        },
                    },
                    {
                        "name": "limit",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
                    },
                ],
                "responses": {"200": _json(ref("JobList"), "Jobs"), **_errors(401, 403, 422, 429)},
            },
        },
        "/v1/jobs/{job_id}": {
            "get": {
                "operationId": "getJob",
                "summary": "One job's record",
                "security": AUTH,
                "parameters": [_path_param("job_id")],
                "responses": {"200": _json(ref("Job"), "The job"), **_errors(401, 403, 404, 429)},
            },
            "delete": {
                "operationId": "cancelJob",
                "summary": "Cancel a queued or running job",
                "security": AUTH,
                "parameters": [_path_param("job_id")],
                "responses": {
                    "202": _json(ref("Job"), "Cancel requested"),
                    **_errors(401, 403, 404, 409, 429),
                },
            },
        },
        "/v1/files/{job_id}/{artifact}": {
            "get": {
                "operationId": "downloadArtifact",
                "summary": "Download an artifact by its signed URL",
                "security": [],
                "parameters": [
                    _path_param("job_id"),
                    _path_param(
                        "artifact",
                        {
                            "type": "string",
                            "enum": list(ARTIFACT_MEDIA_TYPES),
                        },
                    ),
                    {"name": "exp", "in": "query", "required": True, "schema": {"type": "string"}},
                    {"name": "sig", "in": "query", "required": True, "schema": {"type": "string"}},
                ],
                "responses": {
                    "200": {
                        "description": "The file",
                        "headers": {
                            "X-Checksum-SHA256": {
                                "description": "The artifact's SHA-256 (hex)",
                                "required": True,
                                "schema": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                            }
                        },
                        "content": {
                            media: {"schema": {"type": "string", "format": "binary"}}
                            for media in (
                                "application/octet-stream",
                                "application/gzip",
                                "application/json",
                                "image/png",
                            )
                        },
                    },
                    **_errors(403, 404, 410),
                },
            }
        },
        "/v1/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document",
                "security": [],
                "responses": {"200": _json({"type": "object"}, "OpenAPI 3.0 document")},
            }
        },
    }
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "CryoMamba server",
            "version": __version__,
            "description": "Segment cryo-ET tomograms with nnU-Net v2. The WebSocket "
            "/v1/ws/jobs/{id} and /metrics are described in docs/server.md.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            },
        },
        "security": AUTH,
    }
