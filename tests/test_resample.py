"""Resampling to the model's spacing and back: nnU-Net's semantics, streamed in z (DESIGN §9)."""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import mrcfile
import numpy as np
import pytest
from conftest import REAL_MRC

import cryomamba as cm
from cryomamba.engine import StreamingPredictor, TrainedModel
from cryomamba.engine.resample import AxisMap, LogitsToSource, ResampledInput, ResamplePlan
from cryomamba.spacing import decide_spacing
from cryomamba.synth import synthesize
from cryomamba.testing.reference import nnunet_predictor

NNUNET_DATA = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
NNUNET_PROBS = {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None}
CONFIG = {
    "resampling_fn_data_kwargs": NNUNET_DATA,
    "resampling_fn_probabilities_kwargs": NNUNET_PROBS,
}


def demo_model() -> Path:
    from cryomamba.models import resolve_model

    return resolve_model("demo-membrane").path


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.count_nonzero(a & b) / max(np.count_nonzero(a) + np.count_nonzero(b), 1))


def write(path: Path, data: np.ndarray, voxel_size: float) -> Path:
    with mrcfile.new(path) as mrc:
        mrc.set_data(data.astype(np.float32))
        mrc.voxel_size = voxel_size
    return path


# -- the maps: nnU-Net's own resampling, axis by axis --------------------------------------------
@pytest.mark.parametrize(("n_in", "n_out"), [(40, 31), (30, 41), (7, 20), (64, 50)])
@pytest.mark.parametrize("order", [1, 3])
def test_axis_map_equals_skimage_resize(n_in, n_out, order):
    from skimage.transform import resize

    x = np.random.default_rng(n_in).normal(size=n_in)
    ref = resize(x, (n_out,), order=order, mode="edge", anti_aliasing=False, clip=False)
    amap = AxisMap.build(n_in, n_out, order=order)
    import torch

    ours = amap.apply(torch.from_numpy(x.astype(np.float32)), 0).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-4)  # taps below 1e-5 of the largest dropped
    assert amap.taps <= (2 if order == 1 else 24)


@pytest.mark.parametrize(
    ("shape", "source", "model"),
    [
        ((20, 26, 30), (7.8, 7.8, 7.8), (10.0, 10.0, 10.0)),  # ratio 0.78: fewer planes
        ((14, 18, 22), (13.5, 13.5, 13.5), (10.0, 10.0, 10.0)),  # ratio 1.35: more planes
        ((8, 40, 36), (35.0, 8.0, 8.0), (10.0, 10.0, 10.0)),  # anisotropic: separate z
    ],
)
def test_streamed_input_equals_nnunet_resampling(shape, source, model):
    """The rolling window, plane by plane, equals nnU-Net's whole-volume resampling."""
    import torch
    from nnunetv2.preprocessing.resampling.default_resampling import (
        compute_new_shape,
        resample_data_or_seg_to_shape,
    )

    data = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    plan = ResamplePlan.build(shape, source, model, CONFIG)
    new_shape = tuple(compute_new_shape(shape, source, model))
    assert plan.model_shape == new_shape
    ref = resample_data_or_seg_to_shape(data[None], new_shape, source, model, **NNUNET_DATA)[0]
    bounds = (float(data.min()), float(data.max()))
    stitched = np.empty(new_shape, np.float32)
    window = ResampledInput(data, lambda b: b, plan, 5, torch.device("cpu"), bounds=bounds)
    for k in range(0, new_shape[0], 3):  # overlapping requests, as z-rows of tiles make them
        part = window.planes(k, k + 5).numpy()
        stitched[k : k + len(part)] = part
    np.testing.assert_allclose(stitched, ref, atol=2e-4)
    assert len(window._source) <= plan.to_model[0].taps + 2  # bounded: a band of source planes


