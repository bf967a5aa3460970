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
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from ..config import JobConfig
from ..errors import JobCanceledError, JobFailedError
from ..events import Canceled, Completed, Failed, Preview, Progress
from ..job import Job, JobState

__all__ = ["ExecutorTests", "SinkTests"]


class ExecutorTests:
    """Behaviour every executor shares: events, order, result, errors, cancel."""

    def config(self, model, **changes) -> JobConfig:
        return JobConfig(model=str(model), preview_interval_s=0.001, preview_scale=2, **changes)

    def test_events_arrive_in_order_and_end_with_completed(self, executor, model, volume_source):
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

    def test_result_is_aligned_with_the_source(self, executor, model, volume_source):
        result = executor.submit(volume_source, self.config(model)).result(120)
        from ..sources import open_source

        source = open_source(volume_source)
        assert result.labels.shape == source.shape
        assert result.labels.dtype == np.uint8
        assert result.voxel_size == source.voxel_size
        assert result.origin == source.origin
        assert result.provenance["model"]["sha256"]

    def test_previews_are_downsampled_uint8(self, executor, model, volume_source):
        job = executor.submit(volume_source, self.config(model))
        previews = [e for e in job.events(timeout=120) if isinstance(e, Preview)]
        assert previews
        last = previews[-1]
        expected = tuple(-(-s // last.scale) for s in last.shape)
        assert last.labels.shape == expected and last.labels.dtype == np.uint8

    def test_same_input_same_labels(self, executor, model, volume_source):
        a = executor.submit(volume_source, self.config(model)).result(120)
        b = executor.submit(volume_source, self.config(model)).result(120)
        np.testing.assert_array_equal(np.asarray(a.labels), np.asarray(b.labels))

    def test_unknown_model_fails_with_a_clear_error(self, executor, volume_source):
        job = executor.submit(volume_source, JobConfig(model="no-such-model-xyz"))
        events = list(job.events(timeout=60))
        assert isinstance(events[-1], Failed)
        assert events[-1].code == "invalid_model" and "no-such-model-xyz" in events[-1].message
        with pytest.raises(JobFailedError, match="no-such-model-xyz"):
            job.result(1)

    def test_cancel_while_running(self, executor, model, volume_source):
        job = executor.submit(volume_source, self.config(model))
        for event in job.events(timeout=120):
            if isinstance(event, Progress):
                job.cancel()
                break
        assert job.wait(60)
        assert job.state in (JobState.CANCELED, JobState.COMPLETED)  # it may just have finished
        if job.state == JobState.CANCELED:
            with pytest.raises(JobCanceledError):
                job.result(1)

    def test_cancel_while_queued(self, executor, model, volume_source):
        first = executor.submit(volume_source, self.config(model))
        second = executor.submit(volume_source, self.config(model))
        second.cancel()
        assert second.wait(120)
        assert isinstance(second.terminal_event, Canceled) or second.state == JobState.COMPLETED
        first.result(120)


class SinkTests:
    """Behaviour every sink shares: it takes every event type and does not block for long."""

    def events(self, result):
        labels = np.zeros((2, 2, 2), np.uint8)
        return [
            Progress(fraction=0.5, tiles_done=1, tiles_total=2),
            Preview(scale=2, shape=(2, 2, 2), labels=labels[:1, :1, :1]),
            Completed(result=result),
        ]

    def test_handles_every_event_type(self, sink, result):
        for event in self.events(result):
            sink.handle(event)

    def test_handle_returns_promptly_from_another_thread(self, sink, result):
        done = threading.Event()

        def run():
            for event in self.events(result)[:2]:
                sink.handle(event)
            done.set()

        start = time.monotonic()
        threading.Thread(target=run).start()
        assert done.wait(10), "a sink must not block on progress or previews"
        assert time.monotonic() - start < 10
