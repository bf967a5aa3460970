"""Small previews of label maps: block-max downsampling and a JSON-ready encoding.

A preview is what the server streams over the WebSocket while inference is still running
(`Preview(scale, shape, labels)` in DESIGN §2): a uint8 label map of shape
``ceil(shape / scale)`` per axis, encoded as ``{"scale", "shape", "dtype", "data"}`` with
the raw C-order bytes in base64.

Downsampling uses the *maximum* of each ``scale³`` block, not plain striding
(``labels[::s, ::s, ::s]``): a membrane one or two voxels thick falls between the sampled
planes most of the time and would vanish from a strided preview, whereas a block maximum
keeps every structure that touches the block. Where labels meet inside a block the higher
label value wins, and background (0) never hides a foreground label. The volume is read in
z-blocks of ``scale`` planes, so a memory-mapped (or any lazily sliced) volume is never
loaded whole.
"""

from __future__ import annotations

import base64
import binascii
import logging
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import InvalidVolumeError

if TYPE_CHECKING:
    from .events import Preview

__all__ = [
    "MAX_SCALE",
    "PreviewBuilder",
    "decode_preview",
    "downsample_labels",
    "encode_preview",
]

logger = logging.getLogger(__name__)

MAX_SCALE = 8
"""Largest integer downsampling factor accepted by `downsample_labels`."""


def check_label_array(labels: Any) -> None:
    """Raise `InvalidVolumeError` unless `labels` is a 3-D (ZYX) array of integers or bools."""
    ndim = getattr(labels, "ndim", None)
    dtype = getattr(labels, "dtype", None)
    if ndim is None or dtype is None:
        raise InvalidVolumeError(
            f"labels must be an array, got {type(labels).__name__}",
            hint="pass a numpy array or memmap of integer labels",
        )
    if ndim != 3:
        raise InvalidVolumeError(
            f"labels must be 3-D (z, y, x), got {ndim}-D with shape {tuple(labels.shape)}",
            hint="pass one tomogram's label map, not a stack or a single slice",
        )
    if np.dtype(dtype).kind not in "biu":
        raise InvalidVolumeError(
            f"labels must hold integers, got dtype {np.dtype(dtype)}",
            hint="take the argmax of the probabilities and cast to uint8 first",
        )


def _check_scale(scale: Any) -> int:
    """Return `scale` as an int in 1..MAX_SCALE, or raise ValueError."""
    if isinstance(scale, bool) or not isinstance(scale, (int, np.integer)):
        raise ValueError(f"scale must be an integer in 1..{MAX_SCALE}, got {scale!r}")
    if not 1 <= scale <= MAX_SCALE:
        raise ValueError(f"scale must be an integer in 1..{MAX_SCALE}, got {scale}")
    return int(scale)


def downsample_labels(labels: np.ndarray, scale: int) -> np.ndarray:
    """Downsample a ZYX label map by an integer factor with a block maximum, as uint8.

    Reads ``scale`` z-planes at a time, so a memmap is never loaded whole. The ragged edge
    is padded with background, giving an output of shape ``ceil(shape / scale)``.
    """
    scale = _check_scale(scale)
    check_label_array(labels)
    nz, ny, nx = (int(n) for n in labels.shape)
    oy, ox = math.ceil(ny / scale), math.ceil(nx / scale)
    out = np.zeros((math.ceil(nz / scale), oy, ox), dtype=np.uint8)
    if out.size == 0:
        return out
    padded = np.zeros((scale, oy * scale, ox * scale), dtype=np.uint8)
    for bz, z0 in enumerate(range(0, nz, scale)):
        block = np.asarray(labels[z0 : z0 + scale])
        _check_uint8_range(block, z0)
        depth = block.shape[0]
        padded[:depth, :ny, :nx] = block
        padded[depth:] = 0  # a short last block must not see the previous block's planes
        out[bz] = padded.reshape(scale, oy, scale, ox, scale).max(axis=(0, 2, 4))
    return out


