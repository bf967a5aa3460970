"""Write masks (and probability maps) as OME-Zarr: NGFF 0.4 on zarr format 2, slab by slab.

Why 0.4 / zarr 2 (docs/formats.md): copick 1.31 pins zarr<3 and writes NGFF 0.4, the CZ
cryoET Data Portal serves NGFF 0.4 on zarr 2, and napari-ome-zarr reads it; NGFF 0.5
(zarr 3) is not yet read by copick.

The mask is a multiscale ``image-label`` group: level 0 is the mask, level k keeps every
2^k-th voxel (nearest: a label never blends with its neighbours), scale = voxel size x 2^k
in Å, translation = the source's origin (voxel i of level k sits on voxel 2^k·i of level 0).
Levels are written together from slabs of level 0 whose depth is a multiple of every
level's chunk depth x its factor, so each chunk is written exactly once and memory holds
one slab.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

import numpy as np

from ._version import __version__

__all__ = ["auto_levels", "create_group", "multiscales_metadata", "write_ome_zarr_labels"]

NGFF_VERSION = "0.4"
LABEL_CHUNK = 64  # (64, 64, 64) uint8 chunks: 256 KiB raw, a few KiB compressed
_UNIT = "angstrom"  # copick's unit; the portal's too


def auto_levels(shape: Sequence[int], smallest: int = 128, most: int = 5) -> int:
    """How many 2x levels until the largest axis is at most `smallest` (1..`most`)."""
    levels = 1
    while levels < most and max(shape) / 2 ** (levels - 1) > smallest:
        levels += 1
    return levels


def create_group(location: str | os.PathLike[str] | MutableMapping[str, Any]) -> Any:
    """A new, empty zarr format 2 group (NGFF 0.4 wants '/'-separated chunk keys)."""
    import zarr

    store: Any = location
    if isinstance(location, (str, os.PathLike)):
        store = zarr.storage.DirectoryStore(os.fspath(location), dimension_separator="/")
    return zarr.group(store=store, overwrite=True)


def multiscales_metadata(
    n_levels: int,
    voxel_size: Sequence[float],
    origin: Sequence[float],
    name: str,
    channel_axis: bool = False,
) -> dict[str, Any]:
    """NGFF 0.4 ``multiscales`` (zyx in Å, or czyx): scale and translation per level."""
    axes: list[dict[str, str]] = [{"name": a, "type": "space", "unit": _UNIT} for a in "zyx"]
    lead: list[float] = []
    if channel_axis:
        axes.insert(0, {"name": "c", "type": "channel"})
        lead = [1.0]
    datasets = []
    for k in range(n_levels):
        datasets.append(
            {
                "path": str(k),
                "coordinateTransformations": [
                    {"type": "scale", "scale": lead + [float(v) * 2**k for v in voxel_size]},
                    {"type": "translation", "translation": [0.0] * len(lead) + list(origin)},
                ],
            }
        )
    return {
        "multiscales": [
            {
                "version": NGFF_VERSION,
                "name": name,
                "axes": axes,
                "datasets": datasets,
                "type": "nearest" if not channel_axis else "none",
                "metadata": {"writer": f"cryomamba {__version__}"},
            }
        ]
    }


def _max_label(labels: Any, depth: int = 32) -> int:
    """The largest label, read `depth` planes at a time (a memmap never loads whole)."""
    return max(int(np.max(labels[z : z + depth])) for z in range(0, labels.shape[0], depth))


def write_ome_zarr_labels(
    location: str | os.PathLike[str] | MutableMapping[str, Any],
    labels: Any,
    *,
    voxel_size: Sequence[float],
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    label_names: Mapping[int, str] | None = None,
    levels: int | None = None,
    chunk: int = LABEL_CHUNK,
) -> Any:
    """Write uint8/uint16 (Z, Y, X) `labels` as an NGFF 0.4 multiscale label image.

    `labels` may be a memmap larger than memory: it is read one slab at a time.
    """
    import numcodecs

    shape = tuple(int(n) for n in labels.shape)
    n_levels = levels if levels is not None else auto_levels(shape)
    hi = 0 if labels.dtype == np.uint8 else _max_label(labels)
    dtype = np.uint8 if hi <= 255 else np.uint16
    group = create_group(location)
    compressor = numcodecs.Blosc(cname="zstd", clevel=5, shuffle=numcodecs.Blosc.BITSHUFFLE)
    arrays = []
    for k in range(n_levels):
        f = 2**k
        level_shape = tuple(math.ceil(n / f) for n in shape)
        arrays.append(
            group.create_dataset(
                str(k),
                shape=level_shape,
                chunks=tuple(min(chunk, n) for n in level_shape),
                dtype=dtype,
                compressor=compressor,
                fill_value=0,
                dimension_separator="/",
                overwrite=True,
            )
        )
    depth = chunk * 2 ** (n_levels - 1)
    for z0 in range(0, shape[0], depth):
        slab = np.asarray(labels[z0 : z0 + depth]).astype(dtype, copy=False)
        for k, arr in enumerate(arrays):
            f = 2**k
            sub = slab[::f, ::f, ::f]
            arr[z0 // f : z0 // f + sub.shape[0]] = sub
    attrs = multiscales_metadata(n_levels, voxel_size, origin, name="mask")
    names = dict(label_names or {})
    present = sorted(set(names) | {0})
    attrs["image-label"] = {
        "version": NGFF_VERSION,
        "properties": [{"label-value": int(v), "name": names.get(v, str(v))} for v in present],
    }
    group.attrs.update(attrs)
    return group
