"""The callback and file sinks pass the sink conformance suite (the napari sink's tests run it
in a viewer: tests/test_napari_sink.py)."""

from __future__ import annotations

import numpy as np
import pytest

from cryomamba.events import Completed, Event, Preview, Progress
from cryomamba.segmentation import Segmentation
from cryomamba.sinks import CallbackSink, FileSink
from cryomamba.testing import SinkTests


@pytest.fixture
def result() -> Segmentation:
    labels = np.zeros((4, 5, 6), np.uint8)
    labels[1:3, 1:4, 2:5] = 1
    return Segmentation(labels=labels, voxel_size=(10.0, 10.0, 10.0), label_names={1: "membrane"})


class TestCallbackSink(SinkTests):
    @pytest.fixture
    def sink(self) -> CallbackSink:
        self.received: list[Event] = []
        return CallbackSink(self.received.append)

    def assert_handled(self, sink: CallbackSink, event: Event) -> None:
        assert self.received[-1] is event  # every event reaches the function, as it is


def test_a_callback_sink_can_take_only_some_kinds():
    received: list[Event] = []
    sink = CallbackSink(received.append, kinds=(Progress,))
    progress = Progress(fraction=1.0, tiles_done=1, tiles_total=1)
    sink.handle(Preview(scale=2, shape=(2, 2, 2), labels=np.zeros((1, 1, 1), np.uint8)))
    sink.handle(progress)
    assert received == [progress]


class TestFileSink(SinkTests):
    @pytest.fixture
    def sink(self, tmp_path) -> FileSink:
        self.out = tmp_path / "out"
        return FileSink(self.out, formats=("mrc", "stats"))

    def assert_handled(self, sink: FileSink, event: Event) -> None:
        written = sorted(p.name for p in self.out.iterdir()) if self.out.exists() else []
        if isinstance(event, Completed):  # the artifacts, all of them, and nothing else
            assert written == ["mask.mrc", "stats.json"]
            assert set(sink.paths) == {"mrc", "stats"}
            import mrcfile

            with mrcfile.open(sink.paths["mrc"]) as mrc:
                np.testing.assert_array_equal(mrc.data, event.result.labels)
        else:  # progress, previews, failures and cancels write nothing
            assert written == [] and sink.paths == {}
