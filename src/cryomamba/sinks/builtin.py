"""Registers the builtin sinks through the same hook outside plugins use."""

from __future__ import annotations

from ..hookspecs import hookimpl
from .callback import CallbackSink
from .file import FileSink


@hookimpl
def cryomamba_register_sinks(registry) -> None:
    registry.add("callback", CallbackSink)
    registry.add("file", FileSink)
