"""`Camera.from_projection` (the viewport's camera) against `Camera.from_blender`, and `Camera.scaled` (its preview).

The viewport knows only OpenGL-style matrices (`region_3d.window_matrix`, `view_matrix`); the final render knows the
camera's parameters. Both must give the same engine camera, so the viewport frames what F12 renders. Blender's own
`calc_matrix_camera` provides the projection for random cameras; `test_camera_cycles.py` ties `from_blender` to Cycles.
"""

from __future__ import annotations

import math

import bpy
import numpy as np
import pytest
from mathutils import Euler, Matrix

from near_engine.camera import UNBOUNDED_FAR, Camera
from near_engine.errors import CameraError


def _engine_camera(cam_obj, scene) -> Camera:
    data, render = cam_obj.data, scene.render
    return Camera.from_blender(
        np.array(cam_obj.matrix_world), type=data.type, lens=data.lens, sensor_width=data.sensor_width,
        sensor_height=data.sensor_height, sensor_fit=data.sensor_fit, shift_x=data.shift_x, shift_y=data.shift_y,
        ortho_scale=data.ortho_scale, clip_start=data.clip_start, clip_end=data.clip_end,
        resolution_x=render.resolution_x, resolution_y=render.resolution_y,
        resolution_percentage=render.resolution_percentage, pixel_aspect_x=render.pixel_aspect_x,
        pixel_aspect_y=render.pixel_aspect_y)


