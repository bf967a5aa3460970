"""The part store: each upload's data file on disk, its parts recorded in the database.

Every upload owns one file, uploads/<id>/data, made at its declared size at `init`.
A part is written once, straight into it at `idx * part_size`, fdatasync'ed, and only then
recorded in the database: the record is the acknowledgement, so a part the server
acknowledged is on disk, and one half-written (a crash before its record) never counts; the
client sends it again. A part replaced by other bytes loses its record before the write.
The whole file's SHA-256 is kept as parts arrive (`upload_hash.RunningHashes`), so
`complete` checks it, checks the MRC header with the core `Volume` rules, and hard-links
the file into raw/: no byte is copied or read again. The HTTP handlers in `uploads.py`
decide who may do what; everything here runs on worker threads.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import shutil
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import InvalidVolumeError
from .errors import ApiError
from .settings import ServerSettings
from .storage import Storage, new_id
from .upload_hash import RunningHashes

__all__ = ["DATA_NAME", "PartStore", "fsync_dir"]

log = logging.getLogger(__name__)

TMP_MARK = ".tmp-"
DATA_NAME = "data"  # uploads/<id>/data: the file the parts are written into


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_sync_data = getattr(os, "fdatasync", os.fsync)  # the size is set at init: data is enough


class PartStore:
    """Upload sessions on disk (uploads/<id>/data), files in raw/, rows in `storage`."""

    def __init__(self, settings: ServerSettings, storage: Storage) -> None:
        self.settings, self.storage = settings, storage
        self.hashes = RunningHashes(self.data_path, lambda uid: storage.parts(uid).keys())
        # Names (upload ids, files in raw/) being written right now, which clean() must
        # leave alone; clean() sweeps while holding the lock, so no write starts meanwhile.
        self._busy: Counter[str] = Counter()
        self._busy_lock = threading.Lock()
        # One lock per part being written: two PUTs of one part must not interleave.
        self._part_locks: dict[tuple[str, int], list[Any]] = {}

    def part_dir(self, upload_id: str) -> Path:
        return self.settings.uploads_dir / upload_id

    def data_path(self, upload_id: str) -> Path:
        return self.part_dir(upload_id) / DATA_NAME

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

    @contextlib.contextmanager
    def _part_lock(self, upload_id: str, idx: int) -> Iterator[None]:
        key = (upload_id, idx)
        with self._busy_lock:
            entry = self._part_locks.setdefault(key, [threading.Lock(), 0])
            entry[1] += 1
        try:
            with entry[0]:
                yield
        finally:
            with self._busy_lock:
                entry[1] -= 1
                if entry[1] == 0:
                    del self._part_locks[key]

    # -- sessions ---------------------------------------------------------------------------
    def open_upload(self, row: dict[str, Any]) -> None:
        """Make the upload's data file at its declared size, then record the upload.

        The file is sparse: disk blocks are taken only as parts arrive. Reserving them here
        (fallocate) would let anyone with an upload token hold `--max-upload-size` of disk
        per `init` without sending a byte, until the upload expires.
        """
        folder = self.part_dir(row["id"])
        with self._writing(row["id"]):
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(folder / DATA_NAME, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.ftruncate(fd, row["size"])
                os.fsync(fd)
            finally:
                os.close(fd)
            fsync_dir(folder)
            fsync_dir(folder.parent)
            self.storage.add_upload(row)

    # -- parts ------------------------------------------------------------------------------
    def store_part(
        self, row: dict[str, Any], idx: int, data: bytearray, claimed: str | None
    ) -> str:
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
        with self._writing(row["id"]), self._part_lock(row["id"], idx):
            return self._write_part(row, idx, data, digest)

    def _write_part(self, row: dict[str, Any], idx: int, data: bytearray, digest: str) -> str:
        upload_id = row["id"]
        held = self.storage.parts(upload_id).get(idx)
        if held is not None and held["sha256"] == digest:
            return digest  # idempotent re-PUT: nothing to do
        if held is not None:  # other bytes for a held part: it stops counting first
            self.storage.delete_part(upload_id, idx)
            self.hashes.replaced(upload_id, idx)
        path = self.data_path(upload_id)
        created = not path.exists()  # an upload from before this layout, or a lost file
        if created:
            path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            if created:
                os.ftruncate(fd, row["size"])
            view, offset, done = memoryview(data), idx * row["part_size"], 0
            while done < len(view):
                done += os.pwrite(fd, view[done:], offset + done)
            if created:
                os.fsync(fd)  # the size is new too
            else:
                _sync_data(fd)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ApiError(
                    507,
                    "insufficient_storage",
                    f"the server's disk is full: part {idx} was not kept",
                    "send the part again once the operator has freed space",
                    retryable=True,
                ) from None
            raise
        finally:
            os.close(fd)
        if created:
            fsync_dir(path.parent)
        self.storage.add_part(upload_id, idx, len(data), digest)
        try:
            self.hashes.add(row, idx, data)
        except OSError as exc:  # the part is kept; complete rebuilds the hash
            log.warning("upload %s: running hash reset: %s", upload_id, exc)
        return digest

    # -- whole files ------------------------------------------------------------------------
    def assemble(self, row: dict[str, Any], claimed: str | None = None) -> dict[str, Any]:
        """Check an upload's data file and link it into raw/ (O(1) in its size); its row.

        `claimed` is the whole file's SHA-256 the client sent with `complete`, checked as
        the one promised at `init` is.
        """
        file_id = new_id()
        with self._writing(row["id"], f"{file_id}.mrc"):
            return self._assemble_as(row, file_id, claimed)

    def _assemble_as(
        self, row: dict[str, Any], file_id: str, claimed: str | None
    ) -> dict[str, Any]:
        from ..volume import Volume

        data = self.data_path(row["id"])
        sha = self.hashes.digest(row)
        if sha is None:  # the caller checked every part is recorded: the records are wrong
            raise ApiError(
                500, "internal_error", f"upload {row['id']} has parts the hash cannot read"
            )
        for promised, where in ((row["sha256"], "the upload promised"), (claimed, "complete")):
            if promised and sha != promised.lower():
                self.reject(row["id"])
                raise ApiError(
                    422,
                    "checksum_mismatch",
                    f"the uploaded file has SHA-256 {sha}, {where} {promised.lower()}",
                    "the file changed while it was uploaded, or parts were sent from another "
                    "file; start a new upload",
                )
        try:
            volume = Volume.open(data)
        except InvalidVolumeError as exc:
            self.reject(row["id"])
            message = exc.message.replace(str(data), row["filename"])
            raise ApiError(422, exc.code, message, exc.hint) from None
        meta = {
            "shape": list(volume.shape),
            "voxel_size": list(volume.voxel_size),
            "dtype": str(volume.dtype),
        }
        volume.close()
        raw = self.settings.raw_dir
        raw.mkdir(parents=True, exist_ok=True)
        final = raw / f"{file_id}.mrc"
        try:
            # A second name for the same bytes: until the record commits, the upload still
            # owns its data file, so a crash here leaves it resumable (clean() drops the link).
            os.link(data, final)
        except OSError:  # no hard links here: move it (a crash before the record loses it)
            os.rename(data, final)
        fsync_dir(raw)
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
        self.hashes.forget(row["id"])
        shutil.rmtree(self.part_dir(row["id"]), ignore_errors=True)
        log.info("upload %s complete: file %s, %d bytes", row["id"], file_id, row["size"])
        return file_row

    def reject(self, upload_id: str) -> None:
        self.storage.update_upload(upload_id, state="rejected")
        self._drop(upload_id)

    def _drop(self, upload_id: str) -> None:
        self.storage.delete_parts(upload_id)
        self.hashes.forget(upload_id)
        shutil.rmtree(self.part_dir(upload_id), ignore_errors=True)

    # -- housekeeping -----------------------------------------------------------------------
    def clean(self) -> dict[str, int]:
        """Expire stale uploads; remove temp files and anything no record points to."""
        removed = {"expired_uploads": 0, "orphans": 0}
        for row in self.storage.expired_uploads(time.time()):
            self.storage.update_upload(row["id"], state="expired")
            self._drop(row["id"])
            removed["expired_uploads"] += 1
        with self._busy_lock:  # no part or assembly starts while we sweep (see _writing)
            removed["orphans"] = self._sweep(set(self._busy))
        return removed

    def _sweep(self, busy: set[str]) -> int:
        """Remove temp files and files no record points to, except those being written.

        An open upload without its data file (one begun before parts were written into a
        single file, or a file lost) forgets its parts: the client sends them again.
        """
        removed = 0
        open_ids = self.storage.open_upload_ids()
        up = self.settings.uploads_dir
        found = set()
        if up.is_dir():
            for folder in up.iterdir():
                if folder.name in busy:
                    continue
                if folder.name not in open_ids:
                    shutil.rmtree(folder, ignore_errors=True)
                    removed += 1
                    continue
                found.add(folder.name)
                for f in folder.iterdir():
                    if f.name != DATA_NAME:
                        f.unlink(missing_ok=True)
                        removed += 1
                if not (folder / DATA_NAME).exists():
                    found.discard(folder.name)
        for upload_id in open_ids - found - busy:
            if self.storage.parts(upload_id):
                log.warning("upload %s has no data file: its parts are forgotten", upload_id)
                self.storage.delete_parts(upload_id)
                self.hashes.forget(upload_id)
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
