"""Tests for cryomamba.artifacts: each file format read back with its own library."""

from __future__ import annotations

import io
import json
import os
import warnings
from pathlib import Path

import mrcfile
import nibabel as nib
import nrrd
import numpy as np
import pytest

from cryomamba import artifacts
from cryomamba.artifacts import (
    FORMATS,
    save_artifacts,
    write_mrc,
    write_nifti,
    write_nrrd,
    write_stats_json,
)
from cryomamba.errors import InvalidVolumeError, OutputError

REAL = Path(__file__).parent / "data" / "real-mrc" / "chlamy_hsp60_relion_ispg0.mrc"
VOXEL = (30.0, 20.0, 10.0)  # z, y, x in Å: every axis different, so swaps show
ORIGIN = (-300.0, 200.0, 100.0)


@pytest.fixture
def labels() -> np.ndarray:
    """An asymmetric mask: an L-shaped label 1, one voxel of label 2 in a corner, label 3."""
    lab = np.zeros((6, 7, 9), np.uint8)
    lab[1:4, 2, 1:7] = 1
    lab[1, 2:6, 1] = 1
    lab[0, 0, 8] = 2
    lab[5, 6, 0:3] = 3
    return lab


def test_mrc_round_trip_keeps_data_voxel_size_origin_and_stats(tmp_path, labels):
    path = write_mrc(tmp_path / "m.mrc", labels, voxel_size=VOXEL, origin=ORIGIN)
    with mrcfile.open(path) as mrc:
        assert int(mrc.header.mode) == 0
        np.testing.assert_array_equal(mrc.data, labels)
        vs, o = mrc.voxel_size, mrc.header.origin
        assert (float(vs.x), float(vs.y), float(vs.z)) == VOXEL[::-1]
        assert (float(o.x), float(o.y), float(o.z)) == ORIGIN[::-1]
        h = mrc.header
        assert (h.dmin, h.dmax) == (labels.min(), labels.max())
        assert h.dmean == pytest.approx(labels.mean(), rel=1e-6)
        assert h.rms == pytest.approx(labels.std(), rel=1e-6)
        assert any("cryomamba" in text for text in mrc.get_labels())
        report = io.StringIO()
        assert mrc.validate(print_file=report), report.getvalue()


def test_mrc_labels_above_127_use_mode_6(tmp_path, labels):
    labels[2, 3, 4] = 200
    with mrcfile.open(write_mrc(tmp_path / "m.mrc", labels, voxel_size=VOXEL)) as mrc:
        assert int(mrc.header.mode) == 6 and mrc.data.dtype == np.uint16
        np.testing.assert_array_equal(mrc.data, labels)


def test_mrc_takes_origin_and_start_from_header_like(tmp_path, labels):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with mrcfile.open(REAL, permissive=True, header_only=True) as src:
            header = src.header.copy()
    header.origin.x, header.nxstart, header.nzstart = 12.5, 3, -4
    path = write_mrc(tmp_path / "m.mrc", labels, voxel_size=VOXEL, header_like=header)
    with mrcfile.open(path) as mrc:
        assert float(mrc.header.origin.x) == 12.5
        assert (int(mrc.header.nxstart), int(mrc.header.nzstart)) == (3, -4)


def test_nifti_axes_spacing_and_units(tmp_path, labels):
    path = write_nifti(tmp_path / "m.nii.gz", labels, voxel_size=VOXEL, origin=ORIGIN)
    img = nib.load(path)
    assert img.header.get_zooms() == pytest.approx((0.001, 0.002, 0.003))  # x, y, z in µm
    assert img.header.get_xyzt_units()[0] == "micron"
    assert img.header.get_intent()[0] == "label"
    assert img.get_data_dtype() == np.uint8
    np.testing.assert_allclose(img.affine[:3, 3], [0.01, 0.02, -0.03])
    np.testing.assert_array_equal(np.asarray(img.dataobj).T, labels)
    assert img.dataobj.shape == (9, 7, 6)


def test_nrrd_axes_spacing_and_units(tmp_path, labels):
    path = write_nrrd(tmp_path / "m.nrrd", labels.astype(np.int64), voxel_size=VOXEL, origin=ORIGIN)
    data, header = nrrd.read(str(path), index_order="C")
    np.testing.assert_array_equal(data, labels)
    assert data.dtype == np.uint8
    np.testing.assert_allclose(header["space directions"], np.diag([0.001, 0.002, 0.003]))
    np.testing.assert_allclose(header["space origin"], [0.01, 0.02, -0.03])
    assert list(header["sizes"]) == [9, 7, 6]  # x fastest
    assert header["space units"] == ["microns"] * 3 and header["encoding"] == "gzip"


def test_stats_json_converts_numpy_values(tmp_path):
    path = write_stats_json(
        tmp_path / "s.json", {"n": np.int64(3), "a": np.arange(2), "p": tmp_path}
    )
    assert json.loads(path.read_text()) == {"n": 3, "a": [0, 1], "p": str(tmp_path)}


def test_save_artifacts_writes_every_format(tmp_path, labels):
    out = tmp_path / "new" / "folder"
    provenance = {"model": "demo-membrane", "model_sha256": "ab" * 32, "source_sha256": "cd" * 32}
    paths = save_artifacts(
        out,
        labels,
        voxel_size=VOXEL,
        origin=ORIGIN,
        image=labels * 1.5,
        provenance=provenance,
        label_names={1: "membrane"},
    )
    default = ["mrc", "nifti", "nrrd", "stats", "png"]  # zarr and probabilities are opt-in
    assert list(paths) == default
    assert sorted(p.name for p in out.iterdir()) == sorted(FORMATS[f] for f in default)
    stats = json.loads(paths["stats"].read_text())
    assert stats["provenance"] == provenance
    assert [(e["label"], e["name"]) for e in stats["labels"]] == [
        (1, "membrane"),
        (2, "label_2"),
        (3, "label_3"),
    ]
    assert stats["labels"][1]["voxel_count"] == 1


