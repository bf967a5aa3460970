"""Per-label statistics of a segmentation: voxel count, volume, mesh surface area, components.

Everything is computed in z-slabs of ``chunk_planes`` planes, so a memory-mapped mask of
a 10 GB tomogram is never loaded (or widened to int64) whole:

- **Volume** is voxel count × voxel volume, in nm³ (voxel size is given in Å, 1 nm = 10 Å).
- **Surface area** comes from a mesh, not from counting voxel faces (which overestimates a
  smooth surface by up to 50 %). ``skimage.measure.marching_cubes`` at level 0.5 on the
  binary mask of the label (padded with background at the volume's ends, so that objects
  touching the edge get a closed surface) puts every vertex on an edge midpoint, so its
  mesh is a staircase: a voxelised sphere comes out 8-9 % above 4πr² at any radius
  (+8.9 % at r = 10, 20, 40 voxels; +11.8 % for a sphere sampled with 2:1:1 voxels).
  The mask itself is not blurred (a 1-voxel membrane would vanish); instead the mesh's
  vertices get ``_TAUBIN_ITERATIONS`` rounds of Taubin λ|μ smoothing (G. Taubin, "A signal
  processing approach to fair surface design", SIGGRAPH 1995), λ = 0.5, μ = -0.53, with
  uniform weights over the mesh's edges (a ``scipy.sparse`` adjacency). It is a low-pass
  filter that removes the staircase without the shrinkage of plain Laplacian smoothing,
  and its weights do not depend on positions, so it commutes with the voxel-size scaling.
  Measured against 4πr² (isotropic voxels, depending on the sphere's position on the
  grid): +0.7..+1.3 % at r = 10, +0.8..+1.2 % at r = 20 and +0.9..+1.1 % at r = 40 voxels;
  +1.4 % for the 2:1:1 sphere; -0.6..+1.5 % for rods of radius 1.5-10 voxels. Flat faces
  stay flat: a 1-voxel sheet keeps both sides (+0.6 % over 2× its extent at 30×40); a box
  only has its marching-cubes chamfers rounded (-2.4 % for a 7×6×5 box, -0.9 % for a 20³
  box, against the unsmoothed mesh). The one casualty is a filament one voxel wide: its
  4-vertex cross-section is the highest frequency there is and is smoothed towards its axis
  (1.0 nm² instead of 2.8 per voxel of length at 1 nm voxels). Cost: about twice the time
  of plain marching cubes, and ~200 more bytes of peak memory per mesh vertex of a slab.
- **Slabs.** Each smoothing step moves a vertex towards its mesh neighbours, which lie at
  most one plane away, so after n steps a vertex depends on the mask within n planes. Each
  slab is therefore meshed with ``_MARGIN`` = 2 × iterations + 2 extra planes of context on
  both sides (read once: consecutive slabs keep the planes they share in a rolling buffer),
  and only the triangles whose *unsmoothed* centroid lies in the slab's own planes are
  counted (3 z = sum of the corner z's, compared exactly, so each triangle is owned by
  exactly one slab). The slab areas add up to the whole-volume area up to rounding.
- **Components** are 26-connected (``scipy.ndimage.label``), labelled per slab; the shared
  plane holds the same voxels in both slabs, and slab-local components that share a voxel
  are merged (the union-find step, done as connected components of the graph of shared
  pairs with ``scipy.sparse.csgraph``), so the count equals labelling the whole volume.

The total surface area is the sum over labels: an interface between two labels counts once
for each of them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from .errors import InvalidVolumeError
from .preview import check_label_array

__all__ = ["label_stats"]

logger = logging.getLogger(__name__)

_STRUCTURE_26 = np.ones((3, 3, 3), dtype=bool)
_TAUBIN_LAMBDA = 0.5
_TAUBIN_MU = -0.53
_TAUBIN_ITERATIONS = 10  # λ|μ pairs: 20 steps, each reaching one more plane away
_MARGIN = 2 * _TAUBIN_ITERATIONS + 2  # planes of context on each side of a slab


def check_voxel_size(voxel_size: Sequence[float]) -> tuple[float, float, float]:
    """Return `voxel_size` as three positive finite floats (z, y, x) in Å, or raise ValueError."""
    try:
        values = tuple(float(v) for v in voxel_size)
    except (TypeError, ValueError):
        raise ValueError(
            f"voxel_size must be three numbers (z, y, x) in Å, got {voxel_size!r}"
        ) from None
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(
            f"voxel_size must be three positive numbers (z, y, x) in Å, got {voxel_size!r}"
        )
    return values


def _slabs(nz: int, chunk_planes: int) -> Iterator[tuple[int, int, bool, bool]]:
    """Yield ``(start, stop_inclusive, is_first, is_last)`` slabs sharing one plane."""
    if nz == 1:
        yield 0, 0, True, True
        return
    for start in range(0, nz - 1, chunk_planes):
        stop = min(start + chunk_planes, nz - 1)
        yield start, stop, start == 0, stop == nz - 1


def _plane_counts(plane: np.ndarray, z: int) -> tuple[np.ndarray, np.ndarray]:
    """Return the label values present in one plane and their voxel counts."""
    if plane.dtype.kind == "i" and plane.size and plane.min() < 0:
        raise InvalidVolumeError(
            f"labels must be non-negative, found {plane.min()} at z={z}",
            hint="labels are class indices; negative values mean a wrong array",
        )
    if plane.dtype.kind == "b" or plane.dtype.itemsize <= 2:
        counts = np.bincount(plane.ravel().astype(np.intp, copy=False))
        values = np.flatnonzero(counts)
        return values, counts[values]
    return np.unique(plane, return_counts=True)


def _extended_slabs(
    labels: Any, nz: int, chunk_planes: int
) -> Iterator[tuple[int, int, bool, bool, int, np.ndarray]]:
    """Yield ``(start, stop, is_first, is_last, lo, planes)``: planes ``lo..`` hold the slab
    ``start..stop`` and up to ``_MARGIN`` planes of context on each side; each is read once."""
    buf: np.ndarray | None = None
    buf_lo = 0
    for start, stop, is_first, is_last in _slabs(nz, chunk_planes):
        lo, hi = max(0, start - _MARGIN), min(nz - 1, stop + _MARGIN)
        if buf is None:
            buf = np.asarray(labels[lo : hi + 1])
        else:
            new_from = buf_lo + buf.shape[0]  # slabs only move up: lo >= buf_lo, lo <= new_from
            keep = buf[lo - buf_lo :]
            if new_from <= hi:
                buf = np.concatenate([keep, np.asarray(labels[new_from : hi + 1])])
            else:
                buf = keep
        buf_lo = lo
        yield start, stop, is_first, is_last, lo, buf


def _taubin(verts: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Taubin λ|μ smoothing of a triangle mesh: each step moves every vertex by λ (or μ)
    times the offset to the mean of its neighbours along mesh edges (uniform weights)."""
    from scipy.sparse import csr_matrix

    n = verts.shape[0]
    b = faces[:, [1, 2, 0]].ravel()
    rows, cols = np.concatenate([faces.ravel(), b]), np.concatenate([b, faces.ravel()])
    del b
    # an edge shared by two triangles comes twice; tocsr sums the duplicates, but only the
    # sparsity pattern (each neighbour once) is used below
    pattern = csr_matrix((np.ones(rows.size, np.float32), (rows, cols)), shape=(n, n))
    del rows, cols
    pattern.sum_duplicates()
    degree = np.diff(pattern.indptr)
    weights = np.repeat(1.0 / np.maximum(degree, 1), degree)
    mean = csr_matrix((weights, pattern.indices, pattern.indptr), shape=(n, n))
    del pattern, weights
    out = verts.astype(np.float64)
    for _ in range(_TAUBIN_ITERATIONS):
        for factor in (_TAUBIN_LAMBDA, _TAUBIN_MU):
            step = mean @ out  # in place from here: the vertices may be many
            step -= out
            step *= factor
            out += step
    return out


