"""The server under attack: each test is one finding of issue 13, against a real server.

One uvicorn subprocess on 127.0.0.1 for the module (a tiny nnU-Net model, a root folder,
a folder outside every root, two users), real symlinks swapped in under the root, and raw
sockets for what an HTTP client would never send. A test that needs a job to wait in the
queue starts a blocker job first and cancels it afterwards, so nothing depends on timing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
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
        extra_args=["--rate-limit", "100000", "--max-tiles", "1000", "--header-timeout", "2s"],
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


# -- 4. deeply nested JSON -------------------------------------------------------------------
@pytest.mark.parametrize("route", ["/v1/uploads/init", "/v1/jobs"])
def test_deeply_nested_json_is_invalid_json_not_a_crash(alice, server, route):
    for body in ("[" * 100_000 + "]" * 100_000, '{"a":' * 50_000 + "1" + "}" * 50_000):
        r = alice.post(route, content=body, headers={"Content-Type": "application/json"})
        err = assert_error(r, 400, "invalid_json")
        assert err["retryable"] is False
    assert "RecursionError" not in server.log()
    assert alice.get("/v1/healthz").status_code == 200  # the connection and server live on


# -- 5. a part PUT that arrives after complete ------------------------------------------------
def test_a_part_that_arrives_after_complete_is_refused(alice, server, outside):
    data = (outside / "secret.mrc").read_bytes()
    rec = alice.post(
        "/v1/uploads/init",
        json={
            "filename": "late.mrc",
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        },
    ).json()
    uid = rec["upload_id"]
    assert rec["parts_total"] == 1
    assert alice.put(f"/v1/uploads/{uid}/part/0", content=data).status_code == 200
    token = alice.headers["Authorization"]
    head = (
        f"PUT /v1/uploads/{uid}/part/0 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: {token}\r\nContent-Length: {len(data)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head + data[: len(data) // 2])  # the PUT is under way...
        time.sleep(0.3)  # ...and its handler has read the upload as open
        done = alice.post(f"/v1/uploads/{uid}/complete")
        assert done.status_code == 201, done.text
        sock.sendall(data[len(data) // 2 :])
        status, body = read_response(sock)
    assert status == 409 and b'"upload_not_open"' in body, body
    assert not (server.data_dir / "uploads" / uid).exists()
    record = alice.get(f"/v1/uploads/{uid}").json()
    assert record["state"] == "completed" and record["parts_received"] == [0]


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """Status and body of one HTTP/1.1 response with a Content-Length."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        assert chunk, buf
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk
        body += chunk
    return int(head.split()[1]), body


# -- 6. a sha256 with a trailing newline -----------------------------------------------------
def test_a_sha256_with_a_trailing_newline_is_refused_at_init(alice):
    for bad in ("a" * 64 + "\n", "a" * 64 + "\n\n", "\n" + "a" * 64):
        r = alice.post("/v1/uploads/init", json={"filename": "t.mrc", "size": 10, "sha256": bad})
        assert_error(r, 422, "invalid_request")


# -- issue 8 item 5: parts_received is one shape ----------------------------------------------
def test_parts_received_is_a_list_of_indices_in_every_answer(alice, outside):
    data = (outside / "secret.mrc").read_bytes()
    rec = alice.post(
        "/v1/uploads/init",
        json={
            "filename": "shape.mrc",
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        },
    ).json()
    uid = rec["upload_id"]
    assert rec["parts_received"] == [] and rec["parts_received_count"] == 0
    put = alice.put(f"/v1/uploads/{uid}/part/0", content=data).json()
    assert put["parts_received"] == [0] and put["parts_received_count"] == 1
    status = alice.get(f"/v1/uploads/{uid}").json()
    assert status["parts_received"] == put["parts_received"]
    assert alice.post(f"/v1/uploads/{uid}/complete").status_code == 201
    done = alice.get(f"/v1/uploads/{uid}").json()
    assert done["state"] == "completed"
    assert done["parts_received"] == [0] and done["parts_received_count"] == 1


# -- 2. tile_step has a floor; a job's tiles have a cap ---------------------------------------
@pytest.mark.parametrize("step", [1e-9, 1e-6, 0.05, 0.0999])
def test_a_tile_step_below_the_floor_is_refused_at_submit(alice, step):
    r = alice.post(
        "/v1/jobs",
        json={"server_path": "medium.mrc", "config": {"model": "tiny", "tile_step": step}},
    )
    err = assert_error(r, 422, "invalid_config")
    assert "tile_step" in err["message"] and "0.1" in err["message"]
    assert alice.get("/v1/jobs", params={"state": "queued"}).json()["jobs"] == []


