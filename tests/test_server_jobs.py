"""The job queue, cancel, the WebSocket and metrics, end to end against a real server.

One server for the module (a real uvicorn subprocess with a tiny nnU-Net model). Jobs run
one at a time on its CPU; a test that needs a job to wait in the queue first starts a
"blocker" (a bigger volume) and cancels it when done, so nothing here depends on timing.
Every test leaves the queue empty.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import json
import math
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import mrcfile
import numpy as np
import pytest
from server_fixtures import LiveServer
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from cryomamba.testing import make_model_folder

TERMINAL = ("completed", "failed", "canceled")
SMALL = (24, 32, 32)  # 18 tiles: well under a second
MEDIUM = (48, 96, 96)  # 605 tiles: seconds; used as a blocker or to watch a job run
TALL = (384, 32, 32)  # 47 rows of tiles, a 384x32x32 preview each at scale 1


def write_mrc(path: Path, shape: tuple[int, int, int], seed: int = 0) -> Path:
    with mrcfile.new(path) as mrc:
        mrc.set_data(np.random.default_rng(seed).normal(size=shape).astype(np.float32))
        mrc.voxel_size = 10.0
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[LiveServer]:
    base = tmp_path_factory.mktemp("server-jobs")
    models = base / "models"
    make_model_folder(models / "tiny", patch_size=(16, 16, 16), features=(4, 8, 16), seed=1)
    root = base / "root"
    root.mkdir()
    write_mrc(root / "small.mrc", SMALL)
    write_mrc(root / "medium.mrc", MEDIUM)
    write_mrc(root / "tall.mrc", TALL)
    live = LiveServer(
        base / "data",
        models_dir=models,
        roots=[root],
        extra_args=["--rate-limit", "100000", "--keepalive", "0.5"],
    )
    live.start()
    live.models_dir = models
    yield live
    live.stop()


@pytest.fixture(scope="module")
def alice_token(server) -> str:
    return server.token("alice", "read,upload,submit")


@pytest.fixture(scope="module")
def alice(server, alice_token):
    with server.client(alice_token) as client:
        yield client


@pytest.fixture(scope="module")
def bob(server):
    with server.client(server.token("bob", "read,upload,submit")) as client:
        yield client


@pytest.fixture(scope="module")
def admin(server):
    with server.client(server.token("root", "admin")) as client:
        yield client


# -- helpers ---------------------------------------------------------------------------------
def submit(client, server_path: str = "small.mrc", **config) -> dict:
    r = client.post(
        "/v1/jobs", json={"server_path": server_path, "config": {"model": "tiny", **config}}
    )
    assert r.status_code == 201, r.text
    return r.json()


def wait_for(client, job_id: str, states=TERMINAL, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        r = client.get(f"/v1/jobs/{job_id}")
        assert r.status_code == 200, r.text
        job = r.json()
        if job["state"] in states:
            return job
        assert time.monotonic() < deadline, f"job stayed {job['state']}, wanted {states}"
        time.sleep(0.05)


def wait_running(client, job_id: str) -> dict:
    """Until inference has really started: running or previewing, with tiles done."""
    deadline = time.monotonic() + 120
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        assert job["state"] not in TERMINAL, job
        if (
            job["state"] in ("running", "previewing")
            and (job["progress"] or {}).get("tiles_done", 0) > 0
        ):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.05)


@contextlib.contextmanager
def held_queue(client) -> Iterator[dict]:
    """A blocker job runs for the duration, so jobs submitted meanwhile stay queued."""
    blocker = submit(client, "medium.mrc")
    wait_running(client, blocker["id"])
    try:
        yield blocker
    finally:
        client.delete(f"/v1/jobs/{blocker['id']}")
        assert wait_for(client, blocker["id"])["state"] == "canceled"


def ws_url(server: LiveServer, job_id: str) -> str:
    return f"ws://127.0.0.1:{server.port}/v1/ws/jobs/{job_id}"


def open_ws(server: LiveServer, job_id: str, token: str | None, **kwargs) -> ClientConnection:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return connect(
        ws_url(server, job_id), additional_headers=headers, max_size=None, open_timeout=30, **kwargs
    )


def read_until_closed(ws: ClientConnection, timeout: float = 120) -> tuple[list[dict], int]:
    """Every message (pings left out) until the server closes, and the close code."""
    messages = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            message = json.loads(ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if message["type"] != "ping":
                messages.append(message)
    except ConnectionClosed as exc:
        return messages, exc.rcvd.code if exc.rcvd else 1006


def next_message(ws: ClientConnection, *skip: str) -> dict:
    while True:
        message = json.loads(ws.recv(timeout=60))
        if message["type"] not in ("ping", *skip):
            return message


# -- submit, status, list --------------------------------------------------------------------
def test_a_submitted_job_is_queued_then_completes_with_signed_artifacts(server, alice):
    with held_queue(alice):
        first = submit(alice, tile_step=0.5)
        second = submit(alice)
        assert first["state"] == "queued" and first["queue_position"] == 0
        assert second["state"] == "queued" and second["queue_position"] == 1
        assert first["owner"] == "alice" and first["started_at"] is None
        assert first["model"]["name"] == "tiny" and len(first["model"]["sha256"]) == 64
        assert first["source"]["shape"] == list(SMALL) and "path" not in first["source"]
        assert first["config"]["tile_step"] == 0.5 and first["config"]["formats"]
        assert first["artifacts"] == {} and first["progress"] is None
        assert first["source"]["sha256"] is None  # a server path is hashed while it runs
    done = wait_for(alice, first["id"])
    assert done["state"] == "completed", done["error"]
    small = server.roots[0] / "small.mrc"
    assert done["source"]["sha256"] == hashlib.sha256(small.read_bytes()).hexdigest()
    assert done["queue_position"] is None and done["started_at"] <= done["finished_at"]
    assert done["progress"]["fraction"] == 1.0
    assert set(done["artifacts"]) == {
        "mask.mrc",
        "mask.nii.gz",
        "mask.nrrd",
        "stats.json",
        "overview.png",
    }
    mask = done["artifacts"]["mask.mrc"]
    r = alice.get(mask["url"])  # the signed URL works without the bearer token too
    assert r.status_code == 200
    assert hashlib.sha256(r.content).hexdigest() == mask["sha256"]
    assert len(r.content) == mask["size"]
    assert r.headers["x-checksum-sha256"] == mask["sha256"]
    assert wait_for(alice, second["id"])["state"] == "completed"


def test_a_job_on_an_uploaded_file(server, alice, bob, tmp_path):
    data = write_mrc(tmp_path / "upload.mrc", SMALL, seed=3).read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    init = alice.post(
        "/v1/uploads/init", json={"filename": "upload.mrc", "size": len(data), "sha256": sha}
    )
    assert init.status_code == 201, init.text
    upload_id = init.json()["upload_id"]
    assert alice.put(f"/v1/uploads/{upload_id}/part/0", content=data).status_code == 200
    done = alice.post(f"/v1/uploads/{upload_id}/complete")
    assert done.status_code == 201, done.text
    file_id = done.json()["file_id"]

    r = bob.post("/v1/jobs", json={"file_id": file_id, "config": {"model": "tiny"}})
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = alice.post("/v1/jobs", json={"file_id": file_id, "config": {"model": "tiny"}})
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["source"]["file_id"] == file_id and job["source"]["sha256"] == sha
    assert wait_for(alice, job["id"])["state"] == "completed"


def test_users_list_and_see_only_their_own_jobs(server, alice, bob, admin):
    mine = submit(alice)
    theirs = submit(bob)
    for job in (mine, theirs):
        wait_for(admin, job["id"])
    alice_ids = {j["id"] for j in alice.get("/v1/jobs").json()["jobs"]}
    bob_ids = {j["id"] for j in bob.get("/v1/jobs").json()["jobs"]}
    admin_ids = {j["id"] for j in admin.get("/v1/jobs", params={"limit": 1000}).json()["jobs"]}
    assert mine["id"] in alice_ids and theirs["id"] not in alice_ids
    assert theirs["id"] in bob_ids and mine["id"] not in bob_ids
    assert {mine["id"], theirs["id"]} <= admin_ids
    assert all(j["owner"] == "alice" for j in alice.get("/v1/jobs").json()["jobs"])

    for method in ("GET", "DELETE"):
        r = alice.request(method, f"/v1/jobs/{theirs['id']}")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert admin.get(f"/v1/jobs/{theirs['id']}").json()["owner"] == "bob"

    listed = alice.get("/v1/jobs", params={"state": "completed", "limit": 1}).json()["jobs"]
    assert len(listed) == 1 and listed[0]["state"] == "completed"
    for params in ({"state": "lost"}, {"limit": 0}, {"limit": "many"}):
        r = alice.get("/v1/jobs", params=params)
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"


def test_get_shows_progress_while_the_job_runs_and_the_api_stays_responsive(server, alice):
    job = submit(alice, "medium.mrc")
    try:
        running = wait_running(alice, job["id"])
        progress = running["progress"]
        assert 0 < progress["tiles_done"] < progress["tiles_total"] == 605
        assert 0 < progress["fraction"] < 1
        for _ in range(5):  # inference runs on a worker thread, not on the event loop
            health = alice.get("/v1/healthz", timeout=10)
            assert health.status_code == 200 and health.json()["status"] == "ok"
            again = alice.get(f"/v1/jobs/{job['id']}", timeout=10)
            assert again.status_code == 200
        later = wait_for(alice, job["id"], states=("running", "previewing", *TERMINAL))
        assert later["progress"]["tiles_done"] >= progress["tiles_done"]
    finally:
        alice.delete(f"/v1/jobs/{job['id']}")
        wait_for(alice, job["id"])


@pytest.mark.parametrize(
    ("body", "code", "words"),
    [
        ({"server_path": "small.mrc", "config": {"model": "nope"}}, "invalid_model", "'nope'"),
        (
            {"server_path": "small.mrc", "config": {"model": "tiny", "tile_stp": 0.5}},
            "invalid_config",
            "tile_stp",
        ),
        (
            {"server_path": "small.mrc", "config": {"model": "tiny", "tile_step": 2}},
            "invalid_config",
            "tile_step",
        ),
        (
            {"server_path": "small.mrc", "config": {"model": "tiny", "formats": ["tiff"]}},
            "invalid_config",
            "tiff",
        ),
        (
            {"server_path": "small.mrc", "config": {"model": "tiny", "device": "cuda:7"}},
            "invalid_config",
            "cuda:7",
        ),
        (
            {"server_path": "small.mrc", "config": {"model": "tiny", "device": "gpu"}},
            "invalid_config",
            "device",
        ),
        ({"server_path": "small.mrc", "config": ["tiny"]}, "invalid_config", "object"),
        ({"config": {"model": "tiny"}}, "invalid_request", "exactly one"),
        (
            {"file_id": "x", "server_path": "small.mrc", "config": {"model": "tiny"}},
            "invalid_request",
            "exactly one",
        ),
        (
            {"server_path": "small.mrc", "config": {"model": "tiny"}, "priority": 1},
            "invalid_request",
            "priority",
        ),
    ],
)
def test_bad_submissions_are_422_with_the_reason(alice, body, code, words):
    r = alice.post("/v1/jobs", json=body)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == code and words in error["message"]
    assert isinstance(error["hint"], str) and error["retryable"] is False


def test_a_model_folder_path_is_refused(server, alice):
    """Only registered models run on a server, never a folder a client names."""
    folder = str(server.models_dir / "tiny")
    r = alice.post("/v1/jobs", json={"server_path": "small.mrc", "config": {"model": folder}})
    assert r.status_code == 422
    error = r.json()["error"]
    assert error["code"] == "invalid_model" and folder in error["message"]
    assert "tiny" in error["hint"]


def test_submitting_needs_the_submit_scope_and_json(server, alice):
    with server.client(server.token("reader", "read")) as reader:
        r = reader.post("/v1/jobs", json={"server_path": "small.mrc", "config": {"model": "tiny"}})
        assert r.status_code == 403 and r.json()["error"]["code"] == "insufficient_scope"
    r = alice.post("/v1/jobs", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


def test_one_job_at_a_time_in_submission_order(server, alice):
    jobs = [submit(alice) for _ in range(3)]
    ids = [j["id"] for j in jobs]
    deadline = time.monotonic() + 120
    while True:
        listed = {j["id"]: j for j in alice.get("/v1/jobs", params={"limit": 20}).json()["jobs"]}
        states = [listed[i]["state"] for i in ids]
        assert sum(s in ("running", "previewing") for s in states) <= 1, states
        if all(s in TERMINAL for s in states):
            break
        assert time.monotonic() < deadline, states
        time.sleep(0.02)
    done = [listed[i] for i in ids]
    assert [j["state"] for j in done] == ["completed"] * 3
    for before, after in itertools.pairwise(done):
        assert before["created_at"] < after["created_at"]
        assert before["finished_at"] <= after["started_at"]  # no overlap, in order


# -- cancel ----------------------------------------------------------------------------------
def test_canceling_a_queued_job_ends_it_without_starting(server, alice):
    with held_queue(alice):
        job = submit(alice)
        r = alice.delete(f"/v1/jobs/{job['id']}")
        assert r.status_code == 202 and r.json()["state"] == "canceled"
    record = wait_for(alice, job["id"])
    assert record["state"] == "canceled" and record["started_at"] is None
    assert record["artifacts"] == {} and record["finished_at"] is not None
    assert not (server.data_dir / "artifacts" / job["id"]).exists()


def test_canceling_during_inference_reaches_the_websocket(server, alice, alice_token):
    job = submit(alice, "medium.mrc")
    with open_ws(server, job["id"], alice_token) as ws:
        assert next_message(ws)["type"] == "state"
        assert next_message(ws, "preview")["type"] == "progress"  # inference is under way
        r = alice.delete(f"/v1/jobs/{job['id']}")
        assert r.status_code == 202
        messages, code = read_until_closed(ws)
    assert messages[-1] == {"type": "canceled"} and code == 1000
    assert all(m["type"] in ("progress", "preview") for m in messages[:-1])
    record = wait_for(alice, job["id"])
    assert record["state"] == "canceled" and record["started_at"] is not None
    assert record["progress"] is None or record["progress"]["fraction"] < 1
    assert record["artifacts"] == {}
    assert not (server.data_dir / "artifacts" / job["id"]).exists()


def test_canceling_a_finished_job_is_409(server, alice):
    job = submit(alice)
    assert wait_for(alice, job["id"])["state"] == "completed"
    r = alice.delete(f"/v1/jobs/{job['id']}")
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "job_finished"
    assert alice.get(f"/v1/jobs/{job['id']}").json()["state"] == "completed"


# -- the WebSocket ---------------------------------------------------------------------------
def test_websocket_streams_state_progress_previews_then_completed(server, alice, alice_token):
    with contextlib.ExitStack() as stack:
        with held_queue(alice):
            job = submit(alice, preview_interval_s=0.001, preview_scale=2)
            ws = stack.enter_context(open_ws(server, job["id"], alice_token))
            first = next_message(ws)
            assert first["type"] == "state"
            assert first["job"]["id"] == job["id"] and first["job"]["state"] == "queued"
        messages, code = read_until_closed(ws)  # the blocker is gone: the job runs
    kinds = [m["type"] for m in messages]
    assert kinds[-1] == "completed" and code == 1000  # the server closes after the end
    assert "progress" in kinds and "preview" in kinds
    assert set(kinds[:-1]) == {"progress", "preview"}  # all of them before the end

    progress = [m for m in messages if m["type"] == "progress"]
    assert progress[-1]["tiles_done"] == progress[-1]["tiles_total"] == 18
    assert all(0 < m["fraction"] <= 1 for m in progress)
    preview = [m for m in messages if m["type"] == "preview"][-1]
    assert preview["scale"] == 2 and preview["dtype"] == "uint8"
    assert preview["full_shape"] == list(SMALL)
    assert preview["shape"] == [math.ceil(n / 2) for n in SMALL]
    labels = np.frombuffer(base64.b64decode(preview["data"]), dtype=np.uint8)
    assert labels.size == math.prod(preview["shape"]) and set(np.unique(labels)) <= {0, 1}

    record = messages[-1]["job"]
    assert record["state"] == "completed" and record["id"] == job["id"]
    url = record["artifacts"]["mask.mrc"]["url"]
    assert "sig=" in url and "exp=" in url
    assert alice.get(url).status_code == 200


def test_websocket_after_the_end_gets_state_and_the_terminal_message(server, alice, alice_token):
    done = submit(alice)
    wait_for(alice, done["id"])
    with held_queue(alice):
        canceled = submit(alice)
        alice.delete(f"/v1/jobs/{canceled['id']}")
    for job, kind in ((done, "completed"), (canceled, "canceled")):
        with open_ws(server, job["id"], alice_token) as ws:
            messages, code = read_until_closed(ws)
        assert [m["type"] for m in messages] == ["state", kind] and code == 1000
        assert messages[0]["job"]["state"] == kind
    assert messages[-1] == {"type": "canceled"}


def test_a_reconnecting_client_gets_the_state_then_the_latest_preview(server, alice, alice_token):
    job = submit(alice, "medium.mrc", preview_interval_s=0.001)
    try:
        with open_ws(server, job["id"], alice_token) as ws:
            assert next_message(ws)["type"] == "state"
            while next_message(ws)["type"] != "preview":
                pass
        # gone mid-job; now back
        with open_ws(server, job["id"], alice_token) as ws:
            first = next_message(ws)
            assert first["type"] == "state"
            assert first["job"]["state"] == "previewing"
            assert first["job"]["progress"]["tiles_done"] > 0
            seen = []
            while not seen or seen[-1]["type"] != "preview":
                seen.append(next_message(ws))
                assert seen[-1]["type"] in ("progress", "preview"), seen[-1]
            assert seen[-1]["planes_done"] > 0
    finally:
        alice.delete(f"/v1/jobs/{job['id']}")
        wait_for(alice, job["id"])


@pytest.mark.slow
def test_a_slow_client_neither_slows_the_job_nor_gets_a_backlog(server, alice, alice_token):
    """The client reads nothing until the job is over; it then gets the latest events only.

    Uncompressed, each preview is 0.5 MB and the job makes one per row of tiles (47), far
    more than the socket buffers hold, so the server must skip previews for this client.
    """
    job = submit(alice, "tall.mrc", preview_interval_s=0.001, preview_scale=1)
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    with open_ws(server, job["id"], alice_token, sock=sock, compression=None, max_queue=1) as ws:
        done = wait_for(alice, job["id"])  # while this client sleeps
        assert done["state"] == "completed"
        messages, code = read_until_closed(ws)
    kinds = [m["type"] for m in messages]
    assert kinds[0] == "state" and kinds[-1] == "completed" and code == 1000
    previews = [m for m in messages if m["type"] == "preview"]
    progress = [m for m in messages if m["type"] == "progress"]
    tiles = done["progress"]["tiles_total"]
    assert 0 < len(previews) < 47 and len(progress) < tiles
    assert previews[-1]["planes_done"] == TALL[0]  # the last one is the latest
    assert progress[-1]["tiles_done"] == tiles


def test_keepalive_pings_a_client_following_a_long_job(server, alice, alice_token):
    """This module's server runs with --keepalive 0.5."""
    with held_queue(alice) as blocker, open_ws(server, blocker["id"], alice_token) as ws:
        kinds = []
        while "ping" not in kinds:
            message = json.loads(ws.recv(timeout=30))
            kinds.append(message["type"])
            if message["type"] == "ping":
                assert isinstance(message["t"], float)
        assert kinds[0] == "state" and "progress" in kinds


