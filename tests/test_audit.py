"""The audit log against a real server: one JSON line per state-changing action, with who,
what, which object, from where and how it ended; never a token, a signature or a query string.
Also: X-Forwarded-For counts only from a trusted proxy (audit, access log, per-address limits).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import mrcfile
import numpy as np
import pytest

for _module in ("httpx", "websockets", "starlette", "uvicorn", "jwt"):  # the `server` extra
    pytest.importorskip(_module)

from server_fixtures import LiveServer  # noqa: E402

from cryomamba.executors.remote import RemoteExecutor  # noqa: E402
from cryomamba.testing import make_model_folder  # noqa: E402

pytestmark = pytest.mark.slow

FORGED = "203.0.113.9"


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("audit-models")
    make_model_folder(root / "tiny", patch_size=(16, 16, 16), features=(4, 8, 16), seed=1)
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory, models_dir):
    base = tmp_path_factory.mktemp("audit-server")
    live = LiveServer(
        base / "data",
        models_dir=models_dir,
        extra_args=["--rate-limit", "100000", "--audit-log", str(base / "audit.jsonl")],
    ).start()
    live.audit_path = base / "audit.jsonl"  # type: ignore[attr-defined]
    yield live
    live.stop()


def write_mrc(path: Path, seed: int = 0) -> Path:
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(np.random.default_rng(seed).normal(size=(24, 24, 24)).astype(np.float32))
        mrc.voxel_size = (10.0, 10.0, 10.0)
    return path


def audit_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for(file: Path, count: int, **match: Any) -> list[dict[str, Any]]:
    """The audit lines matching `match`, once there are `count` (lines are written just after
    the answer is sent, so a client can read the file a moment before its line lands)."""
    deadline = time.monotonic() + 10
    while True:
        found = [
            line for line in audit_lines(file) if all(line.get(k) == v for k, v in match.items())
        ]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def wait_job(client, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in ("completed", "failed", "canceled"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not end")


FIELDS = {"action", "subject", "object", "client", "outcome", "code", "status", "path"}


def test_every_action_writes_one_line(server, tmp_path):
    path: Path = server.audit_path
    token = server.token("alice", "read,upload,submit")
    ex = RemoteExecutor(server.url, token)
    try:
        uploaded = ex.upload(write_mrc(tmp_path / "tomo.mrc"))
    finally:
        ex.close()
    [init] = wait_for(path, 1, action="upload.init", subject="alice")
    [done] = wait_for(path, 1, action="upload.complete", subject="alice")
    assert init["object"] == done["object"] and init["status"] == 201 and done["status"] == 201
    for line in (init, done):
        assert set(line) >= FIELDS and line["logger"] == "cryomamba.audit"
        assert (line["subject"], line["client"], line["outcome"]) == ("alice", "127.0.0.1", "ok")
        assert line["code"] is None

    with server.client(token) as client:
        resp = client.post("/v1/jobs", json={"file_id": uploaded.id, "config": {"model": "tiny"}})
        assert resp.status_code == 201, resp.text
        job_id = resp.json()["id"]
        job = wait_job(client, job_id)
        assert job["state"] == "completed"
        url = job["artifacts"]["mask.mrc"]["url"]
        assert client.get(url).status_code == 200
        # a finished job cannot be canceled: refused, with the error code
        assert client.delete(f"/v1/jobs/{job_id}").status_code == 409
        # a wrong signature is a refused download
        assert client.get(url.replace("sig=", "sig=00")).status_code == 403

    [submit] = wait_for(path, 1, action="job.submit", object=job_id)
    assert (submit["subject"], submit["outcome"], submit["status"]) == ("alice", "ok", 201)
    downloads = wait_for(path, 2, action="artifact.download", object=f"{job_id}/mask.mrc")
    downloads.sort(key=lambda d: d["outcome"])  # lines land after the answers: any order
    assert [(d["outcome"], d["code"]) for d in downloads] == [
        ("ok", None),
        ("refused", "bad_signature"),
    ]
    assert all(d["path"] == f"/v1/files/{job_id}/mask.mrc" for d in downloads)
    [cancel] = wait_for(path, 1, action="job.cancel", object=job_id)
    assert (cancel["outcome"], cancel["code"], cancel["status"]) == ("refused", "job_finished", 409)
    text = path.read_text()
    assert "sig=" not in text and "exp=" not in text
    assert url.split("sig=")[1] not in text  # the signature itself
    assert token not in text
    # reading is not audited: GETs of jobs and uploads wrote nothing
    assert not [line for line in audit_lines(path) if line["action"] not in FIELD_ACTIONS]


FIELD_ACTIONS = {
    "upload.init",
    "upload.complete",
    "job.submit",
    "job.cancel",
    "artifact.download",
    "auth.refused",
}


def test_a_running_job_canceled_is_one_ok_line(server, tmp_path):
    token = server.token("bob", "read,upload,submit")
    ex = RemoteExecutor(server.url, token)
    try:
        uploaded = ex.upload(write_mrc(tmp_path / "tomo.mrc", seed=2))
    finally:
        ex.close()
    with server.client(token) as client:
        job_id = client.post(
            "/v1/jobs", json={"file_id": uploaded.id, "config": {"model": "tiny"}}
        ).json()["id"]
        status = client.delete(f"/v1/jobs/{job_id}").status_code
    [cancel] = wait_for(server.audit_path, 1, action="job.cancel", object=job_id)
    assert cancel["subject"] == "bob" and cancel["status"] == status
    assert cancel["outcome"] == ("ok" if status == 202 else "refused")


def test_a_refused_token_is_audited_without_its_text(server):
    bad = server.token("mallory", "read") + "x"  # a real token, its signature broken
    with server.client(bad) as client:
        resp = client.post(
            "/v1/jobs", json={"file_id": "f", "config": {}}, headers={"X-Forwarded-For": FORGED}
        )
    assert resp.status_code == 401
    [line] = wait_for(server.audit_path, 1, action="auth.refused", path="/v1/jobs")
    assert (line["outcome"], line["code"], line["status"]) == ("refused", "invalid_token", 401)
    assert line["subject"] is None and line["object"] is None
    assert line["client"] == "127.0.0.1"  # the forged header from an untrusted peer is ignored
    text = server.audit_path.read_text()
    assert bad not in text and bad.split(".")[2] not in text
    # the server's own log (stderr) holds the same line, and no token either
    assert '"logger": "cryomamba.audit"' in server.log() and bad not in server.log()
    assert FORGED not in server.log()


def test_a_refused_websocket_token_is_audited(server):
    import websockets.sync.client as ws_client

    url = server.url.replace("http://", "ws://") + "/v1/ws/jobs/nope?token=not-a-token"
    with ws_client.connect(url) as ws:
        message = json.loads(ws.recv())
    assert message["type"] == "error" and message["error"]["code"] == "invalid_token"
    [line] = wait_for(server.audit_path, 1, action="auth.refused", path="/v1/ws/jobs/nope")
    assert line["code"] == "invalid_token" and line["outcome"] == "refused"
    assert "not-a-token" not in server.audit_path.read_text()


def test_forwarded_for_counts_only_from_a_trusted_proxy(tmp_path, models_dir):
    """With --trusted-proxies 127.0.0.1, X-Forwarded-For names the client in the access log
    and the audit log, and failed logins are limited per forwarded address."""
    live = LiveServer(
        tmp_path / "data",
        models_dir=models_dir,
        extra_args=["--trusted-proxies", "127.0.0.1,::1", "--auth-failures", "2"],
    ).start()
    try:
        with live.client("bad-token") as client:
            codes = [
                client.get("/v1/jobs", headers={"X-Forwarded-For": FORGED}).status_code
                for _ in range(3)
            ]
            other = client.get("/v1/jobs", headers={"X-Forwarded-For": "198.51.100.7"})
            plain = client.get("/v1/jobs")
        assert codes == [401, 401, 429]  # one forwarded address spent its own budget
        assert other.status_code == 401  # another forwarded address has its own
        assert plain.status_code == 401  # and so has the proxy itself
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and live.log().count("auth.refused") < 5:
            time.sleep(0.05)
        lines = [json.loads(x) for x in live.log().splitlines() if x.startswith("{")]
        audit = [x for x in lines if x.get("logger") == "cryomamba.audit"]
        assert [x["client"] for x in audit] == [FORGED] * 3 + ["198.51.100.7", "127.0.0.1"]
        access = [x for x in lines if x.get("logger") == "cryomamba.server.access"]
        assert [x["client"] for x in access if x["path"] == "/v1/jobs"][:3] == [FORGED] * 3
    finally:
        live.stop()


def test_untrusted_peers_share_one_failure_budget_whatever_they_forward(tmp_path, models_dir):
    live = LiveServer(tmp_path / "data", models_dir=models_dir, extra_args=["--auth-failures", "2"])
    live.start()
    try:
        with live.client("bad-token") as client:
            codes = [
                client.get("/v1/jobs", headers={"X-Forwarded-For": f"198.51.100.{i}"}).status_code
                for i in range(3)
            ]
        assert codes == [401, 401, 429]  # forging a new address each time does not help
        assert "198.51.100." not in live.log()
    finally:
        live.stop()
