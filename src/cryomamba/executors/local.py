"""The `local` executor: run the streaming engine in this process, one job at a time per executor.

Models are loaded once and kept (a small LRU), so a second volume starts at once. Jobs run
on a worker thread; the caller's thread only reads events.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..config import JobConfig
from ..errors import ConfigError
from ..events import Canceled, Completed, Progress
from ..hookspecs import hookimpl
from ..job import Job, JobState
from ..models import ModelSpec
from ..preview import PreviewBuilder
from ..registry import Registry
from ..segmentation import Segmentation
from ..sources import open_source
from ..volume import Volume
from .base import Executor, failure, is_bug, job_for

__all__ = ["LocalExecutor", "open_source"]

log = logging.getLogger(__name__)


class _ModelCache:
    """Keeps the last few loaded models: (folder, folds, checkpoint, device) → TrainedModel."""

    def __init__(self, size: int = 2) -> None:
        self.size = size
        self._items: OrderedDict[tuple[str, Any, str, str], Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, spec: ModelSpec, config: JobConfig, device: Any) -> Any:
        from ..engine import TrainedModel

        key = (str(spec.path), config.folds, config.checkpoint, str(device))
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        model = TrainedModel.load(
            spec.path, folds=config.folds, checkpoint=config.checkpoint, device=device
        )
        with self._lock:
            self._items[key] = model
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return model


class LocalExecutor:
    """Runs jobs in-process on a worker thread (`max_workers` at a time, 1 by default)."""

    def __init__(self, *, max_workers: int = 1, model_cache_size: int = 2) -> None:
        self._pool = ThreadPoolExecutor(
            max_workers=max_workers, thread_name_prefix="cryomamba-local"
        )
        self._models = _ModelCache(model_cache_size)

    def submit(
        self, source: Any, config: JobConfig, sinks: Sequence[Any] = (), *, job: Job | None = None
    ) -> Job:
        queued: list[Future[None]] = []
        fed: list[Job] = []

        def on_cancel() -> None:
            if queued and queued[0].cancel():  # still queued: it will never start
                fed[0].emit(Canceled())

        if "probabilities" not in config.formats and any(
            "probabilities" in (getattr(s, "formats", None) or ()) for s in sinks
        ):  # a FileSink asks for them: they can only be made while the job runs
            config = config.replace(formats=(*config.formats, "probabilities"))
        fed.append(job_for(job, sinks, on_cancel))
        queued.append(self._pool.submit(self._run, fed[0], source, config))
        return fed[0]

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    # -- one job ----------------------------------------------------------------------------------
    def _run(self, job: Job, source: Any, config: JobConfig) -> None:
        if job.cancel_requested.is_set():
            job.emit(Canceled())
            return
        job.set_state(JobState.RUNNING)
        try:
            result = self._segment(job, source, config)
        except _CanceledSignal:
            job.emit(Canceled())
        except Exception as exc:  # the job must end with an event whatever happens
            if is_bug(exc):
                log.exception("job %s failed", job.id)
            job.emit(failure(exc, io_hint=_IO_HINT))
        else:
            if job.cancel_requested.is_set():
                job.emit(Canceled())
            else:
                job.emit(Completed(result=result))

    def _segment(self, job: Job, source: Any, config: JobConfig) -> Segmentation:
        began = time.monotonic()  # stats.json's `seconds` (and the CLI's): all the job did
        from ..engine import StreamingPredictor
        from ..engine.device import resolve_device
        from ..engine.output import release_pages, temporary_labels
        from ..engine.streaming import Canceled as EngineCanceled
        from ..engine.streaming import eta
        from ..models import resolve_model

        volume = open_source(source)
        volume.require_tomogram()  # an .mrcs image stack is no volume to segment
        spec = resolve_model(config.model)
        device = resolve_device(config.device)
        model = self._models.get(spec, config, device)
        predictor = StreamingPredictor(
            model,
            tile_step=config.tile_step,
            mirroring=config.mirroring,
            tile_batch="auto" if config.tile_batch == "auto" else int(config.tile_batch),
            fp16=config.fp16,
            compile=config.compile,
        )
        spacing = _decide_spacing(volume, model, config)
        labels = temporary_labels(volume.shape)
        preview = PreviewBuilder(labels, config.preview_scale)
        start = time.monotonic()
        # no preview yet: the first comes with the first finished slab, then one per interval
        last_preview = [-math.inf]

        def on_progress(done: int, total: int) -> None:
            job.emit(
                Progress(
                    fraction=done / total,
                    tiles_done=done,
                    tiles_total=total,
                    eta_s=eta(start, done, total),
                )
            )

        def on_planes(z0: int, z1: int) -> None:
            interval = config.preview_interval_s
            now = time.monotonic()
            if interval > 0 and (now - last_preview[0] >= interval or z1 >= volume.shape[0]):
                preview.update(z1)
                job.emit(preview.event())
                last_preview[0] = now
            release_pages(labels, 0, z1)  # finished planes (and those the preview read) leave RAM

        probs = (
            _probability_writer(volume, model, config, job, spacing)
            if ("probabilities" in config.formats)
            else None
        )
        try:
            predictor.predict(
                volume.data,
                out=labels,
                on_progress=on_progress,
                on_planes=on_planes,
                cancel=job.cancel_requested,
                release=volume.release,
                spacing=spacing.engine_spacing,
                scan=probs[1] if probs else None,
                on_logits=probs[0] if probs else None,
            )
        except BaseException as exc:
            if probs:
                shutil.rmtree(probs[2].parent, ignore_errors=True)
            if isinstance(exc, EngineCanceled):
                raise _CanceledSignal from None
            raise
        if probs:
            probs[0].close()
        provenance = {
            "model": {
                "name": spec.name,
                "path": str(spec.path),
                "sha256": spec.checksum(),
                "folds": list(model.folds),
            },
            # as run: fp16 says whether autocast was used (never on a CPU), not what was asked
            "config": {**config.to_dict(), "fp16": predictor.autocast},
            "device": str(device),
            "source": {
                "path": str(volume.path) if volume.path else None,
                "sha256": volume.checksum(),
                "shape": list(volume.shape),
                **({"copick": cp} if (cp := getattr(volume, "copick", None)) else {}),
            },
            "spacing": spacing.to_dict(),
            "seconds": round(time.monotonic() - began, 3),
        }
        result = Segmentation(
            labels=labels,
            # an override is the true voxel size: the mask and its statistics carry it
            voxel_size=spacing.voxel_size if spacing.source == "override" else volume.voxel_size,
            origin=volume.origin,
            label_names=model.label_names,
            provenance=provenance,
            image=volume.data,
            header=volume.header,
        )
        if probs:
            result.probabilities = probs[2]
            weakref.finalize(result, shutil.rmtree, probs[2].parent, True)
        return result


def _probability_writer(
    volume: Volume, model: Any, config: JobConfig, job: Job, spacing: Any
) -> tuple[Any, Any, Path]:
    """A `ProbabilityWriter` in a temporary folder (removed with the result), and the
    intensity scan whose bounding box tells it where the engine's crop lies."""
    from ..engine.normalize import scan_intensities
    from ..probabilities import ProbabilityWriter

    if tuple(model.transpose_forward) != (0, 1, 2):
        raise ConfigError(
            "probability maps need a model that keeps the z, y, x axis order "
            f"(this one's transpose_forward is {list(model.transpose_forward)})",
            hint="leave 'probabilities' out of the formats for this model",
        )
    scan = scan_intensities(volume.data, release=volume.release, cancel=job.cancel_requested)
    folder = Path(
        tempfile.mkdtemp(prefix="cryomamba-probs-", dir=os.environ.get("CRYOMAMBA_TMPDIR"))
    )
    path = folder / "probabilities.zarr"
    writer = ProbabilityWriter(
        path,
        volume.shape,
        model.num_classes,
        voxel_size=spacing.voxel_size if spacing.source == "override" else volume.voxel_size,
        origin=volume.origin,
        label_names=model.label_names,
        bbox=scan.bbox,
    )
    return writer, scan, path


_IO_HINT = (
    "check that the file exists and is readable, and that the temporary folder "
    "($CRYOMAMBA_TMPDIR or the system's) has space"
)


class _CanceledSignal(Exception):
    pass


def _decide_spacing(volume: Volume, model: Any, config: JobConfig) -> Any:
    """The job's voxel size and whether it resamples (`cryomamba.spacing`); may refuse."""
    from ..spacing import decide_spacing

    return decide_spacing(
        voxel_size=volume.voxel_size,
        voxel_size_known=volume.voxel_size_known,
        from_file=volume.path is not None,
        model_voxel_size=model.spacing_zyx,
        override=config.voxel_size,
        resample=config.resample,
        name=volume.path.name if volume.path is not None else "the array",
    )


@hookimpl
def cryomamba_register_executors(registry: Registry[Callable[..., Executor]]) -> None:
    registry.add("local", LocalExecutor)
