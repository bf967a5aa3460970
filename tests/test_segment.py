"""`cm.segment` / `cm.submit` end to end: sinks, files on disk, clear errors, nothing partial."""

from __future__ import annotations

import json

import mrcfile
import numpy as np
import pytest

import cryomamba as cm


def test_segment_with_file_sink_and_print(tiny_model, mrc_file, tmp_path, capsys):
    out = tmp_path / "out"
    vol = cm.Volume.open(mrc_file)
    result = cm.segment(vol, model=str(tiny_model), sinks=[cm.sinks.FileSink(out), print])
    assert {p.name for p in out.iterdir()} == {
        "mask.mrc",
        "mask.nii.gz",
        "mask.nrrd",
        "stats.json",
        "overview.png",
    }
    printed = capsys.readouterr().out
    assert "Progress(" in printed and "Completed(" in printed
    with mrcfile.open(out / "mask.mrc") as mrc:
        np.testing.assert_array_equal(mrc.data.astype(np.uint8), result.labels)
        assert tuple(float(v) for v in mrc.voxel_size.tolist()) == (10.0, 10.0, 10.0)
        origin = mrc.header.origin
        assert (float(origin.x), float(origin.y), float(origin.z)) == (100.0, 200.0, 300.0)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["provenance"]["model"]["name"] == tiny_model.name
    assert stats["provenance"]["source"]["sha256"] == vol.checksum()
    counts = {e["label"]: e["voxel_count"] for e in stats["labels"]}
    for label, count in counts.items():
        assert count == int((result.labels == label).sum())


def test_submit_with_config_and_events(tiny_model, noise_volume):
    job = cm.submit(noise_volume, cm.JobConfig(model=str(tiny_model)), executor="local")
    kinds = [type(e).__name__ for e in job.events(timeout=60)]
    assert kinds[-1] == "Completed" and "Progress" in kinds


def test_unwritable_output_is_refused_before_any_work(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(cm.OutputError, match="is a file"):
        cm.sinks.FileSink(blocker / "out")


def test_a_failing_writer_leaves_nothing_behind(tiny_model, noise_volume, tmp_path, monkeypatch):
    from cryomamba import artifacts

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(artifacts, "write_nrrd", broken)
    out = tmp_path / "out"
    with pytest.raises(cm.OutputError):
        cm.segment(noise_volume, model=str(tiny_model), sinks=[cm.sinks.FileSink(out)])
    assert not out.exists() or list(out.iterdir()) == []


@pytest.mark.parametrize(
    ("source", "error", "phrase"),
    [
        ("broken/truncated_data.mrc", cm.JobFailedError, "truncated"),
        ("broken/wrong_mode.mrc", cm.JobFailedError, "promises"),
        ("quoll_single_tilt_uint16_voxel0.mrc", cm.JobFailedError, "2D image"),
        ("tardis_tif3D_uint8_same_volume.tif", cm.JobFailedError, "not an MRC file"),
    ],
)
def test_bad_sources_fail_with_the_volume_error(tiny_model, source, error, phrase):
    from conftest import REAL_MRC

    with pytest.raises(error, match=phrase) as info:
        cm.segment(REAL_MRC / source, model=str(tiny_model))
    assert info.value.code == "invalid_volume"


def test_unknown_model_and_unknown_executor():
    with pytest.raises(cm.JobFailedError, match="unknown model"):
        cm.segment(np.ones((4, 4, 4), np.float32), model="nope")
    with pytest.raises(cm.ConfigError, match="unknown executor 'cluster'"):
        cm.submit(np.ones((4, 4, 4), np.float32), executor="cluster")


def test_a_missing_file_is_an_io_error_not_a_bug(tiny_model, tmp_path):
    with pytest.raises(cm.JobFailedError, match="no-such.mrc") as info:
        cm.segment(tmp_path / "no-such.mrc", model=str(tiny_model))
    assert info.value.code == "io_error"