def test_logits_back_to_source_equal_nnunet_export():
    """Model-space logits → source grid → arg-max, as nnU-Net's export does it (order 1)."""
    import torch
    from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape

    source_shape, source, model = (23, 19, 27), (13.0, 13.0, 13.0), (10.0, 10.0, 10.0)
    plan = ResamplePlan.build(source_shape, source, model, CONFIG)
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(3, *plan.model_shape)).astype(np.float32)
    ref = resample_data_or_seg_to_shape(logits, source_shape, model, source, **NNUNET_PROBS)
    out = np.zeros(source_shape, np.uint8)
    spans = []
    back = LogitsToSource(plan, out, lambda a, b: spans.append((a, b)))
    for k in range(0, plan.model_shape[0], 4):
        back.push(k, torch.from_numpy(logits[:, k : k + 4]))
        assert len(back._model) <= 6
    assert (out == ref.argmax(0)).mean() > 0.999
    assert spans[0][0] == 0 and spans[-1][1] == source_shape[0]
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))


def test_matching_spacing_is_todays_path_bit_for_bit(tiny_model, noise_volume):
    model = TrainedModel.load(tiny_model)
    predictor = StreamingPredictor(model)
    plain = predictor.predict(noise_volume)
    assert predictor.resample_plan(noise_volume.shape, (10.0, 10.0, 10.05)) is None
    np.testing.assert_array_equal(predictor.predict(noise_volume, spacing=(10, 10, 10.05)), plain)


def test_progress_counts_model_space_tiles_and_planes_are_source_planes(tiny_model):
    volume = np.random.default_rng(2).normal(size=(30, 20, 20)).astype(np.float32)
    predictor = StreamingPredictor(TrainedModel.load(tiny_model))
    plan = predictor.resample_plan(volume.shape, (13.5, 13.5, 13.5))
    assert plan is not None and plan.model_shape == (40, 27, 27)
    progress, planes = [], []
    labels = predictor.predict(
        volume,
        spacing=(13.5, 13.5, 13.5),
        on_progress=lambda d, t: progress.append((d, t)),
        on_planes=lambda a, b: planes.append((a, b)),
    )
    grid = predictor.plan(plan.model_shape)
    assert progress[-1] == (grid.n_tiles, grid.n_tiles) and labels.shape == volume.shape
    assert planes[0][0] == 0 and planes[-1][1] == 30 and len(planes) > 3
    assert all(a[1] == b[0] for a, b in itertools.pairwise(planes))


# -- labels against nnU-Net's own predictor ------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(
    ("shape", "spacing"),
    [
        ((40, 64, 72), (7.8, 7.8, 7.8)),  # ratio 0.78
        ((30, 50, 56), (13.5, 13.5, 13.5)),  # ratio 1.35
        ((16, 90, 90), (35.0, 7.0, 7.0)),  # anisotropic: nnU-Net resamples z on its own
    ],
)
def test_labels_match_nnunet_at_another_spacing(shape, spacing):
    model_dir = demo_model()
    volume = synthesize(shape, seed=3, voxel_size=spacing[1], snr=2.0).volume
    ours = StreamingPredictor(TrainedModel.load(model_dir)).predict(volume, spacing=spacing)
    predictor = nnunet_predictor(model_dir)
    ref = predictor.predict_single_npy_array(volume[None], {"spacing": list(spacing)}, None, None)
    assert ours.shape == ref.shape == volume.shape
    assert np.count_nonzero(ref == 1) > 1000, "the reference must segment something"
    assert dice(ours == 1, ref == 1) >= 0.97


# -- the same scene at three voxel sizes ---------------------------------------------------------
EXTENT_NM = (63.0, 126.0, 126.0)  # a whole number of voxels at 7.5, 10 and 14 Å


def scene_dice(voxel_size: float, resample: str) -> float:
    shape = tuple(round(e * 10 / voxel_size) for e in EXTENT_NM)
    tomo = synthesize(shape, seed=11, voxel_size=voxel_size, snr=1.0)
    vol = cm.Volume.from_array(tomo.volume, voxel_size=voxel_size)
    result = cm.segment(vol, model="demo-membrane", resample=resample, device="cpu", formats=())
    assert result.provenance["spacing"]["resampled"] == (resample == "auto" and voxel_size != 10)
    return dice(np.asarray(result.labels) == 1, tomo.labels == 1)