def test_a_job_with_more_tiles_than_the_server_allows_is_refused_naming_the_count(alice):
    # 48x96x96 in 16³ tiles at step 0.25: 9 x 21 x 21 = 3,969 tiles; this server allows 1,000
    r = alice.post(
        "/v1/jobs",
        json={"server_path": "medium.mrc", "config": {"model": "tiny", "tile_step": 0.25}},
    )
    err = assert_error(r, 422, "invalid_config")
    assert "3,969 tiles" in err["message"] and "1,000" in err["message"]
    assert "--max-tiles" in err["hint"]
    ok = submit(alice, "medium.mrc", tile_step=1)  # 3 x 6 x 6 = 108 tiles
    alice.delete(f"/v1/jobs/{ok['id']}")
    wait_for(alice, ok["id"])


def test_the_tile_count_is_computed_without_listing_steps():
    from cryomamba.engine.tiling import TileGrid, tile_count

    for shape, patch, step in [
        ((48, 96, 96), (16, 16, 16), 0.25),
        ((24, 32, 32), (16, 16, 16), 0.5),
        ((7, 300, 129), (12, 16, 16), 0.33),
        ((200, 1000, 1000), (64, 128, 128), 0.1),
    ]:
        assert tile_count(shape, patch, step) == TileGrid.build(shape, patch, step).n_tiles
    # a tomogram a million voxels on a side: counted at once, never listed
    assert tile_count((10**6,) * 3, (64,) * 3, 0.1) == 156_241**3  # (10⁶ - 64) / 6.4 + 1
    with pytest.raises(ValueError, match="tile_step"):
        TileGrid.build((64, 64, 72), (64, 64, 64), 1e-9)  # refused before any list is made


# -- 3. header size and header-read time -----------------------------------------------------
def test_a_header_over_the_limit_is_answered_431(server):
    head = b"GET /v1/server/info HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * (70 << 10)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head)  # 70 KiB and no end of headers; the limit is 64 KiB
        reply = read_until_closed(sock)
    assert reply.startswith(b"HTTP/1.1 431 "), reply[:200]


def test_a_huge_header_is_not_read_to_its_end(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"GET /v1/server/info HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ")
        sent = 0
        with contextlib.suppress(OSError):  # the server closes while we still send
            while sent < 64 << 20:
                sock.sendall(b"a" * (1 << 20))
                sent += 1 << 20
        reply = read_until_closed(sock)  # a 431, or a reset if our bytes were still unread
    assert reply == b"" or reply.startswith(b"HTTP/1.1 431 "), reply[:200]
    assert sent < 64 << 20  # refused long before 64 MiB were read


