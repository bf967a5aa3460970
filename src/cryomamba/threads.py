"""OpenMP threads that sleep while they wait: set before torch is loaded, by the entry points.

On a busy machine an OpenMP thread whose peer was descheduled spins at the next barrier
instead of yielding its core; with the small convolutions of a small network that made a
network call 19× slower on 2 shared cores (270 ms vs 14 ms, `benchmarks/threads.py`,
docs/engine.md). `OMP_WAIT_POLICY=PASSIVE` makes waiting threads sleep. OpenMP reads it once,
when the library loads, so it must be set before the first `import torch`.
"""

from __future__ import annotations

import os

__all__ = ["quiet_openmp"]


def quiet_openmp() -> None:
    """OMP_WAIT_POLICY defaults to PASSIVE unless the user set it (no effect after torch loads)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
