"""The dask executor on a real one-node SLURM: workers started by sbatch (dask-jobqueue).

A session fixture starts SLURM with scripts/slurm/start-slurm.sh (Debian's slurm-wlm and
munge; installs them when missing) as root. Where that is impossible (not root, no apt, no
network for the packages) the tests skip and say why; CI runs as root, so they run there.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import mrcfile
import numpy as np
import pytest

pytest.importorskip("dask_jobqueue")
pytest.importorskip("cryomamba_dask")

import cryomamba as cm

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts" / "slurm"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
]


def _sinfo_ready() -> bool:
    if shutil.which("sinfo") is None:
        return False
    out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    return out.returncode == 0 and any(s in out.stdout for s in ("idle", "mixed", "allocated"))


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A running one-node SLURM (partition `debug`), started here if it is not up yet."""
    started = False
    if not _sinfo_ready():
        if os.geteuid() != 0:
            pytest.skip("SLURM is not running and starting it needs root (scripts/slurm/)")
        t0 = time.monotonic()
        run = subprocess.run(
            ["bash", str(SCRIPTS / "start-slurm.sh")], capture_output=True, text=True, timeout=600
        )
        if run.returncode != 0:
            tail = (run.stdout + run.stderr).strip().splitlines()[-5:]
            pytest.skip("could not start SLURM: " + " | ".join(tail))
        started = True
        print(f"SLURM started in {time.monotonic() - t0:.1f} s")
    yield tmp_path_factory.mktemp("slurm")
    if started:
        subprocess.run(["bash", str(SCRIPTS / "stop-slurm.sh")], capture_output=True, timeout=120)


@pytest.fixture
def slurm_config(slurm):
    """Dask's own jobqueue.slurm config, as a user would put in ~/.config/dask/jobqueue.yaml."""
    import dask

    settings = {
        "jobqueue.slurm.queue": "debug",
        "jobqueue.slurm.cores": 1,
        "jobqueue.slurm.processes": 1,
        "jobqueue.slurm.memory": "2GB",
        "jobqueue.slurm.walltime": "00:10:00",
        "jobqueue.slurm.interface": "lo",  # one node: scheduler and workers on loopback
        "jobqueue.slurm.local-directory": str(slurm / "dask-local"),
        "jobqueue.slurm.log-directory": str(slurm / "dask-logs"),
        "jobqueue.slurm.worker-extra-args": ["--resources", "GPU=1"],  # a GPU slot per job
        "jobqueue.slurm.scheduler-options": {"dashboard": False, "dashboard_address": ":0"},
        "jobqueue.slurm.job-script-prologue": ["export OMP_NUM_THREADS=1"],
    }
    with dask.config.set(settings):
        yield settings


def test_a_batch_through_sbatch_started_workers_equals_local(slurm_config, tmp_path, tiny_model):
    from cryomamba_dask import DaskExecutor

    folder = tmp_path / "tomos"
    folder.mkdir()
    for n in range(3):
        data = np.random.default_rng(10 + n).normal(size=(16, 24, 24)).astype(np.float32)
        with mrcfile.new(folder / f"t{n}.mrc") as mrc:
            mrc.set_data(data)
            mrc.voxel_size = 10.0
    cfg = cm.JobConfig(model=str(tiny_model), formats=("mrc", "stats"))
    t0 = time.monotonic()
    ex = DaskExecutor("slurm", workers=2, out=tmp_path / "unused")
    try:
        ex.client.wait_for_workers(2, timeout=120)
        workers = ex.client.scheduler_info(n_workers=-1)["workers"].values()
        assert all(w["resources"] == {"GPU": 1} for w in workers)
        items = cm.segment_many(folder, cfg, out=tmp_path / "slurm", executor=ex)
        print(f"SLURMCluster up + 3 tomograms: {time.monotonic() - t0:.1f} s")
        assert [i.state for i in items] == ["completed"] * 3, [i.error for i in items]
        jobs = set()
        for item in items:
            prov = json.loads((item.out / "stats.json").read_text())["provenance"]
            jobs.add(prov["dask"]["slurm_job"])
        assert None not in jobs and jobs, "the work did not run inside SLURM jobs"
    finally:
        ex.close()
    local = cm.segment_many(folder, cfg, out=tmp_path / "local")
    for a, b in zip(items, local):
        with mrcfile.open(a.out / "mask.mrc") as x, mrcfile.open(b.out / "mask.mrc") as y:
            np.testing.assert_array_equal(x.data, y.data)
    deadline = time.monotonic() + 30  # closing the executor scancels its worker jobs
    while time.monotonic() < deadline:
        queue = subprocess.run(
            ["squeue", "-h", "-n", "dask-worker"], capture_output=True, text=True
        )
        if not queue.stdout.strip():
            break
        time.sleep(0.5)
    assert not queue.stdout.strip(), queue.stdout


def test_slurm_without_cores_and_memory_settings_is_a_clear_error(slurm):
    import dask
    from cryomamba_dask import DaskExecutor

    unset = {"jobqueue.slurm.cores": None, "jobqueue.slurm.memory": None}
    with dask.config.set(unset), pytest.raises(cm.ConfigError, match="jobqueue.slurm.cores") as e:
        DaskExecutor("slurm")
    assert "jobqueue.yaml" in e.value.hint
