"""Uploads for the remote executor: whole-file hash, parallel parts with retry, resume."""

from __future__ import annotations

import hashlib
import logging
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np

from ...mrc_write import MRC_MODES, write_mrc_volume
from ...volume import Volume
from ._http import _BLOCK, HttpSession, RemoteError, _CanceledSignal, _error_from

log = logging.getLogger(__name__)


class Uploader:
    """Send a file in parts (only those the server lacks) and complete it into a file id.

    `part_size` None lets the server choose; at most `parallel_uploads` parts are in flight.
    """

    def __init__(self, http: HttpSession, *, part_size: int | None, parallel_uploads: int) -> None:
        self.http, self.part_size, self.parallel_uploads = http, part_size, parallel_uploads

    def upload(self, path: Path, cancel: threading.Event) -> str:
        """Upload `path` in parts (resuming what the server already has); returns its file id."""
        size = path.stat().st_size
        body: dict[str, Any] = {
            "filename": path.name,
            "size": size,
            "sha256": _sha256_file(path, cancel),
        }
        if self.part_size:
            body["part_size"] = int(self.part_size)
        record = self.http.request("POST", "/v1/uploads/init", json=body, cancel=cancel).json()
        upload_id = record["upload_id"]
        for _ in range(self.http.retries + 1):
            if record.get("state") == "completed" and record.get("file_id"):
                log.info("%s is already on the server as %s", path.name, record["file_id"])
                return str(record["file_id"])
            have = set(record.get("parts_received") or ())
            missing = [i for i in range(int(record["parts_total"])) if i not in have]
            log.info(
                "uploading %s: %d of %d parts to send",
                path.name,
                len(missing),
                record["parts_total"],
            )
            self._put_parts(path, size, upload_id, int(record["part_size"]), missing, cancel)
            resp = self.http.request(
                "POST",
                f"/v1/uploads/{upload_id}/complete",
                ok=(409,),
                cancel=cancel,
                timeout=self.http.long_timeout(),
            )
            if resp.status_code != 409:
                return str(resp.json()["file_id"])
            error = _error_from(resp)
            if error.code != "missing_parts":
                raise error
            record = self.http.request("GET", f"/v1/uploads/{upload_id}", cancel=cancel).json()
        raise error

    def _put_parts(
        self,
        path: Path,
        size: int,
        upload_id: str,
        part_size: int,
        parts: list[int],
        cancel: threading.Event,
    ) -> None:
        """PUT `parts` with at most `parallel_uploads` in flight; the first failure stops all."""
        if not parts:
            return
        stop = (cancel, threading.Event())
        workers = min(self.parallel_uploads, len(parts))
        with ThreadPoolExecutor(workers, thread_name_prefix="cryomamba-upload") as pool:
            futures = [
                pool.submit(self._put_part, path, size, upload_id, part_size, i, stop)
                for i in parts
            ]
            try:
                for future in as_completed(futures):
                    future.result()
            except BaseException:
                stop[1].set()
                for future in futures:
                    future.cancel()
                raise

    def _put_part(
        self,
        path: Path,
        size: int,
        upload_id: str,
        part_size: int,
        index: int,
        stop: tuple[threading.Event, ...],
    ) -> None:
        if any(e.is_set() for e in stop):
            raise _CanceledSignal
        offset = index * part_size
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(min(part_size, size - offset))
        digest = hashlib.sha256(data).hexdigest()
        headers = {"X-Part-SHA256": digest, "Content-Type": "application/octet-stream"}
        resp = self.http.request(
            "PUT",
            f"/v1/uploads/{upload_id}/part/{index}",
            content=data,
            headers=headers,
            cancel=stop,
        )
        if resp.json().get("sha256", digest) != digest:
            raise RemoteError(
                "checksum_mismatch",
                f"part {index} of {path.name} arrived damaged",
                hint="submit again",
                retryable=True,
            )
        log.debug("part %d of %s uploaded (%d bytes)", index, path.name, len(data))


def _sha256_file(path: Path, cancel: threading.Event) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            if cancel.is_set():
                raise _CanceledSignal
            digest.update(block)
    return digest.hexdigest()


def _write_mrc(volume: Volume, path: Path) -> Path:
    """Write an in-memory volume as MRC (keeping voxel size and origin) so it can be uploaded.

    uint8 becomes int16 (mode 0 would read back as int8) and other types float32.
    """
    dtype = (
        volume.dtype
        if volume.dtype in MRC_MODES
        else np.dtype(np.int16 if volume.dtype == np.uint8 else np.float32)
    )
    return write_mrc_volume(
        path, volume.data, dtype=dtype, voxel_size=volume.voxel_size, origin=volume.origin
    )
