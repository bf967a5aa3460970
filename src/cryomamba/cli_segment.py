"""`cryomamba segment`, `batch` and `demo`: run a job with a progress bar, save and summarise it."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import numpy as np
from rich import progress as rp
from rich.markup import escape
from rich.table import Table

import cryomamba as cm

from .artifacts import check_output_dir, existing_artifacts
from .cli_data import synth_tomogram
from .cli_ui import UI, UsageError

__all__ = ["run_batch", "run_demo", "run_segment"]

log = logging.getLogger(__name__)


def run_segment(args: argparse.Namespace, ui: UI) -> int:
    fields = (
        "model",
        "folds",
        "tile_step",
        "mirroring",
        "device",
        "tile_batch",
        "compile",
        "formats",
        "voxel_size",
        "resample",
    )
    config = cm.JobConfig(**{name: getattr(args, name) for name in fields})
    if args.copick is not None:
        from .cli_copick import run_copick_segment

        seg = run_copick_segment(
            args,
            config,
            lambda volume, cfg: _run_job(ui, volume, cfg),
            lambda result, cfg, out: result.save(out, cfg.formats),
        )
        ui.out.print(f"wrote copick segmentation {escape(str(seg))}", soft_wrap=True)
        return 0
    if args.input is None or args.out is None:
        raise UsageError(
            "segment needs IN and -o/--out (or --copick ...)",
            hint="see `cryomamba segment --help`",
        )
    with cm.Volume.open(args.input) as volume:
        volume.require_tomogram()
        spec = cm.resolve_model(config.model)
        spec.labels()  # a folder that is no model fails now, not after loading torch
        check_output_dir(args.out)
        _check_no_results(args.out, config.formats, args.overwrite)
        _check_device(config.device)
        if not volume.voxel_size_known and config.voxel_size is None:
            log.warning("%s has no voxel size; assuming %s Å", args.input, volume.voxel_size)
        _segment_and_save(ui, volume, config, spec.name, args.out)
    return 0


def _check_device(name: str) -> None:
    """A GPU that is asked for must exist: say so now, not once the job has started."""
    if name.startswith("cuda"):
        from .engine.device import resolve_device

        resolve_device(name)


def _check_no_results(out: Path, formats: tuple[str, ...], overwrite: bool) -> None:
    """Refuse to replace earlier results unless asked to (before inference, not after)."""
    found = existing_artifacts(out, formats)
    if found and not overwrite:
        raise cm.OutputError(
            f"{out} already holds results: {', '.join(p.name for p in found)}",
            hint="pass --overwrite to replace them, or choose another output folder",
        )
    if found:
        log.warning("replacing %s in %s", ", ".join(p.name for p in found), out)


def run_batch(args: argparse.Namespace, ui: UI) -> int:
    from .batch import run

    return run(args, ui.err, ui.out, quiet=ui.quiet)


def run_demo(args: argparse.Namespace, ui: UI) -> int:
    from .synth import write_mrc

    config = cm.JobConfig(model=args.model, device=args.device)
    spec = cm.resolve_model(config.model)
    membrane = next((v for v, n in spec.labels().items() if n == "membrane"), 1)
    check_output_dir(args.out)
    _check_device(config.device)
    with ui.err.status("synthesising a tomogram…"):
        tomo = synth_tomogram(args.shape, seed=args.seed, snr=1.0, voxel_size=10.0)
        args.out.mkdir(parents=True, exist_ok=True)
        tomogram, _ = write_mrc(tomo, args.out / "tomogram.mrc")
    ui.out.print(f"wrote {escape(str(tomogram))} (synthetic, seed {args.seed})")
    with cm.Volume.open(tomogram) as volume:
        result = _segment_and_save(ui, volume, config, spec.name, args.out)
    predicted, truth = np.asarray(result.labels) == membrane, tomo.labels == 1
    total = int(predicted.sum()) + int(truth.sum())
    dice = 2.0 * int((predicted & truth).sum()) / total if total else 1.0
    ui.out.print(f"Dice (membrane vs. ground truth): {dice:.3f}")
    return 0


def _run_job(ui: UI, volume: cm.Volume, config: cm.JobConfig) -> cm.Segmentation:
    """Submit, follow the job with a progress bar and return its result; Ctrl-C cancels it."""
    job = cm.submit(volume, config)
    columns = (rp.TextColumn("{task.description}"), rp.BarColumn(), rp.MofNCompleteColumn())
    times = (rp.TextColumn("tiles"), rp.TimeElapsedColumn(), rp.TimeRemainingColumn())
    try:
        with rp.Progress(*columns, *times, console=ui.err, disable=ui.quiet) as progress:
            _follow(job, progress, progress.add_task("loading model", total=None))
    except KeyboardInterrupt:
        job.cancel()
        ui.err.print("canceling…")
        try:
            job.wait(60)
        except KeyboardInterrupt:
            pass  # a second Ctrl-C: stop waiting
        raise cm.JobCanceledError("canceled") from None
    return job.result()


def _follow(job: cm.Job, progress: rp.Progress, task: rp.TaskID) -> None:
    """Drive the bar from Progress events until the job ends."""
    logged = -1
    try:
        for event in job.events():
            if isinstance(event, cm.Progress) and event.tiles_total:
                done, total = event.tiles_done, event.tiles_total
                progress.update(task, description="segmenting", total=total, completed=done)
                if 10 * done // total > logged:  # a log line every 10 %, for non-terminals
                    logged = 10 * done // total
                    log.info("%d/%d tiles", done, total)
    finally:
        if job.state != cm.JobState.COMPLETED:
            progress.live.transient = True  # a failed or canceled job leaves no bar behind


def _segment_and_save(
    ui: UI, volume: cm.Volume, config: cm.JobConfig, model: str, out: Path
) -> cm.Segmentation:
    """Run the job, write the artifacts into `out`, print what was found and written."""
    result = _run_job(ui, volume, config)
    paths = result.save(out, config.formats)
    if ui.quiet:
        for path in paths.values():
            ui.out.print(escape(str(path)), soft_wrap=True)
        return result
    shape = " × ".join(map(str, volume.shape))
    source = escape(volume.path.name if volume.path else "the volume")
    ui.out.print(f"segmented [bold]{source}[/] ({shape}) with {escape(model)}")
    ui.out.print(escape(_job_summary(result.provenance, config)))
    table = Table("label", "name", "voxels", "volume nm³", "surface nm²", "components")
    for e in result.stats["labels"]:
        numbers = (e["voxel_count"], e["volume_nm3"], e["surface_area_nm2"], e["components"])
        table.add_row(str(e["label"]), escape(e["name"]), *(f"{n:,.0f}" for n in numbers))
    ui.out.print(table if table.row_count else "no foreground: every voxel is background")
    ui.out.print("wrote:")
    for path in paths.values():
        ui.out.print(f"  {escape(str(path))}", soft_wrap=True)
    return result


def _job_summary(provenance: dict[str, Any], config: cm.JobConfig) -> str:
    """How the job ran, from its provenance (the numbers stats.json holds): device,
    precision, tile step, mirroring (TTA) and seconds, model loading included."""
    ran = {**config.to_dict(), **provenance.get("config", {})}
    seconds = provenance.get("seconds")
    parts = [
        f"device {provenance.get('device', config.device)}",
        "fp16" if ran.get("fp16") else "float32",
        f"tile step {ran.get('tile_step', config.tile_step):g}",
        f"mirroring (TTA) {'on' if ran.get('mirroring') else 'off'}",
    ]
    if isinstance(seconds, (int, float)):
        parts.append(f"{seconds:.1f} s")
    return ", ".join(parts)
