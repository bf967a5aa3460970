"""Job webhooks: allowed destinations, signatures, the SQLite outbox and its sender.

The sender is tested against a real HTTP receiver on loopback (one that fails its first
tries, one that redirects); the end-to-end tests run real servers, one of them SIGKILLed
while its delivery is still pending.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import mrcfile
import numpy as np
import pytest
from server_fixtures import LiveServer, assert_error, free_port

from cryomamba.errors import ConfigError
from cryomamba.server.errors import ApiError
from cryomamba.server.settings import ServerSettings
from cryomamba.server.storage import Storage
from cryomamba.server.webhooks import (
    WebhookSender,
    check_url,
    parse_allow,
    public_record,
    sign,
    verify,
)
from cryomamba.testing import make_model_folder

DOCS = Path(__file__).resolve().parents[1] / "docs" / "server.md"
KEY = b"k" * 40


# -- a real receiver ------------------------------------------------------------------------
class Receiver:
    """An HTTP server on loopback that answers `fail_first` POSTs with 500, then 204 (or
    always `status`); it records every request."""

    def __init__(self, port: int = 0, *, fail_first: int = 0, status: int = 204) -> None:
        self.requests: list[SimpleNamespace] = []
        self.fail_first, self.status = fail_first, status
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                n = len(outer.requests)
                code = 500 if n < outer.fail_first else outer.status
                outer.requests.append(
                    SimpleNamespace(
                        path=self.path, headers=dict(self.headers), body=body, answered=code
                    )
                )
                self.send_response(code)
                if code in (301, 302, 307, 308):
                    self.send_header("Location", "/elsewhere")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def accepted(self) -> list[SimpleNamespace]:
        return [r for r in self.requests if 200 <= r.answered < 300]


# -- allowed destinations -------------------------------------------------------------------
def refused(url: object, rules) -> str:
    with pytest.raises(ApiError) as info:
        check_url(url, rules)
    assert info.value.status == 422
    return info.value.code


def test_nothing_is_allowed_by_default():
    assert refused("https://hooks.example.org/x", ()) == "webhook_not_allowed"


def test_url_prefix_rules_match_on_path_boundaries():
    rules = parse_allow(["https://hooks.example.org/cryo/", "http://10.0.0.5:9000/a"])
    assert check_url("https://hooks.example.org/cryo/done?x=1", rules)
    assert check_url("https://hooks.example.org:443/cryo/", rules)
    assert check_url("http://10.0.0.5:9000/a", rules)
    assert check_url("http://10.0.0.5:9000/a/b", rules)
    for url in (
        "http://hooks.example.org/cryo/done",  # another scheme
        "https://hooks.example.org/cryomamba",  # not below the prefix
        "https://hooks.example.org:8443/cryo/",  # another port
        "https://hooks.example.org.evil.net/cryo/",
        "http://10.0.0.5:9000/ab",
        "http://10.0.0.5:9001/a",
    ):
        assert refused(url, rules) == "webhook_not_allowed", url


def test_host_rules_wildcards_ports_and_schemes():
    rules = parse_allow(["*.example.org", "127.0.0.1:9000"])
    assert check_url("https://a.example.org/x", rules)
    assert check_url("http://b.a.example.org:8080/", rules)
    assert check_url("http://127.0.0.1:9000/hook", rules)
    for url in (
        "https://example.org/",  # the wildcard is for sub-domains
        "https://evilexample.org/",
        "http://127.0.0.1:9001/",
        "http://127.0.0.1/",
        "ftp://a.example.org/",
        "file:///etc/passwd",
        "gopher://127.0.0.1:9000/",
        "http://user:pw@a.example.org/",
    ):
        assert refused(url, rules) == "webhook_not_allowed", url
    assert refused(42, rules) == "invalid_request"
    assert refused("http://a.example.org:99999999/", rules) == "invalid_request"


def test_bad_allow_entries_fail_at_start(tmp_path):
    for entry in ("ftp://x.org/", "https:///nohost", "a.org/path", "x.*.org", "h:port"):
        with pytest.raises(ConfigError):
            ServerSettings(data_dir=tmp_path, webhook_allow=(entry,))


# -- signatures -----------------------------------------------------------------------------
def docs_verify():
    """The receiver snippet from docs/server.md, executed as written."""
    text = DOCS.read_text()
    match = re.search(r"<!-- webhook-verify -->\n```python\n(.*?)```", text, re.S)
    assert match, "docs/server.md lost its webhook verification snippet"
    namespace: dict[str, Any] = {}
    exec(match.group(1), namespace)
    return namespace["verify"]


def test_the_docs_snippet_verifies_our_signature():
    snippet = docs_verify()
    body = b'{"id":"abc","state":"completed"}'
    now = int(time.time())
    header = sign(KEY, body, now)
    assert re.fullmatch(r"t=\d+,v1=[0-9a-f]{64}", header)
    assert snippet(KEY, body, header) and verify(KEY, body, header)
    assert not snippet(KEY, body + b" ", header)
    assert not snippet(b"x" * 40, body, header)
    old = sign(KEY, body, now - 3600)  # a replay an hour later
    assert not snippet(KEY, body, old) and not verify(KEY, body, old)
    assert not verify(KEY, body, "garbage")


def test_public_record_drops_signed_urls():
    record = {
        "id": "j",
        "artifacts": {
            "mask.mrc": {
                "url": "/v1/files/j/mask.mrc?sig=s",
                "expires_at": 1,
                "sha256": "h",
                "size": 3,
            }
        },
        "webhook": {"state": "pending"},
    }
    out = public_record(record)
    assert out == {"id": "j", "artifacts": {"mask.mrc": {"sha256": "h", "size": 3}}}


# -- the outbox -----------------------------------------------------------------------------
def job_row(job_id: str, notify_url: str | None) -> dict[str, Any]:
    return {
        "id": job_id, "owner": "alice", "state": "queued", "device": None,
        "created_at": time.time(), "started_at": None, "finished_at": None,
        "source": {"filename": "a.mrc"}, "config": {}, "model": {"name": "m"},
        "progress": None, "error": None, "artifacts": None, "notify_url": notify_url,
    }  # fmt: skip


def test_ending_a_job_writes_one_outbox_row(tmp_path):
    db = Storage(tmp_path / "db.sqlite3")
    db.add_job(job_row("a", "http://h/x"))
    db.add_job(job_row("b", None))
    db.add_job(job_row("c", "http://h/y"))
    db.update_job("a", state="running")
    assert db.webhook("a") is None  # not yet ended
    db.update_job("a", state="completed", finished_at=123.0)
    db.update_job("a", state="completed", finished_at=124.0)  # no second notification
    db.update_job("b", state="failed", finished_at=1.0)
    assert db.cancel_if_queued("c", 5.0)
    a, c = db.webhook("a"), db.webhook("c")
    assert a is not None and c is not None
    assert (a["event"], a["url"], a["state"], a["attempts"]) == (
        "completed",
        "http://h/x",
        "pending",
        0,
    )
    assert a["next_at"] == 123.0 and c["event"] == "canceled"
    assert db.webhook("b") is None  # no notify_url, no delivery
    assert [r["job_id"] for r in db.due_webhooks(1e12)] == ["c", "a"]
    db.close()


def test_an_older_database_gains_the_column(tmp_path):
    path = tmp_path / "old.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE jobs (id TEXT PRIMARY KEY, owner TEXT NOT NULL, state TEXT NOT NULL, "
        "device TEXT, created_at REAL NOT NULL, started_at REAL, finished_at REAL, "
        "source TEXT NOT NULL, config TEXT NOT NULL, model TEXT NOT NULL, progress TEXT, "
        "error TEXT, artifacts TEXT);"
        "INSERT INTO jobs VALUES ('old', 'a', 'queued', NULL, 1, NULL, NULL, '{}', '{}', "
        "'{}', NULL, NULL, NULL);"
    )
    old.commit()
    old.close()
    db = Storage(path)
    row = db.job("old")
    assert row is not None and row["notify_url"] is None
    db.update_job("old", state="completed", finished_at=2.0)
    assert db.webhook("old") is None
    db.close()
    Storage(path).close()  # opening it again changes nothing


# -- the sender against a real receiver -----------------------------------------------------
@pytest.fixture
def outbox(tmp_path) -> Iterator[SimpleNamespace]:
    db = Storage(tmp_path / "db.sqlite3")
    yield SimpleNamespace(db=db, tmp=tmp_path)
    db.close()


def sender_for(outbox, receiver: Receiver, **settings: Any) -> WebhookSender:
    options = {
        "webhook_allow": (receiver.url,),
        "webhook_backoff_s": 0.01,
        "webhook_backoff_max_s": 0.02,
        **settings,
    }
    config = ServerSettings(data_dir=outbox.tmp, **options)

    def render(job_id: str) -> dict[str, Any] | None:
        row = outbox.db.job(job_id)
        return None if row is None else {"id": job_id, "state": row["state"], "artifacts": {}}

    return WebhookSender(outbox.db, config, KEY, render)


def end_job(outbox, job_id: str, url: str) -> None:
    outbox.db.add_job(job_row(job_id, url))
    outbox.db.update_job(job_id, state="completed", finished_at=time.time())


def drain(sender: WebhookSender, limit: int = 20) -> int:
    """Run every delivery as if its backoff had passed, until none is pending; the rounds."""
    for rounds in range(limit):
        if sender.run_due(now=1e12) == 0:
            return rounds
    raise AssertionError("deliveries still pending")


def test_retries_until_accepted_then_never_again(outbox):
    with Receiver(fail_first=2) as receiver:
        sender = sender_for(outbox, receiver)
        end_job(outbox, "j1", receiver.url + "/hook?x=1")
        assert sender.run_due() == 1  # due at once
        row = outbox.db.webhook("j1")
        assert row["state"] == "pending" and row["attempts"] == 1
        assert row["last_error"] == "HTTP 500" and row["next_at"] > row["created_at"]
        assert sender.run_due(now=row["next_at"] - 1e-3) == 0  # not before its backoff
        assert drain(sender) == 2  # the second try fails, the third is accepted
        assert sender.run_due(now=1e12) == 0
    row = outbox.db.webhook("j1")
    assert (row["state"], row["attempts"]) == ("delivered", 3)
    assert row["delivered_at"] is not None
    assert [r.answered for r in receiver.requests] == [500, 500, 204]
    (ok,) = receiver.accepted()
    assert ok.path == "/hook?x=1"
    assert ok.headers["X-CryoMamba-Event"] == "job.completed"
    assert len({r.headers["X-CryoMamba-Delivery"] for r in receiver.requests}) == 1
    assert json.loads(ok.body) == {"id": "j1", "state": "completed", "artifacts": {}}
    assert docs_verify()(KEY, ok.body, ok.headers["X-CryoMamba-Signature"])
    stamp = int(ok.headers["X-CryoMamba-Signature"].split(",")[0].removeprefix("t="))
    assert abs(stamp - time.time()) < 60


def test_gives_up_after_the_last_attempt(outbox):
    with Receiver(fail_first=100) as receiver:
        sender = sender_for(outbox, receiver, webhook_attempts=3)
        end_job(outbox, "j2", receiver.url)
        drain(sender)
    row = outbox.db.webhook("j2")
    assert (row["state"], row["attempts"], row["last_error"]) == ("failed", 3, "HTTP 500")
    assert len(receiver.requests) == 3


def test_a_redirect_is_not_followed(outbox):
    with Receiver(status=307) as receiver:
        sender = sender_for(outbox, receiver, webhook_attempts=2)
        end_job(outbox, "j3", receiver.url + "/hook")
        drain(sender)
    assert [r.path for r in receiver.requests] == ["/hook", "/hook"]  # never /elsewhere
    assert outbox.db.webhook("j3")["last_error"] == "HTTP 307"


def test_an_unreachable_receiver_and_a_too_old_delivery(outbox):
    port = free_port()  # nothing listens there
    with Receiver() as receiver:
        sender = sender_for(
            outbox, receiver, webhook_allow=(f"127.0.0.1:{port}",), webhook_max_age_s=3600.0
        )
        end_job(outbox, "j4", f"http://127.0.0.1:{port}/")
        sender.run_due()
        row = outbox.db.webhook("j4")
        assert row["state"] == "pending" and "ConnectionRefused" in row["last_error"]
        outbox.db.update_webhook(row["id"], created_at=time.time() - 7200)
        sender.run_due(now=1e12)
    row = outbox.db.webhook("j4")
    assert row["state"] == "failed" and row["last_error"].startswith("older than")
    assert row["attempts"] == 1


def test_a_destination_no_longer_allowed_is_given_up(outbox):
    with Receiver() as receiver:
        end_job(outbox, "j5", receiver.url + "/")
        sender_for(outbox, receiver, webhook_allow=("other.example.org",)).run_due()
    row = outbox.db.webhook("j5")
    assert row["state"] == "failed" and "refused" in row["last_error"]
    assert receiver.requests == []


# -- end to end: real servers ---------------------------------------------------------------
FAST = ["--rate-limit", "100000", "--webhook-backoff", "0.05s", "--webhook-backoff-max", "0.2s"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> SimpleNamespace:
    base = tmp_path_factory.mktemp("webhooks")
    models = base / "models"
    make_model_folder(models / "tiny", patch_size=(16, 16, 16), features=(4, 8, 16), seed=1)
    root = base / "root"
    root.mkdir()
    with mrcfile.new(root / "small.mrc") as mrc:
        mrc.set_data(np.random.default_rng(0).normal(size=(24, 32, 32)).astype(np.float32))
        mrc.voxel_size = 10.0
    return SimpleNamespace(base=base, models=models, root=root)


def live(setup, name: str, *allow: str) -> LiveServer:
    args = [*FAST, *(a for url in allow for a in ("--webhook-allow", url))]
    return LiveServer(
        setup.base / name, models_dir=setup.models, roots=[setup.root], extra_args=args
    )


def wait_job(client, job_id: str, until) -> dict:
    deadline = time.monotonic() + 120
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if until(job):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.05)


def submit(client, **body: Any):
    return client.post(
        "/v1/jobs", json={"server_path": "small.mrc", "config": {"model": "tiny"}, **body}
    )


@pytest.mark.slow
def test_a_live_server_delivers_a_signed_record_once(setup):
    with Receiver(fail_first=2) as receiver:
        server = live(setup, "once", receiver.url + "/cryo/").start()
        try:
            token = server.token("alice", "read,submit")
            with server.client(token) as client:
                r = submit(client, notify_url=f"http://127.0.0.1:{free_port()}/cryo/")
                assert_error(r, 422, "webhook_not_allowed")
                assert_error(
                    submit(client, notify_url="file:///etc/passwd"), 422, "webhook_not_allowed"
                )
                r = submit(client, notify_url=receiver.url + "/cryo/done")
                assert r.status_code == 201, r.text
                assert r.json()["notify_url"] == receiver.url + "/cryo/done"
                assert r.json()["webhook"] is None
                job = wait_job(
                    client,
                    r.json()["id"],
                    lambda j: (j["webhook"] or {}).get("state") == "delivered",
                )
                plain = submit(client)  # no notify_url: no webhook
                assert plain.status_code == 201
                wait_job(client, plain.json()["id"], lambda j: j["state"] == "completed")
            key = (server.data_dir / "webhook.key").read_text().strip().encode()
        finally:
            server.stop()
    assert job["state"] == "completed" and job["webhook"]["attempts"] == 3
    assert [r.answered for r in receiver.requests] == [500, 500, 204]
    (ok,) = receiver.accepted()
    assert docs_verify()(key, ok.body, ok.headers["X-CryoMamba-Signature"])
    body = json.loads(ok.body)
    assert body["id"] == job["id"] and body["state"] == "completed"
    assert "webhook" not in body
    assert set(body["artifacts"]) == set(job["artifacts"])
    for name, info in body["artifacts"].items():  # no signed URLs in a webhook
        assert (
            set(info) == {"sha256", "size"} and info["sha256"] == job["artifacts"][name]["sha256"]
        )
    assert b"sig=" not in ok.body


@pytest.mark.slow
def test_a_pending_delivery_survives_sigkill(setup):
    port = free_port()
    url = f"http://127.0.0.1:{port}/hook"
    server = live(setup, "killed", f"127.0.0.1:{port}").start()
    token = server.token("alice", "read,submit")
    with server.client(token) as client:
        r = submit(client, notify_url=url)
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        job = wait_job(client, job_id, lambda j: (j["webhook"] or {}).get("attempts", 0) >= 1)
        assert job["state"] == "completed" and job["webhook"]["state"] == "pending"
    server.kill()  # the receiver was down: the delivery is still owed
    with Receiver(port) as receiver:
        server.start()
        try:
            with server.client(token) as client:
                job = wait_job(client, job_id, lambda j: j["webhook"]["state"] != "pending")
        finally:
            server.stop()
    assert job["webhook"]["state"] == "delivered"
    (ok,) = receiver.accepted()
    key = (server.data_dir / "webhook.key").read_text().strip().encode()
    assert verify(key, ok.body, ok.headers["X-CryoMamba-Signature"])
    assert json.loads(ok.body)["id"] == job_id


def test_the_openapi_document_says_whether_webhooks_are_accepted(tmp_path):
    from cryomamba.server.openapi import openapi_document

    def notify(**settings: Any) -> dict[str, Any]:
        doc = openapi_document(ServerSettings(data_dir=tmp_path, **settings))
        return doc["components"]["schemas"]["JobSubmit"]["properties"]["notify_url"]

    assert notify()["not"] == {}
    assert notify(webhook_allow=("hooks.example.org",))["pattern"] == "^https?://"
