"""Where the photo was taken from, and which voxels it shows.

**The photo's camera convention.** A photo is taken as Blender's Front view sees the object: from -Y, looking at the
origin, at `elevation` degrees above the XY plane, distance `cycles.views.RADIUS` (2) and a 40 degree field of view,
the framing of the training views. The lift does not need the photo's own lens: the prepared photo is the 1.2x
square around the object, and `fit_crop_camera` makes the camera of that square from the geometry, so the geometry's
projected box lands on the photo's. A user whose mesh faces another way rotates it (`--mesh-rotation` in degrees about
Z) or sets the elevation, until the mesh in that front view looks like the photo.

**Visibility without a depth pass.** A photo has no depth, so a voxel counts as seen when no other voxel lies in front
of it: `voxel_depth` splats every voxel centre as a square of its projected size into a z-buffer.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..camera import Camera
from ..cycles.views import FOV_DEG, RADIUS
from ..models.gaussian_heads import voxel_centres
from .image import CROP_MARGIN

__all__ = ["front_camera", "fit_crop_camera", "voxel_points", "voxel_depth", "VISIBILITY_TOLERANCE_VOXELS"]

#: A voxel within this many voxel sizes behind the first one along a pixel's ray still counts as seen (the surface
#: is one or two voxels thick where it is slanted).
VISIBILITY_TOLERANCE_VOXELS = 2.0


def front_camera(elevation_deg: float = 0.0, size: int = 512) -> Camera:
    """The photo convention's camera: Front view (from -Y) at `elevation_deg`, distance 2, 40 degrees."""
    if not -89.0 <= elevation_deg <= 89.0:
        raise ValueError(f"the photo's elevation must be between -89 and 89 degrees, got {elevation_deg}")
    return Camera.orbit(-90.0, elevation_deg, RADIUS, width=size, height=size, fov_x_deg=FOV_DEG)


def voxel_points(coords: np.ndarray, resolution: int) -> np.ndarray:
    """Voxel indices [N, 3] -> their centres in asset space [N, 3] (float64)."""
    return voxel_centres(torch.as_tensor(np.asarray(coords)), resolution).double().numpy()


def fit_crop_camera(camera: Camera, coords: np.ndarray, resolution: int, size: int) -> Camera:
    """The camera of the 1.2x square around the voxels' projected box in `camera`'s view, `size` pixels across: the
    frame `image.crop_object` cuts from a photo of the same object (voxels padded by half a voxel)."""
    points = voxel_points(coords, resolution)
    corners = (np.array(np.meshgrid([-1, 1], [-1, 1], [-1, 1])).reshape(3, -1).T * (0.5 / resolution))
    pixels, _ = camera.project((points[:, None, :] + corners[None]).reshape(-1, 3))
    low, high = pixels.min(0), pixels.max(0)
    centre = (low + high) / 2
    side = CROP_MARGIN * float((high - low).max())
    scale = size / side
    return Camera(size, size, camera.fx * scale, camera.fy * scale, (camera.cx - centre[0] + side / 2) * scale,
                  (camera.cy - centre[1] + side / 2) * scale, camera.world_to_camera, camera.near, camera.far,
                  camera.orthographic)


def voxel_depth(coords: np.ndarray, resolution: int, camera: Camera, farthest: bool = False) -> np.ndarray:
    """The z-buffer [H, W] (camera z, 1e10 where empty) of the voxels drawn as squares of their projected size;
    `farthest`: the z of the last voxel along each ray instead (-1e10 where empty)."""
    points = voxel_points(coords, resolution)
    pixels, z = camera.project(points)
    depth = torch.full((camera.height * camera.width,), -1e10 if farthest else 1e10, dtype=torch.float64)
    ahead = z > 1e-6
    if not ahead.any():
        return depth.reshape(camera.height, camera.width).numpy()
    pixels, z = pixels[ahead], z[ahead]
    radius = 0.5 * camera.fx / resolution / z  # half a voxel, in pixels, at the voxel's depth
    reach = int(min(32, math.ceil(float(radius.max()))))
    base = np.floor(pixels).astype(np.int64)
    for dy in range(-reach, reach + 1):
        for dx in range(-reach, reach + 1):
            px, py = base[:, 0] + dx, base[:, 1] + dy
            # the pixel's centre must lie within the voxel's projected square
            inside = ((np.abs(px + 0.5 - pixels[:, 0]) <= radius + 0.5) & (np.abs(py + 0.5 - pixels[:, 1]) <= radius + 0.5)
                      & (px >= 0) & (px < camera.width) & (py >= 0) & (py < camera.height))
            index = torch.from_numpy(py[inside] * camera.width + px[inside])
            depth.scatter_reduce_(0, index, torch.from_numpy(z[inside]), reduce="amax" if farthest else "amin")
    return depth.reshape(camera.height, camera.width).numpy()
