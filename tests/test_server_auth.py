"""Who may do what on a real server: tokens, scopes, ownership, WebSockets, signed URLs,
server paths and rate limits; and that no token or signature reaches the server's log.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jwt
import mrcfile
import numpy as np
import pytest
from server_fixtures import LiveServer, assert_error
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from cryomamba.server.auth import sign_artifact

SCOPES_ALL = "read,upload,submit"


# -- helpers ---------------------------------------------------------------------------------
def write_mrc(path: Path, shape=(16, 32, 32), seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(np.random.default_rng(seed).normal(size=shape).astype(np.float32))
        mrc.voxel_size = (10.0, 10.0, 10.0)
    return path


def secret_of(server: LiveServer) -> bytes:
    return (server.data_dir / "secret.key").read_text().strip().encode()


def claims(**changes) -> dict:
    now = int(time.time())
    out = {"sub": "alice", "scopes": ["read"], "iat": now, "exp": now + 600, "iss": "cryomamba"}
    out.update(changes)
    return {k: v for k, v in out.items() if v is not None}


def upload_small(client: httpx.Client, path: Path) -> dict:
    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    rec = client.post(
        "/v1/uploads/init", json={"filename": path.name, "size": len(data), "sha256": sha}
    ).json()
    assert client.put(f"/v1/uploads/{rec['upload_id']}/part/0", content=data).status_code == 200
    resp = client.post(f"/v1/uploads/{rec['upload_id']}/complete")
    assert resp.status_code in (200, 201), resp.text
    return {**resp.json(), "upload_id": rec["upload_id"]}


def wait_for_job(client: httpx.Client, job_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in ("completed", "failed", "canceled"):
            assert job["state"] == "completed", job
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s")


def ws_url(server: LiveServer, job_id: str, query: str = "") -> str:
    return f"ws://127.0.0.1:{server.port}/v1/ws/jobs/{job_id}{query}"


def ws_messages(url: str, headers: dict | None = None) -> tuple[list[dict], int]:
    """Every message a socket gets until the server closes it, and the close code."""
    messages = []
    with connect(url, additional_headers=headers, open_timeout=30) as ws:
        try:
            while True:
                messages.append(json.loads(ws.recv(timeout=30)))
        except ConnectionClosed as exc:
            return messages, exc.rcvd.code


# -- fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A server root with a tomogram, links that stay inside, and links that escape."""
    base = tmp_path_factory.mktemp("paths")
    root, outside = base / "root", base / "outside"
    write_mrc(root / "tomo.mrc")
    write_mrc(root / "sub" / "inner.mrc", seed=1)
    write_mrc(outside / "secret.mrc", seed=2)
    (root / "escape.mrc").symlink_to(outside / "secret.mrc")
    (root / "outdir").symlink_to(outside, target_is_directory=True)
    (root / "inside-link.mrc").symlink_to(root / "tomo.mrc")
    (root / "not-a-volume.mrc").write_bytes(b"hello")
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model, root):
    srv = LiveServer(
        tmp_path_factory.mktemp("auth") / "data",
        models_dir=tiny_model.parent,
        roots=[root],
        # the tests here are many and quick, and many of them fail to authenticate on purpose
        extra_args=["--rate-limit", "100000", "--auth-failures", "100000"],
    )
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def alice_token(server) -> str:
    return server.token("alice", SCOPES_ALL)


@pytest.fixture(scope="module")
def alice(server, alice_token):
    with server.client(alice_token) as c:
        yield c


@pytest.fixture(scope="module")
def bob(server):
    with server.client(server.token("bob", SCOPES_ALL)) as c:
        yield c


@pytest.fixture(scope="module")
def admin(server):
    with server.client(server.token("root", "admin")) as c:
        yield c


@pytest.fixture(scope="module")
def alice_file(alice, tmp_path_factory) -> dict:
    return upload_small(alice, write_mrc(tmp_path_factory.mktemp("up") / "mine.mrc", seed=7))


