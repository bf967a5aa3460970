"""The OpenAPI 3.0 document for /v1: what the server accepts and returns, route by route.

Written by hand next to the routes it describes, and checked against the running server
by a schemathesis test, so the two cannot drift apart unnoticed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .._version import __version__
from ..config import ARTIFACT_MEDIA_TYPES
from ..config_schema import job_config_schema

__all__ = ["openapi_document"]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


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
    out = {str(s): _json(_ref("Error"), text[s]) for s in statuses}
    if 429 in statuses:
        out["429"]["headers"] = {
            "Retry-After": {
                "description": "Seconds to wait",
                "required": True,
                "schema": {"type": "integer"},
            }
        }
    return out


NULLABLE_NUMBER = {"type": "number", "nullable": True}
NULLABLE_STRING = {"type": "string", "nullable": True}
PARTS_RECEIVED = {  # the same shape in every answer: the indices the server holds
    "type": "array",
    "items": {"type": "integer", "minimum": 0},
    "description": "indices of the parts the server holds, ascending (all of them once completed)",
}
AUTH: list[dict[str, list[str]]] = [{"bearer": []}]

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message", "hint", "retryable"],
                "properties": {
                    "code": {"type": "string"},
                    "message": {"type": "string"},
                    "hint": {"type": "string"},
                    "retryable": {"type": "boolean"},
                    "details": {"type": "object"},
                },
            }
        },
    },
    "Upload": {
        "type": "object",
        "required": [
            "upload_id",
            "filename",
            "size",
            "part_size",
            "parts_total",
            "parts_received",
            "parts_received_count",
            "state",
            "expires_at",
        ],
        "properties": {
            "upload_id": {"type": "string"},
            "filename": {"type": "string"},
            "size": {"type": "integer"},
            "sha256": NULLABLE_STRING,
            "fingerprint": NULLABLE_STRING,
            "part_size": {"type": "integer"},
            "parts_total": {"type": "integer"},
            "parts_received": PARTS_RECEIVED,
            "parts_received_count": {"type": "integer", "minimum": 0},
            "state": {"type": "string", "enum": ["open", "completed", "rejected", "expired"]},
            "file_id": NULLABLE_STRING,
            "created_at": {"type": "number"},
            "expires_at": {"type": "number"},
        },
    },
    "PartReceipt": {
        "type": "object",
        "required": ["index", "size", "sha256", "parts_received", "parts_received_count"],
        "properties": {
            "index": {"type": "integer"},
            "size": {"type": "integer"},
            "sha256": {"type": "string"},
            "parts_received": PARTS_RECEIVED,
            "parts_received_count": {"type": "integer", "minimum": 0},
        },
    },
    "File": {
        "type": "object",
        "required": ["file_id", "filename", "size", "sha256", "shape", "voxel_size", "dtype"],
        "properties": {
            "file_id": {"type": "string"},
            "filename": {"type": "string"},
            "size": {"type": "integer"},
            "sha256": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer"}},
            "voxel_size": {"type": "array", "items": {"type": "number"}},
            "dtype": {"type": "string"},
            "created_at": {"type": "number"},
        },
    },
    "JobSubmit": {
        "type": "object",
        "description": "exactly one of file_id (an upload) or server_path (under a root)",
        "additionalProperties": False,
        "properties": {
            "file_id": {"type": "string"},
            "server_path": {"type": "string", "minLength": 1},
            "config": _ref("JobConfig"),
            "notify_url": {
                "type": "string",
                "maxLength": 2048,
                "pattern": "^https?://",
                "description": "http(s) URL the server POSTs the job record to when the job "
                "ends (signed; see docs/server.md, Webhooks); only destinations the operator "
                "allows (--webhook-allow), else 422 webhook_not_allowed",
            },
        },
        "oneOf": [{"required": ["file_id"]}, {"required": ["server_path"]}],
    },
    "Progress": {
        "type": "object",
        "nullable": True,
        "properties": {
            "fraction": {"type": "number"},
            "tiles_done": {"type": "integer"},
            "tiles_total": {"type": "integer"},
            "eta_s": NULLABLE_NUMBER,
        },
    },
    "Job": {
        "type": "object",
        "required": [
            "id",
            "state",
            "owner",
            "created_at",
            "source",
            "config",
            "model",
            "artifacts",
        ],
        "properties": {
            "id": {"type": "string"},
            "state": {
                "type": "string",
                "enum": ["queued", "running", "previewing", "completed", "failed", "canceled"],
            },
            "owner": {"type": "string"},
            "created_at": {"type": "number"},
            "started_at": NULLABLE_NUMBER,
            "finished_at": NULLABLE_NUMBER,
            "device": NULLABLE_STRING,
            "queue_position": {"type": "integer", "nullable": True},
            "source": {"type": "object"},
            "config": _ref("JobConfigRecord"),
            "model": {
                "type": "object",
                "required": ["name", "sha256"],
                "properties": {"name": {"type": "string"}, "sha256": NULLABLE_STRING},
            },
            "progress": _ref("Progress"),
            "error": {
                "type": "object",
                "nullable": True,
                "description": "why a failed job failed",
                "required": ["code", "message", "hint", "retryable"],
                "properties": {
                    "code": {"type": "string"},
                    "message": {"type": "string"},
                    "hint": {"type": "string"},
                    "retryable": {"type": "boolean"},
                },
            },
            "artifacts": {
                "type": "object",
                "additionalProperties": {
                    "type": "object",
                    "required": ["url", "sha256", "size", "expires_at"],
                    "properties": {
                        "url": {"type": "string"},
                        "sha256": {"type": "string"},
                        "size": {"type": "integer"},
                        "expires_at": {"type": "integer"},
                    },
                },
            },
            "notify_url": NULLABLE_STRING,
            "webhook": {
                "type": "object",
                "nullable": True,
                "description": "the delivery of the job's webhook, once the job has ended",
                "required": ["state", "attempts", "created_at", "next_at"],
                "properties": {
                    "state": {"type": "string", "enum": ["pending", "delivered", "failed"]},
                    "attempts": {"type": "integer"},
                    "created_at": {"type": "number"},
                    "next_at": {"type": "number"},
                    "delivered_at": NULLABLE_NUMBER,
                    "last_error": NULLABLE_STRING,
                },
            },
        },
    },
    "JobList": {
        "type": "object",
        "required": ["jobs"],
        "properties": {"jobs": {"type": "array", "items": _ref("Job")}},
    },
    "ServerInfo": {
        "type": "object",
        "required": ["version", "devices", "models", "limits"],
        "properties": {
            "version": {"type": "string"},
            "devices": {"type": "array", "items": {"type": "string"}},
            "models": {"type": "array", "items": {"type": "object"}},
            "roots": {"type": "array", "items": {"type": "string"}},
            "limits": {"type": "object"},
        },
    },
}

_ID = {"type": "string"}
# The upload's file name. The server keeps only its base name (after the last / or \, "."
# segments dropped), which must not be "." or "..", holds at most 255 characters and no NUL,
# and the whole name must not be blank: exactly the rule in uploads.py, as a regex.
_WS = r"\t\n\x0b\x0c\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_CH, _NOT_DOT, _SEP = r"[^/\\\x00]", r"[^/\\\x00.]", r"[/\\]"
_NAME = rf"(?:{_NOT_DOT}{_CH}{{0,254}}|\.{_NOT_DOT}{_CH}{{0,253}}|\.\.{_CH}{{1,253}})"
_NAME_NOT_BLANK = (
    rf"(?:[^{_WS}/\\\x00.]{_CH}{{0,254}}|[{_WS}]{{1,254}}[^{_WS}/\\\x00]{_CH}{{0,253}}"
    rf"|\.{_NOT_DOT}{_CH}{{0,253}}|\.\.{_CH}{{1,253}})"
)
FILENAME_PATTERN = (
    rf"^(?:[\s\S]*{_SEP}{_NAME}(?:{_SEP}\.?)*|{_NAME}(?:{_SEP}\.?)+|{_NAME_NOT_BLANK})$"
)


def _upload_init_schema(settings) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["filename", "size"],
        "properties": {
            "filename": {
                "type": "string",
                "pattern": FILENAME_PATTERN,
                "description": "the file's name; a folder part is dropped",
            },
            "size": {
                "type": "integer",
                "minimum": 1,
                **({"maximum": settings.max_upload_bytes} if settings else {}),
            },
            "sha256": {
                "type": "string",
                "pattern": "^[0-9a-f]{64}$",
                "nullable": True,
                "description": "the whole file's SHA-256: resumes by it, checked at complete",
            },
            "fingerprint": {
                "type": "string",
                "pattern": "^[0-9a-f]{64}$",
                "nullable": True,
                "description": "a cheap name for the content (the remote executor samples "
                "the file); resumes by it, and complete must then carry the sha256",
            },
            "part_size": {
                "type": "integer",
                "minimum": settings.part_size_min if settings else 8 << 20,
                "maximum": settings.part_size_max if settings else 32 << 20,
            },
        },
    }


def _job_config_schema(models: Sequence[str], devices: Sequence[str]) -> dict[str, Any]:
    """cryomamba.JobConfig as JSON Schema, generated from the dataclass and its rules, with
    this server's models and devices."""
    return job_config_schema(models=models, devices=devices)


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
    schemas = {
        **SCHEMAS,
        "UploadInit": _upload_init_schema(settings),
        "UploadComplete": {
            "type": "object",
            "properties": {
                "sha256": {
                    "type": "string",
                    "pattern": "^[0-9a-f]{64}$",
                    "description": "the whole file's SHA-256; required for an upload started "
                    "with a fingerprint and no sha256",
                }
            },
        },
        "JobConfig": _job_config_schema(models, devices),
        # A job keeps the config it was submitted with, even after a restart with other
        # models or devices: records are checked against the general rules only.
        "JobConfigRecord": _job_config_schema((), ()),
    }
    if settings is not None and not settings.webhook_allow:  # no notify_url is accepted
        submit = schemas["JobSubmit"]
        notify = {"not": {}, "description": "this server sends no webhooks (no --webhook-allow)"}
        schemas["JobSubmit"] = {
            **submit,
            "properties": {**submit["properties"], "notify_url": notify},
        }
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
                    "200": _json(_ref("ServerInfo"), "Server info"),
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
                    "content": {"application/json": {"schema": _ref("UploadInit")}},
                },
                "responses": {
                    "200": _linked(_json(_ref("Upload"), "Resumed"), UPLOAD_LINKS),
                    "201": _linked(_json(_ref("Upload"), "Created"), UPLOAD_LINKS),
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
                    "200": _json(_ref("Upload"), "The upload"),
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
                    "200": _json(_ref("PartReceipt"), "Stored"),
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
                    "content": {"application/json": {"schema": _ref("UploadComplete")}},
                },
                "responses": {
                    "200": _linked(_json(_ref("File"), "Already complete"), FILE_LINKS),
                    "201": _linked(_json(_ref("File"), "Complete"), FILE_LINKS),
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
                    "content": {"application/json": {"schema": _ref("JobSubmit")}},
                },
                "responses": {
                    "201": _linked(_json(_ref("Job"), "Queued"), JOB_LINKS),
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
                "responses": {"200": _json(_ref("JobList"), "Jobs"), **_errors(401, 403, 422, 429)},
            },
        },
        "/v1/jobs/{job_id}": {
            "get": {
                "operationId": "getJob",
                "summary": "One job's record",
                "security": AUTH,
                "parameters": [_path_param("job_id")],
                "responses": {"200": _json(_ref("Job"), "The job"), **_errors(401, 403, 404, 429)},
            },
            "delete": {
                "operationId": "cancelJob",
                "summary": "Cancel a queued or running job",
                "security": AUTH,
                "parameters": [_path_param("job_id")],
                "responses": {
                    "202": _json(_ref("Job"), "Cancel requested"),
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
