"""Issue 10's speed cases for benchmarks/engine.py: ours vs nnU-Net, alternating, same threads."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np
from _doc import machine, write_block

# name → (model, volume shape Z×Y×X, TTA, folds)
CASES = {
    "bundled": ("bundled", "200x400x400", False, "0"),
    "bundled-tta": ("bundled", "128x256x256", True, "0"),
    "resenc": ("resenc", "64x96x96", True, "0,1"),
    "default-size": ("default-size", "128x192x192", False, "0"),
}


def case_model(kind: str, bundled: Path, cache: Path) -> Path:
    """The model folder of a case; random-weight folders are built once into `cache`."""
    from cryomamba.testing.model_folder import make_model_folder

    if kind == "bundled":
        return bundled
    folder = cache / f"model-{kind}"
    if (folder / "fold_0" / "checkpoint_final.pth").exists():
        return folder
    if kind == "resenc":  # nnUNetResEncUNetMPlans' network, scaled down for a 2-core CPU
        return make_model_folder(
            folder,
            folds=(0, 1),
            patch_size=(16, 64, 64),  # in the transposed order: the thin axis first
            features=(8, 16, 32, 64),
            spacing=(20.0, 10.0, 10.0),
            strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]],
            kernel_sizes=[[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
            blocks_per_stage=(1, 2, 2, 2),
            transpose=(2, 0, 1),
            mirror_axes=(0, 1, 2),
        )
    return make_model_folder(  # nnU-Net's default 3d_fullres size: 6 stages, 32→320
        folder, patch_size=(128, 128, 128), features=(32, 64, 128, 256, 320, 320)
    )


def run_cases(args, bundled: Path, run_one, make_volume) -> None:
    rows = []
    for spec in args.cases or list(CASES):
        name, _, shape_text = spec.partition(":")  # "bundled-tta:64x128x128": another shape
        kind, text, tta, folds = CASES[name]
        text = shape_text or text
        model = case_model(kind, bundled, args.cache)
        shape = tuple(int(v) for v in text.split("x"))
        spacing = json.loads((model / "plans.json").read_text())["configurations"]["3d_fullres"]
        tf = json.loads((model / "plans.json").read_text())["transpose_forward"]
        voxel = min(spacing["spacing"])  # isotropic source at the finest model spacing
        if sorted(set(spacing["spacing"])) != [voxel]:
            voxel = None  # anisotropic model: the source is given at the model's spacing
        mrc = make_volume(shape, args.cache)
        if voxel is None:
            mrc = _at_model_spacing(mrc, spacing["spacing"], tf)
        pairs = []
        for i in range(args.repeat):
            pair = {}
            engines = ["nnunet", "cryomamba"] + (["cryomamba-compiled"] if args.compile else [])
            engines += ["nnunet-malloc"] if args.nnunet_malloc else []
            for engine in engines:
                labels = args.cache / f"{name}-{engine}.npy"
                extra = ["1" if tta else "0", args.tile_batch, folds, str(labels)]
                pair[engine] = run_one(engine, mrc, model, args.step, args.threads, *extra)
                print(json.dumps({"case": name, "run": i, **pair[engine]}), flush=True)
            a = np.load(args.cache / f"{name}-nnunet.npy")
            b = np.load(args.cache / f"{name}-cryomamba.npy")
            pair["equal"] = float(np.mean(a == b))
            if args.compile:
                c = np.load(args.cache / f"{name}-cryomamba-compiled.npy")
                pair["equal_compiled"] = float(np.mean(a == c))
            if args.nnunet_malloc:  # nnU-Net's labels with and without the settings
                c = np.load(args.cache / f"{name}-nnunet-malloc.npy")
                pair["equal_malloc"] = float(np.mean(a == c))
            pairs.append(pair)
        rows.append((name, text, tta, folds, pairs))
        print(table(rows, args), flush=True)
    if not args.no_write:
        body = (
            f"Measured {time.strftime('%Y-%m-%d')} on {machine()}.\n"
            f"Command: `{_realtime()}python benchmarks/engine.py --only cases {_cases_arg(args)}"
            f"{'--compile ' if args.compile else ''}"
            f"{'--nnunet-malloc ' if args.nnunet_malloc else ''}"
            f"--repeat {args.repeat} --threads {args.threads}` (tile step {args.step}, CPU, "
            f"fp32, our tile_batch {args.tile_batch}).\n\n{table(rows, args)}"
        )
        write_block("engine-cases", "Engine cases (issue 10): CryoMamba vs nnU-Net", body)


def _cases_arg(args) -> str:
    return f"--cases {' '.join(args.cases)} " if args.cases else ""


def _realtime() -> str:
    """`chrt -r 10 ` when run under real-time scheduling (the other work on the machine waited)."""
    import os

    return "chrt -r 10 " if os.sched_getscheduler(0) in (os.SCHED_RR, os.SCHED_FIFO) else ""


def table(rows, args) -> str:
    lines = [
        "| case | volume | TTA | folds | nnU-Net s | ours s | time ratio per run | "
        "median ratio | CPU-time ratio | labels equal |",
        "| --- | --- | --- | --- | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for name, text, tta, folds, pairs in rows:
        ref = [p["nnunet"]["seconds"] for p in pairs]
        ours = [p["cryomamba"]["seconds"] for p in pairs]
        ratios = [o / r for o, r in zip(ours, ref, strict=True)]
        equal = min(p["equal"] for p in pairs)
        cpu = statistics.median(
            p["cryomamba"]["cpu_seconds"] / p["nnunet"]["cpu_seconds"] for p in pairs
        )
        lines.append(
            f"| {name} | {text.replace('x', '×')} | {'on' if tta else 'off'} | {folds} | "
            f"{statistics.median(ref):.1f} | {statistics.median(ours):.1f} | "
            f"{', '.join(f'{r:.2f}' for r in ratios)} | **{statistics.median(ratios):.2f}×** | "
            f"{cpu:.2f}× | "
            f"{100 * equal:.3f} % |"
        )
    if any("cryomamba-compiled" in p for *_, pairs in rows for p in pairs):
        lines += ["", compiled_table(rows)]
    if any("nnunet-malloc" in p for *_, pairs in rows for p in pairs):
        lines += ["", malloc_table(rows)]
    return "\n".join(lines)


def compiled_table(rows) -> str:
    """Ours with `compile=True` against nnU-Net in the same runs; compile time apart."""
    lines = [
        "| case | nnU-Net s | ours compiled s (compile s, apart) | time ratio, compiled "
        "| compiled vs ours default | labels equal to nnU-Net's, compiled |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, _, _, _, pairs in rows:
        ref = statistics.median(p["nnunet"]["seconds"] for p in pairs)
        ours = statistics.median(p["cryomamba"]["seconds"] for p in pairs)
        comp = statistics.median(p["cryomamba-compiled"]["seconds"] for p in pairs)
        compile_s = statistics.median(p["cryomamba-compiled"]["compile_s"] for p in pairs)
        equal = min(p["equal_compiled"] for p in pairs)
        lines.append(
            f"| {name} | {ref:.1f} | {comp:.1f} ({compile_s:.0f}) | **{comp / ref:.2f}×** | "
            f"{comp / ours:.2f}× | {100 * equal:.3f} % |"
        )
    return "\n".join(lines)


def malloc_table(rows) -> str:
    """nnU-Net given the allocator settings our entry points use: how much of our lead they are."""
    lines = [
        "| case | nnU-Net s | nnU-Net with our malloc settings s | ours s "
        "| ours / nnU-Net with them | labels equal |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, _, _, _, pairs in rows:
        ref = statistics.median(p["nnunet"]["seconds"] for p in pairs)
        tuned = statistics.median(p["nnunet-malloc"]["seconds"] for p in pairs)
        ours = statistics.median(p["cryomamba"]["seconds"] for p in pairs)
        equal = min(p["equal_malloc"] for p in pairs)
        lines.append(
            f"| {name} | {ref:.1f} | {tuned:.1f} | {ours:.1f} | **{ours / tuned:.2f}×** | "
            f"{100 * equal:.3f} % |"
        )
    return "\n".join(lines)


def _at_model_spacing(mrc: Path, spacing_t, tf) -> Path:
    """A copy of `mrc` whose header says the model's (transposed-back) voxel size."""
    import mrcfile

    zyx = [0.0, 0.0, 0.0]
    for i, axis in enumerate(tf):
        zyx[axis] = float(spacing_t[i])
    out = mrc.with_name(mrc.stem + "_" + "x".join(f"{v:g}" for v in zyx) + ".mrc")
    if not out.exists():
        with mrcfile.open(mrc, permissive=True) as src:
            data = np.asarray(src.data)
        with mrcfile.new(out, overwrite=True) as dst:
            dst.set_data(data)
            dst.voxel_size = (zyx[2], zyx[1], zyx[0])  # mrcfile takes x, y, z
    return out
