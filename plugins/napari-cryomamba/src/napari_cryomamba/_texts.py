"""The widget's words: the voxel-size row, the time left, an error as one notification line."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from napari.layers import Image

import cryomamba as cm
from cryomamba.spacing import header_trusted, spacings_match

__all__ = ["describe_spacing", "error_text", "format_eta"]


def describe_spacing(
    layer: Image | None, model: tuple[float, float, float] | None, override: float | None
) -> str:
    """'tomogram 7.84 Å · model 10 Å: resampled to the model's', for the spacing row."""
    if layer is None:
        return ""
    meta = layer.metadata if isinstance(layer.metadata, dict) else {}
    image = tuple(float(v) for v in meta.get("voxel_size", layer.scale))
    trusted = header_trusted(image, bool(meta.get("voxel_size_known", True)))
    if override:
        tomo, used = f"{override:g} Å (set here)", (override,) * 3
    elif trusted:
        tomo, used = f"{_angstrom(image)} Å", image
    else:
        tomo, used = "unknown (header 0 or 1 Å)", None
    text = f"tomogram {tomo} · model {_angstrom(model) + ' Å' if model else '?'}"
    if model is None:
        return text
    if used is None:
        if meta.get("path"):
            return f"{text}: set the voxel size, or the job is refused"
        return f"{text}: taken to be at the model's"
    if spacings_match(used, model):
        return f"{text}: no resampling"
    return f"{text}: resampled to the model's and back"


def _angstrom(values: Sequence[float]) -> str:
    return f"{values[0]:g}" if len(set(values)) == 1 else "×".join(f"{v:g}" for v in values)


def format_eta(seconds: float | None) -> str:
    """'about 40 s left', 'about 3 min left', 'about 1 h 05 min left'; '' while unknown."""
    if seconds is None or not np.isfinite(seconds) or seconds < 0:
        return ""
    s = round(seconds)
    if s < 60:
        return f"about {s} s left"
    if s < 3600:
        return f"about {round(s / 60)} min left"
    return f"about {s // 3600} h {s % 3600 // 60:02d} min left"


def error_text(exc: BaseException) -> str:
    """'message — hint', the form the reader and `NapariSink` use in their notifications too."""
    if isinstance(exc, cm.CryoMambaError):
        message, hint = exc.message, exc.hint
    else:  # not one of ours: a bug somewhere, say what it was
        message, hint = f"{type(exc).__name__}: {exc}", ""
    return f"{message} — {hint}" if hint else message
