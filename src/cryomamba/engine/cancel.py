"""The exception that unwinds the engine when a job's cancel flag is set."""

from __future__ import annotations

__all__ = ["Canceled"]


class Canceled(Exception):
    """Raised between blocks or tile batches once the cancel event is set."""
