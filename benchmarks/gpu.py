"""The GPU path, measured: CUDA labels vs nnU-Net's own predictor, then speed and peak memory.

Run by benchmarks/gpu.sh on a machine with one CUDA GPU (under 8 minutes); `--device cpu
--small` runs every step on tiny shapes so the script itself is tested without a GPU.

1. Correctness: the bundled model on a 128×256×256 synthetic tomogram, and the default-size
   network on 128×192×192, both engines on the device with fp16 autocast (nnU-Net:
   `perform_everything_on_device=True`): the fraction of voxels with equal labels.
2. Speed: the default-size network (6 stages, 32→320 features, 128³ patch, random weights)
   on a 512³ volume; each engine twice, alternating; wall time, time to the first finished
   slab (our first preview) and peak GPU memory (`torch.cuda.max_memory_allocated`).

Prints one JSON line per run and a markdown table at the end (paste it into
docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device) -> float:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0


def run_nnunet(predictor, volume, spacing):
    return predictor.predict_single_npy_array(volume[None], {"spacing": spacing}, None, None, False)


def run_ours(predictor, volume):
    import numpy as np

    first = [None]
    start = time.perf_counter()

    def on_planes(z0: int, z1: int) -> None:
        if first[0] is None:
            first[0] = time.perf_counter() - start

    out = predictor.predict(volume, out=np.zeros(volume.shape, np.uint8), on_planes=on_planes)
    return out, first[0]


def measure(name, engine, device, fn) -> dict:
    reset_peak(device)
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    seconds = time.perf_counter() - start
    labels, first = result if isinstance(result, tuple) else (result, None)
    row = {"case": name, "engine": engine, "seconds": seconds, "peak_gpu_mib": peak_mib(device)}
    if first is not None:
        row["first_slab_s"] = first
    print(json.dumps(row), flush=True)
    return {**row, "labels": labels}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="tiny shapes (a test on CPU)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "cm-gpu")
    args = parser.parse_args()
    import numpy as np
    import torch

    from cryomamba.engine import StreamingPredictor, TrainedModel
    from cryomamba.models import resolve_model
    from cryomamba.synth import synthesize
    from cryomamba.testing.model_folder import make_model_folder
    from cryomamba.testing.reference import nnunet_predictor

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu --small to test the script")
    args.cache.mkdir(parents=True, exist_ok=True)
    bundled = resolve_model("demo-membrane").path
    big = args.cache / ("default-size-small" if args.small else "default-size")
    if not (big / "fold_0" / "checkpoint_final.pth").exists():
        if args.small:  # the same shape of network, scaled down for a CPU
            make_model_folder(big, patch_size=(32, 32, 32), features=(8, 16, 32, 32))
        else:
            make_model_folder(
                big, patch_size=(128, 128, 128), features=(32, 64, 128, 256, 320, 320)
            )
    small = args.small
    checks = [
        ("bundled", bundled, (32, 64, 64) if small else (128, 256, 256)),
        ("default-size", big, (40, 48, 48) if small else (128, 192, 192)),
    ]
    spacing = [10.0, 10.0, 10.0]
    summary: list[str] = []
    for name, folder, shape in checks:
        volume = synthesize(shape, seed=3, snr=1.0).volume
        ref = nnunet_predictor(folder, device=args.device)
        ours = StreamingPredictor(TrainedModel.load(folder, device=device), fp16=True)
        a = measure(name, "nnunet", device, lambda r=ref, v=volume: run_nnunet(r, v, spacing))
        b = measure(name, "cryomamba", device, lambda p=ours, v=volume: run_ours(p, v))
        equal = float(np.mean(a["labels"] == b["labels"]))
        print(json.dumps({"case": name, "labels_equal": equal}), flush=True)
        summary.append(f"| {name} | {'×'.join(map(str, shape))} | {100 * equal:.4f} % |")
        del ref, ours
    timing_shape = (64, 96, 96) if small else (512, 512, 512)
    volume = np.random.default_rng(0).normal(size=timing_shape).astype(np.float32)
    ref = nnunet_predictor(big, device=args.device)
    ours = StreamingPredictor(TrainedModel.load(big, device=device), fp16=True)
    warm = volume[:64, :128, :128] if not small else volume[:32, :32, :32]
    run_nnunet(ref, np.ascontiguousarray(warm), spacing)
    run_ours(ours, np.ascontiguousarray(warm))
    runs: dict[str, list[dict]] = {"nnunet": [], "cryomamba": []}
    for _ in range(args.repeat):
        runs["nnunet"].append(
            measure("speed", "nnunet", device, lambda: run_nnunet(ref, volume, spacing))
        )
        runs["cryomamba"].append(
            measure("speed", "cryomamba", device, lambda: run_ours(ours, volume))
        )
    t_ref = statistics.median(r["seconds"] for r in runs["nnunet"])
    t_ours = statistics.median(r["seconds"] for r in runs["cryomamba"])
    first = statistics.median(r["first_slab_s"] for r in runs["cryomamba"])
    m_ref = max(r["peak_gpu_mib"] for r in runs["nnunet"])
    m_ours = max(r["peak_gpu_mib"] for r in runs["cryomamba"])
    equal = float(np.mean(runs["nnunet"][-1]["labels"] == runs["cryomamba"][-1]["labels"]))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\nDevice: {name}, torch {torch.__version__}, tile_batch auto = {ours.forward_batch}")
    print("\n| check (fp16 on the device) | volume | labels equal to nnU-Net's |")
    print("| --- | --- | ---: |")
    print("\n".join(summary))
    print(
        "\n| default-size network | volume | nnU-Net s | ours s | time ratio | first slab s "
        "(share) | nnU-Net peak MiB | ours peak MiB | peak ratio | labels equal |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    ratio_m = f"{m_ours / m_ref:.2f}×" if m_ref else "—"
    print(
        f"| 6 stages 32→320 | {'×'.join(map(str, timing_shape))} | {t_ref:.1f} | {t_ours:.1f} | "
        f"**{t_ours / t_ref:.2f}×** | {first:.1f} ({100 * first / t_ours:.0f} %) | "
        f"{m_ref:.0f} | {m_ours:.0f} | **{ratio_m}** | {100 * equal:.4f} % |"
    )


if __name__ == "__main__":
    main()