def test_a_slowloris_connection_is_closed_after_the_header_timeout(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"GET /v1/healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        start = time.monotonic()
        with contextlib.suppress(OSError):
            while time.monotonic() - start < 20:  # one header line every 0.5 s, never the end
                sock.sendall(b"X-Drip: 1\r\n")
                time.sleep(0.5)
        reply = read_until_closed(sock)
        elapsed = time.monotonic() - start
    assert elapsed < 10, elapsed  # the server gave up on it (--header-timeout 2s)
    assert reply == b"" or reply.startswith(b"HTTP/1.1 408 "), reply[:200]


def test_a_connection_that_sends_nothing_is_closed(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        start = time.monotonic()
        assert read_until_closed(sock) == b""
        assert time.monotonic() - start < 10


def test_headers_within_the_limits_still_work(server, alice):
    token = alice.headers["Authorization"]
    big = "x" * 32_000  # half the 64 KiB default
    r = alice.get("/v1/server/info", headers={"X-Big": big, "Authorization": token})
    assert r.status_code == 200, r.text


def read_until_closed(sock: socket.socket) -> bytes:
    out = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            out += chunk
    return out


# -- 7. folds ---------------------------------------------------------------------------------
@pytest.mark.parametrize("folds", [[7], [10**30], [True], [False], [0.0], ["0"], [0, 0]])
def test_folds_the_model_lacks_or_that_are_not_integers_are_refused_at_submit(alice, server, folds):
    r = alice.post(
        "/v1/jobs",
        json={"server_path": "medium.mrc", "config": {"model": "tiny", "folds": folds}},
    )
    err = assert_error(r, 422, "invalid_config")
    assert str(server.models_dir) not in str(err) and str(server.data_dir) not in str(err)
    assert "folds" in err["message"] or "fold" in err["message"]


def test_a_fold_the_model_has_is_accepted(alice):
    job = submit(alice, "medium.mrc", folds=[0], tile_step=1)
    alice.delete(f"/v1/jobs/{job['id']}")
    assert wait_for(alice, job["id"])["state"] in ("canceled", "completed")


# -- 9. WebSocket handshakes and failed authentications are rate-limited ----------------------
@pytest.fixture
def strict(base) -> Iterator[LiveServer]:
    """A server with a budget of 3 requests a minute per user and 3 failed logins per address."""
    live = LiveServer(
        base / f"strict-{time.monotonic_ns()}",
        extra_args=["--rate-limit", "3", "--auth-failures", "3"],
    )
    live.start()
    yield live
    live.stop()


def test_websocket_handshakes_spend_the_users_request_budget(strict):
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    token = strict.token("carol", "read")
    url = f"ws://127.0.0.1:{strict.port}/v1/ws/jobs/nope"
    headers = {"Authorization": f"Bearer {token}"}
    for _ in range(3):  # within the budget: the socket is served (no such job: 4404)
        with connect(url, additional_headers=headers) as ws:
            assert json.loads(ws.recv())["error"]["code"] == "not_found"
    with connect(url, additional_headers=headers) as ws:
        message = json.loads(ws.recv())
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv()
    assert message["error"]["code"] == "rate_limited" and message["error"]["retryable"]
    assert closed.value.rcvd.code == 4429
    with strict.client(token) as c:  # HTTP shares the budget the sockets spent
        r = c.get("/v1/server/info")
        assert_error(r, 429, "rate_limited")


def test_failed_authentications_are_limited_per_address_but_a_valid_token_passes(strict):
    with strict.client("not-a-token") as bad:
        for _ in range(3):
            assert_error(bad.get("/v1/server/info"), 401, "invalid_token")
        r = bad.get("/v1/server/info")
        err = assert_error(r, 429, "too_many_auth_failures")
        assert err["retryable"] and int(r.headers["Retry-After"]) >= 1
    with strict.client() as anonymous:  # no token at all counts as a failure too
        assert_error(anonymous.get("/v1/jobs"), 429, "too_many_auth_failures")
    with strict.client(strict.token("dave", "read")) as good:
        assert good.get("/v1/server/info").status_code == 200


# -- 8. stats.json written by the server names files, not server paths -------------------------
def test_stats_json_from_the_server_holds_names_and_checksums_not_paths(alice, server, root):
    write_mrc(root / "stats-source.mrc", SMALL)
    job = wait_for(alice, submit(alice, "stats-source.mrc")["id"])
    assert job["state"] == "completed", job
    text = alice.get(job["artifacts"]["stats.json"]["url"]).text
    for secret in (str(root), str(server.models_dir), str(server.data_dir), "/proc/self/fd"):
        assert secret not in text
    provenance = json.loads(text)["provenance"]
    assert provenance["source"]["path"] == "stats-source.mrc"
    assert provenance["source"]["sha256"] == job["source"]["sha256"]
    assert "path" not in provenance["model"]
    assert provenance["model"]["name"] == "tiny" and provenance["model"]["sha256"]


def test_a_job_source_is_read_from_the_open_file_and_closed_with_the_volume(tmp_path):
    """The engine reads the file that was opened (even if its path changes meanwhile), and
    closing the volume closes the descriptor."""
    from cryomamba.errors import CryoMambaError
    from cryomamba.server.paths import file_identity, open_job_source, open_nofollow

    path = write_mrc(tmp_path / "a.mrc", SMALL, seed=1)
    original, expected = path.read_bytes(), mrcfile.read(path)
    fd = open_nofollow(str(path))
    identity = file_identity(fd)
    os.close(fd)
    source = {"path": str(path), "identity": identity, "filename": "a.mrc", "sha256": None}
    volume = open_job_source(source)
    fd = volume.fd
    os.replace(write_mrc(tmp_path / "b.mrc", SMALL, seed=2), path)  # swapped after opening
    assert np.array_equal(volume.data, expected)
    assert volume.checksum() == hashlib.sha256(original).hexdigest()
    volume.close()
    with pytest.raises(OSError):
        os.fstat(fd)
    with pytest.raises(CryoMambaError) as refused:  # the path names the new file now
        open_job_source(source)
    assert refused.value.code == "path_not_allowed" and str(tmp_path) not in str(refused.value)


def test_a_failure_in_the_worker_names_the_file_not_its_descriptor(alice, root):
    path = root / "no-voxel-size.mrc"
    with mrcfile.new(path, overwrite=True) as mrc:  # no voxel size: the worker refuses it
        mrc.set_data(np.random.default_rng(3).normal(size=SMALL).astype(np.float32))
    done = wait_for(alice, submit(alice, "no-voxel-size.mrc")["id"])
    assert done["state"] == "failed" and done["error"]["code"] == "voxel_size_unknown", done
    assert "no-voxel-size.mrc" in done["error"]["message"]
    assert "/proc" not in str(done["error"]) and str(root) not in str(done["error"])
