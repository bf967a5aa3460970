"""The server's SQLite database (WAL): upload sessions and their parts, files, jobs.

Every write is a committed transaction with `synchronous=FULL`, so what the server has
acknowledged survives a crash of the process or the machine. One connection, one lock:
the writes are tiny and the event loop and job threads share it safely.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["Storage", "new_id"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS uploads (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, filename TEXT NOT NULL, size INTEGER NOT NULL,
    sha256 TEXT, part_size INTEGER NOT NULL, parts_total INTEGER NOT NULL,
    state TEXT NOT NULL, file_id TEXT, created_at REAL NOT NULL, expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS uploads_fingerprint ON uploads (owner, filename, size, sha256);
CREATE TABLE IF NOT EXISTS parts (
    upload_id TEXT NOT NULL, idx INTEGER NOT NULL, size INTEGER NOT NULL, sha256 TEXT NOT NULL,
    PRIMARY KEY (upload_id, idx)
);
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, filename TEXT NOT NULL, path TEXT NOT NULL,
    size INTEGER NOT NULL, sha256 TEXT NOT NULL, meta TEXT NOT NULL, created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, state TEXT NOT NULL, device TEXT,
    created_at REAL NOT NULL, started_at REAL, finished_at REAL,
    source TEXT NOT NULL, config TEXT NOT NULL, model TEXT NOT NULL,
    progress TEXT, error TEXT, artifacts TEXT
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, created_at);
CREATE TABLE IF NOT EXISTS webhooks (
    id TEXT PRIMARY KEY, job_id TEXT NOT NULL, event TEXT NOT NULL, url TEXT NOT NULL,
    state TEXT NOT NULL, attempts INTEGER NOT NULL, created_at REAL NOT NULL,
    next_at REAL NOT NULL, delivered_at REAL, last_error TEXT, UNIQUE (job_id, event)
);
CREATE INDEX IF NOT EXISTS webhooks_due ON webhooks (state, next_at);
"""

# Columns added after a database may have been made: (table, column, type).
_ADDED_COLUMNS = (("jobs", "notify_url", "TEXT"), ("uploads", "fingerprint", "TEXT"))

_TERMINAL = ("completed", "failed", "canceled")

# The webhook outbox row for a job that has just ended and names a notify_url (none else).
_OUTBOX_INSERT = (
    "INSERT OR IGNORE INTO webhooks (id, job_id, event, url, state, attempts, created_at, "
    "next_at) SELECT lower(hex(randomblob(16))), id, state, notify_url, 'pending', 0, ?, ? "
    "FROM jobs WHERE id = ? AND notify_url IS NOT NULL "
    "AND state IN ('completed', 'failed', 'canceled')"
)

_JSON_COLUMNS = {"meta", "source", "config", "model", "progress", "error", "artifacts"}


def new_id() -> str:
    return uuid.uuid4().hex