@pytest.fixture(scope="module")
def job(alice, alice_file) -> dict:
    """A completed job of alice's, with its signed artifact URLs."""
    resp = alice.post(
        "/v1/jobs", json={"file_id": alice_file["file_id"], "config": {"model": "tiny"}}
    )
    assert resp.status_code == 201, resp.text
    return wait_for_job(alice, resp.json()["id"])


# -- tokens ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/jobs"),
        ("POST", "/v1/jobs"),
        ("GET", "/v1/jobs/x"),
        ("DELETE", "/v1/jobs/x"),
        ("GET", "/v1/server/info"),
        ("POST", "/v1/uploads/init"),
        ("GET", "/v1/uploads/x"),
        ("PUT", "/v1/uploads/x/part/0"),
        ("POST", "/v1/uploads/x/complete"),
        ("GET", "/v1/no-such-route"),
    ],
)
def test_no_token_is_401(server, method, path):
    with server.client() as c:
        err = assert_error(c.request(method, path), 401, "missing_token")
        assert "Bearer" in err["hint"]
        for header in ("Basic YWxpY2U6cHc=", "Bearer", "token abc"):
            resp = c.request(method, path, headers={"Authorization": header})
            assert_error(resp, 401, "missing_token")


def test_public_routes_need_no_token(server):
    with server.client() as c:
        assert c.get("/v1/healthz").json()["status"] == "ok"
        assert c.get("/v1/openapi.json").status_code == 200
        assert "cryomamba_http_requests_total" in c.get("/metrics").text


def _bad_tokens(server: LiveServer) -> dict[str, tuple[str, str]]:
    secret = secret_of(server)
    now = int(time.time())
    return {
        "forged": (jwt.encode(claims(), b"x" * 64, algorithm="HS256"), "invalid_token"),
        "not a jwt": ("not-a-jwt", "invalid_token"),
        "three garbage parts": ("abc.def.ghi", "invalid_token"),
        "expired": (
            jwt.encode(claims(iat=now - 100, exp=now - 50), secret, algorithm="HS256"),
            "token_expired",
        ),
        "alg none": (jwt.encode(claims(scopes=["admin"]), None, algorithm="none"), "invalid_token"),
        "HS512": (jwt.encode(claims(), secret, algorithm="HS512"), "invalid_token"),
        "no issuer": (jwt.encode(claims(iss=None), secret, algorithm="HS256"), "invalid_token"),
        "other issuer": (jwt.encode(claims(iss="x"), secret, algorithm="HS256"), "invalid_token"),
        "no subject": (jwt.encode(claims(sub=None), secret, algorithm="HS256"), "invalid_token"),
        "no expiry": (jwt.encode(claims(exp=None), secret, algorithm="HS256"), "invalid_token"),
        "scopes a string": (
            jwt.encode(claims(scopes="admin"), secret, algorithm="HS256"),
            "invalid_token",
        ),
        "future iat": (
            jwt.encode(claims(iat=now + 3600), secret, algorithm="HS256"),
            "invalid_token",
        ),
    }


def test_bad_tokens_are_401(server):
    with server.client() as c:
        for name, (token, code) in _bad_tokens(server).items():
            resp = c.get("/v1/jobs", headers={"Authorization": f"Bearer {token}"})
            err = assert_error(resp, 401, code)
            assert token not in err["message"] + err["hint"], name
    # a hand-made token with the server's secret and the same claims is good
    good = jwt.encode(claims(), secret_of(server), algorithm="HS256")
    with server.client(good) as c:
        assert c.get("/v1/jobs").status_code == 200


def test_token_made_by_the_cli_expires(server):
    token = server.token("short", "read", ttl="1s")
    with server.client(token) as c:
        deadline = time.monotonic() + 30
        while (resp := c.get("/v1/jobs")).status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert_error(resp, 401, "token_expired")


