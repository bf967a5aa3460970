"""Resumable uploads against a real server: parts, resume, checks at complete, crashes, expiry.

Every test talks HTTP to `python -m cryomamba.serve` in a subprocess (tests/server_fixtures.py)
and checks what lands on disk under its data dir and in its SQLite database.
"""

from __future__ import annotations

import hashlib
import socket
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import mrcfile
import numpy as np
import pytest
from server_fixtures import LiveServer, assert_error

MiB = 1 << 20
PART = 8 * MiB  # the smallest part size the server accepts: a ~20 MiB file has three parts
SHAPE = (20, 512, 512)  # float32: 20 MiB of data + the 1,024-byte header


# -- helpers ---------------------------------------------------------------------------------
def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_mrc(path: Path, shape: tuple[int, int, int], seed: int = 0) -> bytes:
    data = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(data)
        mrc.voxel_size = (10.0, 10.0, 10.0)
    return path.read_bytes()


def parts_of(data: bytes, part_size: int = PART) -> list[bytes]:
    return [data[i : i + part_size] for i in range(0, len(data), part_size)]


def init(
    client: httpx.Client,
    data: bytes,
    filename: str = "tomo.mrc",
    *,
    sha: bool = True,
    part_size: int | None = PART,
    **extra,
) -> httpx.Response:
    body = {"filename": filename, "size": len(data), **extra}
    if sha:
        body["sha256"] = sha256(data)
    if part_size is not None:
        body["part_size"] = part_size
    return client.post("/v1/uploads/init", json=body)


def put(
    client: httpx.Client, upload_id: str, idx: int, chunk: bytes, checksum: str | None = "auto"
) -> httpx.Response:
    headers = {"X-Part-SHA256": sha256(chunk) if checksum == "auto" else checksum}
    if checksum is None:
        headers = {}
    return client.put(f"/v1/uploads/{upload_id}/part/{idx}", content=chunk, headers=headers)


def upload(
    client: httpx.Client, data: bytes, filename: str = "tomo.mrc", order: list[int] | None = None
) -> dict:
    """A whole upload: init, every part (in `order`), complete; returns the file record."""
    rec = init(client, data, filename).json()
    chunks = parts_of(data, rec["part_size"])
    for idx in order if order is not None else range(len(chunks)):
        assert put(client, rec["upload_id"], idx, chunks[idx]).status_code == 200
    resp = client.post(f"/v1/uploads/{rec['upload_id']}/complete")
    assert resp.status_code == 201, resp.text
    return resp.json()


def held(server: LiveServer, upload_id: str, idx: int, size: int, part_size: int = PART) -> bytes:
    """The bytes at part `idx`'s place in the upload's data file (where parts are written)."""
    with open(server.data_dir / "uploads" / upload_id / "data", "rb") as f:
        f.seek(idx * part_size)
        return f.read(size)


def recorded(server: LiveServer, upload_id: str) -> list[int]:
    rows = db_rows(server, "SELECT idx FROM parts WHERE upload_id = ? ORDER BY idx", [upload_id])
    return [r["idx"] for r in rows]


def raw_files(server: LiveServer) -> set[str]:
    return {p.name for p in (server.data_dir / "raw").iterdir()}


