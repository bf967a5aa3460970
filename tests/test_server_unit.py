"""Fast in-process tests of the server's pieces: auth, signed URLs, paths, the rate limiter,
settings, clean-up racing with writes, and the app through `httpx.ASGITransport`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import time
from pathlib import Path

import anyio
import httpx
import jwt
import pytest
from server_fixtures import assert_error

from cryomamba.errors import ConfigError
from cryomamba.server import create_app
from cryomamba.server.auth import (
    Principal,
    check_signature,
    decode_token,
    mint_token,
    parse_duration,
    sign_artifact,
)
from cryomamba.server.errors import ApiError
from cryomamba.server.middleware import RateLimitMiddleware, _take_query_token
from cryomamba.server.paths import resolve_server_path
from cryomamba.server.settings import MiB, ServerSettings, load_secret
from cryomamba.server.storage import Storage
from cryomamba.server.uploads import UploadService

SECRET = b"s" * 64


@contextlib.contextmanager
def raises(status: int, code: str):
    """Like `pytest.raises(ApiError)`, and the error has this status and code."""
    with pytest.raises(ApiError) as info:
        yield info
    assert (info.value.status, info.value.code) == (status, code)


# -- tokens ----------------------------------------------------------------------------------
def test_mint_and_decode_round_trip():
    token = mint_token(SECRET, "alice", ["read", "upload", "read"], 60)
    principal = decode_token(SECRET, token)
    assert principal == Principal("alice", frozenset({"read", "upload"}))
    assert jwt.decode(token, SECRET, algorithms=["HS256"], issuer="cryomamba")["scopes"] == [
        "read",
        "upload",
    ]
    with pytest.raises(ValueError, match="unknown scope"):
        mint_token(SECRET, "alice", ["root"], 60)


def test_decode_refuses_bad_tokens():
    with raises(401, "invalid_token"):
        decode_token(SECRET, mint_token(b"o" * 64, "alice", ["read"], 60))
    with raises(401, "token_expired"):
        decode_token(SECRET, mint_token(SECRET, "alice", ["read"], -10))
    with raises(401, "invalid_token"):
        decode_token(SECRET, "x.y.z")


def test_principal_scopes_and_ownership():
    reader = Principal("bob", frozenset({"read"}))
    reader.require("read")
    with raises(403, "insufficient_scope") as info:
        reader.require("submit")
    assert "read" in info.value.hint
    admin = Principal("root", frozenset({"admin"}))
    for scope in ("read", "upload", "submit"):
        admin.require(scope)
    assert reader.owns("bob") and not reader.owns("alice") and admin.owns("alice")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("90s", 90), ("15m", 900), ("12h", 43200), ("2d", 172800), (" 1.5H ", 5400)],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "s", "soon", "0", "-5m", "inf", "nan", "1e400s"])
def test_parse_duration_refuses(text):
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


# -- signed URLs -----------------------------------------------------------------------------
def test_signed_urls():
    url, exp = sign_artifact(SECRET, "job1", "mask.mrc", 60)
    assert url.startswith("/v1/files/job1/mask.mrc?exp=")
    sig = url.split("sig=")[1]
    check_signature(SECRET, "job1", "mask.mrc", str(exp), sig)
    for job, name, e, s in [
        ("job2", "mask.mrc", str(exp), sig),
        ("job1", "stats.json", str(exp), sig),
        ("job1", "mask.mrc", str(exp + 1), sig),
        ("job1", "mask.mrc", str(exp), sig.upper()),
        ("job1", "mask.mrc", str(exp), "é" + sig[1:]),
        ("job1", "mask.mrc", str(exp), "\udc80"),
        ("job1", "mask.mrc", "1e9", sig),
    ]:
        with raises(403, "bad_signature"):
            check_signature(SECRET, job, name, e, s)
    for e, s in [(None, sig), (str(exp), None), ("", sig), (str(exp), "")]:
        with raises(403, "missing_signature"):
            check_signature(SECRET, "job1", "mask.mrc", e, s)
    url, exp = sign_artifact(SECRET, "job1", "mask.mrc", -1)
    with raises(410, "url_expired"):
        check_signature(SECRET, "job1", "mask.mrc", str(exp), url.split("sig=")[1])


# -- paths -----------------------------------------------------------------------------------
@pytest.fixture
def roots(tmp_path) -> tuple[Path, Path]:
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "out"
    for d in (a, b, out):
        d.mkdir()
    (a / "x.mrc").write_bytes(b"x")
    (b / "y.mrc").write_bytes(b"y")
    (out / "z.mrc").write_bytes(b"z")
    (a / "link").symlink_to(out / "z.mrc")
    (a / "loop").symlink_to(a / "loop")
    return a, b


def test_resolve_server_path(roots, tmp_path):
    a, b = roots
    assert resolve_server_path("x.mrc", roots) == a / "x.mrc"
    assert resolve_server_path("y.mrc", roots) == b / "y.mrc"  # relative: each root in turn
    assert resolve_server_path(str(b / "y.mrc"), roots) == b / "y.mrc"
    for bad in (
        "../out/z.mrc",
        "link",
        str(tmp_path / "out" / "z.mrc"),
        "x\x00",
        "",
        "..\\out\\z.mrc",
        "\ud800",
    ):
        with raises(403, "path_not_allowed"):
            resolve_server_path(bad, roots)
    for missing in ("nope.mrc", "loop", ".", "a" * 10_000):
        with raises(404, "file_not_found"):
            resolve_server_path(missing, roots)
    with raises(403, "server_paths_disabled"):
        resolve_server_path("x.mrc", ())


def test_symlinked_root_is_resolved(roots, tmp_path):
    a, _ = roots
    (tmp_path / "alias").symlink_to(a, target_is_directory=True)
    assert resolve_server_path("x.mrc", (tmp_path / "alias",)) == a / "x.mrc"


# -- middleware ------------------------------------------------------------------------------
def test_rate_limiter_bucket():
    limiter = RateLimitMiddleware(app=None, per_minute=6)  # one request per 10 s
    t = 1000.0
    assert [limiter.take("u", t) for _ in range(6)] == [0.0] * 6
    assert limiter.take("u", t) == pytest.approx(10.0)
    assert limiter.take("v", t) == 0.0  # another key has its own bucket
    assert limiter.take("u", t + 5) == pytest.approx(5.0)
    assert limiter.take("u", t + 10) == 0.0
    assert limiter.take("u", t + 1000) == 0.0  # refills, but only up to the limit
    assert [limiter.take("u", t + 1000) for _ in range(6)].count(0.0) == 5


@pytest.mark.parametrize(
    ("query", "left", "token"),
    [
        (b"token=abc", b"", "abc"),
        (b"x=1&token=abc&y=2", b"x=1&y=2", "abc"),
        (b"tokens=1", b"tokens=1", None),
        (b"", b"", None),
        (b"token=a%2Bb", b"", "a+b"),
    ],
)
def test_websocket_token_is_taken_out_of_the_query(query, left, token):
    scope = {"type": "websocket", "query_string": query}
    assert _take_query_token(scope) == token
    assert scope["query_string"] == left


# -- settings --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "changes",
    [
        {"part_size": MiB},
        {"part_size": 64 * MiB},
        {"on_restart": "retry"},
        {"rate_limit_per_min": 0},
        {"upload_concurrency": 0},
        {"ssl_certfile": Path("c.pem")},
    ],
)
def test_settings_refuse_bad_values(changes):
    with pytest.raises(ConfigError):
        ServerSettings(**changes)


def test_secret(tmp_path, monkeypatch):
    monkeypatch.delenv("CRYOMAMBA_SECRET", raising=False)
    settings = ServerSettings(data_dir=tmp_path / "d")
    with pytest.raises(ConfigError, match="no secret"):
        load_secret(settings, create=False)
    secret = load_secret(settings)
    assert len(secret) == 64 and load_secret(settings, create=False) == secret
    assert (settings.secret_path.stat().st_mode & 0o777) == 0o600
    monkeypatch.setenv("CRYOMAMBA_SECRET", "e" * 40)
    assert load_secret(settings) == b"e" * 40
    monkeypatch.setenv("CRYOMAMBA_SECRET", "short")
    with pytest.raises(ConfigError, match="too short"):
        load_secret(settings)


# -- clean-up while parts and files are being written ----------------------------------------
@pytest.fixture
def service(tmp_path):
    settings = ServerSettings(data_dir=tmp_path / "data")
    for d in (settings.raw_dir, settings.uploads_dir):
        d.mkdir(parents=True)
    storage = Storage(settings.db_path)
    yield UploadService(settings, storage).store, storage
    storage.close()


def _open_upload(up, storage: Storage, data: bytes, upload_id: str = "u1") -> dict:
    now = time.time()
    row = {
        "id": upload_id,
        "owner": "alice",
        "filename": "t.mrc",
        "size": len(data),
        "sha256": None,
        "part_size": 8 * MiB,
        "parts_total": 1,
        "state": "open",
        "file_id": None,
        "created_at": now,
        "expires_at": now + 3600,
    }
    up.open_upload(row)
    return storage.upload(upload_id)


def test_clean_spares_an_upload_being_opened(service, monkeypatch):
    """clean() between allocating the data file and recording the upload must not delete it."""
    up, storage = service
    record = storage.add_upload

    def add_upload_after_a_clean(row):
        up.clean()
        record(row)

    monkeypatch.setattr(storage, "add_upload", add_upload_after_a_clean)
    _open_upload(up, storage, b"p" * 100)
    assert up.data_path("u1").stat().st_size == 100
    up.clean()
    assert up.data_path("u1").exists()


def test_clean_spares_a_part_being_recorded(service, monkeypatch):
    """clean() between a part's write and its database row must not touch the part."""
    up, storage = service
    row = _open_upload(up, storage, b"p" * 100)
    record = storage.add_part

    def add_part_after_a_clean(*args):
        up.clean()
        record(*args)

    monkeypatch.setattr(storage, "add_part", add_part_after_a_clean)
    up.store_part(row, 0, bytearray(b"p" * 100), None)
    assert up.data_path("u1").read_bytes() == b"p" * 100
    assert list(storage.parts("u1")) == [0]
    up.clean()  # with nothing in progress the part is known and stays
    assert up.data_path("u1").read_bytes() == b"p" * 100


