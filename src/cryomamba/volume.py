"""Tomograms as read-only, memory-mapped ZYX arrays, with the MRC header checked first.

`Volume.open` validates the 1,024-byte header against the file size *before* mapping
anything, so a corrupt, truncated or mislabelled file is refused with a message that says
what is wrong instead of being silently misread. `Volume.from_array` wraps an in-memory
array behind the same interface.

Header parsing and its decisions (axis order, mode-0 signedness, exact file size, origin,
voxel size, image stacks) live in `mrc_header.py`; this module maps the data and computes
statistics in chunks.
"""

from __future__ import annotations

import hashlib
import logging
import math
import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from .errors import InvalidVolumeError
from .mrc_header import (
    MrcLayout,
    check_shape,
    origin_xyz,
    read_layout,
    voxel_size_xyz,
)

__all__ = ["Volume", "VolumeStats"]

logger = logging.getLogger(__name__)


_V = TypeVar("_V", bound="Volume")


@dataclass(frozen=True)
class VolumeStats:
    """Intensity statistics over every non-NaN voxel, accumulated in float64."""

    min: float
    max: float
    mean: float
    std: float
    count: int
    nan_count: int


def _label_text(raw: bytes) -> str:
    """One 80-byte header label as text: ASCII, control and non-ASCII bytes dropped."""
    text = raw.split(b"\x00", 1)[0].decode("ascii", "ignore")
    return "".join(c for c in text if c.isprintable()).strip()


def _triple(value: Any, what: str, positive: bool) -> tuple[float, float, float]:
    """A scalar or 3-sequence as three finite floats (positive ones for voxel sizes)."""
    try:
        values = np.broadcast_to(np.asarray(value, dtype=np.float64), (3,))
    except (TypeError, ValueError):
        raise InvalidVolumeError(
            f"{what} must be a number or 3 numbers (z, y, x), got {value!r}"
        ) from None
    if not np.isfinite(values).all() or (positive and (values <= 0).any()):
        rule = "positive, finite" if positive else "finite"
        raise InvalidVolumeError(f"{what} must be {rule} (Å), got {value!r}")
    return (float(values[0]), float(values[1]), float(values[2]))


