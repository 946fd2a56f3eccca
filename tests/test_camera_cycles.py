"""`near_engine.camera` against Blender itself: Cycles renders and Blender's own projection matrix.

The render tests put small emissive spheres ("markers") at known world positions, render them with real Cycles
through the bpy module, find each marker's centroid in the float image and check that `Camera.from_blender(...)`
projects the marker there to within half a pixel. The engine camera is built from the bpy camera object exactly as
the add-on does (`_engine_camera`), so this file also documents that mapping.

Row order: Blender keeps render buffers bottom row first, but an OpenEXR file stores its top row first, and Blender
writes EXR files the right way up. Every render test checks this on its own: each marker is placed at a known
fraction of Blender's own camera frame (`Camera.view_frame`, computed by Blender, not by the engine) and must show
up there in the image as read, with row 0 at the top.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import bpy  # before bmesh and mathutils: importing bpy is what makes Blender's own modules importable
import numpy as np
import OpenEXR
import pytest

import bmesh  # noqa: E402, I001
from mathutils import Euler, Matrix, Vector  # noqa: E402

from near_engine.camera import Camera

TOLERANCE_PX = 0.5
SAMPLES = 64
MARKER_DIAMETER_PX = 3.5  # the blob's smaller diameter in pixels

# Where markers go, as fractions of Blender's camera frame: (from the left, from the top). Corners, edge middles,
# the centre and four points in between; all at least 10 % of the frame from its border.
FRACTIONS = [(a, b) for b in (0.1, 0.5, 0.9) for a in (0.1, 0.5, 0.9)]
FRACTIONS += [(0.3, 0.3), (0.7, 0.28), (0.28, 0.72), (0.72, 0.7)]
DEPTHS = [5.0, 7.5, 9.0, 6.0, 11.0, 4.5, 8.0, 10.0, 5.5, 6.5, 9.5, 7.0, 12.0]  # metres in front of the camera

# One emission colour per marker, so every blob is identified without relying on the projection under test.
PALETTE = [c for c in ((r, g, b) for r in (0.0, 0.5, 1.0) for g in (0.0, 0.5, 1.0) for b in (0.0, 0.5, 1.0))
           if max(c) == 1.0]


@dataclass(frozen=True)
class Setup:
    """One Blender camera: data-block settings, render settings and the object's transform."""

    name: str
    resolution: tuple[int, int] = (80, 60)
    percentage: int = 100
    pixel_aspect: tuple[float, float] = (1.0, 1.0)
    type: str = "PERSP"
    lens: float = 35.0
    sensor: tuple[float, float] = (36.0, 24.0)
    sensor_fit: str = "AUTO"
    shift: tuple[float, float] = (0.0, 0.0)
    ortho_scale: float = 6.0
    location: tuple[float, float, float] = (0.5, -10.0, 1.2)
    rotation_deg: tuple[float, float, float] = (90.0, 0.0, 0.0)  # looking along +Y, Z up
    scale: tuple[float, float, float] = (1.0, 1.0, 1.0)


SETUPS = [
    Setup("landscape_auto"),
    Setup("portrait_auto", resolution=(60, 90), lens=40.0),
    # HORIZONTAL on a portrait image, VERTICAL on a landscape one, sensor heights unlike what AUTO would use.
    Setup("portrait_horizontal_fit", resolution=(60, 90), sensor=(36.0, 15.0), sensor_fit="HORIZONTAL", lens=30.0),
    Setup("landscape_vertical_fit", resolution=(80, 60), sensor=(36.0, 30.0), sensor_fit="VERTICAL", lens=45.0),
    Setup("landscape_shift", shift=(0.2, -0.12), lens=30.0),
    Setup("portrait_vertical_fit_shift", resolution=(60, 90), sensor=(30.0, 20.0), sensor_fit="VERTICAL",
          shift=(-0.15, 0.1), lens=28.0),
    # AUTO compares 80 x 1.0 with 60 x 1.7: the displayed image is taller than wide, so AUTO fits vertically.
    Setup("pixel_aspect_tall", pixel_aspect=(1.0, 1.7), shift=(0.05, 0.1)),
    Setup("pixel_aspect_wide", resolution=(60, 90), pixel_aspect=(1.7, 1.0), shift=(0.1, -0.05),
          sensor_fit="HORIZONTAL"),
    Setup("percentage_50", resolution=(160, 120), percentage=50, shift=(-0.1, 0.05)),
    Setup("orthographic", type="ORTHO", ortho_scale=5.0, shift=(0.1, -0.08), pixel_aspect=(1.0, 1.3)),
    Setup("rotated_translated_scaled", location=(1.3, -2.0, 0.7), rotation_deg=(70.0, 10.0, 35.0),
          scale=(2.0, 0.5, 1.5), shift=(0.05, 0.05), lens=32.0),
]


