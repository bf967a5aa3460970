"""The whole-file SHA-256 of each open upload, kept up to date as its parts arrive.

Parts may arrive in any order, but SHA-256 must see the bytes in order. Each upload keeps
one running hash over its contiguous prefix of recorded parts: a part that extends the
prefix is fed from memory as it arrives; one that arrives early waits in `ready`, and is
read back from the upload's data file once the gap before it closes. `complete` then only
asks for the digest, which costs nothing when every part arrived.

hashlib objects cannot be saved (Python exposes no way to export or restore their internal
state), so after a restart, or when a part the hash had already seen is replaced, the
state is rebuilt by reading the recorded prefix from the data file once.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

__all__ = ["RunningHashes"]

_BLOCK = 4 << 20  # read-back block: bounds memory when a gap of many parts closes


class _State:
    """One upload: its hash over parts [0, next) and the recorded parts beyond the gap."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sha = hashlib.sha256()
        self.next = 0
        self.ready: set[int] = set()
        self.valid = False  # False until built from the records (fresh, or after a reset)


class RunningHashes:
    """Whole-file SHA-256s of open uploads, fed in order as parts arrive (thread-safe).

    `recorded(upload_id)` returns the part indices the database holds: the state is built
    from it after a restart, and re-synced from it whenever a digest is asked for.
    """

    def __init__(self, data_file: Callable[[str], Path], recorded: Callable[[str], Iterable[int]]):
        self._data_file, self._recorded = data_file, recorded
        self._states: dict[str, _State] = {}
        self._lock = threading.Lock()

    def _state(self, upload_id: str) -> _State:
        with self._lock:
            return self._states.setdefault(upload_id, _State())

    def add(self, row: dict[str, Any], idx: int, data: bytes | bytearray | memoryview) -> None:
        """Part `idx` (`data`) was recorded: feed it now if it extends the prefix.

        A part the hash already took (read back by a digest or a rebuild) is not fed twice;
        a part that replaces other bytes must be announced with `replaced` first.
        """
        state = self._state(row["id"])
        with state.lock:
            if not state.valid:
                self._rebuild(state, row, skip=idx)  # after a restart, or a replacement
            if idx < state.next:
                return
            if idx == state.next:
                state.sha.update(data)
                state.next += 1
                state.ready.discard(idx)
                self._advance(state, row)
            else:
                state.ready.add(idx)

    def replaced(self, upload_id: str, idx: int) -> None:
        """Part `idx` is about to be overwritten with other bytes: forget what it fed."""
        state = self._state(upload_id)
        with state.lock:
            if idx < state.next:
                self._reset(state)
            state.ready.discard(idx)

    def digest(self, row: dict[str, Any]) -> str | None:
        """The whole file's SHA-256 once every part is in the hash (reading back any not)."""
        state = self._state(row["id"])
        with state.lock:
            self._rebuild(state, row)
            if state.next < row["parts_total"]:
                return None
            return state.sha.hexdigest()

    def hashed_parts(self, upload_id: str) -> int:
        """How many leading parts the running hash holds (for tests and the log)."""
        state = self._state(upload_id)
        with state.lock:
            return state.next if state.valid else 0

    def forget(self, upload_id: str) -> None:
        with self._lock:
            self._states.pop(upload_id, None)

    # -- plumbing (callers hold state.lock) ---------------------------------------------------
    @staticmethod
    def _reset(state: _State) -> None:
        state.sha, state.next, state.ready, state.valid = hashlib.sha256(), 0, set(), False

    def _rebuild(self, state: _State, row: dict[str, Any], skip: int = -1) -> None:
        """Take every recorded part beyond the prefix (but `skip`) into `ready`, advance."""
        state.ready |= {i for i in self._recorded(row["id"]) if i >= state.next and i != skip}
        state.valid = True
        self._advance(state, row)

    def _advance(self, state: _State, row: dict[str, Any]) -> None:
        """Feed the parts that now follow the prefix, read back from the data file."""
        if state.next not in state.ready:
            return
        part_size, size = row["part_size"], row["size"]
        fd = os.open(self._data_file(row["id"]), os.O_RDONLY)
        try:
            while state.next in state.ready:
                state.ready.discard(state.next)
                start = state.next * part_size
                end = min(start + part_size, size)
                while start < end:
                    block = os.pread(fd, min(_BLOCK, end - start), start)
                    if not block:
                        raise OSError(f"upload {row['id']}: data file shorter than {end} bytes")
                    state.sha.update(block)
                    start += len(block)
                state.next += 1
        except BaseException:
            self._reset(state)  # half-fed: rebuild from the records next time
            raise
        finally:
            os.close(fd)
