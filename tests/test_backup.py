"""Backups that restore: snapshot a live server, verify, refuse damage, restore, serve again.

The end-to-end fixture runs a real server on D with a finished job (on an uploaded file),
a job still running and an upload half done, takes a backup through the real command
line while the server is up, and restores it into a fresh D2 where a second server
starts. Unit tests (no server) cover retention and parts that changed after the snapshot.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import mrcfile
import numpy as np
import pytest
from server_fixtures import LiveServer

from cryomamba.server.backup import BackupError, create_backup, restore_backup, verify_backup
from cryomamba.server.storage import Storage
from cryomamba.testing import make_model_folder

TERMINAL = ("completed", "failed", "canceled")
PART = 8 << 20


def write_mrc(path: Path, shape: tuple[int, int, int]) -> bytes:
    with mrcfile.new(path) as mrc:
        mrc.set_data(np.random.default_rng(0).normal(size=shape).astype(np.float32))
        mrc.voxel_size = 10.0
    return path.read_bytes()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cryomamba", *args], capture_output=True, text=True, timeout=120
    )


def init(client: httpx.Client, data: bytes, filename: str) -> dict:
    body = {"filename": filename, "size": len(data), "sha256": sha256(data), "part_size": PART}
    resp = client.post("/v1/uploads/init", json=body)
    assert resp.status_code in (200, 201), resp.text
    return resp.json()


def put(client: httpx.Client, upload_id: str, idx: int, data: bytes) -> None:
    chunk = data[idx * PART : (idx + 1) * PART]
    resp = client.put(f"/v1/uploads/{upload_id}/part/{idx}", content=chunk)
    assert resp.status_code == 200, resp.text


def wait_for(client: httpx.Client, job_id: str, states=TERMINAL, started=False) -> dict:
    deadline = time.monotonic() + 120
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in states and (not started or (job["progress"] or {}).get("tiles_done")):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.05)


def submit(client: httpx.Client, **source) -> dict:
    resp = client.post("/v1/jobs", json={**source, "config": {"model": "tiny"}})
    assert resp.status_code == 201, resp.text
    return resp.json()


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> Iterator[SimpleNamespace]:
    """A backup of a live server, and a server started on its restore."""
    base = tmp_path_factory.mktemp("backup")
    models = base / "models"
    make_model_folder(models / "tiny", patch_size=(16, 16, 16), features=(4, 8, 16), seed=1)
    root = base / "root"
    root.mkdir()
    small = write_mrc(base / "small.mrc", (24, 32, 32))
    big = write_mrc(base / "big.mrc", (40, 256, 256))  # 10.5 MB: two parts of 8 MiB
    write_mrc(root / "mid.mrc", (40, 64, 64))  # 196 tiles: still running at the backup
    args = {"models_dir": models, "roots": [root], "extra_args": ["--rate-limit", "100000"]}
    server = LiveServer(base / "D", **args).start()
    token = server.token("alice", "read,upload,submit")
    try:
        with server.client(token) as client:
            rec = init(client, small, "small.mrc")
            put(client, rec["upload_id"], 0, small)
            done = client.post(f"/v1/uploads/{rec['upload_id']}/complete")
            assert done.status_code == 201, done.text
            file_id = done.json()["file_id"]
            finished = wait_for(client, submit(client, file_id=file_id)["id"])
            assert finished["state"] == "completed", finished["error"]
            mask = client.get(finished["artifacts"]["mask.mrc"]["url"]).content
            half = init(client, big, "big.mrc")
            assert half["parts_total"] == 2
            put(client, half["upload_id"], 0, big)
            running = submit(client, server_path="mid.mrc")
            wait_for(client, running["id"], ("running", "previewing"), started=True)
            took = cli("backup", "--data-dir", str(server.data_dir), "--to", str(base / "B"))
            assert took.returncode == 0, took.stderr
            client.delete(f"/v1/jobs/{running['id']}")  # free the CPU
    finally:
        server.stop()
    backup = Path(took.stdout.strip())
    restored = LiveServer(base / "D2", **args)
    yield SimpleNamespace(
        base=base,
        server=server,
        restored=restored,
        backup=backup,
        token=token,
        file_id=file_id,
        finished=finished,
        mask=mask,
        half=half,
        big=big,
        running=running,
    )
    restored.stop()


@pytest.mark.slow
def test_the_backup_verifies_and_names_every_file(live):
    out = cli("backup", "verify", str(live.backup))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"ok: {live.backup}:")
    assert cli("backup", "verify", str(live.backup.parent)).returncode == 0  # newest in B
    files = json.loads((live.backup / "manifest.json").read_text())["files"]
    job = live.finished["id"]
    assert {"cryomamba.sqlite3", "secret.key", f"artifacts/{job}/mask.mrc"} <= files.keys()
    # the half-done upload: its recorded part copied (not linked: the live file still
    # changes as parts arrive) into a file of the declared size, nothing else of it
    rel = f"uploads/{live.half['upload_id']}/data"
    assert [r for r in files if r.startswith("uploads/")] == [rel]
    copy = (live.backup / rel).read_bytes()
    assert copy == live.big[:PART] + bytes(len(live.big) - PART)
    assert os.stat(live.backup / rel).st_ino != os.stat(live.server.data_dir / rel).st_ino
    db = sqlite3.connect(f"file:{live.backup / 'cryomamba.sqlite3'}?mode=ro", uri=True)
    try:  # read-only: the backup must stay as its manifest says
        parts = db.execute(
            "SELECT idx, sha256 FROM parts WHERE upload_id = ?", (live.half["upload_id"],)
        ).fetchall()
    finally:
        db.close()
    assert parts == [(0, sha256(live.big[:PART]))]
    assert not any(live.running["id"] in rel for rel in files)  # unfinished: not taken
    raw = [rel for rel in files if rel.startswith("raw/")]
    assert raw == [f"raw/{live.file_id}.mrc"]
    # hard-linked on the same file system, and the secret stays private
    assert os.stat(live.backup / raw[0]).st_ino == os.stat(live.server.data_dir / raw[0]).st_ino
    assert (live.backup / "secret.key").stat().st_mode & 0o777 == 0o600


@pytest.fixture
def damaged(live, tmp_path) -> Path:
    copy = tmp_path / "B" / live.backup.name
    shutil.copytree(live.backup, copy)  # real copies: damaging them leaves the original alone
    mask = copy / "artifacts" / live.finished["id"] / "mask.mrc"
    data = bytearray(mask.read_bytes())
    data[-1] ^= 0xFF
    mask.write_bytes(data)
    return copy


@pytest.mark.slow
def test_verify_and_restore_refuse_a_damaged_backup(live, damaged, tmp_path):
    out = cli("backup", "verify", str(damaged))
    assert out.returncode != 0
    assert f"damaged: artifacts/{live.finished['id']}/mask.mrc" in out.stderr
    assert "error:" in out.stderr and "hint:" in out.stderr
    target = tmp_path / "target"
    out = cli("restore", str(damaged), "--data-dir", str(target))
    assert out.returncode != 0 and "is damaged" in out.stderr, out.stderr
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.slow
def test_an_incomplete_backup_is_refused(live, damaged, tmp_path):
    (damaged / "manifest.json").unlink()
    out = cli("backup", "verify", str(damaged))
    assert out.returncode != 0 and "incomplete" in out.stderr
    with pytest.raises(BackupError, match="incomplete"):
        restore_backup(damaged, tmp_path / "target")
    with pytest.raises(BackupError, match="no complete backup"):
        restore_backup(damaged.parent, tmp_path / "target")  # the B folder: none complete


@pytest.mark.slow
def test_restore_refuses_a_folder_that_is_not_empty(live, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    out = cli("restore", str(live.backup), "--data-dir", str(tmp_path))
    assert out.returncode != 0 and "is not empty" in out.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


@pytest.fixture(scope="module")
def restored(live) -> SimpleNamespace:
    out = cli("restore", str(live.backup.parent), "--data-dir", str(live.restored.data_dir))
    assert out.returncode == 0, out.stderr
    live.restored.start()
    return live


@pytest.fixture
def client(restored) -> Iterator[httpx.Client]:
    with restored.restored.client(restored.token) as c:  # the token minted for D
        yield c


@pytest.mark.slow
def test_the_restored_server_has_the_finished_job_and_its_signed_urls(restored, client):
    job = client.get(f"/v1/jobs/{restored.finished['id']}").json()
    assert job["state"] == "completed"
    for name, artifact in job["artifacts"].items():
        data = client.get(artifact["url"]).content
        assert sha256(data) == artifact["sha256"], name
    old_url = restored.finished["artifacts"]["mask.mrc"]["url"]  # signed by D: same secret
    assert client.get(old_url).content == restored.mask
    assert (restored.restored.data_dir / "secret.key").stat().st_mode & 0o777 == 0o600


@pytest.mark.slow
def test_the_job_that_was_running_failed_as_server_restarted(restored, client):
    job = client.get(f"/v1/jobs/{restored.running['id']}").json()
    assert job["state"] == "failed" and job["error"]["code"] == "server_restarted"


@pytest.mark.slow
def test_the_completed_file_runs_a_new_job(restored, client):
    job = wait_for(client, submit(client, file_id=restored.file_id)["id"])
    assert job["state"] == "completed", job["error"]
    assert job["source"]["file_id"] == restored.file_id


@pytest.mark.slow
def test_the_half_done_upload_resumes(restored, client):
    rec = init(client, restored.big, "big.mrc")
    assert rec["upload_id"] == restored.half["upload_id"]
    assert rec["parts_received"] == [0]
    put(client, rec["upload_id"], 1, restored.big)
    done = client.post(f"/v1/uploads/{rec['upload_id']}/complete")
    assert done.status_code == 201, done.text
    assert done.json()["sha256"] == sha256(restored.big)


# -- without a server ----------------------------------------------------------------------
@pytest.fixture
def data_dir(tmp_path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    Storage(data / "cryomamba.sqlite3").close()
    (data / "secret.key").write_text("s" * 64)
    return data


def test_keep_removes_the_oldest_complete_backups_only(data_dir, tmp_path):
    root = tmp_path / "B"
    made = [create_backup(data_dir, root).path for _ in range(3)]
    interrupted = root / "19990101T000000Z"
    interrupted.mkdir()  # no manifest: incomplete, never counted nor removed
    summary = create_backup(data_dir, root, keep=2)
    assert summary.removed == made[:2]
    assert sorted(p.name for p in root.iterdir()) == sorted(
        [interrupted.name, made[2].name, summary.path.name]
    )


def test_a_part_that_changed_after_the_snapshot_is_dropped(data_dir, tmp_path):
    storage = Storage(data_dir / "cryomamba.sqlite3")
    row = {"owner": "a", "filename": "x.mrc", "size": 25, "sha256": None, "part_size": 10}
    storage.add_upload(
        {"id": "u1", **row, "parts_total": 3, "state": "open", "created_at": 0, "expires_at": 9e9}
    )
    (data_dir / "uploads" / "u1").mkdir(parents=True)
    data = data_dir / "uploads" / "u1" / "data"
    data.write_bytes(b"0" * 10 + b"1" * 10 + b"?" * 5)  # part 2 written, never recorded
    for idx, content in enumerate([b"0" * 10, b"1" * 10]):
        storage.add_part("u1", idx, 10, sha256(content))
    storage.close()
    with open(data, "r+b") as f:  # part 1 rewritten after the snapshot's record
        f.seek(10)
        f.write(b"x" * 10)
    summary = create_backup(data_dir, tmp_path / "B")
    assert summary.dropped_parts == 1
    manifest, problems = verify_backup(summary.path)
    assert problems == [] and "uploads/u1/data" in manifest["files"]
    assert (summary.path / "uploads/u1/data").read_bytes() == b"0" * 10 + bytes(15)
    target = tmp_path / "D2"
    restore_backup(summary.path, target)
    restored = Storage(target / "cryomamba.sqlite3")
    assert sorted(restored.parts("u1")) == [0]
    restored.close()
    assert (target / "uploads/u1/data").read_bytes() == b"0" * 10 + bytes(15)


def test_an_upload_whose_data_file_is_gone_is_taken_without_parts(data_dir, tmp_path):
    storage = Storage(data_dir / "cryomamba.sqlite3")
    row = {"owner": "a", "filename": "x.mrc", "size": 10, "sha256": None, "part_size": 10}
    storage.add_upload(
        {"id": "u1", **row, "parts_total": 1, "state": "open", "created_at": 0, "expires_at": 9e9}
    )
    storage.add_part("u1", 0, 10, sha256(b"0" * 10))  # completed (and removed) meanwhile
    storage.close()
    summary = create_backup(data_dir, tmp_path / "B")
    manifest, problems = verify_backup(summary.path)
    assert summary.dropped_parts == 1 and problems == []
    assert not any(rel.startswith("uploads/") for rel in manifest["files"])


def test_backup_of_a_folder_without_a_server_database_says_so(tmp_path):
    out = cli("backup", "--data-dir", str(tmp_path), "--to", str(tmp_path / "B"))
    assert out.returncode != 0
    assert "no server database" in out.stderr and "hint:" in out.stderr
    assert cli("backup", "--data-dir", str(tmp_path)).returncode != 0  # no --to: usage


def test_a_restored_file_survives_a_server_started_with_a_relative_data_dir(
    data_dir, tmp_path, monkeypatch
):
    from cryomamba.server.part_store import PartStore
    from cryomamba.server.settings import ServerSettings

    (data_dir / "raw").mkdir()
    (data_dir / "raw" / "f1.mrc").write_bytes(b"tomogram")
    storage = Storage(data_dir / "cryomamba.sqlite3")
    storage.add_file(
        {
            "id": "f1",
            "owner": "a",
            "filename": "x.mrc",
            "path": str(data_dir / "raw" / "f1.mrc"),
            "size": 8,
            "sha256": sha256(b"tomogram"),
            "meta": {},
            "created_at": 0.0,
        }
    )
    storage.close()
    restore_backup(create_backup(data_dir, tmp_path / "B").path, tmp_path / "D2")
    monkeypatch.chdir(tmp_path)  # the server is started as `--data-dir D2`
    settings = ServerSettings(data_dir=Path("D2"))
    storage = Storage(settings.db_path)
    try:
        assert storage.file("f1")["path"] == str(tmp_path / "D2" / "raw" / "f1.mrc")
        PartStore(settings, storage).clean()
    finally:
        storage.close()
    assert (tmp_path / "D2" / "raw" / "f1.mrc").read_bytes() == b"tomogram"
