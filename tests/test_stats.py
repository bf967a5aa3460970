"""Tests for cryomamba.stats: volumes, mesh surface areas and components, slab by slab."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import mrcfile
import numpy as np
import pytest
from scipy import ndimage
from skimage.measure import marching_cubes, mesh_surface_area

from cryomamba.errors import InvalidVolumeError
from cryomamba.stats import label_stats

REAL = Path(__file__).parent / "data" / "real-mrc" / "pyseg_tomo22_membrane_labels_int8.mrc"

# Marching cubes on a *binary* mask places every vertex at an edge midpoint, so a smooth
# surface comes out faceted: a voxelised sphere's mesh is 8-9 % larger than 4πr² for any r
# (counting voxel faces would give ~50 %). The sphere tests allow for that known bias; the
# box test below checks the mesh area exactly.
MC_BINARY_BIAS = 0.10


class SlabSpy:
    """A lazily sliced volume that records how many z-planes each read asks for."""

    def __init__(self, array: np.ndarray) -> None:
        self.array, self.reads = array, []
        self.shape, self.dtype, self.ndim = array.shape, array.dtype, array.ndim

    def __getitem__(self, key):
        assert isinstance(key, slice), f"whole-volume read attempted with {key!r}"
        part = self.array[key]
        self.reads.append(part.shape[0])
        return part


def ellipsoid(shape, center, radii) -> np.ndarray:
    """Binary ellipsoid with per-axis radii in voxels."""
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    d = sum(((g - c) / r) ** 2 for g, c, r in zip((z, y, x), center, radii, strict=True))
    return d <= 1.0


def whole_area(mask: np.ndarray, spacing) -> float:
    """Reference: one marching-cubes call on the whole mask padded with zeros."""
    verts, faces, _, _ = marching_cubes(np.pad(mask, 1).astype(np.float32), 0.5, spacing=spacing)
    return float(mesh_surface_area(verts, faces))


def blobs(seed: int, shape=(23, 18, 17), fraction=0.35) -> np.ndarray:
    """Random blobby labels 1..2 that touch the volume's faces and each other."""
    rng = np.random.default_rng(seed)
    smooth = ndimage.gaussian_filter(rng.normal(size=shape), 1.5)
    labels = np.zeros(shape, np.uint8)
    labels[smooth > np.quantile(smooth, 1 - fraction)] = 1
    labels[smooth < np.quantile(smooth, fraction / 2)] = 2
    return labels


def test_sphere_volume_and_area_in_nm():
    r = 20
    labels = ellipsoid((45, 45, 45), (22, 22, 22), (r, r, r)).astype(np.uint8)
    stats = label_stats(labels, (10.0, 10.0, 10.0), label_names={1: "vesicle"})
    (entry,) = stats["labels"]
    assert entry["label"] == 1 and entry["name"] == "vesicle" and entry["components"] == 1
    assert entry["voxel_count"] == int(labels.sum())
    assert entry["volume_nm3"] == pytest.approx(4 / 3 * math.pi * r**3, rel=0.02)
    assert entry["surface_area_nm2"] == pytest.approx(4 * math.pi * r**2, rel=MC_BINARY_BIAS)
    assert stats["total"]["volume_nm3"] == entry["volume_nm3"]
    assert stats["shape"] == [45, 45, 45] and stats["voxel_size_angstrom"] == [10.0] * 3


def test_anisotropic_voxels_a_sphere_in_physical_units():
    r_nm = 20.0  # z voxels are 2 nm, y and x voxels 1 nm
    labels = ellipsoid((25, 45, 45), (12, 22, 22), (r_nm / 2, r_nm, r_nm)).astype(np.uint8)
    (entry,) = label_stats(labels, (20.0, 10.0, 10.0))["labels"]
    assert entry["volume_nm3"] == pytest.approx(4 / 3 * math.pi * r_nm**3, rel=0.02)
    # coarser z sampling facets the mesh a little more than in the isotropic case
    assert entry["surface_area_nm2"] == pytest.approx(4 * math.pi * r_nm**2, rel=0.13)
    assert entry["surface_area_nm2"] == pytest.approx(whole_area(labels, (2.0, 1.0, 1.0)))


