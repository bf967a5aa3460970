"""The napari-cryomamba reader on every real MRC file, directly and through a real viewer.

Expected outcomes come from tests/test_volume.py (REAL_FILES): what `Volume` accepts opens
as a lazy image layer in Å, what it refuses gives one napari error notification (message
and hint) and no layer, never an exception.
"""

from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("napari_cryomamba")
pytest.importorskip("pytestqt")

from napari.utils.notifications import NotificationSeverity, notification_manager
from napari_cryomamba._reader import contrast_limits, get_reader, read
from napari_support import napari_gui, qapp  # noqa: F401  (skip where Qt cannot start)
from test_volume import REAL, REAL_FILES, Accepted

from cryomamba import InvalidVolumeError, Volume

ACCEPTED = sorted(name for name, outcome in REAL_FILES.items() if isinstance(outcome, Accepted))
REFUSED = sorted(name for name, outcome in REAL_FILES.items() if isinstance(outcome, str))
CLAIMED = (".mrc", ".map", ".rec", ".mrcs")


@pytest.fixture
def errors():
    """Error notifications dispatched during the test, as strings."""
    start = len(notification_manager.records)

    def collect() -> list[str]:
        return [
            str(n.message)
            for n in notification_manager.records[start:]
            if n.severity == NotificationSeverity.ERROR
        ]

    return collect


@pytest.fixture
def viewer(make_napari_viewer):
    return make_napari_viewer()


def write(path: Path, data: np.ndarray, voxel_size=(4.0, 3.0, 2.0), origin=(10.0, 20.0, 30.0)):
    """An MRC with voxel size and origin given as (x, y, z), like mrcfile takes them."""
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(data)
        mrc.voxel_size = voxel_size
        mrc.header.origin.x, mrc.header.origin.y, mrc.header.origin.z = origin
    return path


# -- get_reader --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name", ["t.mrc", "t.map", "t.rec", "t.mrcs", "T.MRC", "emd_1234.Map", "a.b.REC"]
)
def test_get_reader_claims_mrc_extensions_in_any_case(name):
    assert get_reader(name) is read
    assert get_reader(Path(name)) is read


@pytest.mark.parametrize("name", ["t.tif", "t.ccp4", "t.mrc.gz", "mrc", "t.mrcx", "notes.txt"])
def test_get_reader_declines_other_files(name):
    assert get_reader(name) is None


def test_get_reader_takes_a_list_only_when_every_path_is_claimed():
    assert get_reader(["a.mrc", "b.rec"]) is read
    assert get_reader(["a.mrc", "b.tif"]) is None
    assert get_reader([]) is None


# -- read, on every real file ------------------------------------------------------------------
def test_every_real_file_has_an_expected_outcome():
    on_disk = {p.relative_to(REAL).as_posix() for p in REAL.rglob("*") if p.is_file()}
    assert on_disk == set(REAL_FILES)


