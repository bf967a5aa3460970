"""scripts/train_demo_model.py: same seed, same weights (either memory layout); the low-pass
share; a loadable folder; a fine-tune cycle in the same command equals a second run; the
network's stages set by --features.

The bundled model's README promises that the training script is deterministic. These tests
run the real script for a few iterations (tiny pool, real volumes, the real network) twice
and compare the weights bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from conftest import load_script


@pytest.fixture(scope="module")
def script() -> ModuleType:
    return load_script("train_demo_model")


def test_forced_lowpass_share_and_range(script: ModuleType) -> None:
    forced = [script.forced_lowpass(seed, 0.3) for seed in range(2000)]
    share = np.mean([bool(f) for f in forced])
    assert 0.26 < share < 0.34
    res = [f["lowpass_res_a"] for f in forced if f]
    lo, hi = script.LOWPASS_RANGE_A
    assert lo <= min(res) < lo + 2 and hi - 2 < max(res) <= hi
    assert all(f["noise"] == "lowpass" for f in forced if f)
    assert script.forced_lowpass(7, 0.3) == script.forced_lowpass(7, 0.3)
    assert not any(script.forced_lowpass(seed, 0.0) for seed in range(200))


def test_forcing_lowpass_changes_only_the_noise(script: ModuleType) -> None:
    seed = next(s for s in range(100) if script.forced_lowpass(s, 0.3))
    plain = script.random_volume(seed, 0.0)
    forced = script.random_volume(seed, 0.3)
    np.testing.assert_array_equal(plain[1], forced[1])  # same membranes, same labels
    assert plain[3]["contrast"] == forced[3]["contrast"]
    assert forced[3]["noise"].startswith("lowpass")
    assert not np.array_equal(plain[0], forced[0])


TINY = [
    "--n-train", "2", "--classic-fraction", "0.5", "--noise-fraction", "0.5",
    "--refresh-every", "1", "--noise-refresh-every", "2", "--lowpass-fraction", "0.5",
    "--log-every", "2", "--eval-snr",
]  # fmt: skip


def _weights(folder: Path) -> dict:
    return torch.load(folder / "fold_0" / "checkpoint_final.pth", weights_only=False)


@pytest.mark.slow
@pytest.mark.parametrize("channels_last", [False, True], ids=["default-layout", "channels-last"])
def test_same_seed_same_weights(
    script: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, channels_last: bool
) -> None:
    monkeypatch.setenv("nnUNet_def_n_proc", "2")  # main() sets it; restored afterwards
    threads = torch.get_num_threads()
    argv = ["--iterations", "4", *TINY] + (["--channels-last"] if channels_last else [])
    try:
        for run in ("a", "b"):
            assert script.main(["--out", str(tmp_path / run), *argv]) == 0
    finally:
        torch.set_num_threads(threads)
    a, b = (_weights(tmp_path / run) for run in ("a", "b"))
    assert a["network_weights"].keys() == b["network_weights"].keys()
    for name, tensor in a["network_weights"].items():
        assert torch.equal(tensor, b["network_weights"][name]), name
    record = a["cryomamba_training"]
    kinds = [m["kind"] for m in record["train_volumes"]]
    # the pool (2 randomised, 1 old-style, 1 noise), 4 fresh randomised, 2 fresh noise
    assert kinds.count("random") == 6 and kinds.count("synth") == 1 and kinds.count("noise") == 3
    assert record["lowpass_fraction"] == 0.5 and record["iterations_done"] == 4
    assert record["channels_last"] is channels_last
    # an nnU-Net folder: the predictor loads it, and the README names the command
    from cryomamba.testing.reference import nnunet_predictor

    predictor = nnunet_predictor(tmp_path / "a")
    assert predictor.network is not None
    assert json.loads((tmp_path / "a" / "dataset.json").read_text())["labels"]["membrane"] == 1
    assert "--lowpass-fraction 0.5" in (tmp_path / "a" / "README.md").read_text()


@pytest.mark.slow
def test_finetune_cycle_equals_a_second_run(
    script: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--finetune-iterations N --finetune-lr LR` gives the weights of a second run with
    `--init` the first's folder, and the folder keeps both runs' records."""
    monkeypatch.setenv("nnUNet_def_n_proc", "2")
    threads = torch.get_num_threads()
    one, first, second = tmp_path / "one", tmp_path / "first", tmp_path / "second"
    try:
        script.main(["--out", str(one), "--iterations", "3", *TINY,
                     "--finetune-iterations", "2", "--finetune-lr", "5e-4"])  # fmt: skip
        script.main(["--out", str(first), "--iterations", "3", *TINY])
        script.main(["--out", str(second), "--iterations", "2", *TINY,
                     "--init", str(first), "--lr", "5e-4"])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    a, b, start = _weights(one), _weights(second), _weights(first)
    for name, tensor in a["network_weights"].items():
        assert torch.equal(tensor, b["network_weights"][name]), name
    assert any(
        not torch.equal(t, start["network_weights"][n]) for n, t in a["network_weights"].items()
    ), "the fine-tune cycle left the weights as they were"
    record = a["cryomamba_training"]
    assert record["iterations"] == 2 and record["lr"] == 5e-4
    assert record["init_training"]["iterations"] == 3 and record["init_training"]["lr"] == 3e-3
    assert record["init_training"]["init_training"] is None
    readme = (one / "README.md").read_text()
    assert "Trained in 2 runs of this script" in readme and "--finetune-iterations 2" in readme
    # the two-command form names both commands
    two = (second / "README.md").read_text()
    for folder, n in ((first, 3), (second, 2)):
        assert f"python scripts/train_demo_model.py --out {folder} --iterations {n} " in two


