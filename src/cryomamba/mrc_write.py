"""`write_mrc_volume`: the one MRC writer (masks, synthetic tomograms, arrays to upload).

The data is written in z-chunks into a memory-mapped file, so a mask or volume the size of
a 10 GB tomogram is never copied whole; the header's statistics (dmin, dmax, dmean, rms)
are computed on the way. Voxel size and origin are given in Å, z/y/x (the MRC header keeps
them x/y/z).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["MRC_MODES", "write_mrc_volume"]

MRC_MODES: dict[np.dtype[Any], int] = {
    np.dtype(t): m
    for t, m in ((np.int8, 0), (np.int16, 1), (np.float32, 2), (np.uint16, 6), (np.float16, 12))
}
"""The data types an MRC file holds (mode 0 is int8: uint8 data needs mode 6 or int8)."""

_CHUNK_BYTES = 64 << 20


def write_mrc_volume(
    path: str | os.PathLike[str],
    data: Any,
    *,
    dtype: Any,
    voxel_size: Sequence[float],
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    nstart: Sequence[int] | None = None,
    label: str | None = None,
) -> Path:
    """Write the 3D `data` (an array, memmap or anything sliced by z) to `path` as `dtype`.

    `dtype` must be one of `MRC_MODES`; values are cast with `astype` (the caller checks that
    they fit). `nstart` (z, y, x) goes to n[zyx]start; `label` (80 characters at most) is the
    file's one text label. An existing file is replaced.
    """
    import mrcfile

    dtype = np.dtype(dtype)
    if dtype not in MRC_MODES:
        raise ValueError(f"MRC files hold {sorted(map(str, MRC_MODES))}, not {dtype}")
    shape = tuple(int(n) for n in data.shape)
    if len(shape) != 3:
        raise ValueError(f"an MRC volume is 3D (z, y, x), got shape {shape}")
    vz, vy, vx = (float(v) for v in voxel_size)
    oz, oy, ox = (float(o) for o in origin)
    # chunks sized by their 8-byte-per-voxel statistics copy, not by the data type
    depth = max(1, _CHUNK_BYTES // max(1, math.prod(shape[1:]) * 8))
    exact = dtype.kind in "iu"  # integer data: exact sums (labels' header statistics)
    n = math.prod(shape)
    total: float = 0
    total_sq: float = 0
    lo, hi = math.inf, -math.inf
    with mrcfile.new_mmap(path, shape=shape, mrc_mode=MRC_MODES[dtype], overwrite=True) as mrc:
        for z0 in range(0, shape[0], depth):
            block = np.asarray(data[z0 : z0 + depth]).astype(dtype, copy=False)
            mrc.data[z0 : z0 + block.shape[0]] = block
            if block.size:
                wide = block.astype(np.int64 if exact else np.float64).ravel()
                if exact:
                    total, total_sq = total + int(wide.sum()), total_sq + int(wide @ wide)
                else:
                    total, total_sq = total + float(wide.sum()), total_sq + float(wide @ wide)
                lo, hi = min(lo, float(wide.min())), max(hi, float(wide.max()))
        mrc.voxel_size = (vx, vy, vz)
        mrc.header.origin.x, mrc.header.origin.y, mrc.header.origin.z = ox, oy, oz
        if nstart is not None:
            mrc.header.nzstart, mrc.header.nystart, mrc.header.nxstart = (int(s) for s in nstart)
        if n:
            mean = total / n
            mrc.header.dmin, mrc.header.dmax = lo, hi
            mrc.header.dmean = np.float32(mean)
            mrc.header.rms = np.float32(math.sqrt(max(total_sq / n - mean * mean, 0.0)))
        else:
            mrc.reset_header_stats()
        mrc.header.label[:] = b""  # not mrcfile's time stamp: the same data, the same bytes
        mrc.header.nlabl = 0
        if label:
            mrc.add_label(label[:80])
    return Path(path)
