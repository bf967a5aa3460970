"""Talking to a CryoMamba server from the widget: `GET /v1/server/info`, and what it says.

Kept apart from the Qt code so it is a plain function of a URL and a token. Errors come back
as `cryomamba.CryoMambaError` with the server's own code, message and hint (its error
envelope), or with a hint of ours when the server cannot be reached at all.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit

from cryomamba import CryoMambaError

__all__ = ["describe_server", "fetch_server_info"]

_UNREACHABLE_HINT = "check the URL and that `cryomamba serve` is running there"
_STATUS_HINTS = {
    401: "create a token on the server with `cryomamba token create` and paste it here",
    403: "this token lacks a scope: it needs read (and upload, submit to run jobs)",
    404: "is this the URL of a CryoMamba server? It should answer GET /v1/server/info",
}


def fetch_server_info(url: str, token: str | None, *, timeout_s: float = 10.0) -> dict[str, Any]:
    """The server's info (version, devices, models, limits); raises `CryoMambaError` on failure."""
    import httpx

    url = (url or "").strip().rstrip("/")
    if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc:
        raise CryoMambaError(
            f"the server URL must start with http:// or https://, got {url!r}",
            hint="e.g. http://127.0.0.1:8000 or https://gpu01:8443",
            code="invalid_config",
        )
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        resp = httpx.get(f"{url}/v1/server/info", headers=headers, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise CryoMambaError(
            f"cannot reach the CryoMamba server at {url}: {type(exc).__name__}: {exc}",
            hint=_UNREACHABLE_HINT,
            code="server_unreachable",
        ) from None
    if resp.status_code >= 400:
        raise _error_from(resp.status_code, resp.content, url)
    try:
        info = resp.json()
    except ValueError:
        info = None
    if not isinstance(info, dict) or "version" not in info:
        raise CryoMambaError(
            f"{url}/v1/server/info did not answer with a CryoMamba server description",
            hint="is this the URL of a CryoMamba server (not a proxy's page)?",
            code="not_a_server",
        )
    return info


def describe_server(info: dict[str, Any]) -> str:
    """One short paragraph for the widget: version, devices, model names."""
    models = ", ".join(m.get("name", "?") for m in info.get("models", ())) or "none"
    devices = ", ".join(info.get("devices", ())) or "none"
    return f"CryoMamba {info.get('version', '?')} · devices: {devices} · models: {models}"


def _error_from(status: int, body: bytes, url: str) -> CryoMambaError:
    """The server's `{"error": {code, message, hint}}` envelope, or one made from the status."""
    try:
        error = json.loads(body or b"").get("error")
    except (ValueError, AttributeError):
        error = None
    if isinstance(error, dict) and error.get("message"):
        return CryoMambaError(
            str(error["message"]),
            hint=str(error.get("hint") or _STATUS_HINTS.get(status, "")),
            code=str(error.get("code") or f"http_{status}"),
        )
    return CryoMambaError(
        f"{url}/v1/server/info answered HTTP {status}",
        hint=_STATUS_HINTS.get(status, _UNREACHABLE_HINT),
        code=f"http_{status}",
    )
