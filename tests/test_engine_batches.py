"""Tile batches: the order of tiles, `tile_batch="auto"`'s memory budget, the producer thread."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from cryomamba.engine import StreamingPredictor, TrainedModel
from cryomamba.engine.batches import (
    AUTO_MAX,
    Prefetcher,
    auto_forward_batch,
    forward_bytes,
    row_batches,
)
from cryomamba.engine.cancel import Canceled
from cryomamba.engine.tiling import TileGrid


@pytest.mark.parametrize("n", [1, 3, 4, 100])
def test_batches_keep_nnunets_order_and_never_span_two_rows(n):
    grid = TileGrid.build((50, 40, 60), (16, 16, 16), 0.5)
    batches = list(row_batches(grid, n))
    flat = [(b.z, yx) for b in batches for yx in b.tiles]
    assert flat == [(z, yx) for z in grid.steps[0] for yx in grid.row_tiles()]
    assert all(0 < len(b.tiles) <= n for b in batches)
    for b in batches:
        assert b.z == grid.steps[0][b.row]
        assert b.last == (b is max((c for c in batches if c.row == b.row), key=batches.index))


def _peak_forward_bytes(net: torch.nn.Module, x: torch.Tensor) -> int:
    """Peak of live CPU allocations during one forward pass, from the profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    with (
        torch.inference_mode(),
        profile(activities=[ProfilerActivity.CPU], profile_memory=True) as p,
    ):
        net(x)
    events = sorted(
        (e for e in p.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start
    )
    live = peak = 0
    for e in events:
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("budget_tiles", [0.5, 1, 2.5, 3])
def test_auto_batch_never_exceeds_its_memory_budget(tiny_model, budget_tiles):
    model = TrainedModel.load(tiny_model)
    per_sample = forward_bytes(model.configuration)
    budget = int(budget_tiles * per_sample)
    n = auto_forward_batch(model.configuration, "cpu", budget)
    assert n == max(1, min(int(budget_tiles), AUTO_MAX["cpu"]))
    x = torch.zeros((n, 1, *model.patch_size))
    peak = _peak_forward_bytes(model.networks[0], x)
    assert peak > per_sample / 10, "the profiler must see the forward pass's allocations"
    assert peak <= max(budget, per_sample)  # one sample always runs, whatever the budget


def test_auto_batch_is_capped_per_device_type(tiny_model):
    model = TrainedModel.load(tiny_model)
    huge = 1 << 50
    assert auto_forward_batch(model.configuration, "cpu", huge) == AUTO_MAX["cpu"]
    assert auto_forward_batch(model.configuration, "cuda", huge) == AUTO_MAX["cuda"]
    assert auto_forward_batch(model.configuration, "cpu") >= 1  # from this machine's RAM


def _alive(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == name]


def test_producer_yields_every_item_in_order_and_stops():
    with Prefetcher(range(10), lambda i: i * i, name="t-order") as items:
        assert list(items) == [(i, i * i) for i in range(10)]
    assert not _alive("t-order")


def test_producer_stops_when_the_consumer_leaves_early():
    prepared = []

    def prepare(i: int) -> int:
        prepared.append(i)
        return i

    with pytest.raises(Canceled), Prefetcher(range(1000), prepare, name="t-early") as items:
        for i, _ in items:
            if i == 2:
                raise Canceled
    assert not _alive("t-early")
    assert len(prepared) <= 5  # bounded: at most the queue's depth ahead, not the whole list


def test_producer_errors_reach_the_consumer_and_end_the_thread():
    def prepare(i: int) -> int:
        if i == 3:
            raise OSError("disk gone")
        return i

    seen = []
    with (
        pytest.raises(OSError, match="disk gone"),
        Prefetcher(range(10), prepare, name="t-error") as items,
    ):
        seen.extend(i for i, _ in items)
    assert seen == [0, 1, 2]
    assert not _alive("t-error")


@pytest.mark.parametrize("tile_batch", [1, 3])
def test_prefetch_and_batches_give_the_same_labels(tiny_model, tile_batch):
    volume = np.random.default_rng(8).normal(size=(40, 36, 30)).astype(np.float32)
    model = TrainedModel.load(tiny_model)
    serial = StreamingPredictor(model, tile_batch=tile_batch, prefetch=False).predict(volume)
    threaded = StreamingPredictor(model, tile_batch=tile_batch, prefetch=True).predict(volume)
    np.testing.assert_array_equal(serial, threaded)
    assert not _alive("cryomamba-prefetch")


def test_a_failing_job_leaves_no_producer_thread(tiny_model):
    volume = np.random.default_rng(9).normal(size=(40, 40, 40)).astype(np.float32)
    predictor = StreamingPredictor(TrainedModel.load(tiny_model), tile_batch=1, prefetch=True)

    def on_progress(done: int, total: int) -> None:
        if done == 2:
            raise RuntimeError("sink broke")

    with pytest.raises(RuntimeError, match="sink broke"):
        predictor.predict(volume, on_progress=on_progress)
    assert not _alive("cryomamba-prefetch")


def test_tta_runs_every_mirror_of_a_batch_in_few_network_calls(tiny_model):
    model = TrainedModel.load(tiny_model)
    calls = []
    handle = model.networks[0].register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        predictor = StreamingPredictor(model, mirroring=True, tile_batch=4)
        volume = np.random.default_rng(1).normal(size=(16, 16, 16)).astype(np.float32)
        predictor.predict(volume)  # one tile
    finally:
        handle.remove()
    assert predictor.tiles_per_batch == 1 and len(predictor.flips) == 7
    assert calls == [4, 4]  # one tile, 8 mirrored copies, 4 per call
