"""The executor interface and lookup by name through the plugin registry."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from ..config import JobConfig
from ..errors import ConfigError, CryoMambaError
from ..events import Failed
from ..job import Job

__all__ = ["Executor", "failure", "get_executor"]


@runtime_checkable
class Executor(Protocol):
    """Runs jobs; `submit` returns at once with a `Job` the caller can follow or cancel."""

    def submit(self, source: Any, config: JobConfig, sinks: Sequence[Any] = ()) -> Job: ...

    def close(self) -> None: ...


_shared: dict[tuple[str, tuple], Executor] = {}


def get_executor(name: str | Executor, **options: Any) -> Executor:
    """An executor instance: passed through, or built by the named factory (cached per options)."""
    if not isinstance(name, str):
        return name
    from .. import plugins

    registry = plugins.executors()
    if name not in registry:
        raise ConfigError(
            f"unknown executor {name!r}", hint=f"available: {', '.join(registry.names())}"
        )
    key = (name, tuple(sorted(options.items())))
    if key not in _shared:
        _shared[key] = registry.get(name)(**options)
    return _shared[key]


def failure(exc: BaseException, *, io_hint: str) -> Failed:
    """The `Failed` event for an exception that ended a job, the same for every executor.

    A CryoMamba error keeps its code and hint; a file or disk problem is `io_error` with
    `io_hint`; anything else is `internal_error` (a bug: the caller logs the traceback).
    """
    if isinstance(exc, CryoMambaError):
        return Failed(
            code=exc.code,
            message=exc.message,
            hint=exc.hint,
            retryable=bool(getattr(exc, "retryable", False)),
        )
    if isinstance(exc, OSError):  # a file that vanished, a disk that filled up...
        return Failed(code="io_error", message=str(exc), hint=io_hint, retryable=True)
    if isinstance(exc, MemoryError):
        return Failed(
            code="out_of_memory",
            message="the machine ran out of memory",
            hint="close other programs or run on a machine with more RAM",
            retryable=True,
        )
    return Failed(
        code="internal_error",
        message=f"{type(exc).__name__}: {exc}",
        hint="this is a bug in CryoMamba; please report it with the log",
    )


def is_bug(exc: BaseException) -> bool:
    """Whether `failure(exc)` is an internal error, whose traceback belongs in the log."""
    return not isinstance(exc, (CryoMambaError, OSError, MemoryError))
