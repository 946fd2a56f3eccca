"""`near_engine.envmap` against real Cycles (through the bpy module): the World is what the engine says it is.

The scene holds nothing but a World: Texture Coordinate (Generated) -> Mapping (Point, Z rotation) -> Environment
Texture (Linear) -> Background (strength != 1). Each test renders it with a camera and compares the linear float render
with `EnvMap.background` / `EnvMap.panorama` for the same camera.

Fair comparison: the engine shades one ray through each pixel centre. Cycles is set to a box pixel filter 0.01 pixel
wide (its minimum), so its one sample per pixel leaves within 0.005 pixel of the centre: the same ray up to a
sub-pixel jitter that is deterministic (fixed seed). Denoising and adaptive sampling are off, the World's importance
map is off (it changes nothing a camera ray sees and costs preprocessing), and renders are saved as 32-bit float
OpenEXR (linear, no view transform) and read back with the OpenEXR bindings directly, not with the code under test.

The file also checks what Blender itself writes (EXR with every codec, multilayer render EXR, Radiance HDR) reads back
as Blender means it.
"""

from __future__ import annotations

import math
from pathlib import Path

import bpy
import numpy as np
import OpenEXR
import pytest

from near_engine.camera import Camera
from near_engine.envmap import EnvMap, EnvMapWarning, direction_to_uv, rotation_z_matrix
from near_engine.images import EXR_COMPRESSIONS

pytestmark = [pytest.mark.cycles, pytest.mark.timeout(300)]

ROTATION_Z = 0.7  # radians, the Mapping node's Z rotation
STRENGTH = 1.7  # Background strength
RES = (64, 48)
MIN_PSNR = 35.0
HDRI = "forest.exr"  # has a sun of ~1400: a demanding, high-dynamic-range case


def psnr(image: np.ndarray, reference: np.ndarray, mask: np.ndarray | None = None) -> float:
    """PSNR on linear values, peak = the reference's maximum."""
    diff = (np.asarray(image, np.float64) - reference) ** 2
    mse = float(diff[mask].mean() if mask is not None else diff.mean())
    return math.inf if mse == 0 else 10 * math.log10(float(reference.max()) ** 2 / mse)


def read_exr_rgb(path: Path) -> np.ndarray:
    channels = OpenEXR.File(str(path), separate_channels=True).channels()
    return np.stack([channels[c].pixels for c in "RGB"], axis=-1).astype(np.float32)


