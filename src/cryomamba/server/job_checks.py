"""What the server checks about a job before queueing it: folds the model has, tiles it makes.

Both are read from the model folder's files (plans.json, fold_N/), never by loading the
network, so submit stays fast; and both fail at submit with a 422 that names no server path,
instead of failing later in the worker with a message holding the model's install path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..config import JobConfig
from ..spacing import model_voxel_size, spacings_match
from .errors import ApiError

__all__ = ["ModelFacts"]


@dataclass(frozen=True)
class ModelFacts:
    """A served model's checksum, folds per checkpoint, patch size and spacing."""

    name: str
    sha256: str
    folds: dict[str, tuple[int, ...]]  # checkpoint file name -> folds that have it
    patch: tuple[int, int, int]  # in the plans' (transposed) axis order
    transpose: tuple[int, int, int]
    spacing_zyx: tuple[float, float, float] | None

    @classmethod
    def read(cls, name: str) -> ModelFacts:
        from ..models import resolve_model

        spec = resolve_model(name)
        folds: dict[str, list[int]] = {}
        for ckpt in spec.path.glob("fold_*/checkpoint_*.pth"):
            number = ckpt.parent.name.removeprefix("fold_")
            if number.isdigit():
                folds.setdefault(ckpt.name, []).append(int(number))
        plans = json.loads((spec.path / "plans.json").read_text())
        patch = plans["configurations"]["3d_fullres"]["patch_size"]
        tf = plans.get("transpose_forward", [0, 1, 2])
        return cls(
            name=name,
            sha256=spec.checksum(),
            folds={k: tuple(sorted(v)) for k, v in folds.items()},
            patch=(int(patch[0]), int(patch[1]), int(patch[2])),
            transpose=(int(tf[0]), int(tf[1]), int(tf[2])),
            spacing_zyx=model_voxel_size(spec.path),
        )

    def check(self, config: JobConfig, source: dict[str, Any], max_tiles: int) -> None:
        """422 `invalid_config` for folds the model lacks or more tiles than `max_tiles`."""
        have = self.folds.get(config.checkpoint, ())
        if config.folds is not None:
            missing = [f for f in config.folds if f not in have]
            if missing:
                raise ApiError(
                    422,
                    "invalid_config",
                    f"model {self.name!r} has no fold {', '.join(map(str, missing))} "
                    f"with {config.checkpoint}",
                    f"its folds are: {', '.join(map(str, have)) or 'none'}; leave folds out "
                    "to use them all",
                )
        tiles = self.tiles(config, source)
        if tiles > max_tiles:
            raise ApiError(
                422,
                "invalid_config",
                f"this job would make {tiles:,} tiles; this server allows at most "
                f"{max_tiles:,} per job",
                "raise tile_step (0.5 is nnU-Net's default), crop or bin the tomogram, or ask "
                "the operator to raise --max-tiles",
            )

    def tiles(self, config: JobConfig, source: dict[str, Any]) -> int:
        """The tiles the engine makes at most (before it crops to the non-empty region)."""
        from ..engine.tiling import tile_count  # engine/ imports torch: only when submitting

        shape = [int(n) for n in source["shape"]]
        used = config.voxel_size or source.get("voxel_size")
        model = self.spacing_zyx
        if config.resample != "off" and used is not None and model is not None:
            used = [float(v) for v in used]
            if not spacings_match(used, model):  # resampled to the model's voxel size first
                shape = [max(1, round(n * u / m)) for n, u, m in zip(shape, used, model)]
        shape_tf = [shape[i] for i in self.transpose]
        return tile_count(shape_tf, self.patch, config.tile_step)
