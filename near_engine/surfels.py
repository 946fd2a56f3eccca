"""Where the surface lies inside each voxel: per-voxel surfels that near-tiny's Gaussians start from.

A voxel only says that the surface passes somewhere through a cube: Gaussians spread over the whole cube make a
silhouette up to a voxel too wide, a surface as thick as a voxel, and normals no better than the voxels' own
neighbourhood (`voxelize.voxel_normals`). Where the mesh is known (encode-mesh, training data, a lift onto a mesh)
that is geometry to compute, not to learn: each voxel's piece of the surface is sampled, split into `PER_VOXEL`
quadrants of its tangent plane, and each quadrant becomes one flat Gaussian (a surfel) at the quadrant's centroid,
oriented by its normal and as wide as the quadrant's spread. The LAD's geometry heads then learn residuals on them.

Layout (`SURFEL_CHANNELS` per surfel, all in voxel units, asset axes): offset of the centre from the voxel centre
(3), unit (w, x, y, z) quaternion whose local z axis is the surface normal (4), standard deviations along the local
x, y, z axes (3). An asset stores them as the extra latent "surfels", [N, PER_VOXEL * SURFEL_CHANNELS].

Without a mesh (a photo lifted on predicted voxels, assets from before surfels), `voxel_surfels` gives the same
layout from the voxels alone: four surfels on the plane through the voxel centre normal to `voxel_normals`.
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import NearError
from .gaussians import quat_to_rotmat, rotmat_to_quat
from .voxelize import voxel_normals

__all__ = ["PER_VOXEL", "SURFEL_CHANNELS", "EXTRA_NAME", "mesh_surfels", "voxel_surfels", "asset_surfels",
           "surfel_centres", "surfel_normals", "surfel_tensors", "voxel_lookup", "nearest_points"]

#: Surfels per voxel: near-tiny's Gaussians per voxel.
PER_VOXEL = 4
#: Channels of one surfel: offset (3), quaternion (4), scales (3).
SURFEL_CHANNELS = 10
#: The asset extra that holds them.
EXTRA_NAME = "surfels"
#: Samples of the surface per voxel: enough for a stable centroid and spread of each quadrant.
SAMPLES_PER_VOXEL = 64
#: At most this many samples in all (memory: about 300 bytes each while the surfels are computed).
MAX_SAMPLES = 2_000_000
#: A quadrant of a flat piece of surface spreads uniformly over a width w: standard deviation w / sqrt(12). Gaussians
#: that tile the plane without gaps need about half their spacing as sigma, sqrt(3) = 1.73 times that deviation;
#: 2.2 scored best (object PSNR and SSIM of the untrained PBR core on data-set objects, 1.73 to 2.8 tried).
SPREAD_TO_SIGMA = 2.2
#: Thickness (sigma along the normal, in voxels): thin, as surfaces are (0.02 to 0.15 tried, thinner scored better;
#: the 3D filter of 1/16 voxel bounds it from below anyway).
THICKNESS = 0.03
#: The smallest in-plane sigma, in voxels.
MIN_SIGMA = 0.08
#: In-plane sigma of a surfel made from the voxels alone: SPREAD_TO_SIGMA times the spread of a half-voxel quadrant.
VOXEL_SIGMA = 0.3


def _frames(normals: np.ndarray, tangents: np.ndarray) -> np.ndarray:
    """Rotation matrices [..., 3, 3] with columns (x, y, z): z the normal, x the tangent made perpendicular to it
    (any perpendicular where the tangent is parallel), y = z cross x."""
    z = normals / np.maximum(np.linalg.norm(normals, axis=-1, keepdims=True), 1e-12)
    x = tangents - (tangents * z).sum(-1, keepdims=True) * z
    weak = np.linalg.norm(x, axis=-1) < 1e-6
    if weak.any():  # any vector perpendicular to z: z crossed with the axis it is least aligned with
        axis = np.eye(3)[np.argmin(np.abs(z[weak]), -1)]
        x[weak] = np.cross(z[weak], axis)
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    return np.stack([x, np.cross(z, x), z], -1)


def _principal(tensors: np.ndarray) -> np.ndarray:
    """The eigenvector of the largest eigenvalue of symmetric [..., 3, 3] tensors."""
    return np.linalg.eigh(tensors)[1][..., :, -1]


def _pack(offsets: np.ndarray, frames: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """[V, P, 3] offsets, [V, P, 3, 3] frames, [V, P, 3] sigmas -> [V, P * SURFEL_CHANNELS] float32."""
    table = np.concatenate([offsets, rotmat_to_quat(torch.from_numpy(frames)).numpy(), sigmas], -1)
    return table.reshape(len(table), -1).astype(np.float32)


def voxel_surfels(coords: np.ndarray, resolution: int) -> np.ndarray:
    """Surfels [N, PER_VOXEL * SURFEL_CHANNELS] from the voxels alone: on the plane through each voxel's centre
    normal to `voxel_normals`, at (+-1/4, +-1/4) voxel in that plane, `VOXEL_SIGMA` wide and `THICKNESS` thin."""
    coords = np.asarray(coords)
    n = len(coords)
    normals = voxel_normals(coords, resolution).astype(np.float64)
    frames = _frames(normals, np.broadcast_to(np.array([1.0, 0.0, 0.0]), normals.shape).copy())
    corners = np.array([[-0.25, -0.25], [-0.25, 0.25], [0.25, -0.25], [0.25, 0.25]])
    offsets = corners[None, :, 0, None] * frames[:, None, :, 0] + corners[None, :, 1, None] * frames[:, None, :, 1]
    sigmas = np.broadcast_to(np.array([VOXEL_SIGMA, VOXEL_SIGMA, THICKNESS]), (n, PER_VOXEL, 3))
    return _pack(offsets, np.repeat(frames[:, None], PER_VOXEL, 1), sigmas)


def _sample_surface(vertices: np.ndarray, triangles: np.ndarray, count: int, seed: int
                    ) -> tuple[np.ndarray, np.ndarray] | None:
    """`count` points uniformly on the mesh's area (seeded) and their faces' unit normals; None without area."""
    corners = vertices[triangles]  # [T, 3, 3]
    cross = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    area = np.linalg.norm(cross, axis=-1)
    keep = np.isfinite(area) & (area > 0)
    if not keep.any():
        return None
    corners, cross, area = corners[keep], cross[keep], area[keep]
    rng = np.random.default_rng(seed)
    face = rng.choice(len(area), size=count, p=area / area.sum())
    u, v = rng.random(count), rng.random(count)
    flip = u + v > 1  # fold the unit square onto the triangle
    u, v = np.where(flip, 1 - u, u), np.where(flip, 1 - v, v)
    c = corners[face]
    points = c[:, 0] + u[:, None] * (c[:, 1] - c[:, 0]) + v[:, None] * (c[:, 2] - c[:, 0])
    return points, cross[face] / area[face, None]


def _sums(index: np.ndarray, values: np.ndarray, bins: int) -> np.ndarray:
    """Per-bin sums of `values` [S, ...] by `index` [S] -> [bins, ...]."""
    flat = values.reshape(len(values), -1)
    out = np.stack([np.bincount(index, flat[:, k], minlength=bins) for k in range(flat.shape[1])], -1)
    return out.reshape(bins, *values.shape[1:])


def mesh_surfels(vertices: np.ndarray, triangles: np.ndarray, coords: np.ndarray, resolution: int,
                 seed: int = 0) -> np.ndarray:
    """Surfels [N, PER_VOXEL * SURFEL_CHANNELS] of the voxels `coords` [N, 3] from the mesh (asset space) whose
    surface they cover (`voxelize.voxelize_mesh`).

    Per voxel: the surface samples inside it give a normal (principal axis of the normal tensor, so opposite windings
    do not cancel) and an in-plane axis (the samples' widest in-plane spread); the samples are split into the four
    quadrants of that plane around their centroid, and each quadrant gives a surfel at its centroid, normal to its
    own normal tensor, `SPREAD_TO_SIGMA` times its spread wide. A quadrant the samples miss takes the voxel's
    values; a voxel they miss (the surface only grazes it) gets small surfels at the nearest sample.
    """
    coords = np.asarray(coords, np.int64)
    vertices = np.asarray(vertices, np.float64)
    triangles = np.asarray(triangles, np.int64)
    n = len(coords)
    surfels = voxel_surfels(coords, resolution)
    if n == 0 or len(triangles) == 0:
        return surfels
    sampled = _sample_surface(vertices, triangles, min(SAMPLES_PER_VOXEL * n, MAX_SAMPLES), seed)
    if sampled is None:  # no area at all
        return surfels
    lookup = voxel_lookup(coords, resolution)
    cell = np.clip(np.floor((sampled[0] + 0.5) * resolution).astype(np.int64), 0, resolution - 1)
    voxel = lookup[tuple(cell.T)]
    for step in np.concatenate([np.eye(3, dtype=np.int64), -np.eye(3, dtype=np.int64)]):
        # a predicted surface (a lift's slab) may pass just outside the voxels made from it: its samples belong to
        # the face neighbour that is listed (a mesh's own voxels hold all of its samples, so this never applies)
        lost = voxel < 0
        if not lost.any():
            break
        voxel[lost] = lookup[tuple(np.clip(cell[lost] + step, 0, resolution - 1).T)]
    inside = voxel >= 0
    points, normals, voxel = sampled[0][inside], sampled[1][inside], voxel[inside]
    local = np.clip((points + 0.5) * resolution - (coords[voxel] + 0.5), -1.0, 1.0)  # voxels, from the centre

    count = np.bincount(voxel, minlength=n).astype(np.float64)
    seen = count > 0
    safe = np.maximum(count, 1)[:, None]
    centroid = _sums(voxel, local, n) / safe
    normal_tensor = _sums(voxel, normals[:, :, None] * normals[:, None, :], n) / safe[..., None]
    d = local - centroid[voxel]
    spread = _sums(voxel, d[:, :, None] * d[:, None, :], n) / safe[..., None]
    normal = _principal(normal_tensor + 1e-9 * np.eye(3))
    projector = np.eye(3) - normal[:, :, None] * normal[:, None, :]
    frames = _frames(normal, _principal(projector @ spread @ projector + 1e-12 * np.eye(3)))

    along = np.einsum("sk,skj->sj", d, frames[voxel][:, :, :2])  # in-plane coordinates around the centroid
    quadrant = voxel * PER_VOXEL + 2 * (along[:, 0] > 0) + (along[:, 1] > 0)
    bins = n * PER_VOXEL
    q_count = np.bincount(quadrant, minlength=bins).astype(np.float64)
    q_safe = np.maximum(q_count, 1)[:, None]
    q_centre = _sums(quadrant, local, bins) / q_safe
    q_along = _sums(quadrant, along, bins) / q_safe
    q_var = _sums(quadrant, along ** 2, bins) / q_safe - q_along ** 2
    q_normal = _principal(_sums(quadrant, normals[:, :, None] * normals[:, None, :], bins) / q_safe[..., None]
                          + 1e-9 * np.eye(3))
    voxel_frames = np.repeat(frames, PER_VOXEL, 0)
    q_normal *= np.sign((q_normal * voxel_frames[:, :, 2]).sum(-1, keepdims=True) + 1e-12)  # one side per voxel
    q_frames = _frames(q_normal, voxel_frames[:, :, 0])
    q_sigma = np.maximum(SPREAD_TO_SIGMA * np.sqrt(np.maximum(q_var, 0)), MIN_SIGMA)
    sigmas = np.concatenate([q_sigma, np.full((bins, 1), THICKNESS)], -1)

    empty = q_count == 0  # a quadrant no sample reached: the voxel's centroid and frame, half its spread
    voxel_sigma = np.maximum(np.sqrt(np.maximum(np.einsum("vij,vik,vjk->vk", frames, spread, frames), 0)[:, :2])
                             * SPREAD_TO_SIGMA * 0.5, MIN_SIGMA)
    q_centre[empty] = np.repeat(centroid, PER_VOXEL, 0)[empty]
    q_frames[empty] = voxel_frames[empty]
    sigmas[empty, :2] = np.repeat(voxel_sigma, PER_VOXEL, 0)[empty]
    packed = _pack(q_centre.reshape(n, PER_VOXEL, 3), q_frames.reshape(n, PER_VOXEL, 3, 3),
                   sigmas.reshape(n, PER_VOXEL, 3))
    surfels[seen] = packed[seen]
    if not seen.all():
        surfels[~seen] = _touching(coords[~seen], *sampled, resolution)
    return surfels


def nearest_points(queries: np.ndarray, points: np.ndarray, resolution: int, chunk: int = 1 << 22) -> np.ndarray:
    """The index [Q] of the point of `points` [S, 3] nearest to each of `queries` [Q, 3] (asset space).

    The points are grouped by voxel, each group a ball (its centroid, the distance to its farthest point). The
    nearest point of a query is no farther than the nearest group's centroid plus its radius, so only the groups
    whose balls come that close need their points compared. Exact; a lift's voxels the surface only passes near (the
    sides of an inflated slab: two thousand voxels, up to 7 voxels from the surface, against half a million samples)
    took 10 s by brute force. `chunk` bounds the query x group distances held at once."""
    queries, points = np.asarray(queries, np.float64), np.asarray(points, np.float64)
    nearest = np.full(len(queries), -1, np.int64)
    if not len(queries) or not len(points):
        return nearest
    cell = np.clip(np.floor((points + 0.5) * resolution).astype(np.int64), 0, resolution - 1)
    group_of = np.unique((cell[:, 0] * resolution + cell[:, 1]) * resolution + cell[:, 2], return_inverse=True)[1]
    order = np.argsort(group_of, kind="stable")  # the points group by group, from `starts[g]` on
    count = np.bincount(group_of)
    starts = np.concatenate([[0], np.cumsum(count)])
    centroid = np.stack([np.bincount(group_of, points[:, k]) for k in range(3)], -1) / count[:, None]
    radius = np.zeros(len(count))
    np.maximum.at(radius, group_of, np.sqrt(((points - centroid[group_of]) ** 2).sum(-1)))
    centroids, radii = torch.from_numpy(centroid), torch.from_numpy(radius)
    step = max(1, chunk // len(count))
    for first in range(0, len(queries), step):
        block = queries[first:first + step]
        to_centre = torch.cdist(torch.from_numpy(block), centroids)  # [q, groups]
        bound = (to_centre + radii).min(1, keepdim=True).values  # some point is this near
        owner, group = (to_centre - radii <= bound).nonzero(as_tuple=True)  # groups that may hold a nearer one
        owner, group = owner.numpy(), group.numpy()
        sizes = count[group]
        owner = np.repeat(owner, sizes)
        # every point of every selected group: each group's run in `order`, laid end to end
        candidate = order[np.repeat(starts[group] - np.cumsum(sizes) + sizes, sizes) + np.arange(sizes.sum())]
        squared = ((points[candidate] - block[owner]) ** 2).sum(-1)
        best = np.full(len(block), np.inf)
        np.minimum.at(best, owner, squared)
        is_best = squared == best[owner]
        with_best, at = np.unique(owner[is_best], return_index=True)
        nearest[first + with_best] = candidate[is_best][at]
    return nearest


def _touching(coords: np.ndarray, points: np.ndarray, normals: np.ndarray, resolution: int) -> np.ndarray:
    """Surfels of voxels the surface only touches (no sample fell inside; or, for a predicted surface, passes
    near): all at the point of the voxel nearest to the surface sample nearest to its centre, facing that sample's
    normal, `MIN_SIGMA` small, so they add no surface where there is none."""
    centres = (coords + 0.5) / resolution - 0.5
    nearest = nearest_points(centres, points, resolution)
    toward = np.clip((points[nearest] - centres) * resolution, -0.5, 0.5)  # in the voxel, as near as it gets
    offsets = np.repeat(toward[:, None], PER_VOXEL, 1)
    frames = np.repeat(_frames(normals[nearest], np.broadcast_to([1.0, 0.0, 0.0], (len(coords), 3)).copy())[:, None],
                       PER_VOXEL, 1)
    sigmas = np.broadcast_to(np.array([MIN_SIGMA, MIN_SIGMA, THICKNESS]), (len(coords), PER_VOXEL, 3))
    return _pack(offsets, frames, sigmas)


def asset_surfels(extras: dict, coords: np.ndarray, resolution: int) -> np.ndarray:
    """An asset's surfels: its "surfels" extra when it carries one (checked), else `voxel_surfels`."""
    width = PER_VOXEL * SURFEL_CHANNELS
    if EXTRA_NAME not in extras:
        return voxel_surfels(coords, resolution)
    table = np.asarray(extras[EXTRA_NAME], np.float32)
    if table.shape != (len(coords), width):
        raise NearError(f"the asset's surfels are {table.shape}, expected ({len(coords)}, {width})")
    parts = table.reshape(len(coords), PER_VOXEL, SURFEL_CHANNELS)
    quats = parts[..., 3:7]
    if not np.isfinite(table).all():
        raise NearError("the asset's surfels hold NaN or infinite values: re-encode it")
    if (np.abs(parts[..., :3]) > 1.0).any() or (parts[..., 7:] <= 0).any() or (parts[..., 7:] > 2.0).any() or (
            np.abs(np.linalg.norm(quats, axis=-1) - 1) > 1e-3).any():
        raise NearError("the asset's surfels are out of range (offsets within a voxel, unit quaternions and "
                        "widths in (0, 2] voxels expected): re-encode it")
    return table


