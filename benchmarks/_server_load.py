"""The mixed load run of benchmarks/server.py (`--mixed`): a facility's busy minute.

For `duration` seconds, against one live server with its default rate limits:

- `pollers` clients (own token and connection each) GET /v1/jobs/{id} every `interval`
  seconds, and GET /v1/jobs every tenth time;
- `followers` WebSocket clients follow the newest job to its end, then the next one;
- `uploads` clients upload a file again and again (init, parts, complete) and check the
  SHA-256 the server reports against the local one;
- a submitter keeps two jobs queued or running (the demo model on a small synthetic volume).

Afterwards every job is driven to its end (canceled if still running) and checked: every
submitted job is listed, each follower that followed a job to its end saw the same final
state the API reports, each completed upload matches its file byte for byte (SHA-256).
Every answer that is not 2xx, and every exception, counts as an error of its route.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

MiB = 1 << 20
TERMINAL = {"completed": "completed", "failed": "failed", "canceled": "canceled"}


class Tally:
    """Latencies and errors per route (the route template, not the URL)."""

    def __init__(self) -> None:
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.errors: dict[str, list[str]] = defaultdict(list)

    async def call(self, client: Any, route: str, method: str, url: str, **kw: Any) -> Any:
        start = time.perf_counter()
        try:
            resp = await client.request(method, url, **kw)
        except Exception as exc:
            self.errors[route].append(f"{type(exc).__name__}: {exc}")
            return None
        self.latency[route].append(time.perf_counter() - start)
        if not 200 <= resp.status_code < 300:
            self.errors[route].append(f"{resp.status_code} {resp.text[:200]}")
            return None
        return resp

    def table(self) -> list[dict[str, Any]]:
        rows = []
        for route in sorted(set(self.latency) | set(self.errors)):
            ms = sorted(x * 1000 for x in self.latency[route])
            q = (
                statistics.quantiles(ms, n=100, method="inclusive")
                if len(ms) >= 2
                else [ms[0] if ms else 0.0] * 99
            )
            rows.append(
                {
                    "route": route,
                    "requests": len(ms) + len(self.errors[route]),
                    "errors": len(self.errors[route]),
                    "p50_ms": q[49],
                    "p95_ms": q[94],
                    "max_ms": ms[-1] if ms else 0.0,
                }
            )
        return rows


class Run:
    def __init__(self, url: str, tokens: dict[str, str], src: Path, args: Any) -> None:
        self.url, self.tokens, self.src, self.args = url, tokens, src, args
        self.tally = Tally()
        self.jobs: list[str] = []
        self.end = 0.0
        self.followed: list[tuple[str, str]] = []  # (job id, final type the socket sent)
        self.uploads_done: list[tuple[str, str]] = []  # (file id, sha256)
        self.problems: list[str] = []
        self.local_sha = hashlib.sha256(src.read_bytes()).hexdigest()

    def client(self, token: str) -> Any:
        import httpx

        headers = {"Authorization": f"Bearer {token}"}
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=60)

    async def submitter(self) -> None:
        async with self.client(self.tokens["owner"]) as c:
            while time.monotonic() < self.end:
                resp = await self.tally.call(c, "GET /v1/jobs", "GET", "/v1/jobs")
                busy = 0
                if resp is not None:
                    rows = resp.json()
                    rows = rows.get("jobs", rows) if isinstance(rows, dict) else rows
                    busy = sum(r["state"] in ("queued", "running", "previewing") for r in rows)
                if busy < 2:
                    body = {"server_path": "tomo.mrc", "config": {"model": "demo-membrane"}}
                    resp = await self.tally.call(c, "POST /v1/jobs", "POST", "/v1/jobs", json=body)
                    if resp is not None:
                        self.jobs.append(resp.json()["id"])
                await asyncio.sleep(1.0)

    async def poller(self, token: str) -> None:
        async with self.client(token) as c:
            await asyncio.sleep(random.uniform(0, self.args.mixed_interval))
            n = 0
            while time.monotonic() < self.end:
                start = time.monotonic()
                if self.jobs:
                    job_id = self.jobs[-1]
                    await self.tally.call(c, "GET /v1/jobs/{id}", "GET", f"/v1/jobs/{job_id}")
                n += 1
                if n % 10 == 0:
                    await self.tally.call(c, "GET /v1/jobs", "GET", "/v1/jobs")
                await asyncio.sleep(max(0.0, self.args.mixed_interval - (time.monotonic() - start)))

    async def follower(self, token: str) -> None:
        from websockets.asyncio.client import connect

        ws_url = self.url.replace("http://", "ws://")
        seen: set[str] = set()
        while time.monotonic() < self.end + 5:
            fresh = [j for j in self.jobs if j not in seen]
            if not fresh:
                await asyncio.sleep(0.5)
                continue
            job_id = fresh[-1] if time.monotonic() < self.end else fresh[0]
            seen.add(job_id)
            route = "WS /v1/ws/jobs/{id}"
            start = time.perf_counter()
            try:
                async with connect(
                    f"{ws_url}/v1/ws/jobs/{job_id}",
                    additional_headers={"Authorization": f"Bearer {token}"},
                    max_size=None,
                ) as ws:
                    self.tally.latency[route].append(time.perf_counter() - start)
                    final = None
                    deadline = time.monotonic() + 600
                    while final is None and time.monotonic() < deadline:
                        message = json.loads(await ws.recv())
                        kind = message.get("type")
                        if kind == "state" and message["job"]["state"] in TERMINAL:
                            final = message["job"]["state"]
                        elif kind in TERMINAL:
                            final = kind
                        elif kind == "error":
                            self.tally.errors[route].append(json.dumps(message)[:200])
                            break
                    if final is not None:
                        self.followed.append((job_id, final))
            except Exception as exc:
                self.tally.errors[route].append(f"{type(exc).__name__}: {exc}")

    async def uploader(self, token: str) -> None:
        size = self.src.stat().st_size
        part = 8 * MiB
        async with self.client(token) as c:
            while time.monotonic() < self.end:
                body = {"filename": self.src.name, "size": size, "part_size": part}
                resp = await self.tally.call(
                    c, "POST /v1/uploads/init", "POST", "/v1/uploads/init", json=body
                )
                if resp is None:
                    await asyncio.sleep(1)
                    continue
                uid = resp.json()["upload_id"]
                with open(self.src, "rb") as fh:
                    for idx in range(resp.json()["parts_total"]):
                        data = fh.read(part)
                        headers = {"X-Part-SHA256": hashlib.sha256(data).hexdigest()}
                        await self.tally.call(
                            c,
                            "PUT /v1/uploads/{id}/part/{idx}",
                            "PUT",
                            f"/v1/uploads/{uid}/part/{idx}",
                            content=data,
                            headers=headers,
                        )
                resp = await self.tally.call(
                    c,
                    "POST /v1/uploads/{id}/complete",
                    "POST",
                    f"/v1/uploads/{uid}/complete",
                )
                if resp is not None:
                    record = resp.json()
                    self.uploads_done.append((record["file_id"], record["sha256"]))

    async def main(self, pollers: list[str], followers: list[str], uploaders: list[str]) -> None:
        self.end = time.monotonic() + self.args.mixed_duration
        await asyncio.gather(
            self.submitter(),
            *(self.poller(t) for t in pollers),
            *(self.follower(t) for t in followers),
            *(self.uploader(t) for t in uploaders),
        )


def mixed_benchmark(args: Any, work: Path) -> dict[str, Any]:
    """Run the mixed load once; return per-route rows and what the end-of-run checks found."""
    from server_fixtures import LiveServer

    from cryomamba.server.auth import mint_token
    from cryomamba.synth import synthesize, write_mrc

    root = work / "root"
    root.mkdir(exist_ok=True)
    write_mrc(synthesize((64, 128, 128), seed=3, snr=1.0), root / "tomo.mrc")
    src = work / "upload.mrc"
    write_mrc(synthesize((args.mixed_upload_planes, 512, 512), seed=4, snr=1.0), src)
    server = LiveServer(work / "data-mixed", roots=[root]).start()
    secret = (server.data_dir / "secret.key").read_text().strip().encode()

    def mint(subject: str, scopes: list[str]) -> str:
        return mint_token(secret, subject, scopes, 3600)

    tokens = {"owner": mint("owner", ["read", "submit", "admin"])}
    pollers = [mint(f"poller{i}", ["read", "admin"]) for i in range(args.mixed_pollers)]
    followers = [mint(f"follower{i}", ["read", "admin"]) for i in range(args.mixed_followers)]
    uploaders = [mint(f"uploader{i}", ["read", "upload"]) for i in range(args.mixed_uploads)]
    run = Run(server.url, tokens, src, args)
    try:
        asyncio.run(run.main(pollers, followers, uploaders))
        finals = _finish(server, tokens["owner"], run)
        _check(server, tokens["owner"], run, finals)
    finally:
        server.stop()
    return {
        "routes": run.tally.table(),
        "errors": {k: v[:5] for k, v in run.tally.errors.items() if v},
        "jobs": len(run.jobs),
        "job_states": dict(sorted(_count(finals.values()).items())),
        "followed_to_the_end": len(run.followed),
        "uploads_completed": len(run.uploads_done),
        "upload_bytes": src.stat().st_size,
        "problems": run.problems,
    }


def _count(values: Any) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for v in values:
        out[v] += 1
    return out


def _finish(server: Any, token: str, run: Run) -> dict[str, str]:
    """Cancel what still runs, wait for every job's end; each job's final state."""
    finals: dict[str, str] = {}
    with server.client(token) as c:
        for job_id in run.jobs:
            if c.get(f"/v1/jobs/{job_id}").json()["state"] not in TERMINAL:
                c.delete(f"/v1/jobs/{job_id}")
        deadline = time.monotonic() + 300
        for job_id in run.jobs:
            while (state := c.get(f"/v1/jobs/{job_id}").json()["state"]) not in TERMINAL:
                if time.monotonic() > deadline:
                    run.problems.append(f"job {job_id} never ended ({state})")
                    break
                time.sleep(0.2)
            finals[job_id] = state
    return finals


def _check(server: Any, token: str, run: Run, finals: dict[str, str]) -> None:
    """Nothing lost: jobs listed, sockets saw the real end, uploads intact."""
    with server.client(token) as c:
        listed = c.get("/v1/jobs", params={"limit": 1000}).json()
        rows = listed.get("jobs", listed) if isinstance(listed, dict) else listed
        ids = {r["id"] for r in rows}
        for job_id in run.jobs:
            if job_id not in ids:
                run.problems.append(f"job {job_id} is not listed")
    for job_id, final in run.followed:
        if finals.get(job_id) != final:
            run.problems.append(
                f"a socket saw job {job_id} end {final}, the API says {finals.get(job_id)}"
            )
    for file_id, sha in run.uploads_done:
        path = server.data_dir / "raw" / f"{file_id}.mrc"
        if sha != run.local_sha:
            run.problems.append(f"file {file_id} has SHA-256 {sha}, sent {run.local_sha}")
        elif hashlib.sha256(path.read_bytes()).hexdigest() != sha:
            run.problems.append(f"file {file_id} on disk does not match its SHA-256")


def report(res: dict[str, Any], args: Any) -> list[str]:
    mib = res["upload_bytes"] / MiB
    lines = [
        f"Command: `python benchmarks/server.py --mixed --skip upload --skip latency` "
        f"({args.mixed_duration:g} s).",
        "",
        "| route | requests | errors | p50 ms | p95 ms | max ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in res["routes"]:
        lines.append(
            f"| {r['route']} | {r['requests']} | {r['errors']} | {r['p50_ms']:.1f} | "
            f"**{r['p95_ms']:.1f}** | {r['max_ms']:.1f} |"
        )
    states = ", ".join(f"{n} {s}" for s, n in res["job_states"].items())
    lines += [
        "",
        f"{args.mixed_pollers} polling clients (one every {args.mixed_interval:g} s each, GET "
        f"/v1/jobs every tenth), {args.mixed_followers} WebSocket followers, "
        f"{args.mixed_uploads} clients uploading a {mib:.0f} MiB file in 8 MiB parts again and "
        "again, and a submitter keeping two jobs (demo model, 64×128×128, CPU) queued or "
        "running; every client has its own token; the server runs with its default limits "
        f"(60 requests per minute per user). Jobs: {res['jobs']} ({states}; those still "
        "running at the end were canceled). WebSocket rows time the handshake; "
        f"{res['followed_to_the_end']} follows ran to the job's end and each saw the final "
        f"state the API reports. {res['uploads_completed']} uploads completed, each checked "
        "by SHA-256 on disk. Problems found: "
        f"{len(res['problems'])}; errors: {sum(r['errors'] for r in res['routes'])}. One run on "
        "a shared, noisy 2-core machine that also runs the clients and the job.",
    ]
    return lines
