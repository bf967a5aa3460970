"""`JobConfig`: every setting of one segmentation job, as plain values the server accepts as JSON.

Config is resolved in two phases (STYLE §7): this module only holds and validates plain
values; the executor turns the model name into a loaded model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

__all__ = ["ARTIFACT_FILES", "ARTIFACT_MEDIA_TYPES", "DEFAULT_FORMATS", "FORMATS", "JobConfig"]

# The one list of outputs: format name → file name in the output folder → media type. The
# writers, the server's routes and OpenAPI document, and the remote executor derive theirs.
ARTIFACT_FILES: dict[str, str] = {
    "mrc": "mask.mrc",
    "nifti": "mask.nii.gz",
    "nrrd": "mask.nrrd",
    "stats": "stats.json",
    "png": "overview.png",
    "zarr": "mask.zarr",  # a folder: OME-Zarr (NGFF 0.4) labels, served as one zip
    "probabilities": "probabilities.zarr",  # a folder; opt-in: 2 bytes/voxel/label
}
ARTIFACT_MEDIA_TYPES: dict[str, str] = {
    "mask.mrc": "application/octet-stream",
    "mask.nii.gz": "application/gzip",
    "mask.nrrd": "application/octet-stream",
    "stats.json": "application/json",
    "overview.png": "image/png",
    "mask.zarr.zip": "application/zip",
    "probabilities.zarr.zip": "application/zip",
}
FORMATS: tuple[str, ...] = tuple(ARTIFACT_FILES)  # every format a job may ask for
# What a job writes when it names no formats: the zarr copies and probability maps are opt-in.
DEFAULT_FORMATS: tuple[str, ...] = ("mrc", "nifti", "nrrd", "stats", "png")
# The rules' numbers, named once: validation below and the JSON Schema (config_schema.py)
# both read them, so the server's OpenAPI document cannot drift from what JobConfig accepts.
CHECKPOINTS: tuple[str, ...] = ("checkpoint_final.pth", "checkpoint_best.pth")
_CHECKPOINTS = CHECKPOINTS
FOLD_RANGE = (0, 999)
TILE_BATCH_RANGE = (1, 64)
PREVIEW_SCALE_RANGE = (1, 8)
DEVICE_PATTERN = r"^(auto|cpu|cuda(:[0-9]+)?)$"
# Below 0.1 every voxel lies in 1,000+ tiles (3D): 125x the work of nnU-Net's 0.5 for no
# measurable gain, and a step like 1e-9 would make the tile-step lists billions long.
MIN_TILE_STEP = 0.1
RESAMPLE_MODES: tuple[str, ...] = ("auto", "off")
VOXEL_SIZE_RANGE = (0.1, 10_000.0)  # Å: an override outside this is a typo, not a tomogram


@dataclass(frozen=True)
class JobConfig:
    """What to run and how; frozen, validated on construction, JSON round-trippable."""

    model: str = "demo-membrane"
    folds: tuple[int, ...] | None = None
    checkpoint: str = "checkpoint_final.pth"
    tile_step: float = 0.5
    mirroring: bool = False
    fp16: bool = True
    device: str = "auto"
    tile_batch: int | str = "auto"
    compile: bool = False  # torch.compile the networks: opt-in, labels may differ in near-ties
    preview_interval_s: float = 1.0
    preview_scale: int = 4
    formats: tuple[str, ...] = DEFAULT_FORMATS
    resample: str = "auto"
    voxel_size: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        # Normalise sequences so that a config built from JSON lists equals one built from tuples.
        if self.folds is not None:
            object.__setattr__(self, "folds", tuple(self.folds))
        object.__setattr__(self, "formats", tuple(self.formats))
        if self.voxel_size is not None:
            object.__setattr__(self, "voxel_size", _voxel_size(self.voxel_size))
        self._validate()

    def _validate(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise ConfigError(
                "model must be a non-empty string",
                hint="give a registered name (see `cryomamba models`) or a folder",
            )
        if self.folds is not None:
            if not self.folds or not all(_is_fold(f) for f in self.folds):
                raise ConfigError(
                    f"folds must be fold numbers (integers 0..999), got {list(self.folds)!r}",
                    hint="e.g. folds=[0] or folds=[0, 1, 2, 3, 4]; None uses all",
                )
            if len(set(self.folds)) != len(self.folds):
                raise ConfigError(
                    f"folds repeat a fold: {self.folds!r}", hint="name each fold once, e.g. [0, 1]"
                )
        if self.checkpoint not in _CHECKPOINTS:
            raise ConfigError(
                f"checkpoint must be one of {_CHECKPOINTS}, got {self.checkpoint!r}",
                hint="checkpoint_final.pth is what nnU-Net writes at the end of training",
            )
        if not _is_number(self.tile_step) or not MIN_TILE_STEP <= self.tile_step <= 1:
            raise ConfigError(
                f"tile_step must be in [{MIN_TILE_STEP}, 1], got {self.tile_step!r}",
                hint="0.5 (nnU-Net's default) overlaps tiles by half; below 0.1 the work grows "
                "as 1/step³ (1,000 tiles over every voxel) for no better mask",
            )
        for name in ("mirroring", "fp16", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(
                    f"{name} must be true or false, got {getattr(self, name)!r}",
                    hint="use a boolean, not a string or a number",
                )
        if not _valid_device(self.device):
            raise ConfigError(
                f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}",
                hint="'auto' takes the first GPU when there is one, else the CPU",
            )
        if self.tile_batch != "auto" and (
            not isinstance(self.tile_batch, int)
            or isinstance(self.tile_batch, bool)
            or not TILE_BATCH_RANGE[0] <= self.tile_batch <= TILE_BATCH_RANGE[1]
        ):
            raise ConfigError(
                "tile_batch must be 'auto' or an integer in {}..{}, got {!r}".format(
                    *TILE_BATCH_RANGE, self.tile_batch
                ),
                hint="'auto' (the default) sizes it from free memory; an integer is the number "
                "of samples per network call (1 is nnU-Net's one tile at a time)",
            )
        if not _is_number(self.preview_interval_s) or self.preview_interval_s < 0:
            raise ConfigError(
                "preview_interval_s must be a number >= 0 "
                f"(0 turns previews off), got {self.preview_interval_s!r}",
                hint="seconds between previews; 1 is the default",
            )
        if (
            not isinstance(self.preview_scale, int)
            or isinstance(self.preview_scale, bool)
            or not PREVIEW_SCALE_RANGE[0] <= self.preview_scale <= PREVIEW_SCALE_RANGE[1]
        ):
            raise ConfigError(
                "preview_scale must be an integer in {}..{}, got {!r}".format(
                    *PREVIEW_SCALE_RANGE, self.preview_scale
                ),
                hint="the preview is downsampled by this factor per axis; 4 is the default",
            )
        if self.resample not in RESAMPLE_MODES:
            raise ConfigError(
                f"resample must be one of {', '.join(RESAMPLE_MODES)}, got {self.resample!r}",
                hint="'auto' resamples to the model's voxel size when the tomogram's differs; "
                "'off' runs at the tomogram's own voxel size",
            )
        unknown = [f for f in self.formats if f not in FORMATS]
        if unknown:
            raise ConfigError(
                f"unknown output format(s) {unknown}", hint=f"choose from {', '.join(FORMATS)}"
            )

    def replace(self, **changes: Any) -> JobConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values."""
        d = dataclasses.asdict(self)
        d["folds"] = list(self.folds) if self.folds is not None else None
        d["formats"] = list(self.formats)
        d["voxel_size"] = list(self.voxel_size) if self.voxel_size is not None else None
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobConfig:
        """Build from JSON-like values; unknown keys are an error, not silently dropped."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"a job config must be a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(
                f"unknown config key(s): {', '.join(unknown)}",
                hint=f"valid keys: {', '.join(sorted(names))}",
            )
        try:
            return cls(**data)
        except TypeError as exc:  # e.g. a list where a number belongs, caught by comparisons
            raise ConfigError(f"invalid job config: {exc}") from None

    @classmethod
    def from_json(cls, text: str) -> JobConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"job config is not valid JSON: {exc}") from None
        return cls.from_dict(data)


def tile_batch_arg(text: str) -> int | str:
    """`--tile-batch` on the command line: 'auto' or a whole number (range checked by JobConfig)."""
    import argparse

    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number, got {text!r}") from None


TILE_BATCH_OPTION: dict[str, Any] = {
    "type": tile_batch_arg,
    "default": "auto",
    "metavar": "N",
    "help": "samples per network call, or auto (default: sized from free memory)",
}
"""argparse keywords of `--tile-batch`, shared by `segment` and `batch`."""


def _voxel_size(value: object) -> tuple[float, float, float]:
    """A voxel size override as three floats (z, y, x) in Å within `VOXEL_SIZE_RANGE`, or
    ConfigError. One number means the same on every axis; a list must hold three."""
    values: list[Any] = list(value) if isinstance(value, (list, tuple)) else [value] * 3
    lo, hi = VOXEL_SIZE_RANGE
    if len(values) != 3 or not all(_is_number(v) and lo <= v <= hi for v in values):
        raise ConfigError(
            f"voxel_size must be a number or three (z, y, x), in Å from {lo:g} to {hi:g}, "
            f"got {value!r}",
            hint="e.g. voxel_size=13.48, or [20.0, 10.0, 10.0] for anisotropic voxels; leave it "
            "unset to use the file's header",
        )
    return (float(values[0]), float(values[1]), float(values[2]))


def _is_fold(value: object) -> bool:
    """A fold number: an int (never a bool, which JSON's true/false become) in 0..999."""
    lo, hi = FOLD_RANGE
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _valid_device(device: object) -> bool:
    return isinstance(device, str) and re.fullmatch(DEVICE_PATTERN, device) is not None
