"""The remote executor against a real `cryomamba serve` on 127.0.0.1: conformance, then what is
special to it (upload resume and retry, errors, reconnects, downloads)."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import mrcfile
import numpy as np
import pytest

import cryomamba as cm
from cryomamba import JobConfig, Volume
from cryomamba.events import Canceled, Completed, Failed, Progress
from cryomamba.executors.remote import RemoteExecutor, ServerPath, UploadedFile
from cryomamba.testing import ExecutorTests, make_model_folder

for _module in ("httpx", "websockets", "starlette", "uvicorn", "jwt"):  # the `server` extra
    pytest.importorskip(_module)

import httpx  # noqa: E402
from server_fixtures import LiveServer, free_port  # noqa: E402

MiB = 1 << 20


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("server-models")
    make_model_folder(root / "tiny", patch_size=(16, 16, 16), features=(4, 8, 16), seed=1)
    return root


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("server-root")


@pytest.fixture(scope="module")
def server(tmp_path_factory, models_dir, roots):
    live = LiveServer(
        tmp_path_factory.mktemp("server") / "data",
        models_dir=models_dir,
        roots=[roots],
        extra_args=["--rate-limit", "100000"],
    ).start()
    yield live
    live.stop()


@pytest.fixture(scope="module")
def token(server) -> str:
    return server.token("alice", "read,upload,submit")


def write_mrc(path: Path, shape=(30, 40, 36), *, padding: int = 0, seed: int = 0) -> Path:
    """A float32 tomogram with 10 Å voxels and an origin; `padding` bytes of extended header
    make a file big enough for several upload parts while inference stays tiny."""
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(np.random.default_rng(seed).normal(size=shape).astype(np.float32))
        if padding:
            mrc.set_extended_header(np.zeros(padding, dtype="V1"))
        mrc.voxel_size = (10.0, 10.0, 10.0)
        mrc.header.origin = (100.0, 200.0, 300.0)
    return path


class Faults(httpx.BaseTransport):
    """Wraps the real transport; `rule(request, forward)` may answer instead of the server."""

    def __init__(self, rule) -> None:
        self.inner, self.rule = httpx.HTTPTransport(), rule

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return self.rule(request, self.inner.handle_request) or self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()


class Recording(RemoteExecutor):
    """Records every HTTP exchange as (method, path, status); optionally injects faults."""

    def __init__(self, *args, rule=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.exchanges: list[tuple[str, str, int]] = []
        self.rule = rule

    def _make_client(self, **kwargs):
        def record(response: httpx.Response) -> None:
            request = response.request
            self.exchanges.append((request.method, request.url.path, response.status_code))

        if self.rule is not None:
            kwargs["transport"] = Faults(self.rule)
        return super()._make_client(event_hooks={"response": [record]}, **kwargs)

    def puts(self) -> list[int]:
        """Part indices of every PUT sent (retries included)."""
        return [int(p.rsplit("/", 1)[1]) for m, p, _ in self.exchanges if m == "PUT"]

    def statuses(self, method: str, path_part: str) -> list[int]:
        return [s for m, p, s in self.exchanges if m == method and path_part in p]


def part_index(request: httpx.Request) -> int | None:
    if request.method == "PUT" and "/part/" in request.url.path:
        return int(request.url.path.rsplit("/", 1)[1])
    return None


# -- the conformance suite -------------------------------------------------------------------------
class TestRemoteExecutor(ExecutorTests):
    @pytest.fixture
    def executor(self, server, token):
        ex = RemoteExecutor(server.url, token)
        yield ex
        ex.close()

    @pytest.fixture
    def model(self):
        return "tiny"

    @pytest.fixture
    def volume_source(self, mrc_file):
        return mrc_file


# -- same results as local -----------------------------------------------------------------------
def test_remote_labels_equal_local_labels(server, token, models_dir, tmp_path):
    path = write_mrc(tmp_path / "tomo.mrc")
    local = cm.segment(path, model=models_dir / "tiny", executor="local")
    ex = RemoteExecutor(server.url, token, download_dir=tmp_path / "downloads")
    try:
        job = ex.submit(path, JobConfig(model="tiny"))
        remote = job.result(120)
    finally:
        ex.close()
    np.testing.assert_array_equal(np.asarray(remote.labels), np.asarray(local.labels))
    assert remote.labels.dtype == np.uint8
    assert (remote.voxel_size, remote.origin) == (local.voxel_size, local.origin)
    assert remote.label_names == local.label_names
    assert remote.provenance["model"]["sha256"] == local.provenance["model"]["sha256"]
    assert remote.provenance["source"]["sha256"] == local.provenance["source"]["sha256"]
    assert remote.stats["labels"] == local.stats["labels"]
    # the artifacts lie in download_dir/<server job id>/, checked and complete
    job_id = remote.provenance["remote"]["job_id"]
    assert remote.artifacts["mrc"] == tmp_path / "downloads" / job_id / "mask.mrc"
    assert set(remote.artifacts) == {"mrc", "nifti", "nrrd", "stats", "png"}
    assert job.terminal_event.artifacts == {k: str(v) for k, v in remote.artifacts.items()}
    assert not list((tmp_path / "downloads" / job_id).glob(".part-*"))


def test_submit_through_the_registry(server, token, tmp_path):
    path = write_mrc(tmp_path / "tomo.mrc", seed=3)
    cfg = JobConfig(model="tiny", formats=("nifti",))
    job = cm.submit(path, cfg, executor="remote", server=server.url, token=token)
    result = job.result(120)
    assert isinstance(job.terminal_event, Completed)
    assert result.shape == (30, 40, 36) and result.voxel_size == (10.0, 10.0, 10.0)
    # mask.mrc and stats.json are always fetched (the result is built from them)
    assert set(result.artifacts) == {"mrc", "stats", "nifti"}


def test_arrays_volumes_and_server_paths(server, token, roots, models_dir, noise_volume):
    ex = Recording(server.url, token)
    try:
        vol = Volume.from_array(noise_volume, voxel_size=(20.0, 10.0, 10.0), origin=(1.0, 2.0, 3.0))
        result = ex.submit(vol, JobConfig(model="tiny")).result(120)
        assert result.voxel_size == (20.0, 10.0, 10.0) and result.origin == (1.0, 2.0, 3.0)
        local = cm.segment(vol, model=models_dir / "tiny")
        np.testing.assert_array_equal(np.asarray(result.labels), local.labels)
        # a bare array has no voxel size: say it is already at the model's (else refused)
        part = ex.submit(noise_volume[:20], JobConfig(model="tiny", resample="off")).result(120)
        assert part.shape == (20, 40, 36)
        ex.exchanges.clear()
        on_server = write_mrc(roots / "on-server.mrc", seed=5)
        result = ex.submit(ServerPath(on_server.name), JobConfig(model="tiny")).result(120)
        assert result.voxel_size == (10.0, 10.0, 10.0) and result.origin == (300.0, 200.0, 100.0)
        assert not [p for _, p, _ in ex.exchanges if "/uploads" in p]  # nothing was uploaded
    finally:
        ex.close()


# -- uploads ---------------------------------------------------------------------------------------
_KILLED_CLIENT = """
import sys, time
from cryomamba import JobConfig
from cryomamba.executors.remote import RemoteExecutor

