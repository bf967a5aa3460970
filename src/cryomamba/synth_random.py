"""Domain-randomised synthetic tomograms: the training data of the bundled demo model.

`randomized(shape, seed=...)` draws a set of `Factors` (how membranes look, what else is in
the volume, the noise spectrum, the voxel size) and renders a tomogram with geometric
membrane labels. Every factor can be fixed by keyword, so each one can be evaluated at its
extremes. Conventions are those of `cryomamba.synth` (ZYX, dark density, labels 0
background / 1 membrane, geometry in nm), and:

- The scene is drawn at a voxel size of 7–14 Å and presented at 10 Å: noise and density are
  made on the coarse or fine grid and Fourier-resampled to the 10 Å output grid
  (`cryomamba.synth_spectra`); the labels are evaluated on the output grid from the
  geometry (|distance to a membrane midsurface| <= thickness / 2).
- Membranes are bilayers (two Gaussian leaflets 0.75 nm inside the band edges) or single dark
  bands (one Gaussian), 3–8 nm thick. ``contrast`` is the RMS density of the membranes
  over their label band, after the optics, in units of the noise standard deviation (which
  is 1).
- Signal and noise pass through the same optics: a spectrum (white, Gaussian low-pass, or a
  CTF with random defocus, phase-flipped or not) and, usually, a missing wedge with a tilt
  range of ±40–70°. Distractors (particles, filaments, tubes, a carbon or ice edge, an
  intensity gradient, gold beads) are background.
- Deterministic per seed: factors, content and noise come from three streams of
  ``numpy.random.SeedSequence(seed)``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import synth_spectra as spectra
from .synth import _box, _coords_nm, _random_rotation, _Sheet

__all__ = ["Factors", "RandomTomogram", "draw_factors", "profile", "randomized", "transfer"]

VOXEL_A = 10.0  # the output grid
NOISE_KINDS = ("white", "lowpass", "ctf")


@dataclass(frozen=True)
class Factors:
    """Everything `randomized` draws for one volume (see the module docstring)."""

    voxel_size: float = 10.0  # Å, the grid the scene is drawn on before resampling to 10 Å
    profile: str = "bilayer"  # "bilayer" or "band"
    thickness_nm: float = 5.5
    contrast: float = 1.5  # peak membrane darkness / noise sigma
    n_vesicles: int = 4
    vesicle_radius_nm: tuple[float, float] = (8.0, 60.0)
    n_sheets: int = 1
    sheet_bend_nm: float = 3.0  # sinusoid amplitude; ~1-4 gentle, 6-15 strong
    n_stacks: int = 0  # thylakoid-like stacks of parallel sheets
    stack_gap_nm: float = 3.0  # between the bands of a stack; 0 = touching
    n_particles: int = 20
    n_filaments: int = 2
    n_tubes: int = 0  # microtubule-like hollow tubes (25 nm, 5 nm wall)
    carbon_edge: bool = False
    gradient: float = 0.0  # peak-to-peak linear ramp, noise sigmas
    n_gold: int = 0
    noise: str = "white"  # one of NOISE_KINDS
    lowpass_res_a: float = 30.0
    defocus_um: float = 3.0
    bfactor: float = 1500.0  # Å², the CTF's envelope
    phase_flipped: bool = True
    tilt_range_deg: float | None = 60.0  # None: no missing wedge

    def __post_init__(self) -> None:
        if self.profile not in ("bilayer", "band"):
            raise ValueError(f"profile must be 'bilayer' or 'band', got {self.profile!r}")
        if self.noise not in NOISE_KINDS:
            raise ValueError(f"noise must be one of {NOISE_KINDS}, got {self.noise!r}")
        if not 3.0 <= self.voxel_size <= 30.0:
            raise ValueError(f"voxel_size must be in [3, 30] Å, got {self.voxel_size}")
        if not self.thickness_nm > 0 or not self.contrast >= 0:
            raise ValueError("thickness_nm must be > 0 and contrast >= 0")
        if self.tilt_range_deg is not None and not 0 < self.tilt_range_deg <= 90:
            raise ValueError(f"tilt_range_deg must be in (0, 90], got {self.tilt_range_deg}")


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def draw_factors(rng: np.random.Generator, **overrides: Any) -> Factors:
    """Draw every factor at random (always in the same order), then apply `overrides`."""
    empty = rng.random() < 0.12  # volumes with no membrane teach "noise is not membrane"
    bend_strong = rng.random() < 0.35
    values: dict[str, Any] = dict(
        voxel_size=float(rng.uniform(7.0, 14.0)),
        profile=str(rng.choice(["bilayer", "band"])),
        thickness_nm=float(rng.uniform(3.0, 8.0)),
        contrast=_log_uniform(rng, 0.5, 3.0),
        n_vesicles=0 if empty else int(rng.integers(0, 9)),
        vesicle_radius_nm=(8.0, float(rng.choice([25.0, 60.0, 120.0]))),
        n_sheets=0 if empty else int(rng.integers(0, 3)),
        sheet_bend_nm=float(rng.uniform(6.0, 15.0) if bend_strong else rng.uniform(0.5, 4.0)),
        n_stacks=0 if empty else int(rng.random() < 0.25),
        stack_gap_nm=float(rng.choice([0.0, rng.uniform(0.5, 8.0)])),
        n_particles=int(rng.integers(0, 60)),
        n_filaments=int(rng.integers(0, 6)),
        n_tubes=int(rng.random() < 0.2),
        carbon_edge=bool(rng.random() < 0.2),
        gradient=float(rng.choice([0.0, rng.uniform(0.2, 2.0)])),
        n_gold=int(rng.integers(0, 6)) if rng.random() < 0.3 else 0,
        noise=str(rng.choice(NOISE_KINDS)),
        lowpass_res_a=float(rng.uniform(22.0, 60.0)),
        defocus_um=float(rng.uniform(1.5, 6.0)),
        bfactor=float(rng.uniform(800.0, 3000.0)),
        phase_flipped=bool(rng.random() < 0.6),
        tilt_range_deg=float(rng.uniform(40.0, 70.0)) if rng.random() < 0.85 else None,
    )
    unknown = set(overrides) - set(values)
    if unknown:
        raise ValueError(f"unknown factors {sorted(unknown)}; known: {sorted(values)}")
    values.update(overrides)
    return Factors(**values)


def profile(d: np.ndarray, kind: str, thickness_nm: float, amplitude: float) -> np.ndarray:
    """Density (negative = dark) at signed distance `d` (nm) from a membrane midsurface."""
    half = thickness_nm / 2.0
    if kind == "band":
        sigma = thickness_nm / 3.5
        return -amplitude * np.exp(-(d**2) / (2 * sigma**2))
    offset, sigma = max(half - 0.75, 0.5), min(0.8, 0.45 * half)
    s2 = 2.0 * sigma**2
    return -amplitude * (np.exp(-((d - offset) ** 2) / s2) + np.exp(-((d + offset) ** 2) / s2))


def transfer(f: Factors, shape: tuple[int, int, int], voxel_a: float) -> np.ndarray | None:
    """The optics of `f` on a grid: spectrum × wedge, rfftn layout (None when all-pass)."""
    out: np.ndarray | None = None
    if f.noise == "lowpass":
        out = spectra.lowpass(shape, voxel_a, f.lowpass_res_a)
    elif f.noise == "ctf":
        out = spectra.ctf(
            shape, voxel_a, f.defocus_um, bfactor=f.bfactor, phase_flipped=f.phase_flipped
        )
    if f.tilt_range_deg is not None and f.tilt_range_deg < 90:
        w = spectra.wedge(shape, f.tilt_range_deg)
        out = w if out is None else out * w
    return out


@dataclass(frozen=True)
class RandomTomogram:
    """A randomised tomogram at 10 Å: float32 volume, uint8 labels (1 membrane), its factors."""

    volume: np.ndarray = dataclasses.field(repr=False)
    labels: np.ndarray = dataclasses.field(repr=False)
    factors: Factors
    seed: int
    voxel_size: float = VOXEL_A


class _Scene:
    """Signed-distance membranes and density-only distractors, evaluated on any grid."""

    def __init__(self, f: Factors, extent_nm: np.ndarray, rng: np.random.Generator) -> None:
        self.f, self.extent = f, extent_nm
        self.membranes: list[tuple[str, Any, float]] = []  # (kind, geometry, amplitude)
        self.blobs: list[tuple[np.ndarray, float, float]] = []  # (centre, radius, amplitude)
        self.rods: list[tuple[np.ndarray, np.ndarray, float, float, float]] = []
        self.edge: tuple[np.ndarray, np.ndarray, float, float] | None = None
        self._draw(rng)

    def _sheet(self, rng: np.random.Generator, normal: np.ndarray | None = None) -> _Sheet:
        """A sheet whose normal keeps clear of the missing wedge (else it would be invisible)."""
        if normal is None:
            wedge_half = 90.0 - (self.f.tilt_range_deg or 90.0)
            phi = math.radians(rng.uniform(min(wedge_half + 15.0, 89.0), 90.0))
            psi = math.radians(rng.uniform(-50.0, 50.0))
            sz, sx = rng.choice([-1.0, 1.0], size=2)
            normal = np.array(
                [
                    sz * math.cos(psi) * math.cos(phi),
                    math.sin(psi),
                    sx * math.cos(psi) * math.sin(phi),
                ]
            )
        helper = np.array([1.0, 0.0, 0.0]) if abs(normal[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
        u = np.cross(normal, helper)
        u /= np.linalg.norm(u)
        bend = self.f.sheet_bend_nm
        wavelength = (60.0, 150.0) if bend > 5 else (100.0, 300.0)
        return _Sheet(
            normal=normal,
            point=self.extent * rng.uniform(0.1, 0.9, size=3),
            axes=np.stack([u, np.cross(normal, u)]),
            amps=bend * rng.uniform(0.6, 1.0, size=2),
            wavenumbers=2.0 * math.pi / rng.uniform(*wavelength, size=2),
            phases=rng.uniform(0.0, 2.0 * math.pi, size=2),
        )

    def _amp(self, rng: np.random.Generator) -> float:
        return float(rng.uniform(0.8, 1.2))

    def _draw(self, rng: np.random.Generator) -> None:
        f, ext = self.f, self.extent
        for _ in range(f.n_sheets):
            self.membranes.append(("sheet", self._sheet(rng), self._amp(rng)))
        for _ in range(f.n_stacks):
            base = self._sheet(rng)
            spacing = f.thickness_nm + f.stack_gap_nm
            for k in range(int(rng.integers(2, 6))):
                layer = dataclasses.replace(base, point=base.point + k * spacing * base.normal)
                self.membranes.append(("sheet", layer, self._amp(rng)))
        for _ in range(f.n_vesicles):  # centres may lie outside: membranes cut by the edge
            r = _log_uniform(rng, *f.vesicle_radius_nm)
            semi = r * rng.uniform(0.8, 1.2, size=3)
            centre = ext * rng.uniform(-0.1, 1.1, size=3)
            self.membranes.append(
                ("vesicle", (centre, semi, _random_rotation(rng)), self._amp(rng))
            )
        scale = max(f.contrast, 1.0)
        for _ in range(f.n_particles):
            self.blobs.append(
                (
                    ext * rng.uniform(0, 1, 3),
                    float(rng.uniform(2.5, 12.0)),
                    scale * float(rng.uniform(0.4, 1.5)),
                )
            )
        for _ in range(f.n_gold):
            self.blobs.append(
                (
                    ext * rng.uniform(0, 1, 3),
                    float(rng.uniform(2.5, 7.0)),
                    float(rng.uniform(6.0, 15.0)),
                )
            )
        for n, radius, wall in ((f.n_filaments, (2.5, 4.5), 0.0), (f.n_tubes, (12.5, 12.5), 5.0)):
            for _ in range(n):
                d = rng.normal(size=3)
                self.rods.append(
                    (
                        ext * rng.uniform(0.1, 0.9, 3),
                        d / np.linalg.norm(d),
                        float(rng.uniform(*radius)),
                        wall,
                        scale * float(rng.uniform(0.5, 1.2)),
                    )
                )
        if f.carbon_edge:
            d = rng.normal(size=3)
            self.edge = (
                ext * rng.uniform(0.2, 0.8, 3),
                d / np.linalg.norm(d),
                float(rng.uniform(1.0, 6.0)),
                float(rng.uniform(1.0, 4.0)),
            )

    def _vesicle_distance(self, geom: Any, box: tuple[slice, ...], vox_nm: float) -> np.ndarray:
        centre, semi, rotation = geom
        z, y, x = _coords_nm(box, vox_nm)
        rel = (z - centre[0], y - centre[1], x - centre[2])
        q = [sum(rotation[i, k] * rel[i] for i in range(3)) for k in range(3)]
        fq = np.maximum(np.sqrt(sum((q[k] / semi[k]) ** 2 for k in range(3))), 1e-6)
        grad = np.sqrt(sum((q[k] / semi[k] ** 2) ** 2 for k in range(3))) / fq
        return np.asarray((fq - 1.0) / np.maximum(grad, 1e-6), dtype=np.float32)

    def _membrane_boxes(self, shape: tuple[int, int, int], vox_nm: float):  # type: ignore[no-untyped-def]
        """Yield (box, signed distance, amplitude) for each membrane on a grid."""
        full = tuple(slice(0, s) for s in shape)
        grid = _coords_nm(full, vox_nm)
        for kind, geom, amp in self.membranes:
            if kind == "sheet":
                yield full, geom.distance(*grid), amp
                continue
            reach = float(geom[1].max()) + self.f.thickness_nm + 2.0
            box = _box(geom[0] / vox_nm, reach / vox_nm, shape)
            if box is not None:
                yield box, self._vesicle_distance(geom, box, vox_nm), amp

    def labels(self, shape: tuple[int, int, int], vox_nm: float) -> np.ndarray:
        """uint8 labels: 1 within thickness / 2 of any membrane midsurface."""
        labels = np.zeros(shape, dtype=np.uint8)
        for box, d, _ in self._membrane_boxes(shape, vox_nm):
            labels[box][np.abs(d) <= self.f.thickness_nm / 2.0] = 1
        return labels

    def membranes_density(self, shape: tuple[int, int, int], vox_nm: float) -> np.ndarray:
        """Noise-free membrane density before the optics (dark = negative), amplitude ~1."""
        f = self.f
        rho = np.zeros(shape, dtype=np.float32)
        for box, d, amp in self._membrane_boxes(shape, vox_nm):
            near = np.abs(d) < f.thickness_nm + 3.0
            rho[box][near] += profile(d[near], f.profile, f.thickness_nm, amp).astype(np.float32)
        return rho

    def distractors_density(self, shape: tuple[int, int, int], vox_nm: float) -> np.ndarray:
        """Noise-free density of everything that is not membrane, before the optics."""
        rho = np.zeros(shape, dtype=np.float32)
        for centre, radius, amp in self.blobs:
            box = _box(centre / vox_nm, (radius + 3.0) / vox_nm, shape)
            if box is None:
                continue
            z, y, x = _coords_nm(box, vox_nm)
            phi = (
                np.sqrt((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2) - radius
            )
            rho[box] -= (amp * 0.5 * (1.0 - np.tanh(phi / 0.7))).astype(np.float32)
        z, y, x = _coords_nm(tuple(slice(0, s) for s in shape), vox_nm)
        for point, direction, radius, wall, amp in self.rods:
            rel = (z - point[0], y - point[1], x - point[2])
            along = sum(direction[i] * rel[i] for i in range(3))
            r = np.sqrt(np.maximum(sum(rel[i] ** 2 for i in range(3)) - along**2, 0.0))
            phi = r - radius if wall == 0 else np.abs(r - radius) - wall / 2.0
            rho -= (amp * 0.5 * (1.0 - np.tanh(phi / 0.7))).astype(np.float32)
        if self.edge is not None:
            point, normal, soft, amp = self.edge
            s = sum(normal[i] * (c - point[i]) for i, c in enumerate((z, y, x)))
            rho -= (amp * 0.5 * (1.0 + np.tanh(s / soft))).astype(np.float32)
        return rho


# Factors that leave nothing but noise (through the drawn optics): no membranes, no distractors.
NO_CONTENT: dict[str, Any] = dict(
    n_vesicles=0, n_sheets=0, n_stacks=0, n_particles=0, n_filaments=0, n_tubes=0, n_gold=0,
    carbon_edge=False, gradient=0.0,
)  # fmt: skip


def randomized(
    shape: tuple[int, int, int] = (64, 128, 128), *, seed: int = 0, **factors: Any
) -> RandomTomogram:
    """A domain-randomised tomogram at 10 Å; keywords fix any of the `Factors` fields."""
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape must be three sizes of at least 8 voxels, got {shape}")
    out_shape = (int(shape[0]), int(shape[1]), int(shape[2]))
    f_ss, content_ss, noise_ss = np.random.SeedSequence(seed).spawn(3)
    f = draw_factors(np.random.default_rng(f_ss), **factors)
    extent_nm = np.array(out_shape, dtype=float) * VOXEL_A / 10.0
    src_shape = (
        max(8, round(out_shape[0] * VOXEL_A / f.voxel_size)),
        max(8, round(out_shape[1] * VOXEL_A / f.voxel_size)),
        max(8, round(out_shape[2] * VOXEL_A / f.voxel_size)),
    )
    src_vox_a = float(np.mean(extent_nm * 10.0 / np.array(src_shape)))
    scene = _Scene(f, extent_nm, np.random.default_rng(content_ss))

    h = transfer(f, src_shape, src_vox_a)
    labels = scene.labels(out_shape, VOXEL_A / 10.0)
    vox_nm = src_vox_a / 10.0
    membranes = spectra.filter_volume(scene.membranes_density(src_shape, vox_nm), h, out_shape)
    # contrast = RMS of the membranes over their label band after the optics, in noise sigmas
    # (RMS, not mean darkness: an uncorrected CTF removes a band's mean but not its edges)
    band = membranes[labels == 1].astype(np.float64)
    darkness = math.sqrt(float(np.mean(band**2))) if band.size else 1.0
    membranes *= np.float32(f.contrast / max(darkness, 1e-3))
    signal = membranes + spectra.filter_volume(
        scene.distractors_density(src_shape, vox_nm), h, out_shape
    )
    noise_src = np.random.default_rng(noise_ss).standard_normal(src_shape, dtype=np.float32)
    noise = spectra.filter_volume(noise_src, h, out_shape)
    noise *= np.float32(1.0 / max(float(noise.std(dtype=np.float64)), 1e-12))
    volume = signal + noise
    if f.gradient > 0:  # a ramp (uneven ice thickness) after the optics, like a real one
        rng = np.random.default_rng(content_ss.spawn(1)[0])
        d = rng.normal(size=3)
        d /= np.linalg.norm(d)
        coords = [
            np.linspace(-0.5, 0.5, n).reshape([-1 if i == k else 1 for k in range(3)])
            for i, n in enumerate(out_shape)
        ]
        volume += np.float32(f.gradient) * sum(d[i] * coords[i] for i in range(3)).astype(
            np.float32
        )
    return RandomTomogram(
        volume=np.ascontiguousarray(volume, dtype=np.float32),
        labels=labels,
        factors=f,
        seed=int(seed),
    )