def db_rows(server: LiveServer, sql: str, params=()) -> list[dict]:
    db = sqlite3.connect(f"file:{server.data_dir / 'cryomamba.sqlite3'}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in db.execute(sql, params).fetchall()]
    finally:
        db.close()


def assert_raw_consistent(server: LiveServer) -> dict[str, dict]:
    """Every file in raw/ is whole and a files record points to it (and the reverse)."""
    rows = {Path(r["path"]).name: r for r in db_rows(server, "SELECT * FROM files")}
    assert raw_files(server) == set(rows)
    for name, row in rows.items():
        data = (server.data_dir / "raw" / name).read_bytes()
        assert len(data) == row["size"]
        assert sha256(data) == row["sha256"]
    return rows


def hold_part_open(
    server: LiveServer, token: str, upload_id: str, idx: int, size: int, sent: bytes
) -> socket.socket:
    """A PUT that announces `size` bytes, sends only `sent`, and stays open (a part in flight)."""
    sock = socket.create_connection(("127.0.0.1", server.port))
    head = (
        f"PUT /v1/uploads/{upload_id}/part/{idx} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {token}\r\nContent-Length: {size}\r\n\r\n"
    )
    sock.sendall(head.encode() + sent)
    return sock


# -- fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model):
    srv = LiveServer(
        tmp_path_factory.mktemp("uploads") / "data",
        models_dir=tiny_model.parent,
        extra_args=["--rate-limit", "100000"],  # the tests here are many and quick
    )
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def token(server) -> str:
    return server.token("alice", "read,upload,submit")


@pytest.fixture
def client(server, token):
    with server.client(token) as c:
        yield c


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> bytes:
    """A valid ~20 MiB float32 MRC: three parts of 8 MiB."""
    data = write_mrc(tmp_path_factory.mktemp("src") / "big.mrc", SHAPE, seed=3)
    assert len(parts_of(data)) == 3
    return data


@pytest.fixture
def fresh_big(tmp_path, request) -> bytes:
    """A ~20 MiB MRC unique to the test, so no upload of it is resumed from another test."""
    seed = int(sha256(request.node.nodeid.encode())[:8], 16)
    return write_mrc(tmp_path / "f.mrc", SHAPE, seed=seed)


# -- the happy path --------------------------------------------------------------------------
def test_out_of_order_parts_assemble_a_byte_identical_file(server, client, big):
    before = raw_files(server)
    resp = init(client, big, "big.mrc")
    assert resp.status_code == 201
    rec = resp.json()
    assert rec["part_size"] == PART and rec["parts_total"] == 3 and rec["parts_received"] == []
    assert rec["state"] == "open" and rec["size"] == len(big)
    chunks = parts_of(big)
    for idx in (2, 0, 1):
        r = put(client, rec["upload_id"], idx, chunks[idx])
        assert r.status_code == 200, r.text
        assert r.json()["index"] == idx and r.json()["sha256"] == sha256(chunks[idx])
    status = client.get(f"/v1/uploads/{rec['upload_id']}").json()
    assert status["parts_received"] == [0, 1, 2]

    done = client.post(f"/v1/uploads/{rec['upload_id']}/complete")
    assert done.status_code == 201, done.text
    f = done.json()
    assert f["filename"] == "big.mrc" and f["size"] == len(big) and f["sha256"] == sha256(big)
    assert f["shape"] == list(SHAPE) and f["voxel_size"] == [10.0, 10.0, 10.0]
    assert f["dtype"] == "float32"
    new = raw_files(server) - before
    assert new == {f"{f['file_id']}.mrc"}
    assert (server.data_dir / "raw" / f"{f['file_id']}.mrc").read_bytes() == big
    assert not list((server.data_dir / "uploads").glob(f"{rec['upload_id']}*"))

    # complete is idempotent; the upload now names its file; parts are refused
    again = client.post(f"/v1/uploads/{rec['upload_id']}/complete")
    assert again.status_code == 200 and again.json()["file_id"] == f["file_id"]
    status = client.get(f"/v1/uploads/{rec['upload_id']}").json()
    assert status["state"] == "completed" and status["file_id"] == f["file_id"]
    assert_error(put(client, rec["upload_id"], 0, chunks[0]), 409, "upload_not_open")
    # the same file announced again by its owner is the finished upload, not a new one
    resumed = init(client, big, "big.mrc")
    assert resumed.status_code == 200
    assert resumed.json()["upload_id"] == rec["upload_id"]
    assert resumed.json()["file_id"] == f["file_id"]
    assert raw_files(server) - before == new


def test_default_part_size_and_single_part_file(server, client, tmp_path):
    data = write_mrc(tmp_path / "small.mrc", (16, 32, 32))
    rec = init(client, data, "small.mrc", part_size=None).json()
    assert rec["part_size"] == 16 * MiB and rec["parts_total"] == 1
    assert put(client, rec["upload_id"], 0, data, checksum=None).status_code == 200
    f = client.post(f"/v1/uploads/{rec['upload_id']}/complete").json()
    assert f["shape"] == [16, 32, 32]
    assert (server.data_dir / "raw" / f"{f['file_id']}.mrc").read_bytes() == data


# -- parts -----------------------------------------------------------------------------------
def test_part_checks(server, client, fresh_big):
    chunks = parts_of(fresh_big)
    rec = init(client, fresh_big, "parts.mrc").json()
    uid = rec["upload_id"]

    first = put(client, uid, 0, chunks[0])
    again = put(client, uid, 0, chunks[0])
    assert first.status_code == again.status_code == 200
    assert again.json() == first.json()
    assert first.json()["parts_received"] == [0] and first.json()["parts_received_count"] == 1

    # a damaged part is refused, retryable, and does not count
    damaged = bytes([chunks[1][0] ^ 0xFF]) + chunks[1][1:]
    err = assert_error(
        put(client, uid, 1, damaged, checksum=sha256(chunks[1])), 422, "checksum_mismatch"
    )
    assert err["retryable"] is True
    assert client.get(f"/v1/uploads/{uid}").json()["parts_received"] == [0]
    # ... nor does it replace a part already held
    assert_error(put(client, uid, 0, damaged, checksum=sha256(chunks[0])), 422, "checksum_mismatch")
    assert client.get(f"/v1/uploads/{uid}").json()["parts_received"] == [0]
    assert held(server, uid, 0, len(chunks[0])) == chunks[0]
    assert held(server, uid, 1, len(chunks[1])) == bytes(len(chunks[1]))  # never written

    assert_error(put(client, uid, 1, chunks[1][:-1]), 422, "part_size_mismatch")
    assert_error(put(client, uid, 2, chunks[2] + b"x"), 422, "part_size_mismatch")
    assert_error(put(client, uid, 2, chunks[1]), 422, "part_size_mismatch")  # last is shorter
    assert_error(put(client, uid, 3, chunks[2]), 422, "part_out_of_range")
    assert_error(put(client, uid, -1, chunks[0]), 422, "part_out_of_range")
    resp = client.put(f"/v1/uploads/{uid}/part/one", content=chunks[0])
    assert_error(resp, 422, "part_out_of_range")
    assert_error(put(client, uid, 1, chunks[1], checksum="abc"), 422, "invalid_request")
    assert client.get(f"/v1/uploads/{uid}").json()["parts_received"] == [0]
    assert recorded(server, uid) == [0]
    assert [p.name for p in (server.data_dir / "uploads" / uid).iterdir()] == ["data"]
    assert (server.data_dir / "uploads" / uid / "data").stat().st_size == len(fresh_big)
    assert held(server, uid, 2, len(chunks[2])) == bytes(len(chunks[2]))

    # an uppercase part checksum is accepted
    assert put(client, uid, 1, chunks[1], checksum=sha256(chunks[1]).upper()).status_code == 200
    assert_error(client.put("/v1/uploads/nope/part/0", content=b"x"), 404, "not_found")


def test_part_streamed_without_content_length(server, client, fresh_big):
    """A chunked PUT is measured as it streams: too long or too short is refused."""
    chunks = parts_of(fresh_big)
    uid = init(client, fresh_big, "stream.mrc").json()["upload_id"]

    def stream(data: bytes):
        for i in range(0, len(data), MiB):
            yield data[i : i + MiB]

    resp = client.put(f"/v1/uploads/{uid}/part/2", content=stream(chunks[2] + b"xx"))
    assert_error(resp, 422, "part_size_mismatch")
    resp = client.put(f"/v1/uploads/{uid}/part/2", content=stream(chunks[2][:-5]))
    assert_error(resp, 422, "part_size_mismatch")
    assert client.get(f"/v1/uploads/{uid}").json()["parts_received"] == []
    resp = client.put(f"/v1/uploads/{uid}/part/2", content=stream(chunks[2]))
    assert resp.status_code == 200 and resp.json()["sha256"] == sha256(chunks[2])


# -- init ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"size": 10}, 422, "invalid_request"),
        ({"filename": "", "size": 10}, 422, "invalid_request"),
        ({"filename": "..", "size": 10}, 422, "invalid_request"),
        ({"filename": "a\x00b.mrc", "size": 10}, 422, "invalid_request"),
        ({"filename": "t.mrc", "size": 0}, 422, "invalid_request"),
        ({"filename": "t.mrc", "size": "10"}, 422, "invalid_request"),
        ({"filename": "t.mrc", "size": True}, 422, "invalid_request"),
        ({"filename": "t.mrc", "size": 10, "sha256": "A" * 64}, 422, "invalid_request"),
        ({"filename": "t.mrc", "size": 10, "fingerprint": "f" * 63}, 422, "invalid_request"),
        ({"filename": "t.mrc", "size": 10, "part_size": MiB}, 422, "invalid_part_size"),
        ({"filename": "t.mrc", "size": 10, "part_size": 64 * MiB}, 422, "invalid_part_size"),
        ({"filename": "t.mrc", "size": 10, "part_size": 8.5 * MiB}, 422, "invalid_part_size"),
    ],
)
def test_init_refuses_bad_requests(client, body, status, code):
    assert_error(client.post("/v1/uploads/init", json=body), status, code)


