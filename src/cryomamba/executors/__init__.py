"""Executors run a job somewhere and feed its `Job` events: `local` (in-process), `remote` (server).

An executor needs `submit(source, config, sinks) -> Job` and `close()`; tiling, progress and
cancellation belong to the core, so an executor stays small.
"""

from __future__ import annotations

from .base import Executor, get_executor

__all__ = ["Executor", "get_executor"]