class Slow(RemoteExecutor):
    def _make_client(self, **kwargs):
        def sent(request):
            if request.method == "PUT":
                print("sent", request.url.path.rsplit("/", 1)[1], flush=True)
        def acked(response):
            if response.request.method == "PUT" and response.status_code == 200:
                print("acked", flush=True)
                time.sleep(0.5)  # room for the test to kill us between parts
        hooks = {"request": [sent], "response": [acked]}
        return super()._make_client(event_hooks=hooks, **kwargs)

url, token, path = sys.argv[1:4]
ex = Slow(url, token, part_size=8 << 20, parallel_uploads=1)
ex.submit(path, JobConfig(model="tiny")).wait(300)
"""


@pytest.mark.slow
def test_a_killed_client_resumes_its_upload(server, tmp_path):
    token = server.token("resumer", "read,upload,submit")
    path = write_mrc(tmp_path / "big.mrc", padding=36 * MiB)  # 5 parts of 8 MiB
    parts_total = -(-path.stat().st_size // (8 * MiB))
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_CLIENT, server.url, token, str(path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line.split()[0])
            if lines.count("acked") == 2:
                proc.kill()
                break
    finally:
        proc.kill()
        rest, _ = proc.communicate(timeout=30)
    lines += [line.split()[0] for line in rest.splitlines()]
    assert lines.count("acked") == 2, lines
    sent_before = lines.count("sent")

    ex = Recording(server.url, token, part_size=8 * MiB)
    try:
        job = ex.submit(path, JobConfig(model="tiny"))
        assert job.wait(300)
    finally:
        ex.close()
    assert isinstance(job.terminal_event, Completed), (job.terminal_event, ex.exchanges)
    assert ex.statuses("POST", "/uploads/init") == [200]  # resumed, not started again
    sent_after = ex.puts()
    assert 1 <= len(sent_after) <= parts_total - 2
    assert sent_before + len(sent_after) <= parts_total + 1  # at most one part sent twice
    assert job.result().shape == (30, 40, 36)


@pytest.mark.slow
def test_failed_part_puts_are_retried(server, token, tmp_path):
    """Part 1 first gets a 503, part 2 a 429 with Retry-After, part 3 a broken connection."""
    path = write_mrc(tmp_path / "parts.mrc", padding=28 * MiB, seed=7)  # 4 parts of 8 MiB
    seen: dict[int, int] = {}
    lock = threading.Lock()

    def rule(request: httpx.Request, forward) -> httpx.Response | None:
        index = part_index(request)
        if index is None:
            return None
        with lock:
            seen[index] = seen.get(index, 0) + 1
            first = seen[index] == 1
        if first and index == 1:
            return httpx.Response(503, json={"error": {"code": "busy", "message": "busy"}})
        if first and index == 2:
            return httpx.Response(429, headers={"Retry-After": "0"}, json={})
        if first and index == 3:
            raise httpx.ReadError("connection reset by peer")
        return None

    ex = Recording(server.url, token, part_size=8 * MiB, backoff_s=0.05, rule=rule)
    try:
        result = ex.submit(path, JobConfig(model="tiny")).result(300)
    finally:
        ex.close()
    assert seen == {0: 1, 1: 2, 2: 2, 3: 2}
    assert ex.statuses("POST", "/complete") == [201]
    assert result.provenance["source"]["sha256"] == Volume.open(path).checksum()


@pytest.mark.slow
def test_parts_the_server_lacks_at_complete_are_sent_again(server, token, tmp_path):
    """A part 'acknowledged' without reaching the server: complete answers 409 missing_parts,
    and the client sends just that part again."""
    path = write_mrc(tmp_path / "lost.mrc", padding=20 * MiB, seed=11)  # 3 parts
    lost = []

    def rule(request, forward):
        if part_index(request) == 1 and not lost:
            lost.append(1)
            digest = request.headers["X-Part-SHA256"]
            return httpx.Response(200, json={"index": 1, "sha256": digest, "parts_received": [1]})
        return None

    ex = Recording(server.url, token, part_size=8 * MiB, rule=rule)
    try:
        result = ex.submit(path, JobConfig(model="tiny")).result(300)
    finally:
        ex.close()
    assert ex.statuses("POST", "/complete") == [409, 201]
    assert sorted(ex.puts()) == [0, 1, 1, 2]
    assert result.shape == (30, 40, 36)


@pytest.mark.slow
def test_the_servers_own_429_is_honoured(tmp_path, models_dir):
    """With one part in flight per token allowed, parts meet the server's 429s and retry."""
    live = LiveServer(
        tmp_path / "data", models_dir=models_dir, extra_args=["--upload-concurrency", "1"]
    ).start()
    token = live.token("bob")
    ex = Recording(live.url, token, part_size=8 * MiB, parallel_uploads=3)
    started, hold = threading.Event(), threading.Event()
    try:
        path = write_mrc(tmp_path / "tomo.mrc", padding=20 * MiB)  # 3 parts

        def slow_body():  # keeps the token's one upload slot busy until the client met a 429
            yield b"x"
            started.set()
            hold.wait(60)

        with live.client(token) as client:
            other = client.post("/v1/uploads/init", json={"filename": "slot.mrc", "size": 10})
            url = f"/v1/uploads/{other.json()['upload_id']}/part/0"
            holder = threading.Thread(target=lambda: client.put(url, content=slow_body()))
            holder.start()
            assert started.wait(30)
            time.sleep(0.5)  # the server has read the headers and counted the part in flight
            job = ex.submit(path, JobConfig(model="tiny"))
            deadline = time.monotonic() + 60
            while 429 not in ex.statuses("PUT", "/part/") and time.monotonic() < deadline:
                if job.wait(0.05):
                    break
            hold.set()
            holder.join(30)
            result = job.result(300)
        assert 429 in ex.statuses("PUT", "/part/")
        assert sorted(set(ex.puts())) == [0, 1, 2]
        assert result.shape == (30, 40, 36)
    finally:
        hold.set()
        ex.close()
        live.stop()


