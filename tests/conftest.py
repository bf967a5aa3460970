"""Shared fixtures: small real nnU-Net model folders, volumes on disk, plugin isolation."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

os.environ.setdefault("nnUNet_def_n_proc", "2")  # before anything imports nnU-Net
# Tiny test networks gain nothing from two OpenMP threads, and on a busy 2-core machine
# spinning OpenMP threads slow each convolution down a hundredfold.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest

DATA = Path(__file__).parent / "data"
REAL_MRC = DATA / "real-mrc"
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str) -> ModuleType:
    """Import scripts/<name>.py (not a package) as module `name`, for tests of a script."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class SlabSpy:
    """A lazily sliced volume that records how many z-planes each read asks for."""

    def __init__(self, array: np.ndarray) -> None:
        self.array, self.reads = array, []
        self.shape, self.dtype, self.ndim = array.shape, array.dtype, array.ndim

    def __getitem__(self, key):
        assert isinstance(key, slice), f"whole-volume read attempted with {key!r}"
        part = self.array[key]
        self.reads.append(part.shape[0])
        return part


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A real nnU-Net v2 model folder: 3-stage PlainConvUNet, 16³ patch, random weights, 1 fold."""
    from cryomamba.testing import make_model_folder

    return make_model_folder(
        tmp_path_factory.mktemp("models") / "tiny",
        patch_size=(16, 16, 16),
        features=(4, 8, 16),
        seed=1,
    )


@pytest.fixture(scope="session")
def tiny_model_3class_2folds(tmp_path_factory) -> Path:
    """Three labels, two folds (an ensemble), anisotropic 12×16×16 patch."""
    from cryomamba.testing import make_model_folder

    return make_model_folder(
        tmp_path_factory.mktemp("models") / "tiny3",
        patch_size=(12, 16, 16),
        features=(4, 8),
        labels=("background", "membrane", "particle"),
        folds=(0, 1),
        seed=2,
    )


@pytest.fixture
def noise_volume() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(30, 40, 36)).astype(np.float32)


@pytest.fixture
def mrc_file(tmp_path, noise_volume) -> Path:
    import mrcfile

    path = tmp_path / "tomo.mrc"
    with mrcfile.new(path) as mrc:
        mrc.set_data(noise_volume)
        mrc.voxel_size = (10.0, 10.0, 10.0)
        mrc.header.origin = (100.0, 200.0, 300.0)
    return path
