"""The mask as OME-Zarr labels (NGFF 0.4): read back by ome-zarr and zarr, atomic, pyramid."""

from __future__ import annotations

import numpy as np
import pytest

import cryomamba as cm
from cryomamba.artifacts import save_artifacts
from cryomamba.zarr_write import auto_levels, write_ome_zarr_labels

zarr = pytest.importorskip("zarr")
pytest.importorskip("ome_zarr")


def _read_with_ome_zarr(path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Reader

    nodes = list(Reader(parse_url(str(path)))())
    node = nodes[0]
    assert any(isinstance(s, Label) for s in node.specs)
    return node


def test_segment_writes_mask_zarr_that_ome_zarr_reads(tiny_model, mrc_file, tmp_path):
    out = tmp_path / "out"
    sink = cm.sinks.FileSink(out, formats=["zarr", "mrc"])
    result = cm.segment(cm.Volume.open(mrc_file), model=str(tiny_model), sinks=[sink])
    assert {p.name for p in out.iterdir()} == {"mask.zarr", "mask.mrc"}
    node = _read_with_ome_zarr(out / "mask.zarr")
    level0 = np.asarray(node.data[0])
    np.testing.assert_array_equal(level0, result.labels)
    scale, shift = node.metadata["coordinateTransformations"][0]
    assert scale == {"type": "scale", "scale": [10.0, 10.0, 10.0]}
    assert shift == {"type": "translation", "translation": [300.0, 200.0, 100.0]}  # z, y, x
    assert [a["unit"] for a in node.metadata["axes"]] == ["angstrom"] * 3
    # and plain zarr, as copick and the portal's tools open it
    group = zarr.open(str(out / "mask.zarr"), mode="r")
    assert group["0"].dtype == np.uint8 and group["0"].chunks == (30, 40, 36)
    props = group.attrs["image-label"]["properties"]
    assert {p["label-value"]: p["name"] for p in props}[1] == result.label_names[1]
    # and our own reader
    back = cm.Volume.open(out / "mask.zarr")
    assert back.voxel_size == (10.0, 10.0, 10.0) and back.origin == (300.0, 200.0, 100.0)


def test_pyramid_is_nearest_and_every_level_is_written(tmp_path):
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, size=(37, 20, 18), dtype=np.uint8)
    write_ome_zarr_labels(
        tmp_path / "m.zarr", labels, voxel_size=(5, 4, 4), origin=(1, 2, 3), levels=3, chunk=8
    )
    group = zarr.open(str(tmp_path / "m.zarr"), mode="r")
    for k in range(3):
        f = 2**k
        np.testing.assert_array_equal(group[str(k)][:], labels[::f, ::f, ::f])
        ds = group.attrs["multiscales"][0]["datasets"][k]
        assert ds["coordinateTransformations"][0]["scale"] == [5.0 * f, 4.0 * f, 4.0 * f]
        assert ds["coordinateTransformations"][1]["translation"] == [1.0, 2.0, 3.0]
    assert auto_levels((30, 40, 36)) == 1 and auto_levels((500, 1000, 1000)) == 4  # 1000 / 8 ≤ 128


def test_uint16_labels_and_a_memmap_source(tmp_path):
    labels = np.lib.format.open_memmap(
        tmp_path / "l.npy", mode="w+", dtype=np.uint16, shape=(9, 8, 7)
    )
    labels[4:] = 300
    write_ome_zarr_labels(tmp_path / "m.zarr", labels, voxel_size=(1, 1, 1), levels=1)
    arr = zarr.open(str(tmp_path / "m.zarr"), mode="r")["0"]
    assert arr.dtype == np.uint16 and int(arr[8, 0, 0]) == 300


def test_zarr_artifact_replaces_the_old_one_and_failures_leave_nothing(tmp_path, monkeypatch):
    labels = np.zeros((6, 5, 4), np.uint8)
    labels[2:] = 1
    save_artifacts(tmp_path, labels, voxel_size=(1, 1, 1), formats=["zarr"])
    save_artifacts(tmp_path, 1 - labels, voxel_size=(2, 2, 2), formats=["zarr"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.zarr"]
    np.testing.assert_array_equal(zarr.open(str(tmp_path / "mask.zarr"))["0"][:], 1 - labels)

    import cryomamba.zarr_write as zw

    def broken(*args, **kwargs):
        zw.create_group(args[0])  # something on disk, then a failure
        raise OSError("disk full")

    monkeypatch.setattr(zw, "write_ome_zarr_labels", broken)
    out = tmp_path / "fresh"
    with pytest.raises(cm.OutputError, match="disk full"):
        save_artifacts(out, labels, voxel_size=(1, 1, 1), formats=["mrc", "zarr"])
    assert list(out.iterdir()) == []


def test_probabilities_need_to_be_asked_for_before_the_job(tmp_path):
    with pytest.raises(cm.OutputError, match="not computed") as err:
        save_artifacts(
            tmp_path, np.zeros((2, 2, 2), np.uint8), voxel_size=(1, 1, 1), formats=["probabilities"]
        )
    assert err.value.code == "probabilities_not_computed" and "formats" in err.value.hint
