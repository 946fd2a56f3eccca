"""Training views: cameras on a Hammersley sphere around the object, as TRELLIS and NeAR render their data sets."""

from __future__ import annotations

import math

import numpy as np

from ..camera import Camera
from ..models.gaussian_heads import radical_inverse

RADIUS = 2.0
FOV_DEG = 40.0


def hammersley_sphere(n: int, offset: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """n unit directions [n, 3] spread evenly over the sphere (TRELLIS' `sphere_hammersley_sequence`, Z up).

    `offset` (two numbers in [0, 1)) shifts the pattern, so each object gets its own set of views.
    """
    i = np.arange(n)
    u = (i + offset[0]) / n
    v = np.array([radical_inverse(2, int(k)) for k in i]) + offset[1]
    pitch = np.arccos(np.clip(1.0 - 2.0 * u, -1.0, 1.0)) - math.pi / 2
    yaw = 2.0 * math.pi * v
    return np.stack([np.cos(yaw) * np.cos(pitch), np.sin(yaw) * np.cos(pitch), np.sin(pitch)], axis=-1)


def view_cameras(n: int, offset: tuple[float, float], size: int, radius: float = RADIUS,
                 fov_deg: float = FOV_DEG) -> list[Camera]:
    """Square pinhole cameras at `radius` on the Hammersley sphere, all looking at the origin."""
    return [Camera.look_at(radius * d, np.zeros(3), width=size, height=size, fov_x_deg=fov_deg)
            for d in hammersley_sphere(n, offset)]


def camera_record(camera: Camera) -> dict:
    """What a training loader needs of a camera, as JSON: OpenCV world-to-camera and pixel intrinsics."""
    return {"world_to_camera": camera.world_to_camera.tolist(), "fx": camera.fx, "fy": camera.fy, "cx": camera.cx,
            "cy": camera.cy, "width": camera.width, "height": camera.height}


def spread_subset(n: int, k: int) -> list[int]:
    """k of n view indices spread evenly over the list (the first Hammersley points alone cluster near one pole)."""
    k = min(k, n)
    return sorted({int(round(x)) for x in np.linspace(0, n - 1, k)}) if k > 0 else []
