"""NapariSink in a real (headless, Xvfb) napari viewer: previews, mask, errors, threads, jobs."""

from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest

import cryomamba as cm
from cryomamba.events import Canceled, Completed, Failed, Preview, Progress
from cryomamba.preview import downsample_labels
from cryomamba.segmentation import Segmentation
from cryomamba.sinks.napari import NapariSink, preview_geometry
from cryomamba.testing import SinkTests

pytest.importorskip("napari")
pytest.importorskip("superqt")
pytest.importorskip("pytestqt")

from napari.utils.notifications import NotificationSeverity, notification_manager
from napari_support import napari_gui, qapp  # noqa: F401  (skip where Qt cannot start)

SCALE, TRANSLATE = (2.0, 3.0, 4.0), (10.0, 20.0, 30.0)  # (z, y, x) Å


@pytest.fixture
def viewer(make_napari_viewer):
    return make_napari_viewer()


@pytest.fixture
def notes():
    """Notifications dispatched during the test: (severity, message) pairs."""
    start = len(notification_manager.records)
    return lambda: [(n.severity, str(n.message)) for n in notification_manager.records[start:]]


def settle(qtbot, sink: NapariSink) -> None:
    """Run the Qt events the sink posted, so nothing is left queued when the viewer closes."""
    qtbot.waitUntil(lambda: not sink._scheduled, timeout=10_000)
    qtbot.wait(10)


def labels_of(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 3, size=shape, dtype=np.uint8)


def result_of(labels, voxel_size=SCALE, origin=TRANSLATE) -> Segmentation:
    names = {0: "background", 1: "membrane", 2: "particle"}
    return Segmentation(labels=labels, voxel_size=voxel_size, origin=origin, label_names=names)


def preview_of(full: np.ndarray, scale: int) -> Preview:
    small = downsample_labels(full, scale)
    return Preview(scale=scale, shape=full.shape, labels=small, planes_done=full.shape[0])


def layer_names(viewer) -> list[str]:
    return [layer.name for layer in viewer.layers]


# -- the conformance suite ---------------------------------------------------------------------
class TestNapariSinkConformance(SinkTests):
    @pytest.fixture
    def sink(self, viewer, qtbot):
        self.viewer, self.qtbot = viewer, qtbot
        sink = NapariSink(viewer, throttle_s=0)
        yield sink
        settle(qtbot, sink)

    def assert_handled(self, sink, event):
        settle(self.qtbot, sink)
        names = [layer.name for layer in self.viewer.layers]
        if isinstance(event, Preview):  # a preview layer, at the preview's resolution
            assert names == [sink.preview_name]
            assert self.viewer.layers[0].data.shape == event.labels.shape
        elif isinstance(event, Completed):  # the mask replaces the preview
            assert names == [sink.mask_name]
            np.testing.assert_array_equal(self.viewer.layers[0].data, event.result.labels)
        elif isinstance(event, (Failed, Canceled)):  # the preview goes, no mask comes
            assert names == []
        else:  # progress changes no layer
            assert names == []

    @pytest.fixture
    def result(self):
        return result_of(np.zeros((2, 2, 2), np.uint8))


# -- geometry, without a viewer ----------------------------------------------------------------
@pytest.mark.parametrize("s", [1, 2, 3, 4, 8])
def test_preview_voxels_sit_at_the_centre_of_their_blocks(s):
    scale, translate = np.array(SCALE), np.array(TRANSLATE)
    layer_scale, layer_translate = preview_geometry(s, scale, translate)
    np.testing.assert_allclose(layer_scale, scale * s)
    np.testing.assert_allclose(layer_translate, translate + (s - 1) / 2 * scale)
    for k in range(4):  # preview voxel k summarises full-resolution voxels k*s .. k*s + s - 1
        block = np.arange(k * s, k * s + s)
        centre = translate[:, None] + block[None, :] * scale[:, None]
        np.testing.assert_allclose(layer_translate + k * layer_scale, centre.mean(axis=1))


def test_throttle_must_be_a_non_negative_number():
    for bad in (-1, float("nan"), float("inf"), "0.5"):
        with pytest.raises(ValueError, match="throttle_s"):
            NapariSink(throttle_s=bad)