@pytest.mark.parametrize(
    ("scopes", "method", "path", "body", "needed"),
    [
        ("read", "POST", "/v1/uploads/init", {"filename": "t.mrc", "size": 10}, "upload"),
        ("read", "POST", "/v1/uploads/init", None, "upload"),  # the scope is checked first
        ("read", "GET", "/v1/uploads/x", None, "upload"),
        (
            "read",
            "POST",
            "/v1/jobs",
            {"server_path": "tomo.mrc", "config": {"model": "tiny"}},
            "submit",
        ),
        ("read", "DELETE", "/v1/jobs/x", None, "submit"),
        (
            "upload",
            "POST",
            "/v1/jobs",
            {"server_path": "tomo.mrc", "config": {"model": "tiny"}},
            "submit",
        ),
        ("upload", "GET", "/v1/jobs", None, "read"),
        ("upload", "GET", "/v1/jobs/x", None, "read"),
        ("upload", "GET", "/v1/server/info", None, "read"),
        ("submit", "GET", "/v1/jobs", None, "read"),
        ("submit", "PUT", "/v1/uploads/x/part/0", None, "upload"),
    ],
)
def test_missing_scope_is_403(server, scopes, method, path, body, needed):
    with server.client(server.token(f"scoped-{scopes}", scopes)) as c:
        resp = c.request(method, path, json=body)
        err = assert_error(resp, 403, "insufficient_scope")
        assert needed in err["message"] and f"--scopes {needed}" in err["hint"]


def test_token_cli_without_a_secret(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "CRYOMAMBA_SECRET"}

    def token(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "cryomamba", "token", "create", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )

    out = token("--data-dir", str(tmp_path / "nothing"), "--subject", "x")
    assert out.returncode == 2 and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 2, out.stderr
    assert lines[0].startswith("error: no secret at") and lines[1].startswith("hint:")
    assert "CRYOMAMBA_SECRET" in lines[1] and "Traceback" not in out.stderr
    assert not (tmp_path / "nothing").exists()  # minting a token creates no secret

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "secret.key").write_text("a" * 64)
    for args, needle in (
        (("--scopes", "read,root"), "unknown scope"),
        (("--ttl", "soon"), "duration"),
    ):
        out = token("--data-dir", str(tmp_path / "data"), "--subject", "x", *args)
        assert out.returncode == 2 and out.stdout == "", out.stderr
        assert out.stderr.startswith("error:") and needle in out.stderr
        assert "Traceback" not in out.stderr
    (tmp_path / "data" / "secret.key").write_text("short")
    out = token("--data-dir", str(tmp_path / "data"), "--subject", "x")
    assert out.returncode == 2 and "too short" in out.stderr
    out = token(
        "--data-dir",
        str(tmp_path / "data"),
        "--subject",
        "x",
        "--secret-file",
        str(tmp_path / "missing.key"),
    )
    assert out.returncode == 2 and "missing.key" in out.stderr


# -- ownership -------------------------------------------------------------------------------
def test_users_see_only_their_own(server, alice, bob, admin, alice_file, job):
    uid, fid, jid = alice_file["upload_id"], alice_file["file_id"], job["id"]
    assert_error(bob.get(f"/v1/uploads/{uid}"), 404, "not_found")
    assert_error(bob.post(f"/v1/uploads/{uid}/complete"), 404, "not_found")
    assert_error(bob.get(f"/v1/jobs/{jid}"), 404, "not_found")
    assert_error(bob.delete(f"/v1/jobs/{jid}"), 404, "not_found")
    resp = bob.post("/v1/jobs", json={"file_id": fid, "config": {"model": "tiny"}})
    assert_error(resp, 404, "not_found")
    assert jid not in [j["id"] for j in bob.get("/v1/jobs").json()["jobs"]]
    # the same upload announced by bob is bob's own new upload, not alice's file
    data = (server.data_dir / "raw" / f"{fid}.mrc").read_bytes()
    theirs = bob.post(
        "/v1/uploads/init",
        json={"filename": "mine.mrc", "size": len(data), "sha256": alice_file["sha256"]},
    )
    assert theirs.status_code == 201 and theirs.json()["file_id"] is None

    assert [j["id"] for j in alice.get("/v1/jobs").json()["jobs"]] == [jid]
    assert admin.get(f"/v1/uploads/{uid}").json()["file_id"] == fid
    assert admin.get(f"/v1/jobs/{jid}").json()["owner"] == "alice"
    assert jid in [j["id"] for j in admin.get("/v1/jobs").json()["jobs"]]


