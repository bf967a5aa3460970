"""The napari dock widget, headless with a real napari (pytest-qt's qtbot, Xvfb via pytest-xvfb).

Runs are real: a synthetic tomogram opened with the plugin's reader, a tiny nnU-Net model on
the CPU, and a real `cryomamba serve` subprocess for the server tests. Results are compared
bit for bit with `cm.segment` on the same input.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from napari_support import require_napari_gui

import cryomamba as cm
from cryomamba import synth

require_napari_gui()  # skips where napari or a Qt GUI cannot start (no Xvfb, no GL libraries)

from napari.layers import Image, Labels  # noqa: E402
from napari.utils.notifications import NotificationSeverity, notification_manager  # noqa: E402
from napari_cryomamba._widget import CryoMambaWidget, format_eta  # noqa: E402

WAIT_MS = 180_000  # generous: a busy 2-core machine; tests wait for outcomes, never time them


# -- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tomo_path(tmp_path_factory) -> Path:
    """32×64×64 synthetic tomogram, 10 Å voxels."""
    path, _ = synth.write_mrc(
        synth.synthesize((32, 64, 64), seed=0), tmp_path_factory.mktemp("tomo") / "tomo.mrc"
    )
    return path


@pytest.fixture(scope="module")
def big_tomo_path(tmp_path_factory) -> Path:
    """64×128×128: a run with the tiny model's 16³ patch takes long enough to cancel it."""
    path, _ = synth.write_mrc(
        synth.synthesize((64, 128, 128), seed=1), tmp_path_factory.mktemp("big") / "big.mrc"
    )
    return path


@pytest.fixture
def notifications():
    """Every napari notification dispatched during the test."""
    seen: list = []
    notification_manager.notification_ready.connect(seen.append)
    yield seen
    notification_manager.notification_ready.disconnect(seen.append)


@pytest.fixture
def viewer(make_napari_viewer):
    return make_napari_viewer()


def open_tomo(viewer, path: Path) -> Image:
    (layer,) = viewer.open(str(path), plugin="napari-cryomamba")
    return layer


def add_widget(viewer) -> CryoMambaWidget:
    """Docked as napari docks it from the Plugins menu (the widget gets a public-only proxy)."""
    _, widget = viewer.window.add_plugin_dock_widget("napari-cryomamba", "CryoMamba")
    return widget


def choose_model(widget: CryoMambaWidget, model: str | os.PathLike) -> None:
    widget.model_combo.setCurrentText(os.fspath(model))


def wait_until_idle(qtbot, widget: CryoMambaWidget, why=lambda: "") -> None:
    """Until the job has ended and the widget has handled its last event."""
    try:
        qtbot.waitUntil(
            lambda: widget.job is not None and widget.job.done and widget.run_button.isEnabled(),
            timeout=WAIT_MS,
        )
    except qtbot.TimeoutError:
        job = widget.job
        raise AssertionError(
            f"job {job!r} did not end: last progress {job and job.last_progress}, "
            f"status {widget.status_label.text()!r}\n{why()}"
        ) from None


def layer_named(viewer, name: str):
    return next((layer for layer in viewer.layers if layer.name == name), None)


def wait_for_mask(qtbot, viewer, name: str):
    qtbot.waitUntil(lambda: layer_named(viewer, f"{name} mask") is not None, timeout=WAIT_MS)
    return viewer.layers[f"{name} mask"]


def items(combo) -> list[str]:
    return [combo.itemText(i) for i in range(combo.count())]


def errors(notes) -> list[str]:
    return [str(n.message) for n in notes if n.severity == NotificationSeverity.ERROR]