# ---------------------------------------------------------------------------------------------------------------------
# Blender side


def _engine_camera(cam_obj, scene) -> Camera:
    """The engine camera for a Blender camera object, read the way the add-on reads it."""
    data, render = cam_obj.data, scene.render
    return Camera.from_blender(
        np.array(cam_obj.matrix_world),  # a mathutils Matrix iterates rows: this is the usual row-major 4x4
        type=data.type,
        lens=data.lens,  # millimetres, whatever `lens_unit` shows in the UI
        sensor_width=data.sensor_width,
        sensor_height=data.sensor_height,
        sensor_fit=data.sensor_fit,
        shift_x=data.shift_x,
        shift_y=data.shift_y,
        ortho_scale=data.ortho_scale,
        clip_start=data.clip_start,
        clip_end=data.clip_end,
        resolution_x=render.resolution_x,
        resolution_y=render.resolution_y,
        resolution_percentage=render.resolution_percentage,
        pixel_aspect_x=render.pixel_aspect_x,
        pixel_aspect_y=render.pixel_aspect_y,
    )


def _empty_scene():
    bpy.ops.wm.read_factory_settings(use_empty=True)
    return bpy.context.scene


def _add_camera(scene, setup: Setup):
    data = bpy.data.cameras.new(setup.name)
    data.type = setup.type
    data.lens = setup.lens
    data.sensor_width, data.sensor_height = setup.sensor
    data.sensor_fit = setup.sensor_fit
    data.shift_x, data.shift_y = setup.shift
    data.ortho_scale = setup.ortho_scale
    data.clip_start, data.clip_end = 0.1, 100.0
    obj = bpy.data.objects.new(setup.name, data)
    scene.collection.objects.link(obj)
    scene.camera = obj
    obj.matrix_world = Matrix.LocRotScale(setup.location, Euler([math.radians(a) for a in setup.rotation_deg]),
                                          setup.scale)
    render = scene.render
    render.resolution_x, render.resolution_y = setup.resolution
    render.resolution_percentage = setup.percentage
    render.pixel_aspect_x, render.pixel_aspect_y = setup.pixel_aspect
    bpy.context.view_layer.update()
    return obj


def _setup_cycles(scene) -> None:
    scene.render.engine = "CYCLES"
    cycles = scene.cycles
    cycles.device = "CPU"
    cycles.samples = SAMPLES
    cycles.use_adaptive_sampling = False
    cycles.use_denoising = False
    cycles.pixel_filter_type = "BOX"  # a pixel's value is the plain average over its own square: no blur
    cycles.filter_width = 1.0
    cycles.max_bounces = 0  # emission seen directly; nothing else to compute
    cycles.seed = 0
    scene.render.threads_mode = "FIXED"
    scene.render.threads = 2
    scene.view_settings.view_transform = "Raw"
    scene.view_settings.look = "None"
    scene.view_settings.exposure = 0.0
    scene.view_settings.gamma = 1.0
    world = bpy.data.worlds.new("black")
    world.use_nodes = True
    background = world.node_tree.nodes["Background"]
    background.inputs["Color"].default_value = (0.0, 0.0, 0.0, 1.0)
    background.inputs["Strength"].default_value = 0.0
    scene.world = world
    settings = scene.render.image_settings
    settings.file_format = "OPEN_EXR"
    settings.color_depth = "32"
    settings.exr_codec = "ZIP"


def _emission_material(colour) -> "bpy.types.Material":
    mat = bpy.data.materials.new("marker")
    mat.use_nodes = True
    nodes = mat.node_tree.nodes
    nodes.clear()
    emission = nodes.new("ShaderNodeEmission")
    emission.inputs["Color"].default_value = (*colour, 1.0)
    emission.inputs["Strength"].default_value = 1.0
    output = nodes.new("ShaderNodeOutputMaterial")
    mat.node_tree.links.new(emission.outputs["Emission"], output.inputs["Surface"])
    return mat


