"""Closed-form checks of `near_engine.camera` (no Blender needed).

The comparison with what Blender and Cycles actually do lives in `test_camera_cycles.py`; this file pins the
conventions the rest of the engine relies on: OpenCV axes, pixel centres at +0.5, Blender's sensor-fit formulas,
look_at / orbit geometry, pixel rays consistent with `project`, and clear errors for impossible cameras.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from near_engine.camera import BLENDER_TO_OPENCV, Camera
from near_engine.errors import CameraError, NearError


def _rotation(rx: float, ry: float, rz: float) -> np.ndarray:
    """Blender's default 'XYZ' Euler rotation (radians) as a 3x3 matrix: Rz @ Ry @ Rx."""
    cx, sx, cy, sy, cz, sz = math.cos(rx), math.sin(rx), math.cos(ry), math.sin(ry), math.cos(rz), math.sin(rz)
    rot_x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    rot_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rot_z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rot_z @ rot_y @ rot_x


def _matrix_world(location=(0.0, 0.0, 0.0), rotation=(0.0, 0.0, 0.0), scale=(1.0, 1.0, 1.0)) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = _rotation(*rotation) @ np.diag(scale)
    m[:3, 3] = location
    return m


# A camera at (1, -6, 2) looking roughly along +Y, tilted and rolled a little.
POSE = _matrix_world((1.0, -6.0, 2.0), (math.radians(80), math.radians(5), math.radians(-20)))


def _camera_point_to_world(matrix_world: np.ndarray, points_blender_camera: np.ndarray) -> np.ndarray:
    """Points given in the Blender camera's own axes (x right, y up, -z forward) -> world."""
    p = np.asarray(points_blender_camera, dtype=np.float64).reshape(-1, 3)
    rigid = matrix_world[:3, :3] / np.linalg.norm(matrix_world[:3, :3], axis=0)
    return p @ rigid.T + matrix_world[:3, 3]


# ---------------------------------------------------------------------------------------------------------------------
# intrinsics from Blender parameters, closed form


def test_default_blender_camera_intrinsics():
    cam = Camera.from_blender()  # 50 mm lens on a 36 mm sensor, 1920x1080, horizontal fit
    assert (cam.width, cam.height) == (1920, 1080)
    assert cam.fx == pytest.approx(50.0 * 1920 / 36.0)
    assert cam.fy == pytest.approx(cam.fx)
    assert (cam.cx, cam.cy) == (pytest.approx(960.0), pytest.approx(540.0))
    assert not cam.orthographic
    np.testing.assert_allclose(cam.K, [[cam.fx, 0, 960.0], [0, cam.fy, 540.0], [0, 0, 1]])


def test_sensor_fit_closed_form():
    # AUTO on a portrait image fits the sensor *width* to the image height (Blender's rule).
    portrait = Camera.from_blender(lens=40, sensor_width=36, sensor_height=20, resolution_x=600, resolution_y=900)
    assert portrait.fx == pytest.approx(40 * 900 / 36)
    # HORIZONTAL always spans the sensor width across the image width.
    horizontal = Camera.from_blender(lens=40, sensor_width=36, sensor_height=20, sensor_fit="HORIZONTAL",
                                     resolution_x=600, resolution_y=900)
    assert horizontal.fx == pytest.approx(40 * 600 / 36)
    # VERTICAL spans the sensor height across the image height, whatever the image's shape.
    vertical = Camera.from_blender(lens=40, sensor_width=36, sensor_height=20, sensor_fit="VERTICAL",
                                   resolution_x=800, resolution_y=600)
    assert vertical.fx == pytest.approx(40 * 600 / 20)
    for cam in (portrait, horizontal, vertical):
        assert cam.fy == pytest.approx(cam.fx)
        assert (cam.cx, cam.cy) == (pytest.approx(cam.width / 2), pytest.approx(cam.height / 2))


