"""Synthetic cryo-electron tomograms with ground-truth labels (demo data, tests, training).

A synthetic tomogram holds membranes (vesicles: ellipsoidal shells, and a few gently curved
sheets) drawn as lipid bilayers, plus small dense particles, then a missing-wedge filter and
Gaussian noise at a requested signal-to-noise ratio.

Conventions:

- Arrays are ZYX; the voxel is isotropic, `voxel_size` Å wide (10 Å = 1 nm by default). All
  geometry is defined in nanometres, so content keeps its physical size at other voxel sizes.
- Density sign follows cryo-ET: protein and lipid are **dark**, i.e. lower values than the
  background. The noise-free background is 0 and every object adds *negative* density. A
  bilayer is two Gaussian leaflets (head groups) of negative density at ±2 nm from the
  midsurface, so a membrane shows as two dark lines ~4 nm apart.
- Labels (uint8): 0 background, 1 membrane (voxels whose centre lies within 2.75 nm of a
  membrane midsurface, i.e. a 5.5 nm thick band covering the bilayer), 2 particle. Labels are
  geometric ground truth: membrane patches hidden by the missing wedge stay labelled.
- Missing wedge: the tilt axis is Y and the beam is along Z. With ``missing_wedge_deg = w``
  (tilt range ±(90 − w)°) every Fourier component whose direction in the kx–kz plane lies within
  w degrees of the kz axis is set to zero. The noise is white Gaussian noise passed through the
  same filter (as noise in a real tomogram is), then scaled so that
  ``var(signal) / var(noise) == snr`` exactly, where both variances are taken over the whole
  volume and the signal is the wedge-filtered noise-free volume. ``snr=None`` or ``inf``: no
  noise. The wedge removes a third of all membrane orientations (a dihedral wedge around ky,
  not a cone): vesicles lose their caps and some of their sides, which stay labelled; sheets
  are drawn only in orientations that stay visible through wedges up to ~35°.
- Deterministic per seed: content and noise come from two independent streams of
  ``numpy.random.SeedSequence(seed)``, so the same seed at another SNR has the same content.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import scipy.fft

from .errors import ConfigError

__all__ = ["LABELS", "SyntheticTomogram", "estimate_bytes", "synthesize", "write_mrc"]

logger = logging.getLogger(__name__)

LABELS: dict[int, str] = {0: "background", 1: "membrane", 2: "particle"}

# Geometry, in nm.
LEAFLET_OFFSET_NM = 2.0  # each head-group leaflet sits this far from the midsurface
LEAFLET_SIGMA_NM = 0.8  # Gaussian width of one leaflet
MEMBRANE_HALF_THICKNESS_NM = 2.75  # label band: |distance to midsurface| <= this
VESICLE_RADIUS_NM = (10.0, 32.0)
PARTICLE_RADIUS_NM = (4.0, 6.0)  # 8-12 nm diameter
_PROFILE_CUTOFF_NM = LEAFLET_OFFSET_NM + 4.0 * LEAFLET_SIGMA_NM
_BOX_MARGIN_NM = 10.0  # vesicle boxes extend this far beyond the shell
_EDGE_NM = 0.7  # soft edge width of particles
# Peak memory while synthesising, per voxel: float32 density, noise and FFT spectra, float64
# temporaries of the variance, uint8 labels. Measured ~50 bytes (64x128x128 and 128x384x384).
_BYTES_PER_VOXEL = 56


def estimate_bytes(shape: tuple[int, ...]) -> int:
    """About how much memory `synthesize(shape)` needs at its peak, in bytes."""
    return _BYTES_PER_VOXEL * math.prod(int(n) for n in shape)


def _available_memory() -> int | None:
    """Bytes of memory available to a new allocation (MemAvailable on Linux), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def _gb(n: float) -> str:
    for unit in ("GB", "TB", "PB", "EB"):
        n /= 1e9 if unit == "GB" else 1e3
        if n < 1000 or unit == "EB":
            return f"{n:,.1f} {unit}"
    raise AssertionError  # pragma: no cover