@pytest.mark.parametrize(
    ("raw", "status", "code"),
    [
        (b"{not json", 400, "invalid_json"),
        (b"", 422, "invalid_request"),
        (b"[1, 2]", 422, "invalid_request"),
        (b'{"filename": "\\ud800.mrc", "size": 10}', 422, "invalid_request"),  # lone surrogate
        (b'{"filename": "t.mrc", "size": 1e3}', 422, "invalid_request"),
    ],
)
def test_init_refuses_bad_json(client, raw, status, code):
    resp = client.post(
        "/v1/uploads/init", content=raw, headers={"Content-Type": "application/json"}
    )
    assert_error(resp, status, code)


def test_json_bodies_are_bounded(client):
    huge = b'{"filename": "' + b"a" * (2 * MiB) + b'", "size": 10}'
    for route in ("/v1/uploads/init", "/v1/jobs"):
        assert_error(client.post(route, content=huge), 413, "request_too_large")
        # without a Content-Length the server stops reading at the limit
        chunks = (huge[i : i + 65536] for i in range(0, len(huge), 65536))
        assert_error(client.post(route, content=chunks), 413, "request_too_large")


def test_init_keeps_only_the_base_name(client):
    rec = init(client, b"x" * 100, "../../etc/passwd").json()
    assert rec["filename"] == "passwd"
    rec = init(client, b"x" * 100, "C:\\data\\tomo 1.mrc").json()
    assert rec["filename"] == "tomo 1.mrc"


