"""The "CryoMamba" dock widget: pick an image, a model and where to run; watch the mask fill in.

All layer updates go through `cryomamba.sinks.NapariSink` (preview while the job runs, the
full mask at the end). The widget itself only follows the job's events for its progress bar,
status line and stats table. Blocking work (the job's event stream, the server's info, saving
files) runs on plain threads, and results come back to the Qt main thread through a queued
signal (`_background`), so the UI never waits on the network or on inference. The export row
lives in `_export`, the texts the widget shows in `_texts`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from napari.layers import Image
from napari.utils.notifications import show_error
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

import cryomamba as cm
from cryomamba.spacing import model_voxel_size

from ._background import Background
from ._connection import describe_server, fetch_server_info
from ._export import EXPORTS, ExportRow, export_result
from ._stats_table import StatsTable
from ._texts import describe_spacing, error_text, format_eta

__all__ = ["EXPORTS", "CryoMambaWidget", "format_eta", "job_source"]

log = logging.getLogger(__name__)

LOCAL, SERVER = "Local", "Server"


def job_source(layer: Image) -> Any:
    """What to segment for an image layer: its file when the reader opened one, else its array.

    A file is passed by path, so the remote executor uploads it as is and voxel size and
    origin come from the MRC header; an array becomes a `Volume` with the layer's scale as
    voxel size (Å) and its translate as origin.
    """
    path = layer.metadata.get("path") if isinstance(layer.metadata, dict) else None
    if path and Path(path).is_file():
        return os.fspath(path)
    if getattr(layer, "rgb", False):
        raise cm.InvalidVolumeError(
            f"layer {layer.name!r} is an RGB image", hint="choose a greyscale 3D tomogram"
        )
    data = layer.data[0] if layer.multiscale else layer.data
    return cm.Volume.from_array(
        np.asarray(data),
        voxel_size=tuple(float(s) for s in layer.scale),
        origin=tuple(float(t) for t in layer.translate),
    )


class CryoMambaWidget(QWidget):
    """Dock widget: image layer, local or server, model and parameters, run, progress, results."""

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.job: cm.Job | None = None
        self.result: cm.Segmentation | None = None
        self.server_info: dict[str, Any] | None = None
        self._background = Background(self)
        self._started_at = 0.0
        self._build()
        # Closing the viewer deletes the widget: cancel its job then. The slot must not hold
        # the widget itself (it is being destroyed), so it gets the job through a holder.
        self._running_job: list[cm.Job] = []
        self.destroyed.connect(partial(_cancel_jobs, self._running_job))
        self.viewer.layers.events.inserted.connect(self._on_layers_changed)
        self.viewer.layers.events.removed.connect(self._on_layers_changed)
        self.viewer.layers.events.reordered.connect(self._on_layers_changed)
        self._refresh_layers()
        self._on_mode_changed()

    # -- building ---------------------------------------------------------------------------
    def _build(self) -> None:
        self.layer_combo = QComboBox()
        self.mode_combo = QComboBox()
        self.mode_combo.addItems([LOCAL, SERVER])
        self.url_edit = QLineEdit("http://127.0.0.1:8000")
        self.token_edit = QLineEdit()
        self.token_edit.setEchoMode(QLineEdit.EchoMode.Password)
        self.token_edit.setPlaceholderText("from `cryomamba token create` ($CRYOMAMBA_TOKEN)")
        self.test_button = QPushButton("Test connection")
        self.server_label = QLabel("not connected")
        self.server_label.setWordWrap(True)
        server_form = QFormLayout()
        server_form.addRow("URL", self.url_edit)
        server_form.addRow("Token", self.token_edit)
        server_form.addRow(self.test_button, self.server_label)
        self.server_box = QGroupBox("Server")
        self.server_box.setLayout(server_form)

        self.model_combo = QComboBox()
        self.model_combo.setEditable(True)
        self.model_combo.setToolTip("a model name, or the folder of an nnU-Net v2 trained model")
        self.model_browse = QToolButton()
        self.model_browse.setText("…")
        self.model_browse.setToolTip("choose a trained-model folder (local runs)")
        model_row = QHBoxLayout()
        model_row.addWidget(self.model_combo, 1)
        model_row.addWidget(self.model_browse)
        self.tile_step = QDoubleSpinBox()
        self.tile_step.setRange(0.1, 1.0)
        self.tile_step.setSingleStep(0.05)
        self.tile_step.setValue(0.5)
        self.tile_step.setToolTip("tile step as a fraction of the patch: 0.5 overlaps by half")
        self.tta_check = QCheckBox("test-time mirroring (slower, smoother)")
        self.device_combo = QComboBox()
        self.preview_interval = QDoubleSpinBox()
        self.preview_interval.setRange(0.05, 30.0)
        self.preview_interval.setSingleStep(0.5)
        self.preview_interval.setValue(1.0)
        self.preview_interval.setSuffix(" s")
        self.voxel_size = QDoubleSpinBox()
        self.voxel_size.setRange(0.0, 1000.0)
        self.voxel_size.setDecimals(3)
        self.voxel_size.setSingleStep(0.1)
        self.voxel_size.setSuffix(" Å")
        self.voxel_size.setSpecialValueText("from the image")  # shown at 0: no override
        self.voxel_size.setToolTip(
            "the tomogram's real voxel size, when its header is wrong (0, 1 Å or missing); "
            "the job resamples to the model's voxel size from it"
        )
        self.spacing_label = QLabel("")
        self.spacing_label.setWordWrap(True)

        form = QFormLayout()
        form.addRow("Image", self.layer_combo)
        form.addRow("Run on", self.mode_combo)
        form.addRow(self.server_box)
        form.addRow("Model", model_row)
        form.addRow("Tile step", self.tile_step)
        form.addRow("", self.tta_check)
        form.addRow("Device", self.device_combo)
        form.addRow("Preview every", self.preview_interval)
        form.addRow("Voxel size", self.voxel_size)
        form.addRow("", self.spacing_label)

        self.run_button = QPushButton("Run")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1000)
        self.progress_bar.setFormat("%p%")
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)

        self.stats_table = StatsTable()
        self.exports = ExportRow(self, self.export, self._background.call)
        self.export_buttons = self.exports.buttons

        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.progress_bar)
        layout.addWidget(self.status_label)
        layout.addWidget(QLabel("Results"))
        layout.addWidget(self.stats_table)
        layout.addWidget(QLabel("Export"))
        layout.addLayout(self.exports)
        layout.addStretch(1)

        self.mode_combo.currentTextChanged.connect(self._on_mode_changed)
        self.test_button.clicked.connect(self.test_connection)
        self.model_browse.clicked.connect(self._browse_model)
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.layer_combo.currentIndexChanged.connect(self._update_spacing)
        self.model_combo.currentTextChanged.connect(self._update_spacing)
        self.voxel_size.valueChanged.connect(self._update_spacing)

    # -- image layers -------------------------------------------------------------------------
    def _on_layers_changed(self, event=None) -> None:
        self._refresh_layers()

    def _refresh_layers(self, event=None) -> None:
        current = self.selected_layer()
        images = [layer for layer in self.viewer.layers if isinstance(layer, Image)]
        for layer in images:  # renaming a layer renames its entry (connect ignores repeats)
            layer.events.name.connect(self._refresh_layers)
        self.layer_combo.blockSignals(True)
        self.layer_combo.clear()
        for layer in images:
            self.layer_combo.addItem(layer.name, layer)
        if current in images:
            self.layer_combo.setCurrentIndex(images.index(current))
        elif images:  # the newest image is the likely one
            self.layer_combo.setCurrentIndex(len(images) - 1)
        self.layer_combo.blockSignals(False)
        self._update_spacing()

    def _update_spacing(self, *_: Any) -> None:
        """Show the tomogram's and the model's voxel sizes, and what the job will do."""
        model = None
        if self.mode != SERVER:
            with contextlib.suppress(Exception):  # an unknown name or folder: shown as "?"
                model = model_voxel_size(cm.resolve_model(self.model_combo.currentText()).path)
        override = self.voxel_size.value() or None
        self.spacing_label.setText(describe_spacing(self.selected_layer(), model, override))

    def selected_layer(self) -> Image | None:
        layer = self.layer_combo.currentData()
        return layer if layer in self.viewer.layers else None

    # -- local or server ----------------------------------------------------------------------
    @property
    def mode(self) -> str:
        return self.mode_combo.currentText()

    def _on_mode_changed(self, *_: Any) -> None:
        remote = self.mode == SERVER
        self.server_box.setVisible(remote)
        self.model_browse.setVisible(not remote)
        if remote:
            info = self.server_info or {}
            models = [m.get("name", "") for m in info.get("models", ())]
            devices = ["auto", *info.get("devices", ())]
        else:
            models = [spec.name for spec in cm.available_models()]
            devices = _local_devices()
        _set_items(self.model_combo, models)
        _set_items(self.device_combo, devices)

    def _browse_model(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "nnU-Net v2 trained-model folder")
        if folder:
            self.model_combo.setCurrentText(folder)

    def test_connection(self) -> None:
        """GET /v1/server/info in the background; show version, devices and models, or the error."""
        url = self.url_edit.text().strip()
        token = self.token_edit.text().strip() or os.environ.get("CRYOMAMBA_TOKEN")
        self.test_button.setEnabled(False)
        self.server_label.setText(f"connecting to {url} …")
        self._background.call(lambda: fetch_server_info(url, token), self._on_server_info)

    def _on_server_info(self, outcome: tuple[str, Any]) -> None:
        self.test_button.setEnabled(True)
        kind, value = outcome
        if kind == "error":
            self.server_info = None
            self.server_label.setText(f"not connected: {getattr(value, 'message', value)}")
            show_error(error_text(value))
            return
        self.server_info = value
        self.server_label.setText(describe_server(value))
        if self.mode == SERVER:
            self._on_mode_changed()

    # -- running ------------------------------------------------------------------------------
    def config(self) -> cm.JobConfig:
        """The job's settings from the form (raises `ConfigError` for a bad value)."""
        remote = self.mode == SERVER
        return cm.JobConfig(
            model=self.model_combo.currentText().strip(),
            tile_step=round(self.tile_step.value(), 4),
            mirroring=self.tta_check.isChecked(),
            device=self.device_combo.currentText() or "auto",
            preview_interval_s=self.preview_interval.value(),
            voxel_size=self.voxel_size.value() or None,
            # the server writes these for the download; exports are saved here, on demand
            formats=("mrc", "stats") if remote else (),
        )

    def run(self) -> cm.Job | None:
        """Start a job on the selected layer; returns it (None when it could not start)."""
        if self.job is not None and not self.job.done:
            return None
        layer = self.selected_layer()
        if layer is None:
            show_error("no image layer to segment — open a tomogram (File › Open) first")
            return None
        try:
            from cryomamba.sinks import NapariSink

            config = self.config()
            source = job_source(layer)
            options: dict[str, Any] = {}
            if self.mode == SERVER:
                options = {
                    "executor": "remote",
                    "server": self.url_edit.text().strip(),
                    "token": self.token_edit.text().strip() or None,
                }
            sink = NapariSink(
                self.viewer,
                name=layer.name,
                image_layer=layer,
                throttle_s=self.preview_interval.value(),
            )
            job = cm.submit(source, config, sinks=[sink], **options)
        except Exception as exc:  # a bad setting, an unreadable layer, a missing extra...
            log.info("could not start a job: %s", exc)
            show_error(error_text(exc))
            return None
        self.job, self.result = job, None
        self._running_job[:] = [job]
        self._started_at = time.monotonic()
        self.stats_table.show_stats(None)
        self.exports.set_enabled(False)
        self._set_running(True)
        self.progress_bar.setValue(0)
        where = "here" if self.mode == LOCAL else self.url_edit.text().strip()
        self.status_label.setText(f"starting on {where} …")
        self._background.start(self._follow, job, name=f"cryomamba-widget-{job.id[:8]}")
        return job

    def cancel(self) -> None:
        if self.job is not None and self.job.cancel():
            self.cancel_button.setEnabled(False)
            self.status_label.setText("canceling …")

    def _follow(self, job: cm.Job) -> None:
        """Worker thread: hand every event to the main thread; stats are computed here."""
        try:
            for event in job.events():
                stats: Any = None
                if isinstance(event, cm.Completed) and event.result is not None:
                    self._background.post(self._on_status, (job, "computing statistics …"))
                    try:
                        stats = event.result.stats
                    except Exception as exc:
                        stats = exc
                self._background.post(self._on_event, (job, event, stats))
        except Exception as exc:  # never leave the widget waiting for an end that won't come
            log.exception("following job %s failed", job.id)
            self._background.post(self._on_follow_error, (job, exc))

    def _on_status(self, item: tuple[cm.Job, str]) -> None:
        if item[0] is self.job:
            self.status_label.setText(item[1])

    def _on_follow_error(self, item: tuple[cm.Job, Exception]) -> None:
        job, exc = item
        job.cancel()
        if job is self.job:
            self._set_running(False)
            self.status_label.setText(f"failed: {exc}")
        show_error(error_text(exc))

    def _on_event(self, item: tuple[cm.Job, cm.Event, Any]) -> None:
        job, event, stats = item
        if job is not self.job:
            return
        if isinstance(event, cm.Progress):
            self.progress_bar.setValue(round(event.fraction * 1000))
            eta = format_eta(event.eta_s)
            self.status_label.setText(
                f"tile {event.tiles_done} of {event.tiles_total}" + (f" · {eta}" if eta else "")
            )
        elif isinstance(event, cm.Completed):
            self._set_running(False)
            self.progress_bar.setValue(1000)
            self.result = event.result
            took = time.monotonic() - self._started_at
            if isinstance(stats, Exception):
                show_error(error_text(stats))
                stats = None
            self.stats_table.show_stats(stats)
            self.exports.set_enabled(self.result is not None)
            self.status_label.setText(f"done in {took:.1f} s")
        elif isinstance(event, cm.Failed):  # NapariSink shows it as a notification
            self._set_running(False)
            self.status_label.setText(f"failed: {event.message}")
        elif isinstance(event, cm.Canceled):
            self._set_running(False)
            self.status_label.setText("canceled")

    def _set_running(self, running: bool) -> None:
        self.run_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)
        for w in (self.mode_combo, self.layer_combo, self.test_button):
            w.setEnabled(not running)

    # -- export and threads -------------------------------------------------------------------
    def export(self, folder: str | os.PathLike, formats: Sequence[str]) -> dict[str, Path]:
        """Save the last result into `folder` (e.g. formats=["mrc", "stats"]); returns the paths."""
        return export_result(self.result, folder, formats)

    def wait_for_threads(self, timeout: float = 60.0) -> bool:
        """Join the widget's worker threads (for tests and shutdown); True if all ended."""
        return self._background.wait(timeout)


def _set_items(combo: QComboBox, items: Sequence[str]) -> None:
    """Replace a combo's items, keeping the current choice when it is still offered."""
    current = combo.currentText()
    combo.clear()
    combo.addItems(list(items))
    if current in items:
        combo.setCurrentText(current)


def _cancel_jobs(jobs: list[cm.Job], *_: Any) -> None:
    for job in jobs:
        if job.cancel():
            log.info("viewer closed: canceled job %s", job.id)


def _local_devices() -> list[str]:
    devices = ["auto", "cpu"]
    try:
        import torch

        devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    except Exception as exc:  # torch broken or missing: the job itself will say so
        log.debug("no CUDA devices: %s", exc)
    return devices
