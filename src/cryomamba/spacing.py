"""Which voxel size a job runs at, and whether it resamples to the model's (DESIGN §9).

One decision per job, made before any inference, from three facts: the volume's voxel size
(and whether its header can be trusted), the job's `voxel_size` override and `resample`
mode, and the model's spacing. The rules:

- An override (`voxel_size=`) wins. Where the header's voxel size looks valid and differs,
  a warning says so (the header is usually right; a typo in the override is not).
- A header voxel size of 0, negative or NaN (`Volume.voxel_size_known` false), or exactly 1 Å
  on every axis (what many programs write when they do not know), cannot be trusted. With a
  model at another spacing and `resample="auto"`, a *file* is refused with a hint to pass
  `voxel_size`: resampling from a made-up voxel size would run blind. An in-memory *array*
  has no header to be wrong; without a voxel size (or with 1 Å) it is taken to be at the
  model's spacing, as CryoMamba always did.
- `resample="auto"` resamples when the voxel size differs from the model's by more than
  `SPACING_TOLERANCE` (1 %) on any axis; `"off"` never does, and warns beyond 25 %.

Imports no torch: the server and CLI can decide (and refuse) before loading anything heavy.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InvalidVolumeError

__all__ = [
    "SPACING_TOLERANCE",
    "SpacingDecision",
    "decide_spacing",
    "header_trusted",
    "model_voxel_size",
    "spacings_match",
]

log = logging.getLogger(__name__)

SPACING_TOLERANCE = 0.01
"""Relative difference per axis within which a tomogram counts as at the model's spacing."""
_WARN_RATIO = 0.25  # resample="off": warn when an axis is off by more than this
MAX_RESAMPLE_FACTOR = 8.0  # per axis, either way: beyond it, bin the tomogram first


def spacings_match(
    a: Sequence[float], b: Sequence[float], tolerance: float = SPACING_TOLERANCE
) -> bool:
    """True when every axis of `a` is within `tolerance` (relative to `b`) of `b`'s."""
    return all(abs(x / y - 1.0) <= tolerance for x, y in zip(a, b, strict=True))


def header_trusted(voxel_size: Sequence[float], known: bool) -> bool:
    """A header voxel size is trusted unless it was missing/invalid or is 1 Å on every axis."""
    return known and not all(v == 1.0 for v in voxel_size)


@dataclass(frozen=True)
class SpacingDecision:
    """Voxel sizes (z, y, x, Å) of one job and what the engine does with them."""

    voxel_size: tuple[float, float, float]  # what the job runs at (and the mask is written at)
    source: str  # "header", "override" or "assumed" (an array without a voxel size)
    header_voxel_size: tuple[float, float, float] | None  # None: header had none / untrusted
    model_voxel_size: tuple[float, float, float]
    resample: bool

    @property
    def engine_spacing(self) -> tuple[float, float, float] | None:
        """What `StreamingPredictor.predict(spacing=...)` gets: None when not resampling."""
        return self.voxel_size if self.resample else None

    def to_dict(self) -> dict[str, Any]:
        """Plain values for stats.json provenance, job records and the server's API."""
        return {
            "voxel_size": list(self.voxel_size),
            "source": self.source,
            "header_voxel_size": (
                list(self.header_voxel_size) if self.header_voxel_size is not None else None
            ),
            "model_voxel_size": list(self.model_voxel_size),
            "resampled": self.resample,
        }


def decide_spacing(
    *,
    voxel_size: Sequence[float],
    voxel_size_known: bool,
    from_file: bool,
    model_voxel_size: Sequence[float],
    override: Sequence[float] | None = None,
    resample: str = "auto",
    name: str = "the volume",
) -> SpacingDecision:
    """Apply the module's rules; raises `InvalidVolumeError` (code `voxel_size_unknown`)."""
    header = tuple(float(v) for v in voxel_size)
    model = tuple(float(v) for v in model_voxel_size)
    trusted = header_trusted(header, voxel_size_known)
    header_or_none = header if trusted else None
    if override is not None:
        used = tuple(float(v) for v in override)
        source = "override"
        if trusted and not spacings_match(used, header):
            log.warning(
                "%s: voxel_size %s Å overrides the header's %s Å",
                name,
                _fmt(used),
                _fmt(header),
            )
    elif trusted:
        used, source = header, "header"
    elif from_file:
        used, source = header, "header"
        if resample != "off" and not spacings_match(header, model):
            what = "has no valid voxel size" if not voxel_size_known else "says 1 Å per voxel"
            raise InvalidVolumeError(
                f"{name}'s header {what}, and the model was trained at {_fmt(model)} Å: "
                "CryoMamba will not resample from a voxel size it cannot trust",
                hint="pass the real voxel size (voxel_size=13.48, or --voxel-size 13.48), or "
                "resample='off' if the tomogram is already at the model's voxel size",
                code="voxel_size_unknown",
            )
    else:
        used, source = model, "assumed"
        log.info(
            "%s has no voxel size: taken to be at the model's %s Å (pass voxel_size to resample)",
            name,
            _fmt(model),
        )
    differs = not spacings_match(used, model)
    factor = max(max(u / m, m / u) for u, m in zip(used, model, strict=True))
    if resample == "auto" and differs and factor > MAX_RESAMPLE_FACTOR:
        raise InvalidVolumeError(
            f"{name}: voxel size {_fmt(used)} Å is {factor:.3g}× from the model's "
            f"{_fmt(model)} Å; CryoMamba resamples by at most {MAX_RESAMPLE_FACTOR:g}× per axis",
            hint="bin (or upsample) the tomogram towards the model's voxel size first, check "
            "voxel_size for a typo (Å, not nm), choose a model trained nearer this voxel size, "
            "or pass resample='off' to run at the tomogram's own",
        )
    if resample == "off" and any(
        abs(u / m - 1.0) > _WARN_RATIO for u, m in zip(used, model, strict=True)
    ):
        log.warning(
            "%s: voxel size %s Å differs from the model's %s Å by more than 25%% and "
            "resample='off': the model sees structures at the wrong scale, results may suffer",
            name,
            _fmt(used),
            _fmt(model),
        )
    return SpacingDecision(
        voxel_size=used,  # type: ignore[arg-type]
        source=source,
        header_voxel_size=header_or_none,  # type: ignore[arg-type]
        model_voxel_size=model,  # type: ignore[arg-type]
        resample=resample == "auto" and differs,
    )


def _fmt(values: Sequence[float]) -> str:
    if len(set(values)) == 1:
        return f"{values[0]:g}"
    return "×".join(f"{v:g}" for v in values)


def model_voxel_size(folder: str | Path) -> tuple[float, float, float] | None:
    """A trained-model folder's spacing in (z, y, x) from its plans.json, without torch;
    None when the folder has no readable 3d_fullres spacing."""
    try:
        plans = json.loads((Path(folder) / "plans.json").read_text())
        spacing = [float(v) for v in plans["configurations"]["3d_fullres"]["spacing"]]
        transpose = [int(v) for v in plans.get("transpose_forward", [0, 1, 2])]
        zyx = [0.0, 0.0, 0.0]
        for i, axis in enumerate(transpose):
            zyx[axis] = spacing[i]
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None
    return (zyx[0], zyx[1], zyx[2])
