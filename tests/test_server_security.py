"""The server under attack: each test is one finding of issue 13, against a real server.

One uvicorn subprocess on 127.0.0.1 for the module (a tiny nnU-Net model, a root folder,
a folder outside every root, two users), real symlinks swapped in under the root, and raw
sockets for what an HTTP client would never send. A test that needs a job to wait in the
queue starts a blocker job first and cancels it afterwards, so nothing depends on timing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import mrcfile
import numpy as np
import pytest
from server_fixtures import LiveServer, assert_error

from cryomamba.testing import make_model_folder

TERMINAL = ("completed", "failed", "canceled")
SMALL = (24, 32, 32)  # 18 tiles of 16³: well under a second
MEDIUM = (48, 96, 96)  # 605 tiles: seconds; the blocker that holds the queue


def write_mrc(path: Path, shape: tuple[int, int, int], seed: int = 0) -> Path:
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(np.random.default_rng(seed).normal(size=shape).astype(np.float32))
        mrc.voxel_size = 10.0
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("server-security")


@pytest.fixture(scope="module")
def root(base) -> Path:
    root = base / "root"
    root.mkdir()
    write_mrc(root / "medium.mrc", MEDIUM)
    return root


@pytest.fixture(scope="module")
def outside(base) -> Path:
    """A folder outside every root, holding a file no job may read."""
    folder = base / "outside"
    folder.mkdir()
    write_mrc(folder / "secret.mrc", SMALL, seed=99)
    return folder


@pytest.fixture(scope="module")
def server(base, root, outside) -> Iterator[LiveServer]:
    models = base / "models"
    make_model_folder(models / "tiny", patch_size=(16, 16, 16), features=(4, 8, 16), seed=1)
    live = LiveServer(
        base / "data",
        models_dir=models,
        roots=[root],
        extra_args=["--rate-limit", "100000"],
    )
    live.start()
    yield live
    live.stop()


@pytest.fixture(scope="module")
def alice(server):
    with server.client(server.token("alice", "read,upload,submit")) as client:
        yield client


@pytest.fixture(scope="module")
def bob(server):
    with server.client(server.token("bob", "read,upload,submit")) as client:
        yield client


# -- helpers ---------------------------------------------------------------------------------
def submit(client, server_path: str, **config) -> dict:
    r = client.post(
        "/v1/jobs", json={"server_path": server_path, "config": {"model": "tiny", **config}}
    )
    assert r.status_code == 201, r.text
    return r.json()


def wait_for(client, job_id: str, states=TERMINAL, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in states:
            return job
        assert time.monotonic() < deadline, f"job stayed {job['state']}, wanted {states}"
        time.sleep(0.05)


@contextlib.contextmanager
def held_queue(client) -> Iterator[dict]:
    """A blocker job runs for the duration, so jobs submitted meanwhile stay queued."""
    blocker = submit(client, "medium.mrc")
    deadline = time.monotonic() + 120
    while (client.get(f"/v1/jobs/{blocker['id']}").json()["progress"] or {}).get(
        "tiles_done", 0
    ) == 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    try:
        yield blocker
    finally:
        client.delete(f"/v1/jobs/{blocker['id']}")
        assert wait_for(client, blocker["id"])["state"] == "canceled"


def upload(client, path: Path) -> str:
    """Upload `path` in one part; its file id."""
    import hashlib

    data = path.read_bytes()
    init = client.post(
        "/v1/uploads/init",
        json={"filename": path.name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()},
    ).json()
    part = init["part_size"]
    for i in range(init["parts_total"]):
        r = client.put(f"/v1/uploads/{init['upload_id']}/part/{i}", content=data[i * part :][:part])
        assert r.status_code == 200, r.text
    r = client.post(f"/v1/uploads/{init['upload_id']}/complete")
    assert r.status_code == 201, r.text
    return r.json()["file_id"]


def assert_refused_as_swapped(client, job: dict, *secrets: str) -> None:
    """The job failed with path_not_allowed, made nothing, and its error names no path."""
    done = wait_for(client, job["id"])
    assert done["state"] == "failed", done
    assert done["error"]["code"] == "path_not_allowed", done["error"]
    assert done["artifacts"] == {}
    text = str(done)
    for secret in secrets:
        assert secret not in text


# -- 1. a symlink swapped in after submit ----------------------------------------------------
def test_a_file_swapped_for_a_symlink_after_submit_is_not_read(alice, server, root, outside):
    victim = write_mrc(root / "swap-file.mrc", SMALL)
    with held_queue(alice):
        job = submit(alice, "swap-file.mrc")
        victim.unlink()
        victim.symlink_to(outside / "secret.mrc")
    assert_refused_as_swapped(alice, job, str(outside), str(server.data_dir))


def test_a_folder_swapped_for_a_symlink_after_submit_is_not_read(alice, server, root, outside):
    folder = root / "cohort"
    folder.mkdir()
    write_mrc(folder / "secret.mrc", SMALL)  # the same name as the file outside
    with held_queue(alice):
        job = submit(alice, "cohort/secret.mrc")
        shutil.rmtree(folder)
        folder.symlink_to(outside, target_is_directory=True)
    assert_refused_as_swapped(alice, job, str(outside))


def test_another_users_upload_cannot_be_swapped_in(alice, bob, server, root, outside):
    bobs = server.data_dir / "raw" / f"{upload(bob, outside / 'secret.mrc')}.mrc"
    assert bobs.is_file()
    victim = write_mrc(root / "swap-raw.mrc", SMALL)
    with held_queue(alice):
        job = submit(alice, "swap-raw.mrc")
        victim.unlink()
        victim.symlink_to(bobs)
    assert_refused_as_swapped(alice, job, str(server.data_dir))


def test_a_file_replaced_by_another_file_after_submit_is_refused(alice, root, outside):
    victim = write_mrc(root / "replaced.mrc", SMALL)
    with held_queue(alice):
        job = submit(alice, "replaced.mrc")
        tmp = root / ".replaced.tmp"
        shutil.copyfile(outside / "secret.mrc", tmp)
        os.replace(tmp, victim)  # a hard link or a rename: no symlink, but not the file checked
    assert_refused_as_swapped(alice, job)


def test_untouched_server_paths_and_uploads_still_run(alice, root, outside):
    write_mrc(root / "fine.mrc", SMALL)
    file_id = upload(alice, outside / "secret.mrc")
    by_path = submit(alice, "fine.mrc")
    r = alice.post("/v1/jobs", json={"file_id": file_id, "config": {"model": "tiny"}})
    assert r.status_code == 201, r.text
    for job in (by_path, r.json()):
        done = wait_for(alice, job["id"])
        assert done["state"] == "completed", done
        assert set(done["artifacts"]) >= {"mask.mrc", "stats.json"}
    assert "identity" not in done["source"] and "path" not in done["source"]


def test_a_symlink_at_submit_is_refused_with_path_not_allowed(alice, root, outside):
    (root / "link.mrc").symlink_to(outside / "secret.mrc")
    err = assert_error(
        alice.post("/v1/jobs", json={"server_path": "link.mrc", "config": {"model": "tiny"}}),
        403,
        "path_not_allowed",
    )
    assert str(outside) not in str(err)
