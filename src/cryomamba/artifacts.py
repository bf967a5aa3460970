"""Write a segmentation to disk: mask.mrc, mask.nii.gz, mask.nrrd, stats.json, overview.png.

Arrays are ZYX in memory; voxel size and origin are (z, y, x) in Å.

- **MRC** keeps the source's geometry so mask and tomogram overlay in any viewer: same
  voxel size (``mrc.voxel_size`` takes x, y, z), origin (``header.origin``, Å) and, with
  ``header_like``, ``n[xyz]start``. Labels 0..127 are written as **mode 0**: MRC2014 says
  mode 0 is signed int8, IMOD reads it unsigned, and for 0..127 both agree. A label above
  127 makes the file **mode 6** (uint16): twice the size, read the same everywhere.
- **NIfTI-1** and **NRRD** use **micrometres** (1 Å = 1e-4 µm, so a 10 Å voxel is
  0.001 µm): NIfTI can only say metre, mm or micron, and mm would make it 1e-6 mm.
  NIfTI indexes (i, j, k) = (x, y, z), so the array is written transposed; the affine is
  diagonal with the origin as translation, ``xyzt_units`` micron, qform/sform "aligned",
  intent "label". NRRD has x as its fastest axis (pynrrd ``index_order='F'`` on the
  transposed array; read with ``index_order='C'`` to get ZYX), diagonal ``space
  directions``, ``space origin``, ``space units`` "microns", gzip encoding.
- **overview.png**: central XY, XZ and YZ slices side by side with the labels overlaid and
  a legend; drawn by `overview.py` (its docstring says how it is scaled and coloured).

`save_artifacts` is all or nothing: each file is written under a temporary name in the
output folder and renamed into place once all are complete; on any error the files of
that call (temporary or already renamed) are removed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._version import __version__
from .config import ARTIFACT_FILES, DEFAULT_FORMATS
from .errors import InvalidVolumeError, OutputError
from .mrc_write import write_mrc_volume
from .overview import write_overview_png
from .preview import check_label_array
from .stats import check_voxel_size, label_stats

__all__ = [
    "FORMATS",
    "check_output_dir",
    "existing_artifacts",
    "save_artifacts",
    "write_mrc",
    "write_nifti",
    "write_nrrd",
    "write_overview_png",
    "write_stats_json",
]

logger = logging.getLogger(__name__)

FORMATS: dict[str, str] = ARTIFACT_FILES
"""Artifact format name → file name inside the output folder (defined in `config`)."""

_ANGSTROM_TO_MICRON = 1e-4
_CHUNK_PLANES = 32
_TMP_PREFIX = ".tmp-"


def _origin3(origin: Sequence[float] | None) -> tuple[float, float, float]:
    """Return `origin` as three finite floats (z, y, x) in Å; None means (0, 0, 0)."""
    if origin is None:
        return (0.0, 0.0, 0.0)
    values = tuple(float(v) for v in origin)
    if len(values) != 3 or not all(math.isfinite(v) for v in values):
        raise ValueError(f"origin must be three finite numbers (z, y, x) in Å, got {origin!r}")
    return values


def _label_range(labels: Any) -> tuple[int, int]:
    """Return the (min, max) label value, read in z-chunks; refuse values outside 0..65535."""
    lo, hi = 0, 0
    for i, z0 in enumerate(range(0, labels.shape[0], _CHUNK_PLANES)):
        block = np.asarray(labels[z0 : z0 + _CHUNK_PLANES])
        if block.size:
            bmin, bmax = int(block.min()), int(block.max())
            lo, hi = (bmin, bmax) if i == 0 else (min(lo, bmin), max(hi, bmax))
    if lo < 0 or hi > np.iinfo(np.uint16).max:
        raise InvalidVolumeError(
            f"label values must be in 0..65535, found {lo}..{hi}",
            hint="labels are class indices; negative or huge values mean a wrong array",
        )
    return lo, hi


def _label_dtype(labels: Any) -> np.dtype:
    """uint8 when the labels fit (no scan needed for uint8 input), else uint16."""
    fits = labels.dtype == np.uint8 or _label_range(labels)[1] <= 255
    return np.dtype(np.uint8 if fits else np.uint16)


def write_mrc(
    path: str | os.PathLike[str],
    labels: np.ndarray,
    *,
    voxel_size: Sequence[float],
    origin: Sequence[float] | None = None,
    header_like: Any = None,
) -> Path:
    """Write labels as MRC (mode 0, or 6 above 127) with the source's voxel size and origin.

    Written by `write_mrc_volume`: in z-chunks, header stats computed on the way.
    """
    check_label_array(labels)
    vs = check_voxel_size(voxel_size)
    if origin is None and header_like is not None:
        o = header_like.origin
        origin = (float(o.z), float(o.y), float(o.x))
    org = _origin3(origin)
    hi = _label_range(labels)[1]
    nstart = None
    if header_like is not None:
        nstart = tuple(int(header_like[f]) for f in ("nzstart", "nystart", "nxstart"))
    return write_mrc_volume(
        path,
        labels,
        dtype=np.int8 if hi <= 127 else np.uint16,  # mode 0, or 6 above 127
        voxel_size=vs,
        origin=org,
        nstart=nstart,
        label=f"cryomamba {__version__}: segmentation mask, labels 0..{hi}",
    )


def _affine_micron(vs: tuple[float, ...], org: tuple[float, ...]) -> np.ndarray:
    """4x4 affine for (x, y, z) indices: diagonal spacing and origin translation in µm."""
    affine = np.eye(4)
    affine[0, 0], affine[1, 1], affine[2, 2] = (v * _ANGSTROM_TO_MICRON for v in vs[::-1])
    affine[:3, 3] = [o * _ANGSTROM_TO_MICRON for o in org[::-1]]
    return affine


def write_nifti(
    path: str | os.PathLike[str],
    labels: np.ndarray,
    *,
    voxel_size: Sequence[float],
    origin: Sequence[float] | None = None,
) -> Path:
    """Write labels as NIfTI-1 (x, y, z index order, spacing and origin in µm, label intent)."""
    import nibabel as nib

    check_label_array(labels)
    vs, org = check_voxel_size(voxel_size), _origin3(origin)
    affine = _affine_micron(vs, org)
    img = nib.Nifti1Image(np.asarray(labels).T, affine, dtype=_label_dtype(labels))
    img.set_sform(affine, code="aligned")
    img.set_qform(affine, code="aligned")
    img.header.set_xyzt_units(xyz="micron")
    img.header.set_intent("label")
    img.header["descrip"] = f"cryomamba {__version__} segmentation mask".encode()[:80]
    nib.save(img, os.fspath(path))
    return Path(path)


def write_nrrd(
    path: str | os.PathLike[str],
    labels: np.ndarray,
    *,
    voxel_size: Sequence[float],
    origin: Sequence[float] | None = None,
) -> Path:
    """Write labels as gzip NRRD with x fastest, spacing and origin in µm."""
    import nrrd

    check_label_array(labels)
    vs, org = check_voxel_size(voxel_size), _origin3(origin)
    affine = _affine_micron(vs, org)
    header = {
        "space dimension": 3,
        "space directions": affine[:3, :3],
        "space origin": affine[:3, 3],
        "space units": ["microns"] * 3,
        "kinds": ["domain"] * 3,
        "encoding": "gzip",
        "content": f"cryomamba {__version__} segmentation mask",
    }
    data = np.asarray(labels).astype(_label_dtype(labels), copy=False).T  # (x, y, z), x fastest
    nrrd.write(os.fspath(path), data, header, index_order="F")
    return Path(path)


def write_stats_json(path: str | os.PathLike[str], stats: Mapping[str, Any]) -> Path:
    """Write a stats dict as strict, indented JSON (numpy scalars and arrays converted)."""

    def convert(obj: Any) -> Any:
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
        if isinstance(obj, (Path, os.PathLike)):
            return os.fspath(obj)
        if isinstance(obj, (set, frozenset)):
            return sorted(obj, key=repr)
        raise TypeError(f"stats value of type {type(obj).__name__} is not JSON serialisable")

    text = json.dumps(stats, indent=2, default=convert, allow_nan=False)
    Path(path).write_text(text + "\n", encoding="utf-8")
    return Path(path)


def check_output_dir(folder: str | os.PathLike[str]) -> None:
    """Fail early, before hours of inference, if `folder` cannot become a writable folder.

    Proves it the only sure way: creates the missing folders and a probe file in the last,
    then removes both, so the file system is left as it was (a permission check alone
    passes for root in /proc, where nothing can be created). `save_artifacts` probes again.
    """
    out = Path(folder)
    target = out.absolute()
    existing = _nearest_existing(target)
    if not existing.is_dir():
        raise OutputError(
            f"cannot write into output folder {out}: {existing} is a file, not a folder",
            hint="choose another output folder",
        )
    chain = [target, *target.parents]
    missing = chain[: chain.index(existing)][::-1]  # to create, outermost first
    created: list[Path] = []
    try:
        for part in missing:
            if _mkdir_racing(part):
                created.append(part)
        fd, probe = tempfile.mkstemp(prefix=f"{_TMP_PREFIX}probe-", dir=target)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        verb = "create" if len(created) < len(missing) else "write into"
        raise OutputError(
            f"cannot {verb} output folder {out}: {exc.strerror or exc}",
            hint="choose a folder you can write to, or fix its permissions",
        ) from None
    finally:
        for part in reversed(created):
            with contextlib.suppress(OSError):
                part.rmdir()


_RACE_RETRIES = 20


def _nearest_existing(path: Path) -> Path:
    """`path` or its nearest existing ancestor. A folder that vanishes while we look (another
    job's probe removing the parent it made) sends the walk round again."""
    for _ in range(_RACE_RETRIES):
        existing = path
        while not existing.exists() and existing.parent != existing:
            existing = existing.parent
        if existing.is_dir() or existing.exists():
            return existing
    return existing


def _mkdir_racing(folder: Path) -> bool:
    """mkdir that tolerates other jobs making sibling outputs at the same moment: True if we
    created `folder`, False if it appeared meanwhile (then it is not ours to remove)."""
    for _ in range(_RACE_RETRIES):
        try:
            folder.mkdir()
            return True
        except FileExistsError:
            if folder.is_dir():
                return False
            if folder.exists():
                raise
        except FileNotFoundError:  # another job's probe removed the parent it had made
            with contextlib.suppress(FileNotFoundError):
                folder.parent.mkdir(parents=True, exist_ok=True)
    folder.mkdir()  # still racing after all the retries: let the error speak
    return True


def existing_artifacts(folder: str | os.PathLike[str], formats: Iterable[str]) -> list[Path]:
    """The files among `formats`' artifacts that already exist in `folder` (would be replaced)."""
    out = Path(folder)
    return [out / FORMATS[f] for f in _check_formats(formats) if (out / FORMATS[f]).exists()]


def _prepare_dir(out_dir: str | os.PathLike[str]) -> Path:
    """Create `out_dir` if needed and prove it writable with a probe file, or raise OutputError."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f"{_TMP_PREFIX}probe-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(
            f"cannot write into output folder {out}: {exc}",
            hint="choose a folder you can write to, or fix its permissions",
        ) from exc
    return out


def _check_formats(formats: Iterable[str]) -> list[str]:
    """Return the requested format names without duplicates, or raise ValueError."""
    if isinstance(formats, str):
        formats = [formats]
    chosen = list(dict.fromkeys(formats))
    unknown = [f for f in chosen if f not in FORMATS]
    if unknown:
        raise ValueError(
            f"unknown artifact format(s) {', '.join(map(repr, unknown))}; "
            f"valid: {', '.join(FORMATS)}"
        )
    return chosen


def _replace(tmp: Path, final: Path) -> None:
    """Rename `tmp` over `final`; a folder (zarr) already there is moved aside, then removed."""
    if tmp.is_dir() and final.is_dir():
        old = final.with_name(f"{_TMP_PREFIX}old-{secrets.token_hex(4)}-{final.name}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def _remove(path: Path) -> None:
    """Delete a written artifact: a file, or a zarr folder."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def save_artifacts(
    out_dir: str | os.PathLike[str],
    labels: np.ndarray,
    *,
    voxel_size: Sequence[float],
    origin: Sequence[float] | None = None,
    formats: Iterable[str] = DEFAULT_FORMATS,
    stats: Mapping[str, Any] | None = None,
    image: np.ndarray | None = None,
    provenance: Mapping[str, Any] | None = None,
    label_names: Mapping[int, str] | None = None,
    header_like: Any = None,
    probabilities: str | os.PathLike[str] | None = None,
) -> dict[str, Path]:
    """Write the requested artifacts into `out_dir`, all or nothing; return format → path.

    stats.json holds `stats` (computed with `label_stats` when None) plus `provenance`.
    `mask.zarr` is written slab by slab (`zarr_write`); `probabilities.zarr` is a copy of
    the `probabilities` folder the engine streamed during the job.
    """
    chosen = _check_formats(formats)
    if "probabilities" in chosen and probabilities is None:
        raise OutputError(
            "probability maps were not computed for this job",
            hint="ask for them before it runs: formats=[..., 'probabilities'] in the job config "
            "(or --formats ...,probabilities); they cost 2 bytes per voxel per label",
            code="probabilities_not_computed",
        )
    check_label_array(labels)
    vs = check_voxel_size(voxel_size)
    out = _prepare_dir(out_dir)
    if "mrc" in chosen and shutil.disk_usage(out).free < math.prod(labels.shape):
        raise OutputError(
            f"not enough free space in {out} for a {math.prod(labels.shape)}-byte mask",
            hint="free some space or choose another output folder",
        )
    token = secrets.token_hex(4)
    temps: dict[str, Path] = {}
    placed: list[Path] = []
    try:
        for fmt in chosen:
            temps[fmt] = tmp = out / f"{_TMP_PREFIX}{token}-{FORMATS[fmt]}"
            start = time.perf_counter()
            if fmt == "mrc":
                write_mrc(tmp, labels, voxel_size=vs, origin=origin, header_like=header_like)
            elif fmt == "nifti":
                write_nifti(tmp, labels, voxel_size=vs, origin=origin)
            elif fmt == "nrrd":
                write_nrrd(tmp, labels, voxel_size=vs, origin=origin)
            elif fmt == "zarr":
                from .zarr_write import write_ome_zarr_labels

                org = _origin3(origin)
                write_ome_zarr_labels(
                    tmp, labels, voxel_size=vs, origin=org, label_names=label_names
                )
            elif fmt == "probabilities":
                shutil.copytree(os.fspath(probabilities or ""), tmp)  # None refused above
            elif fmt == "stats":
                if stats is None:
                    stats = label_stats(labels, vs, label_names=label_names)
                payload = dict(stats)
                if provenance is not None or "provenance" not in payload:
                    payload["provenance"] = dict(provenance or {})
                write_stats_json(tmp, payload)
            else:
                write_overview_png(tmp, image, labels, voxel_size=vs, label_names=label_names)
            logger.info("wrote %s in %.2f s", FORMATS[fmt], time.perf_counter() - start)
        result: dict[str, Path] = {}
        for fmt, tmp in temps.items():
            result[fmt] = out / FORMATS[fmt]
            _replace(tmp, result[fmt])
            placed.append(result[fmt])
    except BaseException as exc:
        for leftover in [*temps.values(), *placed]:
            _remove(leftover)
        if isinstance(exc, OSError) and not isinstance(exc, OutputError):
            raise OutputError(
                f"could not write artifacts in {out}: {exc}",
                hint="check free space and permissions of the output folder",
            ) from exc
        raise
    logger.info("saved %s to %s", ", ".join(result), out)
    return result