# -- WebSockets ------------------------------------------------------------------------------
def test_websocket_with_a_bad_token_is_told_and_closed_4401(server, job):
    forged = jwt.encode(claims(), b"y" * 64, algorithm="HS256")
    cases = [
        (ws_url(server, job["id"]), None, "missing_token"),
        (ws_url(server, job["id"]), {"Authorization": f"Bearer {forged}"}, "invalid_token"),
        (ws_url(server, job["id"], f"?token={forged}"), None, "invalid_token"),
        (ws_url(server, job["id"], "?token=garbage"), None, "invalid_token"),
    ]
    for url, headers, code in cases:
        messages, close = ws_messages(url, headers)
        assert close == 4401
        assert len(messages) == 1 and messages[0]["type"] == "error"
        assert messages[0]["error"]["code"] == code


def test_websocket_scope_and_ownership(server, alice_token, job):
    messages, close = ws_messages(ws_url(server, job["id"], f"?token={alice_token}"))
    assert close == 1000 and [m["type"] for m in messages] == ["state", "completed"]
    messages, close = ws_messages(
        ws_url(server, job["id"]), {"Authorization": f"Bearer {alice_token}"}
    )
    assert close == 1000 and messages[-1]["job"]["id"] == job["id"]

    upload_only = server.token("alice", "upload")
    messages, close = ws_messages(ws_url(server, job["id"], f"?token={upload_only}"))
    assert close == 4403 and messages[0]["error"]["code"] == "insufficient_scope"
    bob = server.token("bob", "read")
    messages, close = ws_messages(ws_url(server, job["id"], f"?token={bob}"))
    assert close == 4404 and messages[0]["error"]["code"] == "not_found"


# -- signed artifact URLs --------------------------------------------------------------------
def test_signed_artifact_urls(server, job):
    art = job["artifacts"]["mask.mrc"]
    path, query = art["url"].split("?")
    params = dict(p.split("=") for p in query.split("&"))
    with server.client() as anon:  # the signature is the credential: no bearer token
        resp = anon.get(art["url"])
        assert resp.status_code == 200
        digest = hashlib.sha256(resp.content).hexdigest()
        assert digest == art["sha256"] == resp.headers["X-Checksum-SHA256"]
        assert len(resp.content) == art["size"]

        sig, exp = params["sig"], params["exp"]
        tampered = sig[:-1] + ("0" if sig[-1] != "0" else "1")
        assert_error(anon.get(f"{path}?exp={exp}&sig={tampered}"), 403, "bad_signature")
        assert_error(anon.get(f"{path}?exp={int(exp) + 1}&sig={sig}"), 403, "bad_signature")
        assert_error(anon.get(f"{path}?exp=soon&sig={sig}"), 403, "bad_signature")
        assert_error(anon.get(f"{path}?exp={exp}&sig=%C3%A9{sig}"), 403, "bad_signature")
        assert_error(anon.get(f"{path}?exp={exp}&sig="), 403, "missing_signature")
        assert_error(anon.get(f"{path}?exp={exp}"), 403, "missing_signature")
        assert_error(anon.get(f"{path}?sig={sig}"), 403, "missing_signature")
        assert_error(anon.get(path), 403, "missing_signature")
        other = path.replace("mask.mrc", "stats.json")  # one artifact's signature for another
        assert_error(anon.get(f"{other}?exp={exp}&sig={sig}"), 403, "bad_signature")
        assert_error(anon.get(f"{path.replace('mask.mrc', 'x.bin')}?{query}"), 404, "not_found")

        secret = secret_of(server)
        url, _ = sign_artifact(secret, job["id"], "mask.mrc", ttl_s=-5)
        assert_error(anon.get(url), 410, "url_expired")
        url, _ = sign_artifact(secret, "0" * 32, "mask.mrc", ttl_s=60)
        assert_error(anon.get(url), 404, "not_found")
        url, _ = sign_artifact(b"z" * 64, job["id"], "mask.mrc", ttl_s=60)
        assert_error(anon.get(url), 403, "bad_signature")
        # every artifact the job lists can be downloaded with its own URL
        for name, info in job["artifacts"].items():
            resp = anon.get(info["url"])
            assert resp.status_code == 200, name
            assert hashlib.sha256(resp.content).hexdigest() == info["sha256"]


