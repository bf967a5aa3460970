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