class WorldScene:
    """A world-only Cycles scene with one camera; `render()` returns the linear float image, top row first."""

    def __init__(self, image_path: Path, out_dir: Path, rotation_z: float = ROTATION_Z, strength: float = STRENGTH):
        bpy.ops.wm.read_factory_settings(use_empty=True)
        self.out_dir = out_dir
        scene = self.scene = bpy.context.scene
        scene.render.engine = "CYCLES"
        cycles = scene.cycles
        cycles.device = "CPU"
        cycles.samples = 1
        cycles.seed = 0
        cycles.use_animated_seed = False
        cycles.use_adaptive_sampling = False
        cycles.use_denoising = False
        cycles.pixel_filter_type = "BOX"
        cycles.filter_width = 0.01
        scene.render.threads_mode = "FIXED"
        scene.render.threads = 2
        scene.render.film_transparent = False
        scene.view_settings.view_transform = "Standard"
        scene.render.resolution_x, scene.render.resolution_y = RES
        scene.render.resolution_percentage = 100
        settings = scene.render.image_settings
        settings.file_format = "OPEN_EXR"
        settings.color_depth = "32"
        settings.exr_codec = "ZIP"

        world = bpy.data.worlds.new("World")
        scene.world = world
        world.use_nodes = True
        world.cycles.sampling_method = "NONE"
        nodes, links = world.node_tree.nodes, world.node_tree.links
        nodes.clear()
        coords = nodes.new("ShaderNodeTexCoord")
        mapping = nodes.new("ShaderNodeMapping")
        mapping.vector_type = "POINT"
        mapping.inputs["Rotation"].default_value = (0.0, 0.0, rotation_z)
        self.texture = nodes.new("ShaderNodeTexEnvironment")
        self.texture.interpolation = "Linear"
        self.texture.image = bpy.data.images.load(str(image_path))
        background = nodes.new("ShaderNodeBackground")
        background.inputs["Strength"].default_value = strength
        output = nodes.new("ShaderNodeOutputWorld")
        links.new(coords.outputs["Generated"], mapping.inputs["Vector"])
        links.new(mapping.outputs["Vector"], self.texture.inputs["Vector"])
        links.new(self.texture.outputs["Color"], background.inputs["Color"])
        links.new(background.outputs["Background"], output.inputs["Surface"])

        self.camera_data = bpy.data.cameras.new("Camera")
        self.camera = bpy.data.objects.new("Camera", self.camera_data)
        scene.collection.objects.link(self.camera)
        scene.camera = self.camera

    def render(self, name: str) -> Path:
        """Render to `<out_dir>/<name>.exr`; returns the file's path."""
        bpy.context.view_layer.update()
        self.scene.render.filepath = str(self.out_dir / f"{name}.exr")
        bpy.ops.render.render(write_still=True)
        return Path(self.scene.render.filepath)

    def render_rgb(self, name: str) -> np.ndarray:
        """Render and read the linear float image back (top row first) with the OpenEXR bindings."""
        return read_exr_rgb(self.render(name))

    def engine_camera(self) -> Camera:
        """The engine's camera for the Blender camera, built from the same settings the add-on reads."""
        cam, render = self.camera_data, self.scene.render
        return Camera.from_blender(
            np.array(self.camera.matrix_world), type=cam.type, lens=cam.lens, sensor_width=cam.sensor_width,
            sensor_height=cam.sensor_height, sensor_fit=cam.sensor_fit, shift_x=cam.shift_x, shift_y=cam.shift_y,
            ortho_scale=cam.ortho_scale, clip_start=cam.clip_start, clip_end=cam.clip_end,
            resolution_x=render.resolution_x, resolution_y=render.resolution_y,
            resolution_percentage=render.resolution_percentage)

    def opencv_camera_to_world(self) -> np.ndarray:
        return np.array(self.camera.matrix_world) @ np.diag([1.0, -1.0, -1.0, 1.0])


@pytest.fixture
def hdri_scene(blender_hdri_dir, tmp_path):
    """A fresh scene per test (cheap): tests that reset Blender cannot leave another test a dangling one."""
    path = blender_hdri_dir / HDRI
    return WorldScene(path, tmp_path), EnvMap.read(path, rotation_z=ROTATION_Z, strength=STRENGTH)


# Blender camera rotations (XYZ Euler, degrees). A Blender camera looks down its -Z: (90, 0, psi) looks horizontally
# at azimuth 90 + psi degrees. The seam (u = 0, world direction Rz(-rotation) @ -X) sits at azimuth 180 - rotation.
SEAM_PSI = 90.0 - math.degrees(ROTATION_Z)
PINHOLE_VIEWS = {
    "horizon": ((80.0, 0.0, 30.0), None),
    "zenith": ((180.0, 0.0, 12.0), (0.0, 0.0, 1.0)),  # straight up: the top pole is in the middle of the image
    "nadir": ((0.0, 0.0, 17.0), (0.0, 0.0, -1.0)),  # straight down
    "seam": ((100.0, 0.0, SEAM_PSI), None),
    "oblique_roll": ((35.0, 20.0, -120.0), None),
}


