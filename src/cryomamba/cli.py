"""The `cryomamba` command: segment, info, models, synth and demo.

Results go to stdout; the progress bar, logs and errors to stderr. An error the user can
fix (bad file, option, model or output folder) is one `error:` line plus a `hint:` line and
exit code 2; a job that fails while running exits with 1; Ctrl-C cancels the job cleanly
and exits with 130. `--debug` adds the traceback. A reader that stops early (`| head`)
ends the command quietly.

This module holds the parser, the logging set-up and the error report; the commands run in
`cli_segment`, `cli_data`, `cli_server`, `cli_threshold` and `cli_copick`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.text import Text

import cryomamba as cm

from .allocator import reuse_freed_memory
from .cli_data import run_info, run_models, run_synth
from .cli_segment import run_batch, run_demo, run_segment
from .cli_server import run_backup, run_restore, run_serve, run_token
from .cli_ui import UI, UsageError
from .config import DEFAULT_FORMATS, FORMATS, RESAMPLE_MODES, TILE_BATCH_OPTION
from .threads import quiet_openmp

__all__ = ["EXIT_CANCELED", "EXIT_FAILED", "EXIT_USAGE", "build_parser", "main"]

EXIT_FAILED, EXIT_USAGE, EXIT_CANCELED = 1, 2, 130
# A job that failed because of its input exits like the same error raised before the job.
_INPUT_CODES = frozenset(
    e.code for e in (cm.InvalidVolumeError, cm.ConfigError, cm.ModelError, cm.OutputError)
) | {"voxel_size_unknown"}
# What each command runs (`threshold` registers its own, in cli_threshold).
_RUNS: dict[str, Callable[[argparse.Namespace, UI], int]] = {
    "segment": run_segment,
    "batch": run_batch,
    "demo": run_demo,
    "info": run_info,
    "models": run_models,
    "synth": run_synth,
    "token": run_token,
    "backup": run_backup,
    "restore": run_restore,
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message, hint=f"see `{self.prog} --help`")


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
        p.set_defaults(run=_RUNS[name])
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
    serve.set_defaults(run=run_serve)
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


def _report(ui: UI, exc: BaseException, debug: bool) -> int:
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
    ui = UI()
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help and --version exit 0 from inside argparse
        return exc.code if isinstance(exc.code, int) else 0
    except UsageError as exc:
        return _report(ui, exc, debug=False)
    ui.quiet = getattr(args, "quiet", False)
    debug = getattr(args, "debug", False)
    if args.run is run_serve:  # the server logs JSON lines its own way (docs/server.md)
        return run_serve(args, ui)
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
