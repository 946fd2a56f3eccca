"""Convert to NeAR Object: the job the modal operator polls (status, cancel, success) and the operator's own errors.

A modal operator needs a window, which the bpy module has not; the operator is a thin layer over `ConvertJob`
(`step` on each timer tick, `cancel` on Esc, `finish` at the end), so these tests drive the job the same way.
"""

from __future__ import annotations

import time

import bpy
import numpy as np
import pytest

from near_blender.convert import ConvertJob
from near_engine.configs import random_weights, save_networks

pytestmark = pytest.mark.timeout(300)


def _user_data() -> dict[str, int]:
    return {name: len(getattr(bpy.data, name)) for name in ("objects", "meshes", "materials", "collections")}


@pytest.fixture
def cube_scene(clean_blender, tmp_path):
    scene = clean_blender
    weights = tmp_path / "near-tiny-train-random"
    save_networks(weights, random_weights("near-tiny-train", seed=5), "near-tiny-train", {"light_size": 64})
    scene.near.weights_folder = str(weights)
    bpy.ops.mesh.primitive_cube_add(size=2.0, location=(3.0, 1.0, 0.5))
    cube = bpy.context.active_object
    cube.scale = (1.0, 0.5, 0.25)
    bpy.context.view_layer.update()
    return scene, cube


def test_cancel_stops_the_encoder_and_changes_nothing(cube_scene):
    scene, cube = cube_scene
    before = _user_data()
    job = ConvertJob(scene, cube, views=2, size=24, samples=1, timeout=120)
    assert _user_data() == before  # the mesh was written out for the encoder and nothing kept
    assert not job.step() and job.folder.is_dir()
    assert job.status().startswith("NeAR: converting 'Cube': starting Blender") and "Esc to cancel" in job.status()
    job.cancel()  # Esc
    assert job.process._process.poll() is not None  # no encoder left running
    assert not job.folder.exists()
    assert _user_data() == before and not cube.hide_get() and not cube.hide_render


def test_the_polled_job_puts_the_near_object_in_place_and_hides_the_mesh(cube_scene):
    scene, cube = cube_scene
    before = _user_data()
    job = ConvertJob(scene, cube, views=2, size=24, samples=1, timeout=240)
    stages = set()
    deadline = time.monotonic() + 240
    while not job.step():  # what the modal operator does on each timer tick
        stages.add(job.stage_index())
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert stages and max(stages) >= 1  # the status moved on from "starting Blender"...
    assert job.stage_index() == 4 and "fitting the materials" in job.status()  # ...through every stage, Cycles between
    obj, message = job.finish(bpy.context)
    assert obj.near.is_near and bpy.context.active_object is obj and _user_data()["objects"] == before["objects"] + 1
    assert cube.hide_get() and cube.hide_render and "'Cube' is hidden" in message
    centres = np.array([np.array(obj.matrix_world) @ np.append(v.co, 1.0) for v in obj.data.vertices])[:, :3]
    voxel = 2.0 / 64  # the cube's largest side (2 m) spans the 64-voxel grid
    np.testing.assert_allclose(centres.min(0), [2.0, 0.5, 0.25], atol=voxel)
    np.testing.assert_allclose(centres.max(0), [4.0, 1.5, 0.75], atol=voxel)
    assert not job.folder.exists()


def test_the_operator_reports_a_missing_weights_folder_and_changes_nothing(cube_scene, tmp_path):
    scene, cube = cube_scene
    scene.near.weights_folder = str(tmp_path / "missing")
    before = _user_data()
    with pytest.raises(RuntimeError, match="weights folder not found"):
        bpy.ops.object.near_convert_mesh(views=2, size=24, samples=1)
    assert _user_data() == before and not cube.hide_get()
