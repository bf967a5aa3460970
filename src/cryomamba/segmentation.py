"""`Segmentation`: the result of a job — labels aligned voxel-for-voxel with the source."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._version import __version__

__all__ = ["Segmentation"]

log = logging.getLogger(__name__)


@dataclass
class Segmentation:
    """uint8 labels (array or memmap, the source's shape) plus what is needed to save them well."""

    labels: np.ndarray = field(repr=False)
    voxel_size: tuple[float, float, float]
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    label_names: dict[int, str] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    image: np.ndarray | None = field(default=None, repr=False)
    header: Any = field(default=None, repr=False)  # the source MRC header, for n[xyz]start
    artifacts: dict[str, Path] = field(default_factory=dict)
    probabilities: Path | None = None  # the per-label softmax the job streamed (a zarr folder)
    _stats: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        z, y, x = (int(s) for s in self.labels.shape)
        return (z, y, x)

    @property
    def stats(self) -> dict[str, Any]:
        """Per-label voxel count, volume (nm³), surface area (nm², from a mesh), components."""
        if self._stats is None:
            from .stats import label_stats

            self._stats = label_stats(self.labels, self.voxel_size, label_names=self.label_names)
        return self._stats

    def save(self, out_dir: str | Path, formats: Sequence[str] | None = None) -> dict[str, Path]:
        """Write mask.mrc / mask.nii.gz / mask.nrrd / stats.json / overview.png (all or nothing)."""
        from .artifacts import save_artifacts
        from .config import DEFAULT_FORMATS

        formats = tuple(formats) if formats is not None else DEFAULT_FORMATS
        stats = self.stats if ("stats" in formats or "png" in formats) else None
        paths = save_artifacts(
            Path(out_dir),
            self.labels,
            voxel_size=self.voxel_size,
            origin=self.origin,
            formats=formats,
            stats=stats,
            image=self.image,
            provenance={"cryomamba_version": __version__, **self.provenance},
            label_names=self.label_names,
            probabilities=self.probabilities,
        )
        self.artifacts.update(paths)
        log.info("wrote %s", ", ".join(str(p) for p in paths.values()))
        return paths
