"""`Job`: the handle every executor returns, and the state machine they all share.

An executor only calls `Job.emit(event)` (and `set_state` for queued → running); the job
keeps the state, fans events out to subscribers and sinks, and answers `result()`.
Subscribers coalesce: a slow reader gets the latest Progress and the latest Preview, never
a backlog, so no consumer can slow inference down.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from enum import Enum
from typing import TYPE_CHECKING

from .errors import JobCanceledError, JobFailedError
from .events import Canceled, Completed, Event, Failed, Preview, Progress

if sys.version_info >= (3, 11):
    from enum import StrEnum
else:  # pragma: no cover - Python 3.10

    class StrEnum(str, Enum):
        def __str__(self) -> str:
            return str(self.value)

        def __format__(self, spec: str) -> str:
            return format(str(self.value), spec)


if TYPE_CHECKING:
    from .segmentation import Segmentation
    from .sinks.base import Sink

__all__ = ["TERMINAL_STATES", "Job", "JobState"]

log = logging.getLogger(__name__)


class JobState(StrEnum):
    """The states of a job; `TERMINAL` ones never change again.

    Members are strings (`JobState.RUNNING == "running"`), which is what the server stores
    and sends, so a state read back from JSON or SQLite compares equal to its member.
    """

    QUEUED = "queued"
    RUNNING = "running"
    PREVIEWING = "previewing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES

    @classmethod
    def allowed(cls, current: str, new: str) -> bool:
        return new == current or new in _NEXT.get(JobState(current), ())


TERMINAL_STATES: frozenset[JobState] = frozenset(
    {JobState.COMPLETED, JobState.FAILED, JobState.CANCELED}
)
_NEXT: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.FAILED, JobState.CANCELED}),
    JobState.RUNNING: frozenset(
        {JobState.PREVIEWING, JobState.COMPLETED, JobState.FAILED, JobState.CANCELED}
    ),
    JobState.PREVIEWING: frozenset({JobState.COMPLETED, JobState.FAILED, JobState.CANCELED}),
}


class _Subscription:
    """One reader's pending events; Progress and Preview are replaced, never queued up."""

    def __init__(self) -> None:
        self._pending: deque[Event] = deque()
        self._cond = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    def put(self, event: Event) -> None:
        with self._cond:
            if isinstance(event, (Progress, Preview)):
                for i, old in enumerate(self._pending):
                    if type(old) is type(event):
                        del self._pending[i]
                        break
            self._pending.append(event)
            self._cond.notify_all()
            waiters = list(self._waiters)
        for loop, flag in waiters:
            try:
                loop.call_soon_threadsafe(flag.set)
            except RuntimeError:  # loop closed: the async reader is gone
                pass

    def get(self, timeout: float | None = None) -> Event | None:
        with self._cond:
            if not self._cond.wait_for(lambda: bool(self._pending), timeout):
                return None
            return self._pending.popleft()

    def get_nowait(self) -> Event | None:
        with self._cond:
            return self._pending.popleft() if self._pending else None

    def add_async_waiter(self, loop: asyncio.AbstractEventLoop, flag: asyncio.Event) -> None:
        with self._cond:
            self._waiters.append((loop, flag))
            if self._pending:
                loop.call_soon_threadsafe(flag.set)

    def remove_async_waiter(self, flag: asyncio.Event) -> None:
        with self._cond:
            self._waiters = [(lp, f) for lp, f in self._waiters if f is not flag]


