"""`cryomamba segment --copick copick.json --run TS_001 --voxel-size 10 --tomo-type wbp`.

The tomogram comes from a copick project and the mask goes back into it as a copick
segmentation (so napari-copick lists it); ``-o`` additionally writes the usual artifacts.
Kept apart from `cli` so that module does not grow.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["add_copick_arguments", "run_copick_segment"]


def add_copick_arguments(add: Callable[..., Any]) -> None:
    """The `segment` options that read from and write to a copick project."""
    add("--copick", type=Path, metavar="CONFIG", help="a copick project's config (.json)")
    add("--run", dest="copick_run", help="with --copick: the run (e.g. TS_001)")
    add("--tomo-type", help="with --copick: the tomogram type (e.g. wbp, denoised)")
    add("--name", help="with --copick: the segmentation's name (default: the model's label)")
    add("--user-id", default="cryomamba", help="with --copick: user/tool id (default cryomamba)")
    add("--session-id", default="1", help="with --copick: session id (default 1)")


def run_copick_segment(
    args: argparse.Namespace,
    config: Any,
    run_job: Callable[[Any, Any], Any],
    save: Callable[[Any, Any, Path], Any],
) -> Any:
    """Segment the run's tomogram at `--voxel-size` (which selects the copick voxel spacing,
    it does not override the voxel size) and write it back; returns the copick segmentation."""
    import cryomamba as cm

    from .errors import ConfigError

    missing = [
        f
        for f, n in (("--run", "copick_run"), ("--tomo-type", "tomo_type"))
        if not getattr(args, n)
    ]
    if args.voxel_size is None:
        missing.append("--voxel-size")
    if missing:
        raise ConfigError(
            f"--copick needs {', '.join(missing)}",
            hint="e.g. --copick copick.json --run TS_001 --voxel-size 10 --tomo-type wbp",
        )
    spacing = float(args.voxel_size[0])
    volume = cm.copick.tomogram(
        args.copick, run=args.copick_run, voxel_size=spacing, tomo_type=args.tomo_type
    )
    names = [n for k, n in cm.resolve_model(config.model).labels().items() if k]
    name = args.name or (names[0] if len(names) == 1 else None)
    if name is None:
        raise ConfigError(
            "name the copick segmentation of a model with several labels",
            hint="--name NAME (it is written as a multilabel segmentation)",
        )
    sink = cm.copick.SegmentationSink(
        args.copick, name=name, user_id=args.user_id, session_id=args.session_id
    )
    result = run_job(volume, config.replace(voxel_size=None))
    if args.out is not None:
        save(result, config, args.out)
    sink.handle(cm.Completed(result=result))
    return sink.segmentation