def _surface_area(
    planes: np.ndarray, lo: int, own: tuple[float, float], nz: int, spacing: tuple[float, ...]
) -> float:
    """Smoothed-mesh area of the triangles owned by one slab (see the module docstring).

    `planes` is the binary mask of one label over global planes ``lo..``; a triangle is
    owned when the sum of its unsmoothed corner z's (global, in voxels) is in ``own``
    (half-open; ±inf at the volume's ends).
    """
    from skimage.measure import marching_cubes, mesh_surface_area

    zs, ys, xs = (np.flatnonzero(planes.any(axis=axes)) for axes in ((1, 2), (0, 2), (0, 1)))
    z0, z1, y0, y1, x0, x1 = zs[0], zs[-1], ys[0], ys[-1], xs[0], xs[-1]
    # Outside the bounding box the mask is background, so a zero plane stands in for it; a
    # cut through the object at a margin's end stays open (it is too far to matter).
    pad_lo = 1 if (z0 > 0 or lo == 0) else 0
    pad_hi = 1 if (z1 < planes.shape[0] - 1 or lo + z1 == nz - 1) else 0
    crop = planes[z0 : z1 + 1, y0 : y1 + 1, x0 : x1 + 1]
    vol = np.zeros(
        (crop.shape[0] + pad_lo + pad_hi, crop.shape[1] + 2, crop.shape[2] + 2), np.float32
    )
    vol[pad_lo : pad_lo + crop.shape[0], 1:-1, 1:-1] = crop
    verts, faces, _, _ = marching_cubes(vol, level=0.5)
    del vol
    # Vertices sit on edge midpoints (multiples of 0.5), so these sums are exact.
    z_sum = verts[:, 0].astype(np.float64)[faces].sum(axis=1) + 3.0 * (lo + z0 - pad_lo)
    owned = faces[(z_sum >= own[0]) & (z_sum < own[1])]
    del z_sum
    if not len(owned):
        return 0.0
    verts = _taubin(verts, faces)
    verts *= np.asarray(spacing)  # uniform weights: smoothing commutes with this scaling
    step = 1 << 18  # faces per call: bounds the (faces, 3, 3) temporaries to ~20 MB
    return sum(
        (float(mesh_surface_area(verts, owned[i : i + step])) for i in range(0, len(owned), step)),
        0.0,
    )