def _check_uint8_range(block: np.ndarray, z0: int) -> None:
    """Raise `InvalidVolumeError` if a block holds labels outside 0..255."""
    if block.dtype == np.uint8 or block.dtype == np.bool_ or block.size == 0:
        return
    lo, hi = block.min(), block.max()
    if lo < 0 or hi > 255:
        raise InvalidVolumeError(
            f"label values must be in 0..255 for a preview, found {lo}..{hi} "
            f"in planes starting at z={z0}",
            hint="labels are class indices; negative or >255 values mean a wrong array",
        )


def encode_preview(labels_small: np.ndarray, scale: int) -> dict[str, Any]:
    """Encode a downsampled uint8 label map as a JSON-ready dict for the WebSocket."""
    scale = _check_scale(scale)
    arr = np.asarray(labels_small)
    if arr.dtype != np.uint8:
        raise ValueError(f"preview labels must be uint8, got {arr.dtype}")
    return {
        "scale": scale,
        "shape": [int(n) for n in arr.shape],
        "dtype": "uint8",
        "data": base64.b64encode(np.ascontiguousarray(arr).tobytes()).decode("ascii"),
    }


def decode_preview(d: dict[str, Any]) -> tuple[int, np.ndarray]:
    """Decode and validate an `encode_preview` payload into ``(scale, uint8 array)``."""
    if not isinstance(d, dict):
        raise ValueError(f"preview payload must be a dict, got {type(d).__name__}")
    missing = [k for k in ("scale", "shape", "dtype", "data") if k not in d]
    if missing:
        raise ValueError(f"preview payload is missing {', '.join(missing)}")
    scale = _check_scale(d["scale"])
    if d["dtype"] != "uint8":
        raise ValueError(f"preview dtype must be 'uint8', got {d['dtype']!r}")
    shape = d["shape"]
    if (
        not isinstance(shape, (list, tuple))
        or not shape
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
    ):
        raise ValueError(f"preview shape must be a list of non-negative ints, got {shape!r}")
    if not isinstance(d["data"], str):
        raise ValueError("preview data must be a base64 string")
    try:
        raw = base64.b64decode(d["data"], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"preview data is not valid base64: {exc}") from exc
    expected = math.prod(shape)  # uint8: one byte per voxel
    if len(raw) != expected:
        raise ValueError(
            f"preview payload holds {len(raw)} bytes but shape {list(shape)} x uint8 "
            f"needs {expected}"
        )
    return scale, np.frombuffer(raw, dtype=np.uint8).reshape(shape).copy()


class PreviewBuilder:
    """A block-max downsampled copy of a label map being filled plane by plane, updated only
    where planes were finished since the last update (what an executor sends as `Preview`)."""

    def __init__(self, labels: np.ndarray[Any, Any], scale: int) -> None:
        self.labels = labels
        self.scale = scale
        self.small = np.zeros(tuple(math.ceil(s / scale) for s in labels.shape), dtype=np.uint8)
        self.blocks_done = 0
        self.planes_done = 0

    def update(self, planes_done: int) -> None:
        """Take in planes [0, planes_done) (only whole blocks of `scale` planes, or the end)."""
        nz = self.labels.shape[0]
        self.planes_done = max(self.planes_done, planes_done)
        full = nz if self.planes_done >= nz else self.planes_done // self.scale * self.scale
        blocks = math.ceil(full / self.scale)
        if blocks > self.blocks_done:
            z0 = self.blocks_done * self.scale
            self.small[self.blocks_done : blocks] = downsample_labels(
                self.labels[z0:full], self.scale
            )
            self.blocks_done = blocks

    def event(self) -> Preview:
        """The current preview as an event (a copy: later updates do not change it)."""
        from .events import Preview

        z, y, x = (int(s) for s in self.labels.shape)
        return Preview(
            scale=self.scale,
            shape=(z, y, x),
            labels=self.small.copy(),
            planes_done=self.planes_done,
        )
