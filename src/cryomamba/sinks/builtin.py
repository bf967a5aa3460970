"""Registers the builtin sinks through the same hook outside plugins use."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

from ..hookspecs import hookimpl
from ..registry import Registry
from .base import Sink
from .callback import CallbackSink
from .file import FileSink
from .napari import NapariSink  # imports no napari or Qt until a viewer is used


@hookimpl
def cryomamba_register_sinks(registry: Registry[Callable[..., Sink]]) -> None:
    registry.add("callback", CallbackSink)
    registry.add("file", FileSink)
    # a sink whose packages are missing is simply not offered
    if all(importlib.util.find_spec(m) is not None for m in ("napari", "superqt", "qtpy")):
        registry.add("napari", NapariSink)
