"""Make the screenshots in docs/napari.md with a real napari, headless.

Opens a synthetic tomogram with the napari-cryomamba reader, docks the CryoMamba widget,
runs the bundled `demo-membrane` model locally and saves

- docs/images/napari-preview.png  the canvas mid-run: tomogram + preview overlay
- docs/images/napari-mask.png     the canvas at the end: tomogram + full-resolution mask
- docs/images/napari-widget.png   the dock widget at the end (progress, stats table, export)

Usage (from the repository root):

    .venv/bin/python scripts/napari_screenshots.py [--out docs/images]

With no $DISPLAY it starts a virtual X server itself (pyvirtualdisplay + Xvfb); otherwise
run it under `xvfb-run -a`. Leave QT_QPA_PLATFORM unset: Qt's `offscreen` platform crashes
when vispy draws an image (docs/napari.md, Troubleshooting).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("nnUNet_def_n_proc", str(os.cpu_count() or 1))

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (96, 192, 192)  # three tile rows of the demo model's 64³ patch in z: the preview grows
TIMEOUT_S = 900

log = logging.getLogger("napari_screenshots")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    display = None
    if not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
        try:
            from pyvirtualdisplay import Display
        except ImportError:
            sys.exit("no $DISPLAY: run `xvfb-run -a python scripts/napari_screenshots.py`")
        display = Display(visible=False, size=(1600, 1000), color_depth=24)
        display.start()
    try:
        with tempfile.TemporaryDirectory(prefix="cryomamba-shots-") as tmp:
            shoot(args.out, Path(tmp), args.seed)
    finally:
        if display is not None:
            display.stop()
    return 0


def shoot(out: Path, tmp: Path, seed: int) -> None:
    import napari
    import numpy as np
    from qtpy.QtCore import QRect
    from qtpy.QtWidgets import QApplication

    from cryomamba import synth

    out.mkdir(parents=True, exist_ok=True)
    path, _ = synth.write_mrc(synth.synthesize(SHAPE, seed=seed), tmp / "tomogram.mrc")
    viewer = napari.Viewer(show=True, title="CryoMamba")
    viewer.window.resize(1500, 950)
    (image,) = viewer.open(str(path), plugin="napari-cryomamba")
    _, widget = viewer.window.add_plugin_dock_widget("napari-cryomamba", "CryoMamba")
    widget.model_combo.setCurrentText("demo-membrane")
    widget.preview_interval.setValue(0.5)
    z = SHAPE[0] // 4  # a plane only the first row of tiles covers: finished early
    viewer.dims.set_point(0, image.translate[0] + z * image.scale[0])
    viewer.reset_view()

    def wait(condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + TIMEOUT_S
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"gave up waiting for {what}")
            QApplication.processEvents()
            time.sleep(0.02)

    def preview_at_plane() -> bool:
        preview = next((la for la in viewer.layers if la.name == f"{image.name} preview"), None)
        if preview is None:
            return False
        k = round(float(preview.world_to_data(viewer.dims.point)[0]))
        return 0 <= k < preview.data.shape[0] and bool(np.asarray(preview.data[k]).any())

    log.info("segmenting %s %s with demo-membrane ...", path.name, SHAPE)
    job = widget.run()
    if job is None:
        raise RuntimeError("the widget did not start a job (see the notification above)")
    wait(preview_at_plane, "a preview at the shown plane")
    QApplication.processEvents()
    save(viewer.screenshot(canvas_only=True), out / "napari-preview.png")
    wait(lambda: job.done and widget.run_button.isEnabled(), "the end of the job")
    if job.state != "completed":
        raise RuntimeError(f"the job ended {job.state}: {widget.status_label.text()}")
    wait(lambda: f"{image.name} mask" in [la.name for la in viewer.layers], "the mask layer")
    QApplication.processEvents()
    save(viewer.screenshot(canvas_only=True), out / "napari-mask.png")
    # the widget's own height, not the dock's: no empty band under the export buttons
    height = min(widget.height(), widget.sizeHint().height())
    widget.grab(QRect(0, 0, widget.width(), height)).save(str(out / "napari-widget.png"))
    log.info("wrote %s", out / "napari-widget.png")
    viewer.close()


def save(rgba, path: Path) -> None:
    from PIL import Image

    Image.fromarray(rgba).save(path, optimize=True)
    log.info("wrote %s", path)


if __name__ == "__main__":
    raise SystemExit(main())
