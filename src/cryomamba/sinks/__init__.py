"""Sinks receive a job's events: a callback, a folder of artifacts, a napari viewer.

A sink needs one method, `handle(event)`. It runs on a thread of its own per job and sees
the latest Progress and Preview, never a backlog: a slow sink misses previews, it never
slows inference (`Job` does the coalescing, so sinks stay small).

`NapariSink` is loaded on first access, so `import cryomamba` never imports napari or Qt
(and neither does `cryomamba.sinks.NapariSink` itself: napari is imported when a viewer is
first used).
"""

from __future__ import annotations

from typing import Any

from .base import Sink, as_sink
from .callback import CallbackSink
from .file import FileSink

__all__ = ["CallbackSink", "FileSink", "NapariSink", "Sink", "as_sink"]


def __getattr__(name: str) -> Any:
    if name == "NapariSink":
        from .napari import NapariSink

        return NapariSink
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
