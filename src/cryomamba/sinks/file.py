"""`FileSink`: write the artifacts of a completed job into a folder."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from ..artifacts import check_output_dir
from ..events import Completed, Event

__all__ = ["FileSink"]

log = logging.getLogger(__name__)


class FileSink:
    """On `Completed`, save the result's artifacts into `out_dir` (all or nothing)."""

    def __init__(
        self, out_dir: str | os.PathLike[str], formats: Sequence[str] | None = None
    ) -> None:
        self.out_dir = Path(out_dir)
        self.formats = tuple(formats) if formats is not None else None
        check_output_dir(self.out_dir)
        self.paths: dict[str, Path] = {}

    def handle(self, event: Event) -> None:
        if isinstance(event, Completed) and event.result is not None:
            self.paths = event.result.save(self.out_dir, self.formats)

    def __repr__(self) -> str:
        return f"FileSink({str(self.out_dir)!r})"
