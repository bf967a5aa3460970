"""Tomograms as read-only, memory-mapped ZYX arrays, with the MRC header checked first.

`Volume.open` validates the 1,024-byte header against the file size *before* mapping
anything, so a corrupt, truncated or mislabelled file is refused with a message that says
what is wrong instead of being silently misread. `Volume.from_array` wraps an in-memory
array behind the same interface.

Decisions (MRC2014 leaves some of these to the reader):

* Axes: data are returned as (Z, Y, X). When mapc/mapr/maps is not 1,2,3 the file's array
  is transposed (a view); voxel sizes (cella/mx...) and origin follow the same axes.
* Mode 0: MRC2014 says int8, but IMOD/SerialEM wrote unsigned bytes for years. Header
  min/max that only fit one type decide first (min >= 0 and 127 < max <= 255: uint8;
  min < 0: int8); else an IMOD stamp decides (bit 0 of imodFlags set: int8, clear: uint8);
  else int8 as the standard says. The reason is logged and shown by `describe()`.
* Size: the file must be exactly 1024 + nsymbt + nx*ny*nz*itemsize bytes. Trailing bytes
  are refused too: they usually mean the header's mode or nsymbt is wrong, and reading on
  would return plausible-looking garbage.
* Origin: the header origin fields when any is non-zero; otherwise n[xyz]start * voxel
  size (the CCP4 convention, as ChimeraX does); otherwise 0.
* Voxel size: cella / (mx, my, mz). Zero, negative or non-finite means unknown: 1 Å is
  used, `voxel_size_known` is False and a warning is logged.
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
from mrcfile.dtypes import HEADER_DTYPE

from cryomamba.errors import InvalidVolumeError

__all__ = ["Volume", "VolumeStats"]

logger = logging.getLogger(__name__)

HEADER_BYTES = 1024
IMOD_STAMP = 1146047817
_MODES = {m: np.dtype(c) for m, c in ((0, "i1"), (1, "i2"), (2, "f4"), (6, "u2"), (12, "f2"))}
_UNSUPPORTED_MODES = {3: "complex int16", 4: "complex float32", 101: "4-bit packed"}
_CONVERT = (
    "CryoMamba reads MRC/CCP4 volumes (.mrc, .rec, .st, .ali, .map, .ccp4, .mrcs); "
    "convert other formats first (e.g. IMOD tif2mrc, or mrcfile.write from Python)."
)
_MAGIC = {  # first bytes of formats people mistake for MRC
    (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"): "a TIFF image",
    (b"\x89HDF\r\n\x1a\n",): "an HDF5 file",
    (b"\x1f\x8b\x08", b"BZh"): "a gzip or bzip2 archive (decompress it first)",
    (b"\x93NUMPY", b"PK\x03\x04"): "a NumPy .npy or zip/.npz file",
    (b"\x89PNG", b"\xff\xd8\xff"): "a PNG or JPEG image",
    (b"NRRD",): "an NRRD file",
}


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


def _size(n: int) -> str:
    """A byte count for people: 1000-based units, one decimal."""
    if n < 1000:
        return f"{n} bytes"
    for unit in ("kB", "MB", "GB", "TB", "PB"):
        n /= 1000
        if n < 1000 or unit == "PB":
            return f"{n:.1f} {unit}"
    raise AssertionError  # pragma: no cover


def _sizes(a: int, b: int) -> tuple[str, str]:
    """Two sizes that read differently even when they round to the same text."""
    sa, sb = _size(a), _size(b)
    return (sa, sb) if sa != sb else (f"{a:,} bytes", f"{b:,} bytes")


def _f32(value: Any) -> float:
    """The shortest decimal that round-trips a header float32 (376.32/48 -> 7.84)."""
    return float(str(np.float32(value)))


def _refuse(name: str, what: str, hint: str) -> InvalidVolumeError:
    return InvalidVolumeError(f"{name} {what}", hint=hint)


def _sniff(raw: bytes) -> str | None:
    """Name the format of a file that is recognisably not MRC."""
    for magic, kind in _MAGIC.items():
        if raw.startswith(magic):
            return kind
    if raw[344:348] in (b"n+1\x00", b"ni1\x00"):
        return "a NIfTI image"
    return None


def _parse_header(raw: bytes, name: str) -> tuple[np.recarray, str]:
    """The header in the byte order whose mode makes sense (machine stamp tried first)."""
    orders = (">", "<") if raw[212:214] == b"\x11\x11" else ("<", ">")
    for order in orders:
        header = np.frombuffer(raw, HEADER_DTYPE.newbyteorder(order), count=1).reshape(())
        if int(header["mode"]) in _MODES or int(header["mode"]) in _UNSUPPORTED_MODES:
            return header.copy().view(np.recarray), order
    if not bytes(header["map"]).startswith(b"MAP"):
        raise _refuse(name, "is not an MRC file: no 'MAP ' id and no valid mode", _CONVERT)
    mode = int(np.frombuffer(raw, f"{orders[0]}i4", count=1, offset=12)[0])
    raise _refuse(
        name,
        f"has mode {mode} in its header, which is not an MRC data mode",
        "Supported modes: 0 (8-bit), 1 (int16), 2 (float32), 6 (uint16), 12 (float16); "
        "the header is corrupt or was written wrongly.",
    )


@dataclass
class _Layout:
    """Where and how the data of a validated MRC file lie."""

    header: np.recarray
    dtype: np.dtype  # in the file's byte order
    offset: int
    shape: tuple[int, int, int]  # file order: (nz, ny, nx) = (sections, rows, columns)
    axes: tuple[int, int, int]  # mapc, mapr, maps
    perm: tuple[int, int, int]  # file array axes -> (Z, Y, X)
    file_size: int
    mode0: str | None
    byte_order: str  # of the header and data: "little" or "big"
    origin_source: str = "none"


def _read_layout(path: Path) -> _Layout:
    """Check the header against the file size and refuse what cannot be read safely."""
    name = str(path)
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
        file_size = os.fstat(f.fileno()).st_size
    kind = _sniff(raw)
    if kind is not None:
        raise _refuse(name, f"is not an MRC file: it looks like {kind}", _CONVERT)
    if len(raw) < HEADER_BYTES:
        what = f"is {file_size} bytes, shorter than the 1,024-byte MRC header"
        raise _refuse(name, what, "The file is truncated or not an MRC file.")
    h, order = _parse_header(raw, name)
    nx, ny, nz, mode = int(h.nx), int(h.ny), int(h.nz), int(h.mode)
    if min(nx, ny, nz) < 1:
        what = f"has impossible dimensions nx={nx}, ny={ny}, nz={nz} (each must be >= 1)"
        raise _refuse(name, what, "The header is corrupt.")
    axes = (int(h.mapc), int(h.mapr), int(h.maps))
    if sorted(axes) != [1, 2, 3]:
        what = f"has invalid axes mapc/mapr/maps = {axes}: not a permutation of 1, 2, 3"
        raise _refuse(name, what, "The header is corrupt; fix mapc/mapr/maps.")
    if mode in _UNSUPPORTED_MODES:
        what = f"holds {_UNSUPPORTED_MODES[mode]} data (mode {mode}), which cannot be segmented"
        raise _refuse(name, what, "Convert it to mode 0, 1, 2, 6 or 12 first.")
    dtype, mode0 = _MODES[mode], None
    if mode == 0:
        stamp_flags = np.frombuffer(raw, f"{order}i4", count=2, offset=152)
        unsigned, mode0 = _mode0_unsigned(h, int(stamp_flags[0]), int(stamp_flags[1]))
        dtype = np.dtype(np.uint8) if unsigned else dtype
        logger.debug("%s: mode 0 read as %s", name, mode0)
    dtype = dtype.newbyteorder(order)
    offset = HEADER_BYTES + int(h.nsymbt)
    _check_size(name, mode, dtype, (nz, ny, nx), offset, file_size)
    where = {axes[2]: 0, axes[1]: 1, axes[0]: 2}  # crystal axis (1=X) -> file array axis
    perm = (where[3], where[2], where[1])
    _check_shape(tuple((nz, ny, nx)[i] for i in perm), name)
    byte_order = "big" if order == ">" else "little"
    return _Layout(h, dtype, offset, (nz, ny, nx), axes, perm, file_size, mode0, byte_order)


def _check_size(
    name: str, mode: int, dtype: np.dtype, shape: tuple[int, ...], offset: int, file_size: int
) -> None:
    """Refuse a file whose size is not exactly header + extended header + data."""
    voxels = math.prod(shape)
    expected, actual = voxels * dtype.itemsize, file_size - offset
    promise = f"the header (mode {mode}, {dtype.name}, {'×'.join(map(str, shape))}) promises"
    if offset < HEADER_BYTES or actual < 0:
        what = f"has an extended header (nsymbt = {offset - HEADER_BYTES}) that does not fit"
        raise _refuse(name, f"{what} in the file ({file_size:,} bytes)", "The header is corrupt.")
    if actual == 0:
        what = f"has no data: the file ends after the header, but {promise} {_size(expected)}"
        raise _refuse(name, what, "Only the header was written or copied; copy the whole file.")
    if actual == expected:
        return
    got, want = _sizes(actual, expected)
    what = f"data block is {got} but {promise} {want}"
    if actual < expected:
        hint = "The file was cut short (interrupted write, copy or download?); copy it again."
        raise _refuse(name, f"is truncated: {what}", hint)
    fits = [m for m, dt in _MODES.items() if voxels * dt.itemsize == actual and m != mode]
    hint = "The header's mode, dimensions or nsymbt are wrong"
    if fits:
        hint = f"The data block is exactly the size of mode {fits[0]} ({_MODES[fits[0]]}) data"
    hint += "; fix the header (e.g. IMOD alterheader): CryoMamba will not guess."
    raise _refuse(name, f"does not match its header: {what}", hint)


def _voxel_size(h: np.recarray, name: str) -> tuple[tuple[float, float, float], bool]:
    """(x, y, z) voxel size in Å from cella/(mx, my, mz), and whether the header knew it."""
    cell = [float(h.cella.x), float(h.cella.y), float(h.cella.z)]
    samples = [int(h.mx), int(h.my), int(h.mz)]
    if not (all(math.isfinite(c) and c > 0 for c in cell) and min(samples) > 0):
        logger.warning("%s: no voxel size in the header (cella %s, m %s); using 1 Å", name,
                       cell, samples)  # fmt: skip
        return (1.0, 1.0, 1.0), False
    angles = [float(h.cellb.alpha), float(h.cellb.beta), float(h.cellb.gamma)]
    if any(a not in (0.0, 90.0) for a in angles):
        logger.warning("%s: cell angles %s are not 90°; voxels are taken as orthogonal", name,
                       angles)  # fmt: skip
    x, y, z = (_f32(np.float32(c) / np.float32(m)) for c, m in zip(cell, samples, strict=True))
    return (x, y, z), True


def _origin(
    h: np.recarray, axes: tuple[int, int, int], voxel_xyz: tuple[float, float, float]
) -> tuple[tuple[float, float, float], str]:
    """(x, y, z) origin in Å, and which header fields it came from (module docstring)."""
    origin = (_f32(h.origin.x), _f32(h.origin.y), _f32(h.origin.z))
    if all(math.isfinite(o) for o in origin) and any(origin):
        return origin, "header origin"
    start = [0, 0, 0]
    for axis, n in zip(axes, (int(h.nxstart), int(h.nystart), int(h.nzstart)), strict=True):
        start[axis - 1] = n
    if any(start):
        x, y, z = (s * v for s, v in zip(start, voxel_xyz, strict=True))
        return (x, y, z), "nxstart/nystart/nzstart"
    return (0.0, 0.0, 0.0), "none"


def _mode0_unsigned(h: np.recarray, stamp: int, flags: int) -> tuple[bool, str]:
    """Whether mode-0 bytes are unsigned, and the evidence (see the module docstring)."""
    dmin, dmax = float(h.dmin), float(h.dmax)
    if math.isfinite(dmin) and math.isfinite(dmax) and dmin <= dmax:
        if dmin >= 0 and 127 < dmax <= 255:
            return True, f"uint8: header min/max {dmin:g}..{dmax:g} do not fit int8"
        if -128 <= dmin < 0 and dmax <= 127:
            return False, f"int8: header min {dmin:g} is negative"
    if stamp == IMOD_STAMP:
        if flags & 1:
            return False, "int8: IMOD header flags bytes as signed"
        return True, "uint8: IMOD header without the signed-bytes flag"
    return False, "int8: MRC2014 default (no IMOD stamp; header min/max do not decide)"


def _check_shape(shape: tuple[int, ...], name: str) -> None:
    """Refuse what is not a volume: a single image, or any axis thinner than 2 voxels."""
    if shape[0] == 1:
        what = f"is a single 2D image ({shape[1]}×{shape[2]}); a tomogram needs at least 2 slices"
        raise _refuse(name, what, "Pass a reconstructed tomogram, not a projection or tilt.")
    if min(shape) < 2:
        what = f"is flat (Z×Y×X = {shape}); a tomogram needs at least 2 voxels along every axis"
        raise _refuse(name, what, "Pass a 3D volume.")


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
        layout: _Layout | None = None,
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
    def open(cls, path: str | os.PathLike[str], *, sha256: str | None = None) -> Volume:
        """Validate an MRC file's header against its size, then memory-map its data.

        `sha256` is the file's checksum when the caller already knows it (the server
        verified it at upload), so `checksum()` need not read the whole file again.
        """
        path = Path(path)
        lay = _read_layout(path)
        raw_map = np.memmap(path, dtype=lay.dtype, mode="r", offset=lay.offset, shape=lay.shape)
        data = raw_map.transpose(lay.perm) if lay.perm != (0, 1, 2) else raw_map
        voxel_xyz, known = _voxel_size(lay.header, str(path))
        origin_xyz, lay.origin_source = _origin(lay.header, lay.axes, voxel_xyz)
        volume = cls(
            data,
            path=path,
            voxel_size=voxel_xyz[::-1],
            origin=origin_xyz[::-1],
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
        _check_shape(arr.shape, "array")
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
        labels = [bytes(b).decode("ascii", "replace").strip(" \x00") for b in h.label]
        nlabl = int(h.nlabl)
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
            labels=[t for t in (labels[:nlabl] if 0 < nlabl <= 10 else labels) if t],
        )
        return out

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
