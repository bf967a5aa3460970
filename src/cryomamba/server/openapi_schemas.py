"""The OpenAPI document's components: the JSON bodies /v1 accepts and returns, by name."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..config_schema import job_config_schema

__all__ = ["FILENAME_PATTERN", "SCHEMAS", "component_schemas", "ref"]


def ref(name: str) -> dict[str, str]:
    """A reference to the component schema `name`."""
    return {"$ref": f"#/components/schemas/{name}"}


NULLABLE_NUMBER = {"type": "number", "nullable": True}
NULLABLE_STRING = {"type": "string", "nullable": True}
PARTS_RECEIVED = {  # the same shape in every answer: the indices the server holds
    "type": "array",
    "items": {"type": "integer", "minimum": 0},
    "description": "indices of the parts the server holds, ascending (all of them once completed)",
}

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
            "config": ref("JobConfig"),
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
            "config": ref("JobConfigRecord"),
            "model": {
                "type": "object",
                "required": ["name", "sha256"],
                "properties": {"name": {"type": "string"}, "sha256": NULLABLE_STRING},
            },
            "progress": ref("Progress"),
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
        "properties": {"jobs": {"type": "array", "items": ref("Job")}},
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


def component_schemas(
    settings=None, *, models: Sequence[str] = (), devices: Sequence[str] = ()
) -> dict[str, Any]:
    """Every component schema, narrowed to one server (its upload limits, models, devices)."""
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
    return schemas