def test_save_artifacts_subset_and_given_stats(tmp_path, labels):
    paths = save_artifacts(
        tmp_path,
        labels,
        voxel_size=VOXEL,
        formats=["stats", "mrc", "stats"],
        stats={"labels": [], "note": "given"},
    )
    assert list(paths) == ["stats", "mrc"]
    assert json.loads(paths["stats"].read_text()) == {
        "labels": [],
        "note": "given",
        "provenance": {},
    }


def test_unknown_format_lists_the_valid_ones(tmp_path, labels):
    with pytest.raises(ValueError, match=r"'tiff'.*valid: mrc, nifti, nrrd, stats, png"):
        save_artifacts(tmp_path, labels, voxel_size=VOXEL, formats=("mrc", "tiff"))


def test_folder_under_a_file_is_an_output_error(tmp_path, labels):
    (tmp_path / "afile").write_text("x")
    target = tmp_path / "afile" / "out"
    with pytest.raises(OutputError, match="afile") as info:
        save_artifacts(target, labels, voxel_size=VOXEL)
    assert info.value.code == "output_not_writable" and info.value.hint


def test_read_only_folder_is_an_output_error(tmp_path, labels):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("running as a user who can write to read-only folders (root)")
        with pytest.raises(OutputError, match="cannot write into"):
            save_artifacts(folder, labels, voxel_size=VOXEL)
    finally:
        folder.chmod(0o755)


def test_failure_in_a_later_writer_leaves_nothing_behind(tmp_path, labels, monkeypatch):
    def broken_nrrd(path, *args, **kwargs):
        Path(path).write_bytes(b"NRRD0004\npartial")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(artifacts, "write_nrrd", broken_nrrd)
    with pytest.raises(RuntimeError, match="disk on fire"):
        save_artifacts(tmp_path, labels, voxel_size=VOXEL)
    assert list(tmp_path.iterdir()) == []


def test_failure_while_renaming_removes_the_files_already_in_place(tmp_path, labels, monkeypatch):
    real_replace, calls = os.replace, []

    def flaky_replace(src, dst):
        calls.append(dst)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(artifacts.os, "replace", flaky_replace)
    with pytest.raises(OutputError, match="No space left"):
        save_artifacts(tmp_path, labels, voxel_size=VOXEL)
    assert list(tmp_path.iterdir()) == []


def test_bad_labels_are_refused_before_anything_is_written(tmp_path):
    with pytest.raises(InvalidVolumeError):
        save_artifacts(tmp_path / "o", np.zeros((3, 3, 3), np.float32), voxel_size=VOXEL)
    with pytest.raises(InvalidVolumeError, match=r"0\.\.65535"):
        write_mrc(tmp_path / "m.mrc", np.full((2, 2, 2), -1, np.int16), voxel_size=VOXEL)
    assert not (tmp_path / "o").exists()


def test_public_api():
    assert set(artifacts.__all__) == {
        "FORMATS",
        "check_output_dir",
        "existing_artifacts",
        "save_artifacts",
        "write_mrc",
        "write_nifti",
        "write_nrrd",
        "write_overview_png",
        "write_stats_json",
    }
    assert list(FORMATS) == ["mrc", "nifti", "nrrd", "stats", "png", "zarr", "probabilities"]


def test_check_output_dir_refuses_a_path_below_a_file_and_creates_nothing(tmp_path):
    from cryomamba.artifacts import check_output_dir
    from cryomamba.errors import OutputError

    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        check_output_dir(tmp_path / "file.txt" / "out")
    check_output_dir(tmp_path / "new" / "deeper")
    assert not (tmp_path / "new").exists()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_check_output_dir_refuses_a_folder_that_cannot_be_created_even_for_root():
    from cryomamba.artifacts import check_output_dir

    with pytest.raises(OutputError, match="cannot create output folder /proc/cryomamba-x"):
        check_output_dir("/proc/cryomamba-x")


def test_check_output_dir_leaves_an_existing_folder_as_it_was(tmp_path):
    from cryomamba.artifacts import check_output_dir

    (tmp_path / "keep.txt").write_text("x")
    check_output_dir(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_existing_artifacts_names_the_files_a_save_would_replace(tmp_path, labels):
    from cryomamba.artifacts import existing_artifacts

    assert existing_artifacts(tmp_path / "new", FORMATS) == []
    save_artifacts(tmp_path, labels, voxel_size=VOXEL, formats=["mrc", "stats"])
    assert existing_artifacts(tmp_path, FORMATS) == [tmp_path / "mask.mrc", tmp_path / "stats.json"]
    assert existing_artifacts(tmp_path, ["png"]) == []


def test_check_output_dir_for_sibling_outputs_from_many_threads_at_once(tmp_path):
    """Jobs checking sibling folders under one new parent (segs/a, segs/b) do not trip over
    each other's mkdir and cleanup; each check still leaves nothing behind."""
    from concurrent.futures import ThreadPoolExecutor
    from threading import Barrier

    from cryomamba.artifacts import check_output_dir

    threads = 8
    for round_ in range(30):
        parent = tmp_path / f"segs{round_}"
        barrier = Barrier(threads)

        def check(i: int, parent: Path = parent, barrier: Barrier = barrier) -> None:
            barrier.wait()
            check_output_dir(parent / f"tomo{i}")

        with ThreadPoolExecutor(threads) as pool:
            for future in [pool.submit(check, i) for i in range(threads)]:
                future.result()  # an OutputError here is the race
        assert not parent.exists() or not any(parent.iterdir())