# -- resume ----------------------------------------------------------------------------------
def test_resume_by_fingerprint(server, client, fresh_big):
    chunks = parts_of(fresh_big)
    first = init(client, fresh_big, "resume.mrc")
    assert first.status_code == 201
    uid = first.json()["upload_id"]
    assert put(client, uid, 1, chunks[1]).status_code == 200

    again = init(client, fresh_big, "resume.mrc")
    assert again.status_code == 200
    assert again.json()["upload_id"] == uid and again.json()["parts_received"] == [1]
    # the server's part size wins on resume
    other_size = init(client, fresh_big, "resume.mrc", part_size=16 * MiB)
    assert other_size.json()["upload_id"] == uid and other_size.json()["part_size"] == PART

    # another file name, or another owner, is another upload
    assert init(client, fresh_big, "other.mrc").json()["upload_id"] != uid
    with server.client(server.token("bob", "upload")) as bob:
        theirs = init(bob, fresh_big, "resume.mrc")
        assert theirs.status_code == 201 and theirs.json()["upload_id"] != uid
        assert theirs.json()["parts_received"] == []
        assert_error(bob.get(f"/v1/uploads/{uid}"), 404, "not_found")
        assert_error(put(bob, uid, 0, chunks[0]), 404, "not_found")
        assert_error(bob.post(f"/v1/uploads/{uid}/complete"), 404, "not_found")
    with server.client(server.token("root", "admin")) as admin:
        assert admin.get(f"/v1/uploads/{uid}").json()["parts_received"] == [1]

    for idx in (0, 2):
        assert put(client, uid, idx, chunks[idx]).status_code == 200
    f = client.post(f"/v1/uploads/{uid}/complete").json()
    assert (server.data_dir / "raw" / f"{f['file_id']}.mrc").read_bytes() == fresh_big


def test_no_resume_without_a_checksum(server, client, tmp_path):
    """Name and size alone do not identify a file: two tomograms of one shape must not mix."""
    a = write_mrc(tmp_path / "a.mrc", (16, 32, 32), seed=1)
    b = write_mrc(tmp_path / "b.mrc", (16, 32, 32), seed=2)
    assert len(a) == len(b) and a != b
    ra = init(client, a, "same-name.mrc", sha=False)
    assert ra.status_code == 201
    uid = ra.json()["upload_id"]
    assert put(client, uid, 0, a).status_code == 200
    rb = init(client, b, "same-name.mrc", sha=False)
    assert rb.status_code == 201 and rb.json()["upload_id"] != uid
    assert rb.json()["parts_received"] == []
    fa = client.post(f"/v1/uploads/{uid}/complete").json()
    rb2 = init(client, b, "same-name.mrc", sha=False)
    assert rb2.status_code == 201 and rb2.json()["file_id"] is None
    assert (server.data_dir / "raw" / f"{fa['file_id']}.mrc").read_bytes() == a


