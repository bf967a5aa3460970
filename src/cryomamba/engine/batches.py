"""Tile batches: how many samples one network call takes, the batches of each z-row in order,
and a bounded producer thread that cuts the next batch while the network runs on this one.

Batching changes only how tiles are grouped into network calls, never their order of
accumulation, so labels stay nnU-Net's (up to float rounding inside the convolutions).
"""

from __future__ import annotations

import math
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from .tiling import TileGrid

__all__ = [
    "AUTO_MAX",
    "Prefetcher",
    "RowBatch",
    "auto_forward_batch",
    "forward_bytes",
    "memory_budget",
    "row_batches",
]

_T = TypeVar("_T")
_R = TypeVar("_R")

# Most samples `auto` puts into one network call. On CPU, 2 already moves every 3D convolution
# onto oneDNN (batch 1 sends small ones to PyTorch's slow im2col path) and 4 gained little more
# (docs/engine.md); on a GPU larger batches keep the device busy.
AUTO_MAX = {"cpu": 4, "cuda": 16}
# Peak forward memory of one sample, in units of (float32 bytes × feature maps × voxels),
# measured at 5.0 for PlainConvUNets on CPU (tests/test_engine_batches.py): 6 leaves headroom.
_ACTIVATION_FACTOR = 6.0


@dataclass(frozen=True)
class RowBatch:
    """Tiles of one z-row given to the network together; `last` ends the row."""

    row: int
    z: int
    tiles: list[tuple[int, int]]
    last: bool


def row_batches(grid: TileGrid, tiles_per_batch: int) -> Iterator[RowBatch]:
    """Every tile in nnU-Net's order, `tiles_per_batch` at a time, never across z-rows."""
    tiles = grid.row_tiles()
    n = max(1, tiles_per_batch)
    for row, z in enumerate(grid.steps[0]):
        for i in range(0, len(tiles), n):
            yield RowBatch(row, z, tiles[i : i + n], i + n >= len(tiles))


def forward_bytes(configuration: dict[str, Any]) -> int:
    """An upper estimate of one sample's peak memory in a forward pass of the plans' network.

    Sum over stages of the feature maps (features × voxels at that stage's resolution, as
    skips are held until the decoder uses them), times a factor for the temporaries around
    each convolution (measured on CPU, see `_ACTIVATION_FACTOR`).
    """
    patch = [int(p) for p in configuration["patch_size"]]
    arch = configuration["architecture"]["arch_kwargs"]
    features = [int(f) for f in arch["features_per_stage"]]
    strides = arch.get("strides") or [[1, 1, 1]] * len(features)
    size = list(patch)
    total = 0
    for f, stride in zip(features, strides, strict=False):
        s = [stride] * 3 if isinstance(stride, int) else list(stride)
        size = [math.ceil(a / b) for a, b in zip(size, s, strict=True)]
        total += f * math.prod(size)
    return int(4 * total * _ACTIVATION_FACTOR)


def memory_budget(device_type: str) -> int:
    """Bytes `auto` may spend on activations: half the GPU's free memory; on a CPU a quarter of
    the available RAM, at most 2 GiB (the rest is the accumulator's, the page cache's, others')."""
    if device_type == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info()
        return int(free // 2)
    available = _available_ram()
    return int(min(available // 4, 2 << 30))


def auto_forward_batch(
    configuration: dict[str, Any], device_type: str, budget: int | None = None
) -> int:
    """Samples per network call for `tile_batch="auto"`: as many as fit `budget` (default
    `memory_budget(device_type)`), at least 1, at most `AUTO_MAX` for the device type."""
    limit = AUTO_MAX.get(device_type, 1)
    room = memory_budget(device_type) if budget is None else budget
    return max(1, min(limit, room // max(forward_bytes(configuration), 1)))


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    pages = os.sysconf("SC_AVPHYS_PAGES") if hasattr(os, "sysconf") else 0
    return int(pages * os.sysconf("SC_PAGE_SIZE")) if pages else 2 << 30


class Prefetcher(Generic[_T, _R]):
    """`prepare(item)` for each item on a background thread, at most `depth` results ahead.

    Iterate inside ``with``: leaving the block (done, canceled, or an exception on either
    side) stops the thread and joins it, so it never outlives the job. An exception raised by
    `prepare` is re-raised in the consuming thread.
    """

    def __init__(
        self,
        items: Iterable[_T],
        prepare: Callable[[_T], _R],
        *,
        depth: int = 1,
        name: str = "cryomamba-prefetch",
        wrap: Callable[[], Any] | None = None,
    ) -> None:
        self._items = items
        self._prepare = prepare
        self._wrap = wrap
        self._queue: queue.Queue[tuple[str, Any, Any]] = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name=name, daemon=True)

    def __enter__(self) -> Iterator[tuple[_T, _R]]:
        self._thread.start()
        return self._consume()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:  # make room so a blocked put returns and sees the stop flag
                self._queue.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=0.05)

    def _put(self, entry: tuple[str, Any, Any]) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        ctx = self._wrap() if self._wrap is not None else None
        if ctx is not None:
            ctx.__enter__()
        try:
            for item in self._items:
                if self._stop.is_set():
                    return
                try:
                    result = self._prepare(item)
                except BaseException as exc:  # handed to the consumer, raised there
                    self._put(("error", exc, None))
                    return
                if not self._put(("item", item, result)):
                    return
            self._put(("end", None, None))
        finally:
            if ctx is not None:
                ctx.__exit__(None, None, None)

    def _consume(self) -> Iterator[tuple[_T, _R]]:
        while True:
            kind, item, result = self._queue.get()
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield item, result


def serial(items: Iterable[_T], prepare: Callable[[_T], _R]) -> Iterator[tuple[_T, _R]]:
    """The same pairs as `Prefetcher`, prepared on the calling thread."""
    for item in items:
        yield item, prepare(item)


def mirror_flips(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """nnU-Net's mirror combinations over spatial `axes` (tensor dims), in its order."""
    import itertools

    dims = [a + 2 for a in axes]
    return [c for i in range(len(dims)) for c in itertools.combinations(dims, i + 1)]