def test_a_corrupt_file_fails_locally_before_any_upload(server, token, tmp_path):
    bad = tmp_path / "cut.mrc"
    data = write_mrc(tmp_path / "whole.mrc").read_bytes()
    bad.write_bytes(data[: len(data) - 1000])
    ex = Recording(server.url, token)
    try:
        job = ex.submit(bad, JobConfig(model="tiny"))
        assert job.wait(30)
    finally:
        ex.close()
    with pytest.raises(cm.InvalidVolumeError) as expected:
        Volume.open(bad)
    failed = job.terminal_event
    assert isinstance(failed, Failed) and failed.code == "invalid_volume"
    assert failed.message == expected.value.message and failed.hint == expected.value.hint
    assert "truncated" in failed.message
    assert ex.exchanges == []


def test_cancel_while_uploading_creates_no_server_job(server, tmp_path):
    token = server.token("carol", "read,upload,submit")
    path = write_mrc(tmp_path / "tomo.mrc", padding=20 * MiB, seed=9)
    entered, release = threading.Event(), threading.Event()

    def rule(request, forward):
        if part_index(request) is not None:
            entered.set()
            release.wait(30)
        return None

    ex = Recording(server.url, token, part_size=8 * MiB, parallel_uploads=1, rule=rule)
    try:
        job = ex.submit(path, JobConfig(model="tiny"))
        assert entered.wait(30)
        job.cancel()
        release.set()
        assert job.wait(30)
    finally:
        release.set()
        ex.close()
    assert isinstance(job.terminal_event, Canceled)
    assert len(ex.puts()) == 1  # the part in flight, none after the cancel
    with server.client(token) as client:
        assert client.get("/v1/jobs").json()["jobs"] == []


