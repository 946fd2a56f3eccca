"""The NeAR render engine in the bpy module: F12, animation, passes, save/reload, instances, bad input, operators.

The engine's images are compared with a direct `NearPipeline.render` call on inputs built independently of the
add-on (assets from the test, the HDRI read from disk, `Camera.from_blender` from the camera's settings), and the
World background with a Cycles render. The weights are seeded UNTRAINED test weights (see conftest.py).
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import bpy
import numpy as np
import OpenEXR
import pytest
from conftest import make_asset, multilayer_exr
from plyfile import PlyData

import near_blender
from near_blender import runtime
from near_blender.engine import ViewState, _render_view
from near_blender.objects import asset_to_object, object_to_asset
from near_engine import bundled
from near_engine.asset import write_asset
from near_engine.blender_data import blender_hdri
from near_engine.camera import Camera
from near_engine.envmap import EnvMap
from near_engine.gaussians import SH_C0
from near_engine.pipeline import NearPipeline, Scene

pytestmark = pytest.mark.timeout(300)

W, H = 64, 48
ROTATION, STRENGTH = 0.6, 1.5


# ---------------------------------------------------------------------------------------------------------- helpers


def _world(scene: bpy.types.Scene, rotation: float = ROTATION, strength: float = STRENGTH,
           path: Path | None = None) -> bpy.types.World:
    world = bpy.data.worlds.new("World")
    world.use_nodes = True
    nodes, links = world.node_tree.nodes, world.node_tree.links
    background = nodes["Background"]
    texture = nodes.new("ShaderNodeTexEnvironment")
    texture.image = bpy.data.images.load(str(path or blender_hdri("forest")))
    mapping = nodes.new("ShaderNodeMapping")
    coords = nodes.new("ShaderNodeTexCoord")
    mapping.inputs["Rotation"].default_value[2] = rotation
    links.new(coords.outputs["Generated"], mapping.inputs["Vector"])
    links.new(mapping.outputs["Vector"], texture.inputs["Vector"])
    links.new(texture.outputs["Color"], background.inputs["Color"])
    background.inputs["Strength"].default_value = strength
    scene.world = world
    return world


def _camera(scene: bpy.types.Scene, location=(1.9, -1.7, 0.9), target=(0.1, 0.0, 0.0)) -> bpy.types.Object:
    cam = bpy.data.objects.new("Camera", bpy.data.cameras.new("Camera"))
    cam.data.lens = 40.0
    scene.collection.objects.link(cam)
    direction = np.subtract(target, location)
    cam.location = location
    cam.rotation_euler = (math.atan2(math.hypot(direction[0], direction[1]), -direction[2]), 0.0,
                          math.atan2(direction[1], direction[0]) - math.pi / 2)
    scene.camera = cam
    return cam


def _setup(scene: bpy.types.Scene, weights_folder: Path, tmp_path: Path) -> list[bpy.types.Object]:
    """Forest HDRI (rotated, strength 1.5), a camera, two NeAR objects (one turned, moved, scaled and parented)."""
    scene.render.engine = "NEAR"
    scene.render.resolution_x, scene.render.resolution_y = W, H
    scene.near.weights_folder = str(weights_folder)
    _world(scene)
    _camera(scene)
    first = asset_to_object(make_asset(1), "First", scene.collection)
    second = asset_to_object(make_asset(2), "Second", scene.collection)
    parent = bpy.data.objects.new("Parent", None)
    scene.collection.objects.link(parent)
    parent.location = (0.1, 0.25, 0.0)
    parent.rotation_euler = (0.0, 0.0, 0.5)
    second.parent = parent
    second.location = (0.3, -0.2, 0.1)
    second.scale = (0.7, 0.7, 0.7)
    multilayer_exr(scene.render.image_settings)
    scene.render.filepath = str(tmp_path / "render.exr")
    bpy.context.view_layer.update()
    return [first, second]


def _render(scene: bpy.types.Scene, path: Path) -> dict[str, np.ndarray]:
    """F12 into a multilayer EXR; its passes by name, top row first."""
    scene.render.filepath = str(path)
    bpy.ops.render.render(write_still=True)
    return _read_passes(path)


def _read_passes(path: Path) -> dict[str, np.ndarray]:
    """Blender's multilayer EXR: 'ViewLayer.<Pass>[.<channel>]' -> {pass: [H, W, k]} in Blender's channel order."""
    components: dict[str, dict[str, np.ndarray]] = {}
    for name, channel in OpenEXR.File(str(path)).channels().items():
        _, _, rest = name.partition(".")
        pass_name, _, component = rest.partition(".")
        pixels = np.asarray(channel.pixels, np.float32)
        components.setdefault(pass_name, {})[component] = pixels if pixels.ndim == 3 else pixels[..., None]
    order = "RGBAXYZ"
    return {name: np.concatenate([parts[c] for c in sorted(parts, key=lambda c: order.find(c[:1]))], -1)
            for name, parts in components.items()}


def _direct(scene: bpy.types.Scene, weights_folder: Path, objects, passes=("combined",), *,
            strength: float = STRENGTH, camera: Camera | None = None) -> dict[str, np.ndarray]:
    """The same render computed without the add-on: assets from the objects' own test seeds, matrices from Blender."""
    pipeline = NearPipeline.from_pretrained(weights_folder, "cpu")
    envmap = EnvMap.read(blender_hdri("forest"), rotation_z=ROTATION, strength=strength)
    items = [(make_asset(seed), np.array(obj.matrix_world)) for seed, obj in objects]
    return pipeline.render(Scene(items, envmap, camera or _scene_camera(scene), scene.render.film_transparent),
                           passes)


