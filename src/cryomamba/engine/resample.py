"""Streaming resampling between the tomogram's grid and the model's spacing (DESIGN §9).

nnU-Net resamples the whole cropped, normalized image to the plans' spacing, predicts, then
resamples the whole logit volume back and takes the arg-max: two full float copies of the
volume (and more for every class). We keep its semantics but never hold more than a slab:

- `ResamplePlan` decides the shapes exactly as nnU-Net does (`compute_new_shape`: each axis
  `round(n · source / model)`) and which axis, if any, is resampled on its own with nearest
  neighbours (`determine_do_sep_z_and_axis`, anisotropy threshold 3), per direction.
- Interpolation is separable: per axis, each output sample is a linear blend of two input
  samples at `(i + ½) · n_in / n_out − ½`, clamped at the edges (`align_corners=False`, edge
  mode: skimage's `resize(order=1, mode="edge")` and torch's `interpolate` use the same map).
  So a model-space plane is a blend of two in-plane-resampled source planes, and a source
  plane a blend of two in-plane-resampled model planes: z is streamed, y and x are not.
- `ResampledInput` keeps a rolling window of normalized model-space input planes, one patch
  deep, computed on the job's device as the tiles need them.
- `LogitsToSource` takes finished model-space logit planes, resamples them to the source
  grid, arg-maxes, and writes source planes as soon as both model planes they need are done.

nnU-Net interpolates the *input* with cubic splines (order 3, `skimage.transform.resize`);
we use linear interpolation for both directions (what nnU-Net's own torch resampling,
`resample_torch_fornnunet`, does), so labels are close to nnU-Net's, not equal: see
docs/engine.md.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .finalize import argmax_first

__all__ = ["AxisMap", "LogitsToSource", "ResamplePlan", "ResampledInput"]

_TAP_CUTOFF = 1e-5  # spline weights below this share of a row's largest are dropped
_MATRIX_BLOCK = 128  # identity columns resampled at a time while building a map
_DENSE_LIMIT = 4 << 20  # in-plane maps up to this many entries (16 MiB) run as a matmul


@dataclass(frozen=True)
class AxisMap:
    """1D resampling of `n_in` samples to `n_out`, as a band of taps per output sample:
    out[i] = Σ_t w[i, t] · in[idx[i, t]].

    Built by resampling the identity with nnU-Net's own 1D operation, so edge handling and
    coordinates are nnU-Net's by construction: spline order `order` through
    `skimage.transform.resize(mode="edge", anti_aliasing=False)` (what nnU-Net's
    `resample_data_or_seg` calls, less its clipping, which `clip` below re-applies), or, for
    `nearest`, `scipy.ndimage.map_coordinates(order=0, mode="nearest")` at
    `(i + ½) · n_in / n_out − ½` (its separate-z path). 3D resampling is separable, so
    three maps reproduce it: checked in tests/test_resample.py.
    """

    n_in: int
    n_out: int
    idx: np.ndarray  # int64 (n_out, taps), clipped into [0, n_in)
    w: np.ndarray  # float32 (n_out, taps), 0 past a row's band
    nearest: bool = False
    _tensors: dict[tuple[str, str], torch.Tensor] = field(
        default_factory=dict, repr=False, compare=False
    )

    @classmethod
    def build(cls, n_in: int, n_out: int, *, order: int = 1, nearest: bool = False) -> AxisMap:
        if n_in == n_out:
            eye = np.arange(n_in, dtype=np.int64)[:, None]
            return cls(n_in, n_out, eye, np.ones((n_in, 1), np.float32), nearest)
        if nearest or order == 0:
            from scipy.ndimage import map_coordinates

            coord = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
            picked = map_coordinates(
                np.arange(n_in, dtype=np.float64), coord[None], order=0, mode="nearest"
            )
            idx = np.rint(picked).astype(np.int64)[:, None]
            return cls(n_in, n_out, idx, np.ones((n_out, 1), np.float32), True)
        rows, cols, values = _entries(n_in, n_out, order)
        peak = np.zeros(n_out)
        np.maximum.at(peak, rows, np.abs(values))
        keep = np.abs(values) > _TAP_CUTOFF * peak[rows]
        rows, cols, values = rows[keep], cols[keep], values[keep]
        first = np.full(n_out, n_in - 1, dtype=np.int64)
        last = np.zeros(n_out, dtype=np.int64)
        np.minimum.at(first, rows, cols)
        np.maximum.at(last, rows, cols)
        taps = int((last - first).max()) + 1
        idx = np.minimum(first[:, None] + np.arange(taps)[None], n_in - 1)
        w = np.zeros((n_out, taps), dtype=np.float32)
        w[rows, cols - first[rows]] = values
        return cls(n_in, n_out, idx.astype(np.int64), w)

    @property
    def identity(self) -> bool:
        return self.n_in == self.n_out

    @property
    def taps(self) -> int:
        return int(self.idx.shape[1])

    def first(self, i: int) -> int:
        """Lowest input index output `i` reads (bands never move backwards)."""
        return int(self.idx[i, 0])

    def last(self, i: int) -> int:
        """Highest input index output `i` reads with a non-zero weight."""
        nz = np.flatnonzero(self.w[i])
        return int(self.idx[i, nz[-1]]) if nz.size else int(self.idx[i, 0])

    def needed(self) -> np.ndarray:
        """Input indices that contribute to some output sample."""
        return np.unique(self.idx[self.w != 0])

    def dense(self) -> np.ndarray:
        """The map as an (n_out, n_in) float32 matrix."""
        m = np.zeros((self.n_out, self.n_in), dtype=np.float32)
        np.add.at(m, (np.arange(self.n_out)[:, None], self.idx), self.w)
        return m

    def _tensor(self, what: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """`idx`, `w` or the dense matrix on `device`, made once per device and dtype."""
        key = (what, f"{device}/{dtype}")
        t = self._tensors.get(key)
        if t is None:
            if what == "idx":
                t = torch.from_numpy(self.idx).to(device)
            else:
                values = self.dense() if what == "dense" else self.w
                t = torch.from_numpy(values).to(device=device, dtype=dtype)
            self._tensors[key] = t
        return t

    def apply(self, t: torch.Tensor, axis: int) -> torch.Tensor:
        """Resample `t` along `axis`, one of its last two (a new tensor unless the identity).

        As one matrix product where the dense matrix is small (one allocation, fast on any
        device); for very wide planes tap by tap into one buffer.
        """
        if self.identity:
            return t
        last = axis in (-1, t.ndim - 1)
        if self.nearest:
            return t.index_select(axis, self._tensor("idx", t.device, t.dtype)[:, 0])
        if self.n_in * self.n_out <= _DENSE_LIMIT:
            m = self._tensor("dense", t.device, t.dtype)
            return torch.matmul(t, m.T) if last else torch.matmul(m, t)
        idx, w = self._tensor("idx", t.device, t.dtype), self._tensor("w", t.device, t.dtype)
        shape = [1] * t.ndim
        shape[axis] = self.n_out
        out = t.index_select(axis, idx[:, 0])
        out.mul_(w[:, 0].reshape(shape))
        tap = torch.empty_like(out)
        for k in range(1, self.taps):
            torch.index_select(t, axis, idx[:, k], out=tap)
            out.addcmul_(tap, w[:, k].reshape(shape))
        return out

    def combine(self, i: int, planes: Callable[[int], torch.Tensor]) -> torch.Tensor:
        """Output sample `i` along the streamed axis, from the input planes it reads."""
        out: torch.Tensor | None = None
        for j, wt in zip(self.idx[i].tolist(), self.w[i].tolist(), strict=True):
            if wt == 0.0:
                continue
            if out is None:
                out = planes(j) * wt
            else:
                out.add_(planes(j), alpha=wt)
        assert out is not None, "every output sample reads at least one input"
        return out


def _entries(n_in: int, n_out: int, order: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The non-zero entries (row, column, value) of the (n_out, n_in) matrix of skimage's 1D
    `resize` with nnU-Net's settings (no clipping), built a block of columns at a time so a
    wide axis never needs the whole dense matrix."""
    from skimage.transform import resize

    rows, cols, values = [], [], []
    for a in range(0, n_in, _MATRIX_BLOCK):
        b = min(a + _MATRIX_BLOCK, n_in)
        eye = np.zeros((n_in, b - a), dtype=np.float64)
        eye[np.arange(a, b), np.arange(b - a)] = 1.0
        # along axis 1 the size does not change: the interpolating spline returns the samples
        block = resize(
            eye, (n_out, b - a), order=order, mode="edge", anti_aliasing=False, clip=False
        )
        r, c = np.nonzero(np.abs(block) > 1e-12)
        rows.append(r)
        cols.append(c + a)
        values.append(block[r, c])
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(values)


