"""`CallbackSink`: call a function with each event (`sinks=[print]` becomes one of these)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..events import Event

__all__ = ["CallbackSink"]


class CallbackSink:
    """Calls `fn(event)` for every event, or only for the event types in `kinds`."""

    def __init__(self, fn: Callable[[Event], Any], kinds: tuple[type[Event], ...] | None = None):
        self.fn = fn
        self.kinds = kinds

    def handle(self, event: Event) -> None:
        if self.kinds is None or isinstance(event, self.kinds):
            self.fn(event)

    def __repr__(self) -> str:
        return f"CallbackSink({getattr(self.fn, '__name__', self.fn)!r})"