@pytest.fixture(scope="module")
def finished_job(alice) -> dict:
    return wait_for(alice, submit(alice)["id"])


@pytest.mark.parametrize("who", ["nobody", "unknown-job", "bob", "no-read-scope", "bad-token"])
def test_websocket_refusals_say_why_and_close(server, finished_job, who):
    job = finished_job
    tokens = {
        "nobody": None,
        "unknown-job": server.token("alice", "read"),
        "bob": server.token("bob", "read"),
        "no-read-scope": server.token("alice", "submit"),
        "bad-token": "not-a-token",
    }
    expected = {
        "nobody": (4401, "missing_token"),
        "unknown-job": (4404, "not_found"),
        "bob": (4404, "not_found"),
        "no-read-scope": (4403, "insufficient_scope"),
        "bad-token": (4401, "invalid_token"),
    }
    job_id = "f" * 32 if who == "unknown-job" else job["id"]
    with open_ws(server, job_id, tokens[who]) as ws:
        messages, code = read_until_closed(ws)
    assert code == expected[who][0]
    assert len(messages) == 1 and messages[0]["type"] == "error"
    assert messages[0]["error"]["code"] == expected[who][1]


def test_websocket_takes_the_token_as_a_query_parameter(server, finished_job, alice_token):
    """Browsers cannot set headers on a WebSocket."""
    url = f"{ws_url(server, finished_job['id'])}?token={alice_token}"
    with connect(url, open_timeout=30) as ws:
        messages, code = read_until_closed(ws)
    assert [m["type"] for m in messages] == ["state", "completed"] and code == 1000


