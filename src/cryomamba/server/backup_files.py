"""What a backup folder holds (names, manifest), and the durable, hashed file operations on it."""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
from pathlib import Path
from typing import Any

from ..errors import CryoMambaError

__all__ = [
    "DB_NAME",
    "FORMAT",
    "MANIFEST",
    "SECRET_NAME",
    "STAMP",
    "TMP_MARK",
    "BackupError",
    "complete_backups",
    "connect",
    "copy_file",
    "file_entry",
    "read_manifest",
    "resolve_backup",
    "sha256_file",
]

FORMAT = "cryomamba-backup"
MANIFEST = "manifest.json"
DB_NAME = "cryomamba.sqlite3"
SECRET_NAME = "secret.key"
STAMP = re.compile(r"^\d{8}T\d{6}Z(-\d+)?$")
TMP_MARK = ".tmp-"


class BackupError(CryoMambaError):
    """A backup that cannot be taken, verified or restored."""

    code = "backup_error"


# -- finding backups ----------------------------------------------------------------------
def complete_backups(root: Path) -> list[Path]:
    """The complete backups (with a manifest) in `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STAMP.match(p.name) and (p / MANIFEST).is_file()]
    return sorted(found, key=_order)


def _order(path: Path) -> tuple[str, int]:
    stamp, _, n = path.name.partition("-")
    return stamp, int(n or 0)


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
    """The backup's manifest, checked to be one; incomplete or damaged: `BackupError`."""
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


# -- files ------------------------------------------------------------------------------
class connect:
    """A connection closed (not just committed) at the end of the `with` block."""

    def __init__(self, path: Path) -> None:
        self.con = sqlite3.connect(path, isolation_level=None)

    def __enter__(self) -> sqlite3.Connection:
        return self.con

    def __exit__(self, *exc: object) -> None:
        self.con.close()


def sha256_file(path: Path) -> str:
    """The file's SHA-256 (hex), read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(4 << 20):
            digest.update(block)
    return digest.hexdigest()


def file_entry(path: Path) -> dict[str, Any]:
    """The file's manifest entry: SHA-256 and size."""
    return {"sha256": sha256_file(path), "size": path.stat().st_size}


def copy_file(src: Path, dest: Path) -> str:
    """Copy `src` to a new file `dest`, fsynced; the SHA-256 of what was written."""
    digest = hashlib.sha256()
    with open(src, "rb") as fin, open(dest, "xb") as fout:
        while block := fin.read(4 << 20):
            digest.update(block)
            fout.write(block)
        fout.flush()
        os.fsync(fout.fileno())
    return digest.hexdigest()