@dataclass(frozen=True)
class ResamplePlan:
    """Shapes and sample maps between a cropped region (working axis order) and model space."""

    source_shape: tuple[int, int, int]
    model_shape: tuple[int, int, int]
    source_spacing: tuple[float, float, float]
    model_spacing: tuple[float, float, float]
    to_model: tuple[AxisMap, AxisMap, AxisMap]
    to_source: tuple[AxisMap, AxisMap, AxisMap]
    clip: str | None = None  # "volume" / "plane": clip resampled input as skimage's resize does

    @classmethod
    def build(
        cls,
        shape: Sequence[int],
        source_spacing: Sequence[float],
        model_spacing: Sequence[float],
        configuration: Mapping[str, Any] | None = None,
    ) -> ResamplePlan:
        """Plan for a region of `shape`; spacings in the same (working) axis order.

        `configuration` is the plans' `3d_fullres` entry: its resampling kwargs
        (`force_separate_z`, `order`, `order_z`) are honoured as nnU-Net reads them.
        """
        from nnunetv2.preprocessing.resampling.default_resampling import (
            compute_new_shape,
            determine_do_sep_z_and_axis,
        )

        configuration = configuration or {}
        src = tuple(float(s) for s in source_spacing)
        dst = tuple(float(s) for s in model_spacing)
        shape = tuple(int(n) for n in shape)
        new = tuple(int(n) for n in compute_new_shape(shape, src, dst))
        new = tuple(max(n, 1) for n in new)

        def maps(
            key: str,
            n_in: Sequence[int],
            n_out: Sequence[int],
            cur: tuple[float, ...],
            tgt: tuple[float, ...],
        ) -> tuple[tuple[AxisMap, AxisMap, AxisMap], int | None, int]:
            kw = dict(configuration.get(key) or {})
            separate, axis = determine_do_sep_z_and_axis(kw.get("force_separate_z"), cur, tgt)
            order, order_z = int(kw.get("order", 1)), int(kw.get("order_z", 0))
            out = [
                AxisMap.build(n_in[i], n_out[i], order=order_z if separate and i == axis else order)
                for i in range(3)
            ]
            return (out[0], out[1], out[2]), (axis if separate else None), order

        to_model, axis, order = maps("resampling_fn_data_kwargs", shape, new, src, dst)
        to_source, _, _ = maps("resampling_fn_probabilities_kwargs", new, shape, dst, src)
        clip = None
        if order > 1:  # splines overshoot; skimage clips to the input's range (whole / per slice)
            clip = "plane" if axis == 0 else "volume"
        return cls(
            source_shape=shape,  # type: ignore[arg-type]
            model_shape=new,  # type: ignore[arg-type]
            source_spacing=src,  # type: ignore[arg-type]
            model_spacing=dst,  # type: ignore[arg-type]
            to_model=to_model,
            to_source=to_source,
            clip=clip,
        )

    @property
    def identity(self) -> bool:
        """Same shape on every axis: nnU-Net does not resample then, and neither do we."""
        return self.source_shape == self.model_shape

    def describe(self) -> str:
        nearest = [a for a, m in zip("zyx", self.to_model) if m.nearest and not m.identity]
        extra = f", nearest along {''.join(nearest)}" if nearest else ""
        return (
            f"{'×'.join(map(str, self.source_shape))} at {_fmt(self.source_spacing)} Å → "
            f"{'×'.join(map(str, self.model_shape))} at {_fmt(self.model_spacing)} Å{extra}"
        )