def test_lens_shift_is_in_units_of_the_fitted_image_side():
    # Shift moves the view plane: +x shows more of the right (the scene moves left), +y more of the top.
    cam = Camera.from_blender(resolution_x=800, resolution_y=600, shift_x=0.25, shift_y=0.1)
    assert cam.cx == pytest.approx(400 - 0.25 * 800)
    assert cam.cy == pytest.approx(300 + 0.1 * 800)  # the longer side (800 px) is the unit for both axes
    portrait = Camera.from_blender(resolution_x=600, resolution_y=800, shift_x=0.25, shift_y=0.1)
    assert portrait.cx == pytest.approx(300 - 0.25 * 800)
    assert portrait.cy == pytest.approx(400 + 0.1 * 800)


def test_pixel_aspect_makes_pixels_taller():
    square = Camera.from_blender(resolution_x=800, resolution_y=600, sensor_fit="HORIZONTAL")
    tall = Camera.from_blender(resolution_x=800, resolution_y=600, sensor_fit="HORIZONTAL",
                               pixel_aspect_x=1.0, pixel_aspect_y=2.0)
    assert tall.fx == pytest.approx(square.fx)
    assert tall.fy == pytest.approx(square.fx / 2.0)  # a pixel spans twice the height: half the pixels per radian
    # AUTO compares the *displayed* sizes: 800 x (600 * 2) is taller than wide, so AUTO fits vertically.
    auto = Camera.from_blender(resolution_x=800, resolution_y=600, pixel_aspect_x=1.0, pixel_aspect_y=2.0)
    assert auto.fx == pytest.approx(50 * 1200 / 36)
    assert auto.fy == pytest.approx(50 * 600 / 36)
    # Shift is measured along the fitted side in displayed units; a vertical shift covers fewer (taller) rows.
    shifted = Camera.from_blender(resolution_x=800, resolution_y=600, sensor_fit="HORIZONTAL", shift_x=0.1,
                                  shift_y=0.2, pixel_aspect_x=1.0, pixel_aspect_y=2.0)
    assert shifted.cx == pytest.approx(400 - 0.1 * 800)
    assert shifted.cy == pytest.approx(300 + 0.2 * 800 / 2.0)


def test_resolution_percentage_scales_pixels_not_the_view():
    full = Camera.from_blender(resolution_x=1000, resolution_y=500, shift_x=0.1, shift_y=-0.2)
    half = Camera.from_blender(resolution_x=1000, resolution_y=500, shift_x=0.1, shift_y=-0.2,
                               resolution_percentage=50)
    assert (half.width, half.height) == (500, 250)
    for a, b in ((half.fx, full.fx), (half.fy, full.fy), (half.cx, full.cx), (half.cy, full.cy)):
        assert a == pytest.approx(b / 2)
    # Blender truncates: 333 px at 50 % is 166 px.
    assert Camera.from_blender(resolution_x=333, resolution_y=101, resolution_percentage=50).width == 166


def test_orthographic_intrinsics():
    cam = Camera.from_blender(type="ORTHO", ortho_scale=4.0, resolution_x=800, resolution_y=600, shift_x=0.1)
    assert cam.orthographic
    assert cam.fx == pytest.approx(800 / 4.0)  # ortho_scale metres across the fitted (longer) side
    assert cam.fy == pytest.approx(cam.fx)
    assert cam.cx == pytest.approx(400 - 0.1 * 800)
    portrait = Camera.from_blender(type="ORTHO", ortho_scale=4.0, resolution_x=600, resolution_y=800)
    assert portrait.fy == pytest.approx(800 / 4.0)


# ---------------------------------------------------------------------------------------------------------------------
# axes and projection


def test_blender_camera_looks_down_minus_z_with_y_up():
    cam = Camera.from_blender(np.eye(4), resolution_x=640, resolution_y=480)
    np.testing.assert_allclose(cam.world_to_camera, BLENDER_TO_OPENCV)
    pix, depth = cam.project(np.array([[0.0, 0.0, -5.0], [1.0, 0.0, -5.0], [0.0, 1.0, -5.0], [0.0, 0.0, 5.0]]))
    np.testing.assert_allclose(pix[0], [320.0, 240.0])
    np.testing.assert_allclose(depth[:3], 5.0)
    assert pix[1, 0] > 320.0 and pix[1, 1] == pytest.approx(240.0)  # Blender +X is image right
    assert pix[2, 1] < 240.0 and pix[2, 0] == pytest.approx(320.0)  # Blender +Y is image up (rows go down)
    assert depth[3] == pytest.approx(-5.0)  # behind the camera: negative depth