@pytest.mark.timeout(120)
def test_from_projection_matches_from_blender_for_random_cameras():
    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    data = bpy.data.cameras.new("cam")
    cam_obj = bpy.data.objects.new("cam", data)
    scene.collection.objects.link(cam_obj)
    render = scene.render
    depsgraph = bpy.context.evaluated_depsgraph_get()
    rng = np.random.default_rng(42)
    kinds = set()
    for trial in range(200):
        data.type = "ORTHO" if trial % 3 == 2 else "PERSP"
        data.lens = float(rng.uniform(8.0, 300.0))
        data.sensor_width, data.sensor_height = (float(v) for v in rng.uniform(5.0, 60.0, 2))
        data.sensor_fit = ("AUTO", "HORIZONTAL", "VERTICAL")[(trial // 3) % 3]
        data.shift_x, data.shift_y = (float(v) for v in rng.uniform(-0.8, 0.8, 2))
        data.ortho_scale = float(rng.uniform(0.2, 30.0))
        data.clip_start = float(rng.uniform(0.01, 1.0))
        data.clip_end = float(rng.uniform(10.0, 1000.0))
        render.resolution_x, render.resolution_y = (int(v) for v in rng.integers(16, 3000, 2))
        render.resolution_percentage = 100
        # pixel aspect 1 most of the time; sometimes not, which from_projection handles too (fy != fx)
        aspect = (1.0, 1.0) if trial % 4 else tuple(float(v) for v in rng.uniform(1.0, 2.5, 2))
        render.pixel_aspect_x, render.pixel_aspect_y = aspect
        euler = Euler([float(v) for v in rng.uniform(-math.pi, math.pi, 3)])
        scale = [float(v) for v in rng.uniform(0.2, 4.0, 3)] if trial % 2 else [1.0, 1.0, 1.0]
        cam_obj.matrix_world = Matrix.LocRotScale([float(v) for v in rng.uniform(-20, 20, 3)], euler, scale)
        bpy.context.view_layer.update()
        kinds.add((data.type, data.sensor_fit))

        expected = _engine_camera(cam_obj, scene)
        width, height = expected.width, expected.height
        projection = np.array(cam_obj.calc_matrix_camera(depsgraph, x=width, y=height, scale_x=aspect[0],
                                                         scale_y=aspect[1]))
        got = Camera.from_projection(projection, np.array(cam_obj.matrix_world.inverted()), width, height)

        label = f"trial {trial}: {data.type} {data.sensor_fit} {width}x{height}"
        assert got.orthographic == expected.orthographic, label
        assert (got.width, got.height) == (width, height), label
        size = max(width, height)  # Blender's matrices are float32: compare relative to the image size
        np.testing.assert_allclose(got.K, expected.K, rtol=1e-5, atol=2e-5 * size, err_msg=label)
        np.testing.assert_allclose(got.world_to_camera, expected.world_to_camera, atol=2e-5 * (1 + np.abs(
            expected.world_to_camera[:3, 3]).max()), err_msg=label)
        # float32 rounding: an orthographic near plane comes from P23 + 1 (about eps32 * far of absolute error),
        # a perspective far plane from P22 + 1 (about eps32 * far / near relative)
        assert got.near == pytest.approx(expected.near, rel=1e-5, abs=2e-7 * expected.far), label
        far_rtol = 1e-6 + 1e-6 * expected.far / expected.near
        assert got.far == pytest.approx(expected.far, rel=far_rtol), label
    assert len(kinds) == 6  # every type with every sensor fit was exercised


def _projection_persp(fx: float, fy: float, cx: float, cy: float, w: int, h: int, n: float, f: float) -> np.ndarray:
    """OpenGL perspective matrix for OpenCV-style intrinsics (the inverse of the formulas under test)."""
    return np.array([[2 * fx / w, 0, 1 - 2 * cx / w, 0], [0, 2 * fy / h, 2 * cy / h - 1, 0],
                     [0, 0, -(f + n) / (f - n), -2 * f * n / (f - n)], [0, 0, -1, 0]])


def test_orthographic_viewport_with_negative_near_moves_the_camera_back():
    """Blender's ortho viewport clips from -clip_end/2: same pixels, camera moved back so that near is 0."""
    w, h, n, f = 200, 100, -50.0, 50.0
    projection = np.array([[2 * 40 / w, 0, 0, 0.1], [0, 2 * 40 / h, 0, -0.2],
                           [0, 0, -2 / (f - n), -(f + n) / (f - n)], [0, 0, 0, 1]])
    view = np.eye(4)
    view[:3, 3] = [0.5, -1.0, -3.0]
    cam = Camera.from_projection(projection, view, w, h)
    assert cam.orthographic
    assert (cam.near, cam.far) == (pytest.approx(0.0), pytest.approx(100.0))
    assert cam.fx == pytest.approx(40.0) and cam.fy == pytest.approx(40.0)
    assert (cam.cx, cam.cy) == (pytest.approx(110.0), pytest.approx(60.0))
    # Pixels match the clip-space mapping; depth now counts from 50 m further back.
    points = np.array([[0.3, 0.2, -2.0], [-1.0, 0.7, 30.0], [2.0, -1.0, -40.0]])
    clip = np.c_[points, np.ones(3)] @ (projection @ view).T
    expected = np.stack([(clip[:, 0] + 1) * w / 2, (1 - clip[:, 1]) * h / 2], axis=-1)
    pixels, depth = cam.project(points)
    np.testing.assert_allclose(pixels, expected, atol=1e-9)
    np.testing.assert_allclose(depth, -(points[:, 2] - 3.0) + 50.0)


def test_huge_clip_range_gives_an_unbounded_far_plane():
    projection = _projection_persp(500, 500, 320, 240, 640, 480, 0.01, 1e6).astype(np.float32)
    projection[2, 2] = -1.0  # what float32 makes of -(f + n) / (f - n) for such a range
    cam = Camera.from_projection(projection, np.eye(4), 640, 480)
    assert cam.far == UNBOUNDED_FAR
    assert cam.near == pytest.approx(0.02 / 2, rel=1e-3)


@pytest.mark.parametrize("projection, view, size", [
    (np.full((4, 4), np.nan), np.eye(4), (64, 48)),
    (_projection_persp(50, 50, 32, 24, 64, 48, 0.1, 100), np.diag([1.0, 0.0, 1.0, 1.0]), (64, 48)),
    (_projection_persp(50, 50, 32, 24, 64, 48, 0.1, 100), np.eye(3), (64, 48)),
    (_projection_persp(50, 50, 32, 24, 64, 48, 0.1, 100), np.eye(4), (0, 48)),
])
def test_from_projection_refuses_what_is_no_camera(projection, view, size):
    with pytest.raises(CameraError):
        Camera.from_projection(projection, view, *size)


@pytest.mark.parametrize("factor", [0.35, 0.5, 0.123, 1.0, 2.0, 1e-4])
@pytest.mark.parametrize("orthographic", [False, True])
def test_scaled_projects_points_where_the_original_does_times_the_factor(factor, orthographic):
    rng = np.random.default_rng(7)
    w2c = Camera.orbit(30, 20, 5.0, width=8, height=8).world_to_camera
    cam = Camera(1279, 721, 900.0, 870.0, 610.3, 380.9, w2c, 0.2, 80.0, orthographic)
    small = cam.scaled(factor)
    assert (small.width, small.height) == (max(1, round(1279 * factor)), max(1, round(721 * factor)))
    assert small.orthographic == orthographic and (small.near, small.far) == (cam.near, cam.far)
    np.testing.assert_array_equal(small.world_to_camera, cam.world_to_camera)
    points = rng.normal(size=(50, 3))
    big_px, big_depth = cam.project(points)
    small_px, small_depth = small.project(points)
    ratio = np.array([small.width / cam.width, small.height / cam.height])
    np.testing.assert_allclose(small_px, big_px * ratio, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(small_depth, big_depth)
    if min(small.width, small.height) > 1:  # the per-axis ratio is the factor up to rounding to whole pixels
        np.testing.assert_allclose(ratio, factor, rtol=0.5 / (factor * 721) + 1e-12)


@pytest.mark.parametrize("factor", [0.0, -1.0, math.inf, math.nan])
def test_scaled_refuses_bad_factors(factor):
    with pytest.raises(CameraError):
        Camera.orbit(0, 0, 3.0, width=64, height=64).scaled(factor)
