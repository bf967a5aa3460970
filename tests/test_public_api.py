"""The public API is what we say it is, and importing it stays cheap."""

from __future__ import annotations

import inspect
import subprocess
import sys

import cryomamba

EXPECTED = {
    "Canceled",
    "Completed",
    "ConfigError",
    "CryoMambaError",
    "Event",
    "Failed",
    "InvalidVolumeError",
    "Job",
    "JobCanceledError",
    "JobConfig",
    "JobFailedError",
    "JobState",
    "ModelError",
    "ModelSpec",
    "OutputError",
    "Preview",
    "Progress",
    "Segmentation",
    "Volume",
    "__version__",
    "available_models",
    "copick",
    "hookimpl",
    "resolve_model",
    "threshold",
    "segment",
    "segment_many",
    "sinks",
    "submit",
}


def test_all_is_exactly_the_documented_api():
    assert set(cryomamba.__all__) == EXPECTED
    for name in EXPECTED - {"__version__", "hookimpl", "sinks", "copick"}:  # modules
        obj = getattr(cryomamba, name)  # raises if __all__ names something that is not there
        assert obj.__module__.startswith("cryomamba."), f"{name} comes from {obj.__module__}"
        assert inspect.getdoc(obj), f"cryomamba.{name} has no docstring"
    assert isinstance(cryomamba.__version__, str) and cryomamba.__version__[0].isdigit()
    assert cryomamba.hookimpl.project_name == "cryomamba"


def test_sinks_namespace():
    assert {"CallbackSink", "FileSink", "Sink", "as_sink"} <= set(cryomamba.sinks.__all__)


def test_import_does_not_pull_heavy_packages():
    code = (
        "import sys, cryomamba; heavy = [m for m in ('torch', 'nnunetv2', 'napari', 'httpx', "
        "'skimage', 'nibabel', 'nrrd', 'dask', 'distributed', 'zarr', 'ome_zarr', 'copick') "
        "if m in sys.modules]; "
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_real_mrc_copies_match_the_shared_collection():
    """tests/data/real-mrc copies ../shared/data/real-mrc; a file added there must be added here."""
    from pathlib import Path

    here = Path(__file__).parent / "data" / "real-mrc"
    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "real-mrc"
    if not shared.is_dir():
        import pytest

        pytest.skip("no ../shared checkout beside this repository")
    for src in sorted(p for p in shared.rglob("*") if p.is_file()):
        copy = here / src.relative_to(shared)
        assert copy.is_file(), f"{src.relative_to(shared)} is not copied into tests/data/real-mrc"
        assert copy.read_bytes() == src.read_bytes(), f"{copy} differs from {src}"


def test_the_package_says_it_is_typed():
    """PEP 561: type checkers read our annotations only if the package ships py.typed (the
    wheel takes every file in src/cryomamba)."""
    from importlib.resources import files

    assert (files("cryomamba") / "py.typed").is_file()