# -- errors ----------------------------------------------------------------------------------------
def test_a_wrong_token_fails_with_invalid_token(server, mrc_file):
    ex = RemoteExecutor(server.url, "not-a-token", backoff_s=0.01)
    try:
        job = ex.submit(mrc_file, JobConfig(model="tiny"))
        assert job.wait(30)
    finally:
        ex.close()
    failed = job.terminal_event
    assert isinstance(failed, Failed) and failed.code == "invalid_token", failed
    assert failed.hint and not failed.retryable


def test_an_unreachable_server_fails_with_server_unreachable(mrc_file):
    url = f"http://127.0.0.1:{free_port()}"
    ex = RemoteExecutor(url, "t", retries=2, backoff_s=0.01)
    try:
        job = ex.submit(mrc_file, JobConfig(model="tiny"))
        assert job.wait(30)
    finally:
        ex.close()
    failed = job.terminal_event
    assert isinstance(failed, Failed) and failed.code == "server_unreachable"
    assert url in failed.message and "cryomamba serve" in failed.hint and failed.retryable


def test_a_corrupted_download_fails_with_checksum_mismatch(server, token, tmp_path):
    def rule(request, forward):
        if request.url.path.endswith("/stats.json"):
            real = forward(request)
            body = real.read()
            real.close()
            return httpx.Response(200, content=body.replace(b"{", b"[", 1))
        return None

    ex = Recording(server.url, token, download_dir=tmp_path / "dl", rule=rule)
    try:
        job = ex.submit(write_mrc(tmp_path / "tomo.mrc"), JobConfig(model="tiny"))
        assert job.wait(120)
    finally:
        ex.close()
    failed = job.terminal_event
    assert isinstance(failed, Failed) and failed.code == "checksum_mismatch" and failed.retryable
    assert not list((tmp_path / "dl").rglob("stats.json"))  # a bad file never takes the name


