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


_proc_executor = None


def _proc_init(threads: int, tiny: str, cfg_dict: dict) -> None:
    """A plain worker process of the no-Dask reference: its own LocalExecutor, model warm."""
    global _proc_executor
    import torch

    import cryomamba as cm
    from cryomamba.executors.local import LocalExecutor

    torch.set_num_threads(threads)
    _proc_executor = LocalExecutor()
    _proc_executor.submit(tiny, cm.JobConfig.from_dict(cfg_dict)).result(300)


def _proc_segment(path: str, out: str, cfg_dict: dict) -> str:
    import cryomamba as cm
    from cryomamba.sinks.file import FileSink

    cfg = cm.JobConfig.from_dict(cfg_dict)
    job = _proc_executor.submit(path, cfg, [FileSink(out, ("stats", *cfg.formats))])
    job.result(600)
    return job.state.value


def timed_processes(paths: list[Path], cfg, out: Path, procs: int, tiny: Path) -> float:
    """The same cohort over `procs` plain processes (one thread each), no Dask: what the
    hardware gives two independent single-threaded engines, the scheduler's yardstick."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    args = (1, str(tiny), cfg.to_dict())
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(procs, mp_context=ctx, initializer=_proc_init, initargs=args) as pool:
        list(pool.map(time.sleep, [0.5] * procs * 2))  # every process started and warm
        start = time.perf_counter()
        futures = [
            pool.submit(_proc_segment, str(p), str(out / p.stem), cfg.to_dict()) for p in paths
        ]
        states = [f.result() for f in futures]
        seconds = time.perf_counter() - start
    if any(s != "completed" for s in states):
        raise SystemExit(f"plain processes: {states}")
    return seconds


def per_job_latency(executor, path: Path, cfg, runs: int) -> float:
    """Median seconds from submit to result for a tiny volume, one job at a time."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        executor.submit(path, cfg).result(300)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _priority_note() -> str:
    if os.sched_getscheduler(0) in (os.SCHED_RR, os.SCHED_FIFO):
        return (
            "The benchmark ran under real-time scheduling (`chrt -r 10`, workers included), "
            "so the other work on the machine waited and did not blur the ratios."
        )
    return "Other work on the machine shares the cores and blurs the ratios."


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
    t_procs = timed_processes(paths, cfg, work / "procs", args.threads, tiny)

    t_dask1 = None
    if args.threads > 1:  # one worker with every thread: the scheduler without parallel jobs
        dask1 = DaskExecutor(workers=1, out=work / "dask1-jobs")
        dask1.submit(tiny, cfg).result(300)
        t_dask1 = timed_cohort(paths, cfg, work / "dask1", dask1)
        dask1.close()

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
            cm.Volume.open(work / other / p.stem / "mask.mrc").data,
        )
        for p in paths
        for other in ("dask", "procs", *(["dask1"] if t_dask1 else []))
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
        "Where a difference comes from, in the same run:",
        "",
        "| same cohort through | wall time | vs local |",
        "| --- | ---: | ---: |",
        f"| local, 1 process × {args.threads} threads | {t_local:.1f} s | 1.00× |",
        f"| {args.threads} plain processes × 1 thread, no Dask | {t_procs:.1f} s | "
        f"{t_local / t_procs:.2f}× |",
        f"| dask, {args.threads} workers × 1 thread | {t_dask:.1f} s | {ratio:.2f}× |",
        *(
            [
                f"| dask, 1 worker × {args.threads} threads | {t_dask1:.1f} s | "
                f"{t_local / t_dask1:.2f}× |"
            ]
            if t_dask1
            else []
        ),
        "",
        f"- **Dask against the same processes without it: {t_procs / t_dask:.2f}×** (the "
        "scheduler's own cost); the plain processes against one multi-threaded process: "
        f"{t_local / t_procs:.2f}× (what this CPU gives independent single-threaded engines).",
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
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores. " + _priority_note(),
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