def _scene_camera(scene: bpy.types.Scene) -> Camera:
    cam, render = scene.camera, scene.render
    return Camera.from_blender(np.array(cam.matrix_world), lens=cam.data.lens, sensor_width=cam.data.sensor_width,
                               clip_start=cam.data.clip_start, clip_end=cam.data.clip_end,
                               resolution_x=render.resolution_x, resolution_y=render.resolution_y,
                               resolution_percentage=render.resolution_percentage)


def _close(actual: np.ndarray, expected: np.ndarray, tol: float = 2e-4) -> None:
    assert actual.shape == expected.shape
    scale = max(float(np.abs(expected).max()), 1.0)
    assert float(np.abs(actual - expected).max()) <= tol * scale


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    peak = max(float(b.max()), 1e-6)
    return 10 * math.log10(peak**2 / max(float(np.mean((a - b) ** 2)), 1e-20))


def _datablock_counts() -> dict[str, int]:
    """The user's data-blocks (Blender's own "Render Result" image, made by any render, is not the user's)."""
    counts = {name: len(getattr(bpy.data, name)) for name in ("objects", "meshes", "worlds", "scenes", "cameras",
                                                              "collections", "node_groups")}
    counts["images"] = sum(image.type != "RENDER_RESULT" for image in bpy.data.images)
    return counts


# -------------------------------------------------------------------------------------------------------- register


def _engine_available() -> bool:
    try:
        bpy.context.scene.render.engine = "NEAR"
    except TypeError:  # not an enum item: no such engine registered
        return False
    bpy.context.scene.render.engine = "CYCLES"
    return True


def test_register_unregister_register_cleanly() -> None:
    bpy.ops.wm.read_factory_settings(use_empty=True)
    from bpy.types import DATA_PT_lens, EEVEE_WORLD_PT_surface

    for _ in range(2):
        near_blender.register()
        assert _engine_available() and hasattr(bpy.types.Scene, "near") and hasattr(bpy.types.ViewLayer, "near")
        assert "NEAR" in DATA_PT_lens.COMPAT_ENGINES and "NEAR" in EEVEE_WORLD_PT_surface.COMPAT_ENGINES
        assert hasattr(bpy.ops.import_scene, "near_asset") and "NEAR_FH_asset" in dir(bpy.types)
        near_blender.unregister()
        assert not _engine_available() and not hasattr(bpy.types.Scene, "near")
        assert not hasattr(bpy.types.Object, "near") and "NEAR" not in DATA_PT_lens.COMPAT_ENGINES
        assert "NEAR_FH_asset" not in dir(bpy.types)


# ------------------------------------------------------------------------------------------------------ final render


