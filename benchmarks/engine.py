"""Speed and memory of the streaming engine against nnU-Net's own predictor, in one run.

For each volume shape, both engines segment the same synthetic tomogram with the same model,
tile step 0.5, no TTA, each in a fresh process; we record wall time of the prediction and
peak RSS above the process baseline (after the model and the input were loaded and one
tile was run to warm the model up, for both engines alike), and
write a table of ratios into docs/benchmarks.md.

    python benchmarks/engine.py                       # default shapes, bundled demo model
    python benchmarks/engine.py --shapes 64x128x128 --no-write
    python benchmarks/engine.py --only resample       # the resampling rows only
    python benchmarks/engine.py --only cases --repeat 2   # issue 10's cases, alternating
    python benchmarks/engine.py --only previews --repeat 2  # preview overhead, first preview

The cases (`CASES`): the bundled model without and with TTA, a ResEnc-style model
(anisotropic patch, transposed axes, 2 folds, TTA) and a network of nnU-Net's default size
(6 stages, 32→320 features, 128³ patch); the last two have random weights
(`cryomamba.testing.model_folder`), which is all a speed comparison needs. Each case runs
nnU-Net and ours alternately `--repeat` times; the ratio is taken per pair, and labels are
compared voxel for voxel.

Preview rows (`--only previews`, `_previews.py`): a local job (what `cryomamba segment`
runs) with previews off and every second, alternately, each in a fresh process: the overhead
per pair, and when the first preview came (seconds, fraction of the job, the row of tiles).

Resampling rows: the tomogram is synthesised at 10 Å × ratio (the same scene content in nm)
and both engines resample it to the model's 10 Å and back. Our engine's overhead is its time
on that tomogram over its time on a tomogram already at the model-space shape and 10 Å
(the same tiles, no resampling).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _doc import machine, write_block

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# 64³ is one tile: its peak is the network's own working memory, which does not grow with
# the volume; the other rows subtract it to show what does.
DEFAULT_SHAPES = ["64x64x64", "64x128x128", "128x256x256", "200x400x400"]
DOUBLE_Z = ["256x256x256"]  # ours only: is peak RSS flat when Z doubles from 128?
RESAMPLE_RATIOS = [0.78, 1.35]  # source voxel size / model voxel size
RESAMPLE_SHAPES = ["128x256x256", "200x400x400"]
RESAMPLE_DOUBLE_Z = "256x256x256"  # ours only, at the last ratio
OVERHEAD_SHAPES = ["128x256x256"]  # also run ours on the model-space shape at 10 Å


def parse_shape(text: str) -> tuple[int, int, int]:
    z, y, x = (int(v) for v in text.lower().split("x"))
    return z, y, x


def make_volume(shape: tuple[int, int, int], folder: Path, voxel_size: float = 10.0) -> Path:
    from cryomamba.synth import synthesize, write_mrc

    suffix = "" if voxel_size == 10.0 else f"_{voxel_size:g}A"
    path = folder / f"synth_{'x'.join(map(str, shape))}{suffix}.mrc"
    if not path.exists():
        write_mrc(synthesize(shape, seed=7, snr=1.0, voxel_size=voxel_size), path)
    return path


# glibc's environment names for what `cryomamba.allocator.reuse_freed_memory` sets in-process
MALLOC_ENV = {
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_TRIM_THRESHOLD_": str(1 << 30),
}


def run_one(engine: str, mrc: Path, model: Path, step: float, threads: int, *extra: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    if engine.endswith("-malloc"):  # e.g. "nnunet-malloc": nnU-Net with our allocator settings
        env |= MALLOC_ENV
    proc = subprocess.run(
        [
            sys.executable,
            str(HERE / "_run_one.py"),
            engine,
            str(mrc),
            str(model),
            str(step),
            str(threads),
            *extra,
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{engine} on {mrc.name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(rows: list[dict]) -> str:
    """Markdown table: times and their ratio; peak RSS above baseline, whole and per voxel
    after subtracting each engine's one-tile peak (the network's fixed working memory)."""
    fixed = {e: rows[0][e]["above_baseline_mib"] for e in ("nnunet", "cryomamba")}
    lines = [
        "| volume (Z×Y×X) | voxels | nnU-Net s | ours s | time ratio | nnU-Net MiB | ours MiB "
        "| nnU-Net B/voxel (all / minus one-tile) | ours B/voxel (all / minus one-tile) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def per_voxel(result: dict, engine: str, n: int) -> str:
        total = result["above_baseline_mib"] * 2**20 / n
        marginal = max(result["above_baseline_mib"] - fixed[engine], 0) * 2**20 / n
        return f"{total:.1f} / {marginal:.1f}"

    for row in rows:
        n = row["voxels"]
        ours, ref = row["cryomamba"], row.get("nnunet")
        if ref:
            lines.append(
                f"| {row['shape']} | {n:,} | {ref['seconds']:.1f} | {ours['seconds']:.1f} | "
                f"**{ours['seconds'] / ref['seconds']:.2f}×** | {ref['above_baseline_mib']:.0f} | "
                f"{ours['above_baseline_mib']:.0f} | {per_voxel(ref, 'nnunet', n)} | "
                f"**{per_voxel(ours, 'cryomamba', n)}** |"
            )
        else:
            lines.append(
                f"| {row['shape']} | {n:,} | — | {ours['seconds']:.1f} | — | — | "
                f"{ours['above_baseline_mib']:.0f} | — | **{per_voxel(ours, 'cryomamba', n)}** |"
            )
    return "\n".join(lines)


def resample_report(rows: list[dict]) -> str:
    """Markdown table of the resampling rows: both engines' time and peak, our overhead."""
    lines = [
        "| volume (Z×Y×X) | voxel size (ratio) | model-space shape | nnU-Net s | ours s "
        "| time ratio | nnU-Net MiB | ours MiB | peak ratio | ours without resampling s "
        "| resampling adds |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        ours, ref, plain = row["cryomamba"], row.get("nnunet"), row.get("plain")
        cells = [row["shape"], f"{row['voxel_size']:g} Å ({row['ratio']:g})", row["model_shape"]]
        if ref:
            cells += [
                f"{ref['seconds']:.1f}",
                f"{ours['seconds']:.1f}",
                f"**{ours['seconds'] / ref['seconds']:.2f}×**",
                f"{ref['above_baseline_mib']:.0f}",
                f"{ours['above_baseline_mib']:.0f}",
                f"**{ours['above_baseline_mib'] / ref['above_baseline_mib']:.2f}×**",
            ]
        else:
            cells += ["—", f"{ours['seconds']:.1f}", "—", "—"]
            cells += [f"{ours['above_baseline_mib']:.0f}", "—"]
        if plain:
            extra = ours["seconds"] / plain["seconds"] - 1
            cells += [f"{plain['seconds']:.1f}", f"**{extra * 100:+.0f} %**"]
        else:
            cells += ["—", "—"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_resample_rows(args, model: Path, done=None) -> list[dict]:
    """Cheapest first (model-space voxels); `done(rows)` after each row (partial results)."""
    rows: list[dict] = []
    plan = [(r, text, True) for r in RESAMPLE_RATIOS for text in RESAMPLE_SHAPES]
    plan.append((RESAMPLE_RATIOS[-1], RESAMPLE_DOUBLE_Z, False))
    plan.sort(key=lambda p: p[0] ** 3 * math.prod(parse_shape(p[1])))
    for ratio, text, both in plan:
        shape = parse_shape(text)
        voxel_size = round(10.0 * ratio, 4)
        mrc = make_volume(shape, args.cache, voxel_size)
        model_shape = tuple(round(n * ratio) for n in shape)  # nnU-Net's compute_new_shape
        row = {
            "shape": "×".join(map(str, shape)),
            "voxel_size": voxel_size,
            "ratio": ratio,
            "model_shape": "×".join(map(str, model_shape)),
        }
        for engine in ["nnunet", "cryomamba"] if both else ["cryomamba"]:
            row[engine] = run_one(engine, mrc, model, args.step, args.threads)
            print(json.dumps({**row[engine], "ratio": ratio}), flush=True)
        if both and text in OVERHEAD_SHAPES:
            plain = make_volume(model_shape, args.cache)  # already at 10 Å: no resampling
            row["plain"] = run_one("cryomamba", plain, model, args.step, args.threads)
            print(json.dumps({**row["plain"], "plain_for_ratio": ratio}), flush=True)
        rows.append(row)
        if done is not None:
            done(rows)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: bundled demo model)")
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES)
    parser.add_argument("--double-z", nargs="*", default=DOUBLE_Z)
    parser.add_argument("--step", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--cache", type=Path, default=Path(tempfile.gettempdir()) / "cryomamba-bench"
    )
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs alone")
    parser.add_argument(
        "--only",
        choices=["engine", "resample", "cases", "previews"],
        default=None,
        help="run one table",
    )
    parser.add_argument("--repeat", type=int, default=1, help="cases: runs per engine")
    parser.add_argument(
        "--cases",
        nargs="+",
        default=None,
        help="cases: which (default all); NAME:ZxYxX for another volume shape",
    )
    parser.add_argument("--tile-batch", default="auto", help="cases, previews: our tile_batch")
    parser.add_argument(
        "--compile", action="store_true", help="cases: also ours with torch.compile (opt-in)"
    )
    parser.add_argument(
        "--nnunet-malloc",
        action="store_true",
        help="cases: also nnU-Net with our glibc allocator settings (MALLOC_ENV)",
    )
    parser.add_argument("--preview-shape", default="128x256x256", help="previews: volume shape")
    args = parser.parse_args()
    from cryomamba.models import resolve_model

    model = Path(args.model) if args.model else resolve_model("demo-membrane").path
    args.cache.mkdir(parents=True, exist_ok=True)
    if args.only == "cases":
        from _cases import run_cases

        run_cases(args, model, run_one, make_volume)
        return
    if args.only == "previews":
        from _previews import run_previews

        run_previews(args, model, make_volume)
        return
    if args.only != "engine":

        def write(rows: list[dict], final: bool = False) -> None:
            table = resample_report(rows)
            print(table, flush=True)
            if args.no_write:
                return
            body = (
                f"Measured {time.strftime('%Y-%m-%d')} on {machine()}"
                f"{'' if final else ' (the run was still going: rows so far)'}.\n"
                f"Command: `python benchmarks/engine.py --only resample --threads {args.threads}`"
                f" (model: `{model.name}` at 10 Å, tile step {args.step}, no TTA, CPU, fp32)."
                f"\n\n{table}"
            )
            write_block("resample", "Engine with resampling: CryoMamba vs nnU-Net", body)

        write(run_resample_rows(args, model, done=write), final=True)
        if args.only == "resample":
            return
    rows = []
    for text in args.shapes + args.double_z:
        shape = parse_shape(text)
        mrc = make_volume(shape, args.cache)
        row = {"shape": "×".join(map(str, shape)), "voxels": shape[0] * shape[1] * shape[2]}
        engines = ["nnunet", "cryomamba"] if text in args.shapes else ["cryomamba"]
        for engine in engines:
            result = run_one(engine, mrc, model, args.step, args.threads)
            print(json.dumps(result), flush=True)
            row[engine] = result
        rows.append(row)
    table = report(rows)
    print(table)
    if not args.no_write:
        write_doc(table, rows, args, model)


def write_doc(table: str, rows: list[dict], args, model: Path) -> None:
    body = (
        f"Measured {time.strftime('%Y-%m-%d')} on {machine()}.\n"
        f"Command: `python benchmarks/engine.py --threads {args.threads}` (model: "
        f"`{model.name}`, tile step {args.step}, no TTA, CPU, fp32).\n\n{table}"
    )
    write_block("engine", "Engine: CryoMamba vs nnU-Net's predict_single_npy_array", body)


if __name__ == "__main__":
    main()