class _Components:
    """Slab-local components of one label, merged across shared planes at the end."""

    def __init__(self) -> None:
        self.n_nodes = 0
        self.edges: list[np.ndarray] = []
        self.last_plane: np.ndarray | None = None  # global ids of the previous slab's last plane
        self.last_stop = -1

    def add_slab(self, mask: np.ndarray, start: int, stop: int) -> None:
        """Label one slab and record which of its components touch the previous slab's."""
        from scipy import ndimage

        local, n = ndimage.label(mask, structure=_STRUCTURE_26)
        first = local[0].astype(np.int64)
        if self.last_plane is not None and self.last_stop == start:
            shared = (first > 0) & (self.last_plane >= 0)
            if shared.any():
                pairs = np.stack([self.last_plane[shared], first[shared] - 1 + self.n_nodes])
                self.edges.append(np.unique(pairs, axis=1))
        last = local[-1].astype(np.int64) - 1
        self.last_plane = np.where(last >= 0, last + self.n_nodes, -1)
        self.last_stop = stop
        self.n_nodes += n

    def count(self) -> int:
        """Number of components after merging those that share voxels across slabs."""
        if not self.edges:
            return self.n_nodes
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        a, b = np.concatenate(self.edges, axis=1)
        graph = coo_matrix((np.ones(a.size, np.int8), (a, b)), shape=(self.n_nodes,) * 2)
        n, _ = connected_components(graph, directed=False)
        return int(n)


def label_stats(
    labels: np.ndarray,
    voxel_size: Sequence[float],
    *,
    label_names: Mapping[int, str] | None = None,
    chunk_planes: int = 64,
) -> dict[str, Any]:
    """Per-label voxel count, volume (nm³), mesh surface area (nm²) and 26-connected components.

    `labels` is a ZYX integer array (a memmap is fine: it is read in z-slabs of
    `chunk_planes` planes); `voxel_size` is (z, y, x) in Å. Background (0) is excluded.
    """
    check_label_array(labels)
    vs = check_voxel_size(voxel_size)
    if isinstance(chunk_planes, bool) or not isinstance(chunk_planes, (int, np.integer)):
        raise ValueError(f"chunk_planes must be a positive integer, got {chunk_planes!r}")
    if chunk_planes < 1:
        raise ValueError(f"chunk_planes must be a positive integer, got {chunk_planes}")
    names = dict(label_names or {})
    spacing_nm = tuple(v / 10.0 for v in vs)
    voxel_nm3 = math.prod(spacing_nm)
    shape = tuple(int(n) for n in labels.shape)

    counts: dict[int, int] = {}
    areas: dict[int, float] = {}
    components: dict[int, _Components] = {}
    if all(shape):
        nz = shape[0]
        for start, stop, is_first, is_last, lo, planes in _extended_slabs(
            labels, nz, int(chunk_planes)
        ):
            slab = planes[start - lo : stop - lo + 1]
            present: set[int] = set()
            for i in range(slab.shape[0]):
                values, n = _plane_counts(slab[i], start + i)
                present.update(int(v) for v in values if v > 0)
                if i < slab.shape[0] - 1 or is_last:  # a shared plane is counted once
                    for v, c in zip(values.tolist(), n.tolist(), strict=True):
                        if v > 0:
                            counts[v] = counts.get(v, 0) + c
            # triangles owned by this slab: 3 × centroid z in [start, stop), open at the ends
            own = (-math.inf if is_first else 3.0 * start, math.inf if is_last else 3.0 * stop)
            for v in sorted(present):
                mask = planes == v
                area = _surface_area(mask, lo, own, nz, spacing_nm)
                areas[v] = areas.get(v, 0.0) + area
                core = mask[start - lo : stop - lo + 1]
                components.setdefault(v, _Components()).add_slab(core, start, stop)
            logger.debug("label_stats: planes %d..%d of %d done", start, stop, shape[0])

    entries = [
        {
            "label": v,
            "name": names.get(v, f"label_{v}"),
            "voxel_count": counts[v],
            "volume_nm3": counts[v] * voxel_nm3,
            "surface_area_nm2": areas[v],
            "components": components[v].count(),
        }
        for v in sorted(counts)
    ]
    return {
        "shape": list(shape),
        "voxel_size_angstrom": list(vs),
        "labels": entries,
        "total": {
            "voxel_count": sum(e["voxel_count"] for e in entries),
            "volume_nm3": sum(e["volume_nm3"] for e in entries),
            "surface_area_nm2": sum(e["surface_area_nm2"] for e in entries),
            "components": sum(e["components"] for e in entries),
        },
    }