def test_the_token_and_url_signatures_never_reach_the_log(server, token, mrc_file, caplog):
    caplog.set_level(logging.DEBUG)
    ex = RemoteExecutor(server.url, token)
    try:
        ex.submit(mrc_file, JobConfig(model="tiny")).result(120)
    finally:
        ex.close()
    messages = [r.getMessage() for r in caplog.records]
    assert any("/v1/files/" in m for m in messages)  # httpx did log the downloads...
    assert not [m for m in messages if token in m]
    assert not [m for m in messages if re.search(r"sig=[0-9a-f]", m)]  # ...without signatures
    assert token not in repr(ex)


@pytest.mark.slow
def test_the_client_rides_out_a_server_crash(tmp_path, models_dir):
    """SIGKILL the server mid-job; it restarts with --on-restart requeue, the client reconnects,
    sees the job run again and completes, with progress that never goes backwards."""
    live = LiveServer(
        tmp_path / "data", models_dir=models_dir, extra_args=["--on-restart", "requeue"]
    ).start()
    try:
        token = live.token("dave")
        path = write_mrc(tmp_path / "tomo.mrc", shape=(48, 64, 64))
        ex = RemoteExecutor(live.url, token, backoff_s=0.2)
        cfg = JobConfig(model="tiny", tile_step=0.25)
        job = ex.submit(path, cfg)
        events, killed = [], False
        for event in job.events(timeout=300):
            events.append(event)
            if isinstance(event, Progress) and not killed:
                killed = True
                live.kill()
                live.start()
        ex.close()
        assert isinstance(events[-1], Completed), events[-1]
        fractions = [e.fraction for e in events if isinstance(e, Progress)]
        assert fractions == sorted(fractions) and fractions[-1] == 1.0
        local = cm.segment(path, model=models_dir / "tiny", tile_step=0.25)
        np.testing.assert_array_equal(np.asarray(events[-1].result.labels), local.labels)
    finally:
        live.stop()


def test_a_server_path_outside_the_roots_fails_with_the_servers_code(server, token):
    ex = RemoteExecutor(server.url, token)
    try:
        job = ex.submit(ServerPath("../../etc/passwd"), JobConfig(model="tiny"))
        assert job.wait(30)
    finally:
        ex.close()
    failed = job.terminal_event
    assert isinstance(failed, Failed) and failed.code == "path_not_allowed"
    assert "etc/passwd" in failed.message and failed.hint


def test_the_token_comes_from_the_environment(server, token, mrc_file, monkeypatch):
    monkeypatch.setenv("CRYOMAMBA_TOKEN", token)
    ex = Recording(server.url)
    try:
        job = ex.submit(mrc_file, JobConfig(model="no-such-model"))
        assert job.wait(60)
    finally:
        ex.close()
    assert job.terminal_event.code == "invalid_model"  # got past the authenticated upload
    assert ex.statuses("POST", "/uploads/init") in ([200], [201])


