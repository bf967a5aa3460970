"""OME-Zarr input and the new outputs, side by side with MRC in the same run.

For one synthetic tomogram (`cryomamba.synth`, seed 7) written both as MRC and as OME-Zarr
(NGFF 0.4, 64³ Blosc chunks), each case runs in a fresh process (the local executor, the
bundled demo-membrane model, CPU): segment from MRC writing mask.mrc (the reference),
segment from OME-Zarr writing mask.mrc, segment from MRC writing mask.mrc + mask.zarr +
probabilities.zarr. Each reports wall time (the job and the save) and peak RSS (VmHWM).

    python benchmarks/formats.py --shape 64x128x128 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ONE = r"""
import json, os, sys, time
import torch
torch.set_num_threads(int(sys.argv[3]))
import cryomamba as cm
source, formats = sys.argv[1], sys.argv[2].split(",")
out = sys.argv[4]
t0 = time.perf_counter()
result = cm.segment(cm.Volume.open(source), model="demo-membrane", device="cpu",
                    formats=formats)
t1 = time.perf_counter()
result.save(out, formats)
t2 = time.perf_counter()
with open("/proc/self/status") as fh:
    hwm = next(int(l.split()[1]) for l in fh if l.startswith("VmHWM:"))
print(json.dumps({"job_s": t1 - t0, "save_s": t2 - t1, "peak_mib": hwm / 1024,
                  "foreground": int((result.labels == 1).sum())}))
"""


def run_case(source: Path, formats: str, threads: int, out: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", ONE, str(source), formats, str(threads), str(out)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": str(threads)},
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="64x128x128")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    shape = tuple(int(v) for v in args.shape.lower().split("x"))

    from cryomamba.synth import synthesize, write_mrc
    from cryomamba.volume import Volume
    from cryomamba.zarr_write import create_group, multiscales_metadata

    with tempfile.TemporaryDirectory(prefix="cm-bench-formats-") as tmp:
        folder = Path(tmp)
        mrc = folder / "tomo.mrc"
        write_mrc(synthesize(shape, seed=7, snr=1.0, voxel_size=10.0), mrc)
        vol = Volume.open(mrc)
        group = create_group(folder / "tomo.zarr")
        arr = group.create_dataset("0", shape=vol.shape, chunks=(64, 64, 64), dtype=vol.dtype)
        for z0 in range(0, vol.shape[0], 64):
            arr[z0 : z0 + 64] = vol.slab(z0, min(z0 + 64, vol.shape[0]))
        group.attrs.update(multiscales_metadata(1, vol.voxel_size, vol.origin, "tomo"))
        cases = [
            ("MRC in, mask.mrc (reference)", mrc, "mrc"),
            ("OME-Zarr in, mask.mrc", folder / "tomo.zarr", "mrc"),
            ("MRC in, mask.mrc + mask.zarr + probabilities", mrc, "mrc,zarr,probabilities"),
        ]
        rows = []
        for i, (name, source, formats) in enumerate(cases):
            start = time.perf_counter()
            r = run_case(source, formats, args.threads, folder / f"out{i}")
            r.update(name=name, total_s=time.perf_counter() - start)
            rows.append(r)
    ref = rows[0]
    print(f"shape {args.shape}, threads {args.threads}")
    print("| case | job s | save s | peak MiB | job ratio | peak ratio | foreground voxels |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['name']} | {r['job_s']:.1f} | {r['save_s']:.2f} | {r['peak_mib']:.0f} | "
            f"{r['job_s'] / ref['job_s']:.2f}× | {r['peak_mib'] / ref['peak_mib']:.2f}× | "
            f"{r['foreground']:,} |"
        )


if __name__ == "__main__":
    main()