class Storage:
    """Thin, typed access to the tables; rows come back as plain dicts with JSON decoded."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(SCHEMA)
        self._add_columns()

    def _add_columns(self) -> None:
        """An older database gains the columns added since (SQLite's ADD COLUMN is cheap)."""
        for table, column, kind in _ADDED_COLUMNS:
            have = {r["name"] for r in self._db.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                try:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
                except sqlite3.OperationalError as exc:  # another process added it first
                    if "duplicate column" not in str(exc):
                        raise

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- plumbing ---------------------------------------------------------------------------
    def _run(self, sql: str, params: Iterable[Any] = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._db.execute(sql, tuple(params))

    def _rows(self, sql: str, params: Iterable[Any] = ()) -> list[dict[str, Any]]:
        with self._lock:
            return [_decode(r) for r in self._db.execute(sql, tuple(params)).fetchall()]

    def _one(self, sql: str, params: Iterable[Any] = ()) -> dict[str, Any] | None:
        rows = self._rows(sql, params)
        return rows[0] if rows else None

    def _insert(self, table: str, row: dict[str, Any]) -> None:
        cols = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        self._run(f"INSERT INTO {table} ({cols}) VALUES ({marks})", map(_encode, row.values()))

    def _update(self, table: str, ident: str, fields: dict[str, Any]) -> None:
        sets = ", ".join(f"{k} = ?" for k in fields)
        self._run(
            f"UPDATE {table} SET {sets} WHERE id = ?", [*map(_encode, fields.values()), ident]
        )

    # -- uploads ----------------------------------------------------------------------------
    def add_upload(self, row: dict[str, Any]) -> None:
        self._insert("uploads", row)

    def upload(self, upload_id: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM uploads WHERE id = ?", [upload_id])

    def resumable_upload(
        self,
        owner: str,
        filename: str,
        size: int,
        sha256: str | None,
        now: float,
        fingerprint: str | None = None,
    ) -> dict[str, Any] | None:
        """The newest open (or completed) upload of the same file by the same owner.

        Matched by its SHA-256 or, failing that, by the client's fingerprint. A fingerprint
        samples the file and proves nothing: an open upload it resumes is checked against
        the whole SHA-256 at `complete`, and a client handed a completed one compares the
        file's `sha256` with its own before it uses the file.
        """
        if sha256 is not None:
            key, value = "sha256", sha256
        elif fingerprint is not None:
            key, value = "fingerprint", fingerprint
        else:
            return None
        return self._one(
            f"SELECT * FROM uploads WHERE owner = ? AND filename = ? AND size = ? "
            f"AND {key} = ? AND state IN ('open', 'completed') AND expires_at > ? "
            "ORDER BY created_at DESC LIMIT 1",
            [owner, filename, size, value, now],
        )

    def update_upload(self, upload_id: str, **fields: Any) -> None:
        self._update("uploads", upload_id, fields)

    def add_part(self, upload_id: str, idx: int, size: int, sha256: str) -> None:
        self._run(
            "INSERT OR REPLACE INTO parts (upload_id, idx, size, sha256) VALUES (?, ?, ?, ?)",
            [upload_id, idx, size, sha256],
        )

    def parts(self, upload_id: str) -> dict[int, dict[str, Any]]:
        rows = self._rows("SELECT * FROM parts WHERE upload_id = ? ORDER BY idx", [upload_id])
        return {r["idx"]: r for r in rows}

    def delete_part(self, upload_id: str, idx: int) -> None:
        self._run("DELETE FROM parts WHERE upload_id = ? AND idx = ?", [upload_id, idx])

    def delete_parts(self, upload_id: str) -> None:
        self._run("DELETE FROM parts WHERE upload_id = ?", [upload_id])

    def expired_uploads(self, now: float) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM uploads WHERE state = 'open' AND expires_at <= ?", [now])

    def open_upload_ids(self) -> set[str]:
        return {r["id"] for r in self._rows("SELECT id FROM uploads WHERE state = 'open'")}

    # -- files ------------------------------------------------------------------------------
    def add_file(self, row: dict[str, Any]) -> None:
        self._insert("files", row)

    def file(self, file_id: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM files WHERE id = ?", [file_id])

    def file_paths(self) -> set[str]:
        return {r["path"] for r in self._rows("SELECT path FROM files")}

    def complete_upload(self, upload_id: str, file_row: dict[str, Any]) -> None:
        """Record the assembled file and close the upload in one transaction."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                cols = ", ".join(file_row)
                marks = ", ".join("?" for _ in file_row)
                self._db.execute(
                    f"INSERT INTO files ({cols}) VALUES ({marks})",
                    tuple(map(_encode, file_row.values())),
                )
                self._db.execute(
                    "UPDATE uploads SET state = 'completed', file_id = ?, sha256 = ? WHERE id = ?",
                    (file_row["id"], file_row["sha256"], upload_id),
                )
                self._db.execute("DELETE FROM parts WHERE upload_id = ?", (upload_id,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    # -- jobs -------------------------------------------------------------------------------
    def add_job(self, row: dict[str, Any]) -> None:
        self._insert("jobs", row)

    def job(self, job_id: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM jobs WHERE id = ?", [job_id])

    def jobs(
        self, owner: str | None = None, state: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        where, params = [], []
        if owner is not None:
            where.append("owner = ?")
            params.append(owner)
        if state is not None:
            where.append("state = ?")
            params.append(state)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        return self._rows(
            f"SELECT * FROM jobs {clause} ORDER BY created_at DESC LIMIT ?", [*params, limit]
        )

    def update_job(self, job_id: str, **fields: Any) -> None:
        """Update a job; one that ends (a terminal state) gets its webhook outbox row in the
        same transaction, so a crash cannot lose the notification."""
        if fields.get("state") not in _TERMINAL:
            self._update("jobs", job_id, fields)
            return
        sets = ", ".join(f"{k} = ?" for k in fields)
        now = fields.get("finished_at") or time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    f"UPDATE jobs SET {sets} WHERE id = ?",
                    (*map(_encode, fields.values()), job_id),
                )
                self._db.execute(_OUTBOX_INSERT, (now, now, job_id))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def jobs_in(self, *states: str) -> list[dict[str, Any]]:
        marks = ", ".join("?" for _ in states)
        return self._rows(
            f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY created_at", states
        )

    def claim_next(self, device: str, started_at: float) -> dict[str, Any] | None:
        """Atomically move the oldest queued job this device may run to `running`."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(
                    "SELECT id FROM jobs WHERE state = 'queued' AND (device IS NULL OR device = ?)"
                    " ORDER BY created_at LIMIT 1",
                    (device,),
                ).fetchone()
                if row is not None:
                    self._db.execute(
                        "UPDATE jobs SET state = 'running', device = ?, started_at = ? "
                        "WHERE id = ?",
                        (device, started_at, row["id"]),
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return self.job(row["id"]) if row is not None else None

    def cancel_if_queued(self, job_id: str, finished_at: float) -> bool:
        """Cancel a job that has not started; False if it had already left the queue."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                cur = self._db.execute(
                    "UPDATE jobs SET state = 'canceled', finished_at = ? "
                    "WHERE id = ? AND state = 'queued'",
                    (finished_at, job_id),
                )
                if cur.rowcount == 1:
                    self._db.execute(_OUTBOX_INSERT, (finished_at, finished_at, job_id))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return cur.rowcount == 1

    def queue_position(self, job_id: str, created_at: float) -> int:
        row = self._one(
            "SELECT COUNT(*) AS n FROM jobs WHERE state = 'queued' AND created_at < ?",
            [created_at],
        )
        return int(row["n"]) if row else 0

    # -- webhook outbox ---------------------------------------------------------------------
    def due_webhooks(self, now: float, limit: int = 50) -> list[dict[str, Any]]:
        return self._rows(
            "SELECT * FROM webhooks WHERE state = 'pending' AND next_at <= ? "
            "ORDER BY next_at LIMIT ?",
            [now, limit],
        )

    def webhook(self, job_id: str) -> dict[str, Any] | None:
        """A job's delivery (a job ends once, so it has at most one)."""
        return self._one(
            "SELECT * FROM webhooks WHERE job_id = ? ORDER BY created_at DESC LIMIT 1", [job_id]
        )

    def update_webhook(self, webhook_id: str, **fields: Any) -> None:
        self._update("webhooks", webhook_id, fields)

    def count_by_state(self) -> dict[str, int]:
        rows = self._rows("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
        return {r["state"]: r["n"] for r in rows}


def _encode(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, (dict, list)) else value


def _decode(row: sqlite3.Row) -> dict[str, Any]:
    out = dict(row)
    for key in _JSON_COLUMNS & out.keys():
        if out[key] is not None:
            out[key] = json.loads(out[key])
    return out