@pytest.mark.parametrize("name", ACCEPTED)
def test_accepted_files_open_lazily_in_angstrom(name):
    expected = REAL_FILES[name]
    path = REAL / name
    volume = Volume.open(path)
    [(data, meta, kind)] = read(str(path))
    assert kind == "image"
    assert data.shape == expected.shape == volume.shape
    assert meta["scale"] == volume.voxel_size
    np.testing.assert_allclose(meta["scale"], expected.voxel_size, rtol=1e-5)
    assert meta["translate"] == volume.origin
    assert meta["name"] == path.stem
    # the memory-mapped array itself (a transposed view for permuted axes), not a copy
    base = data
    while not isinstance(base, np.memmap) and getattr(base, "base", None) is not None:
        base = base.base
    assert isinstance(base, np.memmap) and not data.flags.owndata
    np.testing.assert_array_equal(np.asarray(data), np.asarray(volume.data))
    md = meta["metadata"]
    assert md["path"] == str(path) and md["voxel_size_known"] == volume.voxel_size_known
    assert md["shape"] == volume.shape and md["mode"] == volume.describe()["mode"]
    lo, hi = meta["contrast_limits"]
    finite = np.asarray(volume.data, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    assert finite.min() <= lo < hi <= max(finite.max(), lo + 1)


@pytest.mark.parametrize("name", REFUSED)
def test_refused_files_notify_instead_of_raising(name, errors):
    path = REAL / name
    with pytest.raises(InvalidVolumeError) as info:
        Volume.open(path)
    assert read(str(path)) == [(None,)]  # napari's "nothing to open" sentinel
    [message] = errors()
    assert REAL_FILES[name] in message
    assert info.value.message in message and info.value.hint in message


def test_a_list_of_paths_gives_one_layer_per_readable_file(errors):
    paths = [str(REAL / n) for n in ("chlamy_hsp60_relion_ispg0.mrc", "pytom_header_only.mrc")]
    paths.append(str(REAL / "tomodrgn_float16_stack.mrcs"))
    layers = read(paths)
    assert [meta["name"] for _, meta, _ in layers] == [
        "chlamy_hsp60_relion_ispg0",
        "tomodrgn_float16_stack",
    ]
    assert len(errors()) == 1 and "has no data" in errors()[0]


def test_a_missing_file_notifies(tmp_path, errors):
    assert read(str(tmp_path / "gone.mrc")) == [(None,)]
    assert "gone.mrc" in errors()[0]


def test_big_endian_files_read_lazily_in_native_order(tmp_path):
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    path = write(tmp_path / "be.mrc", data.astype(">f4"))
    assert Volume.open(path).data.dtype.byteorder == ">"
    [(layer_data, meta, _)] = read(str(path))
    assert layer_data.dtype == np.dtype("float32") and layer_data.dtype.isnative
    np.testing.assert_array_equal(np.asarray(layer_data), data)
    assert meta["scale"] == (2.0, 3.0, 4.0) and meta["translate"] == (30.0, 20.0, 10.0)


# -- contrast limits ---------------------------------------------------------------------------
class LazyTomogram:
    """A 10 GB float32 (Z, Y, X) tomogram of N(100, 10) noise, made up plane by plane on read.

    Records every read and refuses anything but (plane, rows, columns) indexing.
    """

    shape = (160, 4096, 4096)

    def __init__(self) -> None:
        self.keys: list[tuple] = []
        self.voxels_read = 0

    def __getitem__(self, key):
        assert isinstance(key, tuple) and len(key) == 3 and isinstance(key[0], int), key
        self.keys.append(key)
        size = tuple(len(range(*k.indices(n))) for k, n in zip(key[1:], self.shape[1:]))
        self.voxels_read += size[0] * size[1]
        return np.random.default_rng(key[0]).normal(100.0, 10.0, size).astype(np.float32)


def test_contrast_limits_read_a_bounded_sample_of_a_large_volume():
    tomo = LazyTomogram()
    lo, hi = contrast_limits(tomo)
    assert 1 < len(tomo.keys) <= 9
    assert len({k[0] for k in tomo.keys}) == len(tomo.keys)  # distinct planes
    assert {tomo.keys[0][0], tomo.keys[-1][0]} == {0, tomo.shape[0] - 1}  # spread over z
    assert tomo.voxels_read <= 9 * 256 * 256  # ~2 MB of a 10 GB volume
    # the 0.5 and 99.5 percentiles of N(100, 10) are 100 -/+ 25.76
    assert abs(lo - 74.24) < 1.0 and abs(hi - 125.76) < 1.0


def test_contrast_limits_of_constant_nan_and_integer_volumes():
    assert contrast_limits(np.full((3, 4, 5), 7, np.int16)) == (7.0, 8.0)
    assert contrast_limits(np.full((3, 4, 5), np.nan, np.float32)) == (0.0, 1.0)
    with_nan = np.zeros((3, 4, 5), np.float32)
    with_nan[0, 0, 0], with_nan[1] = np.nan, 5.0
    assert contrast_limits(with_nan) == (0.0, 5.0)
    labels = np.zeros((4, 4, 4), np.uint8)
    labels[0, 0, 0] = 3  # a single voxel: below the 99.5th percentile, so min/max are used
    assert contrast_limits(labels) == (0.0, 3.0)


# -- through a real viewer ---------------------------------------------------------------------
def test_viewer_open_end_to_end(viewer, tmp_path):
    data = np.random.default_rng(1).normal(size=(6, 7, 8)).astype(np.float32)
    path = write(tmp_path / "tomo.MRC", data)
    [layer] = viewer.open(str(path), plugin="napari-cryomamba")
    assert layer.name == "tomo" and layer.ndim == 3
    np.testing.assert_allclose(layer.scale, (2.0, 3.0, 4.0))
    np.testing.assert_allclose(layer.translate, (30.0, 20.0, 10.0))
    assert isinstance(layer.data, np.memmap)
    np.testing.assert_array_equal(np.asarray(layer.data), data)
    assert layer.metadata["path"] == str(path)
    # world coordinates of the last voxel: origin + index * voxel size, in Å
    np.testing.assert_allclose(layer.data_to_world((5, 6, 7)), (30 + 5 * 2, 20 + 6 * 3, 10 + 7 * 4))


@pytest.mark.parametrize("name", ["gemmi_5i55_axes_213.ccp4", *ACCEPTED])
def test_viewer_opens_every_accepted_real_file(viewer, name, tmp_path):
    path = REAL / name
    if not name.lower().endswith(CLAIMED):  # the reader claims MRC extensions only
        path = tmp_path / (Path(name).stem + ".map")
        path.write_bytes((REAL / name).read_bytes())
    volume = Volume.open(path)
    [layer] = viewer.open(str(path), plugin="napari-cryomamba")
    assert layer.data.shape == volume.shape
    np.testing.assert_allclose(layer.scale, volume.voxel_size)
    np.testing.assert_allclose(layer.translate, volume.origin)
    viewer.dims.ndisplay = 3
    shot = viewer.screenshot(canvas_only=True)  # the data reaches vispy and draws
    assert shot.ndim == 3


@pytest.mark.parametrize("name", [n for n in REFUSED if n.lower().endswith(CLAIMED)])
def test_viewer_reports_refused_files_without_an_exception(viewer, name, errors):
    assert viewer.open(str(REAL / name), plugin="napari-cryomamba") == []
    assert len(viewer.layers) == 0
    [message] = errors()
    assert REAL_FILES[name] in message


# -- OME-Zarr ----------------------------------------------------------------------------------
def test_viewer_opens_ome_zarr_images_and_labels_in_angstrom(viewer, tmp_path, errors):
    pytest.importorskip("zarr")
    from cryomamba.zarr_write import create_group, multiscales_metadata, write_ome_zarr_labels

    image = np.random.default_rng(0).normal(size=(20, 24, 28)).astype(np.float32)
    group = create_group(tmp_path / "tomo.zarr")
    group.create_dataset("0", data=image, chunks=(8, 8, 8))
    group.create_dataset("1", data=image[::2, ::2, ::2], chunks=(8, 8, 8))
    group.attrs.update(multiscales_metadata(2, (10.0, 8.0, 8.0), (1.0, 2.0, 3.0), "tomo"))
    labels = (image > 1).astype(np.uint8)
    write_ome_zarr_labels(tmp_path / "mask.zarr", labels, voxel_size=(10, 8, 8), origin=(1, 2, 3))
    assert get_reader(str(tmp_path / "tomo.zarr")) is read
    [img] = viewer.open(str(tmp_path / "tomo.zarr"), plugin="napari-cryomamba")
    [lab] = viewer.open(str(tmp_path / "mask.zarr"), plugin="napari-cryomamba")
    assert img.multiscale and len(img.data) == 2 and img.data[0].shape == image.shape
    assert type(lab).__name__ == "Labels"
    np.testing.assert_array_equal(np.asarray(lab.data), labels)
    for layer in (img, lab):
        np.testing.assert_allclose(layer.scale, (10.0, 8.0, 8.0))
        np.testing.assert_allclose(layer.translate, (1.0, 2.0, 3.0))
    (tmp_path / "plain.zarr").mkdir()
    (tmp_path / "plain.zarr" / ".zgroup").write_text('{"zarr_format": 2}')
    assert viewer.open(str(tmp_path / "plain.zarr"), plugin="napari-cryomamba") == []
    [message] = errors()
    assert "not an OME-Zarr image" in message
