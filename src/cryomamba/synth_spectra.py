"""Imaging filters for domain-randomised synthetic tomograms: CTF, low-pass, missing wedge.

Each filter is a real, non-negative (or, for an uncorrected CTF, signed) array in the layout
of ``scipy.fft.rfftn`` of a volume with a given shape and voxel size, with frequencies in
cycles per Å. `filter_volume` applies one and resamples the result in Fourier space to
another grid, which is how `cryomamba.synth_random` presents a volume drawn at 7–14 Å at the
model's 10 Å (cropping or zero-padding the spectrum: the anti-aliased resampling that
Fourier binning does).
"""

from __future__ import annotations

import math

import numpy as np
import scipy.fft

__all__ = [
    "ctf",
    "filter_volume",
    "frequencies",
    "lowpass",
    "wedge",
]

ELECTRON_WAVELENGTH_A = 0.0197  # 300 kV
AMPLITUDE_CONTRAST = 0.07


def frequencies(shape: tuple[int, int, int], voxel_a: float) -> tuple[np.ndarray, ...]:
    """(kz, ky, kx) in cycles/Å, broadcastable, in rfftn layout (kx is the half axis)."""
    kz = np.fft.fftfreq(shape[0], d=voxel_a).reshape(-1, 1, 1)
    ky = np.fft.fftfreq(shape[1], d=voxel_a).reshape(1, -1, 1)
    kx = np.fft.rfftfreq(shape[2], d=voxel_a).reshape(1, 1, -1)
    return kz, ky, kx


def _k2(shape: tuple[int, int, int], voxel_a: float) -> np.ndarray:
    kz, ky, kx = frequencies(shape, voxel_a)
    return np.asarray(kz**2 + ky**2 + kx**2, dtype=np.float64)


def lowpass(shape: tuple[int, int, int], voxel_a: float, resolution_a: float) -> np.ndarray:
    """Gaussian low-pass whose gain is 1/2 at 1/resolution_a cycles/Å (gain 1 at k = 0)."""
    k2 = _k2(shape, voxel_a)
    return np.exp(-math.log(2.0) * k2 * resolution_a**2).astype(np.float32)


def ctf(
    shape: tuple[int, int, int],
    voxel_a: float,
    defocus_um: float,
    *,
    bfactor: float = 400.0,
    phase_flipped: bool = True,
) -> np.ndarray:
    """A weak-phase CTF (300 kV, no spherical aberration at these resolutions) with a B-factor.

    ``phase_flipped``: the absolute value (a CTF-corrected tomogram, a band-pass), else the
    signed CTF, whose sign flips beyond each zero. Scaled so that its largest gain is 1.
    """
    k2 = _k2(shape, voxel_a)
    chi = math.pi * ELECTRON_WAVELENGTH_A * defocus_um * 1e4 * k2
    w = AMPLITUDE_CONTRAST
    transfer = -(math.sqrt(1 - w * w) * np.sin(chi) + w * np.cos(chi))
    transfer *= np.exp(-bfactor * k2 / 4.0)
    if phase_flipped:
        transfer = np.abs(transfer)
    peak = float(np.abs(transfer).max())
    return (transfer / max(peak, 1e-12)).astype(np.float32)


def wedge(shape: tuple[int, int, int], tilt_range_deg: float) -> np.ndarray:
    """1 inside the measured tilt range ±tilt_range_deg about Y (beam along Z), else 0.

    A Fourier component is measured when its direction in the kz–kx plane lies within
    ``tilt_range_deg`` of the kx axis; the rest, a dihedral wedge around ky, is missing.
    """
    kz, _, kx = frequencies(shape, 1.0)
    missing = kx < math.tan(math.radians(90.0 - tilt_range_deg)) * np.abs(kz)
    return np.asarray(~missing, dtype=np.float32)


def _resize_spectrum(spec: np.ndarray, src: tuple[int, ...], dst: tuple[int, ...]) -> np.ndarray:
    """Crop or zero-pad an rfftn spectrum of shape `src` to the rfftn spectrum of `dst`."""
    out = np.zeros((dst[0], dst[1], dst[2] // 2 + 1), dtype=spec.dtype)
    idx_src: list[np.ndarray] = []
    idx_dst: list[np.ndarray] = []
    for axis in (0, 1):
        n = min(src[axis], dst[axis])
        freqs = np.concatenate([np.arange(0, (n + 1) // 2), np.arange(-(n // 2), 0)])
        idx_src.append(freqs % src[axis])
        idx_dst.append(freqs % dst[axis])
    nx = min(src[2] // 2, dst[2] // 2) + 1
    sub = spec[np.ix_(idx_src[0], idx_src[1], np.arange(nx))]
    out[np.ix_(idx_dst[0], idx_dst[1], np.arange(nx))] = sub
    return out


def filter_volume(
    volume: np.ndarray,
    transfer: np.ndarray | None,
    out_shape: tuple[int, int, int] | None = None,
) -> np.ndarray:
    """Multiply the volume's spectrum by `transfer` (None: 1) and resample it to `out_shape`.

    Resampling keeps the mean (the k = 0 term is rescaled for the new number of voxels).
    """
    src = tuple(int(s) for s in volume.shape)
    dst = src if out_shape is None else tuple(int(s) for s in out_shape)
    spec = scipy.fft.rfftn(volume.astype(np.float32, copy=False), workers=1)
    if transfer is not None:
        spec *= transfer
    if dst != src:
        spec = _resize_spectrum(spec, src, dst) * (math.prod(dst) / math.prod(src))
    return np.asarray(scipy.fft.irfftn(spec, s=dst, workers=1), dtype=np.float32)