@pytest.mark.parametrize("kind", ["PERSP", "ORTHO"])
def test_point_on_optical_axis_lands_on_principal_point(kind):
    cam = Camera.from_blender(POSE, type=kind, resolution_x=320, resolution_y=200, shift_x=0.12, shift_y=-0.07,
                              pixel_aspect_x=1.0, pixel_aspect_y=1.4, sensor_fit="VERTICAL")
    points = _camera_point_to_world(POSE, [[0.0, 0.0, -d] for d in (0.5, 3.0, 40.0)])
    pix, depth = cam.project(points)
    np.testing.assert_allclose(pix, np.tile([cam.cx, cam.cy], (3, 1)), atol=1e-9)
    np.testing.assert_allclose(depth, [0.5, 3.0, 40.0])
    np.testing.assert_allclose(cam.position, POSE[:3, 3])


def test_projection_matches_field_of_view():
    lens, sensor = 35.0, 36.0
    cam = Camera.from_blender(POSE, lens=lens, sensor_width=sensor, resolution_x=400, resolution_y=300)
    half_fov = math.atan(sensor / 2 / lens)
    d = 7.0
    points = _camera_point_to_world(POSE, [[d * math.tan(half_fov), 0, -d], [-d * math.tan(half_fov), 0, -d]])
    pix, _ = cam.project(points)
    np.testing.assert_allclose(pix[:, 0], [400.0, 0.0], atol=1e-9)  # the frame's right and left edges


