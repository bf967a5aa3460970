"""The one MRC writer: data, geometry and header statistics as any MRC reader expects."""

from __future__ import annotations

import mrcfile
import numpy as np
import pytest

from cryomamba import Volume
from cryomamba.mrc_write import write_mrc_volume


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.uint16, np.float32, np.float16])
def test_round_trip_with_the_statistics_mrcfile_computes(tmp_path, dtype):
    data = np.random.default_rng(0).integers(0, 100, size=(9, 7, 5)).astype(dtype)
    path = write_mrc_volume(
        tmp_path / "v.mrc",
        data,
        dtype=dtype,
        voxel_size=(20.0, 10.0, 5.0),
        origin=(1.0, 2.0, 3.0),
        nstart=(4, 5, 6),
        label="written by a test",
    )
    with mrcfile.open(path) as mrc:
        np.testing.assert_array_equal(mrc.data, data)
        h = mrc.header
        assert (h.nzstart, h.nystart, h.nxstart) == (4, 5, 6)
        assert int(h.nlabl) == 1 and h.label[0].startswith(b"written by a test")
        ours = (float(h.dmin), float(h.dmax), float(h.dmean), float(h.rms))
        mrc_copy = mrcfile.new(tmp_path / "ref.mrc", data=data)
        mrc_copy.update_header_stats()
        ref = mrc_copy.header
        expected = (float(ref.dmin), float(ref.dmax), float(ref.dmean), float(ref.rms))
        mrc_copy.close()
    np.testing.assert_allclose(ours, expected, rtol=1e-3)
    volume = Volume.open(path)
    assert volume.voxel_size == (20.0, 10.0, 5.0) and volume.origin == (1.0, 2.0, 3.0)
    volume.close()


def test_refuses_what_mrc_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        write_mrc_volume(
            tmp_path / "a.mrc", np.zeros((2, 2, 2), np.uint8), dtype=np.uint8, voxel_size=(1, 1, 1)
        )
    with pytest.raises(ValueError, match="3D"):
        write_mrc_volume(
            tmp_path / "b.mrc", np.zeros((2, 2), np.int8), dtype=np.int8, voxel_size=(1, 1, 1)
        )


def test_the_same_data_gives_the_same_bytes(tmp_path):
    data = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    a = write_mrc_volume(tmp_path / "a.mrc", data, dtype=np.float32, voxel_size=(1, 1, 1))
    b = write_mrc_volume(tmp_path / "b.mrc", data, dtype=np.float32, voxel_size=(1, 1, 1))
    assert a.read_bytes() == b.read_bytes()