def _frame(cam_obj, scene):
    """Blender's own camera frame in camera-local axes: (xmin, xmax, ymin, ymax, z) with z < 0."""
    corners = np.array([tuple(v) for v in cam_obj.data.view_frame(scene=scene)])
    return corners[:, 0].min(), corners[:, 0].max(), corners[:, 1].min(), corners[:, 1].max(), corners[0, 2]


def _add_markers(scene, cam_obj, width: int, height: int):
    """Emissive icospheres at FRACTIONS of Blender's camera frame; returns their local positions, radii, colours."""
    xmin, xmax, ymin, ymax, z_frame = _frame(cam_obj, scene)
    ortho = cam_obj.data.type == "ORTHO"
    mesh = bpy.data.meshes.new("marker")
    bm = bmesh.new()
    bmesh.ops.create_icosphere(bm, subdivisions=3, radius=1.0)
    bm.to_mesh(mesh)
    bm.free()
    rigid = cam_obj.matrix_world.normalized()  # Blender renders with the scale dropped
    markers = []
    for i, ((a, b), depth) in enumerate(zip(FRACTIONS, DEPTHS)):
        x, y = xmin + a * (xmax - xmin), ymax - b * (ymax - ymin)
        k = 1.0 if ortho else depth / -z_frame  # slide along the ray through the frame point
        local = np.array([x * k, y * k, -depth if ortho else z_frame * k])
        metres_per_pixel = max((xmax - xmin) * k / width, (ymax - ymin) * k / height)
        radius = 0.5 * MARKER_DIAMETER_PX * metres_per_pixel
        obj = bpy.data.objects.new(f"marker{i}", mesh.copy())
        obj.data.materials.append(_emission_material(PALETTE[i]))
        obj.location = rigid @ Vector(local.tolist())
        obj.scale = (radius, radius, radius)
        scene.collection.objects.link(obj)
        markers.append(dict(local=local, radius=radius, colour=PALETTE[i], fraction=(a, b)))
    return markers, np.array(rigid)


def _render(scene, path) -> np.ndarray:
    """Render with Cycles, save an OpenEXR file and read it back: float32 [H, W, 4], row 0 = top of the image."""
    scene.render.filepath = str(path)
    bpy.ops.render.render(write_still=True)
    channels = OpenEXR.File(str(path)).channels()
    if "RGBA" in channels:
        return np.asarray(channels["RGBA"].pixels, dtype=np.float32)
    return np.stack([np.asarray(channels[c].pixels, dtype=np.float32) for c in "RGBA"], axis=-1)


# ---------------------------------------------------------------------------------------------------------------------
# image side


def _blobs(image: np.ndarray) -> list[dict]:
    """Connected (8-neighbour) non-black regions: intensity-weighted centroid (pixel centres at +0.5), colour, box."""
    intensity = image[..., :3].sum(-1)
    mask = intensity > 1e-6
    seen = np.zeros_like(mask)
    height, width = mask.shape
    blobs = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        stack, pixels = [start], []
        while stack:
            r, c = stack.pop()
            pixels.append((r, c))
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    rr, cc = r + dr, c + dc
                    if 0 <= rr < height and 0 <= cc < width and mask[rr, cc] and not seen[rr, cc]:
                        seen[rr, cc] = True
                        stack.append((rr, cc))
        rows, cols = np.array(pixels).T
        weights = intensity[rows, cols].astype(np.float64)
        rgb = image[rows, cols, :3].astype(np.float64).sum(0)
        blobs.append(dict(
            centroid=np.array([((cols + 0.5) * weights).sum(), ((rows + 0.5) * weights).sum()]) / weights.sum(),
            colour=rgb / rgb.max(),
            box=(rows.min(), rows.max(), cols.min(), cols.max()),
            peak=intensity[rows, cols].max(),
        ))
    return blobs


def _silhouette_centre(local: np.ndarray, radius: float, ortho: bool) -> np.ndarray:
    """The camera-local point that projects onto the centre of a sphere's image (= the blob's centroid).

    A perspective camera images a sphere as an ellipse whose centre lies slightly outside the projected sphere
    centre: along the radial direction, the silhouette spans tan(theta - alpha) .. tan(theta + alpha), with theta
    the angle of the sphere centre off the optical axis and alpha = asin(radius / distance). Orthographic: no shift.
    """
    if ortho:
        return local
    depth = -local[2]
    tan_theta = math.hypot(local[0], local[1]) / depth
    if tan_theta == 0.0:
        return local
    theta, alpha = math.atan(tan_theta), math.asin(radius / np.linalg.norm(local))
    centre = 0.5 * (math.tan(theta + alpha) + math.tan(theta - alpha))
    return np.array([local[0] * centre / tan_theta, local[1] * centre / tan_theta, local[2]])