def box_mesh_area(n, s) -> float:
    """Hand-computed marching-cubes area of an n-voxel box: flat faces, chamfered edges, corners."""
    (nz, ny, nx), (sz, sy, sx) = n, s
    faces = 2 * (
        (nx - 1) * (ny - 1) * sx * sy
        + (nx - 1) * (nz - 1) * sx * sz
        + (ny - 1) * (nz - 1) * sy * sz
    )
    edges = 2 * (
        (nx - 1) * sx * math.hypot(sy, sz)
        + (ny - 1) * sy * math.hypot(sx, sz)
        + (nz - 1) * sz * math.hypot(sx, sy)
    )
    corners = math.sqrt((sy * sz) ** 2 + (sx * sz) ** 2 + (sx * sy) ** 2)
    return faces + edges + corners


@pytest.mark.parametrize("chunk_planes", [1, 3, 64])
def test_box_area_equals_hand_computed_mesh_area(chunk_planes):
    labels = np.zeros((12, 10, 9), np.uint8)
    labels[2:9, 1:7, 3:8] = 4  # 7 x 6 x 5 voxels
    (entry,) = label_stats(labels, (30.0, 20.0, 10.0), chunk_planes=chunk_planes)["labels"]
    assert entry["label"] == 4 and entry["name"] == "label_4"
    assert entry["volume_nm3"] == pytest.approx(7 * 6 * 5 * 3.0 * 2.0 * 1.0)
    assert entry["surface_area_nm2"] == pytest.approx(box_mesh_area((7, 6, 5), (3.0, 2.0, 1.0)))


def test_two_disjoint_spheres_are_two_components():
    labels = np.zeros((30, 30, 60), np.uint8)
    labels[ellipsoid(labels.shape, (15, 15, 14), (8, 8, 8))] = 1
    labels[ellipsoid(labels.shape, (15, 15, 44), (8, 8, 8))] = 1
    (entry,) = label_stats(labels, (10.0, 10.0, 10.0), chunk_planes=4)["labels"]
    assert entry["components"] == 2
    assert entry["surface_area_nm2"] == pytest.approx(whole_area(labels == 1, (1.0, 1.0, 1.0)))


def test_empty_labels_give_no_entries():
    stats = label_stats(np.zeros((5, 6, 7), np.uint8), (10.0, 10.0, 10.0))
    assert stats["labels"] == []
    assert stats["total"] == {
        "voxel_count": 0,
        "volume_nm3": 0,
        "surface_area_nm2": 0,
        "components": 0,
    }
    assert label_stats(np.zeros((0, 4, 4), np.uint8), (1.0, 1.0, 1.0))["labels"] == []


@pytest.mark.parametrize("chunk_planes", [1, 2, 5, 64])
def test_slab_areas_add_up_to_the_whole_volume_area(chunk_planes):
    labels = blobs(chunk_planes)
    spacing_a = (13.0, 7.0, 11.0)
    stats = label_stats(labels, spacing_a, chunk_planes=chunk_planes)
    spacing_nm = tuple(v / 10 for v in spacing_a)
    for entry in stats["labels"]:
        ref = whole_area(labels == entry["label"], spacing_nm)
        assert entry["surface_area_nm2"] == pytest.approx(ref, rel=1e-5)
        assert entry["voxel_count"] == int((labels == entry["label"]).sum())


@pytest.mark.parametrize("chunk_planes", [1, 2, 3, 7])
def test_components_match_whole_volume_26_connected_labelling(chunk_planes):
    labels = np.random.default_rng(chunk_planes).choice(
        np.array([0, 1, 2], np.uint8), size=(20, 12, 12), p=[0.8, 0.12, 0.08]
    )
    stats = label_stats(labels, (10.0, 10.0, 10.0), chunk_planes=chunk_planes)
    for entry in stats["labels"]:
        _, n = ndimage.label(labels == entry["label"], structure=np.ones((3, 3, 3)))
        assert entry["components"] == n
    assert stats["total"]["components"] == sum(e["components"] for e in stats["labels"])