# -- metrics and errors ----------------------------------------------------------------------
def test_metrics_count_jobs_tiles_and_requests(server, alice):
    job = submit(alice)
    assert wait_for(alice, job["id"])["state"] == "completed"
    r = alice.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    values = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    assert values['cryomamba_jobs{state="completed"}'] >= 1
    assert values["cryomamba_queue_depth"] == 0
    assert values['cryomamba_tiles_total{device="cpu"}'] >= 18
    assert values['cryomamba_http_requests_total{method="POST",route="/v1/jobs",status="201"}'] >= 1
    assert (
        values['cryomamba_http_requests_total{method="GET",route="/v1/jobs/{job_id}",status="200"}']
        >= 1
    )
    assert not any("sig=" in name or "Bearer" in name for name in values)


def test_errors_are_always_the_json_envelope(server, alice):
    checks = [
        (alice.get("/v1/nothing-here"), 404, "not_found"),
        (alice.get("/nothing"), 404, "not_found"),
        (alice.put("/v1/jobs"), 405, "method_not_allowed"),
        (alice.post("/v1/healthz"), 405, "method_not_allowed"),
        (alice.get("/v1/jobs/" + "0" * 32), 404, "not_found"),
        (alice.get("/v1/files/x/mask.mrc"), 403, "missing_signature"),
        (alice.get("/v1/files/x/secret.txt"), 404, "not_found"),
    ]
    with server.client() as anonymous:
        checks.append((anonymous.get("/v1/jobs"), 401, "missing_token"))
    for r, status, code in checks:
        assert r.status_code == status, (r.request.url, r.text)
        assert r.headers["content-type"] == "application/json"
        error = r.json()["error"]
        assert error["code"] == code
        assert set(error) >= {"code", "message", "hint", "retryable"}
        assert "Traceback" not in r.text
    assert set(alice.put("/v1/jobs").headers["allow"].split(", ")) >= {"GET", "POST"}
    assert set(alice.post("/v1/jobs/x").headers["allow"].split(", ")) >= {"GET", "DELETE"}


