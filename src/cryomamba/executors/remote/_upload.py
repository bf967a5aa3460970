"""Uploads for the remote executor: one pass over the file, parallel parts, resume.

`init` names the file by a cheap fingerprint (size and a few sampled blocks), so starting
or resuming costs no pass over a multi-GB file. The parts are then read once, in order:
each feeds the whole file's SHA-256 and, if the server lacks it, is sent with its own
SHA-256 while the next is read. `complete` carries the whole SHA-256, which the server
compares with the one it computed as the parts arrived.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ...mrc_write import MRC_MODES, write_mrc_volume
from ...volume import Volume
from ._http import _BLOCK, HttpSession, RemoteError, _CanceledSignal, _error_from

log = logging.getLogger(__name__)

FINGERPRINT_SAMPLES = 16  # blocks of _BLOCK bytes, evenly spaced, besides the first and last


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
            "fingerprint": fingerprint(path, size),
        }
        if self.part_size:
            body["part_size"] = int(self.part_size)
        record = self._init(body, cancel)
        sha: str | None = None
        for _ in range(self.http.retries + 1):
            if record.get("state") == "completed" and record.get("file_id"):
                # a fingerprint only samples the file: the whole SHA-256 decides
                sha = sha or _sha256_file(path, cancel)
                if record.get("sha256") == sha:
                    log.info("%s is already on the server as %s", path.name, record["file_id"])
                    return str(record["file_id"])
                record = self._init({**body, "sha256": sha}, cancel)
                continue
            upload_id = record["upload_id"]
            have = set(record.get("parts_received") or ())
            missing = [i for i in range(int(record["parts_total"])) if i not in have]
            log.info(
                "uploading %s: %d of %d parts to send",
                path.name,
                len(missing),
                record["parts_total"],
            )
            sha = self._send(path, size, upload_id, int(record["part_size"]), missing, sha, cancel)
            resp = self.http.request(
                "POST",
                f"/v1/uploads/{upload_id}/complete",
                json={"sha256": sha},
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

    def _init(self, body: dict[str, Any], cancel: threading.Event) -> dict[str, Any]:
        resp = self.http.request("POST", "/v1/uploads/init", json=body, cancel=cancel)
        record: dict[str, Any] = resp.json()
        return record

    def _send(
        self,
        path: Path,
        size: int,
        upload_id: str,
        part_size: int,
        parts: list[int],
        sha: str | None,
        cancel: threading.Event,
    ) -> str:
        """PUT `parts`, at most `parallel_uploads` at once; the whole file's SHA-256.

        Without `sha` every part is read (in order) to compute it, and those to send are
        sent from that same read; with it, only the parts to send are read.
        """
        wanted = set(parts)
        if sha is not None and not wanted:
            return sha
        stop = (cancel, threading.Event())
        digest = hashlib.sha256()
        slots = threading.BoundedSemaphore(self.parallel_uploads + 1)  # parts held in memory
        futures: list[Future[None]] = []

        def put(index: int, data: bytes) -> None:
            try:
                self._put_part(path, upload_id, index, data, stop)
            finally:
                slots.release()

        workers = max(1, min(self.parallel_uploads, len(parts)))
        with ThreadPoolExecutor(workers, thread_name_prefix="cryomamba-upload") as pool:
            try:
                with open(path, "rb") as f:
                    for index in range(-(-size // part_size)):
                        if sha is not None and index not in wanted:
                            continue
                        if any(e.is_set() for e in stop):
                            raise _CanceledSignal
                        futures = _pending(futures)  # raises the first failure
                        slots.acquire()
                        f.seek(index * part_size)
                        data = f.read(part_size)
                        if sha is None:
                            digest.update(data)
                        if index in wanted:
                            futures.append(pool.submit(put, index, data))
                        else:
                            slots.release()
                for future in futures:
                    future.result()
            except BaseException:
                stop[1].set()
                for future in futures:
                    future.cancel()
                raise
        return sha if sha is not None else digest.hexdigest()

    def _put_part(
        self, path: Path, upload_id: str, index: int, data: bytes, stop: tuple[threading.Event, ...]
    ) -> None:
        if any(e.is_set() for e in stop):
            raise _CanceledSignal
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


def _pending(futures: list[Future[None]]) -> list[Future[None]]:
    """The futures not done yet; the first that failed raises its error here."""
    for future in futures:
        if future.done():
            future.result()
    return [f for f in futures if not f.done()]


def fingerprint(path: Path, size: int) -> str:
    """A cheap name for the file's content, for resuming: SHA-256 of its size and samples.

    The first and last blocks and `FINGERPRINT_SAMPLES` evenly spaced ones: about 18 MiB
    read for any file. Two files that differ only between the samples share it, which is
    why the server resumes by it only as far as the whole SHA-256 at `complete` agrees.
    """
    digest = hashlib.sha256(b"cryomamba-fingerprint-1\0%d\0" % size)
    offsets = {0, max(0, size - _BLOCK)}
    offsets |= {size * k // (FINGERPRINT_SAMPLES + 1) for k in range(1, FINGERPRINT_SAMPLES + 1)}
    with open(path, "rb") as f:
        for offset in sorted(offsets):
            f.seek(offset)
            digest.update(f.read(_BLOCK))
    return digest.hexdigest()


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
