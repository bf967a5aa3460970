"""nnU-Net's tile grid over a padded volume, walked z-row by z-row.

The step positions come from nnU-Net's own `compute_steps_for_sliding_window`; padding
follows `pad_nd_image` (content centred, the odd voxel of padding goes above).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import MIN_TILE_STEP

if TYPE_CHECKING:
    import torch

__all__ = ["TileGrid", "cut_model_tile", "cut_tile", "tile_count"]


@dataclass(frozen=True)
class TileGrid:
    """Where the tiles go: padded shape, padding below, and step starts per axis."""

    shape: tuple[int, int, int]  # the image region being tiled (after cropping)
    patch: tuple[int, int, int]
    padded: tuple[int, int, int]
    pad_below: tuple[int, int, int]
    steps: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]

    @classmethod
    def build(
        cls, shape: tuple[int, int, int], patch: tuple[int, int, int], tile_step: float
    ) -> TileGrid:
        from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

        _check_step(tile_step)  # before nnU-Net lists the steps: a tiny step makes giant lists

        pz, py, px = (max(s, p) for s, p in zip(shape, patch))
        padded = (pz, py, px)
        bz, by, bx = ((p - s) // 2 for s, p in zip(shape, padded))
        sz, sy, sx = (
            tuple(int(s) for s in axis)
            for axis in compute_steps_for_sliding_window(padded, patch, tile_step)
        )
        return cls(
            shape=(int(shape[0]), int(shape[1]), int(shape[2])),
            patch=(int(patch[0]), int(patch[1]), int(patch[2])),
            padded=padded,
            pad_below=(bz, by, bx),
            steps=(sz, sy, sx),
        )

    @property
    def tiles_per_row(self) -> int:
        return len(self.steps[1]) * len(self.steps[2])

    @property
    def n_tiles(self) -> int:
        return len(self.steps[0]) * self.tiles_per_row

    def row_tiles(self) -> list[tuple[int, int]]:
        """(y, x) starts of the tiles in one z-row, in nnU-Net's order."""
        return [(y, x) for y in self.steps[1] for x in self.steps[2]]

    def final_plane(self, row: int) -> int:
        """First padded plane still open after z-row `row`: planes below it are complete."""
        zs = self.steps[0]
        return zs[row + 1] if row + 1 < len(zs) else self.padded[0]


def tile_count(shape: Sequence[int], patch: Sequence[int], tile_step: float) -> int:
    """How many tiles `TileGrid.build` would make, computed without listing any step.

    nnU-Net's rule per axis: ceil((padded - patch) / (patch * tile_step)) + 1 tiles.
    """
    _check_step(tile_step)
    total = 1
    for s, p in zip(shape, patch, strict=True):
        total *= math.ceil((max(s, p) - p) / (p * tile_step)) + 1
    return total


def _check_step(tile_step: float) -> None:
    if not MIN_TILE_STEP <= tile_step <= 1:
        raise ValueError(f"tile_step must be in [{MIN_TILE_STEP}, 1], got {tile_step!r}")


def cut_tile(
    region: Any,
    grid: TileGrid,
    z: int,
    y: int,
    x: int,
    normalize: Callable[[np.ndarray], np.ndarray],
) -> np.ndarray:
    """One normalized input tile (1, pz, py, px) at padded position (z, y, x).

    Read straight from the (memory-mapped) source and normalized on the fly; the padding
    around a volume smaller than the patch is 0 after normalization, as in nnU-Net. Tiles
    overlap, so voxels are read several times — from the page cache, cheaply — in exchange
    for holding no float copy of even one slab of the volume.
    """
    tile = np.zeros((1, *grid.patch), dtype=np.float32)
    src, dst = [], []
    for start, size, pad, n in zip((z, y, x), grid.patch, grid.pad_below, grid.shape):
        a, b = max(start - pad, 0), min(start + size - pad, n)
        src.append(slice(a, b))
        dst.append(slice(a + pad - start, b + pad - start))
    block = np.array(region[tuple(src)], dtype=np.float32)
    index: tuple[int | slice, ...] = (0, *dst)
    tile[index] = normalize(block)
    return tile


def cut_model_tile(
    planes: torch.Tensor, first: int, grid: TileGrid, z: int, y: int, x: int
) -> torch.Tensor:
    """One tile (1, pz, py, px) at padded position (z, y, x), cut from model-space planes
    `first`.. (already normalized, on the device); outside the region it is 0, as in nnU-Net."""
    import torch

    tile = torch.zeros((1, *grid.patch), dtype=torch.float32, device=planes.device)
    src, dst = [], []
    for start, size, pad, n in zip((z, y, x), grid.patch, grid.pad_below, grid.shape):
        a, b = max(start - pad, 0), min(start + size - pad, n)
        src.append((a, b))
        dst.append(slice(a + pad - start, b + pad - start))
    (za, zb), (ya, yb), (xa, xb) = src
    index: tuple[int | slice, ...] = (0, *dst)
    tile[index] = planes[za - first : zb - first, ya:yb, xa:xb]
    return tile