def _fmt(spacing: Sequence[float]) -> str:
    return "/".join(f"{s:g}" for s in spacing)


def _inplane(maps: tuple[AxisMap, AxisMap, AxisMap], t: torch.Tensor) -> torch.Tensor:
    """Resample the last two axes of `t` with maps[1] (y) and maps[2] (x)."""
    return maps[2].apply(maps[1].apply(t, t.ndim - 2), t.ndim - 1)


class ResampledInput:
    """Normalized model-space input planes in a rolling window, computed as tiles ask for them.

    `planes(a, b)` returns model planes a..b (clipped to the model shape) as a float32 tensor
    (b − a, Y, X) on `device`; successive calls must not go back in z. Source planes are read
    one at a time, normalized, resampled in-plane and kept only while a later model plane still
    needs them; `release(j0, j1)` is then called for the source planes (region z) left behind.
    """

    def __init__(
        self,
        region: np.ndarray,
        normalize: Callable[[np.ndarray], np.ndarray],
        plan: ResamplePlan,
        depth: int,
        device: torch.device,
        release: Callable[[int, int], None] | None = None,
        bounds: tuple[float, float] | None = None,
    ) -> None:
        self.bounds = bounds  # normalized min and max of the region, for plan.clip == "volume"
        self.region = region
        self.normalize = normalize
        self.plan = plan
        self.device = device
        self.release = release
        _, my, mx = plan.model_shape
        self.buffer = torch.zeros((depth, my, mx), dtype=torch.float32, device=device)
        self.lo = self.hi = 0  # model planes [lo, hi) are in buffer[0 : hi - lo]
        self._source: dict[int, torch.Tensor] = {}
        self._released = 0

    def planes(self, a: int, b: int) -> torch.Tensor:
        nz = self.plan.model_shape[0]
        a, b = max(a, 0), min(b, nz)
        if b <= a:
            return self.buffer[:0]
        if a < self.lo:
            raise ValueError(f"model planes are streamed forwards: asked for {a} after {self.lo}")
        if a >= self.hi:
            self.lo = self.hi = a
        elif a > self.lo:  # keep the overlap: move planes down one at a time (no full copy)
            shift = a - self.lo
            for i in range(self.hi - a):
                self.buffer[i] = self.buffer[i + shift]
            self.lo = a
        for k in range(self.hi, b):
            self.buffer[k - self.lo] = self._model_plane(k)
        self.hi = max(self.hi, b)
        self._forget(self.plan.to_model[0].first(min(self.hi, nz - 1)))
        return self.buffer[: b - a]

    def _model_plane(self, k: int) -> torch.Tensor:
        plane = self.plan.to_model[0].combine(k, self._source_plane)
        if self.plan.clip == "volume" and self.bounds is not None:
            plane.clamp_(*self.bounds)
        return plane

    def _source_plane(self, j: int) -> torch.Tensor:
        cached = self._source.get(j)
        if cached is None:
            block = np.array(self.region[j : j + 1], dtype=np.float32)
            t = torch.from_numpy(self.normalize(block)).to(self.device)
            cached = _inplane(self.plan.to_model, t)[0]
            if self.plan.clip == "plane":  # nnU-Net resizes each plane on its own, then clips
                cached.clamp_(t.min(), t.max())
            self._source[j] = cached
        return cached

    def _forget(self, keep_from: int) -> None:
        """Drop source planes below `keep_from` and hand their pages back."""
        for j in [j for j in self._source if j < keep_from]:
            del self._source[j]
        if self.release is not None and keep_from > self._released:
            self.release(self._released, keep_from)
            self._released = keep_from


