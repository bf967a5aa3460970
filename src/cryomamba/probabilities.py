"""Probability maps: the per-label softmax streamed to OME-Zarr, and re-thresholding it.

`ProbabilityWriter` receives the engine's final mean logits slab by slab (`on_logits`),
takes their softmax in float32 and stores labels 1.. (background is 1 - their sum) as
float16 in ``probabilities.zarr``: axes (c, z, y, x), chunks one label x 16 planes x
256 x 256, so a slab is buffered once and every chunk written once. Cost: 2 bytes per voxel
per foreground label, uncompressed (docs/formats.md).

`threshold` makes a new mask from one label's map, ``p > at``, slab by slab. For a 2-class
model, ``at=0.5`` gives the engine's own mask bit for bit: the arg-max keeps background on
a tie, i.e. label 1 exactly where p > 0.5, and where float16 rounding would move p across
0.5 the writer stores the nearest float16 on the arg-max's side instead.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError, InvalidVolumeError
from .segmentation import Segmentation

__all__ = ["ProbabilityWriter", "open_probabilities", "threshold"]

_CHUNK_Z = 16
_CHUNK_YX = 256
_HALF = np.float16(0.5)
_ABOVE_HALF = np.nextafter(_HALF, np.float16(1))


class ProbabilityWriter:
    """Stream foreground-label probabilities of a (Z, Y, X) volume into an OME-Zarr group.

    `bbox` is the engine's crop, ((z0, z1), (y0, y1), (x0, x1)); outside it every voxel is
    background (probability 0 for every label), which the array's fill value already says.
    """

    def __init__(
        self,
        location: str | os.PathLike[str] | MutableMapping[str, Any],
        shape: Sequence[int],
        n_classes: int,
        *,
        voxel_size: Sequence[float],
        origin: Sequence[float] = (0.0, 0.0, 0.0),
        label_names: Mapping[int, str] | None = None,
        bbox: Sequence[tuple[int, int]] | None = None,
    ) -> None:
        import numcodecs

        from .zarr_write import create_group, multiscales_metadata

        if n_classes < 2:
            raise ConfigError("probability maps need a model with at least 2 labels")
        self.shape = tuple(int(n) for n in shape)
        self.n_classes = n_classes
        self.bbox = tuple(bbox) if bbox is not None else tuple((0, n) for n in self.shape)
        group = create_group(location)
        _, ny, nx = self.shape
        self.array = group.create_dataset(
            "0",
            shape=(n_classes - 1, *self.shape),
            chunks=(1, min(_CHUNK_Z, self.shape[0]), min(_CHUNK_YX, ny), min(_CHUNK_YX, nx)),
            dtype=np.float16,
            compressor=numcodecs.Blosc(cname="zstd", clevel=3, shuffle=numcodecs.Blosc.SHUFFLE),
            fill_value=0,
            dimension_separator="/",
        )
        attrs = multiscales_metadata(1, voxel_size, origin, "probabilities", channel_axis=True)
        names = dict(label_names or {})
        attrs["cryomamba"] = {
            "kind": "probabilities",
            "labels": [
                {"channel": k - 1, "label-value": k, "name": names.get(k, str(k))}
                for k in range(1, n_classes)
            ],
            "rule": "label where p > threshold; background is 1 - sum(p)",
        }
        group.attrs.update(attrs)
        self._chunk_z = self.array.chunks[1]
        self._buf = np.zeros((n_classes - 1, self._chunk_z, ny, nx), dtype=np.float16)
        self._block: int | None = None  # z-chunk index the buffer holds

    def __call__(self, z0: int, logits: Any) -> None:
        """Planes z0.. of the cropped region: mean logits (C, n, y, x), a torch tensor."""
        import torch

        probs = torch.softmax(logits.float(), dim=0)
        fg = probs[1:].cpu().numpy().astype(np.float16)
        if self.n_classes == 2:  # keep p > 0.5 exactly where the arg-max says label 1
            winner = logits.argmax(0).cpu().numpy() == 1
            p = fg[0]
            p[winner & (p <= _HALF)] = _ABOVE_HALF
            p[~winner & (p > _HALF)] = _HALF
        (bz, _), (by0, by1), (bx0, bx1) = self.bbox
        for i in range(fg.shape[1]):
            z = bz + z0 + i
            block = z // self._chunk_z
            if block != self._block:
                self.flush()
                self._block = block
            self._buf[:, z - block * self._chunk_z, by0:by1, bx0:bx1] = fg[:, i]

    def flush(self) -> None:
        """Write the buffered z-chunk (if any) and clear the buffer."""
        if self._block is None:
            return
        a = self._block * self._chunk_z
        b = min(a + self._chunk_z, self.shape[0])
        self.array[:, a:b] = self._buf[:, : b - a]
        self._buf[:] = 0
        self._block = None

    close = flush


def open_probabilities(
    location: str | os.PathLike[str],
) -> tuple[Any, dict[str, Any], tuple[float, float, float], tuple[float, float, float]]:
    """The (labels, Z, Y, X) float16 array of a ``probabilities.zarr``, its label table,
    voxel size and origin (z, y, x, Å); a clear error for anything else."""
    from .volume_zarr import _import_zarr

    zarr = _import_zarr()
    where = os.fspath(location)
    if not Path(where).exists():
        raise InvalidVolumeError(f"{where} does not exist", hint="check the path")
    try:
        group = zarr.open_group(where, mode="r")
        info = dict(group.attrs["cryomamba"])
        ms = group.attrs["multiscales"][0]
    except Exception:
        raise InvalidVolumeError(
            f"{where} is not a cryomamba probability map",
            hint="threshold the probabilities.zarr that `--formats ...,probabilities` wrote",
        ) from None
    if info.get("kind") != "probabilities":
        raise InvalidVolumeError(f"{where} is not a probability map (kind {info.get('kind')!r})")
    scale, shift = ms["datasets"][0]["coordinateTransformations"]
    vs = tuple(float(v) for v in scale["scale"][1:])
    org = tuple(float(v) for v in shift["translation"][1:])
    return group["0"], info, (vs[0], vs[1], vs[2]), (org[0], org[1], org[2])


def threshold(
    probabilities: str | os.PathLike[str],
    *,
    label: int | str | None = None,
    at: float = 0.5,
    slab: int = _CHUNK_Z,
) -> Segmentation:
    """A new mask from one label's probability map: `label` where p > `at`, else 0.

    `label` is a label value or name (optional when the map has one label). The mask is a
    uint8 memmap filled `slab` planes at a time, so memory stays bounded; save it with
    `.save(folder, formats)` and read `.stats` like any `Segmentation`.
    """
    from .engine.output import temporary_labels

    if isinstance(at, bool) or not isinstance(at, (int, float)) or not 0.0 <= at < 1.0:
        raise ConfigError(
            f"threshold must be a number in [0, 1), got {at!r}",
            hint="0.5 is the arg-max of a 2-label model; lower keeps more voxels",
        )
    array, info, vs, org = open_probabilities(probabilities)
    table = {int(e["label-value"]): e for e in info["labels"]}
    by_name = {str(e["name"]): int(e["label-value"]) for e in info["labels"]}
    if label is None:
        if len(table) != 1:
            raise ConfigError(
                f"the map holds {len(table)} labels; choose one",
                hint=f"--label one of: {', '.join(by_name)}",
            )
        value = next(iter(table))
    elif isinstance(label, str) and not label.isdigit():
        if label not in by_name:
            raise ConfigError(f"no label named {label!r}", hint=f"labels: {', '.join(by_name)}")
        value = by_name[label]
    else:
        value = int(label)
        if value not in table:
            raise ConfigError(f"no label {value}", hint=f"labels: {', '.join(map(str, table))}")
    channel = int(table[value]["channel"])
    shape = tuple(int(n) for n in array.shape[1:])
    mask = temporary_labels(shape)
    cut = np.float16(at) if math.isfinite(at) else _HALF
    for z0 in range(0, shape[0], slab):
        block = np.asarray(array[channel, z0 : z0 + slab])
        mask[z0 : z0 + block.shape[0]] = np.where(block > cut, value, 0).astype(np.uint8)
    return Segmentation(
        labels=mask,
        voxel_size=vs,
        origin=org,
        label_names={value: str(table[value]["name"])},
        provenance={"threshold": {"source": os.fspath(probabilities), "label": value, "at": at}},
    )
