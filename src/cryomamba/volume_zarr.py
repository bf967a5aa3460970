"""OME-Zarr tomograms as `Volume`s: metadata from NGFF multiscales, data read lazily in chunks.

`open_ome_zarr` reads the ``multiscales`` metadata (NGFF 0.4 at the group's attributes, 0.5
under ``ome``): the axes must include z, y and x (a channel or time axis of length 1 is
dropped), the level's ``scale`` becomes the voxel size and its ``translation`` the origin,
both converted to Å from the axes' units. The data stay on disk: `ZarrView` supports the
slicing and transposing the engine does, and reads only the chunks a tile touches, so the
engine's memory stays bounded as with a memory-mapped MRC.

zarr is imported here, never by ``import cryomamba`` (STYLE §6).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np

from .errors import ConfigError, InvalidVolumeError
from .volume import Volume

__all__ = ["UNIT_TO_ANGSTROM", "ZarrView", "ZarrVolume", "is_zarr_location", "open_ome_zarr"]

# NGFF units (UDUNITS-2 names) that a tomogram's axes use, as Å per unit.
UNIT_TO_ANGSTROM: dict[str, float] = {
    "angstrom": 1.0,
    "nanometer": 10.0,
    "micrometer": 1e4,
    "millimeter": 1e7,
    "meter": 1e10,
    "picometer": 1e-2,
}
_SPATIAL = ("z", "y", "x")


def is_zarr_location(source: object) -> bool:
    """True for a store mapping, a URL, a path ending in .zarr or a folder with zarr metadata."""
    if isinstance(source, MutableMapping):
        return True
    if not isinstance(source, (str, os.PathLike)):
        return False
    text = os.fspath(source).rstrip("/")
    if text.endswith(".zarr") or "://" in text:
        return True
    path = Path(text)
    return path.is_dir() and any((path / n).exists() for n in (".zattrs", ".zgroup", "zarr.json"))


def _import_zarr() -> Any:
    try:
        import zarr
    except ImportError:
        raise ConfigError(
            "reading OME-Zarr needs the zarr package",
            hint="pip install 'cryomamba[zarr]'",
            code="missing_dependency",
        ) from None
    return zarr


class ZarrView:
    """A lazy (Z, Y, X) window onto a zarr array: slicing and `transpose` are free, reads happen
    in `__array__` (or when an integer index drops an axis) and touch only the chunks needed."""

    def __init__(
        self,
        array: Any,
        lead: tuple[int, ...] = (),
        box: tuple[tuple[int, int], ...] | None = None,
        perm: tuple[int, ...] = (0, 1, 2),
    ) -> None:
        self._array = array
        self._lead = lead  # fixed indices of leading non-spatial axes (channel, time)
        full = tuple(int(n) for n in array.shape[len(lead) :])
        self._box = box if box is not None else tuple((0, n) for n in full)
        self._perm = perm
        self.dtype = np.dtype(array.dtype)
        self.ndim = 3

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._box[p][1] - self._box[p][0] for p in self._perm)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def transpose(self, *axes: Any) -> ZarrView:
        order = tuple(axes[0]) if len(axes) == 1 and not isinstance(axes[0], int) else axes
        if sorted(order) != [0, 1, 2]:
            raise ValueError(f"invalid transpose {order!r}")
        perm = tuple(self._perm[a] for a in order)
        return ZarrView(self._array, self._lead, self._box, perm)

    def __getitem__(self, key: Any) -> Any:
        key = key if isinstance(key, tuple) else (key,)
        if any(k is Ellipsis for k in key):
            at = key.index(Ellipsis)
            key = key[:at] + (slice(None),) * (3 - len(key) + 1) + key[at + 1 :]
        key = key + (slice(None),) * (3 - len(key))
        if len(key) != 3:
            raise IndexError(f"too many indices for a 3D volume: {key!r}")
        box = list(self._box)
        post: list[int | slice] = []  # applied to the block read: steps, dropped axes
        for view_axis, k in enumerate(key):
            axis = self._perm[view_axis]
            lo, hi = box[axis]
            n = hi - lo
            if isinstance(k, (int, np.integer)):
                i = int(k) + n if k < 0 else int(k)
                if not 0 <= i < n:
                    raise IndexError(f"index {k} is out of bounds for an axis of size {n}")
                box[axis] = (lo + i, lo + i + 1)
                post.append(0)
            elif isinstance(k, slice) and k.indices(n)[2] > 0:
                start, stop, step = k.indices(n)
                box[axis] = (lo + start, lo + max(start, stop))  # read only the span
                post.append(slice(None, None, step))
            else:  # negative steps, fancy indexing: rare, read the view then index it
                return np.asarray(self)[key]
        view = ZarrView(self._array, self._lead, tuple(box), self._perm)
        if all(p == slice(None, None, 1) for p in post):
            return view  # plain slices stay lazy
        return np.asarray(view)[tuple(post)]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        index = self._lead + tuple(slice(lo, hi) for lo, hi in self._box)
        block = np.asarray(self._array[index])
        if self._perm != (0, 1, 2):
            block = block.transpose(self._perm)
        block = block if block.dtype.isnative else block.astype(block.dtype.newbyteorder("="))
        return block if dtype is None else block.astype(dtype, copy=False)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"ZarrView(shape={self.shape}, dtype={self.dtype.name})"


class ZarrVolume(Volume):
    """A `Volume` whose data is one level of an OME-Zarr image, read lazily."""

    location: str
    level: int
    levels: int
    copick: dict[str, Any] | None = None  # run, voxel size, tomo type when read from copick

    def checksum(self) -> str:
        """SHA-256 of the level's C-order bytes (read in slabs) plus its shape and dtype."""
        if self._checksum is None:
            digest = hashlib.sha256(f"{self.shape}:{self.dtype.str}".encode())
            depth = max(1, (8 << 20) // max(1, self.nbytes // self.shape[0]))
            for _, slab in self.iter_slabs(depth):
                digest.update(np.ascontiguousarray(slab).data)
            self._checksum = digest.hexdigest()
        return self._checksum

    def slab(self, z0: int, z1: int) -> np.ndarray:
        if not 0 <= z0 < z1 <= self.shape[0]:
            raise IndexError(f"slab [{z0}:{z1}] is outside 0..{self.shape[0]}")
        return np.asarray(self.data[z0:z1])

    def describe(self) -> dict[str, object]:
        out = super().describe()
        out.update(format="OME-Zarr", location=self.location, level=self.level, levels=self.levels)
        return out

    def __repr__(self) -> str:
        return (
            f"ZarrVolume({self.location!r}, level={self.level}, shape={self.shape}, "
            f"dtype={self.dtype.name}, voxel_size={self.voxel_size} Å)"
        )


def _multiscales(attrs: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The first ``multiscales`` entry (NGFF 0.4 top level or 0.5 under ``ome``), or an error."""
    ms = attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")
    if not ms:
        raise InvalidVolumeError(
            f"{where} is a zarr store but not an OME-Zarr image: no 'multiscales' metadata",
            hint="open the image group (the folder with .zattrs holding 'multiscales'), or "
            "convert a bare zarr array with ome-zarr; MRC files open with Volume.open too",
        )
    return dict(ms[0])


def _axes(ms: Mapping[str, Any], where: str, ndim: int) -> list[dict[str, Any]]:
    """The axes as dicts with name/type/unit (NGFF 0.3 strings, or none: t, c, z, y, x)."""
    raw = ms.get("axes") or ["t", "c", "z", "y", "x"][-ndim:]
    axes = [{"name": a} if isinstance(a, str) else dict(a) for a in raw]
    names = [a.get("name") for a in axes]
    if not all(n in names for n in _SPATIAL):
        spatial = [n for n in names if n in _SPATIAL]
        raise InvalidVolumeError(
            f"{where} has axes {names}: a tomogram needs z, y and x "
            f"({len(spatial)}D images cannot be segmented)",
            hint="segment a 3D tomogram; stack 2D images into a volume first",
        )
    return axes


def _transform(
    items: Sequence[Mapping[str, Any]], n: int, where: str
) -> tuple[np.ndarray, np.ndarray]:
    scale, shift = np.ones(n), np.zeros(n)
    for t in items:
        kind = t.get("type")
        if kind == "scale":
            scale = scale * np.asarray(t["scale"], dtype=np.float64)
        elif kind == "translation":
            shift = shift + np.asarray(t["translation"], dtype=np.float64)
        elif kind != "identity":
            raise InvalidVolumeError(
                f"{where}: coordinate transformation {kind!r} is not supported",
                hint="cryomamba reads 'scale' and 'translation' transformations (NGFF 0.4)",
            )
    return scale, shift


def open_ome_zarr(
    location: str | os.PathLike[str] | MutableMapping[str, Any],
    *,
    level: int = 0,
    storage_options: Mapping[str, Any] | None = None,
) -> ZarrVolume:
    """Open one resolution level of an OME-Zarr image (path, fsspec URL or store) as a `Volume`.

    Voxel size and origin are (z, y, x) in Å, from the level's scale and translation (and the
    multiscale's own transformations, applied after); no voxel data is read here.
    """
    zarr = _import_zarr()
    where = location if isinstance(location, (str, os.PathLike)) else type(location).__name__
    where = os.fspath(where)
    store: Any = location
    if isinstance(location, (str, os.PathLike)):
        text = os.fspath(location)
        if "://" not in text and not Path(text).exists():
            raise InvalidVolumeError(
                f"{text} does not exist", hint="check the path of the .zarr folder"
            )
        if "://" in text:
            import fsspec

            store = fsspec.get_mapper(text, **dict(storage_options or {}))
    try:
        group = zarr.open(store, mode="r")
    except Exception as exc:  # zarr raises several types for a folder that is no store
        raise InvalidVolumeError(
            f"{where} is not a zarr store: {exc}", hint="give the path of an OME-Zarr image"
        ) from None
    if not hasattr(group, "attrs") or not hasattr(group, "array_keys"):
        raise InvalidVolumeError(
            f"{where} is a bare zarr array, not an OME-Zarr image: it has no voxel size",
            hint="write it as OME-Zarr (ome_zarr.writer.write_image) or as MRC",
        )
    ms = _multiscales(group.attrs.asdict(), where)
    datasets = ms.get("datasets") or []
    if not isinstance(level, int) or not 0 <= level < len(datasets):
        raise ConfigError(
            f"{where} has {len(datasets)} level(s) (0..{len(datasets) - 1}), not level {level!r}",
            hint="level 0 is full resolution; higher levels are 2x, 4x, ... downsampled",
        )
    ds = datasets[level]
    try:
        array = group[ds["path"]]
    except KeyError:
        raise InvalidVolumeError(
            f"{where}: level {level} names array {ds['path']!r}, which is missing",
            hint="the store is incomplete; copy or download it again",
        ) from None
    axes = _axes(ms, where, array.ndim)
    if array.ndim != len(axes):
        raise InvalidVolumeError(
            f"{where}: level {level} has {array.ndim} dimensions but {len(axes)} axes are declared"
        )
    names = [a["name"] for a in axes]
    lead: list[int] = []
    for i, name in enumerate(names[: -3 or None]):
        if array.shape[i] != 1:
            raise InvalidVolumeError(
                f"{where}: axis {name!r} has {array.shape[i]} entries; one 3D volume is needed",
                hint="select one channel/time point and save it as its own image",
            )
        lead.append(0)
    if names[-3:] != list(_SPATIAL):
        raise InvalidVolumeError(
            f"{where}: axes end in {names[-3:]}, expected z, y, x (NGFF orders space last)"
        )
    n = len(axes)
    scale, shift = _transform(ds.get("coordinateTransformations", []), n, where)
    outer_scale, outer_shift = _transform(ms.get("coordinateTransformations", []), n, where)
    scale, shift = scale * outer_scale, shift * outer_scale + outer_shift
    factor = []
    for axis in axes[-3:]:
        unit = axis.get("unit")
        if unit is None:
            factor.append(math.nan)
        elif unit in UNIT_TO_ANGSTROM:
            factor.append(UNIT_TO_ANGSTROM[unit])
        else:
            raise InvalidVolumeError(
                f"{where}: axis {axis['name']!r} has unit {unit!r}, which is not a length "
                "cryomamba converts to Å",
                hint=f"use one of {', '.join(UNIT_TO_ANGSTROM)} in the axes' 'unit'",
            )
    known = not any(math.isnan(f) for f in factor)
    f = np.array([1.0 if math.isnan(v) else v for v in factor])
    vs, org = scale[-3:] * f, shift[-3:] * f
    if not (np.isfinite(vs).all() and (vs > 0).all() and np.isfinite(org).all()):
        raise InvalidVolumeError(
            f"{where}: level {level} has scale {list(scale)} / translation {list(shift)}; "
            "the scale must be positive and both finite"
        )
    view = ZarrView(array, tuple(lead))
    volume = ZarrVolume(
        cast(np.ndarray, view),  # duck-typed: the slicing the engine and stats use
        path=Path(where)
        if isinstance(location, (str, os.PathLike)) and "://" not in where
        else None,
        voxel_size=(float(vs[0]), float(vs[1]), float(vs[2])),
        origin=(float(org[0]), float(org[1]), float(org[2])),
        voxel_size_known=known,
    )
    volume.location, volume.level, volume.levels = where, level, len(datasets)
    return volume