def test_camera_scale_is_ignored():
    scaled = _matrix_world((1.0, -6.0, 2.0), (math.radians(80), math.radians(5), math.radians(-20)), (2.0, 0.3, 5.0))
    a = Camera.from_blender(POSE)
    b = Camera.from_blender(scaled)
    np.testing.assert_allclose(b.world_to_camera, a.world_to_camera, atol=1e-12)
    rot = b.world_to_camera[:3, :3]
    np.testing.assert_allclose(rot @ rot.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(rot) == pytest.approx(1.0)


def test_orthographic_projection_is_independent_of_depth():
    cam = Camera.from_blender(POSE, type="ORTHO", ortho_scale=3.0, resolution_x=300, resolution_y=200)
    local = np.array([[0.4, -0.3, -d] for d in (0.2, 1.0, 5.0, 50.0)])
    pix, depth = cam.project(_camera_point_to_world(POSE, local))
    np.testing.assert_allclose(pix, np.tile(pix[0], (4, 1)), atol=1e-9)
    np.testing.assert_allclose(pix[0], [150 + 0.4 * 100, 100 + 0.3 * 100])  # 100 px per metre, y flipped
    np.testing.assert_allclose(depth, [0.2, 1.0, 5.0, 50.0])
    persp = Camera.from_blender(POSE, resolution_x=300, resolution_y=200)
    ppix, _ = persp.project(_camera_point_to_world(POSE, local))
    assert np.ptp(ppix[:, 0]) > 10  # a perspective camera does depend on depth, so the check above means something


# ---------------------------------------------------------------------------------------------------------------------
# look_at and orbit


def test_look_at_puts_target_at_centre_and_keeps_up_up():
    eye, target = np.array([3.0, -4.0, 2.0]), np.array([0.5, 0.5, 0.2])
    cam = Camera.look_at(eye, target, width=200, height=100, fov_x_deg=50)
    pix, depth = cam.project(target[None])
    np.testing.assert_allclose(pix[0], [100.0, 50.0], atol=1e-9)
    assert depth[0] == pytest.approx(np.linalg.norm(target - eye))
    np.testing.assert_allclose(cam.position, eye, atol=1e-12)
    rot = cam.world_to_camera[:3, :3]
    np.testing.assert_allclose(rot @ rot.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(rot) == pytest.approx(1.0)
    above, _ = cam.project((target + [0, 0, 0.3])[None])
    assert above[0, 1] < 50.0  # world +Z is up in the image (rows grow downwards)
    assert above[0, 0] == pytest.approx(100.0)  # no roll: vertical stays vertical
    # The horizontal field of view: a point at half the fov to the side lands on the image edge.
    f = 100 / math.tan(math.radians(25))
    assert cam.fx == pytest.approx(f) and cam.fy == pytest.approx(f)


@pytest.mark.parametrize("azimuth, elevation", [(0, 0), (90, 0), (30, 20), (-135, 45), (200, -30), (10, 89.9)])
def test_orbit_geometry(azimuth, elevation):
    target = np.array([0.2, -0.1, 0.4])
    distance = 3.5
    cam = Camera.orbit(azimuth, elevation, distance, width=128, height=96, fov_x_deg=40, target=target)
    az = math.radians(azimuth)
    offset = cam.position - target
    assert np.linalg.norm(offset) == pytest.approx(distance)
    assert math.degrees(math.asin(offset[2] / distance)) == pytest.approx(elevation)
    if abs(elevation) < 89:
        assert math.atan2(offset[1], offset[0]) == pytest.approx(math.atan2(math.sin(az), math.cos(az)))
    pix, depth = cam.project(target[None])
    np.testing.assert_allclose(pix[0], [64.0, 48.0], atol=1e-9)
    assert depth[0] == pytest.approx(distance)
    if abs(elevation) < 89:
        above, _ = cam.project((target + [0, 0, 0.2])[None])
        assert above[0, 1] < 48.0  # Z up stays up in the image
        # Facing the target (forward = -offset), right = forward x up: the horizontal direction at azimuth + 90.
        side = np.array([math.cos(az + math.pi / 2), math.sin(az + math.pi / 2), 0.0])
        right, _ = cam.project((target + 0.2 * side)[None])
        assert right[0, 0] > 64.0 and right[0, 1] == pytest.approx(48.0)


def test_orbit_azimuth_zero_sees_plus_y_on_the_right():
    cam = Camera.orbit(0, 0, 5, width=100, height=100)
    assert cam.position == pytest.approx([5.0, 0.0, 0.0])
    pix, _ = cam.project(np.array([[0.0, 0.5, 0.0], [0.0, 0.0, 0.5]]))
    assert pix[0, 0] > 50 and pix[0, 1] == pytest.approx(50)
    assert pix[1, 1] < 50 and pix[1, 0] == pytest.approx(50)


def test_look_at_straight_down_is_a_valid_camera():
    cam = Camera.look_at([0.0, 0.0, 5.0], [0.0, 0.0, 0.0], width=64, height=64, fov_x_deg=30)
    pix, depth = cam.project(np.zeros((1, 3)))
    np.testing.assert_allclose(pix[0], [32.0, 32.0], atol=1e-9)
    assert depth[0] == pytest.approx(5.0)
    rot = cam.world_to_camera[:3, :3]
    assert np.linalg.det(rot) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------------------------------
# pixel rays


@pytest.mark.parametrize("kind", ["PERSP", "ORTHO"])
def test_pixel_rays_pass_through_pixel_centres(kind):
    cam = Camera.from_blender(POSE, type=kind, resolution_x=40, resolution_y=30, shift_x=0.1, shift_y=0.05,
                              pixel_aspect_x=1.3, ortho_scale=2.5)
    origins, directions = cam.pixel_rays()
    assert origins.shape == directions.shape == (30, 40, 3)
    np.testing.assert_allclose(np.linalg.norm(directions, axis=-1), 1.0, atol=1e-12)
    jj, ii = np.meshgrid(np.arange(30), np.arange(40), indexing="ij")
    centres = np.stack([ii + 0.5, jj + 0.5], axis=-1).reshape(-1, 2)
    for t in (0.7, 4.0, 25.0):
        pix, depth = cam.project((origins + t * directions).reshape(-1, 3))
        np.testing.assert_allclose(pix, centres, atol=1e-8)
        assert np.all(depth > 0)
    axis = cam.camera_to_world[:3, 2]  # the view direction in world space
    if kind == "ORTHO":
        np.testing.assert_allclose(directions, np.broadcast_to(axis, directions.shape), atol=1e-12)
        # origins lie in the image plane through the camera position
        np.testing.assert_allclose((origins - cam.position) @ axis, 0.0, atol=1e-12)
    else:
        np.testing.assert_allclose(origins, np.broadcast_to(cam.position, origins.shape), atol=1e-12)
        assert np.all(directions @ axis > 0)


def test_with_world_to_camera_keeps_the_lens():
    cam = Camera.from_blender(POSE, resolution_x=64, resolution_y=48, shift_x=0.2)
    moved = cam.with_world_to_camera(np.eye(4))
    assert (moved.fx, moved.fy, moved.cx, moved.cy, moved.width, moved.height) == (
        cam.fx, cam.fy, cam.cx, cam.cy, cam.width, cam.height)
    np.testing.assert_allclose(moved.world_to_camera, np.eye(4))
    np.testing.assert_allclose(cam.camera_to_world @ cam.world_to_camera, np.eye(4), atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(resolution_x=0), "resolution"),
        (dict(resolution_y=-5), "resolution"),
        (dict(resolution_x=1, resolution_percentage=50), "resolution"),
        (dict(resolution_percentage=0), "resolution"),
        (dict(lens=-50.0), "lens"),
        (dict(lens=0.0), "lens"),
        (dict(lens=float("nan")), "focal"),
        (dict(sensor_width=0.0), "sensor"),
        (dict(pixel_aspect_y=0.0), "pixel aspect"),
        (dict(type="ORTHO", ortho_scale=-1.0), "orthographic scale"),
        (dict(matrix_world=np.full((4, 4), np.nan)), "matrix_world"),
        (dict(matrix_world=np.diag([1.0, 1.0, np.inf, 1.0])), "matrix_world"),
        (dict(matrix_world=np.eye(3)), "matrix_world"),
        (dict(matrix_world=np.diag([1.0, 0.0, 1.0, 1.0])), "zero-scaled"),
        (dict(sensor_fit="FIT"), "sensor_fit"),
        (dict(sensor_fit="horizontal"), "sensor_fit"),
        (dict(type="PANO"), "PANO"),
        (dict(clip_start=10.0, clip_end=10.0), "near < far"),
        (dict(clip_start=100.0, clip_end=1.0), "near < far"),
        (dict(clip_start=-1.0), "near < far"),
        (dict(shift_x=float("inf")), "finite"),
    ],
)
def test_from_blender_rejects_invalid_parameters(kwargs, message):
    with pytest.raises(CameraError, match=message):
        Camera.from_blender(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(width=0), "resolution"),
        (dict(height=2.5), "resolution"),
        (dict(fx=0.0), "focal"),
        (dict(fy=-1.0), "focal"),
        (dict(cx=float("nan")), "finite"),
        (dict(world_to_camera=np.zeros((3, 4))), "4x4"),
        (dict(world_to_camera=np.full((4, 4), np.nan)), "finite"),
        (dict(near=1.0, far=0.5), "near < far"),
        (dict(world_to_camera=np.diag([2.0, 2.0, 2.0, 1.0])), "rigid"),
        (dict(world_to_camera=np.diag([1.0, -1.0, 1.0, 1.0])), "rigid"),
        (dict(world_to_camera=np.array([[1, 0.3, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])), "rigid"),
        (dict(world_to_camera=np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0.1, 1.0]])), "rigid"),
    ],
)
def test_camera_constructor_rejects_invalid_parameters(kwargs, message):
    args = dict(width=64, height=48, fx=50.0, fy=50.0, cx=32.0, cy=24.0)
    args.update(kwargs)
    with pytest.raises(CameraError, match=message):
        Camera(**args)


def test_look_at_rejects_degenerate_input():
    with pytest.raises(CameraError, match="eye != target"):
        Camera.look_at([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], width=10, height=10, fov_x_deg=40)
    for fov in (0.0, 180.0, -10.0):
        with pytest.raises(CameraError, match="field of view"):
            Camera.look_at([0.0, -5.0, 0.0], [0.0, 0.0, 0.0], width=10, height=10, fov_x_deg=fov)


def test_whole_float_resolution_becomes_int():
    cam = Camera(32.0, 24.0, 30.0, 30.0, 16.0, 12.0)
    assert (cam.width, cam.height) == (32, 24) and isinstance(cam.width, int)


def test_camera_error_is_a_near_error():
    assert issubclass(CameraError, NearError)
    with pytest.raises(NearError):  # callers (CLI, add-on) catch the project's base class
        Camera.from_blender(resolution_x=0)
