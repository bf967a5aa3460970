"""The sink interface, and turning what a caller passes (`print`, "file", a sink) into a sink."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from ..events import Event

__all__ = ["Sink", "as_sink"]


@runtime_checkable
class Sink(Protocol):
    """Anything with `handle(event)`; called once per event it receives, from a sink thread."""

    def handle(self, event: Event) -> None: ...


def as_sink(obj: Sink | Callable[[Event], Any] | str) -> Sink:
    """A sink as is; a plain callable wrapped in `CallbackSink`; a name built from the registry."""
    from .callback import CallbackSink

    if isinstance(obj, str):
        from .. import plugins

        try:
            factory = plugins.sinks().get(obj)
        except KeyError as exc:
            raise ValueError(str(exc.args[0])) from None
        sink: Sink = factory()
        return sink
    if isinstance(obj, Sink):
        return obj
    if callable(obj):
        return CallbackSink(obj)
    raise TypeError(f"a sink must have handle(event) or be callable, got {type(obj).__name__}")
