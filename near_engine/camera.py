"""Pinhole and orthographic cameras in OpenCV axes, built from the parameters Blender's camera uses.

The engine (and gsplat) work in OpenCV camera axes: x right, y down, z forward, with a world-to-camera matrix.
Blender cameras look down -Z with +Y up. `Camera.from_blender` reproduces Blender's view-plane computation
(`BKE_camera_params_compute_viewplane`, which Cycles follows) so the engine frames exactly what Cycles frames:
sensor fit, lens shift, pixel aspect, resolution percentage and orthographic scale included.
Pixel centres sit at half-integer coordinates (pixel (i, j) covers [i, i+1) x [j, j+1)), as in Cycles and gsplat.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .errors import CameraError

# Blender camera axes (x right, y up, looking down -z) to OpenCV axes (x right, y down, looking down +z).
BLENDER_TO_OPENCV = np.diag([1.0, -1.0, -1.0, 1.0])

#: Far clip distance used when a projection's far plane is lost to float32 rounding (a huge viewport clip end).
UNBOUNDED_FAR = 1e10


@dataclass(frozen=True, eq=False)
class Camera:
    """A camera: image size, intrinsics in pixels, world-to-camera (OpenCV axes) and clipping range.

    For an orthographic camera `fx`/`fy` are pixels per metre and points project as `u = fx * x + cx`.
    """

    width: int
    height: int
    fx: float
    fy: float
    cx: float
    cy: float
    world_to_camera: np.ndarray = field(default_factory=lambda: np.eye(4))
    near: float = 0.1
    far: float = 1000.0
    orthographic: bool = False

    def __post_init__(self) -> None:
        w2c = np.asarray(self.world_to_camera, dtype=np.float64)
        object.__setattr__(self, "world_to_camera", w2c)
        try:
            whole = int(self.width) == self.width and int(self.height) == self.height
        except (TypeError, ValueError, OverflowError):
            whole = False
        if not whole or self.width < 1 or self.height < 1:
            raise CameraError(f"camera resolution must be positive integers, got {self.width}x{self.height}")
        object.__setattr__(self, "width", int(self.width))
        object.__setattr__(self, "height", int(self.height))
        values = (self.fx, self.fy, self.cx, self.cy, self.near, self.far)
        if not all(math.isfinite(v) for v in values) or self.fx <= 0 or self.fy <= 0:
            raise CameraError(f"camera intrinsics must be finite with positive focal lengths, got fx={self.fx}, fy={self.fy}")
        if w2c.shape != (4, 4) or not np.isfinite(w2c).all():
            raise CameraError(f"world_to_camera must be a finite 4x4 matrix, got shape {w2c.shape}")
        rot = w2c[:3, :3]
        if (not np.allclose(rot @ rot.T, np.eye(3), atol=1e-6) or np.linalg.det(rot) < 0
                or not np.allclose(w2c[3], [0.0, 0.0, 0.0, 1.0])):
            raise CameraError("world_to_camera must be a rigid transform (rotation and translation, no scale, "
                              "shear or mirroring); move scale onto the objects instead")
        if not 0 <= self.near < self.far:
            raise CameraError(f"clip range must satisfy 0 <= near < far, got near={self.near}, far={self.far}")

    # ----------------------------------------------------------------------------------------------------------------
    # construction

    @classmethod
    def from_blender(
        cls,
        matrix_world: np.ndarray | None = None,
        *,
        type: str = "PERSP",
        lens: float = 50.0,
        sensor_width: float = 36.0,
        sensor_height: float = 24.0,
        sensor_fit: str = "AUTO",
        shift_x: float = 0.0,
        shift_y: float = 0.0,
        ortho_scale: float = 6.0,
        clip_start: float = 0.1,
        clip_end: float = 1000.0,
        resolution_x: int = 1920,
        resolution_y: int = 1080,
        resolution_percentage: int = 100,
        pixel_aspect_x: float = 1.0,
        pixel_aspect_y: float = 1.0,
    ) -> "Camera":
        """The camera Cycles renders for a Blender camera object with these data-block and render settings.

        `matrix_world` is the camera object's world matrix (Blender axes, scale ignored as Blender does).
        """
        if type not in ("PERSP", "ORTHO"):
            raise CameraError(f"camera type {type!r} is not supported (use 'PERSP' or 'ORTHO')")
        if sensor_fit not in ("AUTO", "HORIZONTAL", "VERTICAL"):
            raise CameraError(f"sensor_fit must be AUTO, HORIZONTAL or VERTICAL, got {sensor_fit!r}")
        width = int(resolution_x * resolution_percentage / 100)
        height = int(resolution_y * resolution_percentage / 100)
        if width < 1 or height < 1:
            raise CameraError(f"render resolution is empty: {resolution_x}x{resolution_y} at {resolution_percentage}%")
        if min(lens, sensor_width, sensor_height, pixel_aspect_x, pixel_aspect_y, ortho_scale) <= 0:
            raise CameraError("lens, sensor size, pixel aspect and orthographic scale must all be positive")

        ycor = pixel_aspect_y / pixel_aspect_x
        fit = sensor_fit
        if fit == "AUTO":
            fit = "HORIZONTAL" if pixel_aspect_x * width >= pixel_aspect_y * height else "VERTICAL"
            sensor = sensor_width  # AUTO always measures the sensor across its width
        else:
            sensor = sensor_width if fit == "HORIZONTAL" else sensor_height
        viewfac = width if fit == "HORIZONTAL" else ycor * height  # pixels spanned by the fitted sensor side

        fx = viewfac / ortho_scale if type == "ORTHO" else lens * viewfac / sensor
        fy = fx / ycor
        cx = 0.5 * width - shift_x * viewfac
        cy = 0.5 * height + shift_y * viewfac / ycor

        w2c = BLENDER_TO_OPENCV @ np.linalg.inv(_normalized_rigid(matrix_world))
        return cls(width, height, fx, fy, cx, cy, w2c, clip_start, clip_end, type == "ORTHO")

    @classmethod
    def look_at(
        cls,
        eye: np.ndarray,
        target: np.ndarray,
        *,
        width: int,
        height: int,
        fov_x_deg: float,
        up: np.ndarray = (0.0, 0.0, 1.0),
        near: float = 0.1,
        far: float = 1000.0,
    ) -> "Camera":
        """A pinhole camera at `eye` looking at `target` (Z up), with a horizontal field of view in degrees."""
        eye, target, up = (np.asarray(v, dtype=np.float64) for v in (eye, target, up))
        forward = target - eye
        if not (0 < fov_x_deg < 180) or np.linalg.norm(forward) == 0:
            raise CameraError("look_at needs eye != target and a field of view in (0, 180) degrees")
        z = forward / np.linalg.norm(forward)
        x = np.cross(z, up)  # right = forward x up; then y = z x x points down (OpenCV), so `up` is up in the image
        if np.linalg.norm(x) < 1e-9:  # looking straight along `up`: any perpendicular will do
            x = np.cross(z, np.array([0.0, -1.0, 0.0]))
        x /= np.linalg.norm(x)
        y = np.cross(z, x)
        w2c = np.eye(4)
        w2c[:3, :3] = np.stack([x, y, z])
        w2c[:3, 3] = -w2c[:3, :3] @ eye
        f = 0.5 * width / math.tan(math.radians(fov_x_deg) / 2)
        return cls(width, height, f, f, width / 2, height / 2, w2c, near, far)

    @classmethod
    def orbit(
        cls,
        azimuth_deg: float,
        elevation_deg: float,
        distance: float,
        *,
        width: int,
        height: int,
        fov_x_deg: float = 40.0,
        target: np.ndarray = (0.0, 0.0, 0.0),
        near: float = 0.1,
        far: float = 1000.0,
    ) -> "Camera":
        """A camera orbiting `target`: azimuth from +X towards +Y, elevation above the XY plane, Z up."""
        az, el = math.radians(azimuth_deg), math.radians(elevation_deg)
        offset = distance * np.array([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])
        target = np.asarray(target, dtype=np.float64)
        return cls.look_at(target + offset, target, width=width, height=height, fov_x_deg=fov_x_deg, near=near, far=far)

    @classmethod
    def from_projection(cls, projection: np.ndarray, view_matrix: np.ndarray, width: int, height: int) -> "Camera":
        """The camera a 3D viewport (or `calc_matrix_camera`) draws with, from its OpenGL-style matrices.

        `projection` is Blender's `region_3d.window_matrix` (or `camera.calc_matrix_camera(...)`) for a `width` x
        `height` image, `view_matrix` maps world to Blender view axes (`region_3d.view_matrix`); a scaled view matrix
        is normalised, as Blender ignores a camera's scale. Blender's orthographic *viewport* puts its near plane
        behind the view point (negative clip start): the camera then moves back along its axis until near is 0,
        which frames exactly the same pixels (only depth is measured from further back).
        """
        p = np.array(projection, dtype=np.float64)
        view = np.array(view_matrix, dtype=np.float64)
        if p.shape != (4, 4) or view.shape != (4, 4) or not (np.isfinite(p).all() and np.isfinite(view).all()):
            raise CameraError("projection and view matrices must be finite 4x4 matrices")
        if width < 1 or height < 1:
            raise CameraError(f"viewport size must be positive, got {width}x{height}")
        orthographic = p[3, 3] == 1.0
        fx, fy = p[0, 0] * width / 2, p[1, 1] * height / 2
        if orthographic:
            cx, cy = (1 + p[0, 3]) * width / 2, (1 - p[1, 3]) * height / 2
            near, far = (p[2, 3] + 1) / p[2, 2], (p[2, 3] - 1) / p[2, 2]
        else:
            cx, cy = (1 - p[0, 2]) * width / 2, (1 + p[1, 2]) * height / 2
            near = p[2, 3] / (p[2, 2] - 1)
            # float32 matrices of huge clip ranges round P22 to -1: the far plane is then practically unbounded
            far = p[2, 3] / (p[2, 2] + 1) if p[2, 2] < -1 else UNBOUNDED_FAR
        rows = np.linalg.norm(view[:3, :3], axis=1)
        if np.any(rows < 1e-12):
            raise CameraError("the view matrix is not invertible")
        view[:3] /= rows[:, None]  # inverse of (rotation * scale) has the scale on its rows, translation included
        w2c = BLENDER_TO_OPENCV @ view
        if orthographic and near < 0:
            w2c[2, 3] -= near
            near, far = 0.0, far - near
        return cls(width, height, fx, fy, cx, cy, w2c, near, far, orthographic)

    def scaled(self, factor: float) -> "Camera":
        """The same view at `factor` times the resolution (at least 1x1): a cheaper preview of the same framing.

        Each axis is scaled by the ratio of the rounded sizes, so the image covers exactly the same field of view.
        """
        if not (math.isfinite(factor) and factor > 0):
            raise CameraError(f"a camera can only be scaled by a positive factor, got {factor}")
        width, height = max(1, round(self.width * factor)), max(1, round(self.height * factor))
        sx, sy = width / self.width, height / self.height
        return Camera(width, height, self.fx * sx, self.fy * sy, self.cx * sx, self.cy * sy, self.world_to_camera,
                      self.near, self.far, self.orthographic)

    # ----------------------------------------------------------------------------------------------------------------
    # derived quantities

    @property
    def K(self) -> np.ndarray:
        """The 3x3 intrinsic matrix."""
        return np.array([[self.fx, 0.0, self.cx], [0.0, self.fy, self.cy], [0.0, 0.0, 1.0]])

    @property
    def camera_to_world(self) -> np.ndarray:
        return np.linalg.inv(self.world_to_camera)

    @property
    def position(self) -> np.ndarray:
        """The camera centre in world coordinates (for an orthographic camera: the centre of its image plane)."""
        return self.camera_to_world[:3, 3].copy()

    def project(self, points_world: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """World points [N,3] -> (pixel coordinates [N,2] with centres at +0.5, depth along the view axis [N])."""
        p = np.asarray(points_world, dtype=np.float64).reshape(-1, 3)
        pc = p @ self.world_to_camera[:3, :3].T + self.world_to_camera[:3, 3]
        z = pc[:, 2]
        if self.orthographic:
            x, y = pc[:, 0], pc[:, 1]
        else:
            with np.errstate(divide="ignore", invalid="ignore"):
                x, y = pc[:, 0] / z, pc[:, 1] / z
        return np.stack([self.fx * x + self.cx, self.fy * y + self.cy], axis=-1), z

    def pixel_rays(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-pixel ray origins and unit directions in world space, both [H,W,3], through pixel centres."""
        u = (np.arange(self.width) + 0.5 - self.cx) / self.fx
        v = (np.arange(self.height) + 0.5 - self.cy) / self.fy
        uu, vv = np.meshgrid(u, v)
        rot = self.camera_to_world[:3, :3]
        if self.orthographic:
            local_origins = np.stack([uu, vv, np.zeros_like(uu)], axis=-1)
            origins = local_origins @ rot.T + self.position
            directions = np.broadcast_to(rot[:, 2], origins.shape).copy()
        else:
            d = np.stack([uu, vv, np.ones_like(uu)], axis=-1) @ rot.T
            directions = d / np.linalg.norm(d, axis=-1, keepdims=True)
            origins = np.broadcast_to(self.position, directions.shape).copy()
        return origins, directions

    def with_world_to_camera(self, world_to_camera: np.ndarray) -> "Camera":
        """The same lens and image with another pose."""
        return Camera(self.width, self.height, self.fx, self.fy, self.cx, self.cy, world_to_camera, self.near,
                      self.far, self.orthographic)


def _normalized_rigid(matrix_world: np.ndarray | None) -> np.ndarray:
    """Blender ignores a camera object's scale: keep its rotation and translation only."""
    m = np.eye(4) if matrix_world is None else np.array(matrix_world, dtype=np.float64)
    if m.shape != (4, 4) or not np.isfinite(m).all():
        raise CameraError(f"camera matrix_world must be a finite 4x4 matrix, got shape {m.shape}")
    norms = np.linalg.norm(m[:3, :3], axis=0)
    if np.any(norms < 1e-12):
        raise CameraError("camera matrix_world has a zero-scaled axis")
    m[:3, :3] = m[:3, :3] / norms
    return m