@pytest.mark.slow
def test_artifact_url_expires(tmp_path, tiny_model, root):
    srv = LiveServer(
        tmp_path / "data",
        models_dir=tiny_model.parent,
        roots=[root],
        extra_args=["--url-ttl", "1s"],
    ).start()
    try:
        with srv.client(srv.token("alice", SCOPES_ALL)) as c:
            resp = c.post(
                "/v1/jobs",
                json={"server_path": "tomo.mrc", "config": {"model": "tiny", "formats": ["mrc"]}},
            )
            assert resp.status_code == 201, resp.text
            art = wait_for_job(c, resp.json()["id"])["artifacts"]["mask.mrc"]
        while time.time() <= art["expires_at"] + 1:
            time.sleep(0.2)
        with srv.client() as anon:
            err = assert_error(anon.get(art["url"]), 410, "url_expired")
            assert "GET /v1/jobs" in err["hint"]
    finally:
        srv.stop()


# -- the log ---------------------------------------------------------------------------------
def test_no_token_or_signature_in_the_log(server, job, alice_token):
    """uvicorn logs a WebSocket handshake with its query string before our app answers."""
    token = server.token("logged", "read")
    with server.client(token) as c:
        assert c.get("/v1/jobs").status_code == 200
        assert c.get(f"/v1/jobs/{job['id']}").status_code == 404  # alice's job
    art = job["artifacts"]["mask.mrc"]
    with server.client() as anon:
        assert anon.get(art["url"]).status_code == 200
        bad = art["url"][:-4] + "0000"
        assert anon.get(bad).status_code == 403
        assert (
            anon.get("/v1/jobs", headers={"Authorization": f"Bearer {token}x"}).status_code == 401
        )
    alice = server.token("alice", "read")
    ws_messages(ws_url(server, job["id"], f"?token={alice}&x=1"))
    ws_messages(ws_url(server, job["id"]), {"Authorization": f"Bearer {alice}"})
    ws_messages(ws_url(server, "nope", f"?token={token}"))
    ws_messages(ws_url(server, job["id"], f"?token={token}x"))

    log = server.log()
    assert job["id"] in log  # the log is the right one, and written
    sig = art["url"].split("sig=")[1]
    for secret in (token, alice, alice_token, token.split(".")[2], sig, bad.split("sig=")[1]):
        assert secret not in log
    assert "token=" not in log and "sig=" not in log
    assert f"/v1/ws/jobs/{job['id']}?x=1" in log  # the rest of the query is still there


# -- server paths ----------------------------------------------------------------------------
def _submit(client: httpx.Client, server_path) -> httpx.Response:
    return client.post(
        "/v1/jobs",
        json={"server_path": server_path, "config": {"model": "tiny", "formats": ["stats"]}},
    )


@pytest.mark.parametrize(
    "path",
    [
        "../outside/secret.mrc",
        "sub/../../outside/secret.mrc",
        "..",
        "sub\\..\\..\\outside\\secret.mrc",
        "escape.mrc",  # a link inside the root to a file outside it
        "outdir/secret.mrc",  # a linked folder
        "/etc/passwd",
        "a\x00b.mrc",
        "",
    ],
)
def test_server_path_escapes_are_403(server, alice, root, path):
    err = assert_error(_submit(alice, path), 403, "path_not_allowed")
    assert "secret" not in err["hint"]