@pytest.mark.slow
def test_same_scene_at_three_voxel_sizes():
    report = {"10": scene_dice(10.0, "auto")}
    for vs in (7.5, 14.0):
        report[f"{vs:g}"] = scene_dice(vs, "auto")
    report["14 off"] = scene_dice(14.0, "off")  # docs/engine.md: 7.5 Å off measured too
    print(json.dumps(report))  # with -s: how far resample="off" drops
    assert report["10"] > 0.85, report
    assert abs(report["7.5"] - report["10"]) <= 0.03, report
    assert abs(report["14"] - report["10"]) <= 0.03, report


# -- headers and overrides -----------------------------------------------------------------------
def nan_header(path: Path) -> Path:
    with mrcfile.open(path, "r+") as mrc:
        mrc.header.cella.x = math.nan
    return path


@pytest.mark.parametrize(
    ("voxel_size", "edit"),
    [(0.0, None), (1.0, None), (10.0, nan_header)],
    ids=["zero", "one-angstrom", "nan"],
)
def test_untrusted_header_is_refused_with_a_hint(
    tmp_path, tiny_model, noise_volume, voxel_size, edit
):
    path = write(tmp_path / "bad.mrc", noise_volume, voxel_size)
    if edit:
        edit(path)
    with pytest.raises(cm.JobFailedError) as info:
        cm.segment(path, model=tiny_model, formats=())
    assert info.value.code == "voxel_size_unknown"
    assert "voxel_size" in info.value.hint and "bad.mrc" in info.value.message
    # the override runs it, and the mask carries the override
    result = cm.segment(path, model=tiny_model, voxel_size=13.48, formats=())
    spacing = result.provenance["spacing"]
    assert spacing["source"] == "override" and spacing["resampled"] is True
    assert spacing["voxel_size"] == [13.48] * 3 and spacing["header_voxel_size"] is None
    assert spacing["model_voxel_size"] == [10.0] * 3
    assert result.voxel_size == (13.48, 13.48, 13.48) and result.shape == noise_volume.shape
    # resample="off" is today's behaviour: it runs where it stands
    assert cm.segment(path, model=tiny_model, resample="off", formats=()).shape == result.shape


def test_override_that_disagrees_with_a_valid_header_warns(tmp_path, tiny_model, caplog):
    with caplog.at_level(logging.WARNING, logger="cryomamba.spacing"):
        decision = decide_spacing(
            voxel_size=(7.84,) * 3,
            voxel_size_known=True,
            from_file=True,
            model_voxel_size=(10.0,) * 3,
            override=(13.48,) * 3,
            name="tomo.mrc",
        )
    assert "overrides the header's 7.84" in caplog.text
    assert decision.resample and decision.header_voxel_size == (7.84,) * 3


def test_arrays_without_a_voxel_size_are_taken_at_the_models(tiny_model, noise_volume):
    result = cm.segment(noise_volume, model=tiny_model, formats=())
    spacing = result.provenance["spacing"]
    assert spacing["source"] == "assumed" and spacing["resampled"] is False
    assert result.voxel_size == (1.0, 1.0, 1.0)  # the array's own, untouched


def test_spacing_within_tolerance_is_not_resampled():
    decision = decide_spacing(
        voxel_size=(10.05, 9.95, 10.0),
        voxel_size_known=True,
        from_file=True,
        model_voxel_size=(10.0, 10.0, 10.0),
    )
    assert not decision.resample and decision.engine_spacing is None


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    [
        "chlamy_hsp60_relion_ispg0.mrc",
        "tomodrgn_warp_reconstruct_ispg0.mrc",
        "tardis_mrc3D_mode0.mrc",
    ],
)
def test_real_files_at_their_own_pixel_size_segment(tmp_path, name):
    path = shutil.copy(REAL_MRC / name, tmp_path / name)
    volume = cm.Volume.open(path)
    result = cm.segment(path, model="demo-membrane", device="cpu", tile_step=1.0, formats=())
    spacing = result.provenance["spacing"]
    assert spacing["resampled"] is True and spacing["source"] == "header"
    assert spacing["voxel_size"] == pytest.approx(volume.voxel_size)
    assert result.shape == volume.shape
    saved = result.save(tmp_path / "out", formats=("mrc", "stats"))
    stats = json.loads(Path(saved["stats"]).read_text())
    assert stats["provenance"]["spacing"]["model_voxel_size"] == [10.0, 10.0, 10.0]