# -- registration ----------------------------------------------------------------------------------
def test_remote_is_registered_and_imports_nothing_heavy():
    code = (
        "import json, sys, cryomamba.plugins as p; names = p.executors().names(); "
        "print(json.dumps([names, [m in sys.modules for m in ('httpx', 'websockets')]]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    names, imported = json.loads(out.stdout)
    assert "remote" in names and imported == [False, False]


def test_remote_is_not_offered_without_its_packages(monkeypatch):
    import importlib.util

    from cryomamba.executors import remote
    from cryomamba.registry import Registry

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "websockets" else real(name)
    )
    registry = Registry("executor")
    remote.cryomamba_register_executors(registry)
    assert "remote" not in registry


def test_bad_options_are_config_errors():
    with pytest.raises(cm.ConfigError, match="http"):
        RemoteExecutor("127.0.0.1:8000")
    with pytest.raises(cm.ConfigError):
        RemoteExecutor("http://127.0.0.1:8000", parallel_uploads=0)


@pytest.mark.slow
def test_https_and_wss_with_a_private_certificate(tmp_path, models_dir, monkeypatch):
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # for LiveServer's own health check
    live = LiveServer(
        tmp_path / "data",
        models_dir=models_dir,
        extra_args=["--ssl-certfile", str(cert), "--ssl-keyfile", str(key)],
    )
    live.url = live.url.replace("http://", "https://")
    live.start()
    ex = RemoteExecutor(live.url, live.token("erin"), verify=str(cert))
    try:
        result = ex.submit(write_mrc(tmp_path / "tomo.mrc"), JobConfig(model="tiny")).result(120)
        assert result.shape == (30, 40, 36)
        assert result.provenance["remote"]["server"].startswith("https://")
    finally:
        ex.close()
        live.stop()


def test_upload_returns_a_file_id_and_a_second_upload_reuses_it(server, token, mrc_file):
    ex = RemoteExecutor(server.url, token)
    try:
        first = ex.upload(mrc_file)
        again = ex.upload(mrc_file)
    finally:
        ex.close()
    assert first == again
    raw = server.data_dir / "raw" / f"{first.id}.mrc"
    assert raw.read_bytes() == mrc_file.read_bytes()


@pytest.mark.slow
def test_a_file_with_the_same_fingerprint_but_other_bytes_is_uploaded_anew(server, token, tmp_path):
    """The fingerprint samples the file: a finished upload it finds is used only if the
    whole SHA-256 agrees; otherwise the client uploads the file again."""
    from cryomamba.executors.remote._upload import fingerprint

    (tmp_path / "a").mkdir()
    first = write_mrc(tmp_path / "a" / "same.mrc", padding=24 * MiB, seed=5)
    size = first.stat().st_size
    gap = size * 1 // 17 + (1 << 20) + 10  # past the first sampled MiB, before the second
    assert gap < size * 2 // 17
    data = bytearray(first.read_bytes())
    data[gap] ^= 0xFF  # inside the extended header: still a valid MRC
    second = tmp_path / "b" / "same.mrc"
    second.parent.mkdir()
    second.write_bytes(data)
    assert fingerprint(first, size) == fingerprint(second, size)

    ex = Recording(server.url, token, part_size=8 * MiB)
    try:
        a = ex.upload(first)
        b = ex.upload(second)
    finally:
        ex.close()
    assert a.id != b.id
    assert (server.data_dir / "raw" / f"{b.id}.mrc").read_bytes() == bytes(data)
    assert (server.data_dir / "raw" / f"{a.id}.mrc").read_bytes() == first.read_bytes()
    assert ex.statuses("POST", "/uploads/init") == [201, 200, 201]  # found, refused, anew


def test_submit_takes_what_upload_returns(server, token, mrc_file, tmp_path):
    ex = Recording(server.url, token, download_dir=tmp_path / "dl")
    try:
        uploaded = ex.upload(mrc_file)
        ex.exchanges.clear()
        result = ex.submit(uploaded, JobConfig(model="tiny")).result(120)
        again = ex.submit(UploadedFile(uploaded.id), JobConfig(model="tiny")).result(120)
    finally:
        ex.close()
    assert not [p for _, p, _ in ex.exchanges if "/uploads" in p]  # nothing sent again
    assert result.labels.shape == Volume.open(mrc_file).shape
    np.testing.assert_array_equal(np.asarray(result.labels), np.asarray(again.labels))


