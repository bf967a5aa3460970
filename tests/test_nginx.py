"""deploy/nginx/cryomamba.conf for real: Debian's nginx terminates TLS (a private CA made here
with openssl) in front of a real server on loopback, and the remote executor runs through it:
upload, job, WebSocket previews, signed downloads, cancel. nginx talks to the server from
127.0.0.3 (`proxy_bind`), so the server tells the proxy from the client (127.0.0.1): the
client's address reaches the logs only when the proxy is trusted.

Skipped, with the reason, where nginx or openssl is missing or nginx cannot start
(scripts/setup.sh installs Debian's nginx when run as root).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import ssl
import subprocess
import time
from pathlib import Path

import mrcfile
import numpy as np
import pytest

for _module in ("httpx", "websockets", "starlette", "uvicorn", "jwt"):  # the `server` extra
    pytest.importorskip(_module)

import httpx  # noqa: E402
from server_fixtures import LiveServer, free_port  # noqa: E402

import cryomamba as cm  # noqa: E402
from cryomamba import JobConfig  # noqa: E402
from cryomamba.events import Canceled, Completed, Preview, Progress  # noqa: E402
from cryomamba.testing import make_model_folder  # noqa: E402

pytestmark = pytest.mark.slow

CONF = Path(__file__).resolve().parents[1] / "deploy" / "nginx" / "cryomamba.conf"
PROXY_ADDR = "127.0.0.3"  # nginx's side of the upstream connection
FORGED = "203.0.113.9"


def _ctx(ca: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca))


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def make_certs(folder: Path) -> tuple[Path, Path, Path]:
    """A private CA and a server certificate for 127.0.0.1 signed by it: (ca, cert, key)."""
    ca_key, ca, key, csr, cert = (
        folder / n for n in ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem")
    )
    _run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(ca_key), "-out", str(ca), "-subj", "/CN=CryoMamba test CA",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    _run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(csr), "-subj", "/CN=127.0.0.1")  # fmt: skip
    ext = folder / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
    _run("openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
         "-CAcreateserial", "-days", "1", "-out", str(cert), "-extfile", str(ext))  # fmt: skip
    return ca, cert, key


def render(prefix: Path, upstream_port: int, https_port: int, http_port: int, cert: Path,
           key: Path) -> Path:  # fmt: skip
    """deploy/nginx/cryomamba.conf with test ports, certificate and paths, in a whole config."""
    site = CONF.read_text()
    swaps = [
        (r"server 127\.0\.0\.1:8000;", f"server 127.0.0.1:{upstream_port};"),
        (r"listen 443 ssl;", f"listen 127.0.0.1:{https_port} ssl;"),
        (r"listen \[::\]:443 ssl;", ""),
        (r"listen 80;", f"listen 127.0.0.1:{http_port};"),
        (r"listen \[::\]:80;", ""),
        (r"ssl_certificate +/\S+;", f"ssl_certificate {cert};"),
        (r"ssl_certificate_key +/\S+;", f"ssl_certificate_key {key};"),
        (r"proxy_http_version 1\.1;", f"proxy_http_version 1.1;\n    proxy_bind {PROXY_ADDR};"),
    ]
    for pattern, repl in swaps:
        site, n = re.subn(pattern, repl, site)
        assert n == 1, f"{pattern!r} is not once in {CONF}"
    (prefix / "cryomamba.conf").write_text(site)
    temp = "\n".join(
        f"    {kind}_temp_path {prefix / 'tmp' / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    main = prefix / "nginx.conf"
    main.write_text(
        ("user root;\n" if os.geteuid() == 0 else "")
        + f"worker_processes 1;\npid {prefix / 'nginx.pid'};\n"
        f"error_log {prefix / 'error.log'} info;\n"
        "events { worker_connections 256; }\n"
        "http {\n"
        f"    access_log {prefix / 'access.log'};\n{temp}\n"
        f"    include {prefix / 'cryomamba.conf'};\n"
        "}\n"
    )
    (prefix / "tmp").mkdir(exist_ok=True)
    return main


class Nginx:
    def __init__(self, prefix: Path, conf: Path, https_port: int) -> None:
        self.prefix, self.conf, self.port = prefix, conf, https_port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, ca: Path) -> None:
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        cmd = [nginx, "-p", str(self.prefix), "-c", str(self.conf), "-e",
               str(self.prefix / "error.log"), "-g", "daemon off;"]  # fmt: skip
        check = subprocess.run([*cmd[:-2], "-t"], capture_output=True, text=True)
        if check.returncode != 0:
            pytest.skip(f"nginx refuses the rendered config: {check.stderr.strip()[-500:]}")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = (self.prefix / "error.log").read_text(errors="replace")
                pytest.skip(f"nginx could not start: {err.strip()[-500:]}")
            try:
                r = httpx.get(f"https://127.0.0.1:{self.port}/v1/healthz", verify=_ctx(ca))
                if r.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        pytest.skip("nginx did not answer within 20 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: nginx's fast shutdown
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _proxy_addr_usable() -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind((PROXY_ADDR, 0))
        except OSError:
            return False
    return True


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """(server, nginx url, CA path): the server trusts nginx's address as a proxy."""
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        pytest.skip("nginx is not installed (scripts/setup.sh installs it as root)")
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make certificates")
    if not _proxy_addr_usable():
        pytest.skip(f"cannot bind {PROXY_ADDR} (needs Linux's whole 127/8 on loopback)")
    base = tmp_path_factory.mktemp("nginx")
    models = base / "models"
    make_model_folder(models / "tiny", patch_size=(16, 16, 16), features=(4, 8, 16), seed=1)
    ca, cert, key = make_certs(base)
    server = LiveServer(
        base / "data",
        models_dir=models,
        extra_args=["--rate-limit", "100000", "--trusted-proxies", PROXY_ADDR],
    ).start()
    https_port, http_port = free_port(), free_port()
    prefix = base / "nginx"
    prefix.mkdir()
    conf = render(prefix, server.port, https_port, http_port, cert, key)
    nginx = Nginx(prefix, conf, https_port)
    try:
        nginx.start(ca)
        yield server, f"https://127.0.0.1:{https_port}", ca, http_port
    finally:
        nginx.stop()
        server.stop()