def test_sink_registry_and_import_stay_free_of_napari():
    code = (
        "import sys, cryomamba; from cryomamba import plugins, sinks; "
        "assert plugins.sinks().get('napari') is sinks.NapariSink; "
        "sink = cryomamba.sinks.as_sink('napari'); assert sink.viewer is None; "
        "print([m for m in ('napari', 'qtpy', 'superqt', 'PyQt6', 'vispy') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_without_a_qt_application_handle_says_what_is_missing():
    code = (
        "import numpy as np; from cryomamba.events import Preview; "
        "from cryomamba.sinks import NapariSink\n"
        "try:\n"
        "    NapariSink().handle(Preview(2, (2, 2, 2), np.zeros((1, 1, 1), np.uint8)))\n"
        "except RuntimeError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "needs a napari viewer" in out.stdout and "napari.Viewer()" in out.stdout


# -- layers in a viewer ------------------------------------------------------------------------
def test_preview_layer_overlays_the_image_and_is_updated_in_place(viewer, qtbot):
    image = viewer.add_image(
        np.zeros((12, 14, 16), np.float32), name="tomo", scale=SCALE, translate=TRANSLATE
    )
    sink = NapariSink(viewer, image_layer="tomo", throttle_s=0)
    full = labels_of(image.data.shape)
    sink.handle(preview_of(full, 4))
    layer = viewer.layers["cryomamba preview"]
    assert layer.data.dtype == np.uint8 and layer.data.shape == (3, 4, 4)
    np.testing.assert_array_equal(layer.data, downsample_labels(full, 4))
    # preview voxel (k, j, i) lies at the centre of its 4×4×4 block of image voxels
    for k, j, i in [(0, 0, 0), (2, 3, 1), (1, 2, 3)]:
        block = [
            (4 * k + a, 4 * j + b, 4 * i + c) for a in range(4) for b in range(4) for c in range(4)
        ]
        centre = np.mean([image.data_to_world(v) for v in block], axis=0)
        np.testing.assert_allclose(layer.data_to_world((k, j, i)), centre)

    inserted = []
    viewer.layers.events.inserted.connect(lambda e: inserted.append(e.value.name))
    later = labels_of(image.data.shape, seed=1)
    sink.handle(preview_of(later, 4))
    assert viewer.layers["cryomamba preview"] is layer and inserted == []
    np.testing.assert_array_equal(layer.data, downsample_labels(later, 4))
    sink.handle(preview_of(later, 2))  # another scale: new shape, same layer
    assert viewer.layers["cryomamba preview"] is layer and inserted == []
    assert layer.data.shape == (6, 7, 8)
    np.testing.assert_allclose(layer.scale, np.array(SCALE) * 2)
    np.testing.assert_allclose(layer.translate, np.array(TRANSLATE) + 0.5 * np.array(SCALE))
    settle(qtbot, sink)


def test_image_layer_object_and_a_missing_name(viewer, qtbot):
    image = viewer.add_image(np.zeros((4, 4, 4), np.float32), scale=(5, 5, 5))
    sink = NapariSink(viewer, image_layer=image, throttle_s=0)
    sink.handle(preview_of(np.zeros((4, 4, 4), np.uint8), 2))
    np.testing.assert_allclose(viewer.layers["cryomamba preview"].scale, (10, 10, 10))
    np.testing.assert_allclose(viewer.layers["cryomamba preview"].translate, (2.5, 2.5, 2.5))
    other = NapariSink(viewer, name="other", image_layer="no such layer", throttle_s=0)
    other.handle(preview_of(np.zeros((4, 4, 4), np.uint8), 2))  # falls back to 1 and 0
    np.testing.assert_allclose(viewer.layers["other preview"].scale, (2, 2, 2))
    np.testing.assert_allclose(viewer.layers["other preview"].translate, (0.5, 0.5, 0.5))
    settle(qtbot, sink)
    settle(qtbot, other)


def test_completed_replaces_the_preview_with_the_full_mask(viewer, qtbot):
    image = viewer.add_image(
        np.zeros((12, 14, 16), np.float32), name="tomo", scale=SCALE, translate=TRANSLATE
    )
    sink = NapariSink(viewer, name="run", image_layer="tomo", throttle_s=0)
    full = labels_of(image.data.shape)
    sink.handle(preview_of(full, 2))
    assert layer_names(viewer) == ["tomo", "run preview"]
    result = result_of(full)
    sink.handle(Completed(result=result))
    assert layer_names(viewer) == ["tomo", "run mask"]
    mask = viewer.layers["run mask"]
    assert mask.data is result.labels and mask.data.dtype == np.uint8
    np.testing.assert_allclose(mask.scale, image.scale)
    np.testing.assert_allclose(mask.translate, image.translate)
    np.testing.assert_allclose(mask.data_to_world((3, 4, 5)), image.data_to_world((3, 4, 5)))
    assert list(mask.features["name"]) == ["background", "membrane", "particle"]
    assert sink.result is result
    settle(qtbot, sink)


def test_without_an_image_layer_the_mask_uses_the_result_geometry(viewer, qtbot):
    sink = NapariSink(viewer, throttle_s=0)
    result = result_of(labels_of((4, 6, 8)), voxel_size=(7.0, 8.0, 9.0), origin=(1.0, 2.0, 3.0))
    sink.handle(Completed(result=result))
    mask = viewer.layers["cryomamba mask"]
    np.testing.assert_allclose(mask.scale, (7, 8, 9))
    np.testing.assert_allclose(mask.translate, (1, 2, 3))
    np.testing.assert_array_equal(mask.data, result.labels)
    # a second run with the same name updates that layer rather than adding another
    again = result_of(labels_of((5, 6, 8), seed=3))
    NapariSink(viewer, throttle_s=0).handle(Completed(result=again))
    assert layer_names(viewer) == ["cryomamba mask"] and mask.data is again.labels
    settle(qtbot, sink)


def test_previews_from_a_thread_are_coalesced_and_the_last_is_applied(viewer, qtbot, monkeypatch):
    sink = NapariSink(viewer, throttle_s=0)
    applied: list[Preview] = []
    show = NapariSink._show_preview
    monkeypatch.setattr(
        NapariSink, "_show_preview", lambda self, v, e: (applied.append(e), show(self, v, e))
    )
    full = labels_of((8, 8, 8))
    previews = [
        Preview(scale=2, shape=(8, 8, 8), labels=downsample_labels(full, 2), planes_done=i)
        for i in range(50)
    ]
    # the main thread runs no Qt events while the sink thread delivers all fifty
    sender = threading.Thread(target=lambda: [sink.handle(p) for p in previews])
    sender.start()
    sender.join()
    assert applied == [] and "cryomamba preview" not in layer_names(viewer)
    qtbot.waitUntil(lambda: "cryomamba preview" in layer_names(viewer), timeout=10_000)
    assert applied == [previews[-1]]
    threading.Thread(target=sink.handle, args=(Completed(result=result_of(full)),)).start()
    qtbot.waitUntil(lambda: layer_names(viewer) == ["cryomamba mask"], timeout=10_000)
    assert applied == [previews[-1]]
    settle(qtbot, sink)


def test_throttled_preview_is_applied_before_the_end(viewer, qtbot, monkeypatch):
    sink = NapariSink(viewer, throttle_s=30)
    applied: list[Preview] = []
    show = NapariSink._show_preview
    monkeypatch.setattr(
        NapariSink, "_show_preview", lambda self, v, e: (applied.append(e), show(self, v, e))
    )
    full = labels_of((8, 8, 8))
    first, second = preview_of(full, 2), preview_of(labels_of((8, 8, 8), seed=5), 2)
    sink.handle(first)
    sink.handle(second)  # within 30 s of the first: waits for its turn
    assert applied == [first]
    np.testing.assert_array_equal(viewer.layers["cryomamba preview"].data, first.labels)
    sink.handle(Failed(code="gpu_oom", message="out of GPU memory", hint="use a smaller tile"))
    assert applied == [first, second]  # applied (then removed) before the failure is shown
    settle(qtbot, sink)


def test_failed_shows_an_error_with_message_and_hint(viewer, qtbot, notes):
    sink = NapariSink(viewer, throttle_s=0)
    sink.handle(preview_of(labels_of((4, 4, 4)), 2))
    sink.handle(Failed(code="gpu_oom", message="out of GPU memory", hint="lower tile_batch"))
    assert (NotificationSeverity.ERROR, "out of GPU memory — lower tile_batch") in notes()
    assert layer_names(viewer) == [] and sink.result is None
    settle(qtbot, sink)


def test_canceled_removes_the_preview_and_says_so(viewer, qtbot, notes):
    sink = NapariSink(viewer, throttle_s=0)
    sink.handle(Progress(fraction=0.5, tiles_done=1, tiles_total=2))
    sink.handle(preview_of(labels_of((4, 4, 4)), 2))
    sink.handle(Canceled())
    assert layer_names(viewer) == []
    assert any(sev == NotificationSeverity.INFO and "canceled" in msg for sev, msg in notes())
    settle(qtbot, sink)


def test_completed_without_labels_warns(viewer, qtbot, notes):
    sink = NapariSink(viewer, throttle_s=0)
    sink.handle(Completed(result=None, artifacts={"mask.mrc": "https://example/mask.mrc"}))
    assert layer_names(viewer) == []
    assert any(sev == NotificationSeverity.WARNING for sev, _ in notes())
    settle(qtbot, sink)


def test_a_closed_viewer_is_left_alone(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    sink = NapariSink(viewer, throttle_s=0)
    viewer.close()
    sink.handle(preview_of(labels_of((4, 4, 4)), 2))
    sink.handle(Completed(result=result_of(labels_of((4, 4, 4)))))
    assert len(viewer.layers) == 0


def test_the_registered_name_uses_the_current_viewer(viewer, qtbot):
    sink = cm.sinks.as_sink("napari")
    assert isinstance(sink, NapariSink) and sink.viewer is None
    sink.handle(Completed(result=result_of(labels_of((4, 4, 4)))))
    assert sink.viewer is viewer and layer_names(viewer) == ["cryomamba mask"]
    settle(qtbot, sink)


# -- real jobs ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_submit_streams_previews_into_the_viewer_then_the_mask(viewer, qtbot, tiny_model, mrc_file):
    [image] = viewer.open(str(mrc_file), plugin="napari-cryomamba")
    sink = NapariSink(viewer, name="seg", image_layer=image, throttle_s=0)
    seen = []  # (name, dtype, scale, translate) of every layer the sink inserts
    viewer.layers.events.inserted.connect(
        lambda e: seen.append(
            (e.value.name, e.value.data.dtype, tuple(e.value.scale), tuple(e.value.translate))
        )
    )
    job = cm.submit(
        mrc_file,
        cm.JobConfig(model=str(tiny_model), preview_interval_s=0.001, preview_scale=2),
        sinks=[sink],
    )
    qtbot.waitUntil(lambda: "seg mask" in layer_names(viewer), timeout=120_000)
    result = job.result(60)
    assert layer_names(viewer) == ["tomo", "seg mask"]
    assert seen[0] == (
        "seg preview",
        np.uint8,
        tuple(np.array(image.scale) * 2),
        tuple(np.array(image.translate) + 0.5 * np.array(image.scale)),
    )
    assert seen[-1][0] == "seg mask"
    mask = viewer.layers["seg mask"]
    np.testing.assert_array_equal(mask.data, result.labels)
    np.testing.assert_allclose(mask.scale, image.scale)  # 10 Å
    np.testing.assert_allclose(mask.translate, image.translate)
    assert sink.result is result
    settle(qtbot, sink)


@pytest.mark.slow
def test_segment_with_the_sink_ends_with_the_mask(viewer, qtbot, tiny_model, mrc_file):
    sink = NapariSink(viewer)
    result = cm.segment(
        mrc_file, model=tiny_model, sinks=[sink], preview_interval_s=0.001, preview_scale=2
    )
    assert sink.result is result
    # segment() blocked the main thread; the viewer catches up when Qt events run
    qtbot.waitUntil(lambda: layer_names(viewer) == ["cryomamba mask"], timeout=30_000)
    mask = viewer.layers["cryomamba mask"]
    np.testing.assert_array_equal(mask.data, result.labels)
    np.testing.assert_allclose(mask.scale, (10.0, 10.0, 10.0))
    np.testing.assert_allclose(mask.translate, (300.0, 200.0, 100.0))
    settle(qtbot, sink)


@pytest.mark.slow
def test_a_failing_job_notifies_with_message_and_hint(viewer, qtbot, notes, mrc_file):
    sink = NapariSink(viewer)
    job = cm.submit(mrc_file, cm.JobConfig(model="no-such-model-xyz"), sinks=[sink])
    assert job.wait(60)
    failed = job.terminal_event
    assert isinstance(failed, Failed) and failed.hint
    expected = (NotificationSeverity.ERROR, f"{failed.message} — {failed.hint}")
    qtbot.waitUntil(lambda: expected in notes(), timeout=10_000)
    assert layer_names(viewer) == []
    settle(qtbot, sink)
