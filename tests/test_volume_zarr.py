"""OME-Zarr input: metadata from NGFF multiscales, lazy chunked reads, clear errors."""

from __future__ import annotations

import tracemalloc
from collections.abc import MutableMapping

import numpy as np
import pytest

import cryomamba as cm
from cryomamba.volume_zarr import ZarrVolume, open_ome_zarr

zarr = pytest.importorskip("zarr")
ome_writer = pytest.importorskip("ome_zarr.writer")


def _write_image(path, data, *, unit="nanometer", scale=(1.0, 0.8, 0.8), shift=(2.0, 3.0, 4.0)):
    """An OME-Zarr image written by the community's writer (ome-zarr), two levels."""
    group = zarr.group(store=zarr.storage.DirectoryStore(str(path), dimension_separator="/"))
    axes = [{"name": a, "type": "space", "unit": unit} for a in "zyx"]
    pyramid = [data, data[::2, ::2, ::2]]
    transforms = [
        [
            {"type": "scale", "scale": [s * 2**k for s in scale]},
            {"type": "translation", "translation": list(shift)},
        ]
        for k in range(2)
    ]
    ome_writer.write_multiscale(
        pyramid,
        group,
        axes=axes,
        coordinate_transformations=transforms,
        storage_options={"chunks": (8, 8, 8)},
    )
    return path


def test_open_reads_scale_translation_and_units(tmp_path, noise_volume):
    path = _write_image(tmp_path / "tomo.zarr", noise_volume)
    vol = cm.Volume.open(path)
    assert isinstance(vol, ZarrVolume)
    assert vol.shape == noise_volume.shape and vol.dtype == np.float32
    assert vol.voxel_size == pytest.approx((10.0, 8.0, 8.0))  # nm → Å
    assert vol.origin == pytest.approx((20.0, 30.0, 40.0))
    assert vol.voxel_size_known
    np.testing.assert_array_equal(np.asarray(vol.data), noise_volume)
    np.testing.assert_array_equal(vol.slab(3, 9), noise_volume[3:9])
    lvl = cm.Volume.open(path, level=1)
    assert lvl.shape == noise_volume[::2, ::2, ::2].shape
    assert lvl.voxel_size == pytest.approx((20.0, 16.0, 16.0))
    assert vol.describe()["levels"] == 2
    st, ref = vol.stats(chunk_bytes=4096), noise_volume.astype(np.float64)
    assert st.mean == pytest.approx(ref.mean()) and st.std == pytest.approx(ref.std())


def test_lazy_view_slices_and_transposes_like_numpy(tmp_path, noise_volume):
    vol = cm.Volume.open(_write_image(tmp_path / "t.zarr", noise_volume))
    view, ref = vol.data, noise_volume
    np.testing.assert_array_equal(view[2:7, 5], ref[2:7, 5])
    np.testing.assert_array_equal(view[-3], ref[-3])
    np.testing.assert_array_equal(
        np.asarray(view.transpose((2, 0, 1))[1:4, :, 2:9]), ref.transpose(2, 0, 1)[1:4, :, 2:9]
    )
    np.testing.assert_array_equal(np.asarray(view[1:20][3:9, 2:5]), ref[1:20][3:9, 2:5])
    np.testing.assert_array_equal(view[::3], ref[::3])  # strided: read, then numpy


