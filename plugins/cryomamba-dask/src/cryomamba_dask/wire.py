"""Events as msgpack-ready dicts for Dask's worker events (`Worker.log_event`).

Every message names its job (`job`) and carries a sequence number (`seq`), so the client can
tell when it has seen everything a finished task sent. Previews travel as zlib-compressed
bytes (a label map compresses 20-100x), not base64, to keep what the scheduler forwards small.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np

from cryomamba.events import Event, Preview, Progress

__all__ = ["decode", "encode"]


def encode(job_id: str, seq: int, event: Event) -> dict[str, Any]:
    """A Progress or Preview as a dict of plain values and bytes."""
    msg: dict[str, Any] = {"job": job_id, "seq": seq, "type": event.kind}
    if isinstance(event, Progress):
        msg.update(event.to_dict())
    elif isinstance(event, Preview):
        labels = np.ascontiguousarray(event.labels, dtype=np.uint8)
        msg.update(
            scale=event.scale,
            shape=list(labels.shape),
            full_shape=list(event.shape),
            planes_done=event.planes_done,
            data=zlib.compress(labels.tobytes(), 1),
        )
    else:
        raise TypeError(f"only Progress and Preview travel as worker events, not {event.kind}")
    msg["type"] = event.kind
    return msg


def decode(msg: dict[str, Any]) -> Event:
    """The event back from `encode`'s dict."""
    kind = msg["type"]
    if kind == "progress":
        return Progress(
            fraction=float(msg["fraction"]),
            tiles_done=int(msg["tiles_done"]),
            tiles_total=int(msg["tiles_total"]),
            eta_s=msg.get("eta_s"),
            stage=msg.get("stage", "inference"),
        )
    if kind == "preview":
        shape = tuple(int(n) for n in msg["shape"])
        labels = np.frombuffer(zlib.decompress(msg["data"]), dtype=np.uint8).reshape(shape)
        return Preview(
            scale=int(msg["scale"]),
            shape=tuple(int(n) for n in msg["full_shape"]),  # type: ignore[arg-type]
            labels=labels,
            planes_done=int(msg["planes_done"]),
        )
    raise ValueError(f"unexpected worker event {kind!r}")
