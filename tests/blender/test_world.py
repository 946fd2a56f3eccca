"""`near_blender.world`: the World -> EnvMap conversion, checked against what Cycles renders for the same World.

Every test starts from an empty factory scene, builds a World, converts it, and compares `EnvMap.background(camera)`
with a Cycles render of that World through the same pinhole camera (one ray per pixel centre: box filter 0.01 pixel
wide, as in tests/test_envmap_cycles.py). Every test also checks the user's data is left exactly as it was.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path

import bpy
import numpy as np
import OpenEXR
import pytest

import near_blender.world as world_module
from near_blender.world import world_envmap
from near_engine.blender_data import blender_hdri
from near_engine.camera import Camera
from near_engine.envmap import EnvMap
from near_engine.errors import EnvMapError
from near_engine.images import linear_to_srgb
from near_engine.pipeline import LRUCache

pytestmark = [pytest.mark.cycles, pytest.mark.timeout(120)]

RES = (64, 48)
CAMERA_ROTATION = (80.0, 0.0, 30.0)  # degrees: looking a little below the horizon
BAKE_HEIGHT = 64  # small bakes keep the tests fast; the pinhole camera sees ~1 bake texel per pixel


def psnr(image: np.ndarray, reference: np.ndarray) -> float:
    """PSNR on linear values, peak = the reference's maximum."""
    mse = float(((np.asarray(image, np.float64) - reference) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(float(reference.max()) ** 2 / mse)


def new_scene() -> bpy.types.Scene:
    bpy.ops.wm.read_factory_settings(use_empty=True)
    return bpy.context.scene


def new_world(scene: bpy.types.Scene) -> tuple[bpy.types.World, bpy.types.NodeTree]:
    """A World with the default Background -> World Output nodes, set on the scene."""
    world = bpy.data.worlds.new("World")
    world.use_nodes = True
    scene.world = world
    return world, world.node_tree


def environment_world(scene: bpy.types.Scene, image: bpy.types.Image | None, rotation_z: float = 0.0,
                      strength: float = 1.0, vector_type: str = "POINT") -> bpy.types.World:
    """Texture Coordinate (Generated) -> Mapping -> Environment Texture -> Background (the usual HDRI setup)."""
    world, tree = new_world(scene)
    nodes, links = tree.nodes, tree.links
    coords, mapping = nodes.new("ShaderNodeTexCoord"), nodes.new("ShaderNodeMapping")
    mapping.vector_type = vector_type
    mapping.inputs["Rotation"].default_value = (0.0, 0.0, rotation_z)
    texture = nodes.new("ShaderNodeTexEnvironment")
    texture.image = image
    nodes["Background"].inputs["Strength"].default_value = strength
    links.new(coords.outputs["Generated"], mapping.inputs["Vector"])
    links.new(mapping.outputs["Vector"], texture.inputs["Vector"])
    links.new(texture.outputs["Color"], nodes["Background"].inputs["Color"])
    return world


def cycles_view(scene: bpy.types.Scene, out_dir: Path) -> tuple[np.ndarray, Camera]:
    """Render the scene's World through a 64x48 pinhole camera; (linear image top row first, the engine's camera)."""
    scene.render.engine = "CYCLES"
    cycles = scene.cycles
    cycles.device, cycles.samples, cycles.seed = "CPU", 1, 0
    cycles.use_adaptive_sampling = cycles.use_denoising = False
    cycles.pixel_filter_type, cycles.filter_width = "BOX", 0.01
    if scene.world is not None:
        scene.world.cycles.sampling_method = "NONE"  # camera rays only; changes nothing they see
    render = scene.render
    render.threads_mode, render.threads = "FIXED", 2
    render.resolution_x, render.resolution_y = RES
    render.resolution_percentage = 100
    scene.view_settings.view_transform = "Standard"
    settings = render.image_settings
    settings.file_format, settings.color_depth, settings.exr_codec = "OPEN_EXR", "32", "ZIP"
    data = bpy.data.cameras.new("Camera")
    data.lens = 20.0
    camera = bpy.data.objects.new("Camera", data)
    camera.rotation_euler = [math.radians(a) for a in CAMERA_ROTATION]
    scene.collection.objects.link(camera)
    scene.camera = camera
    bpy.context.view_layer.update()
    render.filepath = str(out_dir / "cycles.exr")
    bpy.ops.render.render(write_still=True)
    channels = OpenEXR.File(render.filepath, separate_channels=True).channels()
    image = np.stack([channels[c].pixels for c in "RGB"], axis=-1).astype(np.float32)
    engine_camera = Camera.from_blender(np.array(camera.matrix_world), lens=data.lens,
                                        sensor_width=data.sensor_width, sensor_height=data.sensor_height,
                                        resolution_x=RES[0], resolution_y=RES[1])
    return image, engine_camera


def data_state() -> tuple:
    """The user's data as far as a conversion could touch it: data-block counts, worlds, node values, images."""
    counts = tuple(len(getattr(bpy.data, name)) for name in (
        "worlds", "images", "node_groups", "objects", "cameras", "scenes", "materials", "texts", "libraries"))
    worlds = []
    for world in bpy.data.worlds:
        nodes = ()
        if world.node_tree is not None:
            nodes = tuple((n.name, n.bl_idname, tuple(tuple(s.default_value) if hasattr(s.default_value, "__len__")
                                                      else s.default_value
                                                      for s in n.inputs if hasattr(s, "default_value")))
                          for n in world.node_tree.nodes)
            nodes += tuple((l.from_node.name, l.to_node.name) for l in world.node_tree.links)
        worlds.append((world.name, world.use_nodes, tuple(world.color), world.users, nodes))
    images = tuple((i.name, i.filepath, i.source, i.colorspace_settings.name, i.is_dirty, i.users,
                    i.packed_file is None) for i in bpy.data.images)
    scene = bpy.context.scene
    return counts, tuple(worlds), images, scene.world.name if scene.world else None, scene.frame_current


@pytest.fixture
def count_bakes(monkeypatch) -> list:
    """Records each bake subprocess run (the real one still runs)."""
    calls = []
    real = world_module.PreparedBake.run

    def counted(self, *args, **kwargs):
        calls.append(self.name)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(world_module.PreparedBake, "run", counted)
    return calls


# ---------------------------------------------------------------------------------------------------------------------
# read directly


@pytest.mark.parametrize("vector_type", ["POINT", "TEXTURE"])
def test_hdri_world_is_read_directly_and_matches_cycles(tmp_path, count_bakes, vector_type):
    scene = new_scene()
    path = blender_hdri("forest")
    world = environment_world(scene, bpy.data.images.load(str(path)), rotation_z=0.7, strength=2.0,
                              vector_type=vector_type)
    before = data_state()
    env, messages = world_envmap(world)
    assert data_state() == before
    assert messages == [] and count_bakes == []
    assert env.rotation_z == pytest.approx(0.7 if vector_type == "POINT" else -0.7)
    assert env.strength == pytest.approx(2.0)
    np.testing.assert_array_equal(env.pixels, EnvMap.read(path).pixels)  # the file's pixels, top row first
    rendered, camera = cycles_view(scene, tmp_path)
    assert float(rendered.std()) > 0.01
    assert psnr(env.background(camera), rendered) >= 35


@pytest.mark.parametrize("colorspace", ["Linear Rec.2020", "sRGB", "Non-Color"])
def test_float_image_pixels_are_scene_linear_in_any_colour_space(tmp_path, colorspace):
    """Blender converts float images to scene linear when it loads them, as Cycles does: read them as they are."""
    scene = new_scene()
    path = blender_hdri("courtyard")
    image = bpy.data.images.load(str(path))
    image.colorspace_settings.name = colorspace
    world = environment_world(scene, image, rotation_z=0.3)
    env, _ = world_envmap(world)
    converted = float(np.abs(env.pixels - EnvMap.read(path).pixels).max())
    assert (converted == 0.0) == (colorspace == "Non-Color")  # data is not converted, colour is
    rendered, camera = cycles_view(scene, tmp_path)
    assert psnr(env.background(camera), rendered) >= 35


def byte_image(tmp_path: Path, colorspace: str) -> tuple[bpy.types.Image, np.ndarray]:
    """A PNG saved to disk and loaded back with `colorspace`; (image, its stored values in [0, 1], top row first).

    sRGB gets a photo-like panorama (an HDRI encoded to 8 bits), the linear spaces a tiny random-colour image.
    """
    if colorspace == "sRGB":
        linear = EnvMap.read(blender_hdri("courtyard")).resized(256).pixels
        values = np.round(linear_to_srgb(linear) * 255) / 255
    else:
        values = np.round(np.random.default_rng(3).random((16, 32, 3)) * 255) / 255
    height, width = values.shape[:2]
    rgba = np.concatenate([values, np.ones((height, width, 1))], axis=-1).astype(np.float32)
    image = bpy.data.images.new("made", width, height, alpha=False)
    image.pixels.foreach_set(rgba[::-1].ravel())
    image.filepath_raw = str(tmp_path / "colours.png")
    image.file_format = "PNG"
    image.save()
    bpy.data.images.remove(image)
    loaded = bpy.data.images.load(str(tmp_path / "colours.png"))
    loaded.colorspace_settings.name = colorspace
    return loaded, values


@pytest.mark.parametrize("colorspace", ["sRGB", "Non-Color", "Linear Rec.709"])
def test_byte_image_world_matches_cycles(tmp_path, count_bakes, colorspace):
    """Texels are decoded exactly. Measured: Cycles interpolates 8-bit sRGB texels *before* decoding them, we after
    (the map is linear); that differs only between texels of a magnified image, so sRGB uses a photo-like panorama
    whose neighbouring texels are close, as real ones are. On 16 x 32 random colours it would score only ~24 dB."""
    scene = new_scene()
    image, values = byte_image(tmp_path, colorspace)
    world = environment_world(scene, image, rotation_z=-1.2, strength=1.5)
    before = data_state()
    env, _ = world_envmap(world)
    assert data_state() == before and count_bakes == []
    expected = np.where(values <= 0.04045, values / 12.92, ((values + 0.055) / 1.055) ** 2.4) \
        if colorspace == "sRGB" else values
    np.testing.assert_allclose(env.pixels, expected, rtol=1e-5, atol=1e-7)
    rendered, camera = cycles_view(scene, tmp_path)
    value = psnr(env.background(camera), rendered)
    print(f"byte {colorspace}: {value:.1f} dB")
    assert value >= 35


def test_plain_colour_world(tmp_path, count_bakes):
    scene = new_scene()
    world, tree = new_world(scene)
    tree.nodes["Background"].inputs["Color"].default_value = (0.2, 0.5, 0.9, 1.0)
    tree.nodes["Background"].inputs["Strength"].default_value = 3.0
    before = data_state()
    env, messages = world_envmap(world)
    assert data_state() == before and messages == [] and count_bakes == []
    rendered, camera = cycles_view(scene, tmp_path)
    np.testing.assert_allclose(env.background(camera), rendered, rtol=1e-4)
    np.testing.assert_allclose(rendered[0, 0], [0.6, 1.5, 2.7], rtol=1e-4)


def test_world_without_nodes_uses_its_colour(tmp_path, count_bakes):
    scene = new_scene()
    world = bpy.data.worlds.new("Plain")
    world.use_nodes = False
    world.color = (0.3, 0.1, 0.05)
    scene.world = world
    before = data_state()
    env, _ = world_envmap(world)
    assert data_state() == before and count_bakes == []
    assert env.strength == 1.0
    rendered, camera = cycles_view(scene, tmp_path)
    np.testing.assert_allclose(env.background(camera), rendered, rtol=1e-4)
    assert float(rendered.mean()) > 0.1


def test_environment_texture_without_image_is_magenta_as_in_cycles(tmp_path, count_bakes):
    scene = new_scene()
    world = environment_world(scene, None, strength=0.5)
    env, messages = world_envmap(world)
    assert len(messages) == 1 and "no image" in messages[0] and count_bakes == []
    rendered, camera = cycles_view(scene, tmp_path)
    np.testing.assert_allclose(env.background(camera), rendered, rtol=1e-4)
    np.testing.assert_allclose(rendered[0, 0], [0.5, 0.0, 0.5], rtol=1e-4)


def test_no_world_is_black_with_a_warning(tmp_path):
    scene = new_scene()
    assert scene.world is None
    env, messages = world_envmap(None)
    assert len(messages) == 1 and "No World" in messages[0]
    rendered, camera = cycles_view(scene, tmp_path)
    assert float(np.abs(rendered).max()) == 0.0
    assert float(env.background(camera).max()) == 0.0


# ---------------------------------------------------------------------------------------------------------------------
# baked


def procedural_world(scene: bpy.types.Scene, noise_scale: float = 3.0) -> tuple[bpy.types.World, bpy.types.Node]:
    """Noise Texture (Color) -> Background, strength 2: a world only a bake can read."""
    world, tree = new_world(scene)
    noise = tree.nodes.new("ShaderNodeTexNoise")
    noise.inputs["Scale"].default_value = noise_scale
    tree.links.new(noise.outputs["Color"], tree.nodes["Background"].inputs["Color"])
    tree.nodes["Background"].inputs["Strength"].default_value = 2.0
    return world, noise


@pytest.mark.timeout(300)
def test_procedural_world_is_baked_and_matches_cycles(tmp_path, count_bakes):
    """The bake (64 x 128, box-filtered texels) is bilinearly resampled by the pinhole view; Cycles point-samples the
    noise at each pixel centre. The difference is the noise's detail below one bake texel (~2.8 degrees), which this
    smooth noise (scale 3) barely has: 30 dB allows for it; a wrong orientation scores far lower (checked below)."""
    scene = new_scene()
    world, _ = procedural_world(scene)
    before = data_state()
    env, messages = world_envmap(world, bake_height=BAKE_HEIGHT)
    assert data_state() == before
    assert count_bakes == ["World"] and messages == []
    assert env.pixels.shape == (BAKE_HEIGHT, 2 * BAKE_HEIGHT, 3)
    assert (env.rotation_z, env.strength) == (0.0, 1.0)  # the bake includes the strength
    rendered, camera = cycles_view(scene, tmp_path)
    value = psnr(env.background(camera), rendered)
    print(f"procedural bake vs Cycles: {value:.1f} dB")
    assert value >= 30
    assert psnr(EnvMap.from_array(env.pixels[::-1]).background(camera), rendered) < value - 6


@pytest.mark.timeout(300)
def test_bake_orientation_matches_the_direct_read(count_bakes):
    """An HDRI forced through the bake (an identity Gamma node) gives the image the direct read gives."""
    scene = new_scene()
    path = blender_hdri("forest")
    world = environment_world(scene, bpy.data.images.load(str(path)))
    tree = world.node_tree
    gamma = tree.nodes.new("ShaderNodeGamma")  # gamma 1: changes nothing but the route
    tree.links.new(tree.nodes["Environment Texture"].outputs["Color"], gamma.inputs["Color"])
    tree.links.new(gamma.outputs["Color"], tree.nodes["Background"].inputs["Color"])
    before = data_state()
    baked, _ = world_envmap(world, bake_height=256)
    assert data_state() == before and len(count_bakes) == 1
    # A box-filtered bake texel is the average over its footprint: the area-averaged (resized) direct map.
    direct = EnvMap.read(path).resized(256, 512).pixels
    value = psnr(baked.pixels, direct)
    print(f"baked vs direct: {value:.1f} dB")
    assert value >= 35
    for wrong in (direct[::-1], direct[:, ::-1], np.roll(direct, 256, axis=1)):  # flipped, mirrored, half a turn
        assert psnr(baked.pixels, wrong) < value - 15


@pytest.mark.timeout(300)
def test_bake_cache_bakes_each_signature_once(count_bakes):
    scene = new_scene()
    world, noise = procedural_world(scene)
    cache = LRUCache(4)
    first, _ = world_envmap(world, bake_cache=cache, bake_height=16)
    again, _ = world_envmap(world, bake_cache=cache, bake_height=16)
    assert len(count_bakes) == 1 and again is first
    world.node_tree.nodes["Background"].location.x += 100  # layout only: no re-bake
    world_envmap(world, bake_cache=cache, bake_height=16)
    assert len(count_bakes) == 1
    noise.inputs["Scale"].default_value = 7.0
    changed, _ = world_envmap(world, bake_cache=cache, bake_height=16)
    assert len(count_bakes) == 2
    assert psnr(changed.pixels, first.pixels) < 40  # really a different world
    noise.inputs["Scale"].default_value = 3.0
    back, _ = world_envmap(world, bake_cache=cache, bake_height=16)
    assert len(count_bakes) == 2 and back is first
    world_envmap(world, bake_cache=cache, bake_height=32)  # another bake size is another entry
    assert len(count_bakes) == 3 and len(cache) == 3


class _WorldProbeEngine(bpy.types.RenderEngine):
    """A render engine that converts the World from inside render(), as the NeAR engine's final render does."""

    bl_idname = "NEAR_TEST_WORLD_PROBE"
    bl_label = "World probe (test)"
    results: list = []

    def render(self, depsgraph):
        try:
            self.results.append(world_envmap(depsgraph.scene_eval.world, bake_height=16))
        except Exception as exc:  # noqa: BLE001 - handed to the test, which fails on it
            self.results.append(exc)
        scale = depsgraph.scene.render.resolution_percentage / 100
        result = self.begin_result(0, 0, int(RES[0] * scale), int(RES[1] * scale))
        self.end_result(result)


@pytest.mark.timeout(300)
def test_bake_works_inside_a_render_engine_render(count_bakes):
    scene = new_scene()
    world, _ = procedural_world(scene)
    outside, _ = world_envmap(world, bake_height=16)
    camera = bpy.data.objects.new("Camera", bpy.data.cameras.new("Camera"))
    scene.collection.objects.link(camera)
    scene.camera = camera
    bpy.utils.register_class(_WorldProbeEngine)
    try:
        _WorldProbeEngine.results.clear()
        scene.render.engine = _WorldProbeEngine.bl_idname
        scene.render.resolution_x, scene.render.resolution_y = RES
        bpy.ops.render.render()
    finally:
        bpy.utils.unregister_class(_WorldProbeEngine)
    assert len(_WorldProbeEngine.results) == 1
    result = _WorldProbeEngine.results[0]
    assert not isinstance(result, Exception), result
    inside, messages = result
    assert len(count_bakes) == 2 and messages == []
    np.testing.assert_allclose(inside.pixels, outside.pixels, rtol=1e-5, atol=1e-6)  # same seed, same bake
    assert float(inside.pixels.std()) > 0.01


# ---------------------------------------------------------------------------------------------------------------------
# failures and animation


@pytest.mark.parametrize("route", ["direct", "bake"])
def test_missing_image_names_itself_and_changes_nothing(tmp_path, count_bakes, route):
    scene = new_scene()
    path = tmp_path / "gone.exr"
    shutil.copy(blender_hdri("studio"), path)
    image = bpy.data.images.load(str(path))  # loads lazily: the file is read on first use
    path.unlink()
    world = environment_world(scene, image)
    if route == "bake":  # the same image behind a node that forces a bake
        tree = world.node_tree
        invert = tree.nodes.new("ShaderNodeInvert")
        tree.links.new(tree.nodes["Environment Texture"].outputs["Color"], invert.inputs["Color"])
        tree.links.new(invert.outputs["Color"], tree.nodes["Background"].inputs["Color"])
    before = data_state()
    with pytest.raises(EnvMapError, match=r"World image 'gone.exr' could not be loaded from '.*gone.exr'"):
        world_envmap(world)
    assert data_state() == before
    assert count_bakes == []


def test_animated_mapping_and_strength_through_the_depsgraph(count_bakes):
    scene = new_scene()
    world = environment_world(scene, bpy.data.images.load(str(blender_hdri("city"))))
    rotation = world.node_tree.nodes["Mapping"].inputs["Rotation"]
    strength = world.node_tree.nodes["Background"].inputs["Strength"]
    for frame, angle, power in ((1, 0.25, 1.0), (11, 1.5, 4.0)):
        rotation.default_value[2] = angle
        strength.default_value = power
        rotation.keyframe_insert("default_value", index=2, frame=frame)
        strength.keyframe_insert("default_value", frame=frame)
    for frame, angle, power in ((1, 0.25, 1.0), (11, 1.5, 4.0)):
        scene.frame_set(frame)
        depsgraph = bpy.context.evaluated_depsgraph_get()
        before = data_state()
        env, _ = world_envmap(depsgraph.scene_eval.world)
        assert data_state() == before
        assert env.rotation_z == pytest.approx(angle)
        assert env.strength == pytest.approx(power)
    assert count_bakes == []


@pytest.mark.timeout(300)
def test_animated_procedural_world_bakes_the_current_frame(count_bakes):
    """A bake renders the values the depsgraph evaluated at the current frame, not the file's stored ones."""
    scene = new_scene()
    world, noise = procedural_world(scene)
    scale = noise.inputs["Scale"]
    expected = {}
    for frame, value in ((1, 3.0), (11, 7.0)):
        scale.default_value = value
        expected[frame] = world_envmap(world, bake_height=16)[0].pixels
        scale.keyframe_insert("default_value", frame=frame)
    scale.default_value = 5.0  # the stored value: neither frame's
    for frame in (11, 1):
        scene.frame_set(frame)
        env, _ = world_envmap(bpy.context.evaluated_depsgraph_get().scene_eval.world, bake_height=16)
        np.testing.assert_allclose(env.pixels, expected[frame], rtol=1e-5, atol=1e-6)
    assert psnr(expected[1], expected[11]) < 40 and len(count_bakes) == 4


def test_a_failed_bake_is_a_clear_error_and_leaves_no_files(count_bakes):
    scene = new_scene()
    world, _ = procedural_world(scene)
    leftovers = set(Path(tempfile.gettempdir()).glob("near_world_bake_*"))
    before = data_state()
    with pytest.raises(EnvMapError, match="Baking World 'World' with Cycles took longer than 0.01 s"):
        world_envmap(world, bake_height=16, bake_timeout=0.01)
    assert data_state() == before and len(count_bakes) == 1
    assert set(Path(tempfile.gettempdir()).glob("near_world_bake_*")) == leftovers
