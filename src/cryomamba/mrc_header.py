"""MRC/CCP4 headers: parse the 1,024 bytes, check them against the file, refuse what is unsafe.

`read_layout(path)` reads only the header (never the data block) and returns an `MrcLayout`:
where the data lie, their dtype and byte order, the file's axis order, and the evidence for
the decisions below. `Volume.open` (volume.py) maps the data from it.

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
* Image stacks: a `.mrcs` file (RELION's and Warp's name for particle or tilt stacks), or
  a header with space group 0 and mz = 1 over several sections, is a stack of 2D images.
  It is read (to look at it), but `MrcLayout.image_stack` says why it is a stack and
  segmentation refuses it: the sections are not a 3D volume.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from mrcfile.dtypes import HEADER_DTYPE

from .errors import InvalidVolumeError

__all__ = [
    "HEADER_BYTES",
    "IMOD_STAMP",
    "MODES",
    "MrcLayout",
    "check_shape",
    "origin_xyz",
    "read_layout",
    "voxel_size_xyz",
]

logger = logging.getLogger(__name__)

HEADER_BYTES = 1024
IMOD_STAMP = 1146047817
MODES = {m: np.dtype(c) for m, c in ((0, "i1"), (1, "i2"), (2, "f4"), (6, "u2"), (12, "f2"))}
_UNSUPPORTED_MODES = {3: "complex int16", 4: "complex float32", 101: "4-bit packed"}
_CONVERT = (
    "CryoMamba reads MRC/CCP4 volumes (.mrc, .rec, .st, .ali, .map, .ccp4, .mrcs); "
    "convert other formats first (e.g. IMOD tif2mrc, or mrcfile.write from Python)."
)
_SUFFIXES = (".mrc", ".rec", ".st", ".ali", ".map", ".ccp4", ".mrcs")
_MAGIC = {  # first bytes of formats people mistake for MRC
    (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"): "a TIFF image",
    (b"\x89HDF\r\n\x1a\n",): "an HDF5 file",
    (b"\x1f\x8b\x08", b"BZh"): "a gzip or bzip2 archive (decompress it first)",
    (b"\x93NUMPY", b"PK\x03\x04"): "a NumPy .npy or zip/.npz file",
    (b"\x89PNG", b"\xff\xd8\xff"): "a PNG or JPEG image",
    (b"NRRD",): "an NRRD file",
}


def _size(count: int) -> str:
    """A byte count for people: 1000-based units, one decimal."""
    if count < 1000:
        return f"{count} bytes"
    n = float(count)
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
        if int(header["mode"]) in MODES or int(header["mode"]) in _UNSUPPORTED_MODES:
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
class MrcLayout:
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
    image_stack: str | None = None  # why the file is a stack of 2D images, not a volume


def read_layout(path: Path) -> MrcLayout:
    """Check the header against the file size and refuse what cannot be read safely."""
    name = str(path)
    if Path(path).is_dir():
        raise _refuse(name, "is a folder, not an MRC file", _folder_hint(Path(path)))
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
    dtype, mode0 = MODES[mode], None
    if mode == 0:
        stamp_flags = np.frombuffer(raw, f"{order}i4", count=2, offset=152)
        unsigned, mode0 = _mode0_unsigned(h, int(stamp_flags[0]), int(stamp_flags[1]))
        dtype = np.dtype(np.uint8) if unsigned else dtype
        logger.debug("%s: mode 0 read as %s", name, mode0)
    dtype = dtype.newbyteorder(order)  # type: ignore[arg-type]  # "<" or ">", from the header
    offset = HEADER_BYTES + int(h.nsymbt)
    _check_size(name, mode, dtype, (nz, ny, nx), offset, file_size)
    where = {axes[2]: 0, axes[1]: 1, axes[0]: 2}  # crystal axis (1=X) -> file array axis
    perm = (where[3], where[2], where[1])
    check_shape(tuple((nz, ny, nx)[i] for i in perm), name)
    byte_order = "big" if order == ">" else "little"
    layout = MrcLayout(h, dtype, offset, (nz, ny, nx), axes, perm, file_size, mode0, byte_order)
    layout.image_stack = _image_stack(Path(path), h, nz)
    return layout


def _image_stack(path: Path, h: np.recarray, sections: int) -> str | None:
    """Why the file is a stack of 2D images rather than a volume, or None (module docstring)."""
    if path.suffix.lower() == ".mrcs":
        return f"the .mrcs extension marks a stack of {sections} 2D images (RELION, Warp)"
    if int(h.ispg) == 0 and int(h.mz) == 1 and sections > 1:
        return f"the header (space group 0, mz = 1) marks a stack of {sections} 2D images"
    return None


def _folder_hint(folder: Path) -> str:
    """Point at the MRC files inside a folder that was given where a file belongs."""
    try:
        found = sorted(p for p in folder.iterdir() if p.suffix.lower() in _SUFFIXES and p.is_file())
    except OSError:
        found = []
    if not found:
        return "Pass one tomogram file (.mrc, .rec, .map, ...), not a folder."
    more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    return f"Pass one tomogram file, not a folder: e.g. {found[0]}{more}."


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
    fits = [m for m, dt in MODES.items() if voxels * dt.itemsize == actual and m != mode]
    hint = "The header's mode, dimensions or nsymbt are wrong"
    if fits:
        hint = f"The data block is exactly the size of mode {fits[0]} ({MODES[fits[0]]}) data"
    hint += "; fix the header (e.g. IMOD alterheader): CryoMamba will not guess."
    raise _refuse(name, f"does not match its header: {what}", hint)


def voxel_size_xyz(h: np.recarray, name: str) -> tuple[tuple[float, float, float], bool]:
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


def origin_xyz(
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


def check_shape(shape: tuple[int, ...], name: str) -> None:
    """Refuse what is not a volume: a single image, or any axis thinner than 2 voxels."""
    if shape[0] == 1:
        what = f"is a single 2D image ({shape[1]}×{shape[2]}); a tomogram needs at least 2 slices"
        raise _refuse(name, what, "Pass a reconstructed tomogram, not a projection or tilt.")
    if min(shape) < 2:
        what = f"is flat (Z×Y×X = {shape}); a tomogram needs at least 2 voxels along every axis"
        raise _refuse(name, what, "Pass a 3D volume.")