def test_f12_equals_the_direct_pipeline_and_the_world_matches_cycles(clean_blender, weights_folder, tmp_path) -> None:
    scene = clean_blender
    first, second = _setup(scene, weights_folder, tmp_path)
    view_layer = scene.view_layers[0]
    view_layer.use_pass_z = view_layer.use_pass_normal = True
    for name in ("use_pass_base_color", "use_pass_roughness", "use_pass_metallic", "use_pass_shadow"):
        setattr(view_layer.near, name, True)
    got = _render(scene, tmp_path / "f12.exr")
    names = ("combined", "depth", "normal", "base_color", "roughness", "metallic", "shadow")
    want = _direct(scene, weights_folder, [(1, first), (2, second)], names)
    blender_names = {"combined": "Combined", "depth": "Depth", "normal": "Normal", "base_color": "Base Color",
                     "roughness": "Roughness", "metallic": "Metallic", "shadow": "Shadow"}
    for name in names:
        _close(got[blender_names[name]], want[name])
    scene.render.film_transparent = True  # the lit pass's own coverage: where the World shows through untouched
    covered = _direct(scene, weights_folder, [(1, first), (2, second)])["combined"][..., 3] > 0
    covered |= want["depth"][..., 0] < 1e9
    scene.render.film_transparent = False
    assert 0.05 < covered.mean() < 0.9  # both objects are in view, and so is the World

    # The World behind the objects against Cycles (the NeAR meshes have no faces: Cycles renders the World alone),
    # one camera ray through each pixel centre as the engine shades it (box filter 0.01 px, one sample, fixed seed).
    scene.render.engine = "CYCLES"
    scene.cycles.samples, scene.cycles.seed, scene.cycles.use_denoising = 1, 0, False
    scene.cycles.use_adaptive_sampling = False
    scene.cycles.pixel_filter_type, scene.cycles.filter_width = "BOX", 0.01
    cycles = _render(scene, tmp_path / "cycles.exr")["Combined"][..., :3]
    background = got["Combined"][..., :3][~covered]
    assert _psnr(background, cycles[~covered]) >= 35.0


def test_world_strength_doubles_the_combined_pass(clean_blender, weights_folder, tmp_path) -> None:
    scene = clean_blender
    _setup(scene, weights_folder, tmp_path)
    once = _render(scene, tmp_path / "once.exr")["Combined"]
    scene.world.node_tree.nodes["Background"].inputs["Strength"].default_value = 2 * STRENGTH
    twice = _render(scene, tmp_path / "twice.exr")["Combined"]
    _close(twice[..., :3], 2 * once[..., :3], 1e-5)
    np.testing.assert_array_equal(twice[..., 3], once[..., 3])


def test_render_border_and_transparent_film(clean_blender, weights_folder, tmp_path) -> None:
    scene = clean_blender
    first, second = _setup(scene, weights_folder, tmp_path)
    scene.render.film_transparent = True
    full = _direct(scene, weights_folder, [(1, first), (2, second)])["combined"]
    render = scene.render
    render.use_border, render.use_crop_to_border = True, True
    render.border_min_x, render.border_max_x, render.border_min_y, render.border_max_y = 0.2, 0.7, 0.25, 0.9
    got = _render(scene, tmp_path / "border.exr")["Combined"]
    x0, x1, y0, y1 = int(0.2 * W), int(0.7 * W), int(0.25 * H), int(0.9 * H)
    _close(got, full[H - y1:H - y0, x0:x1])
    assert got[..., 3].min() == 0.0 and got[..., 3].max() > 0.5  # transparent film: no background


def test_save_reload_and_animation_frames(clean_blender, weights_folder, tmp_path) -> None:
    scene = clean_blender
    first, second = _setup(scene, weights_folder, tmp_path)
    before = _render(scene, tmp_path / "before.exr")["Combined"]
    blend = tmp_path / "scene.blend"
    bpy.ops.wm.save_as_mainfile(filepath=str(blend))
    bpy.ops.wm.open_mainfile(filepath=str(blend))
    scene = bpy.context.scene
    after = _render(scene, tmp_path / "after.exr")["Combined"]
    np.testing.assert_array_equal(after, before)

    cam = scene.camera
    for frame, x in ((1, 1.9), (3, 1.2), (5, 0.4)):
        cam.location.x = x
        cam.keyframe_insert("location", index=0, frame=frame)
    scene.frame_start, scene.frame_end, scene.frame_step = 1, 5, 2
    scene.render.filepath = str(tmp_path / "anim_")
    bpy.ops.render.render(animation=True)
    objects = [(1, scene.objects["First"]), (2, scene.objects["Second"])]
    images = []
    for frame in (1, 3, 5):
        images.append(_read_passes(tmp_path / f"anim_{frame:04d}.exr")["Combined"])
        scene.frame_set(frame)
        _close(images[-1], _direct(scene, weights_folder, objects)["combined"])
    assert all(np.abs(a - b).max() > 0.01 for i, a in enumerate(images) for b in images[i + 1:])


