"""Intensity normalization exactly as the model's plans say, from statistics gathered in chunks.

nnU-Net first crops the image to the bounding box of its non-zero voxels and normalizes
that crop with whole-image statistics; we compute the same box and statistics plane-block
by plane-block, so no float copy of the volume is ever made.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InvalidVolumeError, ModelError
from .cancel import Canceled

__all__ = ["IntensityScan", "make_normalizer", "scan_intensities"]

EPS = 1e-8


@dataclass(frozen=True)
class IntensityScan:
    """What one pass over the volume learned: the non-zero box and statistics inside it."""

    bbox: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]
    mean: float
    std: float
    minimum: float
    maximum: float

    @property
    def bbox_slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(a, b) for a, b in self.bbox)  # type: ignore[return-value]

    @property
    def bbox_shape(self) -> tuple[int, int, int]:
        return tuple(b - a for a, b in self.bbox)  # type: ignore[return-value]


def _planes_per_chunk(shape: tuple[int, ...], chunk_bytes: int) -> int:
    return max(1, chunk_bytes // max(1, int(np.prod(shape[1:])) * 8))


def scan_intensities(
    data: np.ndarray,
    *,
    chunk_bytes: int = 4 << 20,
    release: Callable[[int, int], None] | None = None,
    cancel: threading.Event | None = None,
) -> IntensityScan:
    """Three chunked passes: the non-zero box, then mean, then spread inside it (float64).

    `release(z0, z1)` is called after each block so a memory-mapped source can drop its pages;
    `cancel` is checked before each block (scanning a 10 GB tomogram takes a while).
    NaN or infinite voxels, and volumes with a single value, are refused: nnU-Net would turn
    them into a mask of garbage without a word.
    """
    step = _planes_per_chunk(data.shape, chunk_bytes)

    def blocks(
        z_span: tuple[int, int], region: tuple[slice, ...] = (), dtype: Any = None
    ) -> Iterator[tuple[np.ndarray[Any, Any], int]]:
        """Blocks of `step` planes; pages released and the cancel flag checked after each."""
        for z0 in range(z_span[0], z_span[1], step):
            if cancel is not None and cancel.is_set():
                raise Canceled
            index = (slice(z0, min(z0 + step, z_span[1])), *region)
            yield np.asarray(data[index], dtype=dtype), z0
            if release:
                release(z0, z0 + step)

    z_any = np.zeros(data.shape[0], dtype=bool)
    y_any = np.zeros(data.shape[1], dtype=bool)
    x_any = np.zeros(data.shape[2], dtype=bool)
    bad = 0
    for block, z0 in blocks((0, data.shape[0])):
        if block.dtype.kind == "f":
            bad += int(np.count_nonzero(~np.isfinite(block)))
        nonzero = block != 0
        z_any[z0 : z0 + len(block)] = nonzero.any(axis=(1, 2))
        y_any |= nonzero.any(axis=(0, 2))
        x_any |= nonzero.any(axis=(0, 1))
    if bad:
        raise InvalidVolumeError(
            f"the volume holds {bad} NaN or infinite voxel(s)",
            hint="replace them (e.g. with the volume's mean) before segmenting; a reconstruction "
            "with NaN usually means a failed alignment or a division by zero upstream",
        )
    (za, zb), (ya, yb), (xa, xb) = bbox = (_span(z_any), _span(y_any), _span(x_any))
    inside = (slice(ya, yb), slice(xa, xb))
    count = (zb - za) * (yb - ya) * (xb - xa)
    total, total_sq = 0.0, 0.0
    lo, hi = np.inf, -np.inf
    # mean first, then the sum of squared deviations: the two-pass formula keeps full precision
    for block, _ in blocks((za, zb), inside, np.float64):
        total += float(block.sum())
        lo = min(lo, float(block.min()))
        hi = max(hi, float(block.max()))
    mean = total / count
    for block, _ in blocks((za, zb), inside, np.float64):
        total_sq += float(np.square(block - mean).sum())
    if hi == lo:
        raise InvalidVolumeError(
            f"the volume is constant (every voxel is {lo:g}): there is nothing to segment",
            hint="check that the file holds the reconstruction and not an empty placeholder",
        )
    return IntensityScan(
        bbox=bbox,
        mean=mean,
        std=float(np.sqrt(total_sq / count)),
        minimum=lo,
        maximum=hi,
    )


def _span(mask: np.ndarray) -> tuple[int, int]:
    idx = np.flatnonzero(mask)
    if idx.size == 0:  # all zero: nnU-Net keeps the whole image
        return 0, int(mask.size)
    return int(idx[0]), int(idx[-1]) + 1


def make_normalizer(
    scheme: str, scan: IntensityScan, properties: dict[str, float], use_mask_for_norm: bool = False
) -> Callable[[np.ndarray], np.ndarray]:
    """A function float32 block → normalized float32 block (in place), matching nnU-Net's scheme."""
    if use_mask_for_norm and scheme == "ZScoreNormalization":
        raise ModelError(
            "the model normalizes inside a foreground mask (use_mask_for_norm), "
            "which needs the whole volume in memory; CryoMamba does not support it",
            hint="use a model trained with use_mask_for_norm false",
        )
    if scheme == "ZScoreNormalization":
        return _shift_scale(np.float32(scan.mean), np.float32(max(np.float32(scan.std), EPS)))
    if scheme == "CTNormalization":
        try:
            lower, upper = properties["percentile_00_5"], properties["percentile_99_5"]
            mean_i, std_i = properties["mean"], properties["std"]
        except KeyError as exc:
            raise ModelError(
                f"CTNormalization needs intensity property {exc} in plans.json"
            ) from None

        def ct(block: np.ndarray) -> np.ndarray:
            np.clip(block, lower, upper, out=block)
            block -= mean_i
            block /= max(std_i, EPS)
            return block

        return ct
    if scheme == "RescaleTo01Normalization":
        lo = np.float32(scan.minimum)
        return _shift_scale(lo, np.float32(max(np.float32(scan.maximum) - lo, EPS)))
    if scheme == "RGBTo01Normalization":

        def rgb(block: np.ndarray) -> np.ndarray:
            block /= 255.0
            return block

        return rgb
    if scheme == "NoNormalization":
        return lambda block: block
    raise ModelError(f"unsupported normalization scheme {scheme}")


def _shift_scale(offset: np.float32, divisor: np.float32) -> Callable[[np.ndarray], np.ndarray]:
    """(block - offset) / divisor in place, in float32 as nnU-Net computes it."""

    def apply(block: np.ndarray) -> np.ndarray:
        block -= offset
        block /= divisor
        return block

    return apply
