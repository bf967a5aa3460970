"""The audit log: one JSON line per state-changing action, on the `cryomamba.audit` logger.

Which requests are audited is decided here, from the matched route and method (`ACTIONS`),
so the routes only name the object they created (`note`); `RequestContextMiddleware` calls
`record` once per request, after the answer, with the outcome it saw. A request refused for
its token is one `auth.refused` line instead of its action's. A line holds the token's
subject, never the token; the path parameters, never a query string (a signed URL's
signature is there). `--audit-log PATH` writes the same lines to a file of their own
(server/logs.py).
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.requests import Request
from starlette.types import Scope

__all__ = ["ACTIONS", "action_for", "note", "record"]

audit_log = logging.getLogger("cryomamba.audit")

ACTIONS: dict[tuple[str, str], str] = {
    ("POST", "/v1/uploads/init"): "upload.init",
    ("POST", "/v1/uploads/{upload_id}/complete"): "upload.complete",
    ("POST", "/v1/jobs"): "job.submit",
    ("DELETE", "/v1/jobs/{job_id}"): "job.cancel",
    ("GET", "/v1/files/{job_id}/{artifact}"): "artifact.download",
    ("HEAD", "/v1/files/{job_id}/{artifact}"): "artifact.download",
}

AUTH_CODES = frozenset(
    {"missing_token", "invalid_token", "token_expired", "too_many_auth_failures"}
)


def action_for(method: str, route: str) -> str | None:
    """The audited action of a request to `route` (its path template), or None."""
    return ACTIONS.get((method, route))


def note(request: Request, object_id: str) -> None:
    """Name the object a route created (an upload's or a job's new id) for its audit line."""
    request.state.audit_object = object_id


def _object(params: dict[str, Any], scope: Scope) -> str | None:
    noted = scope.get("state", {}).get("audit_object")
    if noted:
        return str(noted)
    if "artifact" in params:
        return f"{params.get('job_id')}/{params['artifact']}"
    for key in ("upload_id", "job_id"):
        if key in params:
            return str(params[key])
    return None


def record(
    scope: Scope,
    action: str | None,
    params: dict[str, Any],
    status: int,
    error_code: str | None,
) -> None:
    """Write the audit line of one finished request, if it is audited.

    The outcome is `ok` (2xx/3xx, or an accepted WebSocket), `refused` (4xx, with the error
    code) or `failed` (5xx, or no answer at all)."""
    state = scope.get("state", {})
    auth_error = state.get("auth_error")
    if auth_error is not None and getattr(auth_error, "code", None) in AUTH_CODES:
        action, error_code, status = "auth.refused", auth_error.code, auth_error.status
    elif error_code in AUTH_CODES and "principal" not in state:
        action = "auth.refused"
    if action is None:
        return
    if 0 < status < 400 or status == 101:
        outcome = "ok"
    elif 400 <= status < 500:
        outcome = "refused"
    else:
        outcome = "failed"
    principal = state.get("principal")
    client = scope.get("client") or ("?", 0)
    fields = {
        "action": action,
        "subject": principal.subject if principal else None,
        "object": None if action == "auth.refused" else _object(params, scope),
        "client": client[0],
        "outcome": outcome,
        "code": error_code if outcome != "ok" else None,
        "status": status,
        "path": scope["path"],  # never the query string
        "request_id": state.get("request_id"),
    }
    audit_log.info("%s %s", action, outcome, extra={"fields": fields})
