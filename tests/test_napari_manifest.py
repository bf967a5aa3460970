"""The napari-cryomamba npe2 manifest: valid, installed, discovered, pointing at real code."""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
from importlib import resources
from importlib.metadata import distribution
from pathlib import Path

import pytest

npe2 = pytest.importorskip("npe2")
if importlib.util.find_spec("napari_cryomamba") is None:
    pytest.skip("napari-cryomamba is not installed (scripts/setup.sh)", allow_module_level=True)
PluginManager, PluginManifest = npe2.PluginManager, npe2.PluginManifest

PLUGIN = Path(__file__).parents[1] / "plugins" / "napari-cryomamba"
READER = "napari_cryomamba._reader:get_reader"
WIDGET = "napari_cryomamba._widget:CryoMambaWidget"


@pytest.fixture(scope="module")
def manifest() -> PluginManifest:
    return PluginManifest.from_distribution("napari-cryomamba")


def test_npe2_validate_passes():
    script = Path(sys.executable).with_name("npe2")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "npe2"]
    out = subprocess.run([*cmd, "validate", "napari-cryomamba"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "valid" in out.stdout


def test_the_manifest_is_package_data_named_by_the_entry_point():
    eps = distribution("napari-cryomamba").entry_points.select(group="napari.manifest")
    assert [(ep.name, ep.value) for ep in eps] == [
        ("napari-cryomamba", "napari_cryomamba:napari.yaml")
    ]
    assert (resources.files("napari_cryomamba") / "napari.yaml").is_file()
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((PLUGIN / "pyproject.toml").read_text())["project"]
    assert project["name"] == "napari-cryomamba"
    assert {"cryomamba", "napari>=0.5", "superqt>=0.6"} <= set(project["dependencies"])
    assert project["entry-points"]["napari.manifest"] == {
        "napari-cryomamba": "napari_cryomamba:napari.yaml"
    }


def test_contributions(manifest):
    commands = {c.id: c.python_name for c in manifest.contributions.commands}
    (reader,) = manifest.contributions.readers
    assert commands[reader.command] == READER
    assert set(reader.filename_patterns) == {"*.mrc", "*.map", "*.rec", "*.mrcs", "*.zarr"}
    assert reader.accepts_directories  # OME-Zarr images are folders
    (widget,) = manifest.contributions.widgets
    assert commands[widget.command] == WIDGET
    assert widget.display_name == "CryoMamba"


def test_npe2_discovers_the_reader_and_the_widget():
    pm = PluginManager()
    pm.discover()
    assert "napari-cryomamba" in pm
    for name in ("tomo.mrc", "TOMO.MRC", "emd_1234.map", "tilt.rec", "particles.mrcs"):
        readers = {r.plugin_name for r in pm.iter_compatible_readers([name])}
        assert "napari-cryomamba" in readers, name
    for name in ("tomo.tif", "tomo.mrc.gz", "notes.txt"):
        readers = {r.plugin_name for r in pm.iter_compatible_readers([name])}
        assert "napari-cryomamba" not in readers, name
    widgets = {(w.plugin_name, w.display_name) for w in pm.iter_widgets()}
    assert ("napari-cryomamba", "CryoMamba") in widgets


def test_python_names_resolve(manifest):
    module, attr = READER.split(":")
    assert callable(getattr(importlib.import_module(module), attr))
    module, attr = WIDGET.split(":")
    if importlib.util.find_spec(module) is None:  # the widget is written in its own change
        pytest.skip(f"{module} does not exist yet")
    if importlib.util.find_spec("qtpy") is None:
        pytest.skip("no Qt binding installed")
    assert callable(getattr(importlib.import_module(module), attr))
