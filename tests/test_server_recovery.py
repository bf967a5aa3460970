"""Crash recovery: SIGKILL the server mid-job, start it again on the same data dir.

What the server acknowledged must survive (jobs, their states, finished artifacts and their
signed downloads); the job that was running fails as `server_restarted` (retryable) or
goes back to the queue (`--on-restart requeue`); jobs that were waiting still run; the
half-written leftovers of the interrupted job are removed on boot.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import mrcfile
import numpy as np
import pytest
from server_fixtures import LiveServer
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from cryomamba.testing import make_model_folder

pytestmark = pytest.mark.slow

TERMINAL = ("completed", "failed", "canceled")
FAST = ["--rate-limit", "100000"]


def write_mrc(path: Path, shape: tuple[int, int, int]) -> None:
    with mrcfile.new(path) as mrc:
        mrc.set_data(np.random.default_rng(0).normal(size=shape).astype(np.float32))
        mrc.voxel_size = 10.0


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> SimpleNamespace:
    base = tmp_path_factory.mktemp("recovery")
    models = base / "models"
    make_model_folder(models / "tiny", patch_size=(16, 16, 16), features=(4, 8, 16), seed=1)
    root = base / "root"
    root.mkdir()
    write_mrc(root / "small.mrc", (24, 32, 32))  # 18 tiles
    write_mrc(root / "mid.mrc", (40, 64, 64))  # 196 tiles: long enough to kill mid-run
    return SimpleNamespace(base=base, models=models, root=root)


def new_server(setup, name: str, *args: str) -> LiveServer:
    return LiveServer(
        setup.base / name, models_dir=setup.models, roots=[setup.root], extra_args=[*FAST, *args]
    )


def submit(client, path: str) -> dict:
    r = client.post("/v1/jobs", json={"server_path": path, "config": {"model": "tiny"}})
    assert r.status_code == 201, r.text
    return r.json()


def wait_for(client, job_id: str, states=TERMINAL, *, started: bool = False) -> dict:
    deadline = time.monotonic() + 120
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in states and (not started or (job["progress"] or {}).get("tiles_done")):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.05)


def download(client, artifact: dict) -> bytes:
    r = client.get(artifact["url"])
    assert r.status_code == 200, r.text
    return r.content


@pytest.fixture(scope="module")
def crashed(setup) -> Iterator[SimpleNamespace]:
    """A finished job, one running and one waiting; SIGKILL; the server starts again."""
    server = new_server(setup, "data-fail").start()
    token = server.token("alice", "read,upload,submit")
    with server.client(token) as client:
        finished = wait_for(client, submit(client, "small.mrc")["id"])
        assert finished["state"] == "completed"
        mask_before = download(client, finished["artifacts"]["mask.mrc"])
        running = submit(client, "mid.mrc")
        waiting = submit(client, "small.mrc")
        wait_for(client, running["id"], ("running", "previewing"), started=True)
        assert client.get(f"/v1/jobs/{waiting['id']}").json()["state"] == "queued"

    # What a crash mid-save leaves behind: the running job's half-written folder, and
    # temporary files nobody owns any more.
    artifacts = server.data_dir / "artifacts"
    half = artifacts / running["id"]
    half.mkdir(exist_ok=True)
    (half / ".tmp-0123abcd-mask.mrc").write_bytes(b"\0" * 1000)
    (artifacts / ("0" * 32)).mkdir()
    (artifacts / ".tmp-stray").write_bytes(b"x")
    (artifacts / finished["id"] / ".tmp-89abcdef-mask.nrrd").write_bytes(b"x")
    server.kill()

    server.start()
    yield SimpleNamespace(
        server=server,
        token=token,
        finished=finished,
        running=running,
        waiting=waiting,
        mask_before=mask_before,
        artifacts=artifacts,
    )
    server.stop()


@pytest.fixture
def client(crashed):
    with crashed.server.client(crashed.token) as c:
        yield c


def test_the_running_job_failed_as_server_restarted_and_retryable(crashed, client):
    job = client.get(f"/v1/jobs/{crashed.running['id']}").json()
    assert job["state"] == "failed" and job["finished_at"] is not None
    assert job["error"]["code"] == "server_restarted"
    assert job["error"]["retryable"] is True and "requeue" in job["error"]["hint"]
    assert job["artifacts"] == {}
    r = client.delete(f"/v1/jobs/{crashed.running['id']}")
    assert r.status_code == 409 and r.json()["error"]["code"] == "job_finished"


def test_a_websocket_on_the_interrupted_job_says_it_failed(crashed):
    url = f"ws://127.0.0.1:{crashed.server.port}/v1/ws/jobs/{crashed.running['id']}"
    with connect(url, additional_headers={"Authorization": f"Bearer {crashed.token}"}) as ws:
        messages = []
        with pytest.raises(ConnectionClosed):
            while True:
                messages.append(json.loads(ws.recv(timeout=30)))
    assert [m["type"] for m in messages] == ["state", "failed"]
    assert messages[1]["code"] == "server_restarted" and messages[1]["retryable"] is True


def test_the_job_that_was_waiting_runs_after_the_restart(crashed, client):
    job = wait_for(client, crashed.waiting["id"])
    assert job["state"] == "completed", job["error"]
    assert job["started_at"] > crashed.running["created_at"]
    mask = job["artifacts"]["mask.mrc"]
    assert hashlib.sha256(download(client, mask)).hexdigest() == mask["sha256"]


def test_finished_artifacts_survive_and_download_by_a_fresh_url(crashed, client):
    job = client.get(f"/v1/jobs/{crashed.finished['id']}").json()
    assert job["state"] == "completed"
    assert job["artifacts"].keys() == crashed.finished["artifacts"].keys()
    for name, artifact in job["artifacts"].items():
        assert artifact["sha256"] == crashed.finished["artifacts"][name]["sha256"]
        data = download(client, artifact)
        assert hashlib.sha256(data).hexdigest() == artifact["sha256"], name
    assert download(client, job["artifacts"]["mask.mrc"]) == crashed.mask_before
    # the old URL, signed by the same secret and not yet expired, still works too
    assert download(client, crashed.finished["artifacts"]["mask.mrc"]) == crashed.mask_before


def test_orphaned_temporary_files_are_removed_on_boot(crashed, client):
    wait_for(client, crashed.waiting["id"])
    left = {p.name for p in crashed.artifacts.iterdir()}
    assert left == {crashed.finished["id"], crashed.waiting["id"]}
    assert not any(p.name.startswith(".tmp-") for p in crashed.artifacts.rglob("*"))


def test_a_requeued_job_runs_again_and_completes(setup):
    server = new_server(setup, "data-requeue", "--on-restart", "requeue").start()
    token = server.token("alice", "read,upload,submit")
    try:
        with server.client(token) as client:
            job = submit(client, "mid.mrc")
            first = wait_for(client, job["id"], ("running", "previewing"), started=True)
            server.kill()
            server.start()
            record = client.get(f"/v1/jobs/{job['id']}").json()
            assert record["state"] in ("queued", "running", "previewing", "completed")
            done = wait_for(client, job["id"])
        assert done["state"] == "completed", done["error"]
        assert done["error"] is None and done["started_at"] > first["started_at"]
        assert done["progress"]["fraction"] == 1.0
        assert not any(p.name.startswith(".tmp-") for p in server.data_dir.rglob("*"))
    finally:
        server.stop()
