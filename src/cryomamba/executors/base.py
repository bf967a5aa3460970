"""The executor interface and lookup by name through the plugin registry."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from ..config import JobConfig
from ..errors import ConfigError
from ..job import Job

__all__ = ["Executor", "get_executor"]


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
