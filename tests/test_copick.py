"""copick projects: read a run's tomogram, write the mask back; checked with copick itself."""

from __future__ import annotations

import json

import numpy as np
import pytest

import cryomamba as cm
from cryomamba.copick import _root_logging_kept, open_project

with _root_logging_kept():  # copick's import replaces the root logger's handlers
    pytest.importorskip("copick")


@pytest.fixture
def project(tmp_path, noise_volume):
    """A filesystem copick project built with copick's own API: one run, 10 Å, a wbp tomogram."""
    config = tmp_path / "copick.json"
    config.write_text(
        json.dumps(
            {
                "config_type": "filesystem",
                "name": "test",
                "pickable_objects": [{"name": "membrane", "is_particle": False, "label": 1}],
                "overlay_root": f"local://{tmp_path / 'overlay'}",
                "static_root": f"local://{tmp_path / 'static'}",
                "overlay_fs_args": {"auto_mkdir": True},
                "static_fs_args": {"auto_mkdir": True},
            }
        )
    )
    root = open_project(config)
    tomo = root.new_run("TS_001").new_voxel_spacing(10.0).new_tomogram("wbp")
    tomo.from_numpy(noise_volume, levels=2)
    return config


def test_segment_a_copick_tomogram_and_write_it_back(tiny_model, project, noise_volume, mrc_file):
    vol = cm.copick.tomogram(project, run="TS_001", voxel_size=10, tomo_type="wbp")
    assert vol.shape == noise_volume.shape and vol.voxel_size == (10.0, 10.0, 10.0)
    np.testing.assert_array_equal(np.asarray(vol.data), noise_volume)
    assert cm.copick.tomogram(
        project, run="TS_001", voxel_size=10, tomo_type="wbp", level=1
    ).shape == (15, 20, 18)
    sink = cm.copick.SegmentationSink(project, name="membrane", user_id="cryomamba", session_id="1")
    result = cm.segment(vol, model=str(tiny_model), sinks=[sink])
    assert result.provenance["source"]["copick"]["run"] == "TS_001"
    # copick itself, freshly opened, lists and reads what we wrote
    segs = open_project(project).get_run("TS_001").get_segmentations(user_id="cryomamba")
    assert [(s.name, s.session_id, s.voxel_size, s.is_multilabel) for s in segs] == [
        ("membrane", "1", 10.0, False)
    ]
    np.testing.assert_array_equal(segs[0].numpy(), result.labels)
    # the same data as MRC segments to the same mask
    np.testing.assert_array_equal(
        cm.segment(cm.Volume.open(mrc_file), model=str(tiny_model)).labels, result.labels
    )


def test_copick_errors_name_what_exists(project, tmp_path):
    import logging

    before = logging.getLogger().handlers[:]
    open_project(project)  # copick's import would put a Rich handler on stdout at the root
    assert logging.getLogger().handlers == before
    with pytest.raises(cm.ConfigError, match="no run 'TS_404'") as err:
        cm.copick.tomogram(project, run="TS_404", voxel_size=10, tomo_type="wbp")
    assert "TS_001" in err.value.hint
    with pytest.raises(cm.ConfigError, match="no voxel spacing 7") as err:
        cm.copick.tomogram(project, run="TS_001", voxel_size=7, tomo_type="wbp")
    assert "10.0" in err.value.hint
    with pytest.raises(cm.ConfigError, match="no 'denoised' tomogram") as err:
        cm.copick.tomogram(project, run="TS_001", voxel_size=10, tomo_type="denoised")
    assert "wbp" in err.value.hint
    with pytest.raises(cm.ConfigError, match="does not exist"):
        cm.copick.SegmentationSink(tmp_path / "nope.json", name="m", user_id="u", session_id="1")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(cm.ConfigError, match="is not a copick config"):
        cm.copick.tomogram(tmp_path / "bad.json", run="TS_001", voxel_size=10, tomo_type="wbp")
    with pytest.raises(cm.ConfigError, match="not one"):
        cm.copick.write_segmentation(
            project,
            np.zeros((2, 2, 2), np.uint8),
            run="TS_001",
            voxel_size=10,
            name="ribosome",
            user_id="u",
            session_id="1",
            label_names={1: "ribosome"},
        )


def test_cli_segment_from_and_into_a_copick_project(tiny_model, project, tmp_path, capsys):
    from cryomamba.cli import main

    argv = ["segment", "--copick", str(project), "--run", "TS_001", "--voxel-size", "10"]
    argv += ["--tomo-type", "wbp", "--model", str(tiny_model), "-q", "-o", str(tmp_path / "out")]
    assert main(argv) == 0
    assert "wrote copick segmentation" in capsys.readouterr().out
    segs = open_project(project).get_run("TS_001").get_segmentations(name="membrane")
    assert [(s.user_id, s.session_id) for s in segs] == [("cryomamba", "1")]
    mask = cm.Volume.open(tmp_path / "out" / "mask.mrc").data.view(np.uint8)
    np.testing.assert_array_equal(segs[0].numpy(), mask)
    assert main(["segment", "--copick", str(project), "--model", str(tiny_model)]) != 0
    assert "--copick needs --run, --tomo-type, --voxel-size" in capsys.readouterr().err
    assert main(["segment", "--model", str(tiny_model)]) != 0
    assert "segment needs IN and -o" in capsys.readouterr().err


def test_cli_batch_over_every_run(tiny_model, project, noise_volume, tmp_path, capsys):
    from cryomamba.cli import main

    root = open_project(project)
    root.new_run("TS_002").new_voxel_spacing(10.0).new_tomogram("wbp").from_numpy(
        noise_volume[:, ::-1], levels=1
    )
    root.new_run("TS_003")  # no tomogram: not an input
    argv = ["batch", "--copick", str(project), "--voxel-size", "10", "--tomo-type", "wbp"]
    assert main([*argv, "--model", str(tiny_model), "-q", "-o", str(tmp_path / "out")]) == 0
    assert "wrote 2 copick segmentation(s)" in capsys.readouterr().out
    fresh = open_project(project)
    for run in ("TS_001", "TS_002"):
        [seg] = fresh.get_run(run).get_segmentations(user_id="cryomamba")
        mask = cm.Volume.open(tmp_path / "out" / run / "mask.mrc").data.view(np.uint8)
        np.testing.assert_array_equal(seg.numpy(), mask)
    assert main([*argv[:3], "--model", str(tiny_model), "-o", str(tmp_path / "o2")]) != 0
    assert "--copick takes --voxel-size and --tomo-type" in capsys.readouterr().err
