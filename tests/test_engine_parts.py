"""Direct tests of the engine's small parts: the tile grid, normalization, the device choice.

Written against behaviour (where tiles start, how many, that they cover every voxel; what a
normalized block holds; which device a name gives), not against how each is computed.
"""

from __future__ import annotations

import itertools
import threading

import numpy as np
import pytest
import torch

from cryomamba.engine.cancel import Canceled
from cryomamba.engine.device import resolve_device
from cryomamba.engine.normalize import make_normalizer, scan_intensities
from cryomamba.engine.tiling import TileGrid
from cryomamba.errors import ConfigError, InvalidVolumeError, ModelError


# -- the tile grid ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("shape", "patch", "step"),
    [
        ((40, 50, 60), (16, 16, 16), 0.5),
        ((17, 33, 64), (16, 32, 32), 0.25),
        ((64, 64, 64), (16, 16, 16), 1.0),
    ],
)
def test_tiles_cover_every_voxel_and_stay_inside(shape, patch, step):
    grid = TileGrid.build(shape, patch, step)
    covered = np.zeros(grid.padded, dtype=np.int32)
    for z in grid.steps[0]:
        for y, x in grid.row_tiles():
            assert z >= 0 and z + patch[0] <= grid.padded[0]
            assert y >= 0 and y + patch[1] <= grid.padded[1]
            assert x >= 0 and x + patch[2] <= grid.padded[2]
            covered[z : z + patch[0], y : y + patch[1], x : x + patch[2]] += 1
    assert covered.min() >= 1  # no voxel is left out
    assert grid.n_tiles == len(grid.steps[0]) * len(grid.row_tiles())


@pytest.mark.parametrize("step", [0.5, 0.25])
def test_steps_start_at_zero_end_at_the_edge_and_overlap_as_asked(step):
    grid = TileGrid.build((100, 40, 40), (20, 20, 20), step)
    for axis, starts in enumerate(grid.steps):
        assert starts[0] == 0 and starts[-1] == grid.padded[axis] - grid.patch[axis]
        gaps = [b - a for a, b in itertools.pairwise(starts)]
        assert gaps == sorted(gaps, reverse=True) or len(set(gaps)) <= 2  # evenly spread
        assert max(gaps, default=0) <= grid.patch[axis] * step  # at least the asked overlap
    # z: 80 voxels to travel in steps of at most 20 * step
    assert len(grid.steps[0]) == int(np.ceil(80 / (20 * step))) + 1


def test_a_volume_smaller_than_the_patch_is_padded_around_its_centre():
    grid = TileGrid.build((10, 40, 7), (16, 16, 16), 0.5)
    assert grid.padded == (16, 40, 16)
    assert grid.pad_below == (3, 0, 4)  # the odd voxel of padding goes above
    assert grid.steps[0] == (0,) and grid.steps[2] == (0,)


def test_a_z_row_is_finished_up_to_the_next_rows_start():
    grid = TileGrid.build((50, 16, 16), (16, 16, 16), 0.5)
    zs = grid.steps[0]
    assert [grid.final_plane(r) for r in range(len(zs))] == [*zs[1:], grid.padded[0]]


def test_a_tile_step_out_of_range_is_refused():
    for step in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="tile_step"):
            TileGrid.build((32, 32, 32), (16, 16, 16), step)


# -- normalization ---------------------------------------------------------------------------------
def test_zscore_matches_whole_volume_statistics_in_chunks():
    rng = np.random.default_rng(0)
    data = (rng.normal(size=(30, 20, 10)) * 7 + 3).astype(np.float32)
    released = []
    scan = scan_intensities(data, chunk_bytes=4000, release=lambda a, b: released.append((a, b)))
    assert len(released) > 3  # it read the volume in several chunks, giving pages back
    assert scan.mean == pytest.approx(float(data.astype(np.float64).mean()), rel=1e-9)
    assert scan.std == pytest.approx(float(data.astype(np.float64).std()), rel=1e-9)
    assert (scan.minimum, scan.maximum) == (float(data.min()), float(data.max()))
    normalize = make_normalizer("ZScoreNormalization", scan, {})
    out = normalize(data.copy())
    assert out.dtype == np.float32
    assert abs(float(out.mean())) < 1e-5 and float(out.std()) == pytest.approx(1.0, rel=1e-5)


