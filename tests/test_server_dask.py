"""`cryomamba serve --executor dask --cluster ADDRESS`: one API in front of a Dask cluster.

A real LocalCluster of 2 single-threaded worker processes (its scheduler on loopback), a
real uvicorn server pointed at it: two jobs run at once, one per worker, each streaming
progress and previews to its own WebSocket.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import mrcfile
import numpy as np
import pytest

pytest.importorskip("distributed")
pytest.importorskip("cryomamba_dask")
pytest.importorskip("websockets")

from server_fixtures import LiveServer
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from cryomamba.testing import make_model_folder

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::ResourceWarning")]

SHAPE = (32, 48, 48)  # 405 tiles at tile_step 0.25: long enough for the two jobs to overlap


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Models, a root with two tomograms, and a cluster whose workers know the models."""
    from distributed import LocalCluster

    base = tmp_path_factory.mktemp("server-dask")
    models = base / "models"
    make_model_folder(models / "tiny", patch_size=(16, 16, 16), features=(4, 8, 16), seed=1)
    root = base / "root"
    root.mkdir()
    for n in range(2):
        with mrcfile.new(root / f"t{n}.mrc") as mrc:
            mrc.set_data(np.random.default_rng(n).normal(size=SHAPE).astype(np.float32))
            mrc.voxel_size = 10.0
    cluster = LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},  # not 8787: it may be taken
        local_directory=str(base / "dask"),
        env={"OMP_NUM_THREADS": "1", "CRYOMAMBA_MODELS_DIR": str(models)},
    )
    yield base, models, root, cluster
    cluster.close()


def _follow(url: str, token: str, into: list) -> None:
    """Every message of one job's WebSocket, with the time it arrived."""
    headers = {"Authorization": f"Bearer {token}"}
    with connect(url, additional_headers=headers, max_size=None, open_timeout=30) as ws:
        try:
            while True:
                message = json.loads(ws.recv(timeout=180))
                if message["type"] != "ping":
                    into.append((time.monotonic(), message))
        except ConnectionClosed:
            return


def test_two_jobs_at_once_on_the_cluster_with_previews_on_both_websockets(setup):
    base, models, root, cluster = setup
    server = LiveServer(
        base / "data",
        models_dir=models,
        roots=[root],
        extra_args=["--executor", "dask", "--cluster", cluster.scheduler_address],
    )
    server.start()
    try:
        token = server.token("alice", "read,submit")
        with server.client(token) as client:
            jobs = []
            for n in range(2):
                body = {
                    "server_path": f"t{n}.mrc",
                    "config": {"model": "tiny", "tile_step": 0.25, "preview_interval_s": 0.01},
                }
                r = client.post("/v1/jobs", json=body)
                assert r.status_code == 201, r.text
                jobs.append(r.json()["id"])
            streams: list[list] = [[], []]
            readers = [
                threading.Thread(
                    target=_follow,
                    args=(f"ws://127.0.0.1:{server.port}/v1/ws/jobs/{j}", token, s),
                )
                for j, s in zip(jobs, streams)
            ]
            for t in readers:
                t.start()
            for t in readers:
                t.join(240)
            for stream in streams:
                kinds = [m["type"] for _, m in stream]
                assert kinds[-1] == "completed", (kinds[-3:], server.log()[-2000:])
                assert "progress" in kinds and "preview" in kinds
            # both ran at the same time: each made progress before the other completed
            first_progress = [next(t for t, m in s if m["type"] == "progress") for s in streams]
            completed = [s[-1][0] for s in streams]
            assert first_progress[0] < completed[1] and first_progress[1] < completed[0]
            for j in jobs:
                record = client.get(f"/v1/jobs/{j}").json()
                assert record["state"] == "completed"
                url = record["artifacts"]["mask.mrc"]["url"]
                mask = client.get(url)
                assert mask.status_code == 200 and len(mask.content) > 1024
            served = Path(base / "data" / "artifacts" / jobs[0])
            assert not list(served.glob(".tmp-*"))
    finally:
        server.stop()


def test_a_server_killed_mid_job_recovers_it_and_its_cluster_task_stops(setup):
    base, models, root, cluster = setup
    data = base / "data-restart"
    args = ["--executor", "dask", "--cluster", cluster.scheduler_address]
    server = LiveServer(data, models_dir=models, roots=[root], extra_args=args)
    server.start()
    try:
        with server.client(server.token("alice", "read,submit")) as client:
            body = {"server_path": "t0.mrc", "config": {"model": "tiny", "tile_step": 0.1}}
            job_id = client.post("/v1/jobs", json=body).json()["id"]
            deadline = time.monotonic() + 120
            while not (client.get(f"/v1/jobs/{job_id}").json()["progress"] or {}).get("tiles_done"):
                assert time.monotonic() < deadline, server.log()[-2000:]
                time.sleep(0.1)
        server.kill()  # SIGKILL mid-job: its Dask client is gone, so the task is not wanted
        server.start()
        with server.client(server.token("alice", "read")) as client:
            record = client.get(f"/v1/jobs/{job_id}").json()
        assert record["state"] == "failed" and record["error"]["code"] == "server_restarted"
        # the orphaned task cancels itself: the workers are free, no artifacts appear
        from distributed import Client

        def busy(dask_worker) -> int:  # task threads still running, released ones too
            return len(dask_worker.active_threads)

        with Client(cluster, set_as_default=False) as c:
            deadline = time.monotonic() + 30
            while any(c.run(busy).values()):
                assert time.monotonic() < deadline, c.run(busy)
                time.sleep(0.2)
        assert not (data / "artifacts" / job_id / "mask.mrc").exists()
    finally:
        server.stop()
