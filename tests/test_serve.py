"""The server's two entry points: flags and environment, JSON log lines, the TLS warning."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("uvicorn")

from server_fixtures import LiveServer


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_logs_are_json_with_request_ids_and_settings_come_from_the_environment(tmp_path):
    env = {"CRYOMAMBA_SERVER_RATE_LIMIT": "7", "CRYOMAMBA_SERVER_URL_TTL": "5m"}
    server = LiveServer(tmp_path / "data", env=env).start()
    try:
        token = server.token("alice", "read")
        with server.client(token) as client:
            resp = client.get("/v1/server/info", headers={"X-Request-ID": "trace-42"})
        assert resp.headers["x-request-id"] == "trace-42"
        limits = resp.json()["limits"]
        assert limits["rate_limit_per_min"] == 7 and limits["url_ttl_s"] == 300
    finally:
        server.stop()
    text = server.log()
    lines = [line for line in text.splitlines() if line.strip()]
    records = _json_lines(text)
    assert len(records) == len(lines), "every log line is one JSON object"
    request = [r for r in records if r.get("request_id") == "trace-42"]
    assert request and request[0]["route"] == "/v1/server/info" and request[0]["status"] == 200
    assert request[0]["subject"] == "alice" and request[0]["level"] == "info"
    assert not any("without TLS" in r["message"] for r in records)  # loopback: no warning


@pytest.mark.slow
def test_binding_beyond_loopback_without_tls_warns(tmp_path):
    server = LiveServer(tmp_path / "data", extra_args=["--host", "0.0.0.0"]).start()
    server.stop()
    warnings = [r for r in _json_lines(server.log()) if r["level"] == "warning"]
    assert any("without TLS" in r["message"] and "0.0.0.0" in r["message"] for r in warnings)


@pytest.mark.slow
@pytest.mark.parametrize(
    "entry", [("-m", "cryomamba.serve"), ("-m", "cryomamba", "serve")], ids=["module", "cli"]
)
def test_both_entry_points_log_the_same_json_lines(tmp_path, entry):
    """Boot line, access lines, the TLS warning once: every line one JSON object."""
    server = LiveServer(tmp_path / "data", extra_args=["--host", "0.0.0.0"], entry=entry)
    server.start()
    try:
        with server.client() as client:
            assert client.get("/v1/healthz", headers={"X-Request-ID": "probe-1"}).is_success
    finally:
        server.stop()
    text = server.log()
    lines = [line for line in text.splitlines() if line.strip()]
    records = _json_lines(text)
    assert len(records) == len(lines), text  # no rich block, no plain-text line
    assert sum("without TLS" in r["message"] for r in records) == 1, text
    assert any(r["logger"] == "cryomamba.server.app" and "boot" in r["message"] for r in records)
    access = [r for r in records if r.get("request_id") == "probe-1"]
    assert access and access[0]["path"] == "/v1/healthz" and access[0]["status"] == 200


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--part-size", "1M"], "part size"),
        (["--on-restart", "later"], "invalid choice"),
        (["--upload-ttl", "soon"], "duration"),
        (["--ssl-certfile", "cert.pem"], "TLS needs both"),
    ],
)
@pytest.mark.parametrize("entry", [["cryomamba.serve"], ["cryomamba", "serve"]])
def test_bad_settings_are_one_clear_error(tmp_path, args, message, entry):
    proc = subprocess.run(
        [sys.executable, "-m", *entry, "--data-dir", str(tmp_path / "d"), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