def test_the_bounding_box_is_the_nonzero_region():
    data = np.zeros((20, 30, 40), np.float32)
    data[5:9, 10:12, 3:30] = np.arange(4 * 2 * 27, dtype=np.float32).reshape(4, 2, 27) + 1
    scan = scan_intensities(data)
    assert scan.bbox == ((5, 9), (10, 12), (3, 30))
    assert scan.bbox_shape == (4, 2, 27)
    assert scan.minimum == 1.0  # statistics of the box only: the zeros around are not counted


def test_ct_rescale_and_none():
    data = np.array([[[-100.0, 0.0, 50.0, 500.0]]], np.float32)
    scan = scan_intensities(data)
    props = {"percentile_00_5": -10.0, "percentile_99_5": 100.0, "mean": 20.0, "std": 10.0}
    ct = make_normalizer("CTNormalization", scan, props)(data.copy())
    np.testing.assert_allclose(ct, [[[-3.0, -2.0, 3.0, 8.0]]])
    rescaled = make_normalizer("RescaleTo01Normalization", scan, {})(data.copy())
    np.testing.assert_allclose(rescaled, [[[0.0, 100 / 600, 150 / 600, 1.0]]], rtol=1e-6)
    same = make_normalizer("NoNormalization", scan, {})(data.copy())
    np.testing.assert_array_equal(same, data)


def test_normalization_refusals():
    data = np.random.default_rng(1).normal(size=(4, 4, 4)).astype(np.float32)
    scan = scan_intensities(data)
    with pytest.raises(ModelError, match="percentile_00_5"):
        make_normalizer("CTNormalization", scan, {})
    with pytest.raises(ModelError, match="use_mask_for_norm"):
        make_normalizer("ZScoreNormalization", scan, {}, use_mask_for_norm=True)
    with pytest.raises(ModelError, match="unsupported"):
        make_normalizer("MadeUpNormalization", scan, {})
    bad = data.copy()
    bad[1, 2, 3] = np.nan
    with pytest.raises(InvalidVolumeError, match="NaN"):
        scan_intensities(bad)
    with pytest.raises(InvalidVolumeError, match="constant"):
        scan_intensities(np.full((4, 4, 4), 2.5, np.float32))


def test_a_scan_can_be_canceled():
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Canceled):
        scan_intensities(np.ones((8, 8, 8), np.float32), cancel=cancel)


# -- the device ------------------------------------------------------------------------------------
def test_cpu_and_auto_without_a_gpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="no GPU") as err:
        resolve_device("cuda:0")
    assert "cpu" in err.value.hint


def test_cuda_devices_are_checked_against_those_present(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="cuda:2") as err:
        resolve_device("cuda:2")
    assert "cuda:0 .. cuda:1" in err.value.hint


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("classes", [1, 2, 3, 5])
def test_argmax_first_is_torch_argmax_with_ties_and_nan(classes, dtype):
    from cryomamba.engine.finalize import argmax_first

    rng = np.random.default_rng(classes)
    pred = torch.from_numpy(rng.integers(-3, 4, size=(classes, 3, 17, 19))).to(dtype)  # ties
    assert torch.equal(argmax_first(pred), pred.argmax(0).to(torch.uint8))
    pred[-1, 0, 0, :4] = float("nan")  # a NaN is the maximum for torch: the same here
    pred[0, 1, 2, 3] = float("nan")
    assert torch.equal(argmax_first(pred), pred.argmax(0).to(torch.uint8))
