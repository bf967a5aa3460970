"""The streaming engine: equal to nnU-Net's own prediction, bounded, cancellable, deterministic."""

from __future__ import annotations

import itertools
import json
import shutil
import threading

import numpy as np
import pytest

from cryomamba import InvalidVolumeError, ModelError
from cryomamba.engine import StreamingPredictor, TrainedModel
from cryomamba.engine.streaming import Canceled
from cryomamba.testing.reference import nnunet_predictor


def nnunet_prediction(
    model_dir, volume, *, folds, step=0.5, mirroring=False, spacing=(10.0, 10.0, 10.0)
):
    """nnU-Net's own `predict_single_npy_array` with the same model and settings."""
    predictor = nnunet_predictor(model_dir, folds=folds, tile_step=step, mirroring=mirroring)
    return predictor.predict_single_npy_array(
        volume[None], {"spacing": list(spacing)}, None, None, True
    )


def assert_equal_up_to_ties(ours, ref, probs, *, max_fraction=1e-4):
    """Labels equal nnU-Net's; any difference must sit where the top two classes tie."""
    diff = ours != ref
    if diff.any():
        top2 = np.sort(probs[:, diff], axis=0)[-2:]
        margins = top2[1] - top2[0]
        assert margins.max() < 1e-2, f"labels differ where nnU-Net was sure: {margins.max()}"
        assert diff.mean() <= max_fraction


@pytest.mark.slow
@pytest.mark.parametrize(
    ("shape", "step", "mirroring", "zero_border"),
    [
        ((30, 40, 36), 0.5, False, False),  # several z-rows of tiles: the rolling buffer rolls
        ((11, 13, 20), 0.5, False, False),  # smaller than the patch: pad, then crop back
        ((26, 33, 29), 0.33, True, True),  # TTA, odd step, a zero border nnU-Net crops away
    ],
)
def test_labels_equal_nnunet_predict_single_npy_array(
    tiny_model, shape, step, mirroring, zero_border
):
    rng = np.random.default_rng(sum(shape))
    volume = rng.normal(size=shape).astype(np.float32) * 3 + 7
    if zero_border:
        volume[:3] = 0
        volume[:, -4:] = 0
    model = TrainedModel.load(tiny_model)
    ours = StreamingPredictor(model, tile_step=step, mirroring=mirroring).predict(volume)
    ref, probs = nnunet_prediction(tiny_model, volume, folds=(0,), step=step, mirroring=mirroring)
    assert ours.shape == volume.shape and ours.dtype == np.uint8
    assert len(np.unique(ref)) > 1, "the reference must not be trivially constant"
    assert_equal_up_to_ties(ours, ref, probs)
    if zero_border:
        assert not ours[:3].any() and not ours[:, -4:].any()


@pytest.mark.slow
def test_ensemble_of_folds_with_three_labels_equals_nnunet(tiny_model_3class_2folds):
    volume = np.random.default_rng(5).normal(size=(28, 30, 34)).astype(np.float32)
    model = TrainedModel.load(tiny_model_3class_2folds)
    assert model.folds == (0, 1)
    ours = StreamingPredictor(model).predict(volume)
    ref, probs = nnunet_prediction(tiny_model_3class_2folds, volume, folds=(0, 1))
    assert set(np.unique(ref)) == {0, 1, 2}, "the reference must use all three labels"
    assert set(np.unique(ours)) == {0, 1, 2}
    assert_equal_up_to_ties(ours, ref, probs)


def test_deterministic_and_memmap_source(tiny_model, tmp_path):
    volume = np.random.default_rng(1).normal(size=(20, 24, 22)).astype(np.float32)
    path = tmp_path / "v.raw"
    volume.tofile(path)
    mapped = np.memmap(path, dtype=np.float32, mode="r", shape=volume.shape)
    model = TrainedModel.load(tiny_model)
    a = StreamingPredictor(model).predict(volume)
    b = StreamingPredictor(model).predict(mapped)
    np.testing.assert_array_equal(a, b)


def test_progress_planes_and_bounded_buffer(tiny_model):
    volume = np.random.default_rng(2).normal(size=(40, 20, 20)).astype(np.float32)
    model = TrainedModel.load(tiny_model)
    predictor = StreamingPredictor(model)
    grid = predictor.plan(volume.shape)
    progress, planes = [], []
    predictor.predict(
        volume,
        on_progress=lambda d, t: progress.append((d, t)),
        on_planes=lambda a, b: planes.append((a, b)),
    )
    assert progress[-1] == (grid.n_tiles, grid.n_tiles)
    assert [d for d, _ in progress] == sorted(d for d, _ in progress)
    # planes finish in order, contiguously, before the end of the run
    assert planes[0][0] == 0 and planes[-1][1] == 40
    assert all(a == b for (_, a), (b, _) in itertools.pairwise(planes))
    assert len(planes) == len(grid.steps[0]) > 3


