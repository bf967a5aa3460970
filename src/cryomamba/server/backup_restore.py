"""Checking a backup against its manifest, and restoring it into a new data folder.

`restore_backup` re-hashes every file, refuses a damaged or incomplete backup and a
non-empty target, copies into a temporary folder beside the target, points the database's
file paths at the new folder, and renames the folder into place.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

from .backup_files import (
    DB_NAME,
    MANIFEST,
    SECRET_NAME,
    TMP_MARK,
    BackupError,
    connect,
    copy_file,
    read_manifest,
    resolve_backup,
    sha256_file,
)
from .part_store import fsync_dir

__all__ = ["restore_backup", "verify_backup"]

log = logging.getLogger(__name__)


# -- verifying ----------------------------------------------------------------------------
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
        elif sha256_file(path) != want["sha256"]:
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
            if copy_file(backup / rel, dest) != want["sha256"]:  # changed since it was verified
                problems.append(f"damaged: {rel} (SHA-256 differs)")
        if problems:
            raise _refuse(backup, problems)
        if (tmp / SECRET_NAME).exists():
            os.chmod(tmp / SECRET_NAME, 0o600)
        _repoint(tmp, final)
        fsync_dir(tmp)
        os.rename(tmp, final)  # replaces an empty folder in one step
        fsync_dir(final.parent)
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
    with connect(tmp / DB_NAME) as con:
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