# -- opening -------------------------------------------------------------------------------------
def test_widget_opens_through_the_manifest(viewer, tomo_path):
    _, widget = viewer.window.add_plugin_dock_widget("napari-cryomamba", "CryoMamba")
    assert isinstance(widget, CryoMambaWidget)
    assert widget.layer_combo.count() == 0
    assert "demo-membrane" in items(widget.model_combo)
    assert [widget.device_combo.itemText(i) for i in range(2)] == ["auto", "cpu"]
    assert widget.server_box.isHidden()

    image = open_tomo(viewer, tomo_path)
    labels = viewer.add_labels(np.zeros((4, 4, 4), np.uint8), name="not an image")
    assert [widget.layer_combo.itemText(i) for i in range(widget.layer_combo.count())] == [
        image.name
    ]
    assert widget.selected_layer() is image
    image.name = "renamed"
    assert widget.layer_combo.currentText() == "renamed"
    viewer.layers.remove(labels)
    viewer.layers.remove(image)
    assert widget.layer_combo.count() == 0 and widget.selected_layer() is None

    widget.mode_combo.setCurrentText("Server")
    assert not widget.server_box.isHidden()
    assert widget.token_edit.echoMode() == widget.token_edit.EchoMode.Password
    assert [widget.device_combo.itemText(i) for i in range(widget.device_combo.count())] == ["auto"]


def test_eta_text():
    assert format_eta(None) == ""
    assert format_eta(12.4) == "about 12 s left"
    assert format_eta(150) == "about 2 min left"
    assert format_eta(3900) == "about 1 h 05 min left"


# -- local runs ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_local_run_fills_preview_then_mask_equals_segment(
    qtbot, viewer, tomo_path, tiny_model, notifications
):
    image = open_tomo(viewer, tomo_path)
    widget = add_widget(viewer)
    choose_model(widget, tiny_model)
    widget.tile_step.setValue(0.25)  # more tiles: several previews while it runs
    widget.preview_interval.setValue(0.05)
    preview_name, states = f"{image.name} preview", []

    def record() -> bool:  # polled on the main thread until the mask layer arrives
        mask = layer_named(viewer, f"{image.name} mask")
        preview = layer_named(viewer, preview_name)
        if mask is None and preview is not None:
            data = np.asarray(preview.data)
            if not states or not np.array_equal(states[-1], data):
                states.append(data.copy())
        return mask is not None

    job = widget.run()
    assert job is not None
    assert not widget.run_button.isEnabled() and widget.cancel_button.isEnabled()
    qtbot.waitUntil(record, timeout=WAIT_MS)
    wait_until_idle(qtbot, widget)

    assert job.state == cm.JobState.COMPLETED
    assert len(states) >= 2, "the preview layer never changed while the job ran"
    assert states[-1].any()
    assert preview_name not in viewer.layers  # replaced by the mask
    mask = viewer.layers[f"{image.name} mask"]
    assert isinstance(mask, Labels)
    expected = cm.segment(tomo_path, model=tiny_model, tile_step=0.25)
    assert np.array_equal(np.asarray(mask.data), expected.labels)
    np.testing.assert_allclose(mask.scale, image.scale)
    np.testing.assert_allclose(mask.translate, image.translate)

    rows = [e for e in expected.stats["labels"]]
    assert widget.stats_table.rowCount() == len(rows) + (1 if len(rows) > 1 else 0)
    assert widget.stats_table.cell_text(0, 0) == f"{rows[0]['name']} ({rows[0]['label']})"
    assert widget.stats_table.cell_text(0, 1) == f"{rows[0]['voxel_count']:,}"
    assert widget.stats_table.cell_text(0, 4) == f"{rows[0]['components']:,}"
    assert widget.progress_bar.value() == 1000
    assert widget.status_label.text().startswith("done")
    assert errors(notifications) == []


