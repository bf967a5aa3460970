"""CryoMamba: segment cryo-electron tomograms with nnU-Net v2, in-process or on a server.

    import cryomamba as cm
    vol = cm.Volume.open("tomo.mrc")
    result = cm.segment(vol, model="demo-membrane", sinks=[cm.sinks.FileSink("out/")])

Importing this package is cheap: torch, nnU-Net and napari load only when a job runs.
"""

from __future__ import annotations

from . import copick, sinks
from ._version import __version__
from .api import segment, submit
from .cohort import segment_many
from .config import JobConfig
from .errors import (
    ConfigError,
    CryoMambaError,
    InvalidVolumeError,
    JobCanceledError,
    JobFailedError,
    ModelError,
    OutputError,
)
from .events import Canceled, Completed, Event, Failed, Preview, Progress
from .hookspecs import hookimpl
from .job import Job, JobState
from .models import ModelSpec, available_models, resolve_model
from .probabilities import threshold
from .segmentation import Segmentation
from .volume import Volume

__all__ = [
    "Canceled",
    "Completed",
    "ConfigError",
    "CryoMambaError",
    "Event",
    "Failed",
    "InvalidVolumeError",
    "Job",
    "JobCanceledError",
    "JobConfig",
    "JobFailedError",
    "JobState",
    "ModelError",
    "ModelSpec",
    "OutputError",
    "Preview",
    "Progress",
    "Segmentation",
    "Volume",
    "__version__",
    "available_models",
    "copick",
    "hookimpl",
    "resolve_model",
    "segment",
    "segment_many",
    "sinks",
    "submit",
    "threshold",
]
