"""Build small, real nnU-Net v2 trained-model folders (random weights) for tests and benchmarks.

The folder is exactly what nnU-Net's own `nnUNetPredictor.initialize_from_trained_model_folder`
loads, so the same folder can be run by both engines and compared.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["make_model_folder", "plans_for"]

PLAIN_UNET = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
RESENC_UNET = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"


def plans_for(
    patch_size: Sequence[int] = (32, 32, 32),
    features: Sequence[int] = (8, 16, 32),
    spacing: Sequence[float] = (10.0, 10.0, 10.0),
    normalization: str = "ZScoreNormalization",
    *,
    strides: Sequence[Sequence[int]] | None = None,
    kernel_sizes: Sequence[Sequence[int]] | None = None,
    blocks_per_stage: Sequence[int] | None = None,
    transpose: Sequence[int] = (0, 1, 2),
) -> dict[str, Any]:
    """An nnU-Net v2 plans.json with one stage per entry of `features`: a PlainConvUNet, or
    with `blocks_per_stage` a ResidualEncoderUNet (the `nnUNetResEncUNet*Plans` network).
    `strides`/`kernel_sizes` default to 2 and 3 on every axis; `transpose` is the plans'
    `transpose_forward` (`patch_size` and `spacing` are given in that transposed order)."""
    n = len(features)
    arch_kwargs: dict[str, Any] = {
        "n_stages": n,
        "features_per_stage": list(features),
        "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [list(k) for k in kernel_sizes] if kernel_sizes else [[3, 3, 3]] * n,
        "strides": [list(s) for s in strides] if strides else [[1, 1, 1]] + [[2, 2, 2]] * (n - 1),
        **(
            {"n_blocks_per_stage": list(blocks_per_stage)}
            if blocks_per_stage
            else {"n_conv_per_stage": [2] * n}
        ),
        "n_conv_per_stage_decoder": [1 if blocks_per_stage else 2] * (n - 1),
        "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    }
    return {
        "dataset_name": "Dataset900_CryoTest",
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": list(spacing),
        "original_median_shape_after_transp": [64, 128, 128],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": list(transpose),
        "transpose_backward": [list(transpose).index(i) for i in range(3)],
        "configurations": {
            "3d_fullres": {
                "data_identifier": "nnUNetPlans_3d_fullres",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 2,
                "patch_size": list(patch_size),
                "median_image_size_in_voxels": [64, 128, 128],
                "spacing": list(spacing),
                "normalization_schemes": [normalization],
                "use_mask_for_norm": [False],
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": {
                    "is_seg": False,
                    "order": 3,
                    "order_z": 0,
                    "force_separate_z": None,
                },
                "resampling_fn_seg_kwargs": {
                    "is_seg": True,
                    "order": 1,
                    "order_z": 0,
                    "force_separate_z": None,
                },
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": {
                    "is_seg": False,
                    "order": 1,
                    "order_z": 0,
                    "force_separate_z": None,
                },
                "architecture": {
                    "network_class_name": RESENC_UNET if blocks_per_stage else PLAIN_UNET,
                    "arch_kwargs": arch_kwargs,
                    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
                },
                "batch_dice": False,
            }
        },
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            "0": {
                "max": 3.0,
                "mean": 0.0,
                "median": 0.0,
                "min": -3.0,
                "percentile_00_5": -2.5,
                "percentile_99_5": 2.5,
                "std": 1.0,
            }
        },
    }


def make_model_folder(
    path: str | Path,
    *,
    labels: Sequence[str] = ("background", "membrane"),
    folds: Sequence[int] = (0,),
    seed: int = 0,
    patch_size: Sequence[int] = (32, 32, 32),
    features: Sequence[int] = (8, 16, 32),
    spacing: Sequence[float] = (10.0, 10.0, 10.0),
    normalization: str = "ZScoreNormalization",
    mirror_axes: Sequence[int] = (0, 1, 2),
    checkpoint: str = "checkpoint_final.pth",
    **architecture: Any,
) -> Path:
    """Write plans.json, dataset.json and fold_N/<checkpoint> with seeded random weights;
    `architecture` goes to `plans_for` (strides, kernel_sizes, blocks_per_stage, transpose)."""
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    plans = plans_for(patch_size, features, spacing, normalization, **architecture)
    dataset = {
        "channel_names": {"0": "cryo-ET"},
        "labels": {name: i for i, name in enumerate(labels)},
        "numTraining": 1,
        "file_ending": ".nii.gz",
        "name": "CryoTest",
    }
    (path / "plans.json").write_text(json.dumps(plans, indent=2))
    (path / "dataset.json").write_text(json.dumps(dataset, indent=2))
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    for fold in folds:
        torch.manual_seed(seed * 1000 + fold)
        net = get_network_from_plans(
            arch["network_class_name"],
            arch["arch_kwargs"],
            arch["_kw_requires_import"],
            1,
            len(labels),
            deep_supervision=False,
        )
        (path / f"fold_{fold}").mkdir(exist_ok=True)
        torch.save(
            {
                "network_weights": net.state_dict(),
                "trainer_name": "nnUNetTrainer",
                "init_args": {
                    "plans": plans,
                    "configuration": "3d_fullres",
                    "fold": fold,
                    "dataset_json": dataset,
                    "device": "cpu",
                },
                "inference_allowed_mirroring_axes": list(mirror_axes),
                "current_epoch": 0,
            },
            path / f"fold_{fold}" / checkpoint,
        )
    return path
