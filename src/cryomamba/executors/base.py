"""The executor interface and lookup by name through the plugin registry.

An executor is `submit(source, config, sinks=(), *, job=None) -> Job` and `close()`. With
`job`, it feeds that job instead of making one: the server makes a job when it is queued
(so readers can follow it before it starts) and hands it to its executor when it runs, so
there is one job from queue to end. `job_for()` is the two lines every executor needs for
that; `ExecutorTests` in `cryomamba.testing` checks it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from ..config import JobConfig
from ..errors import ConfigError, CryoMambaError
from ..events import Failed
from ..job import Job

__all__ = ["Executor", "failure", "get_executor", "job_for", "make_executor"]


@runtime_checkable
class Executor(Protocol):
    """Runs jobs; `submit` returns at once with a `Job` the caller can follow or cancel."""

    def submit(
        self, source: Any, config: JobConfig, sinks: Sequence[Any] = (), *, job: Job | None = None
    ) -> Job: ...

    def close(self) -> None: ...


_shared: dict[tuple[str, tuple[tuple[str, Any], ...]], Executor] = {}


def get_executor(name: str | Executor, **options: Any) -> Executor:
    """An executor instance: passed through, or built by the named factory (cached per options).

    The cached instance is shared by every caller that names it: never `close()` one got
    here; use `make_executor` for an executor of your own (the server's runner does).
    """
    if not isinstance(name, str):
        return name
    key = (name, tuple(sorted(options.items())))
    if key not in _shared:
        _shared[key] = make_executor(name, **options)
    return _shared[key]


def make_executor(name: str, **options: Any) -> Executor:
    """A new executor from the factory registered as `name`; the caller owns (and closes) it."""
    from .. import plugins

    registry = plugins.executors()
    if name not in registry:
        raise ConfigError(
            f"unknown executor {name!r}", hint=f"available: {', '.join(registry.names())}"
        )
    executor: Executor = registry.get(name)(**options)
    return executor


def job_for(
    job: Job | None, sinks: Sequence[Any] = (), on_cancel: Callable[[], None] | None = None
) -> Job:
    """The job an executor feeds: the caller's `job` (given its sinks and cancel handler), or a
    new one. Every executor's `submit` starts with this."""
    from ..sinks.base import as_sink

    if job is None:
        return Job(on_cancel=on_cancel, sinks=[as_sink(s) for s in sinks])
    job.set_cancel_handler(on_cancel)
    for sink in sinks:
        job.add_sink(as_sink(sink))
    return job


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
