"""Backups of a server's data folder that restore: snapshot, verify, restore.

`create_backup` runs while the server runs. The database is copied with SQLite's online
backup API (one read transaction: a consistent snapshot, never a torn file copy); the
files it names are then hard-linked into the backup when on the same file system, else
copied. That is safe because the server never changes a file once it is in place (raw
files and artifacts are written under temporary names, or linked once whole). Only what
the snapshot names is taken: raw files of its `files` rows, the artifact folders of its
completed jobs, and the recorded parts of its open uploads, copied out of their data files
(which still change) and checked against their SHA-256s (a part that went away or changed
after the snapshot is dropped from the snapshot's `parts` table, so the upload resumes
without it). The secret file is copied with mode 0600. `manifest.json` (every file's
SHA-256 and size) is written last: a backup without one is incomplete, and `verify`,
`restore` and `--keep` treat it so.

Verifying and restoring live in `backup_restore`, the backup folder's layout and file
operations in `backup_files`; this module re-exports them, so `cryomamba.server.backup`
stays the one place to import from.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._version import __version__
from .backup_files import (
    DB_NAME,
    FORMAT,
    MANIFEST,
    SECRET_NAME,
    TMP_MARK,
    BackupError,
    complete_backups,
    connect,
    copy_file,
    file_entry,
    resolve_backup,
)
from .backup_restore import restore_backup, verify_backup
from .part_store import fsync_dir

__all__ = [
    "BackupError",
    "BackupSummary",
    "create_backup",
    "prune_backups",
    "resolve_backup",
    "restore_backup",
    "verify_backup",
]

log = logging.getLogger(__name__)


@dataclass
class BackupSummary:
    """What `create_backup` took, for the command line and the log."""

    path: Path
    files: int = 0
    bytes: int = 0
    linked: int = 0
    copied: int = 0
    dropped_parts: int = 0
    removed: list[Path] = field(default_factory=list)


# -- taking a backup ----------------------------------------------------------------------
def create_backup(data_dir: Path, root: Path, *, keep: int | None = None) -> BackupSummary:
    """Snapshot `data_dir` into a new timestamped folder of `root`; prune to `keep`."""
    db = data_dir / DB_NAME
    if not db.is_file():
        raise BackupError(
            f"no server database at {db}",
            hint="pass the server's --data-dir (the folder holding cryomamba.sqlite3)",
        )
    if keep is not None and keep < 1:
        raise BackupError(f"--keep must be at least 1, got {keep}")
    root.mkdir(parents=True, exist_ok=True)
    folder = _new_folder(root)
    summary = BackupSummary(folder)
    snapshot = folder / DB_NAME
    _snapshot_db(db, snapshot)
    manifest: dict[str, dict[str, Any]] = {}
    with connect(snapshot) as con:
        for (path,) in con.execute("SELECT path FROM files").fetchall():
            if not _take(data_dir, folder, f"raw/{Path(path).name}", manifest, summary):
                log.warning("raw/%s is recorded but missing from %s", Path(path).name, data_dir)
        for (job_id,) in con.execute("SELECT id FROM jobs WHERE state = 'completed'").fetchall():
            job_dir = data_dir / "artifacts" / job_id
            for f in sorted(job_dir.iterdir()) if job_dir.is_dir() else []:
                if f.is_file() and not f.name.startswith(TMP_MARK):
                    _take(data_dir, folder, f"artifacts/{job_id}/{f.name}", manifest, summary)
        summary.dropped_parts = _take_parts(con, data_dir, folder, manifest, summary)
    manifest[DB_NAME] = file_entry(snapshot)
    secret = data_dir / SECRET_NAME
    if secret.is_file():
        fd = os.open(folder / SECRET_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(secret.read_bytes())
            out.flush()
            os.fsync(out.fileno())
        manifest[SECRET_NAME] = file_entry(folder / SECRET_NAME)
    else:
        log.warning(
            "no %s in %s: back up the secret ($CRYOMAMBA_SECRET or --secret-file) "
            "yourself; tokens and signed URLs need it",
            SECRET_NAME,
            data_dir,
        )
    summary.files = len(manifest)
    summary.bytes = sum(e["size"] for e in manifest.values())
    _write_manifest(folder, data_dir, manifest)
    log.info("backup %s: %d files, %d bytes", folder, summary.files, summary.bytes)
    if keep is not None:
        summary.removed = prune_backups(root, keep)
    return summary


def _new_folder(root: Path) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for n in range(1000):
        folder = root / (stamp if n == 0 else f"{stamp}-{n}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise BackupError(f"cannot make a new backup folder in {root}")


def _snapshot_db(db: Path, dest: Path) -> None:
    """SQLite's online backup: one consistent snapshot, even while the server writes."""
    src = sqlite3.connect(db)
    try:
        src.execute("PRAGMA busy_timeout=5000")
        out = sqlite3.connect(dest)
        try:
            src.backup(out)
            out.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
        finally:
            out.close()
    finally:
        src.close()


