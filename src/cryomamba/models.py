"""Model registry: a name → an nnU-Net v2 trained-model folder; the bundled demo model is one.

Models come from plugins (`cryomamba_register_models`), from `CRYOMAMBA_MODELS_DIR`
(every sub-folder holding a plans.json is a model named after the folder), or directly
from a folder path given as the model name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelError
from .hookspecs import hookimpl
from .registry import Registry

__all__ = ["BUNDLED_MODELS_DIR", "ModelSpec", "available_models", "resolve_model"]

log = logging.getLogger(__name__)

BUNDLED_MODELS_DIR = Path(__file__).parent / "bundled_models"
REQUIRED_FILES = ("plans.json", "dataset.json")


@dataclass(frozen=True)
class ModelSpec:
    """Where a trained model lives and what it is for."""

    name: str
    path: Path
    description: str = ""

    def labels(self) -> dict[int, str]:
        """Label value → name, from dataset.json."""
        return read_label_names(self.path)

    def checksum(self) -> str:
        """sha256 over plans, dataset and every checkpoint, so provenance names the weights."""
        digest = hashlib.sha256()
        files = [self.path / f for f in REQUIRED_FILES] + sorted(
            self.path.glob("fold_*/checkpoint_*.pth")
        )
        for file in files:
            digest.update(file.relative_to(self.path).as_posix().encode())
            with open(file, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
        return digest.hexdigest()


def read_label_names(folder: Path) -> dict[int, str]:
    try:
        labels = json.loads((folder / "dataset.json").read_text())["labels"]
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(
            f"cannot read labels from {folder / 'dataset.json'}: {exc}",
            hint="dataset.json needs a 'labels' object, e.g. {\"background\": 0}",
        ) from None
    return {int(v): k for k, v in labels.items() if isinstance(v, int)}


def _models_from_dir(root: Path) -> list[ModelSpec]:
    if not root.is_dir():
        return []
    return [
        ModelSpec(p.name, p, f"from {root}")
        for p in sorted(root.iterdir())
        if (p / "plans.json").is_file()
    ]


def _models_dir_problem() -> str | None:
    """What is wrong with $CRYOMAMBA_MODELS_DIR, if it is set and gives no models."""
    extra = os.environ.get("CRYOMAMBA_MODELS_DIR")
    if not extra:
        return None
    root = Path(extra).expanduser()
    if not root.exists():
        return f"CRYOMAMBA_MODELS_DIR={extra} does not exist"
    if not root.is_dir():
        return f"CRYOMAMBA_MODELS_DIR={extra} is a file, not a folder"
    if not _models_from_dir(root):
        return f"CRYOMAMBA_MODELS_DIR={extra} holds no model folders (sub-folders with plans.json)"
    return None


@hookimpl
def cryomamba_register_models(registry: Registry[ModelSpec]) -> None:
    """Builtin models: the bundled demo model, plus any in $CRYOMAMBA_MODELS_DIR."""
    registry.add(
        "demo-membrane",
        ModelSpec(
            "demo-membrane",
            BUNDLED_MODELS_DIR / "demo-membrane",
            "demo: membranes (bilayers or dark bands, 3-8 nm) at 10 Å/voxel, trained only "
            "on synthetic tomograms (cryomamba.synth_random); a first look, not for "
            "analysis: it marks reconstruction streaks as membrane and is unreliable for "
            "faint membranes in strongly low-passed tomograms and for bilayers under an "
            "uncorrected high-defocus CTF (docs/demo-model.md)",
        ),
    )
    extra = os.environ.get("CRYOMAMBA_MODELS_DIR")
    if extra:
        problem = _models_dir_problem()
        if problem:
            log.warning("%s; only the other models are offered", problem)
        for spec in _models_from_dir(Path(extra).expanduser()):
            if spec.name not in registry:
                registry.add(spec.name, spec)


def available_models() -> list[ModelSpec]:
    """Every registered model (the bundled demo, $CRYOMAMBA_MODELS_DIR's, plugins'), by name."""
    from . import plugins

    registry = plugins.models()
    return [registry.get(name) for name in registry.names()]


def resolve_model(name_or_path: str | os.PathLike[str]) -> ModelSpec:
    """A registered name or a trained-model folder → `ModelSpec`; a clear `ModelError` otherwise."""
    from . import plugins

    name = os.fspath(name_or_path)
    registry = plugins.models()
    if name in registry:
        spec = registry.get(name)
        if not (spec.path / "plans.json").is_file():
            raise ModelError(
                f"model {name!r} is registered but its folder {spec.path} is missing or incomplete",
                hint="reinstall the package that provides it (for demo-membrane: cryomamba)",
            )
        return spec
    path = Path(name).expanduser()
    if path.is_dir():
        _check_model_folder(path)
        return ModelSpec(path.name, path.resolve(), f"folder {path}")
    problem = _models_dir_problem()
    raise ModelError(
        f"unknown model {name!r}" + (f" ({problem})" if problem else ""),
        hint=f"use one of: {', '.join(registry.names())} "
        "(see `cryomamba models`), or the path of an nnU-Net v2 trained-model folder",
    )


def _check_model_folder(path: Path) -> None:
    """Refuse a folder that is not one nnU-Net v2 trained model, pointing at one inside it."""
    missing = [f for f in REQUIRED_FILES if not (path / f).is_file()]
    if not missing:
        return
    inside = sorted(p for p in path.rglob("plans.json") if len(p.relative_to(path).parts) <= 3)
    hint = (
        "give the folder nnU-Net wrote for one trained configuration, the one holding "
        "plans.json, dataset.json and fold_N/ (e.g. "
        "Dataset123_Membranes/nnUNetTrainer__nnUNetPlans__3d_fullres)"
    )
    if inside:
        hint = f"did you mean {inside[0].parent}? " + hint
    raise ModelError(
        f"{path} is not an nnU-Net v2 trained-model folder: it has no {' or '.join(missing)}",
        hint=hint,
    )