def test_collection_instances_and_hidden_objects(clean_blender, weights_folder, tmp_path) -> None:
    scene = clean_blender
    first, second = _setup(scene, weights_folder, tmp_path)
    second.hide_render = True
    group = bpy.data.collections.new("Props")
    scene.collection.children.link(group)
    scene.collection.objects.unlink(first)
    group.objects.link(first)
    instance = bpy.data.objects.new("Instance", None)
    instance.instance_type, instance.instance_collection = "COLLECTION", group
    instance.location, instance.rotation_euler = (-0.2, 0.45, 0.1), (0.0, 0.0, 1.0)
    scene.collection.objects.link(instance)
    bpy.context.view_layer.update()
    got = _render(scene, tmp_path / "instances.exr")["Combined"]
    pipeline = NearPipeline.from_pretrained(weights_folder, "cpu")
    envmap = EnvMap.read(blender_hdri("forest"), rotation_z=ROTATION, strength=STRENGTH)
    matrices = [np.array(first.matrix_world), np.array(instance.matrix_world) @ np.array(first.matrix_world)]
    want = pipeline.render(Scene([(make_asset(1), m) for m in matrices], envmap, _scene_camera(scene)))
    _close(got, want["combined"])


# ------------------------------------------------------------------------------------------------------- bad input


def test_missing_world_image_is_a_clear_error_and_changes_nothing(clean_blender, weights_folder, tmp_path) -> None:
    scene = clean_blender
    copy = tmp_path / "forest_copy.exr"
    copy.write_bytes(blender_hdri("forest").read_bytes())
    _setup(scene, weights_folder, tmp_path)
    scene.world = None
    _world(scene, path=copy)
    copy.unlink()
    bpy.data.images[copy.name].reload()
    counts = _datablock_counts()
    with pytest.raises(RuntimeError, match="forest_copy.exr.*could not be loaded"):
        bpy.ops.render.render(write_still=True)
    assert _datablock_counts() == counts and not Path(scene.render.filepath).exists()


def test_latent_that_does_not_fit_the_weights_is_a_clear_error(clean_blender, weights_folder, tmp_path) -> None:
    scene = clean_blender
    _setup(scene, weights_folder, tmp_path)
    asset_to_object(make_asset(3, channels=16), "Wide", scene.collection)
    counts = _datablock_counts()
    with pytest.raises(RuntimeError, match="16 latent channels.*expect 8"):
        bpy.ops.render.render(write_still=True)
    assert _datablock_counts() == counts


def test_missing_weights_are_a_clear_error_and_unset_weights_use_near_tiny(clean_blender, tmp_path) -> None:
    scene = clean_blender
    _setup(scene, tmp_path / "nowhere", tmp_path)
    with pytest.raises(RuntimeError, match="weights folder not found"):
        bpy.ops.render.render()
    scene.near.weights_folder = ""  # nothing chosen: the near-tiny weights that ship with near_engine
    assert runtime.weights_folder(scene) == bundled.weights_folder("near-tiny")
    assert bpy.ops.render.render() == {"FINISHED"}
    assert runtime.pipeline(scene).weights_id.startswith(str(bundled.BUNDLED_WEIGHTS["near-tiny"]))


def test_loading_weights_is_said_only_when_weights_load(clean_blender, weights_folder, tmp_path, capfd) -> None:
    """Background Blender prints the status line: "Loading weights" on the first frame, not on every frame."""
    scene = clean_blender
    _setup(scene, weights_folder, tmp_path)
    runtime.release()
    scene.frame_start, scene.frame_end = 1, 2
    scene.render.filepath = str(tmp_path / "status_")
    capfd.readouterr()
    bpy.ops.render.render(animation=True)
    out = capfd.readouterr().out
    assert out.count("NeAR | Loading weights") == 1 and out.count("NeAR | Rendering 2 object(s)") == 2, out[-3000:]


