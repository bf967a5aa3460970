"""Plain worker threads for the widget, with their results handed back to the Qt main thread.

(superqt's `thread_worker` is not used: it swaps the process-wide `warnings` hooks while it
runs.)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from qtpy.QtCore import QObject, Signal, Slot

__all__ = ["Background"]

log = logging.getLogger(__name__)


class _Relay(QObject):
    """Carries `(callback, value)` from worker threads to the Qt main thread (queued)."""

    call = Signal(object, object)

    def __init__(self, parent: QObject) -> None:
        super().__init__(parent)  # lives in the main thread, so its slot runs there
        self.call.connect(self._deliver)

    @Slot(object, object)
    def _deliver(self, fn: Callable[[Any], None], value: Any) -> None:
        fn(value)


class Background:
    """The widget's threads: start them, post values to the main thread, join them."""

    def __init__(self, parent: QObject) -> None:
        self._relay = _Relay(parent)
        self._threads: list[threading.Thread] = []

    def start(self, target: Callable[..., None], *args: Any, name: str) -> None:
        """Run `target(*args)` on a new daemon thread."""
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def call(self, fn: Callable[[], Any], done: Callable[[tuple[str, Any]], None]) -> None:
        """Run `fn` on a thread; `done(("ok", value) | ("error", exc))` runs on the main thread."""

        def target() -> None:
            try:
                outcome: tuple[str, Any] = ("ok", fn())
            except Exception as exc:
                outcome = ("error", exc)
            self.post(done, outcome)

        self.start(target, name="cryomamba-widget")

    def post(self, fn: Callable[[Any], None], value: Any) -> None:
        """Call `fn(value)` on the main thread (queued)."""
        try:
            self._relay.call.emit(fn, value)
        except RuntimeError:  # the widget is gone (viewer closed): nobody to tell
            log.debug("widget deleted; dropping %r", value)

    def wait(self, timeout: float = 60.0) -> bool:
        """Join the threads (for tests and shutdown); True if all ended."""
        deadline = time.monotonic() + timeout
        for thread in list(self._threads):
            thread.join(max(0.0, deadline - time.monotonic()))
        self._threads = [t for t in self._threads if t.is_alive()]
        return not self._threads