# ---------------------------------------------------------------------------------------------------------------------
# tests


@pytest.mark.cycles
@pytest.mark.timeout(300)
@pytest.mark.parametrize("setup", SETUPS, ids=[s.name for s in SETUPS])
def test_markers_land_where_cycles_renders_them(setup: Setup, tmp_path):
    scene = _empty_scene()
    _setup_cycles(scene)
    cam_obj = _add_camera(scene, setup)
    cam = _engine_camera(cam_obj, scene)
    width, height = cam.width, cam.height
    markers, rigid = _add_markers(scene, cam_obj, width, height)

    image = _render(scene, tmp_path / f"{setup.name}.exr")
    assert image.shape == (height, width, 4), "Cycles rendered a different image size than the engine camera has"
    blobs = _blobs(image)
    assert len(blobs) == len(markers), f"found {len(blobs)} blobs for {len(markers)} markers"

    errors, raw_errors, frame_errors = [], [], []
    for marker in markers:
        matches = [b for b in blobs if np.abs(b["colour"] - marker["colour"]).max() < 0.1]
        assert len(matches) == 1, f"marker {marker['colour']} matched {len(matches)} blobs"
        blob = matches[0]
        top, bottom, left, right = blob["box"]
        assert 0 < top and bottom < height - 1 and 0 < left and right < width - 1, "marker touches the image border"
        assert blob["peak"] > 0.97 * sum(marker["colour"]), "no fully covered pixel: marker too small to measure"

        corrected = _silhouette_centre(marker["local"], marker["radius"], cam.orthographic)
        world = np.array([marker["local"], corrected]) @ rigid[:3, :3].T + rigid[:3, 3]
        (raw, expected), depth = cam.project(world)
        assert depth[0] > 0
        errors.append(np.linalg.norm(expected - blob["centroid"]))
        raw_errors.append(np.linalg.norm(raw - blob["centroid"]))
        # Blender's view_frame independently says where the marker is: fraction (a, b) of the frame, b from the top.
        a, b = marker["fraction"]
        frame_errors.append(np.linalg.norm(np.array([a * width, b * height]) + (expected - raw) - blob["centroid"]))

    print(f"{setup.name}: max marker error {max(errors):.3f} px (without the sphere-silhouette correction "
          f"{max(raw_errors):.3f} px; against Blender's view_frame {max(frame_errors):.3f} px)")
    # Row order and Blender's frame: each marker is where Blender's own view_frame puts it, with row 0 at the top.
    assert max(frame_errors) < TOLERANCE_PX, f"{setup.name}: blobs are not where view_frame says: {frame_errors}"
    assert max(errors) < TOLERANCE_PX, f"{setup.name}: engine projection is off by {max(errors):.3f} px"