@pytest.mark.slow
def test_features_set_the_network_and_must_match_init(
    script: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--features` gives a network of that many stages that nnU-Net's predictor loads; a
    fine-tune from weights of another shape is a usage error, not a state-dict traceback."""
    monkeypatch.setenv("nnUNet_def_n_proc", "2")
    threads = torch.get_num_threads()
    deep = tmp_path / "deep"
    try:
        assert script.main(["--out", str(deep), "--iterations", "2", *TINY,
                            "--features", "4", "8", "16", "32", "64"]) == 0  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    plans = json.loads((deep / "plans.json").read_text())
    arch = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    assert arch["features_per_stage"] == [4, 8, 16, 32, 64] and arch["n_stages"] == 5
    assert _weights(deep)["cryomamba_training"]["features"] == [4, 8, 16, 32, 64]
    from cryomamba.testing.reference import nnunet_predictor

    predictor = nnunet_predictor(deep)
    assert len(predictor.network.encoder.stages) == 5
    assert "5 stages, features [4, 8, 16, 32, 64]" in (deep / "README.md").read_text()
    with pytest.raises(SystemExit) as exc:  # the default 4-stage network from 5-stage weights
        script.main(["--out", str(tmp_path / "ft"), "--iterations", "1", *TINY,
                     "--init", str(deep)])  # fmt: skip
    assert exc.value.code == 2 and not (tmp_path / "ft").exists()


def test_bad_iterations_or_lr_is_a_usage_error(script: ModuleType, tmp_path: Path) -> None:
    for argv in (
        ["--iterations", "0"],
        ["--finetune-iterations", "-1"],
        ["--lr", "0"],
        ["--finetune-lr", "-1e-3"],
        ["--features", "8"],
        ["--features", "8", "16", "0"],
        ["--init", str(tmp_path)],  # a folder, but not a model's
    ):
        with pytest.raises(SystemExit) as exc:
            script.main(["--out", str(tmp_path / "m"), *argv])
        assert exc.value.code == 2
    assert not (tmp_path / "m").exists()
