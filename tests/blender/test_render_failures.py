"""Failures a render farm must see, scene content NeAR leaves out, and an add-on that unregisters cleanly.

A final render that fails must end as a failed render (an engine error), never as a saved frame: Blender sets its
break flag when a render engine reports an ERROR, then writes no file, stops an animation, and a background Blender
(`blender -b file.blend -a`) exits with status 1. These tests drive the bpy module the way such a farm does.
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import bpy
import pytest
from conftest import make_asset

import near_blender
from near_blender.objects import asset_to_object, latent_attribute
from near_blender.scene import describe, render_camera
from near_engine.pipeline import NearPipeline

pytestmark = pytest.mark.timeout(300)

ROOT = Path(near_blender.__file__).resolve().parents[1]


def _scene(scene: bpy.types.Scene, weights_folder: Path, tmp_path: Path) -> bpy.types.Object:
    """A grey World, a camera looking at one NeAR object, 32x24 px, EXR output into tmp_path."""
    scene.render.engine = "NEAR"
    scene.render.resolution_x, scene.render.resolution_y, scene.render.resolution_percentage = 32, 24, 100
    scene.near.weights_folder = str(weights_folder)
    world = bpy.data.worlds.new("Grey")
    world.use_nodes = True
    world.node_tree.nodes["Background"].inputs["Color"].default_value = (0.5, 0.5, 0.5, 1.0)
    scene.world = world
    camera = bpy.data.objects.new("Camera", bpy.data.cameras.new("Camera"))
    camera.location, camera.rotation_euler = (0.0, -2.0, 0.0), (math.pi / 2, 0.0, 0.0)
    scene.collection.objects.link(camera)
    scene.camera = camera
    scene.render.image_settings.file_format = "OPEN_EXR"
    scene.render.filepath = str(tmp_path / "frame_")
    scene.frame_start, scene.frame_end = 1, 3
    return asset_to_object(make_asset(1), "Blob", scene.collection)


def _break_latent(obj: bpy.types.Object) -> None:
    """The issue's repro: the last latent attribute renamed to something that looks like an extra latent."""
    obj.data.attributes[latent_attribute(7)].name = "near_x.foo"


def _user_data() -> dict[str, int]:
    return {name: len(getattr(bpy.data, name)) for name in ("objects", "meshes", "worlds", "cameras", "materials")}


def test_a_renamed_latent_attribute_is_a_clear_error_and_writes_nothing(clean_blender, weights_folder, tmp_path):
    scene = clean_blender
    obj = _scene(scene, weights_folder, tmp_path)
    _break_latent(obj)
    before = _user_data()
    scene.render.filepath = str(tmp_path / "still.exr")
    with pytest.raises(RuntimeError, match=r"'Blob'.*'near_x\.foo' is not an extra latent column"):
        bpy.ops.render.render(write_still=True)
    assert not (tmp_path / "still.exr").exists()
    assert _user_data() == before and "near_x.foo" in obj.data.attributes  # the .blend is as it was


def test_an_unexpected_error_fails_the_render_and_stops_the_animation(clean_blender, weights_folder, tmp_path,
                                                                      monkeypatch):
    """A defect inside the engine (here injected into frame 2) is a failed render: frame 1 is saved, frame 2 is not
    and the animation stops there, instead of saving blank frames and going on."""
    scene = clean_blender
    _scene(scene, weights_folder, tmp_path)
    real_render = NearPipeline.render

    def fails_on_frame_2(self, *args, **kwargs):
        if bpy.context.scene.frame_current == 2:
            raise ZeroDivisionError("injected defect")
        return real_render(self, *args, **kwargs)

    monkeypatch.setattr(NearPipeline, "render", fails_on_frame_2)
    with pytest.raises(RuntimeError, match="render failed .ZeroDivisionError: injected defect"):
        bpy.ops.render.render(animation=True)
    written = sorted(p.name for p in tmp_path.glob("frame_*"))
    assert written == ["frame_0001.exr"], written
    monkeypatch.undo()
    assert bpy.ops.render.render(animation=True) == {"FINISHED"}  # the engine is not left broken
    assert len(list(tmp_path.glob("frame_*"))) == 3


