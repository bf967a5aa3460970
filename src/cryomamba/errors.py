"""Errors that carry a stable code, a message that says what is wrong, and a hint for what to do.

Every error a user can cause derives from `CryoMambaError`; the CLI prints it as one line,
the server turns it into `{"error": {"code", "message", "hint", "retryable"}}`.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "CryoMambaError",
    "InvalidVolumeError",
    "JobCanceledError",
    "JobFailedError",
    "ModelError",
    "OutputError",
]


class CryoMambaError(Exception):
    """Base class: `code` is machine-readable, `hint` tells the user what to do next."""

    code: str = "error"
    retryable: bool = False

    def __init__(self, message: str, *, hint: str = "", code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class InvalidVolumeError(CryoMambaError, ValueError):
    """A file or array that cannot be used as a tomogram (corrupt, truncated, wrong shape...)."""

    code = "invalid_volume"


class ConfigError(CryoMambaError, ValueError):
    """A job setting with a value that is out of range or of the wrong type."""

    code = "invalid_config"


class ModelError(CryoMambaError, ValueError):
    """An unknown model name, or a model folder that is incomplete or inconsistent."""

    code = "invalid_model"


class OutputError(CryoMambaError, OSError):
    """An output location that cannot be written."""

    code = "output_not_writable"


class JobFailedError(CryoMambaError, RuntimeError):
    """Raised by `Job.result()` when the job ended in `Failed`."""

    code = "job_failed"

    def __init__(
        self, message: str, *, hint: str = "", code: str | None = None, retryable: bool = False
    ) -> None:
        super().__init__(message, hint=hint, code=code)
        self.retryable = retryable


class JobCanceledError(CryoMambaError, RuntimeError):
    """Raised by `Job.result()` when the job was canceled."""

    code = "canceled"
