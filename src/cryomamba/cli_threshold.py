"""`cryomamba threshold`: a new mask from a probability map, without running the model again."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

__all__ = ["add_threshold_command", "run_threshold"]

_WRITERS = {".mrc": "mrc", ".zarr": "zarr", ".nrrd": "nrrd", ".gz": "nifti"}


def add_threshold_command(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register `threshold` on the `cryomamba` parser's subcommands."""
    text = "re-threshold a probabilities.zarr into a new mask (and print its stats)"
    p = sub.add_parser("threshold", parents=[common], help=text, description=text)
    p.set_defaults(run=run_threshold)
    p.add_argument("input", type=Path, metavar="PROBS", help="a probabilities.zarr")
    p.add_argument("--label", default=None, help="label name or value (optional with one label)")
    p.add_argument("--at", type=float, default=0.5, help="keep voxels with p > AT (default 0.5)")
    p.add_argument(
        "-o", "--out", type=Path, required=True, help="the mask: .mrc, .zarr, .nrrd or .nii.gz"
    )


def run_threshold(args: argparse.Namespace, ui: Any) -> int:
    """Threshold, write the mask beside its stats (``<name>.stats.json``), print a summary."""
    from .artifacts import save_artifacts, write_stats_json
    from .errors import ConfigError
    from .probabilities import threshold

    out: Path = args.out
    kind = _WRITERS.get(out.suffix.lower())
    if kind is None or (kind == "nifti" and not out.name.lower().endswith(".nii.gz")):
        raise ConfigError(
            f"cannot tell the mask format from {out.name!r}",
            hint="end the output name in .mrc, .zarr, .nrrd or .nii.gz",
        )
    result = threshold(args.input, label=args.label, at=args.at)
    staged = save_artifacts(
        out.parent / f".{out.name}.d",
        result.labels,
        voxel_size=result.voxel_size,
        origin=result.origin,
        formats=[kind],
        label_names=result.label_names,
    )
    if out.is_dir():
        _swap_dir(staged[kind], out)
    else:
        staged[kind].replace(out)
    staged[kind].parent.rmdir()
    stats = {**result.stats, "provenance": result.provenance}
    stats_path = out.with_name(out.name.split(".")[0] + ".stats.json")
    write_stats_json(stats_path, stats)
    rows = {e["name"]: e["voxel_count"] for e in result.stats.get("labels", [])}
    # soft_wrap: a long path must not be wrapped inside the JSON string; no markup: "[...]"
    summary = json.dumps({"mask": str(out), "stats": str(stats_path), "voxels": rows})
    ui.result(summary)
    return 0


def _swap_dir(new: Path, old: Path) -> None:
    import shutil

    trash = old.with_name(f".{old.name}.old")
    old.replace(trash)
    new.replace(old)
    shutil.rmtree(trash, ignore_errors=True)
