"""glibc's allocator is told to serve big blocks from the heap (reused) instead of fresh
`mmap`s (faulted in again on every network call), in a fresh process, on a worker thread."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

_CHILD = """
import ctypes, ctypes.util, threading
import numpy as np
from cryomamba.allocator import give_back_freed_memory, reuse_freed_memory

class Info(ctypes.Structure):  # glibc's struct mallinfo2: ten size_t fields
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallinfo2.restype = Info
print(reuse_freed_memory())
seen = []

def job():  # a 64 MiB activation on a worker thread, as jobs run: how much of it is mmap'd?
    block = np.ones(1 << 24, dtype=np.float32)
    seen.append(libc.mallinfo2().hblkhd >= block.nbytes)

t = threading.Thread(target=job)
t.start()
t.join()
print(seen[0])
give_back_freed_memory()
"""


def _run(malloc: str | None) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "CRYOMAMBA_MALLOC"}
    if malloc is not None:
        env["CRYOMAMBA_MALLOC"] = malloc
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD], capture_output=True, text=True, env=env, check=True
    )
    return proc.stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_big_blocks_come_from_the_heap_unless_the_user_says_default():
    assert _run(None) == ["True", "False"]  # tuned: not mmap'd, so reused between calls
    assert _run("default") == ["False", "True"]  # glibc as shipped: a fresh mmap
