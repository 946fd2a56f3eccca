"""Stage 1's structure: the object's surface voxels on the 64^3 grid, from one of three sources behind `Geometry`.

* `mesh`: a mesh the user gives, normalized as `encode-mesh` normalizes it (bounding-box centre at the origin,
  largest side 1) and turned by `rotation` degrees about Z so that its front view matches the photo
  (`views.front_camera`). NeAR's released code takes its geometry from a mesh in the same way.
* `inflate`: the photo's silhouette inflated into a solid: a thickness that solves Poisson's equation inside the
  silhouette (zero on its outline), so a disc becomes a ball, mirrored front to back about the plane through the
  origin. The baseline that near-tiny's own model must beat, and consistent with the silhouette by construction.
* `trellis`: the official sparse-structure flow and decoder (`lift.official`).

Every source returns surface voxels, as `voxelize.voxelize_mesh` marks them and the renderer expects. `solid` fills a
surface's inside, which is what the geometry IoU compares.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..camera import Camera
from ..errors import NearError
from .views import voxel_points

__all__ = ["mesh_geometry", "triangles_geometry", "inflate_silhouette", "surface_of", "solid", "voxel_iou"]

#: A voxel and its six face neighbours.
_CROSS = torch.zeros(1, 1, 3, 3, 3)
_CROSS[0, 0, 1, 1, :] = _CROSS[0, 0, 1, :, 1] = _CROSS[0, 0, :, 1, 1] = 1

#: Jacobi iterations per level of the coarse-to-fine Poisson solve (the coarsest level is 8 pixels across).
POISSON_ITERATIONS = 150


def triangles_geometry(vertices: np.ndarray, triangles: np.ndarray, rotation_deg: float = 0.0,
                       resolution: int = 64, name: str = "the mesh") -> tuple[np.ndarray, np.ndarray]:
    """Surface voxels [N, 3] of a triangle mesh (any placement: it is normalized), turned about Z first, and where
    the surface lies in each of them (`surfels.mesh_surfels`)."""
    from ..cycles.meshes import check_surface, normalizing_transform
    from ..surfels import mesh_surfels
    from ..voxelize import voxelize_mesh

    vertices = np.asarray(vertices, dtype=np.float64)
    if len(vertices) == 0 or not np.isfinite(vertices).all():
        raise NearError(f"{name}: the mesh has no vertices, or vertices that are not finite")
    turn = math.radians(rotation_deg)
    c, s = math.cos(turn), math.sin(turn)
    vertices = vertices @ np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]).T
    m = normalizing_transform(vertices, name)
    vertices = (vertices @ m[:3, :3].T + m[:3, 3]).astype(np.float32)
    triangles = np.asarray(triangles, dtype=np.int32)
    check_surface(name, vertices, triangles)
    coords = voxelize_mesh(vertices, triangles, resolution)
    return coords, mesh_surfels(vertices, triangles, coords, resolution)


def mesh_geometry(path, rotation_deg: float = 0.0, resolution: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """`triangles_geometry` of a mesh file Blender imports (OBJ, glTF/GLB, PLY, .blend)."""
    from pathlib import Path

    from ..cycles.meshes import import_mesh

    vertices, triangles = import_mesh(path)
    return triangles_geometry(vertices, triangles, rotation_deg, resolution, Path(path).name)


def surface_of(occupied: np.ndarray) -> np.ndarray:
    """The voxels [N, 3] of a solid bool [R, R, R] that touch its outside (6-neighbourhood, the grid's border out)."""
    solid_t = torch.from_numpy(np.ascontiguousarray(occupied))[None, None].float()
    all_six = F.conv3d(F.pad(solid_t, (1,) * 6), _CROSS) >= 7  # itself and its six neighbours are solid
    shell = solid_t.bool() & ~all_six
    return torch.nonzero(shell[0, 0]).numpy().astype(np.int32)


def solid(coords: np.ndarray, resolution: int = 64) -> np.ndarray:
    """Bool [R, R, R]: the voxels `coords` and everything they enclose (the outside is flood-filled from the border,
    6-connected, and the rest is solid)."""
    wall = np.zeros((resolution,) * 3, dtype=bool)
    if len(coords):
        wall[tuple(np.asarray(coords).T)] = True
    wall_t = torch.from_numpy(wall)[None, None]
    outside = torch.zeros_like(wall_t)
    outside[..., 0, :, :] = outside[..., -1, :, :] = True
    outside[..., :, 0, :] = outside[..., :, -1, :] = True
    outside[..., :, :, 0] = outside[..., :, :, -1] = True
    outside &= ~wall_t
    for _ in range(4 * resolution):
        grown = (F.conv3d(outside.float(), _CROSS, padding=1) > 0) & ~wall_t
        if torch.equal(grown, outside):
            break
        outside = grown
    return ~outside[0, 0].numpy()


def voxel_iou(predicted: np.ndarray, truth: np.ndarray, resolution: int = 64) -> float:
    """Intersection over union of the solids two surfaces enclose (`solid`)."""
    a, b = solid(predicted, resolution), solid(truth, resolution)
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def poisson_height(masks: np.ndarray | torch.Tensor, iterations: int = POISSON_ITERATIONS) -> torch.Tensor:
    """h [B, H, W] with -laplace(h) = 1 inside `masks` (bool [B, H, W], pixel units) and h = 0 outside them.

    For a disc of radius r, h = (r^2 - d^2) / 4, so 2 sqrt(h) is the half-height of the ball over it. Solved by
    Jacobi iterations from coarse to fine (each level starts from the coarser solution), batched."""
    inside = torch.as_tensor(np.asarray(masks) if not torch.is_tensor(masks) else masks).float()[:, None]
    levels = [inside]
    while min(levels[-1].shape[-2:]) > 8:
        levels.append((F.avg_pool2d(levels[-1], 2, ceil_mode=True) > 0.5).float())
    kernel = torch.tensor([[0.0, 0.25, 0.0], [0.25, 0.0, 0.25], [0.0, 0.25, 0.0]])[None, None]
    h = torch.zeros_like(levels[-1])
    for depth, mask in reversed(list(enumerate(levels))):
        if h.shape[-2:] != mask.shape[-2:]:  # the next finer level starts from this one's solution
            h = F.interpolate(h, size=mask.shape[-2:], mode="bilinear", align_corners=False)
        spacing = 4.0 ** depth  # squared pixel size of this level: h stays in finest pixels squared
        for _ in range(iterations):  # Jacobi: h = mean of the four neighbours + spacing/4, inside only
            h = (F.conv2d(F.pad(h, (1, 1, 1, 1)), kernel) + 0.25 * spacing) * mask
    return h[:, 0]


def slab_surfels(front: np.ndarray, back: np.ndarray, mask: np.ndarray, camera: Camera, coords: np.ndarray,
                 resolution: int = 64) -> np.ndarray:
    """Surfels (`surfels.mesh_surfels`) of the voxels `coords` from a slab seen by `camera`: the surfaces at camera
    depths `front` and `back` [H, W] (`camera`'s pixels) over the pixels of `mask`, each triangulated over every
    2 x 2 block of masked pixels. So a lift without a mesh places its Gaussians on the surface it predicted, not at
    voxel centres."""
    from ..surfels import mesh_surfels

    height, width = mask.shape
    u = (np.arange(width) + 0.5 - camera.cx) / camera.fx
    v = (np.arange(height) + 0.5 - camera.cy) / camera.fy
    rays = np.stack(np.meshgrid(u, v) + [np.ones((height, width))], -1)  # camera space at depth 1
    to_world = camera.camera_to_world
    index = np.arange(height * width).reshape(height, width)
    quads = mask[:-1, :-1] & mask[1:, :-1] & mask[:-1, 1:] & mask[1:, 1:]
    a, b, c, d = (index[:-1, :-1][quads], index[:-1, 1:][quads], index[1:, :-1][quads], index[1:, 1:][quads])
    layers, faces = [], []
    for k, depth in enumerate((front, back)):
        points = (rays * depth[..., None]).reshape(-1, 3) @ to_world[:3, :3].T + to_world[:3, 3]
        layers.append(points)
        offset = k * height * width
        faces += [np.stack([a, c, b], -1) + offset, np.stack([b, c, d], -1) + offset]
    triangles = np.concatenate(faces)
    if not len(triangles):
        from ..surfels import voxel_surfels

        return voxel_surfels(coords, resolution)
    return mesh_surfels(np.concatenate(layers), triangles, coords, resolution)


def inflated_slab(alpha: np.ndarray, camera: Camera) -> tuple[np.ndarray, np.ndarray, np.ndarray, Camera]:
    """The silhouette of `alpha` [S, S] inflated (Poisson) and mirrored about the plane through the origin facing
    `camera`: (front depth, back depth, mask, the camera of those maps), at about the voxels' resolution."""
    size = alpha.shape[0]
    step = max(1, size // INFLATION_MAP)  # solve at about the grid's resolution, read it with bilinear lookups
    mask = F.avg_pool2d(torch.from_numpy(alpha.astype(np.float32))[None, None], step)[0, 0].numpy() > 0.5
    if not mask.any():
        raise NearError("the photo's silhouette is empty: there is nothing to inflate")
    half = 2.0 * np.sqrt(np.maximum(poisson_height(mask[None])[0].numpy(), 0.0)) * step  # in photo pixels
    centre_z = float(camera.world_to_camera[2, 3])  # the origin's depth
    thickness = half * centre_z / camera.fx
    return centre_z - thickness, centre_z + thickness, mask, camera.scaled(mask.shape[1] / camera.width)


#: Side of the inflation's maps (about the voxel grid's).
INFLATION_MAP = 64


def slab_voxels(front: np.ndarray, back: np.ndarray, mask: np.ndarray, camera: Camera, resolution: int = 64,
                margin: float = 0.0) -> np.ndarray:
    """Surface voxels [N, 3] of the solid between camera depths `front` and `back` [H, W] over the pixels of
    `mask` (bilinear lookups at each voxel centre's pixel), widened by `margin` (camera depth units)."""
    points = voxel_points(np.argwhere(np.ones((resolution,) * 3, dtype=bool)), resolution)
    pixels, z = camera.project(points)
    height, width = mask.shape
    grid = torch.from_numpy(np.stack([2 * pixels[:, 0] / width - 1, 2 * pixels[:, 1] / height - 1], -1)).float()
    maps = torch.from_numpy(np.stack([front, back, mask]).astype(np.float32))[None]
    near, far, inside = F.grid_sample(maps, grid[None, None], mode="bilinear", padding_mode="zeros",
                                      align_corners=False)[0, :, 0].numpy()
    occupied = (inside > 0.5) & (z >= near - margin) & (z <= far + margin)
    return surface_of(occupied.reshape((resolution,) * 3))


def inflate_silhouette(alpha: np.ndarray, camera: Camera, resolution: int = 64, with_surfels: bool = False
                       ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Surface voxels [N, 3] of the photo's silhouette inflated (`inflated_slab`) for the camera of `alpha` [S, S];
    with `with_surfels`, also their surfels on the inflated surface (`slab_surfels`)."""
    front, back, mask, small = inflated_slab(alpha, camera)
    coords = slab_voxels(front, back, mask, small, resolution)
    if not with_surfels:
        return coords
    return coords, slab_surfels(front, back, mask, small, coords, resolution)