def test_u_shape_that_only_joins_in_a_later_slab_is_one_component():
    labels = np.zeros((12, 5, 9), np.uint8)
    labels[0:11, 2, 1] = 1  # left arm
    labels[0:11, 2, 7] = 1  # right arm, 5 voxels away: separate in every slab but the last
    labels[10, 2, 1:8] = 1  # the bottom of the U, at z=10 only
    labels[0, 0, 4] = 1  # an isolated voxel between the arms' tops
    (entry,) = label_stats(labels, (10.0, 10.0, 10.0), chunk_planes=2)["labels"]
    _, n = ndimage.label(labels, structure=np.ones((3, 3, 3)))
    assert entry["components"] == n == 2


def test_one_plane_volume():
    labels = np.zeros((1, 6, 6), np.uint8)
    labels[0, 1:4, 1:4] = 1
    (entry,) = label_stats(labels, (10.0, 10.0, 10.0))["labels"]
    assert entry["voxel_count"] == 9 and entry["components"] == 1
    assert entry["surface_area_nm2"] == pytest.approx(whole_area(labels == 1, (1.0, 1.0, 1.0)))


def test_reads_slabs_only_and_accepts_a_memmap(tmp_path):
    labels = blobs(7, shape=(17, 11, 13))
    spy = SlabSpy(labels)
    stats = label_stats(spy, (10.0, 10.0, 10.0), chunk_planes=4)
    assert max(spy.reads) <= 5  # chunk_planes plus the one shared plane
    mm = np.memmap(tmp_path / "labels.raw", np.uint8, "w+", shape=labels.shape)
    mm[:] = labels
    assert label_stats(mm, (10.0, 10.0, 10.0), chunk_planes=4) == stats


def test_real_membrane_segmentation_slabs_equal_whole_volume():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # machine stamp 0: mrcfile warns
        with mrcfile.open(REAL, permissive=True) as mrc:
            labels = np.array(mrc.data)  # int8, labels 1 membrane, 2 inside, 3 outside
    whole = label_stats(labels, (10.0, 10.0, 10.0), chunk_planes=labels.shape[0])
    slabs = label_stats(labels, (10.0, 10.0, 10.0), chunk_planes=8)
    assert [e["label"] for e in slabs["labels"]] == [1, 2, 3]
    for a, b in zip(whole["labels"], slabs["labels"], strict=True):
        assert a["voxel_count"] == b["voxel_count"] and a["components"] == b["components"]
        assert a["surface_area_nm2"] == pytest.approx(b["surface_area_nm2"], rel=1e-5)


@pytest.mark.parametrize(
    ("labels", "error", "match"),
    [
        (np.zeros((3, 3, 3), np.float64), InvalidVolumeError, "integers"),
        (np.zeros((3, 3), np.uint8), InvalidVolumeError, "3-D"),
        (np.full((3, 3, 3), -2, np.int8), InvalidVolumeError, "non-negative"),
    ],
)
def test_bad_labels_are_refused(labels, error, match):
    with pytest.raises(error, match=match):
        label_stats(labels, (10.0, 10.0, 10.0))


@pytest.mark.parametrize("voxel_size", [(10.0, 10.0), (0.0, 1.0, 1.0), (1, float("nan"), 1), "abc"])
def test_bad_voxel_size_is_refused(voxel_size):
    with pytest.raises(ValueError, match="voxel_size"):
        label_stats(np.zeros((3, 3, 3), np.uint8), voxel_size)


@pytest.mark.parametrize("chunk_planes", [0, -1, 2.5, True])
def test_bad_chunk_planes_is_refused(chunk_planes):
    with pytest.raises(ValueError, match="chunk_planes"):
        label_stats(np.zeros((3, 3, 3), np.uint8), (1.0, 1.0, 1.0), chunk_planes=chunk_planes)


def test_public_api():
    import cryomamba.stats as stats

    assert stats.__all__ == ["label_stats"]
