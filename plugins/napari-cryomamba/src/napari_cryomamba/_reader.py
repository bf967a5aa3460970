"""The npe2 reader: MRC tomograms as lazy, memory-mapped image layers in Å.

`get_reader(path)` claims `.mrc .map .rec .mrcs` (any case) and returns `read`, which opens
each file with `cryomamba.Volume.open`: the header is checked against the file size before
anything is mapped, and the layer's data is the memory-mapped array itself, so opening a
10 GB tomogram reads a few sampled planes (for the contrast limits), never the whole file.

OME-Zarr (``*.zarr`` folders) opens too, as a lazy multiscale layer (a ``labels`` layer for
an NGFF ``image-label`` group such as our ``mask.zarr``), in Å like the MRC layers. We read it
ourselves rather than defer to napari-ome-zarr: that plugin is not a dependency, it scales
layers in the file's unit (nm data would not overlay Å MRC layers), and it would not give
CryoMamba's refusals. Where both are installed napari asks which reader to use.

A file CryoMamba refuses (truncated, a single 2D image, not MRC at all...) shows one napari
error notification with the reason and the hint, and opens nothing: `read` returns napari's
"nothing to open" sentinel `[(None,)]` rather than raising, because napari reports a reader
exception as "Reader ... was selected to open ..., but returned no data" with a traceback,
which hides the useful message.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["EXTENSIONS", "contrast_limits", "get_reader", "read"]

log = logging.getLogger(__name__)

EXTENSIONS = (".mrc", ".map", ".rec", ".mrcs", ".zarr")
LayerData = tuple[Any, ...]

_SAMPLE_PLANES = 9  # z-planes read for the contrast limits
_SAMPLE_SIDE = 256  # at most this many rows and columns taken from each of them


def get_reader(path: str | Sequence[str]) -> Callable[[Any], list[LayerData]] | None:
    """`read` when every path ends in an MRC extension (any case), else None."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if paths and all(os.fspath(p).lower().rstrip("/").endswith(EXTENSIONS) for p in paths):
        return read
    return None


def read(path: str | Sequence[str]) -> list[LayerData]:
    """One image layer per readable path; refused files are reported, not raised."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    layers = [layer for p in paths if (layer := _read_one(Path(p))) is not None]
    return layers or [(None,)]  # napari's sentinel for "nothing to open here"


def _read_one(path: Path) -> LayerData | None:
    from cryomamba import CryoMambaError, Volume

    try:
        volume = Volume.open(path)
    except CryoMambaError as exc:  # refused, or zarr not installed for a .zarr
        _notify_error(f"{exc.message} — {exc.hint}" if exc.hint else exc.message)
        return None
    except OSError as exc:  # missing, unreadable, a directory...
        _notify_error(f"{path} cannot be read: {exc.strerror or exc}")
        return None
    if hasattr(volume, "levels"):  # OME-Zarr
        return _read_zarr(path, volume)
    data = volume.data
    if not data.dtype.isnative:  # big-endian file: swap lazily, per plane, for vispy
        import dask.array as da

        data = da.from_array(data, chunks=(1, *data.shape[1:])).astype(volume.dtype)
    metadata = {
        **volume.describe(),
        "path": str(path),
        "voxel_size_known": volume.voxel_size_known,
        "voxel_size_unit": "Å",
    }
    meta = {
        "name": path.stem,
        "scale": tuple(volume.voxel_size),
        "translate": tuple(volume.origin),
        "metadata": metadata,
        "contrast_limits": contrast_limits(volume.data),
    }
    return (data, meta, "image")


def _read_zarr(path: Path, volume: Any) -> LayerData:
    """Every pyramid level as a lazy zarr array; labels for an ``image-label`` group."""
    import zarr

    group = zarr.open_group(os.fspath(path), mode="r")
    attrs = group.attrs.asdict()
    datasets = (attrs.get("multiscales") or attrs["ome"]["multiscales"])[0]["datasets"]
    levels = [group[d["path"]] for d in datasets]
    lead = levels[0].ndim - 3  # channel/time axes of length 1 (checked by Volume.open)
    if lead:
        import dask.array as da

        levels = [da.from_zarr(a)[(0,) * lead] for a in levels]
    is_labels = "image-label" in attrs
    meta: dict[str, Any] = {
        "name": path.name.removesuffix(".zarr"),
        "scale": tuple(volume.voxel_size),
        "translate": tuple(volume.origin),
        "metadata": {**volume.describe(), "voxel_size_unit": "Å"},
        "multiscale": len(levels) > 1,
    }
    if not is_labels:
        meta["contrast_limits"] = contrast_limits(volume.data)
    data = levels if len(levels) > 1 else levels[0]
    return (data, meta, "labels" if is_labels else "image")


def contrast_limits(data: Any) -> tuple[float, float]:
    """The 0.5 and 99.5 percentiles (values that occur) of a sample of a (Z, Y, X) array.

    Reads at most `_SAMPLE_PLANES` evenly spaced z-planes, and of each at most about
    `_SAMPLE_SIDE`² voxels on a regular grid, so the cost does not grow with the volume.
    NaNs are ignored. When the percentiles coincide (sparse labels) the sample's min and
    max are used; a constant or empty sample gives a range one unit wide.
    """
    nz, ny, nx = data.shape
    planes = np.unique(np.linspace(0, nz - 1, min(nz, _SAMPLE_PLANES)).round().astype(int))
    sy, sx = max(1, ny // _SAMPLE_SIDE), max(1, nx // _SAMPLE_SIDE)
    sample = np.concatenate(
        [np.asarray(data[int(z), ::sy, ::sx], dtype=np.float64).ravel() for z in planes]
    )
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return (0.0, 1.0)
    lo, hi = (float(v) for v in np.percentile(sample, [0.5, 99.5], method="nearest"))
    if hi <= lo:
        lo, hi = float(sample.min()), float(sample.max())
    if hi <= lo:
        hi = lo + 1.0
    return (lo, hi)


def _notify_error(text: str) -> None:
    from napari.utils.notifications import show_error

    log.info("refused: %s", text)
    show_error(text)