@dataclass(frozen=True)
class SyntheticTomogram:
    """A synthetic tomogram: float32 ZYX volume, uint8 labels of the same shape, voxel size."""

    volume: np.ndarray = field(repr=False)
    labels: np.ndarray = field(repr=False)
    voxel_size: float
    seed: int
    LABELS: ClassVar[dict[int, str]] = LABELS

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape of the volume (Z, Y, X)."""
        return tuple(self.volume.shape)  # type: ignore[return-value]


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly distributed 3×3 rotation matrix (from a random unit quaternion)."""
    q = rng.normal(size=4)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def _bilayer(d: np.ndarray, amplitude: float) -> np.ndarray:
    """Density of a bilayer at signed distance `d` (nm) from its midsurface (negative = dark)."""
    s2 = 2.0 * LEAFLET_SIGMA_NM**2
    return -amplitude * (
        np.exp(-((d - LEAFLET_OFFSET_NM) ** 2) / s2) + np.exp(-((d + LEAFLET_OFFSET_NM) ** 2) / s2)
    )


def _box(
    center_vox: np.ndarray, half_vox: float, shape: tuple[int, ...]
) -> tuple[slice, ...] | None:
    """Slices of the box of half-width `half_vox` around a centre, clipped to the volume."""
    lo = np.maximum(np.floor(center_vox - half_vox).astype(int), 0)
    hi = np.minimum(np.ceil(center_vox + half_vox).astype(int) + 1, shape)
    if np.any(hi <= lo):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))


def _coords_nm(box: tuple[slice, ...], vox_nm: float) -> list[np.ndarray]:
    """Open-grid (broadcastable) voxel-centre coordinates in nm for a box."""
    return [
        (np.arange(s.start, s.stop, dtype=np.float32) * vox_nm).reshape(
            [-1 if i == k else 1 for k in range(3)]
        )
        for i, s in enumerate(box)
    ]


