"""Where the engine's time goes, per tile: the phases it labels with `record_function`.

Runs `StreamingPredictor.predict` under `torch.profiler` (CPU) and sums the wall time of the
engine's own ranges (cut and normalize, host→device, network, Gaussian weighting and
accumulation, finalize, roll) plus the preview a local job builds every second. Prints a
markdown table of ms per tile and share of the run, one column per setting.

    python benchmarks/profile_engine.py                                  # bundled model
    python benchmarks/profile_engine.py --shape 64x256x256 --tile-batch 1 auto --tta
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

PHASES = [
    ("cut_normalize", "cut + normalize (+ TTA flips)"),
    ("to_device", "host → device"),
    ("network", "network"),
    ("accumulate", "Gaussian weighting + accumulation"),
    ("finalize", "finalize (divide, arg-max, write)"),
    ("roll", "roll the slab"),
    ("preview", "preview (every 1 s)"),
]


def profile(model_dir: Path, shape: tuple[int, int, int], tile_batch: str, tta: bool) -> dict:
    import numpy as np
    from torch.profiler import ProfilerActivity, profile, record_function

    from cryomamba.engine import StreamingPredictor, TrainedModel
    from cryomamba.preview import PreviewBuilder
    from cryomamba.synth import synthesize

    model = TrainedModel.load(model_dir)
    batch = tile_batch if tile_batch == "auto" else int(tile_batch)
    predictor = StreamingPredictor(model, tile_batch=batch, mirroring=tta)  # type: ignore[arg-type]
    volume = synthesize(shape, seed=7, snr=1.0, voxel_size=10.0).volume
    predictor.predict(np.ascontiguousarray(volume[: model.patch_size[0]]))  # warm up
    out = np.zeros(shape, dtype=np.uint8)
    preview = PreviewBuilder(out, 4)
    last = [time.monotonic()]

    def on_planes(z0: int, z1: int) -> None:
        if time.monotonic() - last[0] >= 1.0 or z1 >= shape[0]:
            with record_function("cryomamba::preview"):
                preview.update(z1)
                preview.event()
            last[0] = time.monotonic()

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        predictor.predict(volume, out=out, on_planes=on_planes)
        seconds = time.perf_counter() - start
    totals = {
        e.key.split("::", 1)[1]: e.cpu_time_total / 1e6
        for e in prof.key_averages()
        if e.key.startswith("cryomamba::")
    }
    tiles = predictor.plan(shape).n_tiles
    return {"seconds": seconds, "tiles": tiles, "phases": totals, "batch": predictor.forward_batch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--shape", default="64x256x256")
    parser.add_argument("--tile-batch", nargs="+", default=["1", "auto"])
    parser.add_argument("--tta", action="store_true")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--default-malloc", action="store_true", help="glibc's defaults")
    args = parser.parse_args()
    from cryomamba.allocator import reuse_freed_memory

    if not args.default_malloc:
        reuse_freed_memory()  # as the entry points do, before torch loads
    import torch

    from cryomamba.models import resolve_model

    torch.set_num_threads(args.threads)
    model = args.model or resolve_model("demo-membrane").path
    shape = tuple(int(v) for v in args.shape.split("x"))
    runs = {b: profile(model, shape, b, args.tta) for b in args.tile_batch}  # type: ignore[arg-type]
    head = " | ".join(
        f"tile_batch={b} ({r['batch']}/call): ms/tile, share" for b, r in runs.items()
    )
    print(f"| phase | {head} |")
    print("| --- |" + " ---: |" * len(runs))
    for key, label in [*PHASES, ("", "other (Python, progress)")]:
        cells = []
        for r in runs.values():
            t = r["phases"].get(key, 0.0) if key else r["seconds"] - sum(r["phases"].values())
            cells.append(f"{1000 * t / r['tiles']:.1f}, {100 * t / r['seconds']:.1f} %")
        print(f"| {label} | " + " | ".join(cells) + " |")
    cells = [
        f"**{1000 * r['seconds'] / r['tiles']:.1f}** ({r['seconds']:.1f} s)" for r in runs.values()
    ]
    print("| **total per tile (run)** | " + " | ".join(cells) + " |")
    tiles = next(iter(runs.values()))["tiles"]
    print(f"{shape}, {tiles} tiles, TTA {args.tta}, {args.threads} threads")


if __name__ == "__main__":
    main()