def test_clean_spares_a_file_being_assembled(service, monkeypatch, mrc_file):
    """clean() between the link into raw/ and the files row must not delete the file."""
    up, storage = service
    data = mrc_file.read_bytes()
    row = _open_upload(up, storage, data)
    up.store_part(row, 0, bytearray(data), None)
    commit = storage.complete_upload

    def complete_after_a_clean(*args):
        up.clean()
        commit(*args)

    monkeypatch.setattr(storage, "complete_upload", complete_after_a_clean)
    file_row = up.assemble(storage.upload("u1"))
    assert Path(file_row["path"]).read_bytes() == data
    assert file_row["sha256"] == hashlib.sha256(data).hexdigest()
    assert storage.upload(row["id"])["state"] == "completed"
    up.clean()
    assert Path(file_row["path"]).exists() and list(up.settings.raw_dir.iterdir()) == [
        Path(file_row["path"])
    ]
    assert not up.part_dir("u1").exists()


def test_clean_removes_debris_when_idle(service):
    up, storage = service
    row = _open_upload(up, storage, b"p" * 100)
    up.store_part(row, 0, bytearray(b"p" * 100), None)
    folder = up.part_dir("u1")
    (folder / "data.tmp-1").write_bytes(b"half")
    (folder / "3.part").write_bytes(b"unrecorded")  # a part file of the old layout
    (folder / "junk").write_bytes(b"?")
    (up.settings.uploads_dir / "orphan").mkdir()
    (up.settings.raw_dir / ".f.mrc.tmp-1").write_bytes(b"half")
    (up.settings.raw_dir / "f.mrc").write_bytes(b"unrecorded")
    assert up.clean() == {"expired_uploads": 0, "orphans": 6}
    assert [p.name for p in folder.iterdir()] == ["data"]
    assert [p.name for p in up.settings.uploads_dir.iterdir()] == ["u1"]
    assert list(up.settings.raw_dir.iterdir()) == []
    assert list(storage.parts("u1")) == [0]


