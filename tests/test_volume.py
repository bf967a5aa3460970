"""Tests for cryomamba.volume: real MRC files written by other programs, and files made here.

Every file in tests/data/real-mrc/ has an expected outcome in REAL_FILES; accepted files are
compared with an independent read (numpy.fromfile at the data offset, axes handled by hand).
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import itertools
import json
import logging
import math
import struct
import warnings
import weakref
from pathlib import Path
from typing import NamedTuple

import mrcfile
import numpy as np
import pytest
import tifffile

from cryomamba import volume as volume_module
from cryomamba.errors import InvalidVolumeError
from cryomamba.mrc_header import IMOD_STAMP
from cryomamba.volume import Volume, VolumeStats

REAL = Path(__file__).parent / "data" / "real-mrc"


class Accepted(NamedTuple):
    shape: tuple[int, int, int]  # (Z, Y, X)
    dtype: str  # as stored in the file
    voxel_size: tuple[float, float, float]  # (z, y, x), Å
    file_shape: tuple[int, int, int] | None = None  # (nz, ny, nx) when axes are permuted
    to_zyx: tuple[int, int, int] = (0, 1, 2)  # transpose of the file array that gives Z, Y, X
    nsymbt: int = 0


# Outcome for every file in the folder: Accepted(...) or a phrase the refusal must contain.
REAL_FILES: dict[str, Accepted | str] = {
    "chlamy_hsp60_relion_ispg0.mrc": Accepted((48, 48, 48), "<f4", (7.84, 7.84, 7.84)),
    "cylindra_beta_tubulin.mrc": Accepted((20, 20, 20), "<f4", (5.144, 5.144, 5.144)),
    # mapc/mapr/maps = 2,1,3: columns run along Y, rows along X (cross-checked once with gemmi).
    "gemmi_5i55_axes_213.ccp4": Accepted(
        (10, 8, 6), "<f4", (29.7 / 60, 10.5 / 24, 29.45 / 60), (10, 6, 8), (0, 2, 1), 160
    ),
    "imp_mini_nan_stats.mrc": Accepted((8, 10, 8), "<f4", (4.0, 4.0, 4.0)),
    "pyseg_tomo22_membrane_labels_int8.mrc": Accepted((50, 166, 166), "i1", (1.0, 1.0, 1.0)),
    "tardis_mrc3D_mode0.mrc": Accepted(
        (78, 64, 32), "u1", (1809.5999 / 78, 1484.7969 / 64, 742.39844 / 32)
    ),
    "tomodrgn_float16_stack.mrcs": Accepted((37, 32, 32), "<f2", (12.0, 12.0, 12.0)),
    "tomodrgn_warp_reconstruct_ispg0.mrc": Accepted((32, 32, 32), "<f4", (384.07678 / 32,) * 3),
    "README.md": "is not an MRC file",
    "tardis_tif3D_uint8_same_volume.tif": "is not an MRC file: it looks like a TIFF image",
    "imod_headertest_serialem_exthdr_no_data.st": "has no data",
    "imp_invalid_axes.mrc": "mapc/mapr/maps = (10, 11, 12): not a permutation of 1, 2, 3",
    "pytom_header_only.mrc": "has no data",
    "quoll_single_tilt_uint16_voxel0.mrc": "is a single 2D image (720×512)",
    "rosettasciio_fei2_exthdr_uint16_2d.mrc": "is a single 2D image (16×16)",
    "broken/header_truncated_500B.mrc": "is 500 bytes, shorter than the 1,024-byte MRC header",
    "broken/invalid_mode_99.mrc": "has mode 99",
    "broken/nonsense_dims.mrc": "impossible dimensions nx=-20, ny=0, nz=2147483647",
    "broken/truncated_data.mrc": (
        "is truncated: data block is 16.0 kB but the header (mode 2, float32, 20×20×20) "
        "promises 32.0 kB"
    ),
    "broken/wrong_mode.mrc": (
        "data block is 32.0 kB but the header (mode 1, int16, 20×20×20) promises 16.0 kB"
    ),
}


def _real_files() -> set[str]:
    return {p.relative_to(REAL).as_posix() for p in REAL.rglob("*") if p.is_file()}


@pytest.fixture
def no_memmap(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail if anything gets memory-mapped: refusals must happen before mapping."""

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("np.memmap called for a file that should be refused")

    monkeypatch.setattr(np, "memmap", boom)