# -- complete --------------------------------------------------------------------------------
def test_concurrent_completes_make_one_file(server, token, tmp_path):
    before = raw_files(server)
    data = write_mrc(tmp_path / "twice.mrc", (16, 32, 32), seed=21)
    with server.client(token) as c:
        uid = init(c, data, "twice.mrc").json()["upload_id"]
        assert put(c, uid, 0, data).status_code == 200

    def complete(_) -> httpx.Response:
        with server.client(token) as c:
            return c.post(f"/v1/uploads/{uid}/complete")

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(complete, range(4)))
    assert sorted(r.status_code for r in answers) == [200, 200, 200, 201]
    assert len({r.json()["file_id"] for r in answers}) == 1
    assert raw_files(server) - before == {f"{answers[0].json()['file_id']}.mrc"}


def test_a_replaced_part_is_hashed_again(server, client, fresh_big):
    """Parts hashed as they arrived, then one replaced: complete hashes what is on disk."""
    chunks = parts_of(fresh_big)
    junk = np.random.default_rng(4).bytes(len(chunks[0]))
    uid = init(client, fresh_big, "replaced.mrc").json()["upload_id"]
    for idx, chunk in enumerate(chunks):
        assert put(client, uid, idx, chunk).status_code == 200
    assert put(client, uid, 0, junk).status_code == 200  # other bytes, their own checksum
    assert held(server, uid, 0, len(junk)) == junk and recorded(server, uid) == [0, 1, 2]
    assert put(client, uid, 0, chunks[0]).status_code == 200
    f = client.post(f"/v1/uploads/{uid}/complete").json()
    assert f["sha256"] == sha256(fresh_big)
    assert (server.data_dir / "raw" / f"{f['file_id']}.mrc").read_bytes() == fresh_big

    other = init(client, fresh_big, "replaced-late.mrc").json()["upload_id"]
    for idx, chunk in enumerate([junk, *chunks[1:]]):
        assert put(client, other, idx, chunk).status_code == 200
    err = assert_error(client.post(f"/v1/uploads/{other}/complete"), 422, "checksum_mismatch")
    assert sha256(junk + b"".join(chunks[1:])) in err["message"]


def test_resume_by_fingerprint_then_complete_with_the_sha256(server, client, fresh_big):
    """A fingerprint resumes an open upload; `complete` must then carry the whole SHA-256."""
    chunks = parts_of(fresh_big)
    fp = sha256(b"sampled " + fresh_big[:100])  # the server treats it as an opaque name
    first = init(client, fresh_big, "fp.mrc", sha=False, fingerprint=fp)
    assert first.status_code == 201 and first.json()["fingerprint"] == fp
    uid = first.json()["upload_id"]
    assert put(client, uid, 1, chunks[1]).status_code == 200
    again = init(client, fresh_big, "fp.mrc", sha=False, fingerprint=fp)
    assert again.status_code == 200 and again.json()["upload_id"] == uid
    assert again.json()["parts_received"] == [1]
    for idx in (0, 2):
        assert put(client, uid, idx, chunks[idx]).status_code == 200

    done = f"/v1/uploads/{uid}/complete"
    assert_error(client.post(done), 422, "sha256_required")
    assert_error(client.post(done, content=b"{nope"), 400, "invalid_json")
    assert_error(client.post(done, json={"sha256": "ABC"}), 422, "invalid_request")
    assert client.get(f"/v1/uploads/{uid}").json()["state"] == "open"
    f = client.post(done, json={"sha256": sha256(fresh_big)})
    assert f.status_code == 201 and f.json()["sha256"] == sha256(fresh_big)
    # announced again by fingerprint: the finished upload, with the SHA-256 to compare
    later = init(client, fresh_big, "fp.mrc", sha=False, fingerprint=fp).json()
    assert later["state"] == "completed" and later["file_id"] == f.json()["file_id"]
    assert later["sha256"] == sha256(fresh_big)

    # a fingerprint that matched another file's upload: complete refuses the mix
    liar = init(client, fresh_big, "fp-liar.mrc", sha=False, fingerprint=fp).json()["upload_id"]
    for idx, chunk in enumerate(chunks):
        assert put(client, liar, idx, chunk).status_code == 200
    wrong = sha256(fresh_big + b"other")
    resp = client.post(f"/v1/uploads/{liar}/complete", json={"sha256": wrong})
    err = assert_error(resp, 422, "checksum_mismatch")
    assert sha256(fresh_big) in err["message"] and wrong in err["message"]
    assert client.get(f"/v1/uploads/{liar}").json()["state"] == "rejected"


