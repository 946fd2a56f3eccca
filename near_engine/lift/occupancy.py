"""near-tiny's own geometry: one photo -> the object's solid on the 64^3 grid, consistent with its silhouette.

A full 64^3 occupancy decoder is far too much to train on two cores. Seen from the photo's camera, most objects are
a *slab*: along each pixel's ray the object starts at a front depth and ends at a back depth. `SlabNet`, a small
convolutional U-Net on the prepared photo, predicts both per pixel of a 64^2 map, as offsets from the silhouette
inflation's answer (`geometry.poisson_height`: the half-thickness 2 sqrt(h), given as an input and as the starting
point, so the untrained network *is* the inflation baseline and training can only move it where the data says).
Depths are in the photo's pixels at the origin's distance, so the same network serves any lens: the camera turns them
into asset units. A voxel is solid when it projects inside the silhouette and lies between the two depths; the
surface voxels of that solid are the geometry (`geometry.surface_of`).

Trained (`train.lift.train_occupancy`) on the same prepared views as the lift regressor, against the front and back
depths of the object's voxelized mesh along each ray.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..camera import Camera
from ..models.slab import SlabNet
from .geometry import poisson_height, slab_surfels, slab_voxels

__all__ = ["SlabNet", "slab_inputs", "slab_targets", "predict_geometry", "map_camera", "MAP_SIZE"]

#: Side of the predicted depth maps (one per voxel column of the 64^3 grid, about).
MAP_SIZE = 64


def slab_inputs(photos: torch.Tensor) -> torch.Tensor:
    """Prepared photos [B, S, S, 4] -> the network's input [B, 6, 64, 64]: log1p colour, alpha, silhouette mask and
    the inflation half-thickness (map pixels, divided by 64)."""
    x = photos.permute(0, 3, 1, 2)
    x = F.interpolate(x, size=(MAP_SIZE, MAP_SIZE), mode="area")
    mask = (x[:, 3] > 0.5)
    half = 2.0 * poisson_height(mask).clamp_min(0).sqrt()
    return torch.cat([torch.log1p(16 * x[:, :3].clamp_min(0)), x[:, 3:], mask[:, None].float(), half[:, None] / 64.0],
                     1)


def map_camera(camera: Camera) -> Camera:
    """The prepared photo's camera at the depth maps' resolution."""
    return camera.scaled(MAP_SIZE / camera.width)


def slab_targets(coords: np.ndarray, camera: Camera, resolution: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(front/back depth offsets [2, 64, 64] in map pixels at the origin's depth, zero where no voxel is; mask of
    the rays that hit a voxel [64, 64]) of the voxels `coords` seen by `camera` (the prepared photo's camera)."""
    from .views import voxel_depth

    small = map_camera(camera)
    front = voxel_depth(coords, resolution, small)
    back = voxel_depth(coords, resolution, small, farthest=True)
    hit = front < 1e9
    distance = float(camera.world_to_camera[2, 3])
    offsets = np.stack([front - distance, back - distance]) * (small.fx / distance)
    return np.where(hit, offsets, 0.0).astype(np.float32), hit


def predict_geometry(net: SlabNet, photo: np.ndarray, camera: Camera, resolution: int = 64,
                     with_surfels: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Surface voxels [N, 3] of the solid the network sees in the prepared photo [S, S, 4] taken by `camera`; with
    `with_surfels`, also their surfels on the predicted front and back surfaces (`geometry.slab_surfels`)."""
    with torch.no_grad():
        x = slab_inputs(torch.from_numpy(np.ascontiguousarray(photo))[None])
        depths = net(x)[0].numpy()  # [2, 64, 64] map pixels at the origin's depth
    small, distance = map_camera(camera), float(camera.world_to_camera[2, 3])
    front, back = distance + depths * distance / small.fx  # camera depths
    mask = x[0, 4].numpy() > 0.5
    coords = slab_voxels(front, back, mask, small, resolution, margin=0.5 * distance / small.fx)
    if not with_surfels:
        return coords
    return coords, slab_surfels(front, back, mask, small, coords, resolution)
