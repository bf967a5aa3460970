"""Cohorts: `segment_many` and `cryomamba batch`, local executor (dask: test_executor_dask)."""

from __future__ import annotations

import csv
from pathlib import Path

import mrcfile
import numpy as np
import pytest

import cryomamba as cm
from cryomamba.cli import main
from cryomamba.cohort import expand_inputs


def _write(path: Path, seed: int, shape=(20, 24, 24)) -> Path:
    data = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(data)
        mrc.voxel_size = 10.0
    return path


@pytest.fixture
def cohort(tmp_path) -> Path:
    """Two good tomograms and one corrupt file in a folder."""
    folder = tmp_path / "tomos"
    folder.mkdir()
    _write(folder / "a.mrc", 1)
    _write(folder / "b.mrc", 2)
    (folder / "broken.mrc").write_bytes(b"not an mrc file\n" * 200)
    (folder / "notes.txt").write_text("not a tomogram")
    return folder


def _summary(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_expand_inputs_takes_paths_globs_and_folders(cohort):
    names = lambda paths: [p.name for p in paths]  # noqa: E731
    assert names(expand_inputs(cohort)) == ["a.mrc", "b.mrc", "broken.mrc"]
    assert names(expand_inputs(str(cohort / "[ab].mrc"))) == ["a.mrc", "b.mrc"]
    assert names(expand_inputs([cohort / "b.mrc", str(cohort / "*.mrc")])) == [
        "b.mrc",
        "a.mrc",
        "broken.mrc",
    ]
    with pytest.raises(cm.ConfigError, match="matches no file"):
        expand_inputs(str(cohort / "*.rec"))


def test_a_bad_input_fails_alone_and_a_rerun_does_only_what_is_missing(
    cohort, tmp_path, tiny_model
):
    out = tmp_path / "segs"
    cfg = cm.JobConfig(model=str(tiny_model), formats=("mrc", "stats"))
    items = cm.segment_many(cohort, cfg, out=out)
    states = {i.source.name: (i.state, i.error_code) for i in items}
    assert states == {
        "a.mrc": ("completed", ""),
        "b.mrc": ("completed", ""),
        "broken.mrc": ("failed", "invalid_volume"),
    }
    assert sorted(p.name for p in (out / "a").iterdir()) == ["mask.mrc", "stats.json"]
    assert not (out / "broken").exists()
    rows = _summary(out / "summary.csv")
    assert [r["tomogram"] for r in rows] == [
        str(cohort / n) for n in ("a.mrc", "b.mrc", "broken.mrc")
    ]
    a = rows[0]
    assert a["state"] == "completed" and float(a["seconds"]) > 0 and a["error_code"] == ""
    with mrcfile.open(out / "a" / "mask.mrc") as mrc:
        assert int(a["voxels_membrane"]) == int((mrc.data == 1).sum())
    assert rows[2]["error_code"] == "invalid_volume" and "MRC" in rows[2]["error"]

    mtime = (out / "a" / "mask.mrc").stat().st_mtime_ns
    again = cm.segment_many(cohort, cfg, out=out)
    assert [i.state for i in again] == ["skipped", "skipped", "failed"]
    assert (out / "a" / "mask.mrc").stat().st_mtime_ns == mtime
    assert _summary(out / "summary.csv")[0]["voxels_membrane"] == a["voxels_membrane"]

    # another config, or a changed source, is not "the same" finished work
    other = cm.segment_many(cohort / "a.mrc", cfg.replace(tile_step=0.75), out=out)
    assert other[0].state == "completed"
    _write(cohort / "b.mrc", 3)
    assert cm.segment_many(cohort / "b.mrc", cfg, out=out)[0].state == "completed"


def test_inputs_with_the_same_name_are_refused(tmp_path, tiny_model):
    for sub in ("x", "y"):
        (tmp_path / sub).mkdir()
        _write(tmp_path / sub / "tomo.mrc", 1)
    with pytest.raises(cm.ConfigError, match="share an output folder: tomo"):
        cm.segment_many(str(tmp_path / "*" / "tomo.mrc"), out=tmp_path / "segs")


def test_batch_command_exits_1_when_an_input_failed_and_0_on_a_clean_rerun(
    capsys, cohort, tmp_path, tiny_model
):
    out = tmp_path / "segs"
    args = ["batch", str(cohort / "*.mrc"), "-o", str(out), "--model", str(tiny_model), "-q"]
    assert main(args) == 1
    printed = capsys.readouterr().out
    assert "summary.csv" in printed
    assert [r["state"] for r in _summary(out / "summary.csv")] == [
        "completed",
        "completed",
        "failed",
    ]
    (cohort / "broken.mrc").unlink()
    assert main([*args[:1], str(cohort), *args[2:]]) == 0
    assert [r["state"] for r in _summary(out / "summary.csv")] == ["skipped", "skipped"]


def test_batch_shows_the_table_and_refuses_cluster_without_dask(
    capsys, cohort, tmp_path, tiny_model
):
    out = tmp_path / "segs"
    assert main(["batch", str(cohort / "a.mrc"), "-o", str(out), "--model", str(tiny_model)]) == 0
    captured = capsys.readouterr()
    assert "a.mrc" in captured.out and "completed" in captured.out
    code = main(["batch", str(cohort), "-o", str(out), "--cluster", "slurm"])
    assert code == 2 and "--executor dask" in capsys.readouterr().err


@pytest.mark.slow
def test_segment_many_through_a_server_writes_here_and_a_rerun_skips(cohort, tmp_path):
    """executor="remote": the same loop; the model is only on the server (matched by name)."""
    pytest.importorskip("httpx")
    from server_fixtures import LiveServer

    from cryomamba.executors.remote import RemoteExecutor
    from cryomamba.testing import make_model_folder

    models = tmp_path / "models"
    make_model_folder(models / "tiny", patch_size=(16, 16, 16), features=(4, 8, 16), seed=1)
    server = LiveServer(tmp_path / "data", models_dir=models, extra_args=["--rate-limit", "10000"])
    server.start()
    ex = RemoteExecutor(server.url, server.token("alice", "read,upload,submit"))
    try:
        cfg = cm.JobConfig(model="tiny", formats=("mrc", "stats"))
        out = tmp_path / "segs"
        items = cm.segment_many(cohort, cfg, out=out, executor=ex)
        assert [(i.state, i.error_code) for i in items] == [
            ("completed", ""),
            ("completed", ""),
            ("failed", "invalid_volume"),
        ]
        assert (out / "a" / "mask.mrc").is_file() and (out / "b" / "stats.json").is_file()
        again = cm.segment_many(cohort, cfg, out=out, executor=ex)
        assert [i.state for i in again] == ["skipped", "skipped", "failed"]
    finally:
        ex.close()
        server.stop()


def test_ome_zarr_folders_are_one_input_each(tmp_path, tiny_model, noise_volume):
    pytest.importorskip("zarr")
    from cryomamba.zarr_write import create_group, multiscales_metadata

    folder = tmp_path / "tomos"
    folder.mkdir()
    for name in ("TS_001.zarr", "TS_002.zarr"):
        group = create_group(folder / name)
        group.create_dataset("0", data=noise_volume, chunks=(8, 8, 8))
        group.attrs.update(multiscales_metadata(1, (10.0, 10.0, 10.0), (0.0, 0.0, 0.0), name))
    assert [p.name for p in expand_inputs(folder)] == ["TS_001.zarr", "TS_002.zarr"]
    assert [p.name for p in expand_inputs(folder / "TS_001.zarr")] == ["TS_001.zarr"]
    cfg = cm.JobConfig(model=str(tiny_model), formats=("zarr", "stats"))
    items = cm.segment_many(folder, cfg, out=tmp_path / "segs")
    assert [i.state for i in items] == ["completed", "completed"]
    assert (tmp_path / "segs" / "TS_002" / "mask.zarr" / ".zattrs").is_file()