@pytest.mark.parametrize("prefetch", [False, True])
def test_cancel_stops_between_batches_and_leaves_no_thread(tiny_model, prefetch):
    volume = np.random.default_rng(3).normal(size=(40, 40, 40)).astype(np.float32)
    model = TrainedModel.load(tiny_model)
    cancel = threading.Event()
    seen = []

    def on_progress(done, total):
        seen.append(done)
        if done == 3:
            cancel.set()

    before = threading.active_count()
    predictor = StreamingPredictor(model, tile_batch=1, prefetch=prefetch)
    with pytest.raises(Canceled):
        predictor.predict(volume, on_progress=on_progress, cancel=cancel)
    assert seen[-1] == 3
    assert threading.active_count() == before


@pytest.mark.parametrize(
    ("make", "phrase"),
    [
        (lambda v: np.full_like(v, 3.0), "constant"),
        (lambda v: np.where(v > 2, np.nan, v).astype(np.float32), "NaN"),
        (lambda v: v[0], "3D"),
    ],
)
def test_bad_volumes_are_refused_clearly(tiny_model, noise_volume, make, phrase):
    model = TrainedModel.load(tiny_model)
    with pytest.raises(InvalidVolumeError, match=phrase):
        StreamingPredictor(model).predict(make(noise_volume))


def _copy(model_dir, tmp_path):
    return shutil.copytree(model_dir, tmp_path / "model")


def test_model_folder_problems_are_model_errors(tiny_model, tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        TrainedModel.load(tmp_path / "nothing")
    broken = _copy(tiny_model, tmp_path)
    (broken / "dataset.json").unlink()
    with pytest.raises(ModelError, match="no dataset.json"):
        TrainedModel.load(broken)


def test_missing_checkpoint_and_missing_fold(tiny_model, tmp_path):
    model = _copy(tiny_model, tmp_path)
    with pytest.raises(ModelError, match=r"lacks checkpoint_final.pth for fold\(s\) \[3\]"):
        TrainedModel.load(model, folds=(3,))
    (model / "fold_0" / "checkpoint_final.pth").rename(model / "fold_0" / "checkpoint_best.pth")
    with pytest.raises(ModelError, match="checkpoint_best") as info:
        TrainedModel.load(model)
    assert "no fold_N/checkpoint_final.pth" in info.value.message
    assert TrainedModel.load(model, checkpoint="checkpoint_best.pth").folds == (0,)


def test_plans_that_do_not_match_the_checkpoint(tiny_model, tmp_path):
    model = _copy(tiny_model, tmp_path)
    plans = json.loads((model / "plans.json").read_text())
    arch = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    arch["features_per_stage"] = [8, 16, 32]
    (model / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(ModelError, match="does not match the architecture"):
        TrainedModel.load(model)


def test_truncated_checkpoint_and_unsupported_plans(tiny_model, tmp_path):
    model = _copy(tiny_model, tmp_path)
    ckpt = model / "fold_0" / "checkpoint_final.pth"
    ckpt.write_bytes(ckpt.read_bytes()[:200])
    with pytest.raises(ModelError, match="cannot read checkpoint"):
        TrainedModel.load(model)
    plans = json.loads((model / "plans.json").read_text())
    plans["configurations"]["3d_fullres"]["normalization_schemes"] = ["MyOwnNormalization"]
    (model / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(ModelError, match="MyOwnNormalization"):
        TrainedModel.load(model)
    plans["configurations"] = {"2d": {}}
    (model / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(ModelError, match="no 3d_fullres"):
        TrainedModel.load(model)
    (model / "plans.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        TrainedModel.load(model)


def test_output_memmap_keeps_data_after_its_pages_are_released(tiny_model):
    from cryomamba.engine.output import release_pages, temporary_labels

    volume = np.random.default_rng(4).normal(size=(24, 20, 20)).astype(np.float32)
    model = TrainedModel.load(tiny_model)
    expected = StreamingPredictor(model).predict(volume)
    out = temporary_labels(volume.shape)
    assert isinstance(out, np.memmap) and not out.any()
    StreamingPredictor(model).predict(
        volume, out=out, on_planes=lambda a, b: release_pages(out, 0, b)
    )
    np.testing.assert_array_equal(np.asarray(out), expected)


def test_planes_past_the_nonzero_box_are_reported_final(tiny_model):
    volume = np.random.default_rng(6).normal(size=(30, 20, 20)).astype(np.float32)
    volume[:4] = 0
    volume[-6:] = 0
    planes = []
    out = StreamingPredictor(TrainedModel.load(tiny_model)).predict(
        volume, on_planes=lambda a, b: planes.append((a, b))
    )
    assert planes[-1][1] == 30
    assert not out[:4].any() and not out[-6:].any()


def test_cancel_is_honoured_while_scanning_intensities(tiny_model):
    volume = np.random.default_rng(7).normal(size=(40, 40, 40)).astype(np.float32)
    cancel = threading.Event()
    cancel.set()
    progress = []
    with pytest.raises(Canceled):
        StreamingPredictor(TrainedModel.load(tiny_model)).predict(
            volume, cancel=cancel, on_progress=lambda d, t: progress.append(d)
        )
    assert progress == []  # stopped before the first tile
