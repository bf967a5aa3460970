"""The dask executor on a real LocalCluster of 2 single-threaded worker processes.

It passes the executor conformance suite, gives labels bit-equal to `local`, and handles
what is special to a cluster: worker SIGKILL mid-job, an unreachable scheduler, a path
only the client can read, arrays over the scatter limit.
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

pytest.importorskip("distributed")
pytest.importorskip("cryomamba_dask")

from cryomamba import JobConfig
from cryomamba.errors import ConfigError
from cryomamba.events import Failed, Progress
from cryomamba.executors.local import LocalExecutor
from cryomamba.job import JobState
from cryomamba.testing import ExecutorTests

pytestmark = [
    pytest.mark.slow,
    # distributed's own shutdown chatter (a worker killed on purpose, a closing comm)
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore:.*Restarting worker.*:UserWarning"),
]


@pytest.fixture(scope="module")
def dask_client(tmp_path_factory):
    """A LocalCluster of 2 single-threaded worker processes, shared by this module."""
    from distributed import Client, LocalCluster

    cluster = LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},  # not 8787: it may be taken
        local_directory=str(tmp_path_factory.mktemp("dask")),
        env={"OMP_NUM_THREADS": "1"},
    )
    client = Client(cluster, set_as_default=False)
    client.wait_for_workers(2, timeout=60)
    yield client
    client.close()
    cluster.close()


@pytest.fixture
def dask_executor(dask_client, tmp_path):
    from cryomamba_dask import DaskExecutor

    ex = DaskExecutor(dask_client, out=tmp_path / "out")
    yield ex
    ex.close()


class TestDaskExecutor(ExecutorTests):
    @pytest.fixture
    def executor(self, dask_executor):
        return dask_executor

    @pytest.fixture
    def model(self, tiny_model):
        return tiny_model

    @pytest.fixture
    def volume_source(self, mrc_file):
        return mrc_file


def test_labels_are_bit_equal_to_local_and_artifacts_land_in_out(
    dask_executor, tiny_model, mrc_file
):
    cfg = JobConfig(model=str(tiny_model), formats=("mrc", "stats"))
    job = dask_executor.submit(mrc_file, cfg)
    result = job.result(120)
    local = LocalExecutor()
    try:
        expected = local.submit(mrc_file, cfg).result(120)
    finally:
        local.close()
    np.testing.assert_array_equal(np.asarray(result.labels), np.asarray(expected.labels))
    out = dask_executor.out / job.id
    assert sorted(p.name for p in out.iterdir()) == ["mask.mrc", "stats.json"]
    assert result.artifacts["mrc"] == out / "mask.mrc"
    assert isinstance(result.labels, np.memmap)  # memory-mapped from out, not shipped back
    assert result.provenance["dask"]["worker"].startswith("tcp://")
    assert result.stats["labels"] == expected.stats["labels"]


def test_arrays_are_scattered_below_the_limit_and_refused_above(dask_client, tmp_path, tiny_model):
    from cryomamba_dask import DaskExecutor

    ex = DaskExecutor(dask_client, out=tmp_path, scatter_limit=100_000)
    try:
        small = np.random.default_rng(1).normal(size=(16, 20, 20)).astype(np.float32)
        result = ex.submit(small, JobConfig(model=str(tiny_model))).result(120)
        assert result.shape == small.shape
        with pytest.raises(ConfigError, match="MRC file on storage the workers share"):
            ex.submit(np.zeros((40, 40, 40), np.float32), JobConfig(model=str(tiny_model)))
    finally:
        ex.close()


def test_a_path_only_the_client_can_read_fails_as_io_error_naming_the_worker(
    dask_executor, tiny_model, tmp_path
):
    missing = tmp_path / "only-on-my-laptop" / "tomo.mrc"
    job = dask_executor.submit(missing, JobConfig(model=str(tiny_model)))
    events = list(job.events(timeout=60))
    failed = events[-1]
    assert isinstance(failed, Failed) and failed.code == "io_error"
    assert "worker tcp://" in failed.message and str(missing) in failed.message
    assert "shared" in failed.hint
    assert not any(isinstance(e, Progress) for e in events)  # before inference


def test_unreachable_scheduler_is_a_clear_error_within_seconds():
    from cryomamba_dask import ClusterError, DaskExecutor
    from server_fixtures import free_port

    start = time.monotonic()
    with pytest.raises(ClusterError, match="cannot reach the Dask scheduler") as info:
        DaskExecutor(f"tcp://127.0.0.1:{free_port()}", connect_timeout_s=2)
    assert time.monotonic() - start < 30
    assert info.value.code == "cluster_unreachable" and "dask scheduler" in info.value.hint


def _slow_config(model, tile_step: float = 0.1) -> JobConfig:
    # a small tile step makes many tiles (0.1: ~1100), so the job still runs when the test acts
    return JobConfig(model=str(model), tile_step=tile_step, preview_interval_s=0.001)


def _started(ex, job, timeout=60) -> dict:
    for event in job.events(timeout=timeout):
        if isinstance(event, Progress) and ex.worker_of(job):
            return ex.worker_of(job)
    raise AssertionError(f"job ended before it could be acted on: {job.terminal_event}")


def test_worker_killed_mid_job_fails_as_worker_lost_and_leaves_out_clean(
    dask_executor, tiny_model, mrc_file
):
    job = dask_executor.submit(mrc_file, _slow_config(tiny_model))
    where = _started(dask_executor, job)
    other = dask_executor.submit(mrc_file, JobConfig(model=str(tiny_model)))
    os.kill(where["pid"], signal.SIGKILL)
    assert job.wait(120)
    failed = job.terminal_event
    assert isinstance(failed, Failed), failed
    assert failed.code == "worker_lost" and failed.retryable
    out = dask_executor.out / job.id
    assert not out.exists() or not any(out.iterdir())
    other.result(120)  # the other jobs go on


def test_worker_killed_mid_job_reruns_once_when_asked(dask_client, tmp_path, tiny_model, mrc_file):
    from cryomamba_dask import DaskExecutor

    ex = DaskExecutor(dask_client, out=tmp_path, reruns=1)
    try:
        job = ex.submit(mrc_file, _slow_config(tiny_model, tile_step=0.25))  # ~170 tiles
        first = _started(ex, job)
        os.kill(first["pid"], signal.SIGKILL)
        result = job.result(180)
        assert result.shape == (30, 40, 36) and job.state == JobState.COMPLETED
    finally:
        ex.close()


def test_cancel_running_frees_the_slot_and_queued_never_starts(dask_executor, tiny_model, mrc_file):
    slow = _slow_config(tiny_model)
    running = [dask_executor.submit(mrc_file, slow) for _ in range(2)]  # both workers busy
    for job in running:
        _started(dask_executor, job)
    queued = dask_executor.submit(mrc_file, slow)
    queued.cancel()
    assert queued.wait(30) and queued.state == JobState.CANCELED
    assert dask_executor.worker_of(queued) == {}  # it never started
    for job in running:
        job.cancel()
    for job in running:
        assert job.wait(60) and job.state == JobState.CANCELED
    # the slots are free again: a new job runs to the end
    dask_executor.submit(mrc_file, JobConfig(model=str(tiny_model))).result(120)


def test_entry_point_registers_the_executor_without_importing_dask():
    import subprocess
    import sys

    code = (
        "import sys; from cryomamba import plugins; names = plugins.executors().names(); "
        "print('dask' in names, [m for m in ('dask', 'distributed') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True []"


def test_segment_many_on_dask_equals_local_and_a_rerun_skips(
    dask_executor, tiny_model, tmp_path, mrc_file
):
    import mrcfile

    import cryomamba as cm

    folder = tmp_path / "tomos"
    folder.mkdir()
    for n in range(3):
        data = np.random.default_rng(n).normal(size=(16, 24, 24)).astype(np.float32)
        with mrcfile.new(folder / f"t{n}.mrc") as mrc:
            mrc.set_data(data)
            mrc.voxel_size = 10.0
    (folder / "t9.mrc").write_bytes(b"corrupt" * 100)
    cfg = JobConfig(model=str(tiny_model), formats=("mrc", "stats"))
    items = cm.segment_many(folder, cfg, out=tmp_path / "dask", executor=dask_executor)
    assert [i.state for i in items] == ["completed"] * 3 + ["failed"]
    assert items[3].error_code == "invalid_volume"
    local = cm.segment_many(folder / "t1.mrc", cfg, out=tmp_path / "local")
    with (
        mrcfile.open(tmp_path / "dask/t1/mask.mrc") as a,
        mrcfile.open(local[0].out / "mask.mrc") as b,
    ):
        np.testing.assert_array_equal(a.data, b.data)
    again = cm.segment_many(folder, cfg, out=tmp_path / "dask", executor=dask_executor)
    assert [i.state for i in again] == ["skipped"] * 3 + ["failed"]


def test_batch_command_on_a_running_scheduler(dask_client, tiny_model, tmp_path, mrc_file, capsys):
    from cryomamba.cli import main
    from cryomamba.executors import base

    address = dask_client.scheduler.address
    out = tmp_path / "segs"
    argv = ["batch", str(mrc_file), "-o", str(out), "--model", str(tiny_model), "-q"]
    try:
        assert main([*argv, "--executor", "dask", "--cluster", address]) == 0
    finally:  # the executor the command built stays cached per options: close it here
        for key in [k for k in base._shared if k[0] == "dask"]:
            base._shared.pop(key).close()
    assert (out / "tomo" / "mask.mrc").is_file()
    assert "summary.csv" in capsys.readouterr().out
    assert main([*argv, "--cluster", address]) == 2  # --cluster without --executor dask
    assert "--executor dask" in capsys.readouterr().err


def _page_faults_of_a_tile_loop() -> int:
    """Minor page faults of 200 allocate-fill-free rounds of a 2 MiB block (a tile buffer)."""
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(200):
        np.ones(1 << 18)  # 2 MiB, filled, freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_workers_get_glibc_allocation_thresholds_back_after_dasks_malloc_trim(
    tmp_path, tiny_model, mrc_file
):
    """Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_, which pins glibc's mmap
    threshold at 128 KiB: every tile buffer is mapped and unmapped again, faulting in fresh
    pages (1.5× wall time on the bundled model). The first job on a worker undoes that.
    A fresh cluster of our own: the module's workers have run jobs already."""
    from cryomamba_dask import DaskExecutor

    ex = DaskExecutor(workers=1, out=tmp_path)
    try:
        client = ex.client
        envs = client.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_"))
        if not any(envs.values()):
            pytest.skip(f"this Dask does not set MALLOC_TRIM_THRESHOLD_ for workers: {envs}")
        before = client.run(_page_faults_of_a_tile_loop)
        cfg = JobConfig(model=str(tiny_model), formats=("mrc",))
        worker = ex.submit(mrc_file, cfg).result(120).provenance["dask"]["worker"]
        after = client.run(_page_faults_of_a_tile_loop)
    finally:
        ex.close()
    # mapped afresh: ~512 faults per round; reused heap memory: none after the first
    assert before[worker] > 200 * 256, before
    assert after[worker] < before[worker] / 20, (before, after)
