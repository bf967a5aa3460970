"""A folder artifact (an OME-Zarr) as one file: a zip the server serves and the client unpacks.

Zip, not tar: zarr reads a zip in place (``zarr.storage.ZipStore("mask.zarr.zip")``), and
Python's `zipfile` writes and checks it without another dependency. Entries are *stored*,
not deflated: zarr chunks are already Blosc-compressed, so deflating again only costs time.
"""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

from .errors import OutputError

__all__ = ["unzip_folder", "zip_folder"]


def zip_folder(folder: str | os.PathLike[str], dest: str | os.PathLike[str]) -> Path:
    """Write every file under `folder` into the zip `dest` (paths relative to `folder`),
    under a temporary name first, so `dest` is either complete or absent."""
    src, out = Path(folder), Path(dest)
    tmp = out.with_name(f".tmp-{out.name}")
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for path in sorted(src.rglob("*")):
                if path.is_file():
                    zf.write(path, path.relative_to(src).as_posix())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def unzip_folder(archive: str | os.PathLike[str], dest: str | os.PathLike[str]) -> Path:
    """Unpack a zip made by `zip_folder` into the new folder `dest`; refuses entries that
    would land outside it (absolute paths, ``..``)."""
    out = Path(dest)
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with zipfile.ZipFile(archive) as zf:
            root = tmp.resolve()
            for name in zf.namelist():
                target = (tmp / name).resolve()
                if root not in target.parents:
                    raise OutputError(
                        f"{Path(archive).name} holds an entry outside its folder: {name!r}",
                        hint="the archive is damaged or not one cryomamba made",
                    )
            zf.extractall(tmp)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
