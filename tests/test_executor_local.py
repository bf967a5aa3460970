"""The local executor passes the executor conformance suite, plus what is special to it."""

from __future__ import annotations

import pytest

from cryomamba import JobConfig, Volume
from cryomamba.events import Failed
from cryomamba.executors.local import LocalExecutor
from cryomamba.testing import ExecutorTests


class TestLocalExecutor(ExecutorTests):
    @pytest.fixture
    def executor(self):
        ex = LocalExecutor()
        yield ex
        ex.close()

    @pytest.fixture
    def model(self, tiny_model):
        return tiny_model

    @pytest.fixture
    def volume_source(self, mrc_file):
        return mrc_file


def test_model_is_loaded_once_for_many_volumes(tiny_model, noise_volume):
    ex = LocalExecutor()
    try:
        cfg = JobConfig(model=str(tiny_model))
        ex.submit(noise_volume, cfg).result(60)
        cached = list(ex._models._items.values())
        ex.submit(noise_volume[:20], cfg).result(60)
        assert list(ex._models._items.values()) == cached and len(cached) == 1
    finally:
        ex.close()


def test_arrays_and_volumes_are_accepted(tiny_model, noise_volume):
    ex = LocalExecutor()
    try:
        vol = Volume.from_array(noise_volume, voxel_size=(20.0, 10.0, 10.0), origin=(1.0, 2.0, 3.0))
        result = ex.submit(vol, JobConfig(model=str(tiny_model))).result(60)
        assert result.voxel_size == (20.0, 10.0, 10.0) and result.origin == (1.0, 2.0, 3.0)
        assert ex.submit(noise_volume, JobConfig(model=str(tiny_model))).result(60).shape == (
            noise_volume.shape
        )
    finally:
        ex.close()


def test_bad_source_and_unavailable_device_fail_as_events(tiny_model, tmp_path):
    ex = LocalExecutor()
    try:
        bad = tmp_path / "bad.mrc"
        bad.write_bytes(b"not an mrc file at all\n" * 100)
        job = ex.submit(bad, JobConfig(model=str(tiny_model)))
        assert job.wait(30)
        assert job.terminal_event.code == "invalid_volume"
        assert "not an MRC file" in job.terminal_event.message
    finally:
        ex.close()


def test_a_device_that_is_not_there_fails_as_an_event(tiny_model, noise_volume):
    import torch

    missing = f"cuda:{torch.cuda.device_count() if torch.cuda.is_available() else 0}"
    ex = LocalExecutor()
    try:  # a good volume, so the job gets as far as choosing its device
        job = ex.submit(noise_volume, JobConfig(model=str(tiny_model), device=missing))
        assert job.wait(30)
        failed = job.terminal_event
        assert isinstance(failed, Failed) and failed.code == "invalid_config", failed
        assert missing in failed.message and failed.hint
    finally:
        ex.close()


def test_cuda_out_of_memory_becomes_a_gpu_oom_failure_with_a_hint(
    tiny_model, noise_volume, monkeypatch
):
    """Fault injection: the network raises CUDA's OOM error mid-run (no GPU needed)."""
    import torch

    from cryomamba.engine.streaming import StreamingPredictor

    def oom(self, net, x):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(StreamingPredictor, "_predict", oom)
    ex = LocalExecutor()
    try:
        job = ex.submit(noise_volume, JobConfig(model=str(tiny_model)))
        assert job.wait(60)
        failed = job.terminal_event
        assert failed.code == "gpu_oom" and failed.retryable
        assert "tile_batch" in failed.hint and "out of memory" in failed.message
    finally:
        ex.close()


def test_failure_maps_exceptions_the_same_way_for_every_executor():
    from cryomamba.errors import ModelError
    from cryomamba.executors.base import failure, is_bug

    model = failure(ModelError("unknown model 'x'", hint="see models"), io_hint="-")
    assert (model.code, model.message, model.hint) == (
        "invalid_model",
        "unknown model 'x'",
        "see models",
    )
    io = failure(FileNotFoundError(2, "gone", "tomo.mrc"), io_hint="check the file")
    assert (io.code, io.hint, io.retryable) == ("io_error", "check the file", True)
    assert failure(MemoryError(), io_hint="-").code == "out_of_memory"
    bug = failure(KeyError("x"), io_hint="-")
    assert bug.code == "internal_error" and "KeyError" in bug.message and not bug.retryable
    assert is_bug(KeyError("x")) and not is_bug(OSError()) and not is_bug(ModelError("m"))


def test_first_preview_comes_with_the_first_slab(tiny_model):
    """The first preview is sent as soon as the first z-row of tiles is finalized, before the
    second row's work, whatever `preview_interval_s`; later ones wait for the interval."""
    import numpy as np

    from cryomamba.engine import StreamingPredictor, TrainedModel
    from cryomamba.events import Preview, Progress
    from cryomamba.job import Job

    volume = np.random.default_rng(3).normal(size=(48, 32, 32)).astype(np.float32)
    grid = StreamingPredictor(TrainedModel.load(tiny_model)).plan(volume.shape)
    assert len(grid.steps[0]) >= 3  # several slabs, so "the first" means something
    seen: list[object] = []  # every event, in the order the engine's thread emitted them

    def record(event):
        seen.append(event)
        return event

    ex = LocalExecutor()
    try:  # an interval longer than the job: only the first slab and the end may send one
        job = Job(record=record)
        config = JobConfig(model=str(tiny_model), preview_interval_s=3600.0)
        ex.submit(volume, config, job=job).result(120)
    finally:
        ex.close()
    previews = [i for i, e in enumerate(seen) if isinstance(e, Preview)]
    past_first_row = next(
        i
        for i, e in enumerate(seen)
        if isinstance(e, Progress) and e.tiles_done > grid.tiles_per_row
    )
    assert len(previews) == 2 and previews[0] < past_first_row
    first, last = seen[previews[0]], seen[previews[-1]]
    assert 0 < first.planes_done < volume.shape[0] and last.planes_done == volume.shape[0]
    assert first.labels.shape == last.labels.shape  # the same preview grid, partly filled
