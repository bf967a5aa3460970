"""The running whole-file SHA-256 of an upload: in order, out of order, replaced, rebuilt.

A real data file on disk and a plain set standing in for the parts table; every digest is
checked against hashlib over the bytes the file holds.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from cryomamba.server.upload_hash import RunningHashes

PART = 1000
DATA = np.random.default_rng(0).bytes(5 * PART - 123)  # five parts, the last one short
CHUNKS = [DATA[i : i + PART] for i in range(0, len(DATA), PART)]
ROW = {"id": "u1", "size": len(DATA), "part_size": PART, "parts_total": len(CHUNKS)}


class Upload:
    """A data file and the recorded parts, written the way the part store writes them."""

    def __init__(self, tmp_path: Path) -> None:
        self.path = tmp_path / "data"
        self.path.write_bytes(bytes(len(DATA)))
        self.recorded: set[int] = set()
        self.hashes = RunningHashes(lambda _: self.path, lambda _: set(self.recorded))

    def put(self, idx: int, chunk: bytes) -> None:
        with open(self.path, "r+b") as f:
            f.seek(idx * PART)
            f.write(chunk)
        self.recorded.add(idx)
        self.hashes.add(ROW, idx, chunk)


@pytest.fixture
def upload(tmp_path) -> Upload:
    return Upload(tmp_path)


@pytest.mark.parametrize("order", [[0, 1, 2, 3, 4], [4, 3, 2, 1, 0], [1, 3, 0, 4, 2]])
def test_any_order_gives_the_whole_files_digest(upload, order):
    for n, idx in enumerate(order):
        upload.put(idx, CHUNKS[idx])
        if n < len(order) - 1:
            assert upload.hashes.digest(ROW) is None  # a part is still missing
    assert upload.hashes.digest(ROW) == hashlib.sha256(DATA).hexdigest()


def test_a_gap_closing_feeds_the_parts_after_it(upload):
    for idx in (1, 2, 4):
        upload.put(idx, CHUNKS[idx])
    assert upload.hashes.hashed_parts("u1") == 0
    upload.put(0, CHUNKS[0])  # read back 1 and 2 from the file
    assert upload.hashes.hashed_parts("u1") == 3
    upload.put(3, CHUNKS[3])
    assert upload.hashes.hashed_parts("u1") == 5


def test_a_replaced_part_starts_the_hash_again(upload):
    for idx, chunk in enumerate(CHUNKS):
        upload.put(idx, chunk)
    other = bytes(reversed(CHUNKS[1]))
    upload.hashes.replaced("u1", 1)
    upload.recorded.discard(1)
    upload.put(1, other)
    expected = CHUNKS[0] + other + b"".join(CHUNKS[2:])
    assert upload.hashes.digest(ROW) == hashlib.sha256(expected).hexdigest()


def test_after_a_restart_the_hash_is_rebuilt_from_the_file(upload):
    for idx in (0, 1, 3):
        upload.put(idx, CHUNKS[idx])
    upload.hashes.forget("u1")  # what a restart leaves: the records and the file
    upload.put(2, CHUNKS[2])
    assert upload.hashes.hashed_parts("u1") == 4
    upload.put(4, CHUNKS[4])
    assert upload.hashes.digest(ROW) == hashlib.sha256(DATA).hexdigest()


def test_a_part_recorded_but_not_fed_is_read_back_for_the_digest(upload):
    """A worker that died between the record and the feed: the digest reads the part."""
    for idx, chunk in enumerate(CHUNKS):
        if idx == 2:
            with open(upload.path, "r+b") as f:
                f.seek(2 * PART)
                f.write(chunk)
            upload.recorded.add(2)  # recorded, never fed
        else:
            upload.put(idx, chunk)
    assert upload.hashes.hashed_parts("u1") == 2
    assert upload.hashes.digest(ROW) == hashlib.sha256(DATA).hexdigest()


def test_a_short_data_file_resets_the_hash_and_says_so(upload):
    upload.put(1, CHUNKS[1])
    upload.path.write_bytes(DATA[: PART + 10])  # truncated behind the server's back
    with pytest.raises(OSError, match="shorter"):
        upload.put(0, CHUNKS[0])
    assert upload.hashes.hashed_parts("u1") == 0