def test_an_upload_without_its_data_file_forgets_its_parts(service):
    """Parts recorded before the one-file layout (or a lost file) no longer count."""
    up, storage = service
    row = _open_upload(up, storage, b"p" * 100)
    up.store_part(row, 0, bytearray(b"p" * 100), None)
    up.data_path("u1").unlink()
    (up.part_dir("u1") / "0.part").write_bytes(b"p" * 100)
    up.clean()
    assert storage.parts("u1") == {} and storage.upload("u1")["state"] == "open"
    up.store_part(row, 0, bytearray(b"q" * 100), None)  # sent again: a new data file
    assert up.data_path("u1").read_bytes() == b"q" * 100


def test_init_takes_no_disk_until_parts_arrive(service):
    """The data file has the declared size but no blocks: an `init` holds no disk."""
    up, storage = service
    row = _open_upload(up, storage, bytes(64 * MiB))
    st = up.data_path("u1").stat()
    assert st.st_size == 64 * MiB and st.st_blocks * 512 < MiB
    up.store_part(row, 0, bytearray(b"p" * 8 * MiB), None)
    assert up.data_path("u1").stat().st_blocks * 512 >= 8 * MiB


def test_a_full_disk_refuses_the_part_and_keeps_nothing(service, monkeypatch):
    up, storage = service
    row = _open_upload(up, storage, b"p" * 100)

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as m:
        m.setattr(os, "pwrite", full)
        with pytest.raises(ApiError) as caught:
            up.store_part(row, 0, bytearray(b"p" * 100), None)
    assert caught.value.status == 507 and caught.value.code == "insufficient_storage"
    assert caught.value.retryable and "part 0" in caught.value.message and caught.value.hint
    assert storage.parts("u1") == {}
    up.store_part(row, 0, bytearray(b"p" * 100), None)  # space again: sent again, kept
    assert list(storage.parts("u1")) == [0]


