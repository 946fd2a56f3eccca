"""Surface voxelization of a triangle mesh on the asset grid: the voxels an LH-SLAT lives on.

Every voxel that a triangle touches is kept. The test is exact, not sampled: per triangle, each voxel of its bounding
box is checked with the separating-axis theorem for a triangle and an axis-aligned box (Akenine-Moeller 2001: the 3
box normals, the triangle normal and the 9 edge-by-axis cross products; the two shapes are disjoint iff one of those 13
axes separates them). The box is grown by a relative 1e-9 of a voxel so that a triangle lying exactly on a voxel face
counts for both voxels that share it: conservative, never missing a voxel that the surface reaches.

Grid convention (DESIGN.md): asset space is the unit cube [-0.5, 0.5]^3 and voxel index i on an R-grid has centre
`(i + 0.5) / R - 0.5`.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from .errors import NearError

__all__ = ["voxelize_mesh", "voxel_normals"]

_CUBE_TOLERANCE = 1e-4  # vertices may stick out of the unit cube by this much (rounding of a normalized mesh)
_GROW = 1e-9  # box half-size growth, in voxels: touching counts as overlapping


@nb.njit(cache=True, inline="always")
def _separated(axis: np.ndarray, v0: np.ndarray, v1: np.ndarray, v2: np.ndarray, half: float) -> bool:
    """True when `axis` separates the triangle (vertices relative to the box centre) from the cube of `half`."""
    p0 = axis[0] * v0[0] + axis[1] * v0[1] + axis[2] * v0[2]
    p1 = axis[0] * v1[0] + axis[1] * v1[1] + axis[2] * v1[2]
    p2 = axis[0] * v2[0] + axis[1] * v2[1] + axis[2] * v2[2]
    r = half * (abs(axis[0]) + abs(axis[1]) + abs(axis[2]))
    return min(p0, p1, p2) > r or max(p0, p1, p2) < -r


@nb.njit(cache=True)
def _triangle_box_overlap(tri: np.ndarray, centre: np.ndarray, half: float) -> bool:
    """Separating-axis test of one triangle [3, 3] against the cube (centre, half size)."""
    v0, v1, v2 = tri[0] - centre, tri[1] - centre, tri[2] - centre
    for k in range(3):  # the box's face normals: the triangle's bounding box against the cube
        if min(v0[k], v1[k], v2[k]) > half or max(v0[k], v1[k], v2[k]) < -half:
            return False
    e0, e1, e2 = v1 - v0, v2 - v1, v0 - v2
    normal = np.cross(e0, e2)
    if _separated(normal, v0, v1, v2, half):
        return False
    axis = np.empty(3)
    for edge in (e0, e1, e2):
        for k in range(3):  # edge x unit axis k
            axis[k] = 0.0
            axis[(k + 1) % 3] = edge[(k + 2) % 3]
            axis[(k + 2) % 3] = -edge[(k + 1) % 3]
            if _separated(axis, v0, v1, v2, half):
                return False
    return True


@nb.njit(cache=True)
def _mark_surface(vertices: np.ndarray, triangles: np.ndarray, resolution: int, occupied: np.ndarray) -> None:
    """Set occupied[x, y, z] for every voxel a triangle overlaps (grid coordinates: voxel i spans [i, i + 1])."""
    half = 0.5 + _GROW
    centre = np.empty(3)
    tri = np.empty((3, 3))
    for t in range(triangles.shape[0]):
        for a in range(3):
            for k in range(3):
                tri[a, k] = vertices[triangles[t, a], k]
        lo = np.empty(3, np.int64)
        hi = np.empty(3, np.int64)
        for k in range(3):
            lo[k] = max(0, int(np.floor(min(tri[0, k], tri[1, k], tri[2, k]) - _GROW)))
            hi[k] = min(resolution - 1, int(np.floor(max(tri[0, k], tri[1, k], tri[2, k]) + _GROW)))
        for x in range(lo[0], hi[0] + 1):
            centre[0] = x + 0.5
            for y in range(lo[1], hi[1] + 1):
                centre[1] = y + 0.5
                for z in range(lo[2], hi[2] + 1):
                    centre[2] = z + 0.5
                    if not occupied[x, y, z] and _triangle_box_overlap(tri, centre, half):
                        occupied[x, y, z] = True


def voxelize_mesh(vertices: np.ndarray, triangles: np.ndarray, resolution: int = 64) -> np.ndarray:
    """The surface voxels int32 [N, 3] (sorted x, y, z) of a mesh in asset space (the unit cube) on an R^3 grid.

    Raises `NearError` for an empty mesh, bad shapes, non-finite or out-of-cube vertices, or bad triangle indices.
    """
    v = np.asarray(vertices, dtype=np.float64)
    t = np.asarray(triangles)
    if v.ndim != 2 or v.shape[1] != 3 or t.ndim != 2 or t.shape[1] != 3:
        raise NearError(f"voxelize_mesh needs vertices [V, 3] and triangles [M, 3], got {v.shape} and {t.shape}")
    if len(v) == 0 or len(t) == 0:
        raise NearError("cannot voxelize an empty mesh (no vertices or no triangles)")
    if not np.issubdtype(t.dtype, np.integer) or t.min() < 0 or t.max() >= len(v):
        raise NearError(f"triangle indices must be integers in [0, {len(v)}), got range [{t.min()}, {t.max()}]")
    if not np.isfinite(v).all():
        raise NearError("mesh vertices contain NaN or infinite values")
    if np.abs(v).max() > 0.5 + _CUBE_TOLERANCE:
        raise NearError(f"mesh vertices reach {np.abs(v).max():.4f} but must lie in the unit cube [-0.5, 0.5]^3: "
                        "normalize the mesh first (centre to the origin, largest side to 1)")
    if isinstance(resolution, bool) or int(resolution) != resolution or resolution < 1:
        raise NearError(f"resolution must be a positive integer, got {resolution!r}")
    occupied = np.zeros((resolution,) * 3, dtype=np.bool_)
    _mark_surface((v + 0.5) * resolution, t.astype(np.int64), int(resolution), occupied)
    return np.argwhere(occupied).astype(np.int32)


def voxel_normals(coords: np.ndarray, resolution: int, radius: int = 2) -> np.ndarray:
    """Unit surface normals [N, 3] (float32, sign arbitrary) of surface voxels `coords` int [N, 3]: the direction of
    least spread (smallest principal axis) of the occupied voxels within `radius` voxels (a (2r+1)^3 block).

    Geometry the asset already has, so near-tiny's shading need not learn it. The sign is left to the renderer, which
    turns each normal towards the camera (as NeAR does for its Gaussians). A voxel with too few neighbours to define
    a plane (isolated, or on a line) gets the direction from the object's centre, or +Z.
    """
    coords = np.asarray(coords, dtype=np.int64)
    if coords.ndim != 2 or coords.shape[1] != 3:
        raise NearError(f"voxel coords must be [N, 3], got {coords.shape}")
    n = len(coords)
    if n == 0:
        return np.zeros((0, 3), np.float32)
    pad = radius
    grid = np.zeros((resolution + 2 * pad,) * 3, dtype=bool)
    grid[tuple((coords + pad).T)] = True
    offsets = np.stack(np.meshgrid(*(np.arange(-radius, radius + 1),) * 3, indexing="ij"), -1).reshape(-1, 3)
    moments = np.zeros((n, 3, 3))
    sums = np.zeros((n, 3))
    counts = np.zeros(n)
    for offset in offsets:  # accumulate the neighbours' first and second moments, one offset at a time
        hit = grid[tuple((coords + pad + offset).T)].astype(np.float64)
        counts += hit
        sums += hit[:, None] * offset
        moments += hit[:, None, None] * np.outer(offset, offset)
    mean = sums / counts[:, None]
    covariance = moments / counts[:, None, None] - mean[:, :, None] * mean[:, None, :]
    values, vectors = np.linalg.eigh(covariance)  # ascending eigenvalues
    normals = vectors[:, :, 0]
    degenerate = values[:, 1] < 0.05 * values[:, 2] + 1e-6  # no plane: a line, or a voxel alone
    if degenerate.any():
        fallback = coords[degenerate] - coords.mean(0)
        length = np.linalg.norm(fallback, axis=1, keepdims=True)
        normals[degenerate] = np.where(length > 1e-9, fallback / np.maximum(length, 1e-9), [0.0, 0.0, 1.0])
    return normals.astype(np.float32)
