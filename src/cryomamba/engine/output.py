"""The uint8 label map, memory-mapped on an unlinked temporary file.

Finished planes are written once and their pages handed back to the OS (`release_pages`),
so the mask of a 10 GB tomogram does not sit in the process's memory while the rest is
computed. The file has no name on disk: it disappears with the last reference to the array.
"""

from __future__ import annotations

import mmap
import os
import tempfile

import numpy as np

__all__ = ["release_pages", "temporary_labels"]


def temporary_labels(
    shape: tuple[int, ...], directory: str | os.PathLike[str] | None = None
) -> np.memmap:
    """A zero-filled uint8 memmap of `shape` on an anonymous temporary file.

    `directory` defaults to $CRYOMAMBA_TMPDIR, then the system temporary folder.
    """
    folder = os.fspath(directory or os.environ.get("CRYOMAMBA_TMPDIR") or "") or None
    with tempfile.TemporaryFile(dir=folder) as fh:
        size = int(np.prod(shape))
        fh.truncate(max(size, 1))  # sparse: costs no disk until written
        return np.memmap(fh, dtype=np.uint8, mode="r+", shape=tuple(shape))


def release_pages(array: np.ndarray, z0: int, z1: int) -> None:
    """Write back and drop the resident pages of planes z0..z1 of a C-ordered memmap."""
    mm = getattr(array, "_mmap", None)
    if mm is None or not array.flags.c_contiguous:
        return
    plane = array.nbytes // max(array.shape[0], 1)
    start = (array.offset if hasattr(array, "offset") else 0) + z0 * plane
    stop = start + (z1 - z0) * plane
    start -= start % mmap.PAGESIZE
    if stop <= start:
        return
    try:
        mm.flush(start, stop - start)
        mm.madvise(mmap.MADV_DONTNEED, start, stop - start)
    except (AttributeError, OSError, ValueError):  # no madvise here: pages stay cached
        pass
