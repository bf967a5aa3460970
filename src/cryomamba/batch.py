"""`cryomamba batch`: a cohort of tomograms through any executor, with one rich progress display.

The command line lives here, beside `cli.py`, which only registers it; the work is
`cohort.segment_many`. Exit codes: 0 when every input completed (or was already complete),
1 when any failed (the summary says which and why), 2 for a usage error, 130 on Ctrl-C
(every job is canceled first).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich import progress as rp
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .cohort import CohortItem, segment_many
from .config import TILE_BATCH_OPTION, JobConfig
from .errors import ConfigError
from .job import JobState

__all__ = ["add_arguments", "run"]


def add_arguments(add: Any) -> None:
    """The flags of `cryomamba batch` (`add` is a parser's `add_argument`)."""
    add("inputs", nargs="*", metavar="IN", help="tomograms, globs ('tomos/*.mrc') or folders")
    add("--copick", type=Path, metavar="CONFIG", help="every run of a copick project instead")
    add("--voxel-size", type=float, help="with --copick: the voxel spacing (Å)")
    add("--tomo-type", help="with --copick: the tomogram type (e.g. wbp)")
    add("--name", help="with --copick: the segmentation's name (default: the model's label)")
    add("--user-id", default="cryomamba", help="with --copick: user/tool id")
    add("--session-id", default="1", help="with --copick: session id")
    add("-o", "--out", type=Path, required=True, help="output folder: OUT/<stem>/, summary.csv")
    add("--model", default="demo-membrane", help="registered model name or model folder")
    add("--executor", default="local", help="local (one after another), dask or remote")
    add(
        "--cluster",
        default=None,
        help="dask: a scheduler address (tcp://host:8786) or 'slurm' (default: a LocalCluster)",
    )
    add("--workers", type=int, default=None, help="dask: LocalCluster CPU workers or SLURM jobs")
    add("--server", default=None, help="remote: the server URL (token from $CRYOMAMBA_TOKEN)")
    add(
        "--executor-option",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="more executor options, e.g. reruns=1 (repeatable)",
    )
    add("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    add("--tile-step", type=float, default=0.5, help="tile step, fraction of a tile (0, 1]")
    add("--tile-batch", **TILE_BATCH_OPTION)
    add("--no-skip", action="store_true", help="redo inputs whose results are already complete")


def _options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if args.executor == "dask":
        options["cluster"] = args.cluster
        if args.workers is not None:
            options["workers"] = args.workers
    elif args.cluster is not None or args.workers is not None:
        raise ConfigError("--cluster and --workers are for --executor dask", hint="drop them")
    if args.server is not None:
        options["server"] = args.server
    for text in args.executor_option:
        key, sep, value = text.partition("=")
        if not sep or not key:
            raise ConfigError(f"--executor-option needs KEY=VALUE, got {text!r}", hint="reruns=1")
        try:
            options[key] = json.loads(value)
        except ValueError:
            options[key] = value
    return options


class _Display:
    """One overall bar and one bar per running job, redrawn from the cohort's items."""

    def __init__(self, progress: rp.Progress) -> None:
        self.progress = progress
        self.overall = progress.add_task("tomograms", total=None)
        self.tasks: dict[int, rp.TaskID] = {}

    def __call__(self, items: list[CohortItem]) -> None:
        done = sum(1 for i in items if i.done)
        failed = sum(1 for i in items if i.state in ("failed", "canceled"))
        label = f"tomograms ({failed} failed)" if failed else "tomograms"
        self.progress.update(self.overall, total=len(items), completed=done, description=label)
        for n, item in enumerate(items):
            running = item.job is not None and item.job.state != JobState.QUEUED
            if running and not item.done and n not in self.tasks:
                self.tasks[n] = self.progress.add_task(f"  {escape(item.source.name)}", total=1.0)
            if n in self.tasks:
                self.progress.update(self.tasks[n], completed=item.fraction)
                if item.done:
                    self.progress.remove_task(self.tasks.pop(n))


def run(args: argparse.Namespace, err: Console, out: Console, quiet: bool = False) -> int:
    """Run `cryomamba batch`; the exit code."""
    config = JobConfig(
        model=args.model, device=args.device, tile_step=args.tile_step, tile_batch=args.tile_batch
    )
    inputs = args.inputs
    if args.copick is not None:
        from .cli_copick import copick_batch_inputs

        if args.voxel_size is None or not args.tomo_type or inputs:
            raise ConfigError(
                "--copick takes --voxel-size and --tomo-type, and no IN",
                hint="cryomamba batch --copick copick.json --voxel-size 10 --tomo-type wbp -o out/",
            )
        inputs = copick_batch_inputs(args.copick, args.voxel_size, args.tomo_type, args.out)
    elif not inputs:
        raise ConfigError(
            "batch needs inputs", hint="give tomograms, globs or folders, or --copick"
        )
    columns = (rp.TextColumn("{task.description}"), rp.BarColumn(), rp.TaskProgressColumn())
    with rp.Progress(*columns, rp.TimeElapsedColumn(), console=err, disable=quiet) as progress:
        items = segment_many(
            inputs,
            config,
            out=args.out,
            executor=args.executor,
            skip_complete=not args.no_skip,
            on_update=_Display(progress),
            **_options(args),
        )
    table = Table("tomogram", "state", "seconds", "error")
    for item in items:
        seconds = "" if item.seconds is None else f"{item.seconds:.1f}"
        state = item.state if item.state != "failed" else f"[red]{item.state}[/]"
        error = f"{item.error_code}: {item.error}" if item.error_code else ""
        table.add_row(escape(item.source.name), state, seconds, escape(error))
    if not quiet:
        out.print(table)
    out.print(f"summary: {escape(str(args.out / 'summary.csv'))}", soft_wrap=True)
    if args.copick is not None:
        from .cli_copick import write_back

        n = write_back(items, args.copick, args.voxel_size, args)
        out.print(f"wrote {n} copick segmentation(s) into {escape(str(args.copick))}")
    failed = [i for i in items if i.state not in ("completed", "skipped")]
    return 1 if failed else 0
