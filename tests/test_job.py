"""The Job state machine, event fan-out with coalescing, sinks, cancel and result."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from cryomamba import (
    Canceled,
    Completed,
    Failed,
    Job,
    JobCanceledError,
    JobFailedError,
    JobState,
    Preview,
    Progress,
    Segmentation,
)


def _progress(i: int, n: int = 10) -> Progress:
    return Progress(fraction=i / n, tiles_done=i, tiles_total=n)


def _result() -> Segmentation:
    return Segmentation(labels=np.zeros((2, 2, 2), np.uint8), voxel_size=(1.0, 1.0, 1.0))


def test_states_follow_events():
    job = Job()
    assert job.state == JobState.QUEUED
    job.emit(_progress(1))
    assert job.state == JobState.RUNNING
    job.emit(Preview(scale=2, shape=(2, 2, 2), labels=np.zeros((1, 1, 1), np.uint8)))
    assert job.state == JobState.PREVIEWING
    job.emit(Completed(result=_result()))
    assert job.state == JobState.COMPLETED and job.done


def test_nothing_changes_after_the_terminal_event():
    job = Job()
    job.emit(Failed(code="x", message="boom"))
    job.emit(Completed(result=_result()))
    job.emit(_progress(3))
    assert job.state == JobState.FAILED
    assert job.last_progress is None
    with pytest.raises(RuntimeError, match="illegal"):
        Job().set_state(JobState.COMPLETED)


def test_events_end_with_the_terminal_event_and_late_readers_get_the_latest():
    job = Job()
    for i in range(5):
        job.emit(_progress(i))
    job.emit(Canceled())
    late = list(job.events(timeout=1))
    assert [type(e) for e in late] == [Progress, Canceled]
    assert late[0].tiles_done == 4


def test_a_slow_reader_gets_coalesced_progress_and_previews_never_a_backlog():
    job = Job()
    seen: list = []
    started = threading.Event()

    def reader():
        for event in job.events(timeout=5):
            started.set()
            seen.append(event)
            time.sleep(0.05)

    # first event so the reader is subscribed before the burst
    job.emit(_progress(0, 1000))
    t = threading.Thread(target=reader)
    t.start()
    started.wait(2)
    for i in range(1, 1000):
        job.emit(_progress(i, 1000))
        job.emit(Preview(scale=2, shape=(2, 2, 2), labels=np.full((1, 1, 1), i % 250, np.uint8)))
    job.emit(Completed(result=_result()))
    t.join(5)
    assert isinstance(seen[-1], Completed)
    assert len(seen) < 20  # 2000 events were emitted; the reader saw a handful
    progress = [e for e in seen if isinstance(e, Progress)]
    assert progress[-1].tiles_done == 999  # but always the latest


def test_async_events():
    job = Job()

    async def consume():
        return [e async for e in job.aevents()]

    def producer():
        time.sleep(0.05)
        job.emit(_progress(1))
        time.sleep(0.05)
        job.emit(Completed(result=_result()))

    threading.Thread(target=producer).start()
    events = asyncio.run(asyncio.wait_for(consume(), 5))
    assert isinstance(events[-1], Completed)
    assert any(isinstance(e, Progress) for e in events)


def test_result_raises_for_failed_and_canceled_and_times_out():
    failed = Job()
    failed.emit(
        Failed(code="gpu_oom", message="out of memory", hint="smaller tiles", retryable=True)
    )
    with pytest.raises(JobFailedError, match="out of memory") as info:
        failed.result(1)
    assert info.value.code == "gpu_oom" and info.value.retryable and info.value.hint
    canceled = Job()
    canceled.emit(Canceled())
    with pytest.raises(JobCanceledError):
        canceled.result(1)
    with pytest.raises(TimeoutError):
        Job().result(0.01)


def test_cancel_calls_the_executor_hook_once_and_not_after_the_end():
    calls = []
    job = Job(on_cancel=lambda: calls.append(1))
    assert job.cancel() is True and job.cancel_requested.is_set()
    job.emit(Canceled())
    assert job.cancel() is False
    assert calls == [1]


def test_sinks_run_on_their_own_thread_and_a_broken_sink_does_not_break_the_job():
    got, threads = [], []

    class Slow:
        def handle(self, event):
            threads.append(threading.current_thread().name)
            time.sleep(0.02)
            got.append(event)

    class Broken:
        def handle(self, event):
            raise ValueError("sink bug")

    job = Job(sinks=[Slow(), Broken()])
    for i in range(50):
        job.emit(_progress(i, 50))
    job.emit(Completed(result=_result()))
    assert job.result(5).shape == (2, 2, 2)  # waits for the sinks
    assert isinstance(got[-1], Completed) and len(got) < 50
    assert threading.main_thread().name not in threads
    assert job.sink_errors and isinstance(job.sink_errors[0], ValueError)


def test_events_survive_a_wire_round_trip():
    from cryomamba.events import event_from_dict

    labels = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    for event in (
        _progress(3),
        Failed(code="c", message="m", hint="h", retryable=True),
        Canceled(),
    ):
        assert event_from_dict(event.to_dict()) == event
    back = event_from_dict(Preview(scale=4, shape=(8, 12, 16), labels=labels).to_dict())
    assert back.scale == 4 and back.shape == (8, 12, 16)
    np.testing.assert_array_equal(back.labels, labels)
    bad = Preview(scale=4, shape=(8, 12, 16), labels=labels).to_dict()
    bad["shape"] = [3, 3, 3]
    with pytest.raises(ValueError, match="payload"):
        event_from_dict(bad)
    with pytest.raises(ValueError, match="unknown event"):
        event_from_dict({"type": "nope"})


def test_previews_are_equal_only_to_themselves():
    """A preview is a snapshot: two are never the same event, whatever they hold (the server
    caches each event's wire text by identity, so equal-looking previews must not collide)."""
    a = Preview(scale=2, shape=(2, 2, 2), labels=np.zeros((1, 1, 1), np.uint8))
    b = Preview(scale=4, shape=(8, 8, 8), labels=np.ones((2, 2, 2), np.uint8))
    assert a == a and a != b
    assert len({a, b}) == 2