# ------------------------------------------------------------------------------------------------------- operators


def test_import_round_trips_and_a_corrupt_file_imports_nothing(clean_blender, tmp_path) -> None:
    good, other = make_asset(4), make_asset(5, voxels=120)
    write_asset(tmp_path / "good.near", good)
    write_asset(tmp_path / "other.near", other)
    bpy.ops.import_scene.near_asset(filepath=str(tmp_path / "good.near"))
    obj = bpy.context.active_object
    assert obj.name == "good" and obj.near.is_near and len(obj.data.vertices) == good.num_voxels
    assert object_to_asset(obj).fingerprint() == good.fingerprint()

    (tmp_path / "bad.near").write_bytes((tmp_path / "good.near").read_bytes()[:200])
    counts = _datablock_counts()
    with pytest.raises(RuntimeError, match="bad.near"):
        bpy.ops.import_scene.near_asset(directory=str(tmp_path), files=[{"name": "other.near"}, {"name": "bad.near"}])
    assert _datablock_counts() == counts
    bpy.ops.import_scene.near_asset(directory=str(tmp_path), files=[{"name": "other.near"}])
    assert object_to_asset(bpy.data.objects["other"]).fingerprint() == other.fingerprint()


def test_moved_vertices_are_reported(clean_blender, weights_folder, tmp_path) -> None:
    scene = clean_blender
    first, _ = _setup(scene, weights_folder, tmp_path)
    first.data.vertices[0].co.x += 0.004
    with pytest.raises(RuntimeError, match="no longer on the 64\\^3 voxel grid"):
        bpy.ops.render.render()


def test_export_relit_gaussians_as_ply(clean_blender, weights_folder, tmp_path) -> None:
    scene = clean_blender
    first, second = _setup(scene, weights_folder, tmp_path)
    for obj in scene.objects:
        obj.select_set(obj is first)
    bpy.ops.export_scene.near_ply(filepath=str(tmp_path / "relit.ply"))
    vertices = PlyData.read(str(tmp_path / "relit.ply"))["vertex"]
    gaussians_per_voxel = 4  # near-tiny
    assert vertices.count == make_asset(1).num_voxels * gaussians_per_voxel
    xyz = np.stack([vertices["x"], vertices["y"], vertices["z"]], 1)
    assert np.isfinite(xyz).all()
    centre = np.array(first.matrix_world)[:3, 3]
    assert np.abs(np.median(xyz, 0) - centre).max() < 0.3  # in the world, where the object is
    # Colours: sRGB-encoded by default (what splat viewers display), scene-linear on request, the same Gaussians.
    bpy.ops.export_scene.near_ply(filepath=str(tmp_path / "linear.ply"), color_space="LINEAR")
    linear_vertices = PlyData.read(str(tmp_path / "linear.ply"))["vertex"]
    shown, linear = ([0.5 + SH_C0 * np.asarray(v[f"f_dc_{i}"], np.float64) for i in range(3)]
                     for v in (vertices, linear_vertices))
    for srgb, lin in zip(shown, linear):
        lin = lin.clip(0.0, 1.0)
        np.testing.assert_allclose(srgb, np.where(lin <= 0.0031308, 12.92 * lin, 1.055 * lin ** (1 / 2.4) - 0.055),
                                   atol=1e-5)
    for obj in scene.objects:
        obj.select_set(False)
    with pytest.raises(RuntimeError, match="no NeAR objects to export"):
        bpy.ops.export_scene.near_ply(filepath=str(tmp_path / "none.ply"))


# -------------------------------------------------------------------------------------------------------- viewport