def _take(
    data_dir: Path,
    folder: Path,
    rel: str,
    manifest: dict[str, dict[str, Any]],
    summary: BackupSummary,
) -> bool:
    """Hard-link (or copy) `data_dir/rel` to `folder/rel`; False if it is gone."""
    src, dest = data_dir / rel, folder / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dest)
        summary.linked += 1
    except FileNotFoundError:
        return False
    except OSError:  # another file system (EXDEV), or links not allowed: copy
        try:
            copy_file(src, dest)
        except FileNotFoundError:
            return False
        summary.copied += 1
    manifest[rel] = file_entry(dest)
    return True


def _take_parts(
    con: sqlite3.Connection,
    data_dir: Path,
    folder: Path,
    manifest: dict[str, dict[str, Any]],
    summary: BackupSummary,
) -> int:
    """The recorded parts of open uploads; a part missing or changed since the snapshot is
    dropped from the snapshot, so the restored upload resumes without it.

    An upload's data file keeps changing while parts arrive, so it is copied, never linked:
    only the recorded parts, each checked against its SHA-256, into a file of the same size.
    """
    uploads = con.execute(
        "SELECT id, size, part_size FROM uploads WHERE state = 'open' ORDER BY id"
    ).fetchall()
    dropped = 0
    for upload_id, size, part_size in uploads:
        parts = con.execute(
            "SELECT idx, size, sha256 FROM parts WHERE upload_id = ? ORDER BY idx", (upload_id,)
        ).fetchall()
        if not parts:
            continue
        rel = f"uploads/{upload_id}/data"
        kept = _copy_parts(data_dir / rel, folder / rel, size, part_size, parts)
        for idx, _, _ in parts:
            if idx not in kept:
                con.execute("DELETE FROM parts WHERE upload_id = ? AND idx = ?", (upload_id, idx))
                dropped += 1
        if kept:
            manifest[rel] = file_entry(folder / rel)
            summary.copied += 1
        else:
            (folder / rel).unlink(missing_ok=True)
    con.execute(
        "DELETE FROM parts WHERE upload_id NOT IN (SELECT id FROM uploads WHERE state = 'open')"
    )
    return dropped


def _copy_parts(
    src: Path, dest: Path, size: int, part_size: int, parts: list[tuple[int, int, str]]
) -> set[int]:
    """Copy the `parts` (idx, size, SHA-256) of `src` whose bytes match; the indices kept."""
    kept: set[int] = set()
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        fin = open(src, "rb")  # noqa: SIM115 (closed below; gone if the upload just ended)
    except FileNotFoundError:
        return kept
    with fin, open(dest, "xb") as fout:
        fout.truncate(size)
        for idx, length, sha in parts:
            fin.seek(idx * part_size)
            data = fin.read(length)
            if len(data) == length and hashlib.sha256(data).hexdigest() == sha:
                fout.seek(idx * part_size)
                fout.write(data)
                kept.add(idx)
        fout.flush()
        os.fsync(fout.fileno())
    return kept


def _write_manifest(folder: Path, data_dir: Path, files: dict[str, dict[str, Any]]) -> None:
    body = {
        "format": FORMAT,
        "version": 1,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cryomamba_version": __version__,
        "data_dir": str(data_dir.absolute()),
        "files": dict(sorted(files.items())),
    }
    tmp = folder / f"{MANIFEST}{TMP_MARK}{secrets.token_hex(4)}"
    with open(tmp, "w") as fh:
        json.dump(body, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, folder / MANIFEST)
    fsync_dir(folder)


# -- retention ----------------------------------------------------------------------------
def prune_backups(root: Path, keep: int) -> list[Path]:
    """Remove all but the newest `keep` complete backups; incomplete ones are left alone."""
    old = complete_backups(root)[:-keep]
    for path in old:
        (path / MANIFEST).unlink()  # incomplete from here on, if the removal is interrupted
        shutil.rmtree(path)
        log.info("removed old backup %s", path)
    return old