# -- the app in process ----------------------------------------------------------------------
def _run_app(tmp_path: Path, scenario) -> None:
    """Run `scenario(client, token)` against an app whose storage and workers are booted."""
    settings = ServerSettings(data_dir=tmp_path / "data", devices=("cpu",))
    app = create_app(settings)
    server = app.state.server
    server.boot()
    token = mint_token(server.secret, "alice", ["read", "upload", "submit"], 600)

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            await scenario(client, token)

    try:
        anyio.run(main)
    finally:
        server.shutdown()


def test_app_errors_are_envelopes(tmp_path):
    async def scenario(c: httpx.AsyncClient, token: str) -> None:
        auth = {"Authorization": f"Bearer {token}"}
        assert_error(await c.get("/v1/jobs"), 401, "missing_token")
        assert_error(await c.get("/v1/nowhere", headers=auth), 404, "not_found")
        assert_error(await c.get("/nowhere"), 404, "not_found")
        resp = await c.delete("/v1/uploads/init", headers=auth)
        err = assert_error(resp, 405, "method_not_allowed")
        assert err["retryable"] is False
        assert_error(await c.get("/v1/uploads/nope", headers=auth), 404, "not_found")
        resp = await c.get("/v1/healthz", headers={"X-Request-ID": "abc-1;drop"})
        assert resp.headers["x-request-id"] == "abc-1drop"

    _run_app(tmp_path, scenario)


def test_app_upload_round_trip(tmp_path, mrc_file):
    data = mrc_file.read_bytes()
    sha = hashlib.sha256(data).hexdigest()

    async def scenario(c: httpx.AsyncClient, token: str) -> None:
        auth = {"Authorization": f"Bearer {token}"}
        body = {"filename": "tomo.mrc", "size": len(data), "sha256": sha}
        rec = (await c.post("/v1/uploads/init", json=body, headers=auth)).json()
        resp = await c.put(
            f"/v1/uploads/{rec['upload_id']}/part/0",
            content=data,
            headers={**auth, "X-Part-SHA256": sha},
        )
        assert resp.status_code == 200
        resp = await c.post(f"/v1/uploads/{rec['upload_id']}/complete", headers=auth)
        assert resp.status_code == 201
        f = resp.json()
        assert f["shape"] == [30, 40, 36] and f["voxel_size"] == [10.0, 10.0, 10.0]
        raw = tmp_path / "data" / "raw" / f"{f['file_id']}.mrc"
        assert raw.read_bytes() == data

    _run_app(tmp_path, scenario)


def test_an_events_wire_text_is_made_once_and_dropped_with_the_event():
    import gc
    import json

    import numpy as np

    from cryomamba.events import Preview
    from cryomamba.server import websocket

    event = Preview(scale=2, shape=(4, 4, 4), labels=np.ones((2, 2, 2), np.uint8), planes_done=4)
    text = websocket.wire_text(event)
    assert json.loads(text) == json.loads(json.dumps(event.to_dict()))
    assert websocket.wire_text(event) is text  # the second socket reuses the first's text
    assert event in websocket._wire_cache
    del event
    gc.collect()
    assert len(websocket._wire_cache) == 0
