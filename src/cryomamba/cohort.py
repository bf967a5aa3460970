"""Cohorts: many tomograms through one executor, one output folder per input, a summary table.

`segment_many` is a loop over `submit` (DESIGN §8), the same for every executor: `local`
runs the inputs one after another, `dask` spreads them over the cluster, `remote` sends
them to a server. Each input gets `out/<stem>/` (mask.mrc, stats.json, ...), written all or
nothing by a `FileSink` (the dask workers write there themselves). An input whose folder is
already complete for the same source checksum, model checksum and config is skipped, so a
rerun after a crash does only what is missing. A bad input fails alone; the others go on.
`out/summary.csv` lists every input: tomogram, state, seconds, voxels per label, error code.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import JobConfig
from .errors import ConfigError, CryoMambaError
from .events import Completed, Failed
from .job import TERMINAL_STATES, Job, JobState

__all__ = ["SUFFIXES", "CohortItem", "expand_inputs", "segment_many", "write_summary"]

log = logging.getLogger(__name__)

SUFFIXES = (".mrc", ".map", ".rec", ".st", ".ccp4", ".zarr")  # .zarr: an OME-Zarr folder
"""The files a folder given as input contributes (a glob picks what it matches)."""

_DONE = frozenset({*(s.value for s in TERMINAL_STATES), "skipped"})
# Settings that change neither the mask nor the artifacts: not part of "the same config".
_IGNORED = frozenset({"device", "preview_interval_s", "preview_scale"})


@dataclass
class CohortItem:
    """One input of a cohort: where it goes, its job while it runs, and how it ended."""

    source: Path
    out: Path
    job: Job | None = None
    state: str = "queued"  # a JobState value, or "skipped"
    seconds: float | None = None
    voxels: dict[str, int] = field(default_factory=dict)
    error_code: str = ""
    error: str = ""
    started: float | None = None

    @property
    def done(self) -> bool:
        return self.state in _DONE

    @property
    def fraction(self) -> float:
        if self.done:
            return 1.0
        progress = self.job.last_progress if self.job is not None else None
        return progress.fraction if progress is not None else 0.0


def expand_inputs(inputs: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Paths, globs (`tomos/*.mrc`) and folders (their MRC-like files) → sorted, unique paths."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    found: dict[Path, None] = {}
    for item in inputs:
        text = os.fspath(item)
        path = Path(text)
        if path.is_dir() and path.suffix.lower() != ".zarr":  # a .zarr folder is one tomogram
            matches = sorted(p for p in path.iterdir() if p.suffix.lower() in SUFFIXES)
        elif glob.has_magic(text):
            matches = sorted(Path(p) for p in glob.glob(text, recursive=True))
            if not matches:
                raise ConfigError(f"{text!r} matches no file", hint="check the pattern")
        else:
            matches = [path]  # a missing file fails as its own job, the others go on
        for match in matches:
            found[match] = None
    if not found:
        raise ConfigError("no tomograms to segment", hint="give MRC files, globs or folders")
    return list(found)


def _out_dirs(sources: Sequence[Path], out: Path) -> list[Path]:
    names = [s.stem for s in sources]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise ConfigError(
            f"several inputs would share an output folder: {', '.join(clashes)}",
            hint="give inputs with distinct file names, or run them in separate batches",
        )
    return [out / name for name in names]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def _same_config(ran: dict[str, Any], asked: dict[str, Any], device: str) -> bool:
    """Whether a run recorded as `ran` (on `device`) is what `asked` would produce now.

    Provenance records fp16 as run (autocast, never on a CPU), so on a CPU it is moot."""
    keys = (set(ran) | set(asked)) - _IGNORED
    if not device.startswith("cuda"):
        keys.discard("fp16")
    return all(ran.get(k) == asked.get(k) for k in keys)


def completed_stats(
    out: Path, source: Path, config: JobConfig, model_sha256: str | None
) -> dict[str, Any] | None:
    """The stats.json of a complete earlier run in `out` for the same inputs, else None.

    Complete: every requested artifact is there, and stats.json's provenance names the same
    source checksum, model checksum and config. The source is hashed only when `out`
    already holds a stats.json, so a first run costs no extra read.
    """
    from .artifacts import FORMATS

    stats_path = out / FORMATS["stats"]
    wanted = [out / FORMATS[f] for f in ("stats", *config.formats)]
    if not all(p.is_file() for p in wanted):
        return None
    try:
        stats = json.loads(stats_path.read_text(encoding="utf-8"))
        prov = stats["provenance"]
        same = (
            _same_model(prov["model"], config.model, model_sha256)
            and _same_config(prov["config"], config.to_dict(), str(prov.get("device", "")))
            and prov["source"]["sha256"] == _sha256(source)
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return stats if same else None


def _same_model(recorded: dict[str, Any], model: str, sha256: str | None) -> bool:
    """Same weights (checksum); for a model only a server knows (`remote`), the same name."""
    if sha256 is not None:
        return bool(recorded["sha256"] == sha256)
    return bool(recorded["name"] == model)


def _model_sha256(model: str) -> str | None:
    """The model's checksum, or None when this machine does not have it (a server's model)."""
    from .errors import ModelError
    from .models import resolve_model

    try:
        return resolve_model(model).checksum()
    except ModelError:
        log.info("model %s is not on this machine: finished work is matched by its name", model)
        return None


def _voxels(stats: dict[str, Any]) -> dict[str, int]:
    return {str(e["name"]): int(e["voxel_count"]) for e in stats.get("labels", ())}


def segment_many(
    inputs: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    config: JobConfig | None = None,
    *,
    out: str | os.PathLike[str] = "segs",
    executor: Any = "local",
    skip_complete: bool = True,
    on_update: Callable[[list[CohortItem]], None] | None = None,
    interval_s: float = 0.2,
    **executor_options: Any,
) -> list[CohortItem]:
    """Segment every input into `out/<stem>/`, write `out/summary.csv`, return the items.

    `inputs`: paths, globs or folders. Failures do not raise: they are in the items and the
    summary (check `item.state`). `on_update(items)` is called every `interval_s` while jobs
    run (a progress display). Executor options (e.g. `cluster=`, `server=`) go to the
    executor's factory.
    """
    from .artifacts import check_output_dir
    from .executors.base import get_executor
    from .sinks.file import FileSink

    config = config or JobConfig()
    out = Path(out)
    check_output_dir(out)
    sources = expand_inputs(inputs)
    items = [CohortItem(s, o) for s, o in zip(sources, _out_dirs(sources, out))]
    model_sha = _model_sha256(config.model) if skip_complete else None
    ex = get_executor(executor, **executor_options)
    formats = tuple(dict.fromkeys(("stats", *config.formats)))
    for item in items:
        stats = completed_stats(item.out, item.source, config, model_sha) if skip_complete else None
        if stats is not None:
            item.state, item.voxels = "skipped", _voxels(stats)
            item.seconds = (stats.get("provenance") or {}).get("seconds")
            log.info("%s: already complete in %s, skipped", item.source, item.out)
            continue
        try:
            item.job = ex.submit(item.source, config, [FileSink(item.out, formats)])
        except CryoMambaError as exc:  # refused at submission: this input only
            item.state, item.error_code, item.error = "failed", exc.code, exc.message
    try:
        _follow(items, on_update, interval_s)
    except BaseException:  # Ctrl-C or a bug: nothing keeps running behind the caller's back
        for item in items:
            if item.job is not None and not item.job.done:
                item.job.cancel()
        raise
    write_summary(out / "summary.csv", items)
    return items


def _follow(
    items: list[CohortItem],
    on_update: Callable[[list[CohortItem]], None] | None,
    interval_s: float,
) -> None:
    """Record each job's end as it comes; the display reads the jobs' latest Progress."""
    running = [i for i in items if i.job is not None]
    while True:
        now = time.monotonic()
        for item in running:
            job = item.job
            assert job is not None
            if item.started is None and job.state != JobState.QUEUED:
                item.started = now
            if job.done and not item.done:
                _record(item, job, now)
        running = [i for i in running if not i.done]
        if on_update is not None:
            on_update(items)
        if not running:
            return
        running[0].job.wait(interval_s)  # type: ignore[union-attr]


def _record(item: CohortItem, job: Job, now: float) -> None:
    try:
        job.result(60)  # returns once the sinks are done: the FileSink has written or failed
    except CryoMambaError:
        pass  # a failed or canceled job: its terminal event says which
    event = job.terminal_event
    item.state = JobState(job.state).value
    item.seconds = round(now - (item.started or now), 3)
    if isinstance(event, Completed) and event.result is not None:
        if job.sink_errors:  # the artifacts could not be written
            exc = job.sink_errors[0]
            item.state = "failed"
            item.error_code = getattr(exc, "code", "output_not_writable")
            item.error = getattr(exc, "message", str(exc))
            return
        item.voxels = _voxels(event.result.stats)
        item.seconds = event.result.provenance.get("seconds", item.seconds)
    elif isinstance(event, Failed):
        item.error_code, item.error = event.code, event.message
        log.warning("%s failed: %s (%s)", item.source, event.message, event.code)
    else:
        item.error_code = "canceled"


def write_summary(path: Path, items: Sequence[CohortItem]) -> Path:
    """`summary.csv`: tomogram, state, seconds, voxels_<label>..., error_code, error, out."""
    labels = list(dict.fromkeys(name for item in items for name in item.voxels))
    header = ["tomogram", "state", "seconds", *(f"voxels_{n}" for n in labels)]
    header += ["error_code", "error", "out"]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for item in items:
            counts = [item.voxels.get(n, "" if not item.voxels else 0) for n in labels]
            seconds = "" if item.seconds is None else f"{item.seconds:.3f}"
            writer.writerow(
                [item.source, item.state, seconds, *counts, item.error_code, item.error, item.out]
            )
    os.replace(tmp, path)
    return path
