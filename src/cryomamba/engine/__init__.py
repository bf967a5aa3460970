"""Streaming nnU-Net v2 inference (DESIGN §4). Imports torch: import it lazily from elsewhere.

`TrainedModel` loads a trained-model folder once; `StreamingPredictor` runs it over volumes of
any size with memory bounded by one slab of tiles.
"""

from __future__ import annotations

from .model import TrainedModel
from .streaming import StreamingPredictor

__all__ = ["StreamingPredictor", "TrainedModel"]
