"""Tests for cryomamba.stats: volumes, mesh surface areas and components, slab by slab."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import mrcfile
import numpy as np
import pytest
from conftest import SlabSpy
from scipy import ndimage
from skimage.measure import marching_cubes, mesh_surface_area

import cryomamba.stats as stats_module
from cryomamba.errors import InvalidVolumeError
from cryomamba.stats import label_stats

REAL = Path(__file__).parent / "data" / "real-mrc" / "pyseg_tomo22_membrane_labels_int8.mrc"

# Marching cubes on a *binary* mask places every vertex at an edge midpoint, so a smooth
# surface comes out as a staircase: a voxelised sphere's raw mesh is 8-9 % larger than 4πr²
# for any r (counting voxel faces would give ~50 %). label_stats Taubin-smooths the mesh,
# which brings spheres to within ~1.5 % (measured +0.7..+1.4 % for r = 10, 20, 40); the
# tests ask for the 3 % (isotropic) and 5 % (anisotropic voxels) that the issue requires.
SPHERE_TOLERANCE = 0.03
ANISOTROPIC_TOLERANCE = 0.05
# Slab-wise areas differ from a whole-volume call only in the order of floating-point sums
# (measured: ~2e-16 relative).
SLAB_REL = 1e-9
WHOLE = 10_000  # chunk_planes for a single whole-volume call


def ellipsoid(shape, center, radii) -> np.ndarray:
    """Binary ellipsoid with per-axis radii in voxels."""
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    d = sum(((g - c) / r) ** 2 for g, c, r in zip((z, y, x), center, radii, strict=True))
    return d <= 1.0


def whole_area(mask: np.ndarray, spacing, iterations=10, lam=0.5, mu=-0.53) -> float:
    """Independent reference: marching cubes on the whole mask padded with zeros, scaled to
    nm, then Taubin λ|μ smoothing with uniform weights over the unique mesh edges."""
    verts, faces, _, _ = marching_cubes(np.pad(mask, 1).astype(np.float32), 0.5, spacing=spacing)
    pairs = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    edges = np.unique(np.sort(pairs, axis=1), axis=0)
    degree = np.bincount(edges.ravel(), minlength=len(verts))[:, None]
    v = verts.astype(np.float64)
    for _ in range(iterations):
        for factor in (lam, mu):
            total = np.zeros_like(v)
            np.add.at(total, edges[:, 0], v[edges[:, 1]])
            np.add.at(total, edges[:, 1], v[edges[:, 0]])
            v = v + factor * (total / degree - v)
    return float(mesh_surface_area(v, faces))


def area(labels: np.ndarray, voxel_size, chunk_planes: int) -> float:
    (entry,) = label_stats(labels, voxel_size, chunk_planes=chunk_planes)["labels"]
    return entry["surface_area_nm2"]


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
    assert entry["surface_area_nm2"] == pytest.approx(4 * math.pi * r**2, rel=SPHERE_TOLERANCE)
    assert stats["total"]["volume_nm3"] == entry["volume_nm3"]
    assert stats["shape"] == [45, 45, 45] and stats["voxel_size_angstrom"] == [10.0] * 3


@pytest.mark.parametrize(("r", "offset"), [(10, 0.3), (20, 0.5), (40, 0.3)])
def test_smoothed_mesh_removes_the_staircase_bias_of_spheres(r, offset):
    n = 2 * r + 5
    c = n // 2 + offset  # off the grid, so the voxelisation is not symmetric
    labels = ellipsoid((n, n, n), (c, c + 0.1, c - 0.2), (r, r, r)).astype(np.uint8)
    raw = whole_area(labels, (1.0, 1.0, 1.0), iterations=0)
    assert raw == pytest.approx(1.089 * 4 * math.pi * r**2, rel=0.01)  # the staircase
    sphere = 4 * math.pi * r**2
    assert area(labels, (10.0, 10.0, 10.0), 64) == pytest.approx(sphere, rel=SPHERE_TOLERANCE)


@pytest.mark.parametrize("voxel_size", [(20.0, 10.0, 10.0), (10.0, 20.0, 10.0)])
def test_anisotropic_voxels_a_sphere_in_physical_units(voxel_size):
    r_nm = 20.0  # voxels are 2 nm along one axis, 1 nm along the others
    shape = tuple(45 if v == 10.0 else 25 for v in voxel_size)
    center = tuple(n // 2 for n in shape)
    radii = tuple(r_nm * 10.0 / v for v in voxel_size)
    labels = ellipsoid(shape, center, radii).astype(np.uint8)
    (entry,) = label_stats(labels, voxel_size)["labels"]
    assert entry["volume_nm3"] == pytest.approx(4 / 3 * math.pi * r_nm**3, rel=0.02)
    sphere = 4 * math.pi * r_nm**2
    assert entry["surface_area_nm2"] == pytest.approx(sphere, rel=ANISOTROPIC_TOLERANCE)
    spacing_nm = tuple(v / 10 for v in voxel_size)
    assert entry["surface_area_nm2"] == pytest.approx(whole_area(labels, spacing_nm), rel=SLAB_REL)
    assert area(labels, voxel_size, 3) == pytest.approx(entry["surface_area_nm2"], rel=SLAB_REL)


@pytest.mark.parametrize("thickness", [1, 2])
@pytest.mark.parametrize("chunk_planes", [3, WHOLE])
def test_thin_membrane_sheets_keep_both_sides(thickness, chunk_planes):
    flat = np.zeros((8, 40, 50), np.uint8)
    flat[3 : 3 + thickness, 5:35, 5:45] = 1  # 30 x 40 voxels, parallel to the slabs
    upright = np.zeros((50, 8, 50), np.uint8)
    upright[5:45, 3 : 3 + thickness, 5:45] = 1  # 40 x 40 voxels, cut by every slab boundary
    for labels, extent in ((flat, 30 * 40), (upright, 40 * 40)):
        a = area(labels, (10.0, 10.0, 10.0), chunk_planes)
        # both faces, plus a rim that is ~0 for one voxel and ~1 voxel high for two
        assert 2 * extent < a < 2 * extent * (1.01 if thickness == 1 else 1.08)
        assert a == pytest.approx(whole_area(labels == 1, (1.0, 1.0, 1.0)), rel=SLAB_REL)


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
def test_box_area_is_close_to_hand_computed_mesh_area(chunk_planes):
    labels = np.zeros((12, 10, 9), np.uint8)
    labels[2:9, 1:7, 3:8] = 4  # 7 x 6 x 5 voxels
    (entry,) = label_stats(labels, (30.0, 20.0, 10.0), chunk_planes=chunk_planes)["labels"]
    assert entry["label"] == 4 and entry["name"] == "label_4"
    assert entry["volume_nm3"] == pytest.approx(7 * 6 * 5 * 3.0 * 2.0 * 1.0)
    # The unsmoothed mesh is exactly the hand-computed box with chamfered edges ...
    spacing_nm = (3.0, 2.0, 1.0)
    mesh = box_mesh_area((7, 6, 5), spacing_nm)
    assert whole_area(labels == 4, spacing_nm, iterations=0) == pytest.approx(mesh)
    # ... and smoothing leaves the flat faces flat but rounds the chamfers and corners a
    # little, which only removes area: measured -2.4 % on this small box, -0.9 % on a 20³ one.
    assert 0.97 * mesh < entry["surface_area_nm2"] < mesh
    big = np.zeros((24, 24, 24), np.uint8)
    big[2:22, 2:22, 2:22] = 1
    mesh = box_mesh_area((20, 20, 20), (1.0, 1.0, 1.0))
    assert 0.985 * mesh < area(big, (10.0, 10.0, 10.0), chunk_planes) < mesh


def test_two_disjoint_spheres_are_two_components():
    labels = np.zeros((30, 30, 60), np.uint8)
    labels[ellipsoid(labels.shape, (15, 15, 14), (8, 8, 8))] = 1
    labels[ellipsoid(labels.shape, (15, 15, 44), (8, 8, 8))] = 1
    (entry,) = label_stats(labels, (10.0, 10.0, 10.0), chunk_planes=4)["labels"]
    assert entry["components"] == 2
    ref = whole_area(labels == 1, (1.0, 1.0, 1.0))
    assert entry["surface_area_nm2"] == pytest.approx(ref, rel=SLAB_REL)


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


@pytest.mark.parametrize("chunk_planes", [1, 5, 30])
def test_slab_areas_add_up_to_the_whole_volume_area(chunk_planes):
    # tall enough that slabs plus their smoothing margins are real cuts of the volume
    labels = blobs(chunk_planes, shape=(64, 12, 11))
    spacing_a = (13.0, 7.0, 11.0)
    stats = label_stats(labels, spacing_a, chunk_planes=chunk_planes)
    whole = label_stats(labels, spacing_a, chunk_planes=WHOLE)
    spacing_nm = tuple(v / 10 for v in spacing_a)
    for entry, one in zip(stats["labels"], whole["labels"], strict=True):
        assert entry["surface_area_nm2"] == pytest.approx(one["surface_area_nm2"], rel=SLAB_REL)
        ref = whole_area(labels == entry["label"], spacing_nm)
        assert entry["surface_area_nm2"] == pytest.approx(ref, rel=SLAB_REL)
        assert entry["voxel_count"] == int((labels == entry["label"]).sum())


def test_a_short_smoothing_margin_would_change_the_slab_areas(monkeypatch):
    """The equality above is not luck: without enough context planes it breaks."""
    labels = blobs(3, shape=(64, 12, 11))
    whole = label_stats(labels, (10.0, 10.0, 10.0), chunk_planes=WHOLE)
    monkeypatch.setattr(stats_module, "_MARGIN", 2)
    short = label_stats(labels, (10.0, 10.0, 10.0), chunk_planes=5)
    for a, b in zip(whole["labels"], short["labels"], strict=True):
        assert abs(b["surface_area_nm2"] / a["surface_area_nm2"] - 1) > 1e-6


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
    ref = whole_area(labels == 1, (1.0, 1.0, 1.0))
    assert entry["surface_area_nm2"] == pytest.approx(ref, rel=SLAB_REL)


def test_reads_slabs_only_and_accepts_a_memmap(tmp_path):
    labels = blobs(7, shape=(60, 11, 13))
    spy = SlabSpy(labels)
    stats = label_stats(spy, (10.0, 10.0, 10.0), chunk_planes=4)
    # the first slab: chunk_planes plus the shared plane plus the smoothing margin above it;
    # later reads only add the planes not already held, so each plane is read exactly once
    assert max(spy.reads) <= 5 + 2 * stats_module._MARGIN
    assert spy.reads[0] == 5 + stats_module._MARGIN and sum(spy.reads) == labels.shape[0]
    mm = np.memmap(tmp_path / "labels.raw", np.uint8, "w+", shape=labels.shape)
    mm[:] = labels
    assert label_stats(mm, (10.0, 10.0, 10.0), chunk_planes=4) == stats


def test_real_membrane_segmentation_slabs_equal_whole_volume():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # machine stamp 0: mrcfile warns
        with mrcfile.open(REAL, permissive=True) as mrc:
            labels = np.array(mrc.data)  # int8, labels 1 membrane, 2 inside, 3 outside
    whole = label_stats(labels, (10.0, 10.0, 10.0), chunk_planes=labels.shape[0])
    slabs = label_stats(labels, (10.0, 10.0, 10.0), chunk_planes=12)
    assert [e["label"] for e in slabs["labels"]] == [1, 2, 3]
    for a, b in zip(whole["labels"], slabs["labels"], strict=True):
        assert a["voxel_count"] == b["voxel_count"] and a["components"] == b["components"]
        assert a["surface_area_nm2"] == pytest.approx(b["surface_area_nm2"], rel=SLAB_REL)


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