@pytest.mark.slow
def test_an_array_layer_is_sent_with_its_scale_and_translate(qtbot, viewer, tiny_model):
    data = synth.synthesize((32, 48, 48), seed=3).volume
    image = viewer.add_image(data, name="array", scale=(10, 10, 10), translate=(5, 0, -20))
    widget = add_widget(viewer)
    choose_model(widget, tiny_model)
    job = widget.run()
    wait_until_idle(qtbot, widget)
    assert job.state == cm.JobState.COMPLETED
    assert widget.result.voxel_size == (10.0, 10.0, 10.0)
    assert widget.result.origin == (5.0, 0.0, -20.0)
    source = cm.Volume.from_array(data, voxel_size=10.0, origin=(5, 0, -20))
    expected = cm.segment(source, model=tiny_model)
    mask = wait_for_mask(qtbot, viewer, image.name)
    assert np.array_equal(np.asarray(mask.data), expected.labels)
    np.testing.assert_allclose(mask.translate, (5, 0, -20))


@pytest.mark.slow
def test_cancel_during_a_run(qtbot, viewer, big_tomo_path, tiny_model):
    image = open_tomo(viewer, big_tomo_path)
    widget = add_widget(viewer)
    choose_model(widget, tiny_model)
    job = widget.run()
    qtbot.waitUntil(lambda: widget.progress_bar.value() > 0, timeout=WAIT_MS)
    assert not job.done
    qtbot.mouseClick(widget.cancel_button, qtbot_left())
    wait_until_idle(qtbot, widget)
    assert job.state == cm.JobState.CANCELED
    assert widget.run_button.isEnabled() and not widget.cancel_button.isEnabled()
    assert widget.status_label.text() == "canceled"
    assert f"{image.name} mask" not in viewer.layers
    assert widget.result is None
    assert not any(b.isEnabled() for b in widget.export_buttons.values())


@pytest.mark.slow
def test_export_writes_readable_files(qtbot, viewer, tomo_path, tiny_model, tmp_path, monkeypatch):
    import mrcfile
    import nibabel
    import nrrd

    open_tomo(viewer, tomo_path)
    widget = add_widget(viewer)
    choose_model(widget, tiny_model)
    widget.run()
    wait_until_idle(qtbot, widget)
    labels = np.asarray(widget.result.labels)
    assert all(b.isEnabled() for b in widget.export_buttons.values())

    paths = widget.export(tmp_path / "all", ["mrc", "nifti", "nrrd", "stats"])
    with mrcfile.open(paths["mrc"]) as mrc:
        assert np.array_equal(mrc.data.astype(np.uint8), labels)
        assert float(mrc.voxel_size.x) == pytest.approx(10.0)
    nii = nibabel.load(paths["nifti"])
    assert np.array_equal(np.asarray(nii.dataobj).transpose(2, 1, 0), labels)
    data, _ = nrrd.read(str(paths["nrrd"]), index_order="C")
    assert np.array_equal(data, labels)
    stats = json.loads(paths["stats"].read_text())
    assert stats["labels"][0]["voxel_count"] == int(np.count_nonzero(labels == 1))

    # the button asks for a folder, then writes in the background
    from qtpy.QtWidgets import QFileDialog

    folder = tmp_path / "from-button"
    folder.mkdir()
    monkeypatch.setattr(QFileDialog, "getExistingDirectory", lambda *a, **k: str(folder))
    widget.export_buttons["stats.json"].click()
    qtbot.waitUntil(lambda: (folder / "stats.json").is_file(), timeout=WAIT_MS)
    assert widget.wait_for_threads()
    assert json.loads((folder / "stats.json").read_text())["labels"] == stats["labels"]


# -- errors --------------------------------------------------------------------------------------
def test_run_errors_are_notifications(qtbot, viewer, tomo_path, notifications):
    widget = add_widget(viewer)
    assert widget.run() is None  # no image layer
    assert "no image layer" in errors(notifications)[-1]

    open_tomo(viewer, tomo_path)
    choose_model(widget, "no-such-model")
    job = widget.run()
    wait_until_idle(qtbot, widget)
    assert job.state == cm.JobState.FAILED
    # the sink's notification and the widget's re-enabled button are separate main-thread
    # events, in either order: wait for the notification, then read it
    qtbot.waitUntil(lambda: len(errors(notifications)) >= 2, timeout=WAIT_MS)
    message = errors(notifications)[-1]
    assert "unknown model 'no-such-model'" in message
    assert " — use one of: demo-membrane" in message
    assert widget.status_label.text().startswith("failed")

    widget.mode_combo.setCurrentText("Server")
    widget.url_edit.setText("ftp://nowhere")
    widget.model_combo.setCurrentText("demo-membrane")
    assert widget.run() is None
    assert "http:// or https://" in errors(notifications)[-1]
    with pytest.raises(cm.OutputError):
        widget.export(Path("unused"), ["mrc"])


