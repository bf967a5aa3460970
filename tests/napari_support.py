"""Shared by the napari tests: skip cleanly where napari or a Qt GUI cannot start.

Qt aborts the whole process (it does not raise) when it cannot reach a display or load its
xcb/GL libraries, so whether a QApplication can start is checked once per session in a
subprocess. pytest-xvfb provides the display when Xvfb is installed (scripts/setup.sh
installs it and the libraries as root); do not set QT_QPA_PLATFORM (the offscreen platform
crashes when vispy draws an image layer).

Import the `qapp` override into a test module (`from napari_support import napari_gui,
qapp`) and every test there that needs a QApplication (qtbot, make_napari_viewer) skips
with the reason instead of taking the whole run down; the module's other tests still run.
`require_napari_gui()` skips from anywhere else.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys

import pytest

__all__ = ["gui_problem", "napari_gui", "qapp", "require_napari_gui"]

_PROBE = (
    "from qtpy.QtWidgets import QApplication; import vispy.gloo.gl; "
    "app = QApplication([]); print('ok')"
)


@functools.cache
def gui_problem() -> str | None:
    """Why napari tests cannot run here, or None when they can."""
    for module in ("napari", "pytestqt", "superqt", "napari_cryomamba"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (bash scripts/setup.sh installs it)"
    if sys.platform.startswith("linux") and not (
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    ):
        return "no display: install Xvfb (scripts/setup.sh does, as root) for pytest-xvfb"
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120
        )
    except subprocess.TimeoutExpired:
        return "Qt did not start within 120 s"
    if proc.returncode != 0 or "ok" not in proc.stdout:
        lines = (proc.stderr or proc.stdout).strip().splitlines()  # Qt's first line says why
        return f"Qt cannot start here: {lines[0] if lines else f'exit {proc.returncode}'}"
    return None


def require_napari_gui() -> None:
    """Skip the calling test module unless napari and a Qt GUI can run."""
    problem = gui_problem()
    if problem is not None:
        pytest.skip(problem, allow_module_level=True)


@pytest.fixture(scope="session")
def napari_gui() -> None:
    """Skips every test that uses it unless napari and a Qt GUI can run."""
    require_napari_gui()


@pytest.fixture(scope="session")
def qapp(napari_gui, qapp):
    """pytest-qt's QApplication, asked for only once `napari_gui` has not skipped."""
    return qapp
