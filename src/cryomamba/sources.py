"""`open_source`: what a caller passes as a job's source, as a `Volume`.

Every executor accepts the same sources (a `Volume`, a path to an MRC file, a 3D array);
this is the one place that turns them into a `Volume`, beside `Volume` rather than inside
any one executor.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .volume import Volume

__all__ = ["open_source"]


def open_source(source: Volume | str | os.PathLike[str] | np.ndarray[Any, Any]) -> Volume:
    """A `Volume` as is, a path to an MRC file opened (memory-mapped), or a 3D array wrapped."""
    if isinstance(source, Volume):
        return source
    if isinstance(source, np.ndarray):
        return Volume.from_array(source)
    return Volume.open(source)
