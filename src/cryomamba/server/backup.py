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

`restore_backup` re-hashes every file, refuses a damaged or incomplete backup and a
non-empty target, copies into a temporary folder beside the target, points the database's
file paths at the new folder, and renames the folder into place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._version import __version__
from ..errors import CryoMambaError

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

FORMAT = "cryomamba-backup"
MANIFEST = "manifest.json"
DB_NAME = "cryomamba.sqlite3"
SECRET_NAME = "secret.key"
STAMP = re.compile(r"^\d{8}T\d{6}Z(-\d+)?$")
TMP_MARK = ".tmp-"


class BackupError(CryoMambaError):
    """A backup that cannot be taken, verified or restored."""

    code = "backup_error"


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
    with _connect(snapshot) as con:
        for (path,) in con.execute("SELECT path FROM files").fetchall():
            if not _take(data_dir, folder, f"raw/{Path(path).name}", manifest, summary):
                log.warning("raw/%s is recorded but missing from %s", Path(path).name, data_dir)
        for (job_id,) in con.execute("SELECT id FROM jobs WHERE state = 'completed'").fetchall():
            job_dir = data_dir / "artifacts" / job_id
            for f in sorted(job_dir.iterdir()) if job_dir.is_dir() else []:
                if f.is_file() and not f.name.startswith(TMP_MARK):
                    _take(data_dir, folder, f"artifacts/{job_id}/{f.name}", manifest, summary)
        summary.dropped_parts = _take_parts(con, data_dir, folder, manifest, summary)
    manifest[DB_NAME] = _entry(snapshot)
    secret = data_dir / SECRET_NAME
    if secret.is_file():
        fd = os.open(folder / SECRET_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(secret.read_bytes())
            out.flush()
            os.fsync(out.fileno())
        manifest[SECRET_NAME] = _entry(folder / SECRET_NAME)
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


class _connect:
    """A connection closed (not just committed) at the end of the `with` block."""

    def __init__(self, path: Path) -> None:
        self.con = sqlite3.connect(path, isolation_level=None)

    def __enter__(self) -> sqlite3.Connection:
        return self.con

    def __exit__(self, *exc: object) -> None:
        self.con.close()


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
            _copy(src, dest)
        except FileNotFoundError:
            return False
        summary.copied += 1
    manifest[rel] = _entry(dest)
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
            manifest[rel] = _entry(folder / rel)
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
    _fsync_dir(folder)


# -- retention ----------------------------------------------------------------------------
def complete_backups(root: Path) -> list[Path]:
    """The complete backups (with a manifest) in `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STAMP.match(p.name) and (p / MANIFEST).is_file()]
    return sorted(found, key=_order)


def _order(path: Path) -> tuple[str, int]:
    stamp, _, n = path.name.partition("-")
    return stamp, int(n or 0)


def prune_backups(root: Path, keep: int) -> list[Path]:
    """Remove all but the newest `keep` complete backups; incomplete ones are left alone."""
    old = complete_backups(root)[:-keep]
    for path in old:
        (path / MANIFEST).unlink()  # incomplete from here on, if the removal is interrupted
        shutil.rmtree(path)
        log.info("removed old backup %s", path)
    return old


# -- verifying ----------------------------------------------------------------------------
def resolve_backup(path: Path) -> Path:
    """`path` if it is one backup, else the newest complete backup in it."""
    if (path / MANIFEST).exists() or (path / DB_NAME).exists():
        return path
    if not path.is_dir():
        raise BackupError(f"no backup at {path}", hint="name a backup folder or the --to folder")
    found = complete_backups(path)
    if not found:
        raise BackupError(
            f"no complete backup in {path}",
            hint="a backup without manifest.json was interrupted; take a new one",
        )
    return found[-1]


def read_manifest(backup: Path) -> dict[str, Any]:
    path = backup / MANIFEST
    if not path.is_file():
        raise BackupError(
            f"{backup} is incomplete: it has no {MANIFEST} (the backup was interrupted)",
            hint="take a new backup, or restore an older, complete one",
        )
    try:
        body = json.loads(path.read_text())
        if body.get("format") != FORMAT or not isinstance(body.get("files"), dict):
            raise ValueError("not a CryoMamba backup manifest")
    except (ValueError, AttributeError) as exc:
        raise BackupError(
            f"{path} is damaged: {exc}", hint="restore an older, complete backup"
        ) from None
    return body


def verify_backup(backup: Path) -> tuple[dict[str, Any], list[str]]:
    """The manifest and every problem found: files missing, changed or unexpected."""
    manifest = read_manifest(backup)
    files: dict[str, dict[str, Any]] = manifest["files"]
    problems = []
    for rel, want in files.items():
        path = backup / rel
        if not path.is_file():
            problems.append(f"missing: {rel}")
        elif path.stat().st_size != want["size"]:
            problems.append(f"wrong size: {rel} ({path.stat().st_size}, not {want['size']})")
        elif _sha256(path) != want["sha256"]:
            problems.append(f"damaged: {rel} (SHA-256 differs)")
    for path in sorted(backup.rglob("*")):
        rel = path.relative_to(backup).as_posix()
        if path.is_file() and rel != MANIFEST and rel not in files:
            problems.append(f"unexpected: {rel}")
    return manifest, problems


def _refuse(backup: Path, problems: list[str]) -> BackupError:
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return BackupError(
        f"backup {backup} is damaged: {problems[0]}{more}",
        hint=f"`cryomamba backup verify {backup}` lists every problem; restore an older backup",
    )


# -- restoring ----------------------------------------------------------------------------
def restore_backup(backup: Path, data_dir: Path) -> Path:
    """Restore `backup` into `data_dir` (absent or empty), atomically; the backup used."""
    backup = resolve_backup(backup)
    if data_dir.exists() and (not data_dir.is_dir() or any(data_dir.iterdir())):
        raise BackupError(
            f"{data_dir} is not empty",
            hint="restore into a new or empty folder, then point the server's --data-dir at it",
        )
    manifest, problems = verify_backup(backup)
    if problems:
        raise _refuse(backup, problems)
    final = data_dir.absolute()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}{TMP_MARK}{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        problems = []
        for rel, want in manifest["files"].items():
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            if _copy(backup / rel, dest) != want["sha256"]:  # changed since it was verified
                problems.append(f"damaged: {rel} (SHA-256 differs)")
        if problems:
            raise _refuse(backup, problems)
        if (tmp / SECRET_NAME).exists():
            os.chmod(tmp / SECRET_NAME, 0o600)
        _repoint(tmp, final)
        _fsync_dir(tmp)
        os.rename(tmp, final)  # replaces an empty folder in one step
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("restored %s into %s", backup, final)
    return backup


def _repoint(tmp: Path, final: Path) -> None:
    """Point file rows (and jobs made from them) at `final/raw/`, where they will be.

    A job records the [device, inode] of its file; renaming the folder keeps both, so the
    identity is read from the copy now.
    """
    with _connect(tmp / DB_NAME) as con:
        con.execute("BEGIN")
        new_paths: dict[str, str] = {}
        for file_id, path in con.execute("SELECT id, path FROM files").fetchall():
            new_paths[file_id] = str(final / "raw" / Path(path).name)
            con.execute("UPDATE files SET path = ? WHERE id = ?", (new_paths[file_id], file_id))
        for job_id, source in con.execute("SELECT id, source FROM jobs").fetchall():
            src = json.loads(source)
            if src.get("file_id") not in new_paths:
                continue
            name = Path(new_paths[src["file_id"]]).name
            src["path"] = new_paths[src["file_id"]]
            if (tmp / "raw" / name).is_file():
                st = os.stat(tmp / "raw" / name)
                src["identity"] = [st.st_dev, st.st_ino]
            con.execute("UPDATE jobs SET source = ? WHERE id = ?", (json.dumps(src), job_id))
        con.execute("COMMIT")


# -- plumbing -----------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(4 << 20):
            digest.update(block)
    return digest.hexdigest()


def _entry(path: Path) -> dict[str, Any]:
    return {"sha256": _sha256(path), "size": path.stat().st_size}


def _copy(src: Path, dest: Path) -> str:
    """Copy `src` to a new file `dest`, fsynced; the SHA-256 of what was written."""
    digest = hashlib.sha256()
    with open(src, "rb") as fin, open(dest, "xb") as fout:
        while block := fin.read(4 << 20):
            digest.update(block)
            fout.write(block)
        fout.flush()
        os.fsync(fout.fileno())
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