def test_server_path_absolute_outside_and_oddities(server, alice, root):
    assert_error(
        _submit(alice, str(root.parent / "outside" / "secret.mrc")), 403, "path_not_allowed"
    )
    assert_error(_submit(alice, str(root / "escape.mrc")), 403, "path_not_allowed")
    raw = b'{"server_path": "\\ud800.mrc", "config": {"model": "tiny"}}'
    resp = alice.post("/v1/jobs", content=raw, headers={"Content-Type": "application/json"})
    assert_error(resp, 403, "path_not_allowed")
    assert_error(_submit(alice, "missing.mrc"), 404, "file_not_found")
    assert_error(_submit(alice, "sub"), 404, "file_not_found")  # a folder is no file
    assert_error(_submit(alice, "a" * 5000), 404, "file_not_found")  # too long for the disk
    assert_error(_submit(alice, "not-a-volume.mrc"), 422, "invalid_volume")
    assert_error(_submit(alice, 42), 422, "invalid_request")


@pytest.mark.parametrize("path", ["tomo.mrc", "sub/inner.mrc", "inside-link.mrc", "ABS"])
def test_server_paths_under_the_root_are_accepted(server, alice, root, path):
    path = str(root / "tomo.mrc") if path == "ABS" else path
    resp = _submit(alice, path)
    assert resp.status_code == 201, resp.text
    job = resp.json()
    assert job["source"]["server_path"] == path and "path" not in job["source"]
    assert job["source"]["shape"] == [16, 32, 32]
    wait_for_job(alice, job["id"])


# -- rate limits -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def limited(tmp_path_factory, tiny_model):
    """Five requests a minute per user, one part in flight, and no server roots."""
    srv = LiveServer(
        tmp_path_factory.mktemp("limited") / "data",
        models_dir=tiny_model.parent,
        extra_args=["--rate-limit", "5"],
    )
    srv.start()
    yield srv
    srv.stop()


def test_rate_limit(limited):
    with limited.client(limited.token("rl-a", "read")) as c:
        for _ in range(5):
            assert c.get("/v1/jobs").status_code == 200
        # the bucket refills one request per 12 s: the next few come back 429
        for _ in range(5):
            if (resp := c.get("/v1/jobs")).status_code == 429:
                break
        err = assert_error(resp, 429, "rate_limited")
        assert err["retryable"] is True and int(resp.headers["Retry-After"]) >= 1
        assert resp.headers["Retry-After"] in err["hint"]
        # public routes are not counted
        assert c.get("/v1/healthz").status_code == 200
        assert c.get("/metrics").status_code == 200
    with limited.client(limited.token("rl-b", "read")) as other:  # another user is not limited
        assert other.get("/v1/jobs").status_code == 200
    metrics = httpx.get(f"{limited.url}/metrics").text
    assert 'cryomamba_http_requests_total{method="GET",route="/v1/jobs",status="429"}' in metrics
    assert 'cryomamba_http_requests_total{method="GET",route="/v1/jobs",status="200"}' in metrics


def test_upload_parts_are_not_rate_limited(limited):
    data = np.random.default_rng(3).bytes(1000)
    with limited.client(limited.token("rl-c", "upload")) as c:
        uid = c.post("/v1/uploads/init", json={"filename": "p.bin", "size": 1000}).json()
        for _ in range(12):  # more than the minute's budget
            resp = c.put(f"/v1/uploads/{uid['upload_id']}/part/0", content=data)
            assert resp.status_code == 200
        assert c.get(f"/v1/uploads/{uid['upload_id']}").json()["parts_received"] == [0]


def test_server_paths_disabled_without_roots(limited):
    with limited.client(limited.token("rl-d", "submit")) as c:
        err = assert_error(_submit(c, "tomo.mrc"), 403, "server_paths_disabled")
        assert "--root" in err["hint"]
