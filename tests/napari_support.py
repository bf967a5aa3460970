"""Shared by the napari tests: skip cleanly where napari or a Qt GUI cannot start.

Qt aborts the whole process (it does not raise) when it cannot reach a display or load its
xcb/GL libraries, so whether a QApplication can start is checked once per session in a
subprocess. pytest-xvfb provides the display when Xvfb is installed (scripts/setup.sh
installs it and the libraries as root); do not set QT_QPA_PLATFORM (the offscreen platform
crashes when vispy draws an image layer).

    from napari_support import require_napari_gui
    require_napari_gui()  # at module level, before importing napari
"""

from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys

import pytest

__all__ = ["gui_problem", "require_napari_gui"]

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
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        return f"Qt cannot start here: {lines[-1] if lines else f'exit {proc.returncode}'}"
    return None


def require_napari_gui() -> None:
    """Skip the calling test module unless napari and a Qt GUI can run."""
    problem = gui_problem()
    if problem is not None:
        pytest.skip(problem, allow_module_level=True)