@pytest.mark.parametrize("view", PINHOLE_VIEWS)
def test_pinhole_camera_sees_what_cycles_renders(hdri_scene, view, record_property):
    scene, env = hdri_scene
    rotation, expected_axis = PINHOLE_VIEWS[view]
    scene.camera_data.type = "PERSP"
    scene.camera_data.lens = 20.0
    scene.camera.rotation_euler = [math.radians(a) for a in rotation]
    bpy.context.view_layer.update()
    rendered = scene.render_rgb(f"pinhole_{view}")
    camera = scene.engine_camera()
    ours = env.background(camera)

    _, directions = camera.pixel_rays()
    u = direction_to_uv(directions @ rotation_z_matrix(ROTATION_Z).T)[..., 0]
    if expected_axis is not None:  # the pole is in the view, within a pixel of its centre
        assert float((directions @ np.array(expected_axis)).max()) > 0.999
    if view == "seam":  # the view really crosses the u = 0 / 1 seam
        assert (u < 0.02).any() and (u > 0.98).any()

    value = psnr(ours, rendered)
    record_property("psnr_db", value)
    print(f"pinhole {view}: PSNR {value:.1f} dB")
    assert rendered.shape == ours.shape == (RES[1], RES[0], 3)
    assert float(rendered.std()) > 0.01  # a real picture, not a blank
    assert value >= MIN_PSNR


def test_orthographic_camera_sees_what_cycles_renders(hdri_scene, record_property):
    scene, env = hdri_scene
    scene.camera_data.type = "ORTHO"
    scene.camera.rotation_euler = [math.radians(a) for a in (70.0, 0.0, -40.0)]
    bpy.context.view_layer.update()
    rendered = scene.render_rgb("ortho")
    ours = env.background(scene.engine_camera())
    value = psnr(ours, rendered)
    record_property("psnr_db", value)
    print(f"orthographic: PSNR {value:.1f} dB")
    # Parallel rays all see the same point of the World: one colour, the one in the view direction.
    forward = -np.array(scene.camera.matrix_world)[:3, 2]
    np.testing.assert_allclose(rendered.reshape(-1, 3), np.broadcast_to(env.sample(forward), (RES[0] * RES[1], 3)),
                               rtol=1e-4)
    assert value >= MIN_PSNR


PANORAMAS = {
    "full": ((-90.0, 90.0), (-180.0, 180.0)),
    "partial": ((-30.0, 60.0), (-110.0, 60.0)),
}


@pytest.mark.parametrize("which", PANORAMAS)
def test_equirectangular_panorama_camera_sees_what_cycles_renders(hdri_scene, which, record_property):
    scene, env = hdri_scene
    (lat_min, lat_max), (lon_min, lon_max) = [tuple(math.radians(x) for x in pair) for pair in PANORAMAS[which]]
    cam = scene.camera_data
    cam.type = "PANO"
    cam.panorama_type = "EQUIRECTANGULAR"
    cam.latitude_min, cam.latitude_max, cam.longitude_min, cam.longitude_max = lat_min, lat_max, lon_min, lon_max
    scene.camera.rotation_euler = [math.radians(a) for a in (80.0, 10.0, 20.0)]
    bpy.context.view_layer.update()
    rendered = scene.render_rgb(f"pano_{which}")
    ours = env.panorama(scene.opencv_camera_to_world(), RES[0], RES[1], latitude_min=lat_min,
                        latitude_max=lat_max, longitude_min=lon_min, longitude_max=lon_max)
    value = psnr(ours, rendered)
    record_property("psnr_db", value)
    print(f"panorama {which}: PSNR {value:.1f} dB")
    assert float(rendered.std()) > 0.01
    assert value >= MIN_PSNR


# ---------------------------------------------------------------------------------------------------------------------
# behaviours a real HDRI hardly shows: checked on small synthetic maps


