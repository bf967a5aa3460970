"""A real CryoMamba server in a subprocess (uvicorn on 127.0.0.1, a free port) for end-to-end tests.

Build one in a (module-scoped) fixture::

    server = LiveServer(tmp_path / "data", models_dir=..., extra_args=["--rate-limit", "5"])
    server.start()
    token = server.token("alice", "read,upload,submit")
    ...
    server.kill()      # SIGKILL, like a crash
    server.start()     # same data dir, same port, same secret
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

__all__ = ["LiveServer", "assert_error", "free_port"]


def assert_error(resp: httpx.Response, status: int, code: str) -> dict:
    """The one error envelope, with `status` and `code`; returns the inner object."""
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert list(body) == ["error"]
    err = body["error"]
    assert {"code", "message", "hint", "retryable"} <= set(err)
    assert err["code"] == code, err
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["retryable"], bool)
    return err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """`python -m cryomamba.serve` (or `entry`) in a subprocess, its log captured to a file."""

    def __init__(
        self,
        data_dir: Path,
        *,
        models_dir: Path | None = None,
        roots: list[Path] = (),
        extra_args: list[str] = (),
        env: dict[str, str] | None = None,
        entry: tuple[str, ...] = ("-m", "cryomamba.serve"),
    ) -> None:
        self.entry = tuple(entry)  # or ("-m", "cryomamba", "serve"): the same server
        self.data_dir = Path(data_dir)
        self.models_dir = models_dir
        self.roots = list(roots)
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log_path = self.data_dir.parent / f"server-{self.port}.log"

    def command(self) -> list[str]:
        cmd = [sys.executable, *self.entry, "--data-dir", str(self.data_dir)]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port)]
        for root in self.roots:
            cmd += ["--root", str(root)]
        if self.models_dir is not None:
            cmd += ["--models-dir", str(self.models_dir)]
        return cmd + self.extra_args

    def start(self, timeout: float = 60) -> LiveServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1", **self.env}
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=log, env=env)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/v1/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"server did not answer within {timeout} s:\n{self.log()}")

    def token(self, subject: str = "tester", scopes: str = "read,upload,submit", ttl: str = "1h"):
        """Mint a token with the real `cryomamba token create` (same secret as the server)."""
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "cryomamba",
                "token",
                "create",
                "--data-dir",
                str(self.data_dir),
                "--subject",
                subject,
                "--scopes",
                scopes,
                "--ttl",
                ttl,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()

    def client(self, token: str | None = None, **kwargs) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30, **kwargs)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL: no shutdown hooks run, exactly like a crash or the OOM killer."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