def test_a_farm_render_of_a_broken_file_exits_non_zero_without_frames(clean_blender, weights_folder, tmp_path):
    """`blender -b file.blend -a` as the bpy module runs it: a failed frame is an exception, so the job exits 1."""
    scene = clean_blender
    obj = _scene(scene, weights_folder, tmp_path)
    _break_latent(obj)
    blend = tmp_path / "broken.blend"
    bpy.ops.wm.save_as_mainfile(filepath=str(blend))
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        import bpy, near_blender
        near_blender.register()
        bpy.ops.wm.open_mainfile(filepath={str(blend)!r})
        bpy.ops.render.render(animation=True)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "near_x.foo" in done.stderr
    assert not list(tmp_path.glob("frame_*"))


def test_meshes_and_lamps_that_near_does_not_render_are_named_once(clean_blender, weights_folder, tmp_path, capfd):
    scene = clean_blender
    _scene(scene, weights_folder, tmp_path)
    bpy.ops.mesh.primitive_plane_add(size=4.0, location=(0.0, 0.0, -0.6))
    bpy.context.active_object.name = "Ground"
    sun = bpy.data.objects.new("Sun", bpy.data.lights.new("Sun", "SUN"))
    scene.collection.objects.link(sun)
    hidden = bpy.data.objects.new("Hidden", bpy.data.lights.new("Hidden", "POINT"))
    scene.collection.objects.link(hidden)
    hidden.hide_render = hidden.hide_viewport = True  # left out of both the render's and this test's depsgraph
    bpy.context.view_layer.update()
    depsgraph = bpy.context.evaluated_depsgraph_get()
    engine_scene, warnings = describe(depsgraph, render_camera(depsgraph))
    assert len(engine_scene.objects) == 1
    (dropped,) = [message for message in warnings if "not rendered" in message]
    assert "'Ground' (mesh)" in dropped and "'Sun' (light)" in dropped
    assert "Blob" not in dropped and "Hidden" not in dropped and "Camera" not in dropped
    # The final render reports it (a warning: the render still finishes and writes its frame).
    scene.render.filepath = str(tmp_path / "warned.exr")
    assert bpy.ops.render.render(write_still=True) == {"FINISHED"}
    assert (tmp_path / "warned.exr").exists()
    assert capfd.readouterr().out.count("not rendered: 'Ground' (mesh)") == 1  # Blender prints reports: one warning
    for obj in (bpy.data.objects["Ground"], sun):
        obj.hide_render = obj.hide_viewport = True
    bpy.context.view_layer.update()
    depsgraph = bpy.context.evaluated_depsgraph_get()
    assert not [m for m in describe(depsgraph, render_camera(depsgraph))[1] if "not rendered" in m]


def test_unregister_is_idempotent() -> None:
    bpy.ops.wm.read_factory_settings(use_empty=True)
    near_blender.register()
    near_blender.register()  # a second register is a no-op, not a "already registered" error
    near_blender.unregister()
    near_blender.unregister()
    assert not hasattr(bpy.types.Scene, "near")
    near_blender.register()
    assert hasattr(bpy.types.Scene, "near")
    near_blender.unregister()


def test_a_script_that_exits_with_the_add_on_enabled_prints_no_unregister_error(tmp_path):
    """At exit both the add-on's own atexit hook (bpy module) and Blender's add-on shutdown unregister it: the second
    must do nothing. (test_extension_package checks the same with the installed extension.)"""
    script = textwrap.dedent(f"""
        import atexit, sys
        sys.path.insert(0, {str(ROOT)!r})
        import bpy, near_blender
        atexit.register(near_blender.unregister)  # as Blender's shutdown of enabled add-ons does
        near_blender.register()
        print("ENABLED", hasattr(bpy.types.Scene, "near"))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0 and "ENABLED True" in done.stdout, done.stderr[-2000:]
    assert "unregister" not in done.stderr and "bl_rna" not in done.stderr, done.stderr[-2000:]
