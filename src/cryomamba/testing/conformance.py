"""Conformance suites every executor and sink must pass (STYLE §5).

Subclass in your plugin's tests and provide the fixtures; add only what is special to you::

    class TestMyExecutor(ExecutorTests):
        @pytest.fixture
        def executor(self):
            ex = MyExecutor(...)
            yield ex
            ex.close()

`ExecutorTests` needs the fixtures `executor`, `model` (a model name or folder the executor
can run) and `volume_source` (something its `submit` accepts: a path, a Volume, an array).

`SinkTests` needs the fixtures `sink` and `result` (a `Segmentation`), and the method
`assert_handled(sink, event)`, which checks what the sink did with `event` (a sink that
ignores an event type says so there, and the check is that nothing happened).

The cancel tests pause the job inside its own thread (through `Job(record=...)`, which
every executor feeds when given `submit(..., job=job)`) until the test has asked to cancel,
so the request always lands while the job is running or queued: an executor whose cancel
does nothing ends `completed`, and fails them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from ..config import JobConfig
from ..errors import JobCanceledError, JobFailedError
from ..events import Canceled, Completed, Event, Failed, Preview, Progress
from ..job import Job, JobState
from ..segmentation import Segmentation

__all__ = ["ExecutorTests", "SinkTests"]

_GATE_TIMEOUT_S = 120.0


def gated_job(release: Callable[[], bool]) -> tuple[Job, threading.Event]:
    """A job whose first Progress holds its emitting thread until `release()` is true.

    Returns the job and an event set once the job is held there (it is then running).
    """
    held = threading.Event()

    def record(event: Event) -> Event:
        if isinstance(event, Progress) and not held.is_set():
            held.set()
            deadline = time.monotonic() + _GATE_TIMEOUT_S
            while not release() and time.monotonic() < deadline:
                time.sleep(0.01)
        return event

    return Job(record=record), held


class ExecutorTests:
    """Behaviour every executor shares: events, order, result, errors, cancel."""

    def config(self, model: Any, **changes: Any) -> JobConfig:
        return JobConfig(model=str(model), preview_interval_s=0.001, preview_scale=2, **changes)

    def long_config(self, model: Any) -> JobConfig:
        """A config with enough work (8-fold mirroring, dense tiles) that a cancel sent to a
        server from the client still finds the job running there."""
        return self.config(model, mirroring=True, tile_step=0.25)

    def test_events_arrive_in_order_and_end_with_completed(
        self, executor: Any, model: Any, volume_source: Any
    ) -> None:
        job = executor.submit(volume_source, self.config(model))
        assert isinstance(job, Job)
        events = list(job.events(timeout=120))
        kinds = [type(e) for e in events]
        assert kinds[-1] is Completed, events[-1]
        assert Progress in kinds and Preview in kinds
        assert kinds.index(Preview) < len(kinds) - 1  # previews arrive before completion
        fractions = [e.fraction for e in events if isinstance(e, Progress)]
        assert fractions == sorted(fractions) and fractions[-1] == 1.0
        assert job.state == JobState.COMPLETED

    def test_feeds_the_job_it_is_given(self, executor: Any, model: Any, volume_source: Any) -> None:
        given = Job("given-by-the-caller")
        job = executor.submit(volume_source, self.config(model), job=given)
        assert job is given and job.id == "given-by-the-caller"
        assert isinstance(job.result(120), Segmentation)
        assert isinstance(job.terminal_event, Completed) and job.last_progress is not None

    def test_result_is_aligned_with_the_source(
        self, executor: Any, model: Any, volume_source: Any
    ) -> None:
        result = executor.submit(volume_source, self.config(model)).result(120)
        from ..sources import open_source

        source = open_source(volume_source)
        assert result.labels.shape == source.shape
        assert result.labels.dtype == np.uint8
        assert result.voxel_size == source.voxel_size
        assert result.origin == source.origin
        assert result.provenance["model"]["sha256"]

    def test_previews_are_downsampled_uint8(
        self, executor: Any, model: Any, volume_source: Any
    ) -> None:
        job = executor.submit(volume_source, self.config(model))
        previews = [e for e in job.events(timeout=120) if isinstance(e, Preview)]
        assert previews
        last = previews[-1]
        expected = tuple(-(-s // last.scale) for s in last.shape)
        assert last.labels.shape == expected and last.labels.dtype == np.uint8

    def test_same_input_same_labels(self, executor: Any, model: Any, volume_source: Any) -> None:
        a = executor.submit(volume_source, self.config(model)).result(120)
        b = executor.submit(volume_source, self.config(model)).result(120)
        np.testing.assert_array_equal(np.asarray(a.labels), np.asarray(b.labels))

    def test_unknown_model_fails_with_a_clear_error(
        self, executor: Any, volume_source: Any
    ) -> None:
        job = executor.submit(volume_source, JobConfig(model="no-such-model-xyz"))
        events = list(job.events(timeout=60))
        assert isinstance(events[-1], Failed)
        assert events[-1].code == "invalid_model" and "no-such-model-xyz" in events[-1].message
        with pytest.raises(JobFailedError, match="no-such-model-xyz"):
            job.result(1)

    def test_cancel_while_running(self, executor: Any, model: Any, volume_source: Any) -> None:
        job, held = gated_job(lambda: job.cancel_requested.is_set())
        executor.submit(volume_source, self.long_config(model), job=job)
        assert held.wait(120), "the job never reported progress"
        assert job.cancel() is True
        assert job.wait(120)
        assert job.state == JobState.CANCELED, job.terminal_event  # never `completed`
        assert isinstance(job.terminal_event, Canceled)
        with pytest.raises(JobCanceledError):
            job.result(1)

    def test_cancel_while_queued(self, executor: Any, model: Any, volume_source: Any) -> None:
        canceled = threading.Event()
        first, held = gated_job(canceled.is_set)  # holds its thread until the second is canceled
        executor.submit(volume_source, self.config(model), job=first)
        try:
            assert held.wait(120), "the first job never reported progress"
            second = executor.submit(volume_source, self.long_config(model))
            assert second.cancel() is True
        finally:
            canceled.set()
        assert second.wait(120)
        assert second.state == JobState.CANCELED, second.terminal_event  # never `completed`
        assert isinstance(second.terminal_event, Canceled)
        first.result(120)  # the first one is not disturbed


class SinkTests:
    """Behaviour every sink shares: it takes every event type, each to some effect the
    subclass checks in `assert_handled`, and does not block for long."""

    def assert_handled(self, sink: Any, event: Event) -> None:
        """Check what `sink` did with `event` (each sink's tests say what it does)."""
        raise NotImplementedError(f"{type(self).__name__} must define assert_handled")

    def events(self, result: Segmentation) -> list[Event]:
        labels = np.zeros((2, 2, 2), np.uint8)
        return [
            Progress(fraction=0.5, tiles_done=1, tiles_total=2),
            Preview(scale=2, shape=(2, 2, 2), labels=labels[:1, :1, :1]),
            Completed(result=result),
        ]

    def terminal(self, end: str, result: Segmentation) -> Event:
        if end == "completed":
            return Completed(result=result)
        if end == "failed":
            return Failed(code="gpu_oom", message="CUDA ran out of memory", hint="tile_batch=1")
        return Canceled()

    @pytest.mark.parametrize("end", ["completed", "failed", "canceled"])
    def test_handles_every_event_type(self, sink: Any, result: Segmentation, end: str) -> None:
        for event in [*self.events(result)[:2], self.terminal(end, result)]:
            assert sink.handle(event) is None
            self.assert_handled(sink, event)

    def test_handle_returns_promptly_from_another_thread(
        self, sink: Any, result: Segmentation
    ) -> None:
        done = threading.Event()

        def run() -> None:
            for event in self.events(result)[:2]:
                sink.handle(event)
            done.set()

        start = time.monotonic()
        threading.Thread(target=run).start()
        assert done.wait(10), "a sink must not block on progress or previews"
        assert time.monotonic() - start < 10