def synthetic_map(path: Path, bad_texels: bool = False) -> Path:
    rng = np.random.default_rng(0)
    pixels = rng.random((8, 16, 3)).astype(np.float32)
    pixels[0] = [4.0, 0.0, 0.0]  # top row red
    pixels[-1] = [0.0, 0.0, 4.0]  # bottom row blue
    if bad_texels:
        pixels[3, 2] = [np.nan, 1.0, 1.0]
        pixels[4, 9] = [np.inf, 1.0, 1.0]
        pixels[5, 13] = [1.0, -np.inf, 1.0]
    channels = {c: np.ascontiguousarray(pixels[..., i]) for i, c in enumerate("RGB")}
    OpenEXR.File({"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage}, channels).write(str(path))
    return path


def test_cycles_wraps_texture_rows_at_the_poles(tmp_path, record_property):
    """Cycles' Environment Texture repeats in v too: looking straight up mixes the top row with the bottom row."""
    scene = WorldScene(synthetic_map(tmp_path / "poles.exr"), tmp_path)
    env = EnvMap.read(tmp_path / "poles.exr", rotation_z=ROTATION_Z, strength=STRENGTH)
    scene.camera_data.lens = 50.0
    for name, rotation in (("up", (180.0, 0.0, 12.0)), ("down", (0.0, 0.0, 17.0))):
        scene.camera.rotation_euler = [math.radians(a) for a in rotation]
        rendered = scene.render_rgb(f"pole_{name}")
        camera = scene.engine_camera()
        wrapped = psnr(env.background(camera), rendered)
        clamped = psnr(env.sample(camera.pixel_rays()[1], pole_wrap=False), rendered)
        record_property(f"psnr_{name}_db", wrapped)
        print(f"pole {name}: PSNR {wrapped:.1f} dB wrapped, {clamped:.1f} dB clamped")
        assert wrapped >= MIN_PSNR
        assert clamped < wrapped - 10  # clamping would be visibly wrong here


def test_non_finite_texels_black_out_only_their_footprint(tmp_path):
    """NaN/Inf texels: we zero the bad channel of the texel; Cycles blacks that channel wherever the bilinear filter
    touches the texel. Everywhere else the renders agree."""
    scene = WorldScene(synthetic_map(tmp_path / "bad.exr", bad_texels=True), tmp_path)
    with pytest.warns(EnvMapWarning, match="3 NaN or infinite values"):
        env = EnvMap.read(tmp_path / "bad.exr", rotation_z=ROTATION_Z, strength=STRENGTH)
    scene.camera_data.type = "PANO"
    scene.camera_data.panorama_type = "EQUIRECTANGULAR"
    scene.camera.rotation_euler = [math.radians(a) for a in (90.0, 0.0, -90.0)]  # looking at +X, up +Z
    rendered = scene.render_rgb("bad_texels")
    c2w = scene.opencv_camera_to_world()
    ours = env.panorama(c2w, RES[0], RES[1])
    # Which output pixels' bilinear footprints touch a bad texel, per channel: filter an indicator map the same way.
    indicator = np.zeros((8, 16, 3), np.float32)
    indicator[3, 2, 0] = indicator[4, 9, 0] = indicator[5, 13, 1] = 1.0
    touched = EnvMap(indicator, rotation_z=ROTATION_Z).panorama(c2w, RES[0], RES[1]) > 0
    assert touched[..., 0].sum() > 4 and touched[..., 1].sum() > 2
    assert (rendered[touched] == 0).all()  # Cycles: the bad channel is black over the footprint
    assert psnr(ours, rendered, ~touched) >= 60


# ---------------------------------------------------------------------------------------------------------------------
# files Blender writes


def blender_float_image(width: int = 40, height: int = 20):
    """A float image in bpy with known linear values; returns (image, pixels top row first)."""
    rng = np.random.default_rng(1)
    rgb = np.exp(rng.normal(0.0, 1.5, (height, width, 3))).astype(np.float32)
    rgba = np.concatenate([rgb, np.ones((height, width, 1), np.float32)], axis=-1)
    image = bpy.data.images.new("known", width, height, float_buffer=True, alpha=True)
    image.pixels.foreach_set(rgba[::-1].ravel())  # Blender stores the bottom row first
    return image, rgb


def test_reads_exr_files_blender_writes_with_every_codec(tmp_path):
    bpy.ops.wm.read_factory_settings(use_empty=True)
    image, rgb = blender_float_image()
    settings = bpy.context.scene.render.image_settings
    settings.file_format = "OPEN_EXR"
    assert set(settings.bl_rna.properties["exr_codec"].enum_items.keys()) == set(EXR_COMPRESSIONS)
    tested = set()
    for depth in ("32", "16"):
        settings.color_depth = depth
        expected = rgb if depth == "32" else rgb.astype(np.float16).astype(np.float32)
        # Blender offers B44/B44A for half floats only; ask it which codecs this depth has.
        available = [c.identifier for c in settings.bl_rna.properties["exr_codec"].enum_items_static]
        codecs = [c for c in EXR_COMPRESSIONS if c in available and (depth == "16" or not c.startswith("B44"))]
        for codec in codecs:
            tested.add(codec)
            settings.exr_codec = codec
            path = tmp_path / f"{codec}_{depth}.exr"
            image.save_render(str(path))
            env = EnvMap.read(path)
            assert env.pixels.shape == rgb.shape, codec
            if codec in ("NONE", "RLE", "ZIPS", "ZIP", "PIZ") or (codec == "PXR24" and depth == "16") or (
                    codec in ("B44", "B44A") and depth == "32"):
                np.testing.assert_array_equal(env.pixels, expected, err_msg=f"{codec} {depth}")
            elif codec == "PXR24":
                np.testing.assert_allclose(env.pixels, expected, rtol=2.0**-15, err_msg=codec)
            else:  # lossy on this data: B44(A) halves, DWAA/DWAB
                assert psnr(env.pixels, rgb) > 40, f"{codec} {depth}"
    assert tested == set(EXR_COMPRESSIONS)


def test_reads_a_multilayer_render_exr(hdri_scene):
    """Several RGB layers (Combined, Env): the reader takes ViewLayer.Combined, the beauty pass."""
    scene, _ = hdri_scene
    scene.camera_data.type = "PERSP"
    scene.camera.rotation_euler = [math.radians(a) for a in (80.0, 0.0, 30.0)]
    single = scene.render_rgb("single_layer")
    view_layer = scene.scene.view_layers[0]
    view_layer.use_pass_normal = True
    view_layer.use_pass_environment = True
    settings = scene.scene.render.image_settings
    settings.file_format = "OPEN_EXR_MULTILAYER"
    path = scene.render("multilayer")
    names = {c.name for part in OpenEXR.File(str(path), header_only=True).parts for c in part.header["channels"]}
    assert {"ViewLayer.Combined.R", "ViewLayer.Env.R", "ViewLayer.Normal.X"} <= names, sorted(names)
    np.testing.assert_array_equal(EnvMap.read(path).pixels, np.maximum(single, 0))


def test_reads_radiance_hdr_as_blender_does(tmp_path):
    bpy.ops.wm.read_factory_settings(use_empty=True)
    image, rgb = blender_float_image()
    rgb[0, :5] = 0.0
    rgba = np.concatenate([rgb, np.ones(rgb.shape[:2] + (1,), np.float32)], axis=-1)
    image.pixels.foreach_set(rgba[::-1].ravel())
    bpy.context.scene.render.image_settings.file_format = "HDR"
    path = tmp_path / "blender.hdr"
    image.save_render(str(path))
    assert path.read_bytes().startswith(b"#?RADIANCE")
    # Blender ignores Radiance EXPOSURE lines; so must we, to light the way Cycles does.
    with_exposure = tmp_path / "exposure.hdr"
    with_exposure.write_bytes(path.read_bytes().replace(b"\n\n", b"\nEXPOSURE=4.0\n\n", 1))
    for file in (path, with_exposure):
        loaded = bpy.data.images.load(str(file))
        blender_pixels = np.empty(loaded.size[0] * loaded.size[1] * 4, np.float32)
        loaded.pixels.foreach_get(blender_pixels)
        blender_rgb = blender_pixels.reshape(loaded.size[1], loaded.size[0], 4)[::-1, :, :3]
        np.testing.assert_array_equal(EnvMap.read(file).pixels, blender_rgb)  # bit for bit what Blender gets
    ours = EnvMap.read(path).pixels
    # RGBE keeps 8 mantissa bits of the largest channel: values within 1/128 of it.
    assert (np.abs(ours - rgb) <= rgb.max(axis=-1, keepdims=True) / 128).all()
