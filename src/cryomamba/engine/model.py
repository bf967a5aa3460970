"""Load an nnU-Net v2 trained-model folder: plans, dataset, one network per fold.

The network is built from the plans' architecture entry with nnU-Net's own
`get_network_from_plans`; nnU-Net's trainer classes are never imported (their lookup
drags in torchvision, broken beside CPU torch builds).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelError
from .compiled import CompiledNetwork

__all__ = ["TrainedModel"]

log = logging.getLogger(__name__)

CONFIGURATION = "3d_fullres"
SUPPORTED_NORMALIZATIONS = (
    "ZScoreNormalization",
    "CTNormalization",
    "NoNormalization",
    "RescaleTo01Normalization",
    "RGBTo01Normalization",
)


@dataclass
class TrainedModel:
    """A loaded model: one network per fold (ensembled), the plans it was trained with."""

    path: Path
    plans: dict[str, Any]
    dataset: dict[str, Any]
    folds: tuple[int | str, ...]
    networks: list[torch.nn.Module] = field(repr=False)
    mirror_axes: tuple[int, ...]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    _compiled: list[CompiledNetwork] | None = field(default=None, init=False, repr=False)

    def compiled_networks(self) -> list[CompiledNetwork]:
        """The networks through `torch.compile`, built once per loaded model (so a cached model
        compiles once, not once per job)."""
        if self._compiled is None:
            self._compiled = [CompiledNetwork(net) for net in self.networks]
        return self._compiled

    @property
    def configuration(self) -> dict[str, Any]:
        configuration: dict[str, Any] = self.plans["configurations"][CONFIGURATION]
        return configuration

    @property
    def patch_size(self) -> tuple[int, int, int]:
        return tuple(int(p) for p in self.configuration["patch_size"])  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size the model was trained at (plans units; Å for cryo-ET models)."""
        return tuple(float(s) for s in self.configuration["spacing"])  # type: ignore[return-value]

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        """`spacing` in the tomogram's (z, y, x) order (the plans hold it transposed)."""
        zyx = [0.0, 0.0, 0.0]
        for i, axis in enumerate(self.transpose_forward):
            zyx[axis] = self.spacing[i]
        return (zyx[0], zyx[1], zyx[2])

    @property
    def normalization(self) -> str:
        return str(self.configuration["normalization_schemes"][0])

    @property
    def use_mask_for_norm(self) -> bool:
        return bool(self.configuration.get("use_mask_for_norm", [False])[0])

    @property
    def intensity_properties(self) -> dict[str, float]:
        props = self.plans.get("foreground_intensity_properties_per_channel", {})
        return dict(props.get("0", {}))

    @property
    def label_names(self) -> dict[int, str]:
        return {int(v): k for k, v in self.dataset["labels"].items() if isinstance(v, int)}

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    @property
    def transpose_forward(self) -> tuple[int, int, int]:
        a, b, c = (int(i) for i in self.plans.get("transpose_forward", [0, 1, 2]))
        return (a, b, c)

    def to(self, device: torch.device) -> TrainedModel:
        """Move every fold's network to `device` (in place) and return self."""
        for net in self.networks:
            net.to(device)
        self.device = device
        self._compiled = None  # compiled for the old device
        return self

    @classmethod
    def load(
        cls,
        folder: str | Path,
        *,
        folds: tuple[int, ...] | None = None,
        checkpoint: str = "checkpoint_final.pth",
        device: torch.device | str = "cpu",
    ) -> TrainedModel:
        """Load and check a trained-model folder; any problem is a `ModelError` naming the file."""
        path = Path(folder)
        plans = _read_json(path, "plans.json")
        dataset = _read_json(path, "dataset.json")
        config = _check_plans(path, plans, dataset)
        fold_names = _find_folds(path, folds, checkpoint)
        in_channels = len(dataset.get("channel_names", dataset.get("modality", {"0": ""})))
        if in_channels != 1:
            raise ModelError(
                f"{path.name} expects {in_channels} input channels; tomograms have one",
                hint="use a model trained on single-channel images",
            )
        n_classes = len([v for v in dataset["labels"].values() if isinstance(v, int)])
        if "regions_class_order" in dataset:
            raise ModelError(
                f"{path.name} is a region-based model, which CryoMamba does not run yet",
                hint="use a model trained with plain labels",
            )
        networks = []
        mirror_axes: tuple[int, ...] = ()
        for i, fold in enumerate(fold_names):
            ckpt_path = path / f"fold_{fold}" / checkpoint
            ckpt = _load_checkpoint(ckpt_path)
            net = _build_network(config, n_classes)
            try:
                net.load_state_dict(ckpt["network_weights"])
            except RuntimeError as exc:
                first = str(exc).splitlines()[0:3]
                raise ModelError(
                    f"{ckpt_path} does not match the architecture in plans.json: {' '.join(first)}",
                    hint="plans.json and the checkpoint must come from the same training run",
                ) from None
            net.eval()
            networks.append(net)
            if i == 0:
                mirror_axes = tuple(ckpt.get("inference_allowed_mirroring_axes") or ())
        model = cls(
            path=path,
            plans=plans,
            dataset=dataset,
            folds=tuple(fold_names),
            networks=networks,
            mirror_axes=mirror_axes,
        )
        return model.to(torch.device(device))


