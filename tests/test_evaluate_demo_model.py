"""scripts/evaluate_demo_model.py on the bundled model: pure noise over several seeds, the table;
the probability thresholds and noise-free references of the PySeg renderings.

Pure noise of every spectrum must stay (almost) empty: the issue's target is under 0.2 % of
the voxels called membrane. Seeds 200000-200001 are those docs/demo-model.md reports first.
"""

from __future__ import annotations

import warnings
from types import ModuleType

import mrcfile
import numpy as np
import pytest
from conftest import REAL_MRC, load_script


@pytest.fixture(scope="module")
def script() -> ModuleType:
    return load_script("evaluate_demo_model")


@pytest.mark.slow
def test_bundled_model_leaves_pure_noise_empty(script: ModuleType) -> None:
    out = script.evaluate("demo-membrane", 1, None, {"noise"}, [], noise_seeds=2)
    assert set(out["noise"]) == set(script.NOISE) == set(out["noise_seeds"])
    for name, fractions in out["noise_seeds"].items():
        assert len(fractions) == 2
        assert out["noise"][name] == fractions[0]  # the table shows seed 200000
        assert max(fractions) < 0.002, (name, fractions)
    assert out["pyseg"] == {} and out["random"] == {}  # only the parts asked for ran
    one_seed = {k: v for k, v in out.items() if k != "noise_seeds"}
    table = script.table(
        [
            ("bundled", {**out, "tardis_fraction": 0.0}),
            ("one seed", {**one_seed, "tardis_fraction": 0.0}),
        ]
    )
    assert "| low-pass 60 Å, ±70° |" in table
    # a second noise table, the worst seed of each spectrum, "—" for a model run on one seed
    worst = table.split("worst of seeds 200000–200001")[1].split("\n\n")[0]
    name = "low-pass 60 Å, ±70°"
    assert f"| {name} | {max(out['noise_seeds'][name]):.3%} | — |" in worst


def pyseg_labels() -> np.ndarray:
    path = REAL_MRC / "pyseg_tomo22_membrane_labels_int8.mrc"
    with warnings.catch_warnings():  # PySeg wrote a zero machine stamp; mrcfile warns of it
        warnings.simplefilter("ignore", RuntimeWarning)
        with mrcfile.open(path, permissive=True) as m:
            return np.asarray(m.data, dtype=np.int8)


def test_noise_free_reference_falls_with_the_band_limit(script: ModuleType) -> None:
    labels = pyseg_labels()
    # nothing filtered: the label cut at its own volume is the label
    assert script.noise_free_reference(labels, noise="white", tilt_range_deg=None) == 1.0
    lp25 = script.noise_free_reference(labels, noise="lowpass", lowpass_res_a=25.0)
    lp40 = script.noise_free_reference(labels, noise="lowpass", lowpass_res_a=40.0)
    lp80 = script.noise_free_reference(labels, noise="lowpass", lowpass_res_a=80.0)
    assert 1.0 > lp25 > lp40 > lp80 > 0.5, (lp25, lp40, lp80)


def test_probability_threshold_half_is_the_arg_max(script: ModuleType) -> None:
    labels = pyseg_labels()[:, :96, :96]
    factors = script.RENDERINGS["band, low-pass 40 Å, 1σ"]
    volume = script.render_pyseg(labels, 300_003, **factors)
    p = script.membrane_probability("demo-membrane", volume)
    mask = script.run("demo-membrane", volume)
    np.testing.assert_array_equal(p > 0.5, mask)
    curve = script.by_threshold(p, labels == 1)
    assert list(curve) == [f"{t:g}" for t in script.THRESHOLDS]
    assert curve["0.5"][0] == script.dice(mask, labels == 1)
    volumes = [v for _, v in curve.values()]
    assert volumes == sorted(volumes, reverse=True) and volumes[0] > volumes[-1]


@pytest.mark.slow
def test_pyseg_renderings_over_noise_seeds_and_beyond_the_six(
    script: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(script, "REAL", REAL_MRC)  # the tests' copy: CI has no ../shared
    six, beyond = "band, white, 1.5σ", "band, white, 1σ"
    out = script.evaluate(
        "demo-membrane", 1, None, {"pyseg", "beyond"}, [six, beyond], pyseg_seeds=2
    )
    assert list(out["pyseg"]) == [six] and list(out["beyond"]) == [beyond]  # only those named
    first, second = out["pyseg_seeds"][six]
    assert first == out["pyseg"][six]  # the table's draw is seed 300001, the first
    assert first != second  # another noise draw, another score
    # the target on this rendering holds for both draws (0.862 and 0.860 measured)
    assert min(first, second) >= 0.80, (first, second)
    assert 0.0 < out["beyond"][beyond] <= 1.0
    one_draw = {k: v for k, v in out.items() if k != "pyseg_seeds"}  # as a one-seed run
    table = script.table(
        [
            ("one draw", {**one_draw, "beyond": {}, "tardis_fraction": 0.0}),
            ("bundled", {**out, "tardis_fraction": 0.0}),  # rows come from the last model
        ]
    )
    worst = table.split("worst of 2 noise seeds, Dice")[1].split("\n\n")[0]
    assert f"| {six} | — | {min(first, second):.3f} |" in worst
    assert f"| {beyond} | — | {out['beyond'][beyond]:.3f} |" in table
