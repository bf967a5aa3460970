"""One benchmark run in a fresh process: load, reset the peak-RSS counter, predict, report JSON.

Called by engine.py; not meant to be run by hand. Prints one JSON line on stdout.
"""

from __future__ import annotations

import json
import os
import sys
import time


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def reset_peak() -> None:
    """Writing 5 to clear_refs resets VmHWM (Linux >= 4.0), so the peak counts only the run."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def spacing_of(mrc: str) -> tuple[float, float, float]:
    from cryomamba import Volume

    with Volume.open(mrc) as vol:
        return vol.voxel_size


def warm_up(engine: str, predictor, model_dir: str, mrc: str) -> None:
    """One tile through the engine first, so the baseline holds a warm model: libraries,
    oneDNN kernels and allocator pools, as in a server that has served one request."""
    from pathlib import Path

    import numpy as np

    plans = json.loads((Path(model_dir) / "plans.json").read_text())
    patch = plans["configurations"]["3d_fullres"]["patch_size"]
    small = np.random.default_rng(0).normal(size=patch).astype(np.float32)
    if engine == "cryomamba":
        predictor.predict(small)
        if predictor.resample_plan(small.shape, spacing_of(mrc)) is not None:
            # the resampled run's code (and skimage, which nnU-Net imported already) is warm too
            predictor.predict(small, spacing=spacing_of(mrc))
    else:
        spacing = plans["configurations"]["3d_fullres"]["spacing"]
        predictor.predict_single_npy_array(small[None], {"spacing": spacing}, None, None, False)


def main() -> None:
    engine, mrc, model_dir, step, threads = sys.argv[1:6]
    if engine.startswith("cryomamba"):  # what `cryomamba segment` does before torch loads
        from cryomamba.allocator import reuse_freed_memory

        reuse_freed_memory()
    tag = engine
    engine = engine.removesuffix("-malloc")  # nnU-Net with the same settings, from glibc's env
    # optional: TTA (0/1), our tile_batch ("auto" or N), folds ("0,1"), a .npy for the labels
    tta = len(sys.argv) > 6 and sys.argv[6] == "1"
    tile_batch = sys.argv[7] if len(sys.argv) > 7 else "auto"
    folds = tuple(int(f) for f in sys.argv[8].split(",")) if len(sys.argv) > 8 else (0,)
    os.environ["nnUNet_def_n_proc"] = threads  # noqa: SIM112 (nnU-Net's name)
    import numpy as np
    import torch

    torch.set_num_threads(int(threads))
    from cryomamba import Volume

    vol = Volume.open(mrc)
    compiled = engine == "cryomamba-compiled"  # ours with torch.compile (opt-in)
    if compiled:
        engine = "cryomamba"
    if engine == "cryomamba":
        from cryomamba.engine import StreamingPredictor, TrainedModel
        from cryomamba.engine.output import release_pages, temporary_labels

        model = TrainedModel.load(model_dir, folds=folds)
        batch = tile_batch if tile_batch == "auto" else int(tile_batch)
        predictor = StreamingPredictor(
            model, tile_step=float(step), mirroring=tta, tile_batch=batch, compile=compiled
        )
        out = temporary_labels(vol.shape)  # what the local executor does

        def run():
            return predictor.predict(
                vol.data,
                out=out,
                release=vol.release,
                spacing=vol.voxel_size,  # resampled to the model's where it differs, by > 1 %
                on_planes=lambda z0, z1: release_pages(out, 0, z1),
            )
    else:
        from cryomamba.testing.reference import nnunet_predictor

        predictor = nnunet_predictor(model_dir, tile_step=float(step), mirroring=tta, folds=folds)
        image = np.array(vol.data)[None]  # nnU-Net needs the volume in memory: part of its baseline
        spacing = list(vol.voxel_size)

        def run():
            return predictor.predict_single_npy_array(
                image, {"spacing": spacing}, None, None, False
            )

    # compiled: every batch size the job uses is compiled first, and timed apart
    compile_s = predictor.warm_up(vol.shape) if compiled else None
    if not compiled:
        warm_up(engine, predictor, model_dir, mrc)
    baseline = rss_kib("VmRSS")
    reset_peak()
    start, cpu_start = time.perf_counter(), time.process_time()
    labels = run()
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start  # all threads: less sensitive to a busy machine
    peak = rss_kib("VmHWM")
    if len(sys.argv) > 9:
        np.save(sys.argv[9], np.asarray(labels, dtype=np.uint8))
    print(
        json.dumps(
            {
                "engine": tag,
                "compile_s": compile_s,
                "shape": list(vol.shape),
                "seconds": seconds,
                "cpu_seconds": cpu_seconds,
                "baseline_mib": baseline / 1024,
                "peak_mib": peak / 1024,
                "above_baseline_mib": (peak - baseline) / 1024,
                "foreground": float(np.mean(labels > 0)),
            }
        )
    )


if __name__ == "__main__":
    main()