# -- memory stays flat in z with resampling on ---------------------------------------------------
_PEAK = textwrap.dedent(
    """
    import json, sys
    import numpy as np, torch
    torch.set_num_threads(1)
    from cryomamba import Volume
    from cryomamba.engine import StreamingPredictor, TrainedModel
    from cryomamba.engine.output import release_pages, temporary_labels

    def rss(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024

    vol = Volume.open(sys.argv[1])
    predictor = StreamingPredictor(TrainedModel.load(sys.argv[2]), tile_step=1.0, tile_batch=8)
    predictor.predict(np.asarray(vol.data[:8]), spacing=vol.voxel_size)  # warm up
    out = temporary_labels(vol.shape)
    base = rss("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")
    predictor.predict(vol.data, out=out, release=vol.release, spacing=vol.voxel_size,
                      on_planes=lambda a, b: release_pages(out, 0, b))
    print(json.dumps({"above": rss("VmHWM") - base}))
    """
)


@pytest.mark.slow
def test_peak_memory_is_flat_in_z_with_resampling(tmp_path, tmp_path_factory):
    from cryomamba.testing import make_model_folder

    model = make_model_folder(
        tmp_path_factory.mktemp("m") / "wide", patch_size=(16, 64, 64), features=(2, 4), seed=4
    )
    rng = np.random.default_rng(0)
    peaks = {}
    for depth in (32, 96):
        path = write(tmp_path / f"z{depth}.mrc", rng.normal(size=(depth, 128, 128)), 13.5)
        proc = subprocess.run(
            [sys.executable, "-c", _PEAK, str(path), str(model)],
            capture_output=True,
            text=True,
            check=True,
            # a fixed mmap threshold: glibc's sliding one keeps freed heap for a while, which
            # moves the peak by tens of MiB at random (measured), whatever the depth
            env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"},
        )
        peaks[depth] = json.loads(proc.stdout.strip().splitlines()[-1])["above"]
    # the model-space volumes, as float32, are 43 and 130 × 173 × 173 × 4 B = 5 and 15 MiB:
    # holding one (as nnU-Net does) would add 10 MiB to the deep run; one slab is ~2 MiB
    print(json.dumps(peaks))
    assert peaks[96] - peaks[32] < 4, peaks


