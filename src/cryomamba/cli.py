"""The `cryomamba` command: segment, info, models, synth and demo.

Results go to stdout; the progress bar, logs and errors to stderr. An error the user can
fix (bad file, option, model or output folder) is one `error:` line plus a `hint:` line and
exit code 2; a job that fails while running exits with 1; Ctrl-C cancels the job cleanly
and exits with 130. `--debug` adds the traceback. A reader that stops early (`| head`)
ends the command quietly.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import math
import os
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from rich import progress as rp
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table
from rich.text import Text

import cryomamba as cm

from .allocator import reuse_freed_memory
from .artifacts import check_output_dir, existing_artifacts
from .config import DEFAULT_FORMATS, FORMATS, RESAMPLE_MODES, TILE_BATCH_OPTION
from .threads import quiet_openmp

__all__ = ["EXIT_CANCELED", "EXIT_FAILED", "EXIT_USAGE", "build_parser", "main"]

log = logging.getLogger(__name__)

EXIT_FAILED, EXIT_USAGE, EXIT_CANCELED = 1, 2, 130
# A job that failed because of its input exits like the same error raised before the job.
_INPUT_CODES = frozenset(
    e.code for e in (cm.InvalidVolumeError, cm.ConfigError, cm.ModelError, cm.OutputError)
) | {"voxel_size_unknown"}


class _UsageError(cm.ConfigError):
    """A command line that argparse rejects."""

    code = "usage"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(message, hint=f"see `{self.prog} --help`")


class _Console(Console):
    def on_broken_pipe(self) -> None:
        """Rich would exit with 1; let `main` end quietly instead (`_reader_gone`)."""
        self.quiet = True
        raise BrokenPipeError(errno.EPIPE, "the reader of the output went away")


class _UI:
    """Where output goes: results to `out`, progress, logs and errors to `err`."""

    def __init__(self, quiet: bool = False) -> None:
        self.out = _Console(highlight=False)
        self.err = _Console(stderr=True, highlight=False)
        self.quiet = quiet


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 0,1, got {text!r}") from None


def _shape(text: str) -> tuple[int, ...]:
    values = _ints(text.lower().replace("x", ","))
    if len(values) != 3 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected three positive sizes Z,Y,X, got {text!r}")
    return values


def _voxel_size(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.lower().replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected Å like 13.48 or 20,10,10, got {text!r}"
        ) from None
    return values if len(values) != 1 else values * 3


def _folds(text: str) -> tuple[int, ...] | None:
    return None if text.strip().lower() == "all" else _ints(text)


def _formats(text: str) -> tuple[str, ...]:
    if text.strip().lower() == "all":
        return FORMATS
    chosen = tuple(dict.fromkeys(p.strip().lower() for p in text.split(",") if p.strip()))
    if not chosen:
        raise argparse.ArgumentTypeError(f"choose some of {','.join(FORMATS)}")
    return chosen


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of `cryomamba` and its commands."""
    common = _Parser(add_help=False)  # accepted before or after the command
    add = common.add_argument
    add("-v", "--verbose", action="count", default=argparse.SUPPRESS, help="log INFO (-vv DEBUG)")
    add("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    parser = _Parser(prog="cryomamba", description=__doc__.splitlines()[0], parents=[common])
    parser.add_argument("--version", action="version", version=f"cryomamba {cm.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, text: str) -> Any:
        p = sub.add_parser(name, parents=[common], help=text, description=text)
        p.set_defaults(run=globals()[f"_cmd_{name}"])
        return p.add_argument

    add = command("segment", "segment a tomogram (MRC/CCP4) and write the results")
    add("input", type=Path, metavar="IN", nargs="?", help="the tomogram (MRC or OME-Zarr)")
    add("-o", "--out", type=Path, help="output folder (required unless --copick)")
    add("--model", default="demo-membrane", help="registered model name or model folder")
    add("--formats", type=_formats, default=DEFAULT_FORMATS, help=f"some of {','.join(FORMATS)}")
    add("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    add("--tile-step", type=float, default=0.5, help="tile step, fraction of a tile (0, 1]")
    add(
        "--tta",
        dest="mirroring",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="mirroring test-time augmentation: 8 flips per tile, 8x slower (default: off)",
    )
    add("--folds", type=_folds, default=None, help="e.g. 0,1 (default: every fold)")
    add("--tile-batch", **TILE_BATCH_OPTION)
    add("--compile", action="store_true", help="torch.compile the network (opt-in; see docs)")
    add(
        "--voxel-size",
        type=_voxel_size,
        default=None,
        metavar="Å",
        help="the tomogram's real voxel size, e.g. 13.48 or Z,Y,X (default: the header's)",
    )
    add(
        "--resample",
        choices=RESAMPLE_MODES,
        default="auto",
        help="auto: resample to the model's voxel size when it differs (default); off: never",
    )
    add("--overwrite", action="store_true", help="replace results already in the output folder")
    add("-q", "--quiet", action="store_true", help="no progress bar or table; print the paths")
    from .cli_copick import add_copick_arguments

    add_copick_arguments(add)

    add = command("batch", "segment many tomograms (paths, globs, folders) on any executor")
    from .batch import add_arguments as add_batch_arguments

    add_batch_arguments(add)
    add("-q", "--quiet", action="store_true", help="no progress display or table")

    add = command("info", "show a tomogram's metadata (from the header)")
    add("input", type=Path, metavar="IN", help="the tomogram")
    add("--json", action="store_true", help="print JSON")

    command("models", "list the registered models")

    add = command("synth", "write a synthetic tomogram (membranes, particles, noise)")
    add("out", type=Path, metavar="OUT.mrc")
    add("--shape", type=_shape, default=(64, 128, 128), help="Z,Y,X (default 64,128,128)")
    add("--seed", type=int, default=0)
    add("--snr", type=float, default=1.0, help="signal-to-noise ratio; inf for none")
    add("--voxel-size", type=float, default=10.0, help="in Å (default 10)")
    add("--labels", type=Path, metavar="LABELS.mrc", help="also write the ground truth labels")

    add = command("demo", "synthesise a tomogram, segment it, and score the result")
    add("-o", "--out", type=Path, default=Path("cryomamba-demo"), help="output folder")
    add("--shape", type=_shape, default=(64, 128, 128), help="Z,Y,X (default 64,128,128)")
    add("--seed", type=int, default=0)
    add("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    add("--model", default="demo-membrane", help=argparse.SUPPRESS)
    add("-q", "--quiet", action="store_true", help="no progress bar or table")

    serve = sub.add_parser(
        "serve",
        parents=[common],
        help="run the server (docs/server.md)",
        description="run the CryoMamba server (same as python -m "
        "cryomamba.serve); every flag has a CRYOMAMBA_SERVER_* variable",
    )
    serve.set_defaults(run=_cmd_serve)
    from .serve import add_server_arguments

    add_server_arguments(serve)

    add = command("token", "mint a bearer token for the server (needs its --data-dir)")
    add("action", choices=["create"], help="create: print a new token")
    add("--data-dir", type=Path, default=Path("cryomamba-data"), help="the server's data folder")
    add("--secret-file", type=Path, default=None, help="the server's --secret-file, if set")
    add("--subject", required=True, help="who the token is for (jobs and files belong to it)")
    add(
        "--scopes",
        default="read,upload,submit",
        help="comma-separated: read, upload, submit, admin (default read,upload,submit)",
    )
    add("--ttl", default="30d", help="lifetime, e.g. 12h or 30d (default 30d)")

    add = command("backup", "snapshot a server's data folder, live (`backup verify B`: check one)")
    add("action", nargs="?", choices=["verify"], help="verify: re-hash backup B")
    add("backup", nargs="?", type=Path, metavar="B", help="with verify: a backup or --to folder")
    add("--data-dir", type=Path, default=Path("cryomamba-data"), help="the server's data folder")
    add("--to", type=Path, metavar="B", help="folder of backups (each in a timestamped folder)")
    add("--keep", type=int, metavar="N", help="then keep only the newest N complete backups")

    from .cli_threshold import add_threshold_command

    add_threshold_command(sub, common)

    add = command("restore", "restore a backup into a new, empty data folder")
    add("backup", type=Path, metavar="B", help="a backup, or a --to folder (its newest backup)")
    add("--data-dir", type=Path, required=True, help="the new data folder (absent or empty)")
    return parser


def _cmd_segment(args: argparse.Namespace, ui: _UI) -> int:
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
        raise _UsageError(
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


def _cmd_batch(args: argparse.Namespace, ui: _UI) -> int:
    from .batch import run

    return run(args, ui.err, ui.out, quiet=ui.quiet)


def _cmd_serve(args: argparse.Namespace, ui: _UI) -> int:
    from .serve import serve

    return serve(args)  # JSON log lines, set up by the server itself (no rich handler)


def _cmd_token(args: argparse.Namespace, ui: _UI) -> int:
    from .server.auth import mint_token, parse_duration
    from .server.settings import ServerSettings, load_secret

    settings = ServerSettings(data_dir=args.data_dir, secret_file=args.secret_file)
    try:
        ttl = parse_duration(args.ttl)
        scopes = [s.strip() for s in args.scopes.split(",") if s.strip()]
        secret = load_secret(settings, create=False)
        token = mint_token(secret, args.subject, scopes, ttl)
    except cm.CryoMambaError:
        raise
    except ValueError as exc:
        raise _UsageError(str(exc), hint="see `cryomamba token --help`") from None
    print(token)
    return 0


def _cmd_backup(args: argparse.Namespace, ui: _UI) -> int:
    from .server import backup

    if args.action == "verify":
        if args.backup is None:
            raise _UsageError("backup verify needs the backup: `cryomamba backup verify B`")
        path = backup.resolve_backup(args.backup)
        manifest, problems = backup.verify_backup(path)
        for problem in problems:
            ui.err.print(escape(problem), soft_wrap=True)
        if problems:
            raise backup.BackupError(
                f"backup {path} is damaged: {len(problems)} problem(s)",
                hint="restore an older backup; take a new one once the cause is fixed",
            )
        files = manifest["files"].values()
        print(f"ok: {path}: {len(files)} files, {sum(f['size'] for f in files)} bytes verified")
        return 0
    if args.backup is not None or args.to is None:
        raise _UsageError(
            "backup needs --to B (or `backup verify B`)",
            hint="cryomamba backup --data-dir D --to B [--keep N]",
        )
    summary = backup.create_backup(args.data_dir, args.to, keep=args.keep)
    for old in summary.removed:
        ui.err.print(f"removed old backup {escape(str(old))}", soft_wrap=True)
    print(summary.path)
    return 0


def _cmd_restore(args: argparse.Namespace, ui: _UI) -> int:
    from .server.backup import restore_backup

    used = restore_backup(args.backup, args.data_dir)
    print(f"restored {used} into {args.data_dir}")
    return 0


def _cmd_info(args: argparse.Namespace, ui: _UI) -> int:
    with cm.Volume.open(args.input) as volume:
        meta = volume.describe()
    if args.json:
        print(json.dumps(_jsonable(meta), indent=2))
        return 0
    table = Table(title=escape(str(args.input)), show_header=False, title_justify="left")
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for key, value in meta.items():
        table.add_row(key.replace("_", " "), _fmt_meta(key, value, meta))
    ui.out.print(table)
    return 0


def _cmd_models(args: argparse.Namespace, ui: _UI) -> int:
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


def _cmd_synth(args: argparse.Namespace, ui: _UI) -> int:
    from .synth import write_mrc

    tomo = _synthesize(args.shape, seed=args.seed, snr=args.snr, voxel_size=args.voxel_size)
    for path in (args.out, args.labels):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
    out, labels = write_mrc(tomo, args.out, labels=args.labels or False)
    shape = " × ".join(map(str, tomo.shape))
    ui.out.print(f"wrote {escape(str(out))} ({shape}, {tomo.voxel_size:g} Å, seed {tomo.seed})")
    if labels is not None:
        ui.out.print(f"wrote {escape(str(labels))} (0 background, 1 membrane, 2 particle)")
    return 0


def _cmd_demo(args: argparse.Namespace, ui: _UI) -> int:
    from .synth import write_mrc

    config = cm.JobConfig(model=args.model, device=args.device)
    spec = cm.resolve_model(config.model)
    membrane = next((v for v, n in spec.labels().items() if n == "membrane"), 1)
    check_output_dir(args.out)
    _check_device(config.device)
    with ui.err.status("synthesising a tomogram…"):
        tomo = _synthesize(args.shape, seed=args.seed, snr=1.0, voxel_size=10.0)
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


def _run_job(ui: _UI, volume: cm.Volume, config: cm.JobConfig) -> cm.Segmentation:
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
    ui: _UI, volume: cm.Volume, config: cm.JobConfig, model: str, out: Path
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


def _synthesize(shape: tuple[int, int, int], **kwargs: Any) -> Any:
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


class _MessageOnly(logging.Formatter):
    """Without --debug, a logged exception shows its message, never its traceback."""

    def format(self, record: logging.LogRecord) -> str:
        return record.getMessage()


@contextlib.contextmanager
def _logging(verbose: int, debug: bool, console: Console) -> Iterator[None]:
    """Log `cryomamba.*` through rich on stderr while a command runs, then put things back."""
    handler = RichHandler(console=console, show_path=False, markup=False, rich_tracebacks=debug)
    if not debug:
        handler.setFormatter(_MessageOnly())
    logger = logging.getLogger("cryomamba")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _report(ui: _UI, exc: BaseException, debug: bool) -> int:
    """Print one `error:` line (and a `hint:` line); return the exit code."""
    if debug:
        ui.err.print(Text("".join(traceback.format_exception(exc))), soft_wrap=True)
    if isinstance(exc, (KeyboardInterrupt, cm.JobCanceledError)):
        ui.err.print("canceled")
        return EXIT_CANCELED
    hint, code = "", EXIT_USAGE
    if isinstance(exc, cm.CryoMambaError):
        message, hint = exc.message, exc.hint
        if isinstance(exc, cm.JobFailedError) and exc.code not in _INPUT_CODES:
            code = EXIT_FAILED
    elif isinstance(exc, MemoryError):
        message = f"out of memory: {exc}" if str(exc) else "out of memory"
        hint = "the input or the requested size is too large for this machine's memory"
    elif isinstance(exc, OSError):
        message = f"{exc.strerror}: {exc.filename}" if exc.strerror and exc.filename else str(exc)
        hint = "check the path" if isinstance(exc, FileNotFoundError) else ""
    else:
        message, code = f"unexpected {type(exc).__name__}: {exc}", EXIT_FAILED
        hint = "this is a bug in CryoMamba; run again with --debug and report the traceback"
    ui.err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    if hint:
        ui.err.print(f"[yellow]hint:[/] {escape(hint)}", soft_wrap=True)
    return code


def main(argv: list[str] | None = None) -> int:
    """Run the command line `argv` (default: sys.argv[1:]) and return the exit code."""
    quiet_openmp()  # before anything loads torch
    reuse_freed_memory()  # before any thread allocates
    ui = _UI()
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help and --version exit 0 from inside argparse
        return exc.code if isinstance(exc.code, int) else 0
    except _UsageError as exc:
        return _report(ui, exc, debug=False)
    ui.quiet = getattr(args, "quiet", False)
    debug = getattr(args, "debug", False)
    if args.run is _cmd_serve:  # the server logs JSON lines its own way (docs/server.md)
        return _cmd_serve(args, ui)
    with _logging(getattr(args, "verbose", 0), debug, ui.err):
        try:
            return args.run(args, ui)
        except BrokenPipeError:
            return _reader_gone()
        except (Exception, KeyboardInterrupt) as exc:
            return _report(ui, exc, debug)


def _reader_gone() -> int:
    """stdout's reader stopped reading (`cryomamba info x.mrc | head`): end quietly, like
    `cat`, with nothing more written there (not even at the interpreter's final flush)."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return 0
