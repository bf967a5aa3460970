"""scripts/server_walkthrough.sh (docs/server.md's curl walk-through) runs as written against a
real server: a two-part upload, a resumed one, a job polled to the end, artifacts checked."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pytest

pytest.importorskip("uvicorn")

from server_fixtures import LiveServer

from cryomamba.testing import make_model_folder

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "server_walkthrough.sh"
PART = 8 << 20  # the smallest part size a server accepts
SHAPE = (9, 512, 512)  # float32: 9.4 MB, two parts of 8 MiB

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (shutil.which("bash") and shutil.which("curl")), reason="bash, curl"),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("walkthrough")
    make_model_folder(base / "models" / "tiny", patch_size=(8, 128, 128), features=(4, 8))
    live = LiveServer(base / "data", models_dir=base / "models", extra_args=["--part-size", "8M"])
    live.start()
    yield live
    live.stop()


@pytest.fixture(scope="module")
def tomogram(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("walkthrough-in") / "tomo.mrc"
    with mrcfile.new(path) as mrc:
        mrc.set_data(np.random.default_rng(0).normal(size=SHAPE).astype(np.float32))
        mrc.voxel_size = 10.0
    assert PART < path.stat().st_size < 2 * PART
    return path


def walkthrough(
    server, token: str, tomogram: Path, out: Path, config: str = '"tile_step": 1.0'
) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "S": server.url,
        "TOKEN": token,
        "MODEL": "tiny",
        "CONFIG": config,
        "PYTHON": sys.executable,  # the script's JSON reader; python3 by default
    }
    return subprocess.run(
        ["bash", str(SCRIPT), str(tomogram), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_walkthrough_runs_as_written(server, tomogram, tmp_path):
    proc = walkthrough(server, server.token("alice"), tomogram, tmp_path / "out")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "in 2 part(s) of 8388608 bytes (open)" in proc.stdout
    assert "part 0: sent" in proc.stdout and "part 1: sent" in proc.stdout
    assert "shape [9, 512, 512]" in proc.stdout
    assert "completed" in proc.stdout
    names = {"mask.mrc", "mask.nii.gz", "mask.nrrd", "stats.json", "overview.png"}
    assert {p.name for p in (tmp_path / "out").iterdir()} == names
    with mrcfile.open(tmp_path / "out" / "mask.mrc") as mask:
        assert mask.data.shape == SHAPE
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["provenance"]["source"]["sha256"] == sha256(tomogram)
    assert stats["provenance"]["config"]["tile_step"] == 1.0


def test_a_rerun_resumes_the_upload_and_sends_only_missing_parts(server, tomogram, tmp_path):
    token = server.token("bob")
    data = tomogram.read_bytes()
    with server.client(token) as client:  # an upload cut short after its first part
        body = {"filename": tomogram.name, "size": len(data), "sha256": sha256(tomogram)}
        upload = client.post("/v1/uploads/init", json=body).json()
        part = data[:PART]
        resp = client.put(f"/v1/uploads/{upload['upload_id']}/part/0", content=part)
        assert resp.status_code == 200, resp.text
    config = '"tile_step": 1.0, "formats": ["mrc"]'
    proc = walkthrough(server, token, tomogram, tmp_path / "out", config)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "part 0: already on the server" in proc.stdout and "part 1: sent" in proc.stdout
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mask.mrc"]


def test_an_error_shows_the_servers_envelope_and_stops(server, tomogram, tmp_path):
    proc = walkthrough(server, "not-a-token", tomogram, tmp_path / "out")
    assert proc.returncode != 0
    assert "error: POST /v1/uploads/init failed: " in proc.stderr
    assert '"code":"invalid_token"' in proc.stderr.replace(" ", "")
    assert not (tmp_path / "out").exists()
