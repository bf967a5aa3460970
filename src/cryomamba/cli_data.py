"""`cryomamba info`, `models` and `synth`: look at tomograms and models, or make a synthetic one."""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from rich.markup import escape
from rich.table import Table

import cryomamba as cm

from .cli_ui import UI

__all__ = ["run_info", "run_models", "run_synth", "synth_tomogram"]


def run_info(args: argparse.Namespace, ui: UI) -> int:
    with cm.Volume.open(args.input) as volume:
        meta = volume.describe()
    if args.json:
        ui.result(json.dumps(_jsonable(meta), indent=2))
        return 0
    table = Table(title=escape(str(args.input)), show_header=False, title_justify="left")
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for key, value in meta.items():
        table.add_row(key.replace("_", " "), _fmt_meta(key, value, meta))
    ui.out.print(table)
    return 0


def run_models(args: argparse.Namespace, ui: UI) -> int:
    table = Table("name", "labels", "description", "path")
    table.columns[0].no_wrap = True
    table.columns[3].overflow = "fold"
    for spec in cm.available_models():
        try:
            labels = ", ".join(f"{v} {n}" for v, n in sorted(spec.labels().items()) if v)
        except cm.ModelError as exc:
            labels = f"[red]unavailable:[/] {escape(exc.message)}"
        table.add_row(spec.name, labels, escape(spec.description), escape(str(spec.path)))
    ui.out.print(table)
    ui.out.print(
        "A real model: pass an nnU-Net v2 trained-model folder (dataset.json, plans.json, "
        "fold_*/checkpoint_final.pth) as --model PATH, or put such folders under "
        "$CRYOMAMBA_MODELS_DIR to list them here by name.",
        highlight=False,
    )
    return 0


def run_synth(args: argparse.Namespace, ui: UI) -> int:
    from .synth import write_mrc

    tomo = synth_tomogram(args.shape, seed=args.seed, snr=args.snr, voxel_size=args.voxel_size)
    for path in (args.out, args.labels):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
    out, labels = write_mrc(tomo, args.out, labels=args.labels or False)
    shape = " × ".join(map(str, tomo.shape))
    ui.out.print(f"wrote {escape(str(out))} ({shape}, {tomo.voxel_size:g} Å, seed {tomo.seed})")
    if labels is not None:
        ui.out.print(f"wrote {escape(str(labels))} (0 background, 1 membrane, 2 particle)")
    return 0


def synth_tomogram(shape: tuple[int, int, int], **kwargs: Any) -> Any:
    """`synth.synthesize`, with sizes or settings it rejects reported as a ConfigError."""
    from .synth import synthesize

    try:
        return synthesize(shape, **kwargs)
    except cm.CryoMambaError:
        raise
    except ValueError as exc:
        raise cm.ConfigError(str(exc), hint="see `cryomamba synth --help`") from None


def _fmt_meta(key: str, value: Any, meta: dict[str, Any]) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        sep = " × " if all(isinstance(v, (int, float)) for v in value) else "; "
        text = sep.join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
        if key in ("voxel_size", "origin"):
            text += " Å" if meta.get("voxel_size_known", True) else " Å (unknown)"
        return escape(text) or "—"
    return (
        "—" if value is None else f"{value:g}" if isinstance(value, float) else escape(str(value))
    )


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value