@pytest.mark.slow
def test_jobs_per_device_runs_that_many_jobs_at_once(server, tmp_path):
    """With --jobs-per-device 2, two jobs make progress at the same time."""
    root = server.roots[0]
    two = LiveServer(
        tmp_path / "data",
        models_dir=server.models_dir,
        roots=[root],
        extra_args=["--rate-limit", "100000", "--jobs-per-device", "2"],
    )
    two.start()
    try:
        with two.client(two.token("alice", "read,submit")) as client:
            jobs = [submit(client, "medium.mrc")["id"] for _ in range(3)]
            deadline = time.monotonic() + 120
            while True:
                records = [client.get(f"/v1/jobs/{j}").json() for j in jobs]
                busy = [r for r in records if (r["progress"] or {}).get("tiles_done")]
                assert all(r["state"] not in TERMINAL for r in records), records
                if len(busy) == 2:
                    break
                assert time.monotonic() < deadline, records
                time.sleep(0.05)
            assert [r["state"] for r in records[:2]] != ["queued", "queued"]
            assert records[2]["state"] == "queued" and records[2]["queue_position"] == 0
            for j in jobs:
                client.delete(f"/v1/jobs/{j}")
            assert {wait_for(client, j)["state"] for j in jobs} == {"canceled"}
    finally:
        two.stop()
