"""Server benchmarks, each beside a reference measured in the same run.

1. Upload: a >= 1 GiB MRC through the remote executor (one read of the file on the client
   that hashes it while sending, per-part SHA-256 on both sides, each part written once
   and fdatasync'ed on the server, the whole-file SHA-256 as parts arrive, header check,
   link into raw/) against a verified durable copy of the same file on the same disk
   (`sha256sum`, `cp`, `sync`), as a throughput ratio (target >= 0.5x); also 4 clients
   (own token each) uploading it at once, against 4 such copies at once.
2. Latency: p50/p95 of GET /v1/jobs/{id} from 50 concurrent clients (one token each, each
   on its own connection) while a job runs on the server (target p95 < 50 ms).
3. Mixed load (`--mixed`, see _server_load.py): 60 s of 50 polling clients, 10 WebSocket
   followers, 2 uploads and jobs running; errors and p95 per route, and what was lost (nothing).

    python benchmarks/server.py                 # 1 GiB upload, 50 clients; writes the doc
    python benchmarks/server.py --size-gib 0.25 --no-write
    python benchmarks/server.py --mixed --skip upload --skip latency
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from _doc import machine, write_block  # noqa: E402
from _server_load import mixed_benchmark  # noqa: E402
from _server_load import report as mixed_report  # noqa: E402
from server_fixtures import LiveServer  # noqa: E402

MiB = 1 << 20


def make_big_mrc(path: Path, size_gib: float) -> Path:
    """A float32 MRC of about `size_gib` GiB (1024 x 1024 planes of a cheap pattern)."""
    import mrcfile

    nz = max(1, round(size_gib * 2**30 / (1024 * 1024 * 4)))
    if path.exists() and path.stat().st_size >= nz * 4 * 2**20:
        return path
    with mrcfile.new_mmap(path, shape=(nz, 1024, 1024), mrc_mode=2, overwrite=True) as mrc:
        plane = np.random.default_rng(0).normal(size=(1024, 1024)).astype(np.float32)
        for z in range(nz):
            mrc.data[z] = plane + z
        mrc.voxel_size = 10.0
    return path


def time_cp(src: Path, dst: Path, durable: bool = False) -> float:
    """`cp`, or `cp` then fsync of the copy."""
    dst.unlink(missing_ok=True)
    start = time.perf_counter()
    subprocess.run(["cp", str(src), str(dst)], check=True)
    if durable:
        fd = os.open(dst, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    seconds = time.perf_counter() - start
    dst.unlink()
    return seconds


def _verified_copy(src: Path, dst: Path) -> list[str]:
    """The shell line of a verified durable copy: hash, copy, flush the copy to disk."""
    return ["sh", "-c", f"sha256sum '{src}' > /dev/null && cp '{src}' '{dst}' && sync '{dst}'"]


def time_verified_copies(src: Path, work: Path, n: int) -> float:
    """`sha256sum` + `cp` + `sync` of `src`, `n` at once (each to its own copy); seconds."""
    dsts = [work / f"copy-{i}.mrc" for i in range(n)]
    for dst in dsts:
        dst.unlink(missing_ok=True)
    start = time.perf_counter()
    procs = [subprocess.Popen(_verified_copy(src, dst)) for dst in dsts]
    if any(p.wait() != 0 for p in procs):
        raise SystemExit("the reference copy failed")
    seconds = time.perf_counter() - start
    for dst in dsts:
        dst.unlink()
    return seconds


def time_uploads(server: LiveServer, src: Path, parallel: int, clients: int) -> float:
    """`clients` remote executors (own token each) uploading `src` at once; seconds."""
    from cryomamba.executors.remote import RemoteExecutor

    tokens = [server.token(f"bench{i}", "read,upload") for i in range(clients)]
    executors = [RemoteExecutor(server.url, t, parallel_uploads=parallel) for t in tokens]
    try:
        with ThreadPoolExecutor(clients) as pool:
            start = time.perf_counter()
            ids = list(pool.map(lambda ex: ex.upload(src).id, executors))
            seconds = time.perf_counter() - start
    finally:
        for ex in executors:
            ex.close()
    for file_id in ids:  # what was timed is what was kept
        if (server.data_dir / "raw" / f"{file_id}.mrc").stat().st_size != src.stat().st_size:
            raise SystemExit(f"upload {file_id} is not the size of {src}")
    return seconds


def _served_ms(server: LiveServer, route_end: str, count: int) -> list[float]:
    """How long the server took for each request whose route ends with `route_end` (its log,
    written just after the answer: wait a little for it)."""
    deadline = time.monotonic() + 5
    while True:
        out = []
        for line in server.log().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if str(entry.get("route", "")).endswith(route_end) and "ms" in entry:
                out.append(float(entry["ms"]))
        if len(out) >= count or time.monotonic() > deadline:
            return out or [float("nan")]
        time.sleep(0.1)


def upload_benchmark(args, work: Path) -> dict:
    src = make_big_mrc(work / "big.mrc", args.size_gib)
    size = src.stat().st_size
    # Warm the page cache alike for both: each side reads the file once before timing.
    subprocess.run(["cat", str(src)], stdout=subprocess.DEVNULL, check=True)
    rows = []
    for run in range(args.repeat):
        row = {"cp_sync_s": time_cp(src, work / "copy.mrc", durable=True)}
        for clients in (1, 4):
            row[f"verified_copy_{clients}_s"] = time_verified_copies(src, work, clients)
            server = LiveServer(work / f"data-upload-{run}-{clients}").start()
            try:
                row[f"upload_{clients}_s"] = time_uploads(server, src, args.parallel, clients)
                row[f"complete_{clients}_ms"] = max(_served_ms(server, "/complete", clients))
            finally:
                server.stop()
                shutil.rmtree(server.data_dir, ignore_errors=True)
        rows.append(row)
        print(f"upload run {run}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()), flush=True)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    return {"bytes": size, **med, "runs": rows, "load": os.getloadavg()[0]}


async def _client(url: str, token: str, job_id: str, args, out: list[float], poll: bool) -> None:
    """One client on its own connection: GETs back to back, or one every `interval` s."""
    import httpx

    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as client:
        if poll:
            await asyncio.sleep(random.uniform(0, args.interval))
        end = time.monotonic() + args.duration
        while time.monotonic() < end:
            start = time.perf_counter()
            resp = await client.get(f"/v1/jobs/{job_id}")
            elapsed = time.perf_counter() - start
            out.append(elapsed)
            resp.raise_for_status()
            if poll:
                await asyncio.sleep(max(0.0, args.interval - elapsed))


async def _hammer(url: str, tokens: list[str], job_id: str, args, poll: bool) -> list[float]:
    latencies: list[float] = []
    await asyncio.gather(*(_client(url, t, job_id, args, latencies, poll) for t in tokens))
    return latencies


def _quantiles(latencies: list[float]) -> dict:
    ms = sorted(x * 1000 for x in latencies)
    q = statistics.quantiles(ms, n=100)
    return {"requests": len(ms), "p50_ms": q[49], "p95_ms": q[94], "max_ms": ms[-1]}


def latency_benchmark(args, work: Path) -> dict:
    from cryomamba.server.auth import mint_token
    from cryomamba.synth import synthesize, write_mrc

    root = work / "root"
    root.mkdir(exist_ok=True)
    write_mrc(synthesize((128, 256, 256), seed=3, snr=1.0), root / "tomo.mrc")  # ~2 min of work
    # The limiter would answer the flat-out clients with 429s; measure the API, not it.
    server = LiveServer(
        work / "data-latency", roots=[root], extra_args=["--rate-limit", "1000000"]
    ).start()
    secret = (server.data_dir / "secret.key").read_text().strip().encode()
    try:
        admin = server.token("owner", "read,submit,admin")
        with server.client(admin) as c:
            job = c.post(
                "/v1/jobs", json={"server_path": "tomo.mrc", "config": {"model": "demo-membrane"}}
            ).json()
            job_id = job["id"]
            deadline = time.monotonic() + 120
            while c.get(f"/v1/jobs/{job_id}").json()["state"] == "queued":
                if time.monotonic() > deadline:
                    raise SystemExit("the job never started")
                time.sleep(0.2)
            tokens = [
                mint_token(secret, f"client{i}", ["read", "admin"], 3600)
                for i in range(args.clients)
            ]
            polling = asyncio.run(_hammer(server.url, tokens, job_id, args, poll=True))
            flat_out = asyncio.run(_hammer(server.url, tokens, job_id, args, poll=False))
            state = c.get(f"/v1/jobs/{job_id}").json()
            still_running = state["state"] in ("running", "previewing")
            c.delete(f"/v1/jobs/{job_id}")
    finally:
        server.stop()
    if not still_running:
        print("warning: the job ended before the measurement did", flush=True)
    return {
        "polling": _quantiles(polling),
        "flat_out": _quantiles(flat_out),
        "job_running_throughout": still_running,
        "progress": state.get("progress"),
    }


def report(up: dict | None, lat: dict | None, args) -> str:
    """The upload block (`up`) or the latency block (`lat`) of docs/benchmarks.md."""
    command = (
        f"--size-gib {args.size_gib} --repeat {args.repeat} --skip latency"
        if up
        else f"--clients {args.clients} --skip upload"
    )
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} on {machine()}.",
        f"Command: `python benchmarks/server.py {command}` (both blocks: no `--skip`).",
        "",
    ]
    if up:
        gib = up["bytes"] / 2**30
        lines += [
            "| upload | size | upload s | upload MiB/s | reference (same run) | reference s "
            "| throughput vs reference |",
            "| --- | ---: | ---: | ---: | --- | ---: | ---: |",
        ]
        for clients, ref, key in (
            (1, "`sha256sum` + `cp` + `sync` of the file", "verified_copy_1_s"),
            (1, "`cp`, then fsync the copy (no checksum)", "cp_sync_s"),
            (4, "4 × (`sha256sum` + `cp` + `sync`) at once", "verified_copy_4_s"),
        ):
            up_s = up[f"upload_{clients}_s"]
            who = (
                f"remote executor, {args.parallel} parts in parallel, loopback"
                if clients == 1
                else f"4 clients at once (own token each), {args.parallel} parts each"
            )
            lines.append(
                f"| {who} | {clients} × {gib:.2f} GiB | {up_s:.2f} | "
                f"{clients * up['bytes'] / up_s / MiB:.0f} | {ref} | {up[key]:.2f} | "
                f"**{up[key] / up_s:.2f}×** |"
            )

        def per_run(clients: int) -> str:
            return ", ".join(
                f"{r[f'verified_copy_{clients}_s'] / r[f'upload_{clients}_s']:.2f}×"
                for r in up["runs"]
            )

        refs = [r[f"verified_copy_{n}_s"] for r in up["runs"] for n in (1, 4)]
        lines += [
            "",
            f"Each run's ratio to `sha256sum` + `cp` + `sync`: one client {per_run(1)}; "
            f"4 clients {per_run(4)} (the references alone ranged {min(refs):.0f}–"
            f"{max(refs):.0f} s across runs: the medians above are of each column).",
            "",
            f"`complete` took {up['complete_1_ms']:.0f} ms on the server for one client "
            f"(slowest of 4 at once: {up['complete_4_ms']:.0f} ms), from its log.",
            "",
            f"Median of {args.repeat} runs; load average (1 min) at the end: {up['load']:.1f} "
            f"on {os.cpu_count()} cores. The upload time covers `init` (a fingerprint of the "
            "file), one read of the file on the client that hashes it while the parts go out, "
            "SHA-256 of each part on both sides, each part written once into the upload's "
            "file and fdatasync'ed before it is acknowledged, the whole-file "
            "SHA-256 kept on the server as parts arrive, and `complete` (compare the digests, "
            "check the MRC header, hard-link into raw/). The reference hashes the file with "
            "coreutils `sha256sum`, copies it with `cp` and flushes the copy with `sync FILE`.",
            "",
        ]
    if lat:
        lines += [
            "| GET /v1/jobs/{id} while a job runs | requests | p50 ms | p95 ms | max ms |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for key, what in (
            ("polling", f"each polls every {args.interval:g} s"),
            ("flat_out", "each sends the next request as soon as one returns"),
        ):
            r = lat[key]
            lines.append(
                f"| {args.clients} clients, {what} | {r['requests']} | "
                f"{r['p50_ms']:.1f} | **{r['p95_ms']:.1f}** | {r['max_ms']:.1f} |"
            )
        lines += [
            "",
            f"Each client has its own token and connection; each mode runs {args.duration:g} s. "
            "The job (demo model, 128×256×256, CPU, one torch thread) was running for the "
            f"whole measurement: {lat['job_running_throughout']}. The clients run on the same "
            "machine as the server and the job and compete with both for its cores. The rate "
            "limit is raised for this run so that it measures the API, not the limiter.",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gib", type=float, default=1.0)
    parser.add_argument("--parallel", type=int, default=4, help="parts uploaded at once")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--interval", type=float, default=0.5, help="polling period, s")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per mode")
    parser.add_argument("--mixed", action="store_true", help="also run the mixed load")
    parser.add_argument("--mixed-duration", type=float, default=60.0)
    parser.add_argument("--mixed-pollers", type=int, default=50)
    parser.add_argument("--mixed-interval", type=float, default=2.0, help="polling period, s")
    parser.add_argument("--mixed-followers", type=int, default=10)
    parser.add_argument("--mixed-uploads", type=int, default=2)
    parser.add_argument(
        "--mixed-upload-planes", type=int, default=64, help="512x512 float32 planes per upload"
    )
    parser.add_argument("--skip", choices=["upload", "latency"], action="append", default=[])
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: tmp)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs alone")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    work = args.work or Path(tempfile.mkdtemp(prefix="cryomamba-bench-server-"))
    work.mkdir(parents=True, exist_ok=True)
    up = None if "upload" in args.skip else upload_benchmark(args, work)
    lat = None if "latency" in args.skip else latency_benchmark(args, work)
    for block, heading, result in (
        ("server-upload", "Server: upload vs a verified copy", up),
        ("server", "Server: API latency during a job", lat),
    ):
        if result:
            print(result)
            upload = block == "server-upload"
            text = report(result if upload else None, None if upload else result, args)
            print(text)
            if not args.no_write:
                write_block(block, heading, text)
    if args.mixed:
        mixed = mixed_benchmark(args, work)
        print(mixed)
        text = "\n".join(
            [f"Measured {time.strftime('%Y-%m-%d')} on {machine()}.", *mixed_report(mixed, args)]
        )
        print(text)
        if not args.no_write:
            write_block("server-load", "Server: a mixed minute of load", text)
        if mixed["problems"] or any(r["errors"] for r in mixed["routes"]):
            raise SystemExit("the mixed load run found errors or lost something (see above)")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
