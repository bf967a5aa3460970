"""The part store: upload parts and assembled files on disk, recorded in the database.

A part is written under a temporary name, fsynced and renamed before the database records
it, so a part the server acknowledged is whole, and a half-written one never counts.
`assemble` joins the parts into a temporary file in raw/, checks the whole SHA-256 and the
MRC header with the core `Volume` rules, then renames it into place. The HTTP handlers in
`uploads.py` decide who may do what; everything here runs on worker threads.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import shutil
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import InvalidVolumeError
from .errors import ApiError
from .settings import ServerSettings
from .storage import Storage, new_id

__all__ = ["PartStore", "fsync_dir"]

log = logging.getLogger(__name__)

TMP_MARK = ".tmp-"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PartStore:
    """Upload sessions on disk (uploads/<id>/<idx>.part), files in raw/, rows in `storage`."""

    def __init__(self, settings: ServerSettings, storage: Storage) -> None:
        self.settings, self.storage = settings, storage
        # Names (upload ids, files in raw/) being written right now, which clean() must
        # leave alone; clean() sweeps while holding the lock, so no write starts meanwhile.
        self._busy: Counter[str] = Counter()
        self._busy_lock = threading.Lock()

    def part_dir(self, upload_id: str) -> Path:
        return self.settings.uploads_dir / upload_id

    @contextlib.contextmanager
    def _writing(self, *names: str) -> Iterator[None]:
        """Mark `names` (an upload id, files in raw/) as being written, so clean() skips them."""
        with self._busy_lock:
            self._busy.update(names)
        try:
            yield
        finally:
            with self._busy_lock:
                self._busy.subtract(names)
                for name in names:
                    if self._busy[name] <= 0:
                        del self._busy[name]

    # -- parts ------------------------------------------------------------------------------
    def store_part(self, upload_id: str, idx: int, data: bytearray, claimed: str | None) -> str:
        """Check `data` against `claimed` (its SHA-256, if the client sent one), then keep it."""
        digest = hashlib.sha256(data).hexdigest()
        if claimed is not None and claimed.lower() != digest:
            raise ApiError(
                422,
                "checksum_mismatch",
                f"part {idx} has SHA-256 {digest}, X-Part-SHA256 says {claimed.lower()}",
                "the part was damaged in transit; send it again",
                retryable=True,
            )
        with self._writing(upload_id):
            return self._write_part(upload_id, idx, data, digest)

    def _write_part(self, upload_id: str, idx: int, data: bytearray, digest: str) -> str:
        held = self.storage.parts(upload_id).get(idx)
        folder = self.part_dir(upload_id)
        final = folder / f"{idx}.part"
        if held is not None and held["sha256"] == digest and final.exists():
            return digest  # idempotent re-PUT: nothing to do
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f"{idx}.part{TMP_MARK}{secrets.token_hex(4)}"
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        fsync_dir(folder)
        self.storage.add_part(upload_id, idx, len(data), digest)
        return digest

    # -- whole files ------------------------------------------------------------------------
    def assemble(self, row: dict[str, Any]) -> dict[str, Any]:
        """Join an upload's parts into a checked file in raw/; its files row."""
        file_id = new_id()
        tmp_name = f".{file_id}.mrc{TMP_MARK}{secrets.token_hex(4)}"
        with self._writing(row["id"], tmp_name, f"{file_id}.mrc"):
            return self._assemble_as(row, file_id, tmp_name)

    def _assemble_as(self, row: dict[str, Any], file_id: str, tmp_name: str) -> dict[str, Any]:
        from ..volume import Volume

        raw = self.settings.raw_dir
        raw.mkdir(parents=True, exist_ok=True)
        tmp = raw / tmp_name
        digest = hashlib.sha256()
        try:
            with open(tmp, "wb") as out:
                for idx in range(row["parts_total"]):
                    with open(self.part_dir(row["id"]) / f"{idx}.part", "rb") as part:
                        _hash_and_append(part, out, digest)
                out.flush()
                os.fsync(out.fileno())
            sha = digest.hexdigest()
            if row["sha256"] and sha != row["sha256"]:
                self.reject(row["id"])
                raise ApiError(
                    422,
                    "checksum_mismatch",
                    f"the assembled file has SHA-256 {sha}, the upload promised {row['sha256']}",
                    "the file changed while it was uploaded, or parts were sent from another "
                    "file; start a new upload",
                )
            try:
                volume = Volume.open(tmp)
            except InvalidVolumeError as exc:
                self.reject(row["id"])
                message = exc.message.replace(str(tmp), row["filename"])
                raise ApiError(422, exc.code, message, exc.hint) from None
            meta = {
                "shape": list(volume.shape),
                "voxel_size": list(volume.voxel_size),
                "dtype": str(volume.dtype),
            }
            volume.close()
            final = raw / f"{file_id}.mrc"
            os.replace(tmp, final)
            fsync_dir(raw)
        finally:
            tmp.unlink(missing_ok=True)
        file_row = {
            "id": file_id,
            "owner": row["owner"],
            "filename": row["filename"],
            "path": str(final),
            "size": row["size"],
            "sha256": sha,
            "meta": meta,
            "created_at": time.time(),
        }
        self.storage.complete_upload(row["id"], file_row)
        shutil.rmtree(self.part_dir(row["id"]), ignore_errors=True)
        log.info("upload %s complete: file %s, %d bytes", row["id"], file_id, row["size"])
        return file_row

    def reject(self, upload_id: str) -> None:
        self.storage.update_upload(upload_id, state="rejected")
        self.storage.delete_parts(upload_id)
        shutil.rmtree(self.part_dir(upload_id), ignore_errors=True)

    # -- housekeeping -----------------------------------------------------------------------
    def clean(self) -> dict[str, int]:
        """Expire stale uploads; remove temp files and anything no record points to."""
        removed = {"expired_uploads": 0, "orphans": 0}
        for row in self.storage.expired_uploads(time.time()):
            self.storage.update_upload(row["id"], state="expired")
            self.storage.delete_parts(row["id"])
            shutil.rmtree(self.part_dir(row["id"]), ignore_errors=True)
            removed["expired_uploads"] += 1
        with self._busy_lock:  # no part or assembly starts while we sweep (see _writing)
            removed["orphans"] = self._sweep(set(self._busy))
        return removed

    def _sweep(self, busy: set[str]) -> int:
        """Remove temp files and files no record points to, except those being written."""
        removed = 0
        open_ids = self.storage.open_upload_ids()
        up = self.settings.uploads_dir
        if up.is_dir():
            for folder in up.iterdir():
                if folder.name in busy:
                    continue
                if folder.name not in open_ids:
                    shutil.rmtree(folder, ignore_errors=True)
                    removed += 1
                    continue
                held = self.storage.parts(folder.name)
                for f in folder.iterdir():
                    name = f.name
                    stem = name.split(".")[0]
                    if TMP_MARK in name or not stem.isdigit() or int(stem) not in held:
                        f.unlink(missing_ok=True)
                        removed += 1
        raw = self.settings.raw_dir
        if raw.is_dir():
            # by name (<file id>.mrc): a record may spell the folder differently (relative
            # or absolute --data-dir, a restored backup), and must not lose its file for it
            known = {Path(p).name for p in self.storage.file_paths()}
            for f in raw.iterdir():
                if f.name not in busy and f.name not in known:
                    f.unlink(missing_ok=True)
                    removed += 1
        return removed


def _hash_and_append(part: BinaryIO, out: BinaryIO, digest: Any) -> None:
    """Hash `part` and append it to `out`: the copy stays in the kernel where it can.

    `copy_file_range` (Linux) avoids pushing every byte through Python a second time; it
    made `complete` about 3x faster than read-and-write on our machines.
    """
    while block := part.read(4 << 20):
        digest.update(block)
    part.seek(0)
    size = os.fstat(part.fileno()).st_size
    copied = 0
    if hasattr(os, "copy_file_range"):
        try:
            while copied < size:
                n = os.copy_file_range(part.fileno(), out.fileno(), size - copied)
                if n == 0:
                    break
                copied += n
        except OSError:  # e.g. across file systems on old kernels: copy in user space
            pass
    if copied < size:
        part.seek(copied)
        out.seek(0, os.SEEK_END)
        shutil.copyfileobj(part, out, 4 << 20)
