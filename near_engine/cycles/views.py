"""Views of an object: cameras on a Hammersley sphere around it (as TRELLIS and NeAR render their data sets), and
the Blender camera that renders them."""

from __future__ import annotations

import math

import numpy as np

from ..camera import BLENDER_TO_OPENCV, Camera
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


def add_camera(scene, fov_deg: float):
    """A square-image pinhole camera with the horizontal field of view `fov_deg`, made the scene's camera."""
    import bpy

    data = bpy.data.cameras.new("camera")
    data.sensor_fit, data.angle = "HORIZONTAL", math.radians(fov_deg)
    data.clip_start, data.clip_end = 0.1, 100.0
    obj = bpy.data.objects.new("camera", data)
    scene.collection.objects.link(obj)
    scene.camera = obj
    return obj


def blender_camera_matrix(camera: Camera):
    """The Blender camera object matrix (looks down -Z, +Y up) of an OpenCV-axes camera."""
    from mathutils import Matrix

    return Matrix((camera.camera_to_world @ BLENDER_TO_OPENCV).tolist())
