"""One local job in a fresh process, with previews every N seconds or none; reports JSON.

Called by engine.py (`--only previews`); not meant to be run by hand. Runs what
`cryomamba segment` runs (the local executor: engine, previews, progress) and records when
each event was emitted, in the engine's thread, so the first preview's time and the row of
tiles it followed are exact. Prints one JSON line on stdout.
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    mrc, model_dir, threads, interval, tile_batch = sys.argv[1:6]
    from cryomamba.allocator import reuse_freed_memory

    reuse_freed_memory()  # as `cryomamba segment` does, before torch loads
    import numpy as np
    import torch

    torch.set_num_threads(int(threads))
    from cryomamba import JobConfig, Volume
    from cryomamba.engine import StreamingPredictor, TrainedModel
    from cryomamba.events import Preview, Progress
    from cryomamba.executors.local import LocalExecutor
    from cryomamba.job import Job

    batch: int | str = tile_batch if tile_batch == "auto" else int(tile_batch)
    config = JobConfig(model=model_dir, preview_interval_s=float(interval), tile_batch=batch)
    ex = LocalExecutor()
    patch = TrainedModel.load(model_dir).patch_size
    small = np.random.default_rng(0).normal(size=patch).astype(np.float32)
    ex.submit(small, config).result()  # warm: the model cached, kernels and pools ready
    with Volume.open(mrc) as vol:
        shape = vol.shape
    grid = StreamingPredictor(TrainedModel.load(model_dir)).plan(shape)
    events: list[tuple[float, object]] = []

    def record(event):
        events.append((time.perf_counter(), event))
        return event

    job = Job(record=record)
    start, cpu_start = time.perf_counter(), time.process_time()
    ex.submit(mrc, config, job=job).result()
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start
    ex.close()
    previews = [(t, e) for t, e in events if isinstance(e, Preview)]
    result = {
        "interval": float(interval),
        "shape": list(shape),
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "tiles": grid.n_tiles,
        "tiles_per_row": grid.tiles_per_row,
        "rows": len(grid.steps[0]),
        "previews": len(previews),
    }
    if previews:
        t, first = previews[0]
        before = [e for u, e in events if u <= t and isinstance(e, Progress)]
        done = before[-1].tiles_done if before else 0
        result |= {
            "first_preview_s": t - start,
            "first_preview_planes": first.planes_done,  # type: ignore[attr-defined]
            "first_preview_tiles_done": done,
            "first_preview_row": -(-done // grid.tiles_per_row),  # 1-based: rows finished
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
