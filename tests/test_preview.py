"""Tests for cryomamba.preview: block-max downsampling and the WebSocket preview encoding."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import SlabSpy

from cryomamba.errors import InvalidVolumeError
from cryomamba.preview import decode_preview, downsample_labels, encode_preview


def block_max_reference(labels: np.ndarray, s: int) -> np.ndarray:
    """Whole-volume block maximum, padding the ragged edge with zeros."""
    padded = np.zeros([math.ceil(n / s) * s for n in labels.shape], labels.dtype)
    padded[tuple(slice(0, n) for n in labels.shape)] = labels
    z, y, x = (n // s for n in padded.shape)
    return padded.reshape(z, s, y, s, x, s).max(axis=(1, 3, 5)).astype(np.uint8)


@pytest.mark.parametrize("scale", range(1, 9))
def test_matches_whole_volume_block_max(scale):
    labels = np.random.default_rng(scale).integers(0, 4, (13, 10, 11), dtype=np.uint8)
    small = downsample_labels(labels, scale)
    assert small.dtype == np.uint8
    assert small.shape == tuple(math.ceil(n / scale) for n in labels.shape)
    np.testing.assert_array_equal(small, block_max_reference(labels, scale))


def test_thin_membrane_stays_visible_where_striding_loses_it():
    labels = np.zeros((16, 16, 16), np.uint8)
    labels[5] = 1  # a 1-voxel sheet off the stride grid
    idx = np.arange(16)
    labels[idx, idx, 3] = 2  # a 1-voxel diagonal line
    assert not (labels[::4, ::4, ::4] == 1).any()  # plain striding drops the sheet
    small = downsample_labels(labels, 4)
    assert (small[1] >= 1).all()  # block z=4..7 holds the sheet everywhere
    for b in range(4):
        assert small[b, b, 0] == 2  # the line shows in every block it crosses


def test_higher_label_wins_and_background_never_hides():
    labels = np.zeros((2, 2, 2), np.uint8)
    labels[0, 0, 0], labels[1, 1, 1] = 3, 1
    assert downsample_labels(labels, 2).item() == 3
    labels[0, 0, 0] = 0
    assert downsample_labels(labels, 2).item() == 1


def test_reads_z_blocks_of_scale_planes_only():
    labels = np.random.default_rng(0).integers(0, 3, (23, 9, 7), dtype=np.uint8)
    spy = SlabSpy(labels)
    np.testing.assert_array_equal(downsample_labels(spy, 3), block_max_reference(labels, 3))
    assert max(spy.reads) <= 3 and sum(spy.reads) == 23


def test_works_on_a_memmap_and_other_integer_dtypes(tmp_path):
    labels = np.random.default_rng(1).integers(0, 5, (9, 8, 7), dtype=np.uint16)
    mm = np.memmap(tmp_path / "labels.raw", dtype=np.uint16, mode="w+", shape=labels.shape)
    mm[:] = labels
    mm.flush()
    ro = np.memmap(tmp_path / "labels.raw", dtype=np.uint16, mode="r", shape=labels.shape)
    np.testing.assert_array_equal(downsample_labels(ro, 2), block_max_reference(labels, 2))
    mask = labels > 2
    np.testing.assert_array_equal(downsample_labels(mask, 2), block_max_reference(mask, 2))


def test_empty_volume_gives_empty_preview():
    assert downsample_labels(np.zeros((0, 5, 5), np.uint8), 2).shape == (0, 3, 3)


@pytest.mark.parametrize("scale", [0, 9, -1, 2.0, True, "2", None])
def test_scale_out_of_range_or_not_an_int(scale):
    with pytest.raises(ValueError, match=r"1\.\.8"):
        downsample_labels(np.zeros((4, 4, 4), np.uint8), scale)


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        (np.zeros((4, 4, 4), np.float32), "integers"),
        (np.zeros((4, 4), np.uint8), "3-D"),
        (np.full((4, 4, 4), 300, np.uint16), "0..255"),
        (np.full((4, 4, 4), -1, np.int16), "0..255"),
        ([[[0]]], "must be an array"),
    ],
)
def test_bad_label_arrays_are_refused(labels, match):
    with pytest.raises(InvalidVolumeError, match=match):
        downsample_labels(labels, 2)


def test_encode_is_json_ready_and_round_trips():
    small = np.random.default_rng(2).integers(0, 4, (3, 5, 6), dtype=np.uint8)
    payload = encode_preview(small, 4)
    assert payload["scale"] == 4 and payload["shape"] == [3, 5, 6] and payload["dtype"] == "uint8"
    scale, back = decode_preview(json.loads(json.dumps(payload)))
    assert scale == 4
    np.testing.assert_array_equal(back, small)
    back[0, 0, 0] = 9  # the decoded array is the caller's to change
    # non-contiguous input encodes the logical array, not the memory layout
    _, t = decode_preview(encode_preview(np.ascontiguousarray(small.T).T, 2))
    np.testing.assert_array_equal(t, small)


def test_encode_refuses_other_dtypes():
    with pytest.raises(ValueError, match="uint8"):
        encode_preview(np.zeros((2, 2, 2), np.int64), 2)


def _payload(**change):
    d = encode_preview(np.ones((2, 3, 4), np.uint8), 2)
    d.update(change)
    return d


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (_payload(shape=[2, 3, 5]), r"holds 24 bytes but shape \[2, 3, 5\] x uint8 needs 30"),
        (_payload(data=encode_preview(np.ones((2, 3, 3), np.uint8), 2)["data"]), "needs 24"),
        (_payload(dtype="uint16"), "dtype"),
        (_payload(data="not base64!"), "base64"),
        (_payload(data=None), "base64"),
        (_payload(shape="2,3,4"), "shape"),
        (_payload(shape=[2, -3, 4]), "shape"),
        (_payload(scale=12), r"1\.\.8"),
        ({"scale": 2, "shape": [1, 1, 1]}, "missing dtype, data"),
        ([1, 2], "dict"),
    ],
)
def test_decode_rejects_inconsistent_payloads(payload, match):
    with pytest.raises(ValueError, match=match):
        decode_preview(payload)


def test_public_api():
    import cryomamba.preview as preview

    assert set(preview.__all__) == {
        "MAX_SCALE",
        "PreviewBuilder",
        "decode_preview",
        "downsample_labels",
        "encode_preview",
    }


def test_preview_builder_takes_in_whole_blocks_and_the_end():
    from cryomamba.preview import PreviewBuilder

    labels = np.zeros((5, 4, 4), np.uint8)
    builder = PreviewBuilder(labels, 2)
    labels[:3] = 1
    builder.update(3)  # planes 0..2 finished: only the first block of 2 is whole
    first = builder.event()
    assert first.shape == (5, 4, 4) and first.planes_done == 3
    assert first.labels.shape == (3, 2, 2)
    assert first.labels[0].all() and not first.labels[1:].any()
    labels[3:] = 2
    builder.update(5)  # the end: the last, partial block too
    last = builder.event()
    assert last.labels[1].max() == 2 and last.labels[2].max() == 2
    assert not first.labels[1:].any()  # an event is a copy, not a view that changes later
