"""Dice of the bundled demo model on held-out synthetic tomograms, through CryoMamba's own engine.

    python scripts/evaluate_demo_model.py                  # 4 volumes per SNR, seeds 1000+
    python scripts/evaluate_demo_model.py --snr 1.0 --n 2 --shape 64,128,128

Held-out means seeds the training script never uses (training takes seeds below 1000).
Prints a Markdown table; the numbers in docs/demo-model.md come from this script.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import cryomamba as cm
from cryomamba.synth import synthesize

MEMBRANE = 1


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    inter = np.count_nonzero(pred & truth)
    total = np.count_nonzero(pred) + np.count_nonzero(truth)
    return 2 * inter / total if total else 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo-membrane")
    parser.add_argument("--snr", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    parser.add_argument("--n", type=int, default=4, help="volumes per SNR")
    parser.add_argument("--shape", default="64,128,128")
    parser.add_argument("--tta", action="store_true")
    args = parser.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    print(
        f"model {args.model}, shape {shape}, {args.n} volumes per SNR, seeds 1000+, "
        f"TTA {'on' if args.tta else 'off'}\n"
    )
    print("| SNR | Dice (membrane), mean | min | max |")
    print("| ---: | ---: | ---: | ---: |")
    start = time.time()
    for snr in args.snr:
        scores = []
        for i in range(args.n):
            tomo = synthesize(shape, seed=1000 + i, snr=snr)
            vol = cm.Volume.from_array(tomo.volume, voxel_size=tomo.voxel_size)
            result = cm.segment(vol, model=args.model, mirroring=args.tta, preview_interval_s=0)
            scores.append(dice(np.asarray(result.labels) == MEMBRANE, tomo.labels == MEMBRANE))
        print(
            f"| {snr:g} | {np.mean(scores):.3f} | {min(scores):.3f} | {max(scores):.3f} |",
            flush=True,
        )
    print(f"\n{time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
