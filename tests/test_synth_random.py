"""Tests for cryomamba.synth_random and synth_spectra: determinism, geometry, spectra, factors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.fft

from cryomamba import synth_spectra as spectra
from cryomamba.synth_random import Factors, draw_factors, profile, randomized

SHAPE = (24, 48, 48)
EMPTY = dict(
    n_vesicles=0,
    n_sheets=0,
    n_stacks=0,
    n_particles=0,
    n_filaments=0,
    n_tubes=0,
    n_gold=0,
    carbon_edge=False,
    gradient=0.0,
)


def test_deterministic_per_seed() -> None:
    a, b = randomized(SHAPE, seed=5), randomized(SHAPE, seed=5)
    assert a.factors == b.factors
    assert np.array_equal(a.volume, b.volume) and np.array_equal(a.labels, b.labels)
    c = randomized(SHAPE, seed=6)
    assert not np.array_equal(a.volume, c.volume)


def test_output_grid_and_types() -> None:
    tomo = randomized(SHAPE, seed=1, voxel_size=7.0)
    assert tomo.volume.shape == tomo.labels.shape == SHAPE
    assert tomo.volume.dtype == np.float32 and tomo.labels.dtype == np.uint8
    assert tomo.voxel_size == 10.0 and np.isfinite(tomo.volume).all()
    assert set(np.unique(tomo.labels)) <= {0, 1}


def test_overrides_are_checked() -> None:
    with pytest.raises(ValueError, match="unknown factors"):
        randomized(SHAPE, seed=0, colour="red")
    with pytest.raises(ValueError, match="noise must be one of"):
        randomized(SHAPE, seed=0, noise="pink")
    with pytest.raises(ValueError, match="profile"):
        Factors(profile="triple")


def test_single_sheet_label_is_a_band_of_the_thickness() -> None:
    """A flat sheet (bend 0) across the volume: label thickness along its normal = thickness."""
    for thickness in (3.0, 8.0):
        tomo = randomized(
            (32, 64, 64),
            seed=3,
            **{**EMPTY, "n_sheets": 1},
            sheet_bend_nm=0.0,
            thickness_nm=thickness,
            voxel_size=10.0,
        )
        area_nm2 = tomo.labels.sum() / thickness  # voxels are 1 nm³
        # the sheet crosses the volume: its area is at least the smallest face
        assert area_nm2 >= 32 * 64 * 0.9
        assert tomo.labels.sum() <= thickness * 1.01 * 64 * 64 * math.sqrt(3) + 64 * 64


def test_membrane_is_dark_in_each_profile() -> None:
    for kind in ("bilayer", "band"):
        tomo = randomized(
            SHAPE, seed=2, **{**EMPTY, "n_vesicles": 3}, profile=kind, noise="white",
            tilt_range_deg=None, contrast=2.0, vesicle_radius_nm=(8.0, 15.0),
        )  # fmt: skip
        lab = tomo.labels == 1
        assert lab.any()
        gap = tomo.volume[~lab].mean() - tomo.volume[lab].mean()
        assert gap > 1.0  # noise sigma is 1; RMS contrast 2 over the band


def test_bilayer_has_two_leaflets_and_band_one() -> None:
    d = np.linspace(-5, 5, 201)
    for thickness in (5.0, 8.0):
        rho = profile(d, "bilayer", thickness, 1.0)
        minima = d[1:-1][(rho[1:-1] < rho[:-2]) & (rho[1:-1] < rho[2:])]
        assert np.allclose(
            sorted(minima), [-(thickness / 2 - 0.75), thickness / 2 - 0.75], atol=0.06
        )
    band = profile(d, "band", 5.0, 1.0)
    assert np.argmin(band) == 100 and band.min() == pytest.approx(-1.0)


def test_contrast_is_rms_over_the_band() -> None:
    kw = {**EMPTY, "n_vesicles": 4, "vesicle_radius_nm": (8.0, 14.0), "noise": "lowpass"}
    quiet = randomized(SHAPE, seed=4, contrast=0.5, **kw)
    loud = randomized(SHAPE, seed=4, contrast=3.0, **kw)
    lab = quiet.labels == 1
    diff = loud.volume - quiet.volume  # same noise, signal scaled by 6 - 1 = 5 x (1/0.5)
    rms_quiet = math.sqrt(float(np.mean((diff[lab] / 5.0) ** 2)))
    assert rms_quiet == pytest.approx(0.5, rel=0.02)


def _power(volume: np.ndarray) -> np.ndarray:
    return np.abs(scipy.fft.rfftn(volume - volume.mean())) ** 2


@pytest.mark.parametrize("noise", ["white", "lowpass", "ctf"])
def test_noise_spectrum(noise: str) -> None:
    """Pure noise: unit variance; low-pass and CTF noise hold little power at Nyquist."""
    kw = {**EMPTY, "noise": noise, "tilt_range_deg": None, "voxel_size": 10.0}
    tomo = randomized((32, 32, 32), seed=8, lowpass_res_a=30.0, defocus_um=3.0, **kw)
    assert not tomo.labels.any()
    assert tomo.volume.std() == pytest.approx(1.0, rel=1e-3)
    power = _power(tomo.volume)
    k = np.sqrt(sum(f**2 for f in spectra.frequencies((32, 32, 32), 10.0)))  # cycles/Å
    low, high = power[(k > 0) & (k < 0.015)].mean(), power[k > 0.045].mean()
    if noise == "white":
        assert 0.5 < high / low < 2.0
    elif noise == "lowpass":  # gain 1/2 at 1/30 Å: power ratio ~ exp(-2 ln2 (k·30)²) at 0.05
        assert high / low < 0.1
    else:  # CTF: nothing at k = 0 (weak phase), most power in a middle band
        assert power[(k > 0) & (k < 0.005)].mean() < power[(k > 0.01) & (k < 0.03)].mean()


def test_missing_wedge_empties_the_wedge() -> None:
    tilt = 50.0
    kw = {**EMPTY, "noise": "white", "voxel_size": 10.0}
    tomo = randomized((32, 32, 32), seed=9, tilt_range_deg=tilt, **kw)
    power = _power(tomo.volume)
    kz, _, kx = spectra.frequencies((32, 32, 32), 1.0)
    inside = np.broadcast_to(kx < math.tan(math.radians(90 - tilt - 3)) * np.abs(kz), power.shape)
    outside = np.broadcast_to(kx > math.tan(math.radians(90 - tilt + 3)) * np.abs(kz), power.shape)
    assert power[inside].mean() < 1e-6 * power[outside].mean()


def test_voxel_size_resampling_keeps_physical_size() -> None:
    """The same scene drawn at 7 and 14 Å: labels on the 10 Å grid, the same geometry."""
    kw = {**EMPTY, "n_vesicles": 2, "vesicle_radius_nm": (10.0, 14.0)}
    fine = randomized(SHAPE, seed=11, voxel_size=7.0, **kw)
    coarse = randomized(SHAPE, seed=11, voxel_size=14.0, **kw)
    assert np.array_equal(fine.labels, coarse.labels)
    assert fine.labels.any()
    # the coarse grid cannot hold frequencies above 1/28 Å⁻¹: no power there after resampling
    power = _power(coarse.volume)
    kz, ky, kx = (np.abs(f) for f in spectra.frequencies(SHAPE, 10.0))
    kmax = np.maximum(np.maximum(kz, ky), kx)  # along any axis
    assert power[kmax > 0.037].mean() < 1e-6 * power[(kmax > 0) & (kmax < 0.03)].mean()


def test_each_factor_is_reachable() -> None:
    seen: dict[str, set] = {k: set() for k in ("noise", "profile", "wedge", "empty", "stack")}
    seen.update(touch=set(), edge=set(), gold=set(), tube=set(), strong=set(), small=set())
    lo = dict(voxel=99.0, thick=99.0, contrast=99.0, tilt=99.0)
    hi = dict(voxel=0.0, thick=0.0, contrast=0.0, tilt=0.0)
    for seed in range(300):
        f = draw_factors(np.random.default_rng(seed))
        seen["noise"].add(f.noise)
        seen["profile"].add(f.profile)
        seen["wedge"].add(f.tilt_range_deg is None)
        seen["empty"].add(f.n_vesicles + f.n_sheets + f.n_stacks == 0)
        seen["stack"].add(f.n_stacks > 0)
        seen["touch"].add(f.stack_gap_nm == 0.0)
        seen["edge"].add(f.carbon_edge)
        seen["gold"].add(f.n_gold > 0)
        seen["tube"].add(f.n_tubes > 0)
        seen["strong"].add(f.sheet_bend_nm > 5)
        seen["small"].add(f.vesicle_radius_nm[1] <= 25)
        for key, value in (
            ("voxel", f.voxel_size),
            ("thick", f.thickness_nm),
            ("contrast", f.contrast),
            ("tilt", f.tilt_range_deg or 55.0),
        ):
            lo[key], hi[key] = min(lo[key], value), max(hi[key], value)
    assert seen["noise"] == {"white", "lowpass", "ctf"}
    assert seen["profile"] == {"bilayer", "band"}
    for key in ("wedge", "empty", "stack", "touch", "edge", "gold", "tube", "strong", "small"):
        assert seen[key] == {True, False}, key
    assert 7.0 <= lo["voxel"] < 7.5 and 13.5 < hi["voxel"] <= 14.0
    assert 3.0 <= lo["thick"] < 3.3 and 7.7 < hi["thick"] <= 8.0
    assert 0.5 <= lo["contrast"] < 0.6 and 2.6 < hi["contrast"] <= 3.0
    assert 40.0 <= lo["tilt"] < 42.0 and 68.0 < hi["tilt"] <= 70.0


def test_membranes_cut_by_the_edge() -> None:
    """Vesicle centres may lie outside the volume: some labels touch the faces."""
    touching = 0
    for seed in range(6):
        lab = randomized(SHAPE, seed=seed, **{**EMPTY, "n_vesicles": 4}).labels
        faces = [lab[0], lab[-1], lab[:, 0], lab[:, -1], lab[:, :, 0], lab[:, :, -1]]
        touching += sum(bool(face.any()) for face in faces)
    assert touching > 0


def test_fourier_resampling_keeps_the_mean() -> None:
    vol = np.random.default_rng(0).normal(3.0, 1.0, size=(20, 30, 30)).astype(np.float32)
    out = spectra.filter_volume(vol, None, (14, 21, 21))
    assert out.shape == (14, 21, 21)
    assert float(out.mean()) == pytest.approx(float(vol.mean()), abs=1e-4)
