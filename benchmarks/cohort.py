"""A cohort through `local` (one after another) vs `dask` (2 single-threaded workers), one run.

Both get the same total threads (local: torch with `--threads` threads in this process;
dask: a LocalCluster of `--threads` workers with one thread each), the same synthetic
tomograms, model and config, and both go through `segment_many` (artifacts mask.mrc and
stats.json per input). Both are warmed first (model loaded; the cluster started and each
worker has run a job), so the numbers compare steady-state throughput; the cluster's start
is reported apart. Per-job overhead: tiny volumes one at a time, dask minus local.

    python benchmarks/cohort.py                 # 8 tomograms 64x128x128, demo model
    python benchmarks/cohort.py --count 4 --no-write
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _doc import machine, write_block

os.environ.setdefault("OMP_NUM_THREADS", "1")


def make_cohort(folder: Path, count: int, shape: tuple[int, int, int]) -> list[Path]:
    from cryomamba.synth import synthesize, write_mrc

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n in range(count):
        path = folder / f"tomo{n:02d}.mrc"
        write_mrc(synthesize(shape, seed=100 + n, snr=1.0), path)
        paths.append(path)
    return paths


def timed_cohort(paths: list[Path], cfg, out: Path, executor) -> float:
    import cryomamba as cm

    start = time.perf_counter()
    items = cm.segment_many(paths, cfg, out=out, executor=executor, skip_complete=False)
    seconds = time.perf_counter() - start
    bad = [i for i in items if i.state != "completed"]
    if bad:
        raise SystemExit(f"{len(bad)} job(s) failed: {bad[0].error_code} {bad[0].error}")
    return seconds


def per_job_latency(executor, path: Path, cfg, runs: int) -> float:
    """Median seconds from submit to result for a tiny volume, one job at a time."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        executor.submit(path, cfg).result(300)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=8)
    ap.add_argument("--shape", default="64x128x128")
    ap.add_argument("--threads", type=int, default=2, help="total threads for each side")
    ap.add_argument("--model", default="demo-membrane")
    ap.add_argument("--tiny-runs", type=int, default=7)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    import numpy as np
    import torch
    from cryomamba_dask import DaskExecutor

    import cryomamba as cm
    from cryomamba.executors.local import LocalExecutor

    shape = tuple(int(v) for v in args.shape.lower().split("x"))
    work = Path(tempfile.mkdtemp(prefix="cryomamba-cohort-bench-"))
    paths = make_cohort(work / "tomos", args.count, shape)  # type: ignore[arg-type]
    tiny = make_cohort(work / "tiny", 1, (16, 32, 32))[0]
    cfg = cm.JobConfig(model=args.model, formats=("mrc", "stats"), device="cpu")

    load = [os.getloadavg()[0]]
    torch.set_num_threads(args.threads)
    local = LocalExecutor()
    local.submit(tiny, cfg).result(300)  # warm: model loaded
    t_local = timed_cohort(paths, cfg, work / "local", local)
    lat_local = per_job_latency(local, tiny, cfg, args.tiny_runs)
    local.close()

    load.append(os.getloadavg()[0])
    start = time.perf_counter()
    dask = DaskExecutor(workers=args.threads, out=work / "dask-jobs")
    t_cluster = time.perf_counter() - start
    warm = [dask.submit(tiny, cfg) for _ in range(args.threads * 2)]
    for job in warm:
        job.result(300)
    t_dask = timed_cohort(paths, cfg, work / "dask", dask)
    lat_dask = per_job_latency(dask, tiny, cfg, args.tiny_runs)
    dask.close()

    equal = all(
        np.array_equal(
            cm.Volume.open(work / "local" / p.stem / "mask.mrc").data,
            cm.Volume.open(work / "dask" / p.stem / "mask.mrc").data,
        )
        for p in paths
    )
    ratio = t_local / t_dask
    overhead = lat_dask - lat_local
    per_tomo = t_local / args.count  # one tomogram's time with the whole machine
    lines = [
        f"Machine: {machine()}. Model `{args.model}`, {args.count} synthetic tomograms "
        f"{args.shape}, tile step 0.5, mask.mrc + stats.json each, `device='cpu'`.",
        "",
        "| | local (1 process, "
        f"{args.threads} torch threads) | dask ({args.threads} workers × 1 thread) |",
        "| --- | ---: | ---: |",
        f"| cohort wall time | {t_local:.1f} s | {t_dask:.1f} s |",
        f"| throughput | {args.count / t_local * 60:.1f} tomograms/min | "
        f"{args.count / t_dask * 60:.1f} tomograms/min |",
        f"| tiny volume 16×32×32, submit → result (median of {args.tiny_runs}) | "
        f"{lat_local:.2f} s | {lat_dask:.2f} s |",
        "",
        f"- **Throughput ratio dask / local: {ratio:.2f}×** (target ≥ 1.0×); masks bit-equal: "
        f"{'yes' if equal else 'NO'}.",
        f"- **Per-job overhead of dask: {overhead:.2f} s** (tiny-volume latency, dask minus "
        "local; target ≤ 1 s). Starting the LocalCluster took "
        f"{t_cluster:.1f} s, once per executor.",
        f"- On paper, 500 tomograms over 8 GPU workers: each GPU runs ⌈500/8⌉ = 63 jobs, so "
        f"the cohort takes 63 × (T + {max(overhead, 0):.2f} s) for a per-tomogram inference "
        "time T. For T = 60 s (a large tomogram on one GPU) that is "
        f"{63 * (60 + max(overhead, 0)) / 3600:.2f} h instead of {500 * 60 / 3600:.2f} h on one "
        f"GPU, {60 / (60 + max(overhead, 0)) * 100:.1f} % of perfect scaling; even for T = 5 s "
        f"it is {5 / (5 + max(overhead, 0)) * 100:.0f} %. At that scale the next thing to "
        "watch is the shared storage (each worker reads its tomogram and writes its mask), "
        "which this benchmark does not measure.",
        f"- One tomogram took {per_tomo:.1f} s here with the whole machine.",
        "",
        f"- Load average (1 min) at start / between / end: {load[0]:.1f} / {load[1]:.1f} / "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (other work on the machine shares "
        "the cores and blurs the ratio).",
        "",
        "Reproduce: `python benchmarks/cohort.py` (needs `plugins/cryomamba-dask`).",
    ]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_block("cohort", "Cohorts: local vs dask", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
