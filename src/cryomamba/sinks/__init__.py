"""Sinks receive a job's events: a callback, a folder of artifacts, (later) a napari viewer.

A sink needs one method, `handle(event)`. It runs on a thread of its own per job and sees
the latest Progress and Preview, never a backlog: a slow sink misses previews, it never
slows inference (`Job` does the coalescing, so sinks stay small).
"""

from __future__ import annotations

from .base import Sink, as_sink
from .callback import CallbackSink
from .file import FileSink

__all__ = ["CallbackSink", "FileSink", "Sink", "as_sink"]