def surfel_centres(coords: np.ndarray, surfels: np.ndarray, resolution: int) -> np.ndarray:
    """The surfels' centres in asset space [N * PER_VOXEL, 3] (float32), in the order of the Gaussians."""
    centres = (np.asarray(coords, np.float64) + 0.5) / resolution - 0.5
    offsets = np.asarray(surfels, np.float64).reshape(len(centres), PER_VOXEL, SURFEL_CHANNELS)[..., :3]
    return (centres[:, None, :] + offsets / resolution).reshape(-1, 3).astype(np.float32)


def voxel_lookup(coords: np.ndarray, resolution: int, pad: int = 0) -> np.ndarray:
    """The grid [R + 2 pad]^3 (int64) holding each voxel's row in `coords` at its cell (shifted by `pad`), -1
    elsewhere: which voxel a point or a neighbouring cell belongs to, in one lookup."""
    lookup = np.full((resolution + 2 * pad,) * 3, -1, np.int64)
    lookup[tuple((np.asarray(coords, np.int64) + pad).T)] = np.arange(len(coords))
    return lookup


def surfel_normals(surfels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Unit normals [V * PER_VOXEL, 3] (float32; sign arbitrary): each surfel's local z axis."""
    table = torch.as_tensor(np.array(surfels, np.float32) if isinstance(surfels, np.ndarray) else surfels)
    return quat_to_rotmat(surfel_tensors(table)["quats"])[..., :, 2]


def surfel_tensors(surfels: np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
    """[V, PER_VOXEL * SURFEL_CHANNELS] -> {"offsets", "quats", "sigmas"}, each [V * PER_VOXEL, k] (voxel units)."""
    table = torch.as_tensor(surfels).reshape(-1, SURFEL_CHANNELS)
    return {"offsets": table[:, :3], "quats": table[:, 3:7], "sigmas": table[:, 7:]}