class LogitsToSource:
    """Model-space logit planes in, arg-maxed source planes out, in increasing z.

    `push(k0, logits)` takes model planes k0.. (classes, n, Y, X) once final; every source
    plane whose two model planes have arrived is interpolated (in-plane, then along z),
    arg-maxed and written to `out` (the cropped source region, working axis order), and
    `on_planes(j0, j1)` is called with the region planes written.
    """

    def __init__(
        self,
        plan: ResamplePlan,
        out: np.ndarray,
        on_planes: Callable[[int, int], None] | None = None,
        on_logits: Callable[[int, torch.Tensor], None] | None = None,
    ) -> None:
        self.plan = plan
        self.out = out
        self.on_planes = on_planes
        self.on_logits = on_logits  # (j0, logits (C, n, Y, X)) before the arg-max, if given
        self._needed = set(plan.to_source[0].needed().tolist())
        self._model: dict[int, torch.Tensor] = {}
        self.received = 0  # model planes [0, received) have been pushed
        self.written = 0  # source planes [0, written) are final

    def push(self, k0: int, logits: torch.Tensor) -> None:
        if k0 != self.received:
            raise ValueError(
                f"model planes must arrive in order: got {k0}, expected {self.received}"
            )
        for i in range(logits.shape[1]):
            if k0 + i in self._needed:
                self._model[k0 + i] = _inplane(self.plan.to_source, logits[:, i].float())
        self.received = k0 + logits.shape[1]
        self._emit()

    def _emit(self) -> None:
        zmap = self.plan.to_source[0]
        nz = self.plan.source_shape[0]
        start = self.written
        labels: list[np.ndarray] = []
        planes: list[torch.Tensor] = []
        while self.written < nz and zmap.last(self.written) < self.received:
            plane = zmap.combine(self.written, self._model.__getitem__)
            labels.append(argmax_first(plane).cpu().numpy())
            if self.on_logits is not None:
                planes.append(plane)
            self.written += 1
            if len(labels) == 4:  # write in small blocks: bounded temporaries
                self._write(start, labels, planes)
                start, labels, planes = self.written, [], []
        if labels:
            self._write(start, labels, planes)
        if self.written < nz:
            keep = zmap.first(self.written)
            for k in [k for k in self._model if k < keep]:
                del self._model[k]
        else:
            self._model.clear()

    def _write(self, start: int, labels: list[np.ndarray], planes: list[torch.Tensor]) -> None:
        self.out[start : start + len(labels)] = np.stack(labels)
        if self.on_logits is not None:
            self.on_logits(start, torch.stack(planes, dim=1))
        if self.on_planes is not None:
            self.on_planes(start, start + len(labels))