def test_test_connection_to_nothing_is_a_notification(qtbot, viewer, notifications):
    from server_fixtures import free_port

    widget = add_widget(viewer)
    widget.mode_combo.setCurrentText("Server")
    widget.url_edit.setText(f"http://127.0.0.1:{free_port()}")
    widget.test_connection()
    qtbot.waitUntil(lambda: widget.test_button.isEnabled(), timeout=WAIT_MS)
    assert widget.server_info is None
    message = errors(notifications)[-1]
    assert "cannot reach the CryoMamba server" in message
    assert " — check the URL and that `cryomamba serve` is running" in message
    assert widget.server_label.text().startswith("not connected")


# -- a real server -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def live_server(tmp_path_factory, tiny_model):
    pytest.importorskip("uvicorn")
    from server_fixtures import LiveServer

    # the tiny model's folder is named "tiny", alone in its parent: the server offers "tiny"
    server = LiveServer(
        tmp_path_factory.mktemp("server") / "data",
        models_dir=tiny_model.parent,
        extra_args=["--rate-limit", "100000"],
    ).start()
    yield server
    server.stop()


def connect(qtbot, widget: CryoMambaWidget, server, token: str) -> None:
    widget.mode_combo.setCurrentText("Server")
    widget.url_edit.setText(server.url)
    widget.token_edit.setText(token)
    qtbot.mouseClick(widget.test_button, qtbot_left())
    qtbot.waitUntil(lambda: widget.test_button.isEnabled(), timeout=WAIT_MS)


def qtbot_left():
    from qtpy.QtCore import Qt

    return Qt.MouseButton.LeftButton


@pytest.mark.slow
def test_wrong_token_is_a_notification_with_hint(
    qtbot, viewer, live_server, notifications, monkeypatch
):
    widget = add_widget(viewer)
    connect(qtbot, widget, live_server, "not-a-token")
    assert widget.server_info is None
    message = errors(notifications)[-1]
    with live_server.client("not-a-token") as client:
        body = client.get("/v1/server/info").json()["error"]
    assert message == f"{body['message']} — {body['hint']}"
    assert widget.server_label.text() == f"not connected: {body['message']}"

    # an empty token field falls back to $CRYOMAMBA_TOKEN, as the remote executor does
    monkeypatch.setenv("CRYOMAMBA_TOKEN", live_server.token("napari", "read"))
    connect(qtbot, widget, live_server, "")
    assert widget.server_info is not None and widget.server_info["version"] == cm.__version__


@pytest.mark.slow
def test_server_run_equals_local(qtbot, viewer, live_server, tomo_path, tiny_model, notifications):
    import cryomamba

    image = open_tomo(viewer, tomo_path)
    widget = add_widget(viewer)
    connect(qtbot, widget, live_server, live_server.token("napari", "read,upload,submit"))
    assert widget.server_info is not None
    text = widget.server_label.text()
    assert f"CryoMamba {cryomamba.__version__}" in text and "tiny" in text and "cpu" in text
    models = [widget.model_combo.itemText(i) for i in range(widget.model_combo.count())]
    assert "tiny" in models and "demo-membrane" in models
    devices = [widget.device_combo.itemText(i) for i in range(widget.device_combo.count())]
    assert devices == ["auto", "cpu"]

    choose_model(widget, "tiny")
    job = widget.run()
    wait_until_idle(qtbot, widget, why=lambda: live_server.log()[-5000:])
    assert job.state == cm.JobState.COMPLETED, (errors(notifications), live_server.log()[-5000:])
    mask = wait_for_mask(qtbot, viewer, image.name)
    expected = cm.segment(tomo_path, model=tiny_model)
    assert np.array_equal(np.asarray(mask.data), expected.labels)
    assert widget.stats_table.cell_text(0, 1) == f"{expected.stats['labels'][0]['voxel_count']:,}"
    assert errors(notifications) == []