def test_complete_with_missing_parts(client, fresh_big):
    chunks = parts_of(fresh_big)
    uid = init(client, fresh_big, "missing.mrc").json()["upload_id"]
    assert put(client, uid, 1, chunks[1]).status_code == 200
    err = assert_error(client.post(f"/v1/uploads/{uid}/complete"), 409, "missing_parts")
    assert err["retryable"] is True and err["details"]["missing"] == [0, 2]
    assert "0, 2" in err["message"]
    assert client.get(f"/v1/uploads/{uid}").json()["state"] == "open"


def test_complete_refuses_a_wrong_whole_checksum(server, client, fresh_big):
    before = raw_files(server)
    chunks = parts_of(fresh_big)
    rec = init(client, fresh_big, "liar.mrc", sha=False, sha256=sha256(fresh_big + b"other")).json()
    for idx, chunk in enumerate(chunks):
        assert put(client, rec["upload_id"], idx, chunk).status_code == 200
    err = assert_error(
        client.post(f"/v1/uploads/{rec['upload_id']}/complete"), 422, "checksum_mismatch"
    )
    assert sha256(fresh_big) in err["message"]
    assert raw_files(server) == before
    assert not (server.data_dir / "uploads" / rec["upload_id"]).exists()
    status = client.get(f"/v1/uploads/{rec['upload_id']}").json()
    assert status["state"] == "rejected" and status["parts_received"] == []
    assert_error(put(client, rec["upload_id"], 0, chunks[0]), 409, "upload_not_open")
    assert_error(client.post(f"/v1/uploads/{rec['upload_id']}/complete"), 409, "upload_not_open")


def _corrupt(kind: str, tmp_path: Path) -> bytes:
    good = write_mrc(tmp_path / "good.mrc", (16, 32, 32))
    if kind == "truncated":
        return good[:-1000]
    if kind == "header-only":
        return good[:1024]
    if kind == "too-long":
        return good + b"\0" * 4096
    if kind == "short":
        return good[:500]
    if kind == "bad-dims":
        return good[:0] + np.int32(-5).tobytes() + good[4:]
    if kind == "png":
        return b"\x89PNG\r\n\x1a\n" + bytes(2000)
    return np.random.default_rng(5).bytes(70_000)  # noise


@pytest.mark.parametrize(
    "kind", ["truncated", "header-only", "too-long", "short", "bad-dims", "png", "noise"]
)
def test_complete_refuses_a_corrupt_volume(server, client, tmp_path, kind):
    before = raw_files(server)
    data = _corrupt(kind, tmp_path)
    rec = init(client, data, f"broken-{kind}.mrc").json()
    assert put(client, rec["upload_id"], 0, data).status_code == 200
    err = assert_error(
        client.post(f"/v1/uploads/{rec['upload_id']}/complete"), 422, "invalid_volume"
    )
    text = err["message"] + err["hint"]
    assert f"broken-{kind}.mrc" in err["message"]
    assert str(server.data_dir) not in text and ".tmp-" not in text and "raw" not in text
    assert raw_files(server) == before
    assert not (server.data_dir / "uploads" / rec["upload_id"]).exists()
    assert client.get(f"/v1/uploads/{rec['upload_id']}").json()["state"] == "rejected"


def test_metrics_count_requests_and_upload_bytes(server, client, tmp_path):
    def scrape() -> str:
        return httpx.get(f"{server.url}/metrics").text

    def value(text: str, name: str) -> float:
        lines = [ln for ln in text.splitlines() if ln.startswith(name + " ")]
        return float(lines[0].split()[-1]) if lines else 0.0

    before = value(scrape(), "cryomamba_upload_bytes_total")
    upload(client, write_mrc(tmp_path / "m.mrc", (16, 32, 32), seed=9), "m.mrc")
    text = scrape()
    assert value(text, "cryomamba_upload_bytes_total") - before == 16 * 32 * 32 * 4 + 1024
    assert (
        'cryomamba_http_requests_total{method="PUT",route="/v1/uploads/{upload_id}/part/{idx}"'
        ',status="200"}'
    ) in text
    assert (
        'cryomamba_http_requests_total{method="POST",route="/v1/uploads/{upload_id}/complete"'
        ',status="201"}'
    ) in text
    assert 'cryomamba_http_requests_total{method="POST",route="/v1/uploads/init"' in text