@pytest.mark.timeout(300)
def test_scaled_camera_setup_really_is_scaled():
    """The 'rotated_translated_scaled' case means something only if Blender keeps the scale in matrix_world."""
    scene = _empty_scene()
    setup = next(s for s in SETUPS if s.name == "rotated_translated_scaled")
    cam_obj = _add_camera(scene, setup)
    norms = np.linalg.norm(np.array(cam_obj.matrix_world)[:3, :3], axis=0)
    np.testing.assert_allclose(norms, setup.scale, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# Blender's projection matrix, many random cameras (no rendering)


def _intrinsics_from_projection(P: np.ndarray, width: int, height: int, ortho: bool):
    """fx, fy, cx, cy (pixels, y down) from an OpenGL-style projection matrix as Blender builds it.

    Perspective: u = (ndc_x + 1) W/2 with ndc_x = (P00 x + P02 z) / -z in Blender camera axes; with OpenCV's
    x' = x, z' = -z this is u = P00 W/2 * x'/z' + (1 - P02) W/2, and likewise v = (1 - ndc_y) H/2 gives
    fy = P11 H/2, cy = (1 + P12) H/2. Orthographic matrices have P02 = P12 = 0 and carry the lens shift in
    P03 / P13 instead: u = (P00 x + P03 + 1) W/2, so cx = (1 + P03) W/2 and cy = (1 - P13) H/2.
    """
    fx, fy = P[0, 0] * width / 2, P[1, 1] * height / 2
    if ortho:
        return fx, fy, (1 + P[0, 3]) * width / 2, (1 - P[1, 3]) * height / 2
    return fx, fy, (1 - P[0, 2]) * width / 2, (1 + P[1, 2]) * height / 2


@pytest.mark.timeout(300)
def test_intrinsics_match_blender_projection_matrix():
    rng = np.random.default_rng(7)
    scene = _empty_scene()
    render = scene.render
    data = bpy.data.cameras.new("random")
    cam_obj = bpy.data.objects.new("random", data)
    scene.collection.objects.link(cam_obj)
    scene.camera = cam_obj
    depsgraph = bpy.context.evaluated_depsgraph_get()
    worst = 0.0
    for trial in range(300):
        data.type = "ORTHO" if trial % 4 == 3 else "PERSP"
        data.lens = float(rng.uniform(8.0, 300.0))
        data.sensor_width, data.sensor_height = (float(v) for v in rng.uniform(5.0, 60.0, 2))
        data.sensor_fit = ("AUTO", "HORIZONTAL", "VERTICAL")[trial % 3]
        data.shift_x, data.shift_y = (float(v) for v in rng.uniform(-0.8, 0.8, 2))
        data.ortho_scale = float(rng.uniform(0.2, 30.0))
        data.clip_start = float(rng.uniform(0.01, 1.0))
        data.clip_end = float(rng.uniform(10.0, 1000.0))
        render.resolution_x, render.resolution_y = (int(v) for v in rng.integers(16, 3000, 2))
        render.resolution_percentage = int(rng.choice([10, 25, 50, 77, 100, 150, 200]))
        render.pixel_aspect_x, render.pixel_aspect_y = (float(v) for v in rng.uniform(1.0, 3.0, 2))  # Blender: >= 1
        euler = Euler([float(v) for v in rng.uniform(-math.pi, math.pi, 3)])
        cam_obj.matrix_world = Matrix.LocRotScale([float(v) for v in rng.uniform(-20, 20, 3)], euler,
                                                  [float(v) for v in rng.uniform(0.2, 4.0, 3)])
        bpy.context.view_layer.update()

        cam = _engine_camera(cam_obj, scene)
        width, height = cam.width, cam.height
        P = np.array(cam_obj.calc_matrix_camera(depsgraph, x=width, y=height, scale_x=render.pixel_aspect_x,
                                                scale_y=render.pixel_aspect_y))
        blender = np.array(_intrinsics_from_projection(P, width, height, cam.orthographic))
        engine = np.array([cam.fx, cam.fy, cam.cx, cam.cy])
        scale = max(width, height)  # Blender works in float32: compare relative to the image size
        np.testing.assert_allclose(engine, blender, rtol=1e-5, atol=2e-5 * scale,
                                   err_msg=f"trial {trial}: {data.type} {data.sensor_fit} {width}x{height}")

        # Whole projection: Blender's P @ view against the engine, for points inside the view.
        view = np.array(cam_obj.matrix_world.normalized().inverted())
        depth = rng.uniform(2.0, 50.0, (20, 1))
        spread = 1.0 if cam.orthographic else 0.3 * depth
        local = np.concatenate([rng.uniform(-1, 1, (20, 2)) * spread, -depth], axis=1)
        points = local @ np.linalg.inv(view)[:3, :3].T + np.linalg.inv(view)[:3, 3]
        clip = np.concatenate([points, np.ones((20, 1))], axis=1) @ (P @ view).T
        ndc = clip[:, :3] / clip[:, 3:]
        blender_pixels = np.stack([(ndc[:, 0] + 1) * width / 2, (1 - ndc[:, 1]) * height / 2], axis=-1)
        engine_pixels, engine_depth = cam.project(points)
        np.testing.assert_allclose(engine_depth, -local[:, 2], rtol=1e-5)
        # float32 rounding grows with the distance from the image centre (points may lie far outside the frame)
        reach = np.maximum(scale, np.abs(blender_pixels - [width / 2, height / 2]).max(axis=1, keepdims=True))
        err = (np.abs(engine_pixels - blender_pixels) / reach).max()
        worst = max(worst, err)
        assert err < 1e-4, f"trial {trial}: projection differs by {err:.2e} of the distance from the centre"
    print(f"worst projection difference against calc_matrix_camera: {worst:.2e} (relative)")
