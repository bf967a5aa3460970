"""The events a `Job` reports: Progress and Preview while it runs, then one terminal event.

Every event turns into a JSON-ready dict and back, so the server can send exactly what the
local executor produces.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from .preview import decode_preview, encode_preview

if TYPE_CHECKING:
    from .segmentation import Segmentation

__all__ = [
    "Canceled",
    "Completed",
    "Event",
    "Failed",
    "Preview",
    "Progress",
    "event_from_dict",
]


@dataclass(frozen=True, eq=False)  # subclasses choose; Preview keeps identity semantics
class Event:
    """Base class; `kind` names the event on the wire."""

    kind: ClassVar[str] = "event"
    terminal: ClassVar[bool] = False

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError


@dataclass(frozen=True)
class Progress(Event):
    """How far inference is: tiles done of total, and an ETA in seconds (None until known)."""

    kind: ClassVar[str] = "progress"
    fraction: float
    tiles_done: int
    tiles_total: int
    eta_s: float | None = None
    stage: str = "inference"

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind, **self.record(), "stage": self.stage}

    def record(self) -> dict[str, Any]:
        """The `progress` of a job record (what the server stores and returns): the one
        place its fields are named."""
        return {
            "fraction": self.fraction,
            "tiles_done": self.tiles_done,
            "tiles_total": self.tiles_total,
            "eta_s": self.eta_s,
        }

    @classmethod
    def from_record(cls, data: Mapping[str, Any]) -> Progress:
        """Back from `record()` (or `to_dict()`); missing tile counts read as 0."""
        eta = data.get("eta_s")
        return cls(
            fraction=float(data["fraction"]),
            tiles_done=int(data.get("tiles_done", 0)),
            tiles_total=int(data.get("tiles_total", 0)),
            eta_s=None if eta is None else float(eta),
            stage=str(data.get("stage", "inference")),
        )


@dataclass(frozen=True, eq=False)
class Preview(Event):
    """A downsampled label map of the planes finished so far (uint8, shape = ceil(shape/scale))."""

    kind: ClassVar[str] = "preview"
    scale: int
    shape: tuple[int, int, int]
    labels: np.ndarray = field(repr=False)
    planes_done: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.kind,
            **encode_preview(self.labels, self.scale),
            "full_shape": list(self.shape),
            "planes_done": self.planes_done,
        }


@dataclass(frozen=True)
class Completed(Event):
    """The job finished; `result` is the `Segmentation` (None when only a record crossed a wire)."""

    kind: ClassVar[str] = "completed"
    terminal: ClassVar[bool] = True
    result: Segmentation | None = field(default=None, repr=False)
    artifacts: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind, "artifacts": dict(self.artifacts)}


@dataclass(frozen=True)
class Failed(Event):
    """The job stopped: a stable `code`, a message, a hint, and whether a retry may help."""

    kind: ClassVar[str] = "failed"
    terminal: ClassVar[bool] = True
    code: str
    message: str
    hint: str = ""
    retryable: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.kind,
            "code": self.code,
            "message": self.message,
            "hint": self.hint,
            "retryable": self.retryable,
        }


@dataclass(frozen=True)
class Canceled(Event):
    """The job was canceled on request; nothing was written."""

    kind: ClassVar[str] = "canceled"
    terminal: ClassVar[bool] = True

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind}


def event_from_dict(data: dict[str, Any]) -> Event:
    """Rebuild an event from `Event.to_dict()` output (what the server sends)."""
    kind = data.get("type")
    if kind == "progress":
        return Progress.from_record(data)
    if kind == "preview":
        scale, labels = decode_preview(data)
        full = tuple(int(s) for s in data.get("full_shape", labels.shape))
        return Preview(
            scale=scale,
            shape=full,  # type: ignore[arg-type]
            labels=labels,
            planes_done=int(data.get("planes_done", 0)),
        )
    if kind == "completed":
        return Completed(result=None, artifacts=dict(data.get("artifacts", {})))
    if kind == "failed":
        return Failed(
            code=str(data["code"]),
            message=str(data["message"]),
            hint=str(data.get("hint", "")),
            retryable=bool(data.get("retryable", False)),
        )
    if kind == "canceled":
        return Canceled()
    raise ValueError(f"unknown event type {kind!r}")