# -- the command line ----------------------------------------------------------------------------
def test_cli_refuses_an_untrusted_header_and_takes_voxel_size(capsys, tmp_path, tiny_model):
    from cryomamba.cli import EXIT_USAGE, main

    volume = np.random.default_rng(5).normal(size=(20, 24, 24))
    path = write(tmp_path / "zero.mrc", volume, 0.0)
    argv = ["segment", str(path), "-o", str(tmp_path / "a"), "--model", str(tiny_model), "-q"]
    assert main([*argv, "--device", "cpu"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "no valid voxel size" in err and "--voxel-size" in err and "Traceback" not in err
    out = tmp_path / "b"
    argv[3] = str(out)
    assert main([*argv, "--voxel-size", "13.48", "--formats", "mrc,stats"]) == 0
    spacing = json.loads((out / "stats.json").read_text())["provenance"]["spacing"]
    assert spacing["voxel_size"] == [13.48] * 3 and spacing["resampled"] is True
    with mrcfile.open(out / "mask.mrc") as mask:
        assert mask.data.shape == volume.shape
        assert float(mask.voxel_size.x) == pytest.approx(13.48)
    assert main([*argv, "--resample", "sometimes"]) == EXIT_USAGE


# -- the server's job record ---------------------------------------------------------------------
def test_server_job_record_carries_both_voxel_sizes(tmp_path, tiny_model, noise_volume):
    from cryomamba.server.runner import JobRunner
    from cryomamba.server.storage import Storage, new_id

    path = write(tmp_path / "tomo.mrc", noise_volume, 13.5)
    row = {
        "id": new_id(),
        "owner": "alice",
        "state": "queued",
        "device": None,
        "created_at": 0.0,
        "started_at": None,
        "finished_at": None,
        "source": {"path": str(path), "filename": path.name},
        "config": cm.JobConfig(model=str(tiny_model), formats=("stats",)).to_dict(),
        "model": {"name": str(tiny_model)},
        "progress": None,
        "error": None,
        "artifacts": None,
    }
    storage = Storage(tmp_path / "db.sqlite3")
    runner = JobRunner(storage, tmp_path / "artifacts", ("cpu",), per_device=1)
    runner.start()
    try:
        events = list(runner.enqueue(row).events(timeout=120))
        assert isinstance(events[-1], cm.Completed), events[-1]
        spacing = storage.job(row["id"])["source"]["spacing"]
    finally:
        runner.stop()
        storage.close()
    assert spacing == {
        "voxel_size": [13.5, 13.5, 13.5],
        "source": "header",
        "header_voxel_size": [13.5, 13.5, 13.5],
        "model_voxel_size": [10.0, 10.0, 10.0],
        "resampled": True,
    }


@pytest.mark.parametrize("bad", [0, -1, math.nan, math.inf, 0.05, 2e4, "13", True, [13.0], [1, 2]])
def test_voxel_size_override_is_validated(bad):
    with pytest.raises(cm.ConfigError, match="voxel_size must be") as info:
        cm.JobConfig(voxel_size=bad)
    assert "13.48" in info.value.hint
    with pytest.raises(cm.ConfigError, match="resample must be one of auto, off"):
        cm.JobConfig(resample="on")
    config = cm.JobConfig(voxel_size=[20, 10.5, 10.5], resample="off")
    assert config.voxel_size == (20.0, 10.5, 10.5)
    assert cm.JobConfig.from_json(config.to_json()) == config


def test_resampling_further_than_eight_times_is_refused():
    with pytest.raises(cm.InvalidVolumeError, match="at most 8× per axis") as info:
        decide_spacing(
            voxel_size=(1.2,) * 3,
            voxel_size_known=True,
            from_file=True,
            model_voxel_size=(10.0,) * 3,
        )
    assert "bin" in info.value.hint and "resample='off'" in info.value.hint
    off = decide_spacing(
        voxel_size=(1.2,) * 3,
        voxel_size_known=True,
        from_file=True,
        model_voxel_size=(10.0,) * 3,
        resample="off",
    )
    assert off.resample is False and off.engine_spacing is None


@pytest.mark.slow
def test_remote_job_takes_the_override_like_a_local_one(tmp_path, noise_volume):
    pytest.importorskip("uvicorn")
    from server_fixtures import LiveServer

    from cryomamba.executors.remote import RemoteExecutor
    from cryomamba.testing import make_model_folder

    models = tmp_path / "models"
    make_model_folder(models / "tiny", patch_size=(16, 16, 16), features=(4, 8, 16), seed=1)
    path = write(tmp_path / "one_angstrom.mrc", noise_volume[:16, :24, :24], 1.0)
    live = LiveServer(tmp_path / "data", models_dir=models, roots=[tmp_path]).start()
    ex = RemoteExecutor(live.url, live.token("alice", "read,upload,submit"))
    try:
        job = ex.submit(path, cm.JobConfig(model="tiny", formats=()))
        with pytest.raises(cm.JobFailedError) as info:
            job.result(120)
        assert info.value.code == "voxel_size_unknown"
        override = cm.JobConfig(model="tiny", voxel_size=13.48, formats=())
        result = ex.submit(path, override).result(120)
        # a bare array has no voxel size: taken to be at the model's, as locally
        bare = ex.submit(noise_volume[:16, :24, :24], cm.JobConfig(model="tiny", formats=()))
        assert bare.result(120).shape == (16, 24, 24)
    finally:
        ex.close()
        live.stop()
    local = cm.segment(path, model=models / "tiny", voxel_size=13.48, formats=())
    assert result.voxel_size == local.voxel_size == (13.48, 13.48, 13.48)
    assert result.provenance["spacing"] == local.provenance["spacing"]
    np.testing.assert_array_equal(np.asarray(result.labels), np.asarray(local.labels))


def test_a_wide_axis_map_is_built_without_its_dense_matrix():
    import tracemalloc

    tracemalloc.start()
    try:
        amap = AxisMap.build(3000, 4050, order=3)  # dense float64: 97 MB, and its temporaries
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 40 << 20, peak
    assert amap.taps <= 24 and amap.needed().tolist() == list(range(3000))
