"""copick projects: read a run's tomogram, write the mask back as a copick segmentation.

Everything goes through copick's own API (``copick.from_file``, runs, voxel spacings,
tomograms, ``new_segmentation``), so copick, napari-copick and the portal's tools list what
we write. The tomogram opens lazily like any OME-Zarr (`volume_zarr`); the segmentation is
written slab by slab into the store copick hands out (`zarr_write`), never as one array.

copick is imported inside the functions (extra ``copick``), never by ``import cryomamba``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

from .errors import ConfigError, InvalidVolumeError, OutputError
from .events import Completed, Event
from .volume_zarr import ZarrVolume, open_ome_zarr

__all__ = ["SegmentationSink", "open_project", "tomogram", "write_segmentation"]

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _root_logging_kept() -> Iterator[None]:
    """copick's modules call ``logging.basicConfig(force=True)`` when imported, replacing the
    root logger's handlers with a Rich handler on stdout at INFO; put ours back afterwards so
    an application's logging (and the CLI's stdout) is left as it was."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def open_project(config: str | os.PathLike[str]) -> Any:
    """The copick root of a project config, or a `ConfigError` saying what is wrong."""
    with _root_logging_kept():
        return _open_project(config)


def _open_project(config: str | os.PathLike[str]) -> Any:
    try:
        import copick
    except ImportError:
        raise ConfigError(
            "copick projects need the copick package",
            hint="pip install 'cryomamba[copick]'",
            code="missing_dependency",
        ) from None
    path = os.fspath(config)
    if not os.path.isfile(path):
        raise ConfigError(f"copick config {path} does not exist", hint="give the project's .json")
    try:
        return copick.from_file(path)
    except Exception as exc:  # pydantic / JSON errors: the file is not a copick config
        raise ConfigError(
            f"{path} is not a copick config: {str(exc).splitlines()[0]}",
            hint="see copick's docs for the filesystem config (config_type, overlay_root, ...)",
        ) from None


def _run(root: Any, name: str) -> Any:
    run = root.get_run(name)
    if run is None:
        names = [r.name for r in root.runs][:20]
        raise ConfigError(f"the copick project has no run {name!r}", hint=f"runs: {names}")
    return run


def tomogram(
    config: str | os.PathLike[str],
    *,
    run: str,
    voxel_size: float,
    tomo_type: str,
    level: int = 0,
) -> ZarrVolume:
    """A run's tomogram at `voxel_size` (Å) of type `tomo_type`, opened lazily as a `Volume`.

    The volume remembers where it came from (`volume.copick`), so `SegmentationSink` can
    write the mask back to the same run and voxel spacing without being told again.
    """
    root = open_project(config)
    the_run = _run(root, run)
    spacing = the_run.get_voxel_spacing(voxel_size)
    if spacing is None:
        have = sorted(v.voxel_size for v in the_run.voxel_spacings)
        raise ConfigError(
            f"run {run!r} has no voxel spacing {voxel_size} Å", hint=f"voxel spacings: {have}"
        )
    found = spacing.get_tomograms(tomo_type)
    if len(found) > 1:  # the portal can hold several of a type (e.g. other processing)
        log.warning(
            "run %s has %d %r tomograms at %s Å; using the first",
            run,
            len(found),
            tomo_type,
            voxel_size,
        )
    tomo = found[0] if found else None
    if tomo is None:
        have_types = sorted(t.tomo_type for t in spacing.tomograms)
        raise ConfigError(
            f"run {run!r} at {voxel_size} Å has no {tomo_type!r} tomogram",
            hint=f"tomogram types: {have_types}",
        )
    volume = open_ome_zarr(tomo.zarr(), level=level)
    volume.location = f"copick:{os.fspath(config)}#{run}/{voxel_size}/{tomo_type}"
    volume.copick = {
        "config": os.fspath(config),
        "run": run,
        "voxel_size": float(voxel_size),
        "tomo_type": tomo_type,
    }
    return volume


def write_segmentation(
    config: str | os.PathLike[str],
    labels: Any,
    *,
    run: str,
    voxel_size: float,
    name: str,
    user_id: str,
    session_id: str,
    is_multilabel: bool | None = None,
    label_names: dict[int, str] | None = None,
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> Any:
    """Create (or replace) a copick segmentation and stream `labels` into its store.

    Binary when the labels are 0/1 (`is_multilabel` None and at most one label name), so
    `name` must then be a pickable object of the project; multilabel otherwise (values as
    the model's labels).
    """
    from .zarr_write import write_ome_zarr_labels

    root = open_project(config)
    the_run = _run(root, run)
    names = {k: v for k, v in (label_names or {}).items() if k}
    multilabel = len(names) > 1 if is_multilabel is None else is_multilabel
    objects = [o.name for o in root.config.pickable_objects]
    if not multilabel and name not in objects:
        raise ConfigError(
            f"a binary copick segmentation is named after a pickable object; {name!r} is not one",
            hint=f"use one of {objects}, or add {name!r} to the project's pickable_objects",
        )
    try:
        seg = the_run.new_segmentation(
            voxel_size=float(voxel_size),
            name=name,
            session_id=session_id,
            is_multilabel=multilabel,
            user_id=user_id,
            exist_ok=True,
        )
    except ValueError as exc:
        raise ConfigError(f"copick refused the segmentation: {exc}") from None
    vs = float(seg.voxel_size)
    write_ome_zarr_labels(
        seg.zarr(),
        labels,
        voxel_size=(vs, vs, vs),
        origin=origin,
        label_names=names,
        levels=1,  # what copick writes for segmentations
    )
    log.info("wrote copick segmentation %s", seg)
    return seg


class SegmentationSink:
    """On `Completed`, write the mask into a copick project as a segmentation.

    `run` and `voxel_size` default to those of the tomogram the job read (`tomogram`).
    """

    def __init__(
        self,
        config: str | os.PathLike[str],
        *,
        name: str,
        user_id: str,
        session_id: str,
        run: str | None = None,
        voxel_size: float | None = None,
        is_multilabel: bool | None = None,
    ) -> None:
        open_project(config)  # refuse a bad project now, not after hours of inference
        self.config = os.fspath(config)
        self.name, self.user_id, self.session_id = name, user_id, session_id
        self.run, self.voxel_size, self.is_multilabel = run, voxel_size, is_multilabel
        self.segmentation: Any = None

    def handle(self, event: Event) -> None:
        if not isinstance(event, Completed) or event.result is None:
            return
        result = event.result
        source = result.provenance.get("source", {}).get("copick") or {}
        run = self.run or source.get("run")
        voxel_size = self.voxel_size or source.get("voxel_size")
        if run is None or voxel_size is None:
            raise OutputError(
                "SegmentationSink needs the copick run and voxel size",
                hint="pass run= and voxel_size=, or segment cm.copick.tomogram(...)",
                code="copick_target_unknown",
            )
        if abs(float(voxel_size) - result.voxel_size[0]) > 1e-3 * float(voxel_size):
            raise InvalidVolumeError(
                f"the mask's voxel size {result.voxel_size} Å is not the copick spacing "
                f"{voxel_size} Å",
                hint="segment that voxel spacing's tomogram, or pass its voxel_size",
            )
        self.segmentation = write_segmentation(
            self.config,
            result.labels,
            run=run,
            voxel_size=float(voxel_size),
            name=self.name,
            user_id=self.user_id,
            session_id=self.session_id,
            is_multilabel=self.is_multilabel,
            label_names=result.label_names,
            origin=result.origin,
        )

    def __repr__(self) -> str:
        return f"SegmentationSink({self.config!r}, name={self.name!r})"
