"""Issue 10's preview rows for benchmarks/engine.py: what previews every second cost a local
job, and when the first one arrives, as a fraction of the job and the row of tiles it followed."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _doc import machine, write_block

HERE = Path(__file__).resolve().parent


def run_job(mrc: Path, model: Path, threads: int, interval: float, tile_batch: str) -> dict:
    """`_run_job.py` in a fresh process (same threads for every run)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, str(HERE / "_run_job.py"), str(mrc), str(model), str(threads)]
    proc = subprocess.run(
        [*cmd, str(interval), tile_batch], capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        raise SystemExit(f"job on {mrc.name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_previews(args, model: Path, make_volume) -> None:
    """Previews off, then every second, alternately `--repeat` times; the overhead per pair."""
    shape = tuple(int(v) for v in args.preview_shape.split("x"))
    mrc = make_volume(shape, args.cache)
    pairs = []
    for i in range(args.repeat):
        pair = {}
        for name, interval in (("off", 0.0), ("on", 1.0)):
            pair[name] = run_job(mrc, model, args.threads, interval, args.tile_batch)
            print(json.dumps({"run": i, **pair[name]}), flush=True)
        pairs.append(pair)
    text = table(pairs)
    print(text, flush=True)
    if not args.no_write:
        from _cases import _realtime

        body = (
            f"Measured {time.strftime('%Y-%m-%d')} on {machine()}.\n"
            f"Command: `{_realtime()}python benchmarks/engine.py --only previews --preview-shape "
            f"{args.preview_shape} --repeat {args.repeat} --threads {args.threads}` (model: "
            f"`{model.name}`, a local job as `cryomamba segment` runs it, tile step 0.5, no TTA, "
            f"CPU, tile_batch {args.tile_batch}).\n\n{text}"
        )
        write_block(
            "engine-previews", "Engine previews (issue 10): overhead and first preview", body
        )


def table(pairs: list[dict]) -> str:
    off = [p["off"]["seconds"] for p in pairs]
    on = [p["on"]["seconds"] for p in pairs]
    extra = [100 * (b / a - 1) for a, b in zip(off, on, strict=True)]
    cpu = [100 * (p["on"]["cpu_seconds"] / p["off"]["cpu_seconds"] - 1) for p in pairs]
    first = [p["on"] for p in pairs]
    run = first[0]
    lines = [
        "| volume | tiles (rows × per row) | previews off s | previews every 1 s s "
        "| previews sent | overhead per pair | median overhead | CPU-time overhead |",
        "| --- | --- | ---: | ---: | ---: | --- | ---: | ---: |",
        f"| {'×'.join(map(str, run['shape']))} | {run['tiles']} ({run['rows']} × "
        f"{run['tiles_per_row']}) | {statistics.median(off):.1f} | {statistics.median(on):.1f} | "
        f"{run['previews']} | {', '.join(f'{e:+.1f} %' for e in extra)} | "
        f"**{statistics.median(extra):+.1f} %** | {statistics.median(cpu):+.1f} % |",
        "",
        "| run | first preview at s | fraction of the job | after row (of rows) "
        "| tiles done then | planes in it |",
        "| --- | ---: | ---: | --- | ---: | ---: |",
    ]
    for i, r in enumerate(first):
        lines.append(
            f"| {i + 1} | {r['first_preview_s']:.1f} | "
            f"**{r['first_preview_s'] / r['seconds']:.2f}** | {r['first_preview_row']} "
            f"(of {r['rows']}) | {r['first_preview_tiles_done']} of {r['tiles']} | "
            f"{r['first_preview_planes']} of {r['shape'][0]} |"
        )
    return "\n".join(lines)
