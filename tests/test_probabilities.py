"""Probability maps streamed during a job, and masks re-thresholded from them."""

from __future__ import annotations

import json

import mrcfile
import numpy as np
import pytest

import cryomamba as cm
from cryomamba.cli import main

zarr = pytest.importorskip("zarr")


@pytest.fixture
def blob_volume() -> np.ndarray:
    """Noise plus a bright slab, so a random tiny model gives both labels somewhere."""
    vol = np.random.default_rng(4).normal(size=(30, 40, 36)).astype(np.float32)
    vol[10:20] += 3.0
    return vol


def test_threshold_at_one_half_is_the_engines_mask(tiny_model, blob_volume, tmp_path):
    out = tmp_path / "out"
    sink = cm.sinks.FileSink(out, formats=["probabilities", "mrc"])
    result = cm.segment(
        cm.Volume.from_array(blob_volume, voxel_size=10.0), model=str(tiny_model), sinks=[sink]
    )
    assert {p.name for p in out.iterdir()} == {"probabilities.zarr", "mask.mrc"}
    group = zarr.open_group(str(out / "probabilities.zarr"), mode="r")
    probs = group["0"]
    assert probs.dtype == np.float16 and probs.shape == (1, *blob_volume.shape)
    assert group.attrs["cryomamba"]["labels"][0]["name"] == "membrane"
    p = probs[0]
    assert 0 < (result.labels == 1).sum() < result.labels.size  # both labels present
    assert float(p.min()) >= 0 and float(p.max()) <= 1
    again = cm.threshold(out / "probabilities.zarr", at=0.5)
    np.testing.assert_array_equal(again.labels, result.labels)
    looser = cm.threshold(out / "probabilities.zarr", label="membrane", at=0.2)
    assert (looser.labels >= again.labels).all() and looser.labels.sum() >= again.labels.sum()
    assert {e["label"]: e for e in looser.stats["labels"]}[1]["voxel_count"] == int(
        (looser.labels == 1).sum()
    )
    assert result.probabilities is not None  # the job's temporary copy, removed with the result


def test_resampled_jobs_stream_probabilities_on_the_source_grid(tiny_model, blob_volume, tmp_path):
    out = tmp_path / "out"
    result = cm.segment(
        cm.Volume.from_array(blob_volume, voxel_size=14.0),
        model=str(tiny_model),
        sinks=[cm.sinks.FileSink(out, formats=["probabilities"])],
    )
    assert result.provenance["spacing"]["resampled"]
    again = cm.threshold(out / "probabilities.zarr", at=0.5)
    np.testing.assert_array_equal(again.labels, result.labels)
    ms = zarr.open_group(str(out / "probabilities.zarr"), mode="r").attrs["multiscales"][0]
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [1.0, 14.0, 14.0, 14.0]


def test_three_labels_need_a_choice(tiny_model_3class_2folds, blob_volume, tmp_path):
    out = tmp_path / "out"
    config = {"formats": ["probabilities"]}
    result = cm.segment(
        cm.Volume.from_array(blob_volume, voxel_size=10.0),
        model=str(tiny_model_3class_2folds),
        **config,
    )
    result.save(out, ["probabilities"])
    probs = zarr.open_group(str(out / "probabilities.zarr"), mode="r")["0"][:].astype(np.float32)
    assert probs.shape[0] == 2 and (probs.sum(0) <= 1.002).all()
    with pytest.raises(cm.ConfigError, match="holds 2 labels") as err:
        cm.threshold(out / "probabilities.zarr")
    assert "membrane" in err.value.hint and "particle" in err.value.hint
    particle = cm.threshold(out / "probabilities.zarr", label="particle", at=0.5)
    assert set(np.unique(particle.labels)) <= {0, 2}
    assert ((particle.labels == 2) <= (result.labels == 2)).all()  # p > 0.5 wins any arg-max


def test_cli_threshold_writes_mask_and_stats(tiny_model, blob_volume, tmp_path, capsys):
    src = tmp_path / "tomo.mrc"
    with mrcfile.new(src) as mrc:
        mrc.set_data(blob_volume)
        mrc.voxel_size = 10.0
    out = tmp_path / "out"
    assert (
        main(
            [
                "segment",
                str(src),
                "-o",
                str(out),
                "--model",
                str(tiny_model),
                "--formats",
                "zarr,probabilities",
                "-q",
            ]
        )
        == 0
    )
    assert {p.name for p in out.iterdir()} >= {"mask.zarr", "probabilities.zarr"}
    capsys.readouterr()
    target = out / "mask_035.mrc"
    code = main(
        [
            "threshold",
            str(out / "probabilities.zarr"),
            "--label",
            "membrane",
            "--at",
            "0.35",
            "-o",
            str(target),
        ]
    )
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    with mrcfile.open(target) as mrc:
        mask = mrc.data.astype(np.uint8)
        assert float(mrc.voxel_size.x) == 10.0
    stats = json.loads((out / "mask_035.stats.json").read_text())
    assert (
        {e["label"]: e for e in stats["labels"]}[1]["voxel_count"]
        == int(mask.sum())
        == printed["voxels"]["membrane"]
    )
    assert stats["provenance"]["threshold"]["at"] == 0.35
    assert (
        main(
            [
                "threshold",
                str(out / "probabilities.zarr"),
                "--at",
                "0.35",
                "-o",
                str(out / "m.zarr"),
            ]
        )
        == 0
    )
    np.testing.assert_array_equal(zarr.open(str(out / "m.zarr"))["0"][:], mask)


def test_threshold_errors(tmp_path, capsys):
    with pytest.raises(cm.InvalidVolumeError, match="does not exist"):
        cm.threshold(tmp_path / "nope.zarr")
    zarr.group(store=str(tmp_path / "plain.zarr"))
    with pytest.raises(cm.InvalidVolumeError, match="not a cryomamba probability map"):
        cm.threshold(tmp_path / "plain.zarr")
    with pytest.raises(cm.ConfigError, match=r"in \[0, 1\)"):
        cm.threshold(tmp_path / "plain.zarr", at=1.5)
    assert main(["threshold", str(tmp_path / "plain.zarr"), "-o", str(tmp_path / "m.tif")]) != 0
    assert "end the output name in .mrc" in capsys.readouterr().err