def write_mrc(path: Path, shape: tuple[int, int, int], seed: int = 0) -> Path:
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(np.random.default_rng(seed).normal(size=shape).astype(np.float32))
        mrc.voxel_size = (10.0, 10.0, 10.0)
    return path


def log_lines(server: LiveServer, logger: str) -> list[dict]:
    out = []
    for line in server.log().splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("logger") == logger:
                out.append(record)
    return out


def test_the_remote_executor_through_nginx(stack, tmp_path):
    server, url, ca, _ = stack
    token = server.token("alice", "read,upload,submit")
    path = write_mrc(tmp_path / "tomo.mrc", (32, 40, 40))
    cfg = JobConfig(model="tiny", preview_interval_s=0.05, formats=("nifti",))
    job = cm.submit(
        path, cfg, executor="remote", server=url, token=token, verify=str(ca),
        download_dir=tmp_path / "dl",
    )  # fmt: skip
    assert job.wait(120)
    assert isinstance(job.terminal_event, Completed), job.terminal_event
    # progress and previews came over the WebSocket, through nginx
    assert isinstance(job.last_progress, Progress) and isinstance(job.last_preview, Preview)
    result = job.result(10)
    assert result.shape == (32, 40, 40)
    assert result.provenance["remote"]["server"].startswith("https://")
    # the signed downloads came through nginx and their checksums were verified
    assert set(result.artifacts) == {"mrc", "stats", "nifti"}
    assert all(Path(p).is_file() for p in result.artifacts.values())

    # a second, longer job is canceled through the proxy
    big = write_mrc(tmp_path / "big.mrc", (96, 160, 160), seed=4)
    second = cm.submit(
        big, JobConfig(model="tiny", preview_interval_s=0), executor="remote", server=url,
        token=token, verify=str(ca),
    )  # fmt: skip
    for event in second.events(timeout=120):
        if isinstance(event, Progress) and event.tiles_done > 0:
            second.cancel()
            break
    assert second.wait(60)
    assert isinstance(second.terminal_event, Canceled), second.terminal_event

    # the server saw the client's address (forwarded by the trusted nginx), never nginx's
    access = log_lines(server, "cryomamba.server.access")
    through = [x for x in access if x["path"].startswith("/v1/")]
    assert through and {x["client"] for x in through} == {"127.0.0.1"}
    audit = log_lines(server, "cryomamba.audit")
    actions = {x["action"] for x in audit}
    assert {"upload.init", "upload.complete", "job.submit", "job.cancel"} <= actions
    assert "artifact.download" in actions
    assert {x["client"] for x in audit} == {"127.0.0.1"}