def test_temporary_downloads_go_with_the_result_or_at_close(
    server, token, mrc_file, tmp_path, monkeypatch
):
    import gc

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("CRYOMAMBA_TMPDIR", str(tmp))
    ex = RemoteExecutor(server.url, token)
    try:
        job = ex.submit(mrc_file, JobConfig(model="tiny"))
        result = job.result(120)
        (folder,) = tmp.iterdir()
        assert result.artifacts["mrc"].parent == folder and result.artifacts["mrc"].is_file()
        labels = np.array(result.labels)
        del job, result
        gc.collect()
        assert list(tmp.iterdir()) == []  # dropped with the result
        kept = ex.submit(mrc_file, JobConfig(model="tiny")).result(120)
        assert len(list(tmp.iterdir())) == 1
    finally:
        ex.close()
    assert list(tmp.iterdir()) == []  # closing the executor removes what is left
    np.testing.assert_array_equal(np.asarray(kept.labels), labels)  # still readable (POSIX)


def test_a_server_that_never_answered_fails_fast_with_default_retries(mrc_file):
    """A wrong URL or a server that is down: seconds, not the backoff of every retry (33 s)."""
    url = f"http://127.0.0.1:{free_port()}"
    ex = RemoteExecutor(url, "t")
    start = time.monotonic()
    try:
        job = ex.submit(mrc_file, JobConfig(model="tiny"))
        assert job.wait(30)
    finally:
        ex.close()
    failed = job.terminal_event
    assert isinstance(failed, Failed) and failed.code == "server_unreachable"
    assert url in failed.message and "cryomamba serve" in failed.hint
    assert time.monotonic() - start < 10


def test_zarr_input_and_zarr_artifacts_travel_as_zips(server, token, tmp_path, noise_volume):
    """An OME-Zarr source is sent as MRC; mask.zarr and probabilities.zarr come back as one
    zip each, are checked and unpacked, and FileSink writes them like local results."""
    zarr = pytest.importorskip("zarr")
    from cryomamba.zarr_write import create_group, multiscales_metadata

    group = create_group(tmp_path / "tomo.zarr")
    group.create_dataset("0", data=noise_volume, chunks=(8, 8, 8))
    group.attrs.update(multiscales_metadata(1, (10.0, 10.0, 10.0), (0.0, 0.0, 0.0), "tomo"))
    out = tmp_path / "out"
    sink = cm.sinks.FileSink(out, formats=["zarr", "probabilities", "mrc"])
    job = cm.submit(
        str(tmp_path / "tomo.zarr"),
        JobConfig(model="tiny", formats=("zarr",)),
        executor="remote",
        server=server.url,
        token=token,
        sinks=[sink],
    )
    result = job.result(120)
    assert job.sink_errors == []
    record = httpx.get(
        f"{server.url}/v1/jobs/{result.provenance['remote']['job_id']}",
        headers={"Authorization": f"Bearer {token}"},
    ).json()
    assert {"mask.zarr.zip", "probabilities.zarr.zip"} <= set(record["artifacts"])
    assert result.artifacts["zarr"].is_dir()
    np.testing.assert_array_equal(zarr.open(str(result.artifacts["zarr"]))["0"][:], result.labels)
    assert {p.name for p in out.iterdir()} == {"mask.zarr", "probabilities.zarr", "mask.mrc"}
    again = cm.threshold(out / "probabilities.zarr", at=0.5)
    np.testing.assert_array_equal(again.labels, np.asarray(result.labels))
    # the zip itself opens in zarr as it is
    url = record["artifacts"]["mask.zarr.zip"]["url"]
    blob = httpx.get(url if url.startswith("http") else f"{server.url}{url}").content
    (tmp_path / "m.zip").write_bytes(blob)
    store = zarr.storage.ZipStore(str(tmp_path / "m.zip"), mode="r")
    np.testing.assert_array_equal(zarr.open(store, mode="r")["0"][:], result.labels)
    store.close()
