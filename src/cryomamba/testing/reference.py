"""nnU-Net's own predictor, configured the one way we compare against (CPU, no verbosity).

Used by the equality tests, the engine benchmark and the demo model's training script, so
all three measure against the same reference.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

__all__ = ["nnunet_predictor"]


def nnunet_predictor(
    model_dir: str | os.PathLike[str],
    *,
    folds: Sequence[int] = (0,),
    tile_step: float = 0.5,
    mirroring: bool = False,
    checkpoint: str = "checkpoint_final.pth",
    device: str = "cpu",
) -> Any:
    """An initialised `nnUNetPredictor` (on the CPU unless `device` says otherwise; on CUDA
    everything stays on the device, nnU-Net's fastest mode, with its fp16 autocast); call
    `predict_single_npy_array` on it."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(
        tile_step_size=tile_step,
        use_gaussian=True,
        use_mirroring=mirroring,
        device=torch.device(device),
        perform_everything_on_device=torch.device(device).type == "cuda",
        verbose=False,
        verbose_preprocessing=False,
        allow_tqdm=False,
    )
    predictor.initialize_from_trained_model_folder(
        str(model_dir), use_folds=tuple(folds), checkpoint_name=checkpoint
    )
    return predictor