def test_a_forged_forwarded_for_does_not_pass_nginx(stack):
    """nginx replaces the client's X-Forwarded-For with the address it sees."""
    server, url, ca, _ = stack
    with httpx.Client(verify=_ctx(ca)) as client:
        r = client.get(
            f"{url}/v1/jobs",
            headers={"X-Forwarded-For": FORGED, "X-Request-ID": "forged-through-nginx"},
        )
    assert r.status_code == 401
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = [x for x in log_lines(server, "cryomamba.audit") if x["path"] == "/v1/jobs"]
        refused = [x for x in lines if x["action"] == "auth.refused"]
        if refused:
            break
        time.sleep(0.05)
    assert refused and refused[-1]["client"] == "127.0.0.1"
    assert FORGED not in server.log()


def test_plain_http_is_redirected_to_https(stack):
    http_port = stack[3]
    r = httpx.get(f"http://127.0.0.1:{http_port}/v1/healthz")
    assert r.status_code == 301
    assert r.headers["location"].startswith("https://127.0.0.1")


def test_an_untrusted_proxy_is_not_believed(stack, tmp_path):  # stack: skips like the others
    """The same nginx in front of a server that does not trust it: the logs show nginx's
    address, not what it forwarded."""
    other = LiveServer(tmp_path / "data", extra_args=["--rate-limit", "100000"]).start()
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    https_port, http_port = free_port(), free_port()
    ca2, cert, key = make_certs(tmp_path)
    nginx = Nginx(prefix, render(prefix, other.port, https_port, http_port, cert, key), https_port)
    try:
        nginx.start(ca2)
        r = httpx.get(f"https://127.0.0.1:{https_port}/v1/jobs", verify=_ctx(ca2))
        assert r.status_code == 401
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not log_lines(other, "cryomamba.audit"):
            time.sleep(0.05)
        [line] = log_lines(other, "cryomamba.audit")
        assert line["client"] == PROXY_ADDR  # the proxy itself: its header was ignored
    finally:
        nginx.stop()
        other.stop()


UNIT = CONF.parents[1] / "systemd" / "cryomamba.service"


def test_the_systemd_unit_names_real_settings():
    """Every CRYOMAMBA_SERVER_* the unit's example sets is a flag of `cryomamba serve`, and
    the data dir it sets is writable under ProtectSystem=strict."""
    import argparse

    from cryomamba.serve import add_server_arguments

    text = UNIT.read_text()
    parser = argparse.ArgumentParser()
    add_server_arguments(parser)
    flags = {a.dest.upper() for a in parser._actions if a.dest != "help"}
    named = set(re.findall(r"CRYOMAMBA_SERVER_([A-Z_]+)=", text))
    assert named and named <= flags, named - flags
    settings = dict(re.findall(r"^(\w+)=(.*)$", text, re.MULTILINE))
    assert settings["Restart"] == "on-failure" and settings["NoNewPrivileges"] == "yes"
    assert settings["ProtectSystem"] == "strict"
    data_dir = re.search(r"CRYOMAMBA_SERVER_DATA_DIR=(\S+)", text)
    assert data_dir and data_dir.group(1) in settings["ReadWritePaths"].split()
    assert settings["WorkingDirectory"] == data_dir.group(1)


def test_systemd_accepts_the_unit(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    out = subprocess.run(
        [analyze, "verify", str(UNIT)], capture_output=True, text=True, cwd=tmp_path
    )
    # ExecStart's path exists only on an installed machine; anything else is a real problem
    problems = [
        line
        for line in (out.stdout + out.stderr).splitlines()
        if line.strip() and "is not executable" not in line
    ]
    assert not problems, problems


def test_a_largest_part_passes_the_body_limit(stack):
    """A 32 MiB part (the largest --part-size allows) fits nginx's client_max_body_size."""
    server, url, ca, _ = stack
    token = server.token("dave", "read,upload")
    part = 32 << 20
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=url, verify=_ctx(ca), headers=headers, timeout=60) as client:
        init = client.post(
            "/v1/uploads/init",
            json={"filename": "big.mrc", "size": part + 1, "part_size": part},
        )
        assert init.status_code == 201, init.text
        upload_id = init.json()["upload_id"]
        put = client.put(f"/v1/uploads/{upload_id}/part/0", content=bytes(part))
    assert put.status_code == 200, put.text
    assert put.json()["parts_received"] == [0]