class Volume:
    """A tomogram: a read-only (Z, Y, X) array plus its physical metadata, in Å.

    Make one with `Volume.open(path)` (memory-mapped, validated) or `Volume.from_array`;
    the constructor is for those two. `voxel_size` and `origin` are (z, y, x) in Å and may
    be reassigned, e.g. when the header had no voxel size and the caller knows it.
    """

    def __init__(
        self,
        data: np.ndarray,
        *,
        path: Path | None = None,
        voxel_size: tuple[float, float, float] = (1.0, 1.0, 1.0),
        origin: tuple[float, float, float] = (0.0, 0.0, 0.0),
        voxel_size_known: bool = True,
        header: np.recarray | None = None,
        layout: MrcLayout | None = None,
    ) -> None:
        self._data: np.ndarray | None = data
        self.path = path
        self.shape: tuple[int, int, int] = tuple(int(n) for n in data.shape)  # type: ignore[assignment]
        self.dtype: np.dtype = data.dtype.newbyteorder("=")
        self.voxel_size = voxel_size
        self.origin = origin
        self.voxel_size_known = voxel_size_known
        self.header = header
        self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize
        self._layout = layout
        self._mapped: np.memmap | None = None
        self._checksum: str | None = None

    # -- construction -------------------------------------------------------------------

    @classmethod
    def open(
        cls, path: str | os.PathLike[str], *, sha256: str | None = None, level: int = 0
    ) -> Volume:
        """Validate an MRC file's header against its size, then memory-map its data.

        An OME-Zarr image (a ``.zarr`` folder or URL) opens through `volume_zarr` instead,
        at pyramid `level` (0 is full resolution), read lazily in chunks.
        `sha256` is the file's checksum when the caller already knows it (the server
        verified it at upload), so `checksum()` need not read the whole file again.
        """
        from .volume_zarr import is_zarr_location, open_ome_zarr

        if is_zarr_location(path):
            return open_ome_zarr(path, level=level)
        if level != 0:
            from .errors import ConfigError

            raise ConfigError(
                f"level={level!r}: an MRC file has one resolution level",
                hint="levels are for OME-Zarr pyramids; leave level at 0",
            )
        path = Path(path)
        lay = read_layout(path)
        raw_map = np.memmap(path, dtype=lay.dtype, mode="r", offset=lay.offset, shape=lay.shape)
        data = raw_map.transpose(lay.perm) if lay.perm != (0, 1, 2) else raw_map
        voxel_xyz, known = voxel_size_xyz(lay.header, str(path))
        origin, lay.origin_source = origin_xyz(lay.header, lay.axes, voxel_xyz)
        volume = cls(
            data,
            path=path,
            voxel_size=voxel_xyz[::-1],
            origin=origin[::-1],
            voxel_size_known=known,
            header=lay.header.copy(),
            layout=lay,
        )
        volume._mapped = raw_map
        volume._checksum = sha256
        return volume

    @classmethod
    def from_array(
        cls,
        array: Any,
        voxel_size: float | tuple[float, float, float] = 1.0,
        origin: tuple[float, float, float] = (0.0, 0.0, 0.0),
    ) -> Volume:
        """Wrap a 3D (Z, Y, X) numeric array without copying it; the view is read-only."""
        arr = np.asarray(array)
        if arr.dtype.kind not in "iuf":
            raise InvalidVolumeError(
                f"array of dtype {arr.dtype} cannot be segmented",
                hint="Pass integers or floats (not bool or complex).",
            )
        if arr.ndim != 3:
            raise InvalidVolumeError(
                f"array has {arr.ndim} dimensions {arr.shape}; a tomogram is 3D (Z, Y, X)",
                hint="Select one channel/time point of a 4D array; stack 2D images first.",
            )
        check_shape(arr.shape, "array")
        view = arr.view()
        view.flags.writeable = False
        return cls(
            view,
            voxel_size=_triple(voxel_size, "voxel_size", positive=True),
            origin=_triple(origin, "origin", positive=False),
        )

    # -- data access --------------------------------------------------------------------

    @property
    def data(self) -> np.ndarray:
        """The (Z, Y, X) array: a read-only memmap view for files, never a full copy."""
        if self._data is None:
            raise ValueError(f"{self!r} is closed")
        return self._data

    def slab(self, z0: int, z1: int) -> np.ndarray:
        """Planes z0..z1-1, in native byte order (a view unless the file is big-endian)."""
        if not 0 <= z0 < z1 <= self.shape[0]:
            raise IndexError(f"slab [{z0}:{z1}] is outside 0..{self.shape[0]}")
        part = self.data[z0:z1]
        return part if part.dtype.isnative else part.astype(self.dtype)

    def iter_slabs(self, depth: int) -> Iterator[tuple[int, np.ndarray]]:
        """(z0, slab) pairs of at most `depth` planes covering the volume in order."""
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        for z0 in range(0, self.shape[0], depth):
            yield z0, self.slab(z0, min(z0 + depth, self.shape[0]))

    def release(self, z0: int, z1: int) -> None:
        """Let the OS drop the cached pages of planes z0..z1-1 (clipped); no-op for arrays.

        For long streaming passes over files larger than RAM: the pages are read again from
        the file if touched later, so this only ever costs time, never correctness.
        """
        mm = getattr(self._mapped, "_mmap", None)
        z0, z1 = max(0, z0), min(self.shape[0], z1)
        if mm is None or self._layout is None or self._layout.perm[0] != 0 or z0 >= z1:
            return  # an array, or Z is not the file's slowest axis: planes are not contiguous
        plane = self.nbytes // self.shape[0]
        skip = self._layout.offset % mmap.ALLOCATIONGRANULARITY  # where numpy's map starts
        start, stop = skip + z0 * plane, skip + z1 * plane
        start -= start % mmap.PAGESIZE
        try:
            mm.madvise(mmap.MADV_DONTNEED, start, stop - start)
        except (AttributeError, OSError, ValueError):  # no madvise on this platform
            logger.debug("madvise unavailable; planes %d..%d stay cached", z0, z1)

    def stats(self, chunk_bytes: int = 64 << 20) -> VolumeStats:
        """Min, max, mean and std (population) over non-NaN voxels, NaNs counted apart.

        Reads z-chunks whose float64 working copy is about `chunk_bytes`, so a volume larger
        than memory never needs a full float copy; chunks are merged with Chan's update.
        """
        depth = max(1, chunk_bytes // (self.shape[1] * self.shape[2] * 8))
        count, nans, mean, m2 = 0, 0, 0.0, 0.0
        lo, hi = math.inf, -math.inf
        for _, slab in self.iter_slabs(depth):
            values = slab.astype(np.float64)
            if self.dtype.kind == "f":
                bad = np.isnan(values)
                if bad.any():
                    nans += int(bad.sum())
                    values = values[~bad]
            if values.size == 0:
                continue
            lo, hi = min(lo, float(values.min())), max(hi, float(values.max()))
            n, chunk_mean = values.size, float(values.mean())
            values -= chunk_mean
            chunk_m2 = float(np.dot(values.ravel(), values.ravel()))
            delta, total = chunk_mean - mean, count + n  # Chan et al. pairwise update
            mean += delta * n / total
            m2 += chunk_m2 + delta * delta * count * n / total
            count = total
        if count == 0:
            return VolumeStats(math.nan, math.nan, math.nan, math.nan, 0, nans)
        return VolumeStats(lo, hi, mean, math.sqrt(m2 / count), count, nans)

    def checksum(self) -> str:
        """SHA-256 (hex) of the file, or of the array's C-order bytes; computed once."""
        if self._checksum is None:
            digest = hashlib.sha256()
            if self.path is not None:
                with open(self.path, "rb") as f:
                    while block := f.read(8 << 20):
                        digest.update(block)
            else:
                depth = max(1, (8 << 20) // max(1, self.nbytes // self.shape[0]))
                for z0 in range(0, self.shape[0], depth):
                    digest.update(np.ascontiguousarray(self.data[z0 : z0 + depth]).data)
            self._checksum = digest.hexdigest()
        return self._checksum

    # -- metadata -----------------------------------------------------------------------

    def describe(self) -> dict[str, object]:
        """Metadata for `cryomamba info`, from the header only (no data is read)."""
        out: dict[str, object] = {
            "path": str(self.path) if self.path else None,
            "shape": self.shape,
            "axis_order": "ZYX",
            "dtype": self.dtype.name,
            "voxel_size": self.voxel_size,
            "voxel_size_known": self.voxel_size_known,
            "origin": self.origin,
            "nbytes": self.nbytes,
        }
        lay = self._layout
        if lay is None:
            return out
        h = lay.header
        nlabl = int(h.nlabl)  # slots past nlabl hold whatever the writer left there
        used = h.label[: nlabl if 0 <= nlabl <= 10 else 10]
        labels = [_label_text(bytes(b)) for b in used]
        exttyp = bytes(h.exttyp)
        out.update(
            mode=int(h.mode),
            mode0_signedness=lay.mode0,
            byte_order=lay.byte_order,
            file_size=lay.file_size,
            data_offset=lay.offset,
            origin_source=lay.origin_source,
            header_min=float(h.dmin),
            header_max=float(h.dmax),
            header_mean=float(h.dmean),
            header_rms=float(h.rms),
            file_axes="mapc/mapr/maps = {}, {}, {}".format(*lay.axes),
            space_group=int(h.ispg),
            cell_angles=(float(h.cellb.alpha), float(h.cellb.beta), float(h.cellb.gamma)),
            nversion=int(h.nversion),
            extended_header_type=exttyp.decode() if exttyp.isalnum() else None,
            extended_header_size=int(h.nsymbt),
            labels=[t for t in labels if t],
            image_stack=lay.image_stack,
        )
        return out

    @property
    def image_stack(self) -> str | None:
        """Why this file is a stack of 2D images rather than a volume, or None."""
        return self._layout.image_stack if self._layout is not None else None

    def require_tomogram(self) -> None:
        """Raise `InvalidVolumeError` when this is an image stack, which cannot be segmented."""
        if self.image_stack is not None:
            name = self.path.name if self.path else "the volume"
            raise InvalidVolumeError(
                f"{name} is an image stack, not a tomogram: {self.image_stack}",
                hint="segment a reconstructed tomogram; if this file really is a 3D volume, "
                "name it .mrc and set mz to the number of sections (e.g. IMOD alterheader)",
            )

    # -- lifecycle ----------------------------------------------------------------------

    def close(self) -> None:
        """Drop this Volume's reference to the mapping; it is unmapped once no view is left."""
        self._data = self._mapped = None

    def __enter__(self: _V) -> _V:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        source = self.path.name if self.path else "<array>"
        unit = " Å" if self.voxel_size_known else " (unknown)"
        state = ", closed" if self._data is None else ""
        return (
            f"Volume({source!r}, shape={self.shape}, dtype={self.dtype.name}, "
            f"voxel_size={self.voxel_size}{unit}{state})"
        )
