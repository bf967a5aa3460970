"""`FileSink`: write the artifacts of a completed job into a folder."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from ..errors import OutputError
from ..events import Completed, Event

__all__ = ["FileSink", "check_writable"]

log = logging.getLogger(__name__)


def check_writable(folder: Path) -> None:
    """Fail early, before hours of inference, if `folder` cannot be created or written."""
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise OutputError(
            f"cannot write into {folder}: {probe} is a file, not a folder",
            hint="choose another output folder",
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(
            f"cannot write into {folder}: {probe} is not writable",
            hint="choose a folder you can write to, or fix its permissions",
        )


class FileSink:
    """On `Completed`, save the result's artifacts into `out_dir` (all or nothing)."""

    def __init__(self, out_dir: str | os.PathLike, formats: Sequence[str] | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.formats = tuple(formats) if formats is not None else None
        check_writable(self.out_dir)
        self.paths: dict[str, Path] = {}

    def handle(self, event: Event) -> None:
        if isinstance(event, Completed) and event.result is not None:
            self.paths = event.result.save(self.out_dir, self.formats)

    def __repr__(self) -> str:
        return f"FileSink({str(self.out_dir)!r})"
