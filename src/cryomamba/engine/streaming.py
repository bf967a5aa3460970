"""The sliding-window loop with a rolling z-slab accumulator (DESIGN §4).

Tiles are walked in nnU-Net's order (z outermost). Weighted logits accumulate in a buffer
that spans one patch depth; when a z-row of tiles is done, the planes no later tile can
touch are divided, arg-maxed and written out, and the buffer rolls on. The arithmetic
(fp16 accumulators, the Gaussian scaled by 10, per-fold division, then the fold mean) is
nnU-Net's own, so the labels equal `nnUNetPredictor`'s bit for bit when the inputs match.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch.profiler import record_function

from ..allocator import give_back_freed_memory
from ..errors import CryoMambaError, InvalidVolumeError
from .batches import Prefetcher, RowBatch, auto_forward_batch, mirror_flips, row_batches, serial
from .cancel import Canceled
from .finalize import FINALIZE_PLANES, LogitsFn, finalize, mean_logits
from .model import TrainedModel
from .normalize import IntensityScan, make_normalizer, scan_intensities
from .resample import LogitsToSource, ResampledInput, ResamplePlan
from .tiling import TileGrid, cut_model_tile, cut_tile

__all__ = ["Canceled", "GpuOutOfMemory", "StreamingPredictor"]

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]
PlanesFn = Callable[[int, int], None]
ReleaseFn = Callable[[int, int], None]
Normalize = Callable[[np.ndarray], np.ndarray]
Network = Callable[[torch.Tensor], torch.Tensor]
TilesIn = Callable[[int, list[tuple[int, int]]], torch.Tensor]  # (z, [(y, x)]) → (n, 1, *patch)
Finish = Callable[[torch.Tensor, torch.Tensor, int, int], None]  # logits, weights, base, end


class GpuOutOfMemory(CryoMambaError):
    code = "gpu_oom"
    retryable = True


class StreamingPredictor:
    """Run a `TrainedModel` over a ZYX volume of any size with memory bounded by one tile slab."""

    def __init__(
        self,
        model: TrainedModel,
        *,
        tile_step: float = 0.5,
        mirroring: bool = False,
        tile_batch: int | Literal["auto"] = "auto",
        fp16: bool = True,
        prefetch: bool | None = None,
        compile: bool = False,
    ) -> None:
        """`tile_batch`: samples per network call (a tile, or one mirrored copy of it under
        TTA); "auto" sizes it from free memory (`batches.auto_forward_batch`). `prefetch`:
        cut the next batch on a background thread while the network runs (None: on a GPU).
        `compile`: the networks through `torch.compile` (opt-in, module `compiled`)."""
        self.model = model
        self.networks: Sequence[Network] = model.compiled_networks() if compile else model.networks
        self.tile_step = tile_step
        self.mirroring = mirroring and bool(model.mirror_axes)
        self.device = model.device
        self.autocast = fp16 and self.device.type == "cuda"
        self._on_logits: LogitsFn | None = None  # set by `predict` for one call
        self.flips = mirror_flips(model.mirror_axes) if self.mirroring else []
        if tile_batch == "auto":
            self.forward_batch = auto_forward_batch(model.configuration, self.device.type)
        else:
            self.forward_batch = int(tile_batch)
        # under TTA a tile is 1 + len(flips) samples, run in the same calls as far as they fit
        self.tiles_per_batch = max(1, self.forward_batch // (1 + len(self.flips)))
        self.prefetch = self.device.type == "cuda" if prefetch is None else prefetch

    def plan(self, shape: tuple[int, int, int]) -> TileGrid:
        """The tile grid for an uncropped volume of `shape` (an upper bound on the work)."""
        tf = self.model.transpose_forward
        return TileGrid.build(
            (shape[tf[0]], shape[tf[1]], shape[tf[2]]), self.model.patch_size, self.tile_step
        )

    @torch.inference_mode()
    def warm_up(self, shape: tuple[int, int, int]) -> float:
        """Each network once, on zeros, for every batch size a job on a volume of `shape` calls
        it with (a compiled network compiles here); returns the seconds it took."""
        start = time.perf_counter()
        samples = 1 + len(self.flips)
        sizes: set[int] = set()
        for batch in row_batches(self.plan(shape), self.tiles_per_batch):
            n = len(batch.tiles) * samples
            sizes.update(min(self.forward_batch, n - i) for i in range(0, n, self.forward_batch))
            if batch.last:
                break  # every row has the same batches
        for net in self.networks:
            for n in sorted(sizes):
                x = torch.zeros((n, 1, *self.model.patch_size), device=self.device)
                self._forward(net, x)
        return time.perf_counter() - start

    @torch.inference_mode()
    def predict(
        self,
        data: np.ndarray,
        *,
        out: np.ndarray | None = None,
        on_progress: ProgressFn | None = None,
        on_planes: PlanesFn | None = None,
        cancel: threading.Event | None = None,
        release: ReleaseFn | None = None,
        scan: IntensityScan | None = None,
        spacing: Sequence[float] | None = None,
        on_logits: LogitsFn | None = None,
    ) -> np.ndarray:
        """Segment `data` (Z, Y, X) into `out` (zero-filled uint8, same shape), returning `out`.

        Voxels outside the bounding box of non-zero input stay 0 (background), as in nnU-Net.

        `spacing` (z, y, x, the plans' units: Å) resamples to the model's spacing and back, as
        nnU-Net does (module `resample`): tiles are then predicted in model space and the
        labels are still on `data`'s grid. None (the default) predicts on `data`'s grid as is;
        so does a spacing whose resampled shape equals the region's on every axis.

        `on_progress(tiles_done, tiles_total)` after each tile batch; `on_planes(z0, z1)` when
        output planes z0..z1 (source coordinates) are final — they are finished in increasing
        z, so `z1` is how far the mask is done; `release(z0, z1)` when source planes are no
        longer needed. `cancel` is checked between tile batches. `on_logits(z0, logits)` gets
        the final mean logits (classes, n, Y, X) of planes z0.. of the cropped region (working
        axis order, source grid) just before their arg-max: probability maps are their softmax.
        """
        if data.ndim != 3:
            raise InvalidVolumeError(f"expected a 3D volume (Z, Y, X), got shape {data.shape}")
        if out is None:
            out = np.zeros(data.shape, dtype=np.uint8)
        elif out.shape != data.shape or out.dtype != np.uint8:
            raise ValueError(
                f"out must be uint8 of shape {data.shape}, got {out.dtype} {out.shape}"
            )
        if self.model.num_classes > 255:
            raise InvalidVolumeError("models with more than 255 labels are not supported")
        scan = scan or scan_intensities(data, release=release, cancel=cancel)
        normalize = make_normalizer(
            self.model.normalization,
            scan,
            self.model.intensity_properties,
            self.model.use_mask_for_norm,
        )
        tf = self.model.transpose_forward
        region = data[scan.bbox_slices].transpose(tf)
        out_region = out[scan.bbox_slices].transpose(tf)
        plan = self.resample_plan(region.shape, spacing)
        if plan is not None:
            log.info("resampling %s", plan.describe())
        grid = TileGrid.build(
            plan.model_shape if plan else region.shape, self.model.patch_size, self.tile_step
        )
        log.info(
            "tiling %s (cropped from %s) into %d tiles of %s, %d per z-row",
            grid.shape,
            data.shape,
            grid.n_tiles,
            grid.patch,
            grid.tiles_per_row,
        )
        zmap = _ZMap(tf, scan.bbox[0][0])
        finished = [0]

        def planes_done(z0: int, z1: int) -> None:
            finished[0] = z1
            if on_planes is not None:
                on_planes(z0, z1)

        self._on_logits = on_logits
        try:
            if plan is None:
                tiles_in, finish = self._plain_io(
                    region, out_region, grid, normalize, release, zmap, planes_done
                )
            else:
                # the normalized region's range: cubic splines overshoot, nnU-Net clips to it
                ends = normalize(np.array([[[scan.minimum, scan.maximum]]], dtype=np.float32))
                bounds = (float(ends[0, 0, 0]), float(ends[0, 0, 1]))
                tiles_in, finish = self._resampled_io(
                    region, out_region, grid, plan, normalize, release, zmap, planes_done, bounds
                )
            self._run(grid, tiles_in, finish, on_progress, cancel)
        except torch.cuda.OutOfMemoryError as exc:
            raise GpuOutOfMemory(
                f"the GPU ran out of memory: {str(exc).splitlines()[0]}",
                hint="lower tile_batch to 1, turn mirroring (TTA) off, close other GPU jobs, or "
                "run on a GPU with more memory; the CPU (device cpu) always works, slowly",
            ) from None
        finally:
            self._on_logits = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            give_back_freed_memory()  # what the network's activations left free on the heap
        if on_planes is not None and finished[0] < data.shape[0]:
            # planes past the non-zero box (or all of them, when z was transposed) are final now
            on_planes(0 if zmap.transposed_z else finished[0], data.shape[0])
        return out

    def resample_plan(
        self, shape: Sequence[int], spacing: Sequence[float] | None
    ) -> ResamplePlan | None:
        """How a region of `shape` (working axis order) at `spacing` (z, y, x) maps to model
        space, or None when nothing is to be resampled (no spacing, or the same shape)."""
        if spacing is None:
            return None
        tf = self.model.transpose_forward
        plan = ResamplePlan.build(
            shape, [float(spacing[i]) for i in tf], self.model.spacing, self.model.configuration
        )
        return None if plan.identity else plan

    # -- where tiles come from and where finished planes go ------------------------------------
    def _plain_io(
        self,
        region: np.ndarray,
        out_region: np.ndarray,
        grid: TileGrid,
        normalize: Normalize,
        release: ReleaseFn | None,
        zmap: _ZMap,
        on_planes: PlanesFn,
    ) -> tuple[TilesIn, Finish]:
        """Tiles cut from the source as is; finished planes arg-maxed straight into the output."""
        device = self.device
        pz = grid.patch[0]
        bz = grid.pad_below[0]
        n_folds = len(self.model.networks)

        def tiles_in(z: int, batch: list[tuple[int, int]]) -> torch.Tensor:
            x = np.stack([cut_tile(region, grid, z, y, xx, normalize) for y, xx in batch])
            if release is not None and not zmap.transposed_z:
                # drop the source pages these tiles mapped; the next tiles that need them
                # fault them back in from the page cache, which costs microseconds
                release(*zmap.source_span(z - bz, z + pz - bz, grid.shape[0]))
            xt = torch.from_numpy(x)
            if device.type == "cuda":
                with record_function("cryomamba::to_device"):
                    xt = xt.pin_memory().to(device, non_blocking=True)
            return xt

        def finish(logits: torch.Tensor, weights: torch.Tensor, base: int, end: int) -> None:
            finalize(logits, weights, base, end, grid, out_region, n_folds, self._on_logits)
            if not zmap.transposed_z:
                lo, hi = zmap.source_span(base - bz, end - bz, grid.shape[0])
                if hi > lo:
                    on_planes(lo, hi)

        return tiles_in, finish

    def _resampled_io(
        self,
        region: np.ndarray,
        out_region: np.ndarray,
        grid: TileGrid,
        plan: ResamplePlan,
        normalize: Normalize,
        release: ReleaseFn | None,
        zmap: _ZMap,
        on_planes: PlanesFn,
        bounds: tuple[float, float],
    ) -> tuple[TilesIn, Finish]:
        """Tiles cut from a rolling window of model-space input planes; finished model planes
        resampled back to the source grid before the arg-max (module `resample`)."""
        pz = grid.patch[0]
        (bz, by, bx), (sz, sy, sx) = grid.pad_below, grid.shape
        n_folds = len(self.model.networks)
        source_release: ReleaseFn | None = None
        if release is not None and not zmap.transposed_z:
            give_back = release

            def source_release(j0: int, j1: int) -> None:
                give_back(*zmap.source_span(j0, j1, plan.source_shape[0]))

        window = ResampledInput(region, normalize, plan, pz, self.device, source_release, bounds)

        def region_planes(j0: int, j1: int) -> None:
            if not zmap.transposed_z:
                on_planes(*zmap.source_span(j0, j1, plan.source_shape[0]))

        to_source = LogitsToSource(plan, out_region, region_planes, self._on_logits)

        def tiles_in(z: int, batch: list[tuple[int, int]]) -> torch.Tensor:
            planes = window.planes(z - bz, z - bz + pz)
            first = max(z - bz, 0)
            return torch.stack([cut_model_tile(planes, first, grid, z, y, xx) for y, xx in batch])

        def finish(logits: torch.Tensor, weights: torch.Tensor, base: int, end: int) -> None:
            lo, hi = max(base, bz), min(end, bz + sz)
            for a in range(lo, hi, FINALIZE_PLANES):  # in small blocks: bounded temporaries
                b = min(a + FINALIZE_PLANES, hi)
                mean = mean_logits(logits, weights, a - base, b - base, n_folds)
                to_source.push(a - bz, mean[:, :, by : by + sy, bx : bx + sx])

        return tiles_in, finish

    # -- the loop -------------------------------------------------------------------------------
    def _run(
        self,
        grid: TileGrid,
        tiles_in: TilesIn,
        finish: Finish,
        on_progress: ProgressFn | None,
        cancel: threading.Event | None,
    ) -> None:
        from nnunetv2.inference.sliding_window_prediction import compute_gaussian

        device = self.device
        pz, py, px = grid.patch
        _, Py, Px = grid.padded
        n_folds = len(self.model.networks)
        n_classes = self.model.num_classes
        gaussian = compute_gaussian(
            grid.patch, sigma_scale=1.0 / 8, value_scaling_factor=10, device=device
        )
        logits = torch.zeros((n_folds, n_classes, pz, Py, Px), dtype=torch.half, device=device)
        weights = torch.zeros((pz, Py, Px), dtype=torch.half, device=device)
        base = 0  # padded z of logits[:, :, 0]
        done = 0
        total = grid.n_tiles
        rows = len(grid.steps[0])

        def prepare(batch: RowBatch) -> torch.Tensor:
            with record_function("cryomamba::cut_normalize"):
                return tiles_in(batch.z, batch.tiles)

        batches = row_batches(grid, self.tiles_per_batch)
        with self._producer(batches, prepare) as prepared:
            for batch, xt in prepared:
                if cancel is not None and cancel.is_set():
                    raise Canceled
                z = batch.z
                for f, net in enumerate(self.networks):
                    pred = self._predict(net, xt)
                    with record_function("cryomamba::accumulate"):
                        for i, (y, xx) in enumerate(batch.tiles):
                            p = pred[i].to(device)
                            p *= gaussian
                            logits[f, :, z - base : z - base + pz, y : y + py, xx : xx + px] += p
                with record_function("cryomamba::accumulate"):
                    for y, xx in batch.tiles:
                        weights[z - base : z - base + pz, y : y + py, xx : xx + px] += gaussian
                done += len(batch.tiles)
                if on_progress is not None:
                    on_progress(done, total)
                if not batch.last:
                    continue
                end = grid.final_plane(batch.row)
                with record_function("cryomamba::finalize"):
                    finish(logits, weights, base, end)
                shift = end - base
                if batch.row + 1 < rows:
                    with record_function("cryomamba::roll"):
                        # roll plane by plane: no temporary copy of the whole buffer
                        for i in range(pz - shift):
                            logits[:, :, i] = logits[:, :, i + shift]
                            weights[i] = weights[i + shift]
                        logits[:, :, pz - shift :] = 0
                        weights[pz - shift :] = 0
                    base = end

    def _producer(
        self, batches: Iterator[RowBatch], prepare: Callable[[RowBatch], torch.Tensor]
    ) -> contextlib.AbstractContextManager[Iterator[tuple[RowBatch, torch.Tensor]]]:
        """Batches with their input tensors: cut on a background thread (one batch ahead) when
        `prefetch` is on, else on this thread as they are needed."""
        if self.prefetch:
            return Prefetcher(batches, prepare, depth=1, wrap=torch.inference_mode)
        return contextlib.nullcontext(serial(batches, prepare))

    def _predict(self, net: Network, x: torch.Tensor) -> torch.Tensor:
        """nnU-Net's `_internal_maybe_mirror_and_predict`: the same flips, summed in the same
        order, but every mirrored copy of the batch goes through the network in one call
        (`forward_batch` samples at most)."""
        if not self.flips:
            return self._forward(net, x)
        n = x.shape[0]
        with record_function("cryomamba::cut_normalize"):
            variants = torch.cat([x, *(torch.flip(x, flip) for flip in self.flips)])
        outputs = self._forward(net, variants)
        with record_function("cryomamba::accumulate"):
            prediction = outputs[:n]
            for i, flip in enumerate(self.flips, start=1):
                prediction += torch.flip(outputs[i * n : (i + 1) * n], flip)
            prediction /= len(self.flips) + 1
        return prediction

    def _forward(self, net: Network, x: torch.Tensor) -> torch.Tensor:
        """The network on `x`, in calls of at most `forward_batch` samples."""
        with record_function("cryomamba::network"), _autocast(self.device, self.autocast):
            if x.shape[0] <= self.forward_batch:
                out: torch.Tensor = net(x)
            else:
                out = torch.cat([net(part) for part in torch.split(x, self.forward_batch)])
        return out


class _ZMap:
    """Maps z in the (cropped, transposed) working array back to source z planes."""

    def __init__(self, transpose: tuple[int, ...], z_offset: int) -> None:
        self.transposed_z = transpose[0] != 0
        self.z_offset = z_offset

    def source_span(self, a: int, b: int, size: int) -> tuple[int, int]:
        a, b = max(a, 0), min(b, size)
        return a + self.z_offset, b + self.z_offset


class _autocast:
    """fp16 autocast on CUDA, a no-op elsewhere (CPU autocast is slow and changes results)."""

    def __init__(self, device: torch.device, enabled: bool) -> None:
        self._ctx = torch.autocast(device.type, enabled=True) if enabled else None

    def __enter__(self) -> None:
        if self._ctx is not None:
            self._ctx.__enter__()  # type: ignore[no-untyped-call]  # torch leaves it untyped

    def __exit__(self, *exc: Any) -> bool:
        return bool(self._ctx.__exit__(*exc)) if self._ctx is not None else False


def eta(start: float, done: int, total: int) -> float | None:
    """Seconds left, from the mean time per tile so far (None before the first tile)."""
    if done <= 0:
        return None
    return (time.monotonic() - start) / done * (total - done)
