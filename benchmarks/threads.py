"""Thread settings on a CPU: torch threads × OpenMP wait policy, for a tiny and the bundled network.

Each setting runs in a fresh process (OpenMP reads its environment once, at load), the
settings alternate, and each is repeated; we report the median time of one network call.
On a busy machine, OpenMP threads that spin while waiting for a descheduled peer can make
tiny convolutions 100× slower: this measures whether `OMP_WAIT_POLICY=PASSIVE` avoids that
and what it costs on the bundled network.

    python benchmarks/threads.py --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, time, torch
from cryomamba.engine import TrainedModel
threads, folder, batch, calls = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
model = TrainedModel.load(folder)
x = torch.randn(batch, 1, *model.patch_size)
net = model.networks[0]
with torch.inference_mode():
    net(x)
    times = []
    for _ in range(calls):
        t = time.perf_counter(); net(x); times.append(time.perf_counter() - t)
print(json.dumps(sorted(times)[len(times) // 2]))
"""


def one(folder: str, threads: int, policy: str | None, batch: int, calls: int) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    env.pop("OMP_WAIT_POLICY", None)
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    cmd = [sys.executable, "-c", CHILD, str(threads), folder, str(batch), str(calls)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    return float(json.loads(out.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    from cryomamba.models import resolve_model
    from cryomamba.testing.model_folder import make_model_folder

    tiny = make_model_folder(
        tempfile.mkdtemp() + "/tiny", patch_size=(16, 16, 16), features=(4, 8, 16)
    )
    nets = [
        ("tiny (16³, 4→16)", str(tiny), 1, 30),
        ("bundled (64³)", str(resolve_model("demo-membrane").path), 4, 2),
    ]
    settings = [(1, None), (2, None), (2, "PASSIVE"), (1, "PASSIVE")]
    load = os.getloadavg()[0]
    print(
        "| network | " + " | ".join(f"{t} thr, {p or 'default'} wait" for t, p in settings) + " |"
    )
    print("| --- |" + " ---: |" * len(settings))
    for label, folder, batch, calls in nets:
        times: dict[int, list[float]] = {i: [] for i in range(len(settings))}
        for _ in range(args.repeat):
            for i, (threads, policy) in enumerate(settings):
                times[i].append(one(folder, threads, policy, batch, calls))
        cells = [f"{1000 * statistics.median(times[i]):.1f} ms" for i in range(len(settings))]
        print(f"| {label}, batch {batch} | " + " | ".join(cells) + " |", flush=True)
    print(f"load average (1 min) at start: {load:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
