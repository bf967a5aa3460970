"""A finished remote job's artifacts: downloaded, checked against their sha256, as a result."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from ...config import JobConfig
from ...errors import CryoMambaError
from ...events import Completed
from ...folder_zip import unzip_folder
from ...segmentation import Segmentation
from ...volume import Volume
from ._http import _BLOCK, _UNREACHABLE_HINT, HttpSession, RemoteError, _tmpdir

log = logging.getLogger(__name__)

__all__ = ["Downloader"]


class Downloader:
    """Downloads finished jobs: into `download_dir/<server job id>/` when given (the files
    stay: they are the caller's), else into a temporary folder per job, removed once the
    result is dropped or at `close()`."""

    def __init__(self, http: HttpSession, download_dir: Path | None) -> None:
        self.http = http
        self.download_dir = download_dir
        self._lock = threading.Lock()
        self._labels: dict[str, dict[int, str]] = {}
        self._temporary: list[weakref.finalize[..., Any]] = []  # per-job download folders

    def close(self) -> None:
        """Remove the temporary download folders (a `download_dir` is left as it is)."""
        with self._lock:
            temporary, self._temporary = self._temporary, []
        for remove in temporary:
            remove()

    def result(self, record: dict[str, Any], config: JobConfig, local: Volume | None) -> Completed:
        """Download the artifacts (checked) and build the `Segmentation` from them."""
        from ...config import ARTIFACT_FILES as FORMATS

        job_id = str(record["id"])
        available = dict(record.get("artifacts") or {})
        # folder artifacts (zarr) travel as one zip each and are unpacked here
        wanted = {f: _served_name(FORMATS[f]) for f in ("mrc", "stats", *config.formats)}
        lacking = [n for f, n in wanted.items() if f in ("mrc", "stats") and n not in available]
        if lacking:
            raise RemoteError(
                "missing_artifact",
                f"job {job_id} finished without {', '.join(lacking)}",
                hint="this is a server bug; please report it with the server log",
            )
        folder, remove = self._download_folder(job_id)
        try:
            paths = {
                f: self._download(job_id, n, available, folder / n)
                for f, n in wanted.items()
                if n in available
            }
        except BaseException:
            if remove is not None:
                remove()
            raise
        for f, p in list(paths.items()):
            if p.suffix == ".zip":
                paths[f] = unzip_folder(p, p.with_suffix(""))
                p.unlink()
        mask = Volume.open(paths["mrc"])
        labels = mask.data.view(np.uint8) if mask.dtype == np.int8 else mask.data  # mode 0
        stats = json.loads(paths["stats"].read_text(encoding="utf-8"))
        provenance = {
            **(stats.pop("provenance", None) or {}),
            "remote": {"server": self.http.server, "job_id": job_id},
        }
        label_names = self._label_names(config.model) or {
            int(e["label"]): str(e["name"]) for e in stats.get("labels", ())
        }
        geometry = local if local is not None else mask
        result = Segmentation(
            labels=labels,
            # an override is the true voxel size, as with the local executor
            voxel_size=config.voxel_size if config.voxel_size is not None else geometry.voxel_size,
            origin=geometry.origin,
            label_names=label_names,
            provenance=provenance,
            image=local.data if local is not None else None,
            header=geometry.header if geometry.header is not None else mask.header,
            artifacts=paths,
            _stats=stats,
            probabilities=paths.get("probabilities"),
        )
        if remove is not None:  # the folder goes with the result (or at close)
            self._track_temporary(weakref.finalize(result, remove))
        return Completed(result=result, artifacts={f: str(p) for f, p in paths.items()})

    def _download(self, job_id: str, name: str, available: dict[str, Any], dest: Path) -> Path:
        """Fetch one artifact to a temporary name, check its sha256, rename it into place.

        An expired or refused signature gets fresh URLs once (`available` is updated).
        """
        tmp = dest.with_name(f".part-{dest.name}")
        try:
            digest = self._fetch(str(available[name]["url"]), tmp)
        except RemoteError as exc:
            if exc.status not in (403, 404, 410):
                raise
            available.update(self.http.request("GET", f"/v1/jobs/{job_id}").json()["artifacts"])
            digest = self._fetch(str(available[name]["url"]), tmp)
        expected = available[name].get("sha256")
        if expected and digest != expected:
            tmp.unlink(missing_ok=True)
            raise RemoteError(
                "checksum_mismatch",
                f"{name} of job {job_id} does not match "
                "its sha256 from the server: the download was damaged",
                hint="submit the job again",
                retryable=True,
            )
        os.replace(tmp, dest)
        return dest

    def _fetch(self, url: str, dest: Path) -> str:
        """Stream `url` into `dest`, again from the start if the stream breaks; its sha256."""
        import httpx

        retries = self.http.retries
        for attempt in range(retries + 1):
            digest = hashlib.sha256()
            resp = self.http.request("GET", url, stream=True)
            try:
                with open(dest, "wb") as f:
                    for chunk in resp.iter_bytes(_BLOCK):
                        f.write(chunk)
                        digest.update(chunk)
                return digest.hexdigest()
            except httpx.TransportError as exc:
                if attempt >= retries:
                    raise RemoteError(
                        "network_error",
                        f"downloading {urlsplit(url).path} failed: {exc}",
                        hint=_UNREACHABLE_HINT,
                        retryable=True,
                    ) from None
            finally:
                resp.close()
            time.sleep(self.http.delay(attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    def _label_names(self, model: str) -> dict[int, str]:
        """The model's label names as the server lists them (every label, background too)."""
        with self._lock:
            if model in self._labels:
                return self._labels[model]
        try:
            info = self.http.request("GET", "/v1/server/info").json()
            found = {m.get("name"): m.get("labels") for m in info.get("models", ())}
            names = {int(k): str(v) for k, v in (found.get(model) or {}).items()}
        except (CryoMambaError, ValueError, TypeError, AttributeError) as exc:
            log.debug("no label names for %s from the server: %s", model, exc)
            return {}
        with self._lock:
            self._labels[model] = names
        return names

    def _download_folder(self, job_id: str) -> tuple[Path, Callable[[], None] | None]:
        """Where one job's artifacts go, and how to remove that folder (None: the caller's)."""
        if self.download_dir is not None:
            folder = self.download_dir / job_id
            folder.mkdir(parents=True, exist_ok=True)
            return folder, None
        folder = Path(tempfile.mkdtemp(prefix=f"cryomamba-remote-{job_id}-", dir=_tmpdir()))
        return folder, lambda: shutil.rmtree(folder, ignore_errors=True)

    def _track_temporary(self, remove: weakref.finalize[..., Any]) -> None:
        with self._lock:
            self._temporary = [f for f in self._temporary if f.alive]
            self._temporary.append(remove)


def _served_name(name: str) -> str:
    """The server's name for an artifact: a folder (``*.zarr``) is served zipped."""
    return f"{name}.zip" if name.endswith(".zarr") else name
