"""Finishing planes of the rolling slab: divide by the weight sum per fold, take the fold
mean, arg-max, write uint8 labels (nnU-Net's arithmetic, in fp16, in blocks of a few planes)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..errors import CryoMambaError
from .tiling import TileGrid

__all__ = ["FINALIZE_PLANES", "argmax_first", "finalize", "mean_logits"]

FINALIZE_PLANES = 4  # output planes divided and arg-maxed at a time: bounded temporaries
LogitsFn = Callable[[int, torch.Tensor], None]  # (region z0, mean logits (C, n, Y, X))


def finalize(
    logits: torch.Tensor,
    weights: torch.Tensor,
    base: int,
    end: int,
    grid: TileGrid,
    out_region: np.ndarray,
    n_folds: int,
    on_logits: LogitsFn | None = None,
) -> None:
    """Divide, ensemble, arg-max planes [base, end) (padded z) and write the un-padded part;
    `on_logits` gets each block's mean logits (cropped) before its arg-max."""
    (bz, by, bx), (sz, sy, sx) = grid.pad_below, grid.shape
    lo, hi = max(base, bz), min(end, bz + sz)
    for a in range(lo, hi, FINALIZE_PLANES):
        b = min(a + FINALIZE_PLANES, hi)
        pred = mean_logits(logits, weights, a - base, b - base, n_folds)
        pred = pred[:, :, by : by + sy, bx : bx + sx]
        out_region[a - bz : b - bz] = argmax_first(pred).cpu().numpy()
        if on_logits is not None:
            on_logits(a - bz, pred)


def mean_logits(
    logits: torch.Tensor, weights: torch.Tensor, a: int, b: int, n_folds: int
) -> torch.Tensor:
    """Buffer planes a..b divided by the weight sum per fold, then the fold mean (fp16)."""
    w = weights[a:b]
    pred = torch.div(logits[0, :, a:b], w)
    for f in range(1, n_folds):
        pred += torch.div(logits[f, :, a:b], w)
    if n_folds > 1:
        pred /= n_folds
    if torch.any(torch.isinf(pred)):
        raise CryoMambaError(
            "the network produced infinite logits",
            hint="the model may be broken or the input far outside its training range",
            code="numerical_overflow",
        )
    return pred


def argmax_first(pred: torch.Tensor) -> torch.Tensor:
    """`pred.argmax(0)` as uint8 (the first maximum on ties, NaN counted as the maximum), by
    one comparison per class: `torch.argmax` over the class axis took 25-50x longer on CPU
    (docs/engine.md, levers). At most 255 classes."""
    best = pred[0]
    labels = torch.zeros(pred.shape[1:], dtype=torch.uint8, device=pred.device)
    for c in range(1, pred.shape[0]):
        labels.masked_fill_(pred[c] > best, c)
        best = torch.maximum(best, pred[c])  # NaN propagates: caught below
    if pred.is_floating_point() and bool(torch.isnan(best).any()):
        return pred.argmax(0).to(torch.uint8)  # a broken network: torch's own NaN rule
    return labels