# -- screenshots ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_screenshot_shows_the_preview(qtbot, make_napari_viewer, tomo_path, tiny_model):
    viewer = make_napari_viewer(show=True)
    image = open_tomo(viewer, tomo_path)
    widget = add_widget(viewer)
    choose_model(widget, tiny_model)
    widget.tile_step.setValue(0.25)
    widget.preview_interval.setValue(0.05)
    viewer.dims.set_point(0, image.translate[0] + 1 * image.scale[0])  # plane 1: finished early
    shots: dict[str, np.ndarray] = {}

    def shoot() -> bool:
        preview = layer_named(viewer, f"{image.name} preview")
        if preview is None:
            return False
        z = round(float(preview.world_to_data(viewer.dims.point)[0]))
        if not 0 <= z < preview.data.shape[0] or not np.asarray(preview.data[z]).any():
            return False
        shots["with"] = viewer.screenshot(canvas_only=True)
        preview.visible = False
        shots["without"] = viewer.screenshot(canvas_only=True)
        preview.visible = True
        return True

    widget.run()
    qtbot.waitUntil(shoot, timeout=WAIT_MS)
    widget.cancel()
    wait_until_idle(qtbot, widget)
    with_preview, without = shots["with"], shots["without"]
    assert with_preview.shape == without.shape and with_preview.ndim == 3
    assert with_preview[..., :3].astype(float).var() > 0
    assert without[..., :3].astype(float).var() > 0  # the tomogram itself is drawn
    assert not np.array_equal(with_preview, without)


@pytest.mark.slow
def test_closing_the_viewer_cancels_the_job(qtbot, make_napari_viewer, big_tomo_path, tiny_model):
    viewer = make_napari_viewer()
    open_tomo(viewer, big_tomo_path)
    widget = add_widget(viewer)
    choose_model(widget, tiny_model)
    job = widget.run()
    qtbot.waitUntil(lambda: widget.progress_bar.value() > 0, timeout=WAIT_MS)
    viewer.close()
    qtbot.waitUntil(lambda: job.done, timeout=WAIT_MS)
    assert job.state == cm.JobState.CANCELED


# -- voxel sizes -----------------------------------------------------------------------------------
def test_shows_both_voxel_sizes_and_takes_an_override(viewer, tiny_model, tmp_path):
    import mrcfile
    from conftest import REAL_MRC

    open_tomo(viewer, REAL_MRC / "chlamy_hsp60_relion_ispg0.mrc")  # 7.84 Å
    widget = add_widget(viewer)
    choose_model(widget, tiny_model)  # trained at 10 Å
    assert widget.spacing_label.text() == (
        "tomogram 7.84 Å · model 10 Å: resampled to the model's and back"
    )
    assert widget.config().voxel_size is None
    widget.voxel_size.setValue(10.0)
    assert widget.spacing_label.text().endswith("10 Å (set here) · model 10 Å: no resampling")
    assert widget.config().voxel_size == (10.0, 10.0, 10.0)
    widget.voxel_size.setValue(0.0)  # back to the header's
    path = tmp_path / "no_voxel_size.mrc"
    with mrcfile.new(path) as mrc:
        mrc.set_data(np.random.default_rng(0).normal(size=(8, 16, 16)).astype(np.float32))
        mrc.voxel_size = 0.0
    open_tomo(viewer, path)
    widget.layer_combo.setCurrentIndex(widget.layer_combo.count() - 1)  # the new layer
    assert "unknown (header 0 or 1 Å)" in widget.spacing_label.text()
    assert widget.spacing_label.text().endswith("set the voxel size, or the job is refused")