def test_viewport_state_follows_depsgraph_updates(clean_blender, weights_folder, tmp_path) -> None:
    """What view_update reads: objects and world at first, then only what a depsgraph update touched."""
    scene = clean_blender
    first, second = _setup(scene, weights_folder, tmp_path)
    states = []

    def handler(scene_, depsgraph):
        states.append(ViewState.read(depsgraph, states[-1] if states else None))

    state = ViewState.read(bpy.context.evaluated_depsgraph_get(), None)
    states.append(state)
    assert len(state.objects) == 2 and state.world.envmap.strength == pytest.approx(STRENGTH)
    assert state.weights.folder == str(weights_folder.resolve()) and state.error is None
    bpy.app.handlers.depsgraph_update_post.append(handler)
    try:
        scene.world.node_tree.nodes["Background"].inputs["Strength"].default_value = 4.0
        bpy.context.view_layer.update()
        assert state.world.envmap.strength == pytest.approx(4.0)
        first.data.attributes["near_latent_00"].data[0].value = 9.0
        first.data.update()
        bpy.context.view_layer.update()
        assets = {a.fingerprint() for a, _ in state.objects}
        assert make_asset(1).fingerprint() not in assets and make_asset(2).fingerprint() in assets
    finally:
        bpy.app.handlers.depsgraph_update_post.remove(handler)
    # What the viewport thread renders from that state is the pipeline's image of the same scene.
    camera = _scene_camera(scene)
    view_scene = Scene(state.objects, state.world.envmap, camera, False)
    want = NearPipeline.from_pretrained(weights_folder, "cpu").render(view_scene)["combined"]
    np.testing.assert_array_equal(_render_view(state, view_scene), want)


# ------------------------------------------------------------------------------------------------- command line


def test_command_line_animation_render_exits_cleanly(clean_blender, weights_folder, tmp_path) -> None:
    """As a render farm runs it (`blender -b file.blend -a`): render, exit 0, no threads left behind."""
    scene = clean_blender
    _setup(scene, weights_folder, tmp_path)
    scene.frame_start, scene.frame_end = 1, 2
    scene.render.filepath = str(tmp_path / "farm_")
    blend = tmp_path / "farm.blend"
    bpy.ops.wm.save_as_mainfile(filepath=str(blend))
    script = textwrap.dedent(f"""
        import sys, threading
        sys.path.insert(0, {str(Path(near_blender.__file__).parents[1])!r})
        import bpy, near_blender
        near_blender.register()
        bpy.ops.wm.open_mainfile(filepath={str(blend)!r})
        bpy.ops.render.render(animation=True)
        print("THREADS", sorted(t.name for t in threading.enumerate()))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "THREADS ['MainThread']" in done.stdout
    assert (tmp_path / "farm_0001.exr").exists() and (tmp_path / "farm_0002.exr").exists()


def test_resolution_percentage_rounds_as_blender_does(clean_blender, weights_folder, tmp_path) -> None:
    """100 px at 29 % is 29 px in Blender's integer arithmetic (a float product gives 28): the render must fit."""
    scene = clean_blender
    _setup(scene, weights_folder, tmp_path)
    scene.render.resolution_x, scene.render.resolution_y, scene.render.resolution_percentage = 100, 57, 29
    got = _render(scene, tmp_path / "percent.exr")["Combined"]
    assert got.shape == (57 * 29 // 100, 29, 4) and np.isfinite(got).all()


def test_viewport_bakes_a_procedural_world_without_waiting(clean_blender, weights_folder, tmp_path) -> None:
    """A World that needs a Cycles bake: reading the viewport state returns at once (black light meanwhile), the
    bake runs on its own thread, and applying its result lights the viewport with the baked map."""
    scene = clean_blender
    _setup(scene, weights_folder, tmp_path)
    nodes, links = scene.world.node_tree.nodes, scene.world.node_tree.links
    noise = nodes.new("ShaderNodeTexNoise")
    links.new(noise.outputs["Color"], nodes["Background"].inputs["Color"])
    redraws = []
    state = ViewState(lambda: redraws.append(1))
    state = ViewState.read(bpy.context.evaluated_depsgraph_get(), state)
    assert state.baking and np.all(state.world.envmap.pixels == 0) and len(state.objects) == 2
    state.wait_for_bakes(timeout=120)
    assert not state.baking and redraws
    assert state.apply_bakes(bpy.context.evaluated_depsgraph_get())
    baked = state.world.envmap.pixels
    assert baked.shape[0] > 8 and baked.std() > 0.01 and state.world_error is None
    assert not state.apply_bakes(bpy.context.evaluated_depsgraph_get())  # nothing new
