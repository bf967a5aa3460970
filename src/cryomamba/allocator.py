"""glibc malloc settings for inference: big freed blocks are reused, not unmapped and mapped again.

A network call at batch 4 allocates activations of 30-70 MB. glibc serves blocks that large
with a fresh `mmap` and `munmap`s them on free, so every call faults every page of every
activation in again: on the bundled network that was 40 % of the CPU time of a call, all of
it in the kernel (docs/engine.md, levers). The entry points (`cryomamba`, `cryomamba.serve`)
call `reuse_freed_memory()` before any thread starts: big blocks then come from the heap and
are reused, and `give_back_freed_memory()` (after each prediction) returns what is free.
Numbers are unchanged: only where memory comes from. Elsewhere than glibc both do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

__all__ = ["give_back_freed_memory", "reuse_freed_memory"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_KEEP_FREE = 1 << 30  # free memory kept at the top of the heap before it is given back


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if os.name != "posix" or name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018 (glibc only: musl and macOS have other knobs)
    except (OSError, AttributeError):
        return None
    return libc


def reuse_freed_memory() -> bool:
    """No `mmap` for big blocks, one arena for every thread (so a worker thread's blocks come
    from the heap too), and up to 1 GiB free kept; True where it took effect (glibc).
    Call it before threads start allocating; `CRYOMAMBA_MALLOC=default` leaves glibc as is."""
    libc = _libc()
    if libc is None or os.environ.get("CRYOMAMBA_MALLOC") == "default":
        return False
    settings = ((_M_MMAP_MAX, 0), (_M_ARENA_MAX, 1), (_M_TRIM_THRESHOLD, _KEEP_FREE))
    return all([int(libc.mallopt(option, value)) == 1 for option, value in settings])


def give_back_freed_memory() -> None:
    """Return the heap's free pages to the system (`malloc_trim`), e.g. after a job."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