def _read_json(path: Path, name: str) -> dict[str, Any]:
    file = path / name
    if not path.is_dir():
        raise ModelError(
            f"model folder {path} does not exist",
            hint="give a registered model name or an nnU-Net v2 trained-model folder",
        )
    if not file.is_file():
        raise ModelError(
            f"model folder {path} has no {name}",
            hint="an nnU-Net v2 trained-model folder holds plans.json, dataset.json and "
            "fold_N/checkpoint_final.pth",
        )
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{file} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{file} must hold a JSON object")
    return data


def _check_plans(path: Path, plans: dict[str, Any], dataset: dict[str, Any]) -> dict[str, Any]:
    config = plans.get("configurations", {}).get(CONFIGURATION)
    if config is None:
        have = ", ".join(plans.get("configurations", {})) or "none"
        raise ModelError(
            f"{path / 'plans.json'} has no {CONFIGURATION} configuration (has: {have})",
            hint="CryoMamba runs 3d_fullres models",
        )
    for key in ("patch_size", "normalization_schemes", "architecture", "spacing"):
        if key not in config:
            raise ModelError(f"{path / 'plans.json'}: {CONFIGURATION} lacks {key!r}")
    if len(config["patch_size"]) != 3:
        raise ModelError(f"{path / 'plans.json'}: patch_size {config['patch_size']} is not 3D")
    scheme = config["normalization_schemes"][0]
    if scheme not in SUPPORTED_NORMALIZATIONS:
        raise ModelError(
            f"{path.name} uses normalization {scheme}, which CryoMamba does not support",
            hint=f"supported: {', '.join(SUPPORTED_NORMALIZATIONS)}",
        )
    if "labels" not in dataset or dataset["labels"].get("background") != 0:
        raise ModelError(f"{path / 'dataset.json'} needs labels with background 0")
    if sorted(plans.get("transpose_forward", [0, 1, 2])) != [0, 1, 2]:
        raise ModelError(f"{path / 'plans.json'}: transpose_forward is not a permutation of 0,1,2")
    checked: dict[str, Any] = config
    return checked


def _find_folds(path: Path, folds: tuple[int, ...] | None, checkpoint: str) -> list[int | str]:
    if folds is None:
        found = sorted(
            (int(m.group(1)) if m.group(1).isdigit() else m.group(1))
            for p in path.glob("fold_*")
            if (m := re.fullmatch(r"fold_(\d+|all)", p.name)) and (p / checkpoint).is_file()
        )
        if not found:
            raise ModelError(
                f"model folder {path} has no fold_N/{checkpoint}",
                hint="train at least one fold, or pass checkpoint='checkpoint_best.pth' "
                "if only that exists",
            )
        return found
    missing = [f for f in folds if not (path / f"fold_{f}" / checkpoint).is_file()]
    if missing:
        raise ModelError(
            f"model folder {path} lacks {checkpoint} for fold(s) {missing}",
            hint="leave folds unset to use every fold that is there",
        )
    return list(folds)


def _load_checkpoint(file: Path) -> dict[str, Any]:
    try:
        # nnU-Net checkpoints hold plain Python objects besides tensors (init_args), hence
        # weights_only=False; only load model folders you trust, as with nnU-Net itself.
        ckpt = torch.load(file, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ModelError(
            f"cannot read checkpoint {file}: {exc}", hint="the file may be truncated; copy it again"
        ) from None
    if not isinstance(ckpt, dict) or "network_weights" not in ckpt:
        raise ModelError(f"{file} is not an nnU-Net checkpoint (no 'network_weights')")
    return ckpt


def _build_network(config: dict[str, Any], n_classes: int) -> torch.nn.Module:
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    arch = config["architecture"]
    try:
        network: torch.nn.Module = get_network_from_plans(
            arch["network_class_name"],
            arch["arch_kwargs"],
            arch["_kw_requires_import"],
            1,
            n_classes,
            allow_init=False,
            deep_supervision=False,
        )
    except Exception as exc:
        raise ModelError(
            f"cannot build network {arch.get('network_class_name')!r} from plans.json: {exc}",
            hint="is dynamic_network_architectures up to date?",
        ) from None
    return network