# -- limits ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_server(tmp_path_factory):
    srv = LiveServer(
        tmp_path_factory.mktemp("small") / "data",
        extra_args=["--max-upload-size", "1M", "--upload-concurrency", "1"],
    )
    srv.start()
    yield srv
    srv.stop()


def test_oversize_upload_is_refused_at_init(small_server):
    def uploads() -> int:
        return len(db_rows(small_server, "SELECT id FROM uploads WHERE owner = 'carol'"))

    with small_server.client(small_server.token("carol", "upload")) as c:
        resp = c.post("/v1/uploads/init", json={"filename": "t.mrc", "size": MiB + 1})
        err = assert_error(resp, 413, "upload_too_large")
        assert str(MiB) in err["message"] and err["hint"]
        assert uploads() == 0
        resp = c.post("/v1/uploads/init", json={"filename": "t.mrc", "size": MiB})
        assert resp.status_code == 201 and uploads() == 1


def test_parts_in_flight_are_limited_and_released(small_server):
    token = small_server.token("dave", "upload")
    data = np.random.default_rng(1).bytes(200_000)
    with small_server.client(token) as c:
        uid = init(c, data, "flight.bin").json()["upload_id"]
        sock = hold_part_open(small_server, token, uid, 0, len(data), data[:1000])
        try:
            # Once the server is reading the held part, a second part in flight is refused.
            # (Until then a PUT may pass, or even be the one in flight that gets the held
            # part refused: then hold another.)
            deadline = time.monotonic() + 30
            while (resp := put(c, uid, 0, data)).status_code == 200:
                assert time.monotonic() < deadline
                sock.setblocking(False)
                try:
                    answered = sock.recv(100)
                except BlockingIOError:
                    answered = b""
                if answered:
                    assert answered.startswith(b"HTTP/1.1 429")
                    sock.close()
                    sock = hold_part_open(small_server, token, uid, 0, len(data), data[:1000])
                time.sleep(0.05)
            err = assert_error(resp, 429, "too_many_parts_in_flight")
            assert err["retryable"] is True and resp.headers["Retry-After"] == "1"
        finally:
            sock.close()
        # the abandoned part frees its slot
        deadline = time.monotonic() + 30
        while (resp := put(c, uid, 0, data)).status_code == 429 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert resp.status_code == 200
        assert c.get(f"/v1/uploads/{uid}").json()["parts_received"] == [0]
    assert "unhandled error" not in small_server.log()  # a client going away is no bug


# -- crashes ---------------------------------------------------------------------------------
@pytest.fixture
def crash_server(tmp_path):
    srv = LiveServer(tmp_path / "data", extra_args=["--rate-limit", "100000"])
    srv.start()
    yield srv
    srv.stop()


@pytest.mark.slow
def test_sigkill_mid_upload_keeps_every_acknowledged_part(crash_server, fresh_big):
    srv = crash_server
    token = srv.token("erin", "upload")
    chunks = parts_of(fresh_big)
    with srv.client(token) as c:
        uid = init(c, fresh_big, "crash.mrc").json()["upload_id"]
        for idx in (0, 2):
            assert put(c, uid, idx, chunks[idx]).status_code == 200
        sock = hold_part_open(srv, token, uid, 1, len(chunks[1]), chunks[1][: 3 * MiB])
    srv.kill()
    sock.close()

    # debris a crash can leave at each step of a part write and of a complete
    folder = srv.data_dir / "uploads" / uid
    with open(folder / "data", "r+b") as f:  # part 1 cut short mid-write, never recorded
        f.seek(PART)
        f.write(b"\xff" * MiB)
    (folder / "data.tmp-0badf00d").write_bytes(b"stray")
    (folder / "1.part").write_bytes(chunks[1])  # a part file of the old layout
    (srv.data_dir / "uploads" / ("f" * 32)).mkdir()  # a folder no upload owns
    (srv.data_dir / "raw" / ".0123.mrc.tmp-0badf00d").write_bytes(fresh_big[:MiB])
    (srv.data_dir / "raw" / "0123.mrc").write_bytes(fresh_big)  # renamed, never recorded

    srv.start()
    with srv.client(token) as c:
        status = c.get(f"/v1/uploads/{uid}").json()
        assert status["state"] == "open" and status["parts_received"] == [0, 2]
        assert [p.name for p in folder.iterdir()] == ["data"]
        assert [p.name for p in (srv.data_dir / "uploads").iterdir()] == [uid]
        assert raw_files(srv) == set()
        for idx in (0, 2):
            assert held(srv, uid, idx, len(chunks[idx])) == chunks[idx]

        # the running hash died with the process: it is rebuilt from the recorded parts
        assert put(c, uid, 1, chunks[1]).status_code == 200
        f = c.post(f"/v1/uploads/{uid}/complete").json()
    assert f["sha256"] == sha256(fresh_big)
    assert (srv.data_dir / "raw" / f"{f['file_id']}.mrc").read_bytes() == fresh_big
    assert set(assert_raw_consistent(srv)) == {f"{f['file_id']}.mrc"}