def write_mrc(path: Path, data: np.ndarray, voxel_size=None, origin=None, **fields) -> Path:
    """An MRC written by mrcfile; `data` in file order (nz, ny, nx); extra header fields."""
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(data)
        if voxel_size is not None:
            mrc.voxel_size = voxel_size  # (x, y, z)
        if origin is not None:
            mrc.header.origin.x, mrc.header.origin.y, mrc.header.origin.z = origin
        for key, value in fields.items():
            mrc.header[key] = value
    return path


def patch(path: Path, offset: int, fmt: str, *values: object) -> None:
    """Overwrite header bytes in place, the way a buggy writer would have left them."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, *values))


def refusal(path: Path) -> str:
    with pytest.raises(InvalidVolumeError) as info:
        Volume.open(path)
    err = info.value
    assert err.code == "invalid_volume" and err.hint
    assert str(path) in err.message  # the message names the file
    return err.message


# -- the real files --------------------------------------------------------------------------


def test_every_real_file_has_an_expected_outcome() -> None:
    assert _real_files() == set(REAL_FILES)


@pytest.mark.parametrize("name", sorted(k for k, v in REAL_FILES.items() if isinstance(v, str)))
def test_real_file_is_refused(name: str, no_memmap: None) -> None:
    assert REAL_FILES[name] in refusal(REAL / name)


@pytest.mark.parametrize("name", sorted(k for k, v in REAL_FILES.items() if not isinstance(v, str)))
def test_real_file_is_read_correctly(name: str) -> None:
    want = REAL_FILES[name]
    assert isinstance(want, Accepted)
    with Volume.open(REAL / name) as vol:
        assert vol.shape == want.shape == vol.data.shape
        assert vol.dtype == np.dtype(want.dtype)
        assert vol.voxel_size == pytest.approx(want.voxel_size, rel=1e-6)
        assert vol.voxel_size_known
        assert isinstance(vol.data, np.memmap) and not vol.data.flags.writeable
        ref = np.fromfile(REAL / name, dtype=want.dtype, offset=1024 + want.nsymbt)
        ref = ref.reshape(want.file_shape or want.shape).transpose(want.to_zyx)
        np.testing.assert_array_equal(vol.data, ref)
        assert vol.nbytes == ref.nbytes


def test_mode0_unsigned_bytes_match_the_tiff_oracle() -> None:
    """TARDIS ships the same crop as uint8 TIFF: signedness and axis order must agree with it."""
    oracle = tifffile.imread(REAL / "tardis_tif3D_uint8_same_volume.tif")
    with Volume.open(REAL / "tardis_mrc3D_mode0.mrc") as vol:
        assert vol.dtype == np.uint8 and oracle.dtype == np.uint8
        np.testing.assert_array_equal(vol.data, oracle)
        assert vol.describe()["mode0_signedness"].startswith("uint8: header min/max 141..163")
        assert vol.stats().min == 141 and vol.stats().max == 163


def test_axis_order_213_and_origin_from_nstart_on_gemmi_map() -> None:
    with Volume.open(REAL / "gemmi_5i55_axes_213.ccp4") as vol:
        vz, vy, vx = vol.voxel_size
        # origin fields are 0; nxstart=50 (columns = Y), nystart=-8 (rows = X), nzstart=40
        assert vol.origin == pytest.approx((40 * vz, 50 * vy, -8 * vx))
        info = vol.describe()
        assert info["origin_source"] == "nxstart/nystart/nzstart"
        assert info["file_axes"] == "mapc/mapr/maps = 2, 1, 3"
        assert info["extended_header_size"] == 160 and info["space_group"] == 4
        assert info["cell_angles"][1] == pytest.approx(111.975)


def test_nan_header_stats_are_fine_stats_come_from_data() -> None:
    with Volume.open(REAL / "imp_mini_nan_stats.mrc") as vol:
        assert math.isnan(vol.describe()["header_min"])
        s = vol.stats()
        data = np.asarray(vol.data, dtype=np.float64)
        assert (s.min, s.max, s.nan_count) == (data.min(), data.max(), 0)
        assert vol.origin == (-44.0, 75.0, 55.0)  # header origin (x, y, z) = 55, 75, -44


def test_describe_serialem_tomogram() -> None:
    with Volume.open(REAL / "tardis_mrc3D_mode0.mrc") as vol:
        info = vol.describe()
    assert info["path"] == str(REAL / "tardis_mrc3D_mode0.mrc")
    assert info["mode"] == 0 and info["dtype"] == "uint8" and info["axis_order"] == "ZYX"
    assert info["shape"] == (78, 64, 32) and info["file_size"] == 160768
    assert info["byte_order"] == "little" and info["extended_header_type"] is None
    assert len(info["labels"]) == 10 and info["labels"][0].startswith("SerialEM: Digitized")
    assert info["labels"][-1].startswith("WARPVOL")
    assert (info["header_min"], info["header_max"]) == (141.0, 163.0)
    json.dumps(info)  # `cryomamba info --json` can print it


# -- files written here ------------------------------------------------------------------------


def test_round_trip_voxel_size_and_origin(tmp_path: Path) -> None:
    data = np.random.default_rng(0).normal(size=(6, 7, 8)).astype(np.float32)
    path = write_mrc(tmp_path / "a.mrc", data, voxel_size=(1.5, 2.5, 3.5), origin=(10, 20, -30))
    with Volume.open(path) as vol:
        assert vol.shape == (6, 7, 8) and vol.dtype == np.float32
        assert vol.voxel_size == (3.5, 2.5, 1.5) and vol.voxel_size_known
        assert vol.origin == (-30.0, 20.0, 10.0)
        assert vol.describe()["origin_source"] == "header origin"
        np.testing.assert_array_equal(vol.data, data)
        assert vol.header is not None and int(vol.header.mode) == 2
        assert vol.header.dtype.names == mrcfile.dtypes.HEADER_DTYPE.names
        assert vol.path == path


def test_origin_fields_win_over_nstart(tmp_path: Path) -> None:
    data = np.zeros((3, 4, 5), np.float32)
    fields = {"nxstart": 2, "nystart": 3, "nzstart": 4}
    path = write_mrc(tmp_path / "n.mrc", data, voxel_size=2.0, **fields)
    with Volume.open(path) as vol:
        assert vol.origin == (8.0, 6.0, 4.0)
    path = write_mrc(tmp_path / "o.mrc", data, voxel_size=2.0, origin=(1, 2, 3), **fields)
    with Volume.open(path) as vol:
        assert vol.origin == (3.0, 2.0, 1.0)


def test_voxel_size_zero_is_unknown(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_mrc(tmp_path / "v0.mrc", np.zeros((3, 4, 5), np.int16), voxel_size=0.0)
    with caplog.at_level(logging.WARNING, logger="cryomamba.volume"), Volume.open(path) as vol:
        assert vol.voxel_size == (1.0, 1.0, 1.0) and not vol.voxel_size_known
        assert "(unknown)" in repr(vol)
    assert "no voxel size in the header" in caplog.text


@pytest.mark.parametrize("mapc, mapr, maps", list(itertools.permutations((1, 2, 3))))
def test_axis_permutations(tmp_path: Path, mapc: int, mapr: int, maps: int) -> None:
    zyx = (3, 4, 5)
    vol_zyx = np.arange(np.prod(zyx), dtype=np.float32).reshape(zyx)
    size = {3: zyx[0], 2: zyx[1], 1: zyx[2]}  # crystal axis (1 = X) -> length
    file_data = np.empty((size[maps], size[mapr], size[mapc]), np.float32)
    for z, y, x in itertools.product(*map(range, zyx)):
        at = {3: z, 2: y, 1: x}
        file_data[at[maps], at[mapr], at[mapc]] = vol_zyx[z, y, x]
    voxel_xyz = (1.0, 2.0, 3.0)
    fields = dict(mapc=mapc, mapr=mapr, maps=maps, mx=size[1], my=size[2], mz=size[3])
    path = write_mrc(tmp_path / "p.mrc", file_data, origin=(10, 20, 30), **fields)
    with mrcfile.open(path, mode="r+") as mrc:
        mrc.header.cella = tuple(v * size[a] for v, a in zip(voxel_xyz, (1, 2, 3), strict=True))
    with Volume.open(path) as vol:
        assert vol.shape == zyx
        np.testing.assert_array_equal(vol.data, vol_zyx)
        assert isinstance(vol.data, np.memmap)  # a transposed view, not a copy
        assert vol.voxel_size == (3.0, 2.0, 1.0)
        assert vol.origin == (30.0, 20.0, 10.0)
        slabs = [s for _, s in vol.iter_slabs(2)]
        np.testing.assert_array_equal(np.concatenate(slabs), vol_zyx)


MODE0_CASES = [  # header dmin, dmax, IMOD stamp, IMOD flags -> how the bytes must be read
    (141.0, 163.0, 0, 0, "u1"),  # min/max only fit uint8 (the TARDIS/SerialEM case)
    (-5.0, 100.0, 0, 0, "i1"),  # a negative minimum only fits int8
    (0.0, 100.0, IMOD_STAMP, 0, "u1"),  # IMOD without the signed flag: unsigned
    (0.0, 100.0, IMOD_STAMP, 1, "i1"),  # IMOD with bit 0 set: signed
    (141.0, 163.0, IMOD_STAMP, 1, "u1"),  # min/max that int8 cannot hold beat the flag
    (0.0, 3.0, 0, 0, "i1"),  # nothing decides: the MRC2014 default
    (5.0, -1.0, 0, 0, "i1"),  # min > max: stats not computed
    (math.nan, math.nan, 0, 0, "i1"),
]


@pytest.mark.parametrize("dmin, dmax, stamp, flags, expected", MODE0_CASES)
def test_mode0_signedness(tmp_path: Path, dmin, dmax, stamp, flags, expected) -> None:
    raw = np.arange(2 * 8 * 16, dtype=np.uint16).astype(np.uint8).reshape(2, 8, 16)
    path = write_mrc(tmp_path / "m0.mrc", raw.view(np.int8))
    patch(path, 76, "<3f", dmin, dmax, 0.0)  # dmin, dmax, dmean
    patch(path, 152, "<2i", stamp, flags)  # imodStamp, imodFlags
    with Volume.open(path) as vol:
        assert vol.dtype == np.dtype(expected)
        np.testing.assert_array_equal(vol.data, raw.view(expected))
        assert vol.describe()["mode0_signedness"].startswith(np.dtype(expected).name)


def test_float16_mode12(tmp_path: Path) -> None:
    data = np.linspace(-2, 2, 3 * 4 * 5, dtype=np.float16).reshape(3, 4, 5)
    with Volume.open(write_mrc(tmp_path / "h.mrc", data)) as vol:
        assert vol.dtype == np.float16 and vol.describe()["mode"] == 12
        np.testing.assert_array_equal(vol.data, data)


def test_big_endian_file(tmp_path: Path) -> None:
    data = np.arange(2 * 3 * 4, dtype=">f4").reshape(2, 3, 4)
    with Volume.open(write_mrc(tmp_path / "be.mrc", data, voxel_size=2.0)) as vol:
        assert vol.describe()["byte_order"] == "big" and vol.voxel_size == (2.0, 2.0, 2.0)
        assert vol.dtype == np.float32 and vol.dtype.isnative
        np.testing.assert_array_equal(vol.data, data)
        assert vol.slab(0, 2).dtype.isnative
        assert vol.stats().max == 23.0


def test_image_stack_opens_but_is_not_a_tomogram(tmp_path: Path) -> None:
    path = write_mrc(tmp_path / "s.mrcs", np.ones((3, 4, 5), np.float32), ispg=0)
    with Volume.open(path) as vol:  # readable, to look at (napari, `cryomamba info`)
        assert vol.shape == (3, 4, 5) and vol.describe()["space_group"] == 0
        assert "stack of 3 2D images" in vol.describe()["image_stack"]
        with pytest.raises(InvalidVolumeError, match="is an image stack, not a tomogram") as info:
            vol.require_tomogram()
        assert ".mrcs extension" in info.value.message and "mz" in info.value.hint
    # the header alone can say so: space group 0 with one section per volume (mz = 1)
    path = write_mrc(tmp_path / "s.mrc", np.ones((3, 4, 5), np.float32), ispg=0)
    patch(path, 36, "<i", 1)  # mz
    with Volume.open(path) as vol:
        assert "space group 0, mz = 1" in vol.image_stack
    # ispg 0 with mz = nz (RELION and Warp reconstructions) is a volume
    for name in ("tomodrgn_warp_reconstruct_ispg0.mrc", "chlamy_hsp60_relion_ispg0.mrc"):
        with Volume.open(REAL / name) as vol:
            assert vol.image_stack is None and vol.describe()["image_stack"] is None
            vol.require_tomogram()


def test_the_real_mrcs_stack_is_refused_for_segmentation() -> None:
    with (
        Volume.open(REAL / "tomodrgn_float16_stack.mrcs") as vol,
        pytest.raises(InvalidVolumeError) as info,
    ):
        vol.require_tomogram()
    assert "tomodrgn_float16_stack.mrcs is an image stack, not a tomogram" in info.value.message
    assert "stack of 37 2D images" in info.value.message


def test_a_folder_is_refused_with_a_hint_naming_a_file_inside(tmp_path: Path) -> None:
    assert "is a folder, not an MRC file" in refusal(tmp_path)
    with pytest.raises(InvalidVolumeError) as info:
        Volume.open(tmp_path)
    assert "not a folder" in info.value.hint
    write_mrc(tmp_path / "b.mrc", np.ones((2, 2, 2), np.float32))
    write_mrc(tmp_path / "a.rec", np.ones((2, 2, 2), np.float32))
    with pytest.raises(InvalidVolumeError) as info:
        Volume.open(tmp_path)
    assert f"e.g. {tmp_path / 'a.rec'} (and 1 more)" in info.value.hint


def test_describe_shows_only_the_labels_the_header_counts(tmp_path: Path) -> None:
    path = write_mrc(tmp_path / "l.mrc", np.ones((2, 2, 2), np.float32))
    with open(path, "r+b") as f:  # slot 0 used; slots 1 and 2 hold leftover bytes
        f.seek(224)
        f.write(b"first label".ljust(80) + b"\xb7\x1f\x01junk".ljust(80, b"\x00") + b"0" * 80)
    patch(path, 220, "<i", 1)  # nlabl
    with Volume.open(path) as vol:
        assert vol.describe()["labels"] == ["first label"]
    patch(path, 220, "<i", 0)
    with Volume.open(path) as vol:
        assert vol.describe()["labels"] == []
    for name in ("imp_mini_nan_stats.mrc", "pyseg_tomo22_membrane_labels_int8.mrc"):  # nlabl 0
        with Volume.open(REAL / name) as vol:
            assert vol.describe()["labels"] == []


def test_single_image_is_refused(tmp_path: Path, no_memmap: None) -> None:
    path = write_mrc(tmp_path / "img.mrc", np.ones((1, 720, 512), np.uint16))
    assert "is a single 2D image (720×512); a tomogram needs at least 2 slices" in refusal(path)
    path = write_mrc(tmp_path / "flat.mrc", np.ones((4, 1, 5), np.uint16))
    assert "is flat" in refusal(path)


def test_mode_disagreeing_with_file_size_is_refused(tmp_path: Path, no_memmap: None) -> None:
    path = write_mrc(tmp_path / "wm.mrc", np.zeros((10, 10, 10), np.float32))
    patch(path, 12, "<i", 1)  # int16 claimed, float32 stored
    with pytest.raises(InvalidVolumeError) as info:
        Volume.open(path)
    assert "data block is 4.0 kB but the header (mode 1, int16, 10×10×10) promises 2.0 kB" in str(
        info.value
    )
    assert "mode 2 (float32)" in info.value.hint


def test_trailing_bytes_are_refused(tmp_path: Path, no_memmap: None) -> None:
    path = write_mrc(tmp_path / "tail.mrc", np.zeros((4, 10, 10), np.int16))
    with open(path, "ab") as f:
        f.write(b"\0")
    assert "data block is 801 bytes but the header" in refusal(path)
    path = write_mrc(tmp_path / "tail2.mrc", np.zeros((10, 100, 100), np.float32))
    with open(path, "ab") as f:
        f.write(b"\0")
    assert "data block is 400,001 bytes but" in refusal(path)  # exact when sizes round alike


def test_truncated_and_header_only_files_are_refused(tmp_path: Path, no_memmap: None) -> None:
    path = write_mrc(tmp_path / "t.mrc", np.zeros((10, 10, 10), np.float32))
    full = path.read_bytes()
    path.write_bytes(full[:-1])
    assert "is truncated: data block is 3,999 bytes but" in refusal(path)
    path.write_bytes(full[:1024])
    assert "has no data" in refusal(path)
    path.write_bytes(full[:100])
    assert "is 100 bytes, shorter than" in refusal(path)
    path.write_bytes(b"")
    assert "is 0 bytes" in refusal(path)


def test_huge_dims_are_refused_before_mapping(tmp_path: Path, no_memmap: None) -> None:
    path = write_mrc(tmp_path / "huge.mrc", np.zeros((2, 20, 20), np.float32))
    patch(path, 8, "<i", 2**31 - 1)  # nz
    msg = refusal(path)
    assert "data block is 3.2 kB but the header (mode 2, float32, 2147483647×20×20)" in msg
    assert "promises 3.4 TB" in msg


def test_other_broken_headers_are_refused(tmp_path: Path, no_memmap: None) -> None:
    path = write_mrc(tmp_path / "c.mrc", np.zeros((2, 3, 4), np.complex64))
    assert "complex float32 data (mode 4)" in refusal(path)
    path = write_mrc(tmp_path / "x.mrc", np.zeros((2, 3, 4), np.float32))
    patch(path, 92, "<i", 10_000)  # nsymbt past the end of the file
    assert "extended header (nsymbt = 10000) that does not fit" in refusal(path)
    patch(path, 92, "<i", 0)
    patch(path, 64, "<3i", 1, 1, 3)  # mapc/mapr/maps
    assert "not a permutation of 1, 2, 3" in refusal(path)


def test_non_mrc_files_are_refused(tmp_path: Path, no_memmap: None) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("x" * 2000)
    assert "is not an MRC file" in refusal(text)
    tif = tmp_path / "stack.tif"
    tifffile.imwrite(tif, np.zeros((5, 8, 8), np.uint8), photometric="minisblack")
    msg = refusal(tif)
    assert "looks like a TIFF image" in msg
    with pytest.raises(InvalidVolumeError) as info:
        Volume.open(tif)
    assert ".mrc" in info.value.hint  # says which formats are supported
    npy = tmp_path / "a.npy"
    np.save(npy, np.zeros((3, 8, 8)))
    assert "NumPy" in refusal(npy)
    with pytest.raises(FileNotFoundError):
        Volume.open(tmp_path / "missing.mrc")


def test_large_file_is_mapped_not_read(tmp_path: Path) -> None:
    """A 256 MiB volume (sparse on disk) opens instantly and stays out of memory."""
    path = tmp_path / "big.mrc"
    with mrcfile.new_mmap(path, shape=(64, 1024, 1024), mrc_mode=2) as mrc:
        mrc.voxel_size = 10.0
    rss = _rss_bytes()
    with Volume.open(path) as vol:
        assert isinstance(vol.data, np.memmap) and not vol.data.flags.writeable
        assert vol.shape == (64, 1024, 1024) and vol.nbytes == 64 << 22
        assert vol.describe()["voxel_size"] == (10.0, 10.0, 10.0)
        slab = vol.slab(10, 12)
        assert isinstance(slab, np.memmap) and np.shares_memory(slab, vol.data)
        if rss is not None:
            assert _rss_bytes() - rss < 32 << 20


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            line = next(line for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return None
    return int(line.split()[1]) * 1024


# -- stats, slabs, checksum, lifecycle -----------------------------------------------------------


@pytest.mark.parametrize("chunk_bytes", [1, 17 * 19 * 8, 3 * 17 * 19 * 8, 64 << 20])
def test_stats_in_chunks_equal_numpy_on_the_whole(chunk_bytes: int) -> None:
    rng = np.random.default_rng(1)
    data = (rng.normal(size=(13, 17, 19)) * 100 + 1e4).astype(np.float32)
    data[2, 3, 4] = data[12, 0, 0] = np.nan
    s = Volume.from_array(data).stats(chunk_bytes=chunk_bytes)
    wide = data.astype(np.float64)
    assert s.min == np.nanmin(wide) and s.max == np.nanmax(wide)
    assert s.mean == pytest.approx(np.nanmean(wide), rel=1e-12)
    assert s.std == pytest.approx(np.nanstd(wide), rel=1e-10)
    assert (s.count, s.nan_count) == (data.size - 2, 2)


def test_stats_of_integers_from_a_file_and_of_all_nan(tmp_path: Path) -> None:
    data = np.random.default_rng(2).integers(0, 60000, size=(7, 9, 11)).astype(np.uint16)
    with Volume.open(write_mrc(tmp_path / "u.mrc", data)) as vol:
        s = vol.stats(chunk_bytes=2 * 9 * 11 * 8)
    assert (s.min, s.max, s.nan_count) == (data.min(), data.max(), 0)
    assert s.mean == pytest.approx(data.mean(), rel=1e-12)
    assert s.std == pytest.approx(data.std(), rel=1e-12)
    s = Volume.from_array(np.full((2, 2, 2), np.nan)).stats()
    assert s.count == 0 and s.nan_count == 8 and math.isnan(s.mean)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.min = 0.0  # type: ignore[misc]
    assert isinstance(s, VolumeStats)


def test_slab_and_iter_slabs() -> None:
    data = np.arange(10 * 2 * 3).reshape(10, 2, 3)
    vol = Volume.from_array(data)
    assert np.shares_memory(vol.slab(1, 3), data)
    np.testing.assert_array_equal(vol.slab(1, 3), data[1:3])
    pieces = list(vol.iter_slabs(4))
    assert [z0 for z0, _ in pieces] == [0, 4, 8]
    np.testing.assert_array_equal(np.concatenate([s for _, s in pieces]), data)
    for z0, z1 in [(-1, 2), (3, 3), (5, 11)]:
        with pytest.raises(IndexError):
            vol.slab(z0, z1)
    with pytest.raises(ValueError):
        list(vol.iter_slabs(0))


def test_release_drops_pages_but_not_data(tmp_path: Path) -> None:
    data = np.random.default_rng(3).normal(size=(8, 64, 64)).astype(np.float32)
    with Volume.open(write_mrc(tmp_path / "r.mrc", data)) as vol:
        vol.release(0, 3)
        vol.release(5, 100)  # clipped, as the engine's chunked loops pass z0 + step
        np.testing.assert_array_equal(vol.data, data)
    Volume.from_array(data).release(0, 8)  # no-op


def test_checksum(tmp_path: Path) -> None:
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    path = write_mrc(tmp_path / "c.mrc", data)
    with Volume.open(path) as vol:
        assert vol.checksum() == hashlib.sha256(path.read_bytes()).hexdigest()
        assert vol.checksum() is vol.checksum()  # cached
    assert Volume.from_array(data).checksum() == hashlib.sha256(data.tobytes()).hexdigest()
    view = data.transpose(2, 1, 0)  # not C-contiguous: hashed in C order all the same
    expected = hashlib.sha256(np.ascontiguousarray(view).tobytes()).hexdigest()
    assert Volume.from_array(view).checksum() == expected


def test_close_and_context_manager(tmp_path: Path) -> None:
    path = write_mrc(tmp_path / "z.mrc", np.zeros((2, 3, 4), np.float32))
    with Volume.open(path) as vol:
        mapping = weakref.ref(vol.data)
    assert "closed" in repr(vol) and vol.shape == (2, 3, 4)
    with pytest.raises(ValueError, match="closed"):
        _ = vol.data
    gc.collect()
    assert mapping() is None  # the memory map is gone once no view of it is left


# -- from_array ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["i1", "u1", "i2", "u2", "i4", "f2", "f4", "f8"])
def test_from_array_wraps_without_copy(dtype: str) -> None:
    data = np.ones((2, 3, 4), dtype=dtype)
    vol = Volume.from_array(data, voxel_size=(3.0, 2.0, 1.0), origin=(1, 2, 3))
    assert vol.dtype == np.dtype(dtype) and vol.shape == (2, 3, 4)
    assert np.shares_memory(vol.data, data) and not vol.data.flags.writeable
    assert data.flags.writeable  # the caller's array is left alone
    assert vol.voxel_size == (3.0, 2.0, 1.0) and vol.origin == (1.0, 2.0, 3.0)
    assert vol.header is None and vol.path is None and vol.voxel_size_known
    assert vol.nbytes == data.nbytes
    assert vol.describe()["path"] is None and "<array>" in repr(vol)


def test_from_array_scalar_voxel_size() -> None:
    vol = Volume.from_array(np.zeros((2, 2, 2)), voxel_size=7.5)
    assert vol.voxel_size == (7.5, 7.5, 7.5) and vol.origin == (0.0, 0.0, 0.0)


@pytest.mark.parametrize(
    "array, phrase",
    [
        (np.zeros((2, 2, 2), bool), "dtype bool cannot be segmented"),
        (np.zeros((2, 2, 2), np.complex64), "dtype complex64 cannot be segmented"),
        (np.empty((2, 2, 2), object), "dtype object cannot be segmented"),
        (np.zeros((4, 5)), "array has 2 dimensions (4, 5)"),
        (np.zeros((2, 3, 4, 5)), "array has 4 dimensions"),
        (np.zeros((1, 5, 6)), "is a single 2D image (5×6)"),
        (np.zeros((4, 0, 6)), "is flat"),
    ],
)
def test_from_array_refuses(array: np.ndarray, phrase: str) -> None:
    with pytest.raises(InvalidVolumeError) as info:
        Volume.from_array(array)
    assert phrase in info.value.message


@pytest.mark.parametrize("voxel_size", [0, -1.0, math.nan, math.inf, (1.0, 2.0), "abc"])
def test_from_array_refuses_bad_voxel_size(voxel_size: object) -> None:
    with pytest.raises(InvalidVolumeError, match="voxel_size"):
        Volume.from_array(np.zeros((2, 2, 2)), voxel_size=voxel_size)  # type: ignore[arg-type]
    with pytest.raises(InvalidVolumeError, match="origin"):
        Volume.from_array(np.zeros((2, 2, 2)), origin=(0.0, math.nan, 0.0))


def test_public_names() -> None:
    assert volume_module.__all__ == ["Volume", "VolumeStats"]


def test_mrcfile_agrees_on_the_accepted_real_files() -> None:
    """A second, independent reader: mrcfile (permissive) for the data bytes."""
    for name, want in REAL_FILES.items():
        if isinstance(want, str):
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mrcfile.open(REAL / name, permissive=True) as mrc:
                ref = np.array(mrc.data).view(want.dtype).transpose(want.to_zyx)
        with Volume.open(REAL / name) as vol:
            np.testing.assert_array_equal(vol.data, ref, err_msg=name)