@dataclass
class _Sheet:
    """A gently curved plane: n·(x − p) = h(x), h a sum of two sinusoids along in-plane axes."""

    normal: np.ndarray
    point: np.ndarray
    axes: np.ndarray  # 2×3, in-plane unit vectors
    amps: np.ndarray  # nm
    wavenumbers: np.ndarray  # rad/nm
    phases: np.ndarray

    def distance(self, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Approximate signed distance (nm) to the midsurface (first order: s / |∇s|)."""
        rel = (z - self.point[0], y - self.point[1], x - self.point[2])
        s = sum(self.normal[i] * rel[i] for i in range(3))
        grad2 = 1.0
        for k in range(2):
            arg = self.wavenumbers[k] * sum(self.axes[k, i] * rel[i] for i in range(3))
            arg = arg + self.phases[k]
            s = s - self.amps[k] * np.sin(arg)
            grad2 = grad2 + (self.amps[k] * self.wavenumbers[k] * np.cos(arg)) ** 2
        return (s / np.sqrt(grad2)).astype(np.float32)


def _make_sheet(rng: np.random.Generator, extent_nm: np.ndarray) -> _Sheet:
    """A random sheet through the central part of the volume, oriented to stay visible."""
    # The missing wedge (tilt axis y) removes every Fourier direction whose projection on the
    # kz-kx plane lies within `missing_wedge_deg` of kz, whatever its ky component. A flat
    # sheet puts its signal along its normal, so a sheet whose normal projects close to z
    # vanishes entirely (vesicles only lose their caps and sides). Draw sheets as the
    # membranes one can see in tomograms: the normal's projection on the z-x plane at least
    # 55° away from z, and at most 45° of tilt towards y (so gentle bending cannot swing the
    # projection into the wedge).
    phi = math.radians(rng.uniform(55.0, 90.0))
    psi = math.radians(rng.uniform(-45.0, 45.0))
    sz, sx = rng.choice([-1.0, 1.0], size=2)
    normal = np.array(
        [sz * math.cos(psi) * math.cos(phi), math.sin(psi), sx * math.cos(psi) * math.sin(phi)]
    )
    helper = np.array([1.0, 0.0, 0.0]) if abs(normal[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    u = np.cross(normal, helper)
    u /= np.linalg.norm(u)
    v = np.cross(normal, u)
    point = extent_nm * rng.uniform(0.2, 0.8, size=3)
    return _Sheet(
        normal=normal,
        point=point,
        axes=np.stack([u, v]),
        amps=rng.uniform(1.0, 4.0, size=2),
        wavenumbers=2.0 * math.pi / rng.uniform(100.0, 300.0, size=2),
        phases=rng.uniform(0.0, 2.0 * math.pi, size=2),
    )


def _wedge_mask(shape: tuple[int, int, int], missing_wedge_deg: float) -> np.ndarray | None:
    """Boolean rfftn-layout mask (broadcastable) that is False inside the missing wedge."""
    if missing_wedge_deg <= 0:
        return None
    kz = np.abs(np.fft.fftfreq(shape[0])).reshape(-1, 1, 1)
    kx = np.fft.rfftfreq(shape[2]).reshape(1, 1, -1)
    # Missing: the direction of (kz, kx) lies within the wedge half-angle of the kz axis.
    return ~(kx < math.tan(math.radians(missing_wedge_deg)) * kz)


def _apply_mask(volume: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Multiply the volume's spectrum by the mask (None: identity); float32 out."""
    if mask is None:
        return volume.astype(np.float32, copy=False)
    spec = scipy.fft.rfftn(volume, workers=1)
    spec *= mask
    return scipy.fft.irfftn(spec, s=volume.shape, workers=1).astype(np.float32, copy=False)


def synthesize(
    shape: tuple[int, int, int] = (64, 128, 128),
    *,
    seed: int = 0,
    voxel_size: float = 10.0,
    snr: float | None = 1.0,
    n_vesicles: int | None = None,
    n_sheets: int | None = None,
    n_particles: int | None = None,
    missing_wedge_deg: float = 30.0,
) -> SyntheticTomogram:
    """Make a synthetic tomogram with membrane and particle labels (see the module docstring)."""
    shape = tuple(int(s) for s in shape)  # type: ignore[assignment]
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape must be three sizes of at least 8 voxels (Z, Y, X), got {shape}")
    if not voxel_size > 0:
        raise ValueError(f"voxel_size must be positive (Å), got {voxel_size}")
    if snr is not None and not snr > 0:
        raise ValueError(f"snr must be positive, None or inf, got {snr}")
    if not 0 <= missing_wedge_deg < 90:
        raise ValueError(f"missing_wedge_deg must be in [0, 90), got {missing_wedge_deg}")
    for name, n in (
        ("n_vesicles", n_vesicles),
        ("n_sheets", n_sheets),
        ("n_particles", n_particles),
    ):
        if n is not None and n < 0:
            raise ValueError(f"{name} must be >= 0, got {n}")
    need, available = estimate_bytes(shape), _available_memory()
    if available is not None and need > available:
        raise ConfigError(
            f"a {'×'.join(map(str, shape))} synthetic tomogram needs about {_gb(need)} of "
            f"memory to make, and only {_gb(available)} is available",
            hint="choose a smaller shape: 64,128,128 takes about "
            f"{estimate_bytes((64, 128, 128)) / 1e6:.0f} MB",
        )

    content_ss, noise_ss = np.random.SeedSequence(seed).spawn(2)
    rng = np.random.default_rng(content_ss)
    vox_nm = voxel_size / 10.0
    extent_nm = np.array(shape, dtype=float) * vox_nm
    volume_nm3 = float(np.prod(extent_nm))

    if n_sheets is None:
        n_sheets = max(1, round(math.sqrt(extent_nm[1] * extent_nm[2]) / 128.0))
    if n_vesicles is None:
        n_vesicles = max(1, round(volume_nm3 / 150_000.0))
    if n_particles is None:
        n_particles = max(1, round(volume_nm3 / 20_000.0))

    density = np.zeros(shape, dtype=np.float32)
    labels = np.zeros(shape, dtype=np.uint8)
    # Distance (nm) to the nearest membrane midsurface, where it is below _BOX_MARGIN_NM.
    mem_dist = np.full(shape, np.inf, dtype=np.float32)

    def add_membrane(box: tuple[slice, ...], d: np.ndarray, amplitude: float) -> None:
        band = np.abs(d)
        density[box] += _bilayer(d, amplitude).astype(np.float32)
        labels[box][band <= MEMBRANE_HALF_THICKNESS_NM] = 1
        np.minimum(mem_dist[box], band, out=mem_dist[box])

    # Sheets, over the whole volume.
    full = tuple(slice(0, s) for s in shape)
    grid = _coords_nm(full, vox_nm)
    sheets = [_make_sheet(rng, extent_nm) for _ in range(n_sheets)]
    for sheet in sheets:
        add_membrane(full, sheet.distance(*grid), float(rng.uniform(0.8, 1.2)))

    # Vesicles: ellipsoidal shells, kept clear of the sheets and of one another.
    r_hi = min(VESICLE_RADIUS_NM[1], 0.45 * float(extent_nm.min()))
    r_lo = min(VESICLE_RADIUS_NM[0], 0.8 * r_hi)
    placed: list[tuple[np.ndarray, float]] = []
    for _ in range(n_vesicles):
        for _attempt in range(50):
            radius = float(rng.uniform(r_lo, r_hi))
            semi = radius * rng.uniform(0.85, 1.15, size=3)
            center = extent_nm * rng.uniform(0.0, 1.0, size=3)
            rotation = _random_rotation(rng)
            amplitude = float(rng.uniform(0.8, 1.2))
            reach = float(semi.max()) + _PROFILE_CUTOFF_NM + 2.0
            p = [np.float32(c) for c in center]
            if any(abs(float(s.distance(*p))) < reach for s in sheets):
                continue
            if any(np.linalg.norm(center - c) < reach + r + 2.0 for c, r in placed):
                continue
            break
        else:
            logger.debug("no room for vesicle %d after 50 tries", len(placed))
            continue
        placed.append((center, reach))
        box = _box(center / vox_nm, (float(semi.max()) + _BOX_MARGIN_NM) / vox_nm, shape)
        if box is None:
            continue
        z, y, x = _coords_nm(box, vox_nm)
        rel = (z - center[0], y - center[1], x - center[2])
        # Local (body-frame) coordinates q = Rᵀ (x − c); f = |q / semi|, d ≈ (f − 1) / |∇f|.
        q = [sum(rotation[i, k] * rel[i] for i in range(3)) for k in range(3)]
        f = np.sqrt(sum((q[k] / semi[k]) ** 2 for k in range(3)))
        f = np.maximum(f, 1e-6)
        grad = np.sqrt(sum((q[k] / semi[k] ** 2) ** 2 for k in range(3))) / f
        d = ((f - 1.0) / np.maximum(grad, 1e-6)).astype(np.float32)
        add_membrane(box, d, amplitude)

    # Particles: 1-3 overlapping spheres, away from membranes and from one another.
    particles: list[tuple[np.ndarray, float]] = []
    for _ in range(n_particles):
        for _attempt in range(30):
            radius = float(rng.uniform(*PARTICLE_RADIUS_NM))
            center = extent_nm * rng.uniform(0.0, 1.0, size=3)
            n_lobes = int(rng.integers(0, 3))
            lobe_dirs = rng.normal(size=(n_lobes, 3))
            lobe_dirs /= np.linalg.norm(lobe_dirs, axis=1, keepdims=True) + 1e-12
            lobe_r = radius * rng.uniform(0.5, 0.8, size=n_lobes)
            lobe_off = radius * rng.uniform(0.4, 0.7, size=n_lobes)
            amplitude = float(rng.uniform(1.0, 1.6))
            reach = radius * 1.5
            idx = tuple(np.clip((center / vox_nm).astype(int), 0, np.array(shape) - 1))
            if mem_dist[idx] < reach + 2.0:
                continue
            if any(np.linalg.norm(center - c) < reach + r + 1.0 for c, r in particles):
                continue
            break
        else:
            logger.debug("no room for particle %d after 30 tries", len(particles))
            continue
        particles.append((center, reach))
        box = _box(center / vox_nm, (reach + 3.0 * _EDGE_NM + 1.0) / vox_nm, shape)
        if box is None:
            continue
        z, y, x = _coords_nm(box, vox_nm)
        centers = [center] + [
            center + off * dv for off, dv in zip(lobe_off, lobe_dirs, strict=True)
        ]
        radii = [radius, *lobe_r]
        phi: np.ndarray | None = None
        for c, r in zip(centers, radii, strict=True):
            dist = np.sqrt((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2) - r
            phi = dist if phi is None else np.minimum(phi, dist)
        assert phi is not None  # radii holds the body and its lobes: never empty
        density[box] += (-amplitude * 0.5 * (1.0 - np.tanh(phi / _EDGE_NM))).astype(np.float32)
        sub = labels[box]
        sub[(phi <= 0) & (sub == 0)] = 2

    mask = _wedge_mask(shape, missing_wedge_deg)
    signal = _apply_mask(density, mask)
    if snr is None or math.isinf(snr):
        volume = signal
    else:
        noise_rng = np.random.default_rng(noise_ss)
        noise = _apply_mask(noise_rng.standard_normal(shape, dtype=np.float32), mask)
        noise_std = float(noise.std(dtype=np.float64))
        target_std = math.sqrt(float(signal.var(dtype=np.float64)) / snr)
        noise *= np.float32(target_std / max(noise_std, 1e-12))
        volume = signal + noise
    logger.debug(
        "synthesized %s seed=%d: %d sheets, %d vesicles, %d particles",
        shape,
        seed,
        len(sheets),
        len(placed),
        len(particles),
    )
    return SyntheticTomogram(
        volume=np.ascontiguousarray(volume, dtype=np.float32),
        labels=labels,
        voxel_size=float(voxel_size),
        seed=int(seed),
    )


def write_mrc(
    tomo: SyntheticTomogram,
    path: str | Path,
    *,
    labels: bool | str | Path = False,
    overwrite: bool = True,
) -> tuple[Path, Path | None]:
    """Write the volume as a float32 MRC with its voxel size; optionally the labels as int8 MRC.

    ``labels=True`` writes them next to the volume as ``<stem>_labels.mrc``; a path writes them
    there. Returns (volume path, labels path or None).
    """
    from .mrc_write import write_mrc_volume

    path = Path(path)
    # a fixed label instead of mrcfile's time stamp: the same seed gives the same bytes
    label = f"cryomamba.synth seed={tomo.seed}"
    voxel_size = (tomo.voxel_size,) * 3
    labels_path: Path | None = None
    if labels is not False:
        labels_path = path.with_name(f"{path.stem}_labels.mrc") if labels is True else Path(labels)
    for target in (path, labels_path):
        if target is not None and target.exists() and not overwrite:
            raise FileExistsError(f"{target} exists (pass overwrite=True to replace it)")
    write_mrc_volume(path, tomo.volume, dtype=np.float32, voxel_size=voxel_size, label=label)
    if labels_path is not None:  # mode 0 (int8): labels are small
        write_mrc_volume(
            labels_path,
            tomo.labels,
            dtype=np.int8,
            voxel_size=voxel_size,
            label=f"{label} labels",
        )
    return path, labels_path