@pytest.mark.slow
def test_sigkill_during_and_after_complete_leaves_only_whole_files(crash_server, tmp_path):
    srv = crash_server
    token = srv.token("frank", "upload")
    data = write_mrc(tmp_path / "c.mrc", (40, 512, 512), seed=11)  # 40 MiB: five parts
    chunks = parts_of(data)
    with srv.client(token) as c:
        uid = init(c, data, "during.mrc").json()["upload_id"]
        for idx, chunk in enumerate(chunks):
            assert put(c, uid, idx, chunk).status_code == 200

    answer: list = []

    def complete() -> None:
        try:
            with srv.client(token) as c:
                answer.append(c.post(f"/v1/uploads/{uid}/complete").status_code)
        except httpx.HTTPError as exc:
            answer.append(exc)

    thread = threading.Thread(target=complete)
    thread.start()
    raw = srv.data_dir / "raw"
    deadline = time.monotonic() + 30
    while not any(raw.iterdir()) and not answer and time.monotonic() < deadline:
        pass  # kill as soon as the assembly shows up in raw/
    srv.kill()
    thread.join(30)

    srv.start()
    files = assert_raw_consistent(srv)
    assert not any(p.name.startswith(".") for p in raw.iterdir())
    with srv.client(token) as c:
        status = c.get(f"/v1/uploads/{uid}").json()
        if status["state"] == "open":  # killed mid-assembly: every part is still there
            assert status["parts_received"] == list(range(len(chunks)))
            resp = c.post(f"/v1/uploads/{uid}/complete")
            assert resp.status_code == 201
        else:
            assert status["state"] == "completed" and f"{status['file_id']}.mrc" in files
        file_id = c.get(f"/v1/uploads/{uid}").json()["file_id"]
        assert (raw / f"{file_id}.mrc").read_bytes() == data

        # killed right after a complete was answered: the file is whole and recorded
        other = write_mrc(tmp_path / "d.mrc", (16, 32, 32), seed=12)
        f = upload(c, other, "after.mrc")
    srv.kill()
    srv.start()
    files = assert_raw_consistent(srv)
    assert f"{f['file_id']}.mrc" in files and (raw / f"{f['file_id']}.mrc").read_bytes() == other
    with srv.client(token) as c:
        assert c.get(f"/v1/uploads/{uid}").json()["state"] == "completed"


# -- expiry ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_expired_upload_is_refused_and_cleaned(tmp_path):
    srv = LiveServer(tmp_path / "data", extra_args=["--upload-ttl", "3s"]).start()
    try:
        token = srv.token("gina", "upload")
        data = np.random.default_rng(2).bytes(PART + 100)
        chunks = parts_of(data)
        with srv.client(token) as c:
            rec = init(c, data, "late.bin").json()
            uid = rec["upload_id"]
            assert put(c, uid, 0, chunks[0]).status_code == 200
            expires = c.get(f"/v1/uploads/{uid}").json()["expires_at"]
            assert expires > rec["expires_at"]  # a part keeps the upload alive
            while time.time() < expires + 0.5:
                time.sleep(0.2)
            assert_error(put(c, uid, 1, chunks[1]), 410, "upload_expired")
            assert_error(c.post(f"/v1/uploads/{uid}/complete"), 410, "upload_expired")
            fresh = init(c, data, "late.bin")  # an expired upload is never resumed
            assert fresh.status_code == 201 and fresh.json()["upload_id"] != uid
        assert held(srv, uid, 0, len(chunks[0])) == chunks[0]

        srv.stop()
        srv.start()  # boot clean-up
        assert not (srv.data_dir / "uploads" / uid).exists()
        with srv.client(token) as c:
            status = c.get(f"/v1/uploads/{uid}").json()
            assert status["state"] == "expired" and status["parts_received"] == []
            assert_error(put(c, uid, 1, chunks[1]), 409, "upload_not_open")
    finally:
        srv.stop()