class Job:
    """A running or finished segmentation: state, events, cancel, result."""

    def __init__(
        self,
        job_id: str | None = None,
        *,
        on_cancel: Callable[[], None] | None = None,
        sinks: Iterable[Sink] = (),
        record: Callable[[Event], Event | None] | None = None,
    ) -> None:
        """`record`, when given, sees every event first, in the emitting thread, and returns
        the event readers get (or None to publish nothing): the server writes each state
        change to its database there, before any WebSocket reader hears of it."""
        self.id = job_id or uuid.uuid4().hex
        self.created_at = time.time()
        self._state = JobState.QUEUED
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._cancel_requested = threading.Event()
        self._on_cancel = on_cancel
        self._record = record
        self._subs: list[_Subscription] = []
        self._last_progress: Progress | None = None
        self._last_preview: Preview | None = None
        self._terminal: Event | None = None
        self._sink_threads: list[threading.Thread] = []
        self.sink_errors: list[BaseException] = []
        for sink in sinks:
            self.add_sink(sink)

    # -- what callers use -------------------------------------------------------------------
    @property
    def state(self) -> JobState:
        return self._state

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def cancel_requested(self) -> threading.Event:
        """Set when someone asked to cancel; executors poll it between tile batches."""
        return self._cancel_requested

    @property
    def last_progress(self) -> Progress | None:
        return self._last_progress

    @property
    def last_preview(self) -> Preview | None:
        return self._last_preview

    @property
    def terminal_event(self) -> Event | None:
        return self._terminal

    def cancel(self) -> bool:
        """Ask the job to stop; returns False when it had already ended."""
        if self.done:
            return False
        self._cancel_requested.set()
        if self._on_cancel is not None:
            self._on_cancel()
        return True

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """Iterate events until the terminal one (inclusive); late readers start from the latest."""
        sub = self._subscribe()
        try:
            while True:
                event = sub.get(timeout)
                if event is None:
                    raise TimeoutError(f"no event from job {self.id} within {timeout} s")
                yield event
                if event.terminal:
                    return
        finally:
            self._unsubscribe(sub)

    async def aevents(self) -> AsyncIterator[Event]:
        """Async twin of `events()`, for use inside an event loop (the server, napari)."""
        sub = self._subscribe()
        loop = asyncio.get_running_loop()
        flag = asyncio.Event()
        sub.add_async_waiter(loop, flag)
        try:
            while True:
                event = sub.get_nowait()
                if event is None:
                    flag.clear()
                    event = sub.get_nowait()
                    if event is None:
                        await flag.wait()
                        continue
                yield event
                if event.terminal:
                    return
        finally:
            sub.remove_async_waiter(flag)
            self._unsubscribe(sub)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job ends; True if it did within `timeout`."""
        return self._done.wait(timeout)

    def result(self, timeout: float | None = None) -> Segmentation:
        """The `Segmentation`, or raise `JobFailedError` / `JobCanceledError` / `TimeoutError`."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"job {self.id} did not finish within {timeout} s")
        for t in self._sink_threads:
            t.join(timeout)
        event = self._terminal
        if isinstance(event, Completed):
            if event.result is None:
                raise JobFailedError(
                    "the job completed but its result is not available here", code="no_result"
                )
            return event.result
        if isinstance(event, Failed):
            raise JobFailedError(
                event.message, hint=event.hint, code=event.code, retryable=event.retryable
            )
        raise JobCanceledError(f"job {self.id} was canceled")

    # -- what executors use -----------------------------------------------------------------
    def set_cancel_handler(self, on_cancel: Callable[[], None] | None) -> None:
        """What `cancel()` calls besides setting `cancel_requested` (for a job an executor was
        handed rather than made: the executor wires its own way of stopping work)."""
        self._on_cancel = on_cancel

    def set_state(self, state: str) -> None:
        """Move to a non-terminal state (terminal states come with their event via `emit`)."""
        with self._lock:
            if self._state in TERMINAL_STATES:
                return
            if not JobState.allowed(self._state, state):
                raise RuntimeError(f"job {self.id}: illegal transition {self._state} -> {state}")
            self._state = JobState(state)

    def emit(self, event: Event) -> None:
        """Record an event and hand it to every subscriber; nothing is accepted after the end."""
        if self._record is not None:
            if self.done:
                return
            recorded = self._record(event)
            if recorded is None:
                return
            event = recorded
        with self._lock:
            if self._state in TERMINAL_STATES:
                log.debug("job %s: dropping %s after the end", self.id, event.kind)
                return
            if isinstance(event, Progress):
                self._last_progress = event
                if self._state == JobState.QUEUED:
                    self._state = JobState.RUNNING
            elif isinstance(event, Preview):
                self._last_preview = event
                if self._state in (JobState.QUEUED, JobState.RUNNING):
                    self._state = JobState.PREVIEWING
            elif isinstance(event, Completed):
                self._state = JobState.COMPLETED
            elif isinstance(event, Failed):
                self._state = JobState.FAILED
            elif isinstance(event, Canceled):
                self._state = JobState.CANCELED
            if event.terminal:
                self._terminal = event
            subs = list(self._subs)
        for sub in subs:
            sub.put(event)
        if event.terminal:
            self._done.set()

    # -- internals ----------------------------------------------------------------------------
    def _subscribe(self) -> _Subscription:
        sub = _Subscription()
        with self._lock:
            for event in (self._last_progress, self._last_preview, self._terminal):
                if event is not None:
                    sub.put(event)
            self._subs.append(sub)
        return sub

    def _unsubscribe(self, sub: _Subscription) -> None:
        with self._lock:
            if sub in self._subs:
                self._subs.remove(sub)

    def add_sink(self, sink: Sink) -> None:
        """Feed a sink from its own thread: a slow sink misses previews, it never slows the job.

        It gets the latest progress and preview first, so a sink added late still sees them."""
        sub = self._subscribe()

        def pump() -> None:
            try:
                while True:
                    event = sub.get()
                    if event is None:
                        continue
                    try:
                        sink.handle(event)
                    except Exception as exc:  # a broken sink must not take the job down
                        log.exception("sink %r failed on %s", sink, event.kind)
                        self.sink_errors.append(exc)
                    if event.terminal:
                        return
            finally:
                self._unsubscribe(sub)

        thread = threading.Thread(target=pump, name=f"cryomamba-sink-{self.id[:8]}", daemon=True)
        thread.start()
        self._sink_threads.append(thread)

    def __repr__(self) -> str:
        return f"Job(id={self.id!r}, state={self._state!r})"
