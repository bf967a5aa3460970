"""The bundled network on a CPU in the default (contiguous) vs the channels-last 3D memory layout.

`scripts/train_demo_model.py --channels-last` trains in channels-last 3D because oneDNN's
CPU convolutions take a training step in less time there. This measures that side by side in
one process: a training step (forward, nnU-Net's Dice + CE loss, backward, AdamW step) at the
training batch, and an inference call at the engine's batch, each layout alternating with the
other, median of `--repeat` timings. It also reports how far the two layouts' outputs are
apart (the layout changes the order of float sums, nothing else).

    python benchmarks/train_layout.py --repeat 8
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from pathlib import Path
from types import ModuleType

import torch

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = {"contiguous": torch.contiguous_format, "channels-last 3D": torch.channels_last_3d}


def training_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "train_demo_model", ROOT / "scripts" / "train_demo_model.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-batch", type=int, default=2)
    parser.add_argument("--infer-batch", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    script = training_script()
    gen = torch.Generator().manual_seed(0)
    edge = script.PATCH[0]
    x = torch.randn(args.train_batch, 1, edge, edge, edge, generator=gen)
    y = (torch.rand(args.train_batch, edge, edge, edge, generator=gen) > 0.9).long()
    xi = torch.randn(args.infer_batch, 1, edge, edge, edge, generator=gen)

    nets, opts = {}, {}
    for name, layout in LAYOUTS.items():
        torch.manual_seed(0)
        nets[name] = script.build_network().to(memory_format=layout)
        opts[name] = torch.optim.AdamW(nets[name].parameters(), lr=1e-3)

    def train_step(name: str) -> float:
        net, opt = nets[name], opts[name]
        net.train()
        t = time.perf_counter()
        loss = script.dice_ce_loss(net(x.to(memory_format=LAYOUTS[name])), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t

    def infer(name: str) -> tuple[float, torch.Tensor]:
        net = nets[name]
        net.eval()
        with torch.inference_mode():
            t = time.perf_counter()
            out = net(xi.to(memory_format=LAYOUTS[name]))
            return time.perf_counter() - t, out

    times: dict[str, dict[str, list[float]]] = {n: {"train": [], "infer": []} for n in LAYOUTS}
    for name in LAYOUTS:  # warm-up: oneDNN picks and caches its kernels on the first call
        train_step(name)
        infer(name)
    for _ in range(args.repeat):
        for name in LAYOUTS:
            times[name]["train"].append(train_step(name))
            times[name]["infer"].append(infer(name)[0])
    # The same weights in both layouts: the trained contiguous ones copied into the other.
    nets["channels-last 3D"].load_state_dict(nets["contiguous"].state_dict())
    outs = {name: infer(name)[1] for name in LAYOUTS}
    diff = (outs["contiguous"] - outs["channels-last 3D"]).abs().max().item()
    same = (outs["contiguous"].argmax(1) == outs["channels-last 3D"].argmax(1)).float().mean()

    base = {k: statistics.median(v) for k, v in times["contiguous"].items()}
    print(f"torch {torch.__version__}, {args.threads} threads, repeat {args.repeat}, median s")
    print("| layout | training step s | ratio | inference call s | ratio |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in LAYOUTS:
        tr, inf = (statistics.median(times[name][k]) for k in ("train", "infer"))
        print(
            f"| {name} | {tr:.3f} | **{tr / base['train']:.2f}×** | {inf:.3f} | "
            f"**{inf / base['infer']:.2f}×** |"
        )
    print(
        f"same weights, both layouts: largest logit difference {diff:.2e}, "
        f"labels equal {same.item():.5%}"
    )


if __name__ == "__main__":
    main()
