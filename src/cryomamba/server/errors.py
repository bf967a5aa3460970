"""`ApiError` and the one error envelope every route answers with.

`{"error": {"code", "message", "hint", "retryable"}}` plus the right HTTP status; core
`CryoMambaError`s map to 422 (bad input) so the server and the library speak the same codes.
"""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

from ..errors import CryoMambaError

__all__ = ["ERROR_CODE_HEADER", "ApiError", "error_response"]


class ApiError(Exception):
    """An error a client caused or can act on; `status` is its HTTP status code."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        hint: str = "",
        *,
        retryable: bool = False,
        headers: dict[str, str] | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.hint = status, code, message, hint
        self.retryable = retryable
        self.headers = headers or {}
        self.details = details

    @classmethod
    def from_core(cls, exc: CryoMambaError, status: int = 422) -> ApiError:
        return cls(status, exc.code, exc.message, exc.hint, retryable=exc.retryable)

    def envelope(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "code": self.code,
            "message": self.message,
            "hint": self.hint,
            "retryable": self.retryable,
        }
        if self.details is not None:
            body["details"] = self.details
        return {"error": body}


ERROR_CODE_HEADER = "x-cryomamba-error-code"


def error_response(exc: ApiError) -> JSONResponse:
    """The envelope as a response. It carries the code in `ERROR_CODE_HEADER` too, which the
    request middleware counts (`cryomamba_http_errors`) and removes before it is sent."""
    headers = {**exc.headers, ERROR_CODE_HEADER: exc.code}
    return JSONResponse(exc.envelope(), status_code=exc.status, headers=headers)


def not_found(what: str, ident: str) -> ApiError:
    return ApiError(
        404,
        "not_found",
        f"no {what} {ident!r}",
        f"check the {what} id (it may belong to another user, or have expired)",
    )
