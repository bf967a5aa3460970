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

__all__ = ["add_copick_arguments", "copick_batch_inputs", "run_copick_segment", "write_back"]


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


def copick_batch_inputs(config: Path, voxel_size: float, tomo_type: str, out: Path) -> list[Path]:
    """One input per run that has the tomogram: a link ``out/.copick-inputs/<run>.zarr`` to
    its OME-Zarr folder, so each run gets ``out/<run>/`` and any executor can open it by path
    (filesystem projects only; the links live beside the results, on the same storage)."""
    import cryomamba as cm

    from .errors import ConfigError

    root = cm.copick.open_project(config)
    links = out / ".copick-inputs"
    links.mkdir(parents=True, exist_ok=True)
    inputs: list[Path] = []
    for run in root.runs:
        spacing = run.get_voxel_spacing(voxel_size)
        found = spacing.get_tomograms(tomo_type) if spacing is not None else []
        store = found[0].zarr() if found else None
        folder = getattr(store, "path", None)
        if folder is None or "://" in str(folder):
            continue
        link = links / f"{run.name}.zarr"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(Path(folder).resolve(), target_is_directory=True)
        inputs.append(link)
    if not inputs:
        raise ConfigError(
            f"no run of {config} has a {tomo_type!r} tomogram at {voxel_size} Å on disk",
            hint="check --voxel-size and --tomo-type (cryomamba batch --copick reads "
            "filesystem projects)",
        )
    return inputs


def write_back(items: list[Any], config: Path, voxel_size: float, args: argparse.Namespace) -> int:
    """Each completed run's mask.mrc, streamed into the project as a copick segmentation;
    the number written."""
    import cryomamba as cm

    written = 0
    for item in items:
        if item.state not in ("completed", "skipped"):
            continue
        mask = cm.Volume.open(item.out / "mask.mrc")
        labels = mask.data if mask.dtype.kind == "u" else mask.data.view("uint8")
        names = {int(e["label"]): str(e["name"]) for e in _stats_labels(item.out)}
        name = args.name or (next(iter(names.values())) if len(names) == 1 else args.model)
        cm.copick.write_segmentation(
            config,
            labels,
            run=item.source.name.removesuffix(".zarr"),
            voxel_size=voxel_size,
            name=name,
            user_id=args.user_id,
            session_id=args.session_id,
            label_names=names,
            origin=mask.origin,
        )
        written += 1
    return written


def _stats_labels(folder: Path) -> list[dict[str, Any]]:
    import json

    stats = json.loads((folder / "stats.json").read_text(encoding="utf-8"))
    return [e for e in stats.get("labels", []) if int(e["label"])]