class _CountingStore(MutableMapping):
    """A store in memory that records every chunk key read."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.reads: list[str] = []

    def __getitem__(self, key):
        if not key.split("/")[-1].startswith("."):
            self.reads.append(key)
        return self.data[key]

    def __setitem__(self, key, value):
        self.data[key] = value

    def __delitem__(self, key):
        del self.data[key]

    def __iter__(self):
        return iter(self.data)

    def __len__(self):
        return len(self.data)


def _big_sparse_image(store, shape=(1024, 1024, 1024), chunk=32):
    """A 1 GiB uint8 OME-Zarr whose chunks are mostly unwritten (fill value): cheap to build."""
    group = zarr.group(store=store)
    arr = group.create_dataset("0", shape=shape, chunks=(chunk,) * 3, dtype=np.uint8, fill_value=7)
    arr[:chunk, :chunk, :chunk] = np.arange(chunk**3, dtype=np.uint64).reshape((chunk,) * 3) % 251
    group.attrs["multiscales"] = [
        {
            "version": "0.4",
            "axes": [{"name": a, "type": "space", "unit": "angstrom"} for a in "zyx"],
            "datasets": [
                {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [10.0] * 3}]}
            ],
        }
    ]
    return arr


def test_reads_touch_only_the_chunks_asked_for(tmp_path):
    store = _CountingStore()
    _big_sparse_image(store)
    vol = open_ome_zarr(store)
    assert vol.shape == (1024, 1024, 1024) and vol.voxel_size == (10.0, 10.0, 10.0)
    store.reads.clear()
    region = vol.data[16:48, 0:16, 0:16]  # lazy: nothing read yet
    assert store.reads == []
    block = np.asarray(region)
    assert block.shape == (32, 16, 16)
    assert set(store.reads) == {"0/0.0.0", "0/1.0.0"}  # two chunks of 32³, not the volume
    store.reads.clear()
    plane = vol.data[40, 0:64:8, 0:64:8]  # strided (napari's contrast sample): the span only
    assert plane.shape == (8, 8) and (plane == 7).all()
    assert set(store.reads) <= {"0/1.0.0", "0/1.0.1", "0/1.1.0", "0/1.1.1"}


def test_memory_stays_bounded_reading_tiles_of_a_1gib_zarr(tmp_path):
    from cryomamba.engine.tiling import TileGrid, cut_tile

    _big_sparse_image(zarr.storage.DirectoryStore(str(tmp_path / "big.zarr")))
    vol = cm.Volume.open(tmp_path / "big.zarr")
    grid = TileGrid.build(vol.shape, (64, 64, 64), 0.5)
    tracemalloc.start()
    for z, y, x in [(0, 0, 0), (480, 512, 960), (960, 960, 960)]:
        tile = cut_tile(vol.data, grid, z, y, x, lambda a: a)
        assert tile.shape == (1, 64, 64, 64)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 16 << 20, f"{peak} bytes for 64³ tiles of a 1 GiB volume"


def test_zarr_input_segments_bit_equal_to_the_same_data_as_mrc(
    tiny_model, mrc_file, noise_volume, tmp_path
):
    path = _write_image(
        tmp_path / "tomo.zarr", noise_volume, unit="angstrom", scale=(10.0, 10.0, 10.0)
    )
    from_mrc = cm.segment(cm.Volume.open(mrc_file), model=str(tiny_model))
    from_zarr = cm.segment(str(path), model=str(tiny_model))
    np.testing.assert_array_equal(from_zarr.labels, from_mrc.labels)
    assert from_zarr.voxel_size == (10.0, 10.0, 10.0)
    assert from_zarr.origin == pytest.approx((2.0, 3.0, 4.0))  # Å: the translation as is


def test_not_an_image_errors(tmp_path):
    zarr.open_array(str(tmp_path / "bare.zarr"), mode="w", shape=(4, 4, 4), dtype="u1")
    with pytest.raises(cm.InvalidVolumeError, match="bare zarr array"):
        cm.Volume.open(tmp_path / "bare.zarr")
    zarr.group(store=str(tmp_path / "plain.zarr"))
    with pytest.raises(cm.InvalidVolumeError, match="not an OME-Zarr image") as err:
        cm.Volume.open(tmp_path / "plain.zarr")
    assert err.value.hint
    with pytest.raises(cm.InvalidVolumeError, match="does not exist"):
        cm.Volume.open(tmp_path / "missing.zarr")


def test_2d_images_and_unknown_units_are_refused(tmp_path):
    group = zarr.group(store=str(tmp_path / "flat.zarr"))
    ome_writer.write_image(np.zeros((16, 16), np.uint8), group, axes="yx")
    with pytest.raises(cm.InvalidVolumeError, match="needs z, y and x"):
        cm.Volume.open(tmp_path / "flat.zarr")
    path = _write_image(tmp_path / "sec.zarr", np.zeros((4, 4, 4), np.float32), unit="parsec")
    with pytest.raises(cm.InvalidVolumeError, match="unit 'parsec'") as err:
        cm.Volume.open(path)
    assert "angstrom" in err.value.hint


def test_a_missing_level_says_which_exist(tmp_path, noise_volume):
    path = _write_image(tmp_path / "t.zarr", noise_volume)
    with pytest.raises(cm.ConfigError, match=r"2 level\(s\) \(0..1\), not level 5"):
        cm.Volume.open(path, level=5)


def test_mrc_files_have_only_level_0(mrc_file):
    with pytest.raises(cm.ConfigError, match="one resolution level"):
        cm.Volume.open(mrc_file, level=1)
