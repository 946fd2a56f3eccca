"""Image as NeAR Object and Lift Image onto Mesh: the operators' blocking path (scripts), the job the modal operator
polls (status, cancel, success), the drop handler, and the failures, which are ERROR reports that change nothing.

A modal operator needs a window, which the bpy module has not: `_Modal` runs the lift operators' own modal code
(`_run_modal`, then `modal` on each timer tick or key) against a stand-in window manager that records the timer, the
progress and the status bar, on the real Blender data; the modal code is a thin layer over `LiftJob` (`step` on each
tick, `cancel` on Esc, `finish` at the end).

The weights are near-tiny with its lift networks made by `init_from_encoder` (the regressor at step 0, the shipped
mesh encoder run on the photo): plumbing for these tests, not a trained lift. The geometry is "inflate" or a mesh,
which need no geometry model.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import bpy
import numpy as np
import pytest
from PIL import Image

from near_blender.lift import LiftJob
from near_blender.operators import IMAGE_EXTENSIONS, _LiftOperator
from near_engine.bundled import weights_folder
from near_engine.checkpoints import read_model_entry
from near_engine.configs import ENCODER_KEYS, load_networks
from near_engine.frame import DEFAULT_MATERIAL
from near_engine.lift import LiftCancelled
from near_engine.lift.regressor import LIFT_KEYS, init_from_encoder
from near_engine.train.lift import export_lift

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="session")
def lift_weights(tmp_path_factory) -> str:
    """near-tiny plus lift networks at their starting point, written as `near train-lift` writes its weights."""
    base = Path(weights_folder("near-tiny"))
    encoders, _ = load_networks(base, "cpu", keys=ENCODER_KEYS)
    args = read_model_entry("encoder", base / "encoder").args
    networks = init_from_encoder(encoders["image_features"], encoders["encoder"], args, DEFAULT_MATERIAL)
    folder = tmp_path_factory.mktemp("weights") / "near-tiny-lift-init"
    export_lift(folder, base, networks, args, {"test": "init_from_encoder, untrained"})
    return str(folder)


@pytest.fixture(scope="session")
def renderer_only_weights(tmp_path_factory) -> str:
    """near-tiny without any lift network (what the bundled weights were before the lift was trained)."""
    folder = tmp_path_factory.mktemp("weights") / "near-tiny-no-lift"
    lift = LIFT_KEYS + ("occupancy",)
    shutil.copytree(weights_folder("near-tiny"), folder, ignore=shutil.ignore_patterns(*(f"{k}.*" for k in lift)))
    pipeline = json.loads((folder / "pipeline.json").read_text())
    pipeline["models"] = {k: v for k, v in pipeline["models"].items() if k not in lift}
    (folder / "pipeline.json").write_text(json.dumps(pipeline))
    return str(folder)


def _disc(size: int = 96) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size * 0.3) ** 2


@pytest.fixture(scope="session")
def photos(tmp_path_factory) -> SimpleNamespace:
    """An orange disc: a PNG with alpha, and a JPEG on a white backdrop (no alpha); and a corrupt PNG."""
    folder = tmp_path_factory.mktemp("photos")
    rgba = np.zeros((96, 96, 4), np.uint8)
    rgba[_disc()] = (220, 120, 40, 255)
    Image.fromarray(rgba).save(folder / "disc.png")
    rgb = np.full((96, 96, 3), 255, np.uint8)
    rgb[_disc()] = (220, 120, 40)
    Image.fromarray(rgb).save(folder / "disc.jpg", quality=95)
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image" * 10)
    return SimpleNamespace(png=str(folder / "disc.png"), jpg=str(folder / "disc.jpg"),
                           corrupt=str(folder / "corrupt.png"))


def _user_data() -> dict[str, int]:
    return {name: len(getattr(bpy.data, name)) for name in ("objects", "meshes", "materials", "images")}


def _world_voxels(obj: bpy.types.Object) -> np.ndarray:
    """The voxel centres [N, 3] in world space."""
    local = np.empty(len(obj.data.vertices) * 3, np.float32)
    obj.data.vertices.foreach_get("co", local)
    m = np.array(obj.matrix_world, dtype=np.float64)
    return local.reshape(-1, 3) @ m[:3, :3].T + m[:3, 3]


class _Window:
    """What the modal operator uses of the window manager and the workspace: a timer, the progress, the status bar."""

    def __init__(self) -> None:
        self.timers, self.progress, self.status = 0, None, []

    def event_timer_add(self, step: float, window=None) -> str:
        self.timers += 1
        return "timer"

    def event_timer_remove(self, timer: str) -> None:
        self.timers -= 1

    def modal_handler_add(self, operator) -> None:
        pass

    def progress_begin(self, low: int, high: int) -> None:
        self.progress = low

    def progress_update(self, value: int) -> None:
        self.progress = value

    def progress_end(self) -> None:
        self.progress = None

    def status_text_set(self, text: str | None) -> None:
        self.status.append(text)


class _Context:
    """bpy.context with `_Window` as its window manager and workspace."""

    def __init__(self, ui: _Window) -> None:
        self.window_manager = self.workspace = ui
        self.window = None

    def __getattr__(self, name: str):
        return getattr(bpy.context, name)


class _Modal(_LiftOperator):
    """The lift operators' modal half, without Blender's operator machinery; reports are kept."""

    def __init__(self) -> None:
        self.reports = []

    def report(self, kinds: set[str], message: str) -> None:
        self.reports.append((next(iter(kinds)), message))


def _poll(operator: _Modal, context: _Context, timeout: float = 240) -> set[str]:
    """Timer ticks until the modal operator ends; its result."""
    deadline = time.monotonic() + timeout
    while (result := operator.modal(context, SimpleNamespace(type="TIMER"))) == {"PASS_THROUGH"}:
        assert operator.modal(context, SimpleNamespace(type="MOUSEMOVE")) == {"PASS_THROUGH"}  # Blender stays usable
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return result


@pytest.fixture
def cube(clean_blender) -> bpy.types.Object:
    """A 2 m cube made 4 x 1 x 0.5 m by its scale and an Array modifier (the modifier doubles it along X), selected
    and active."""
    bpy.ops.mesh.primitive_cube_add(size=2.0, location=(3.0, 1.0, 0.5))
    obj = bpy.context.active_object
    obj.scale = (1.0, 0.5, 0.25)
    array = obj.modifiers.new("Array", "ARRAY")
    array.count = 2
    bpy.context.view_layer.update()
    return obj


def test_an_image_with_alpha_becomes_one_near_object_standing_on_the_cursor(cube, lift_weights, photos, capfd):
    scene = bpy.context.scene
    scene.cursor.location = (1.5, -2.0, 0.75)
    before = _user_data()
    names = set(bpy.data.objects.keys())
    result = bpy.ops.import_scene.near_image(filepath=photos.png, geometry="INFLATE", weights=lift_weights)
    assert result == {"FINISHED"}
    assert _user_data() == {**before, "objects": before["objects"] + 1, "meshes": before["meshes"] + 1}
    (name,) = set(bpy.data.objects.keys()) - names
    obj = bpy.data.objects[name]
    assert obj.near.is_near and name == "disc" and "geometry:inflate" in obj.near.source
    voxels = _world_voxels(obj)
    half_voxel = 0.5 / obj.near.resolution * obj.scale.z
    assert voxels[:, 2].min() - half_voxel == pytest.approx(0.75, abs=1e-5)  # standing on the cursor
    assert tuple(obj.location.xy) == pytest.approx((1.5, -2.0))
    assert voxels[:, 2].min() > 0.75 and voxels[:, 2].max() < 0.75 + 1.0  # inside the unit cube above it
    assert bpy.context.active_object is obj and list(bpy.context.selected_objects) == [obj]
    assert not cube.select_get() and not cube.hide_get()
    assert f"'disc': {len(voxels)} voxels (geometry: inflate)" in capfd.readouterr().out  # the INFO report


def test_a_dropped_image_goes_to_the_import_operator(clean_blender, lift_weights, photos):
    handler = bpy.types.NEAR_FH_image
    assert set(handler.bl_file_extensions.split(";")) == set(IMAGE_EXTENSIONS) == {".png", ".jpg", ".jpeg", ".exr"}
    assert handler.poll_drop(SimpleNamespace(area=SimpleNamespace(type="VIEW_3D")))
    assert not handler.poll_drop(SimpleNamespace(area=SimpleNamespace(type="IMAGE_EDITOR")))
    assert not handler.poll_drop(SimpleNamespace(area=None))
    group, name = handler.bl_import_operator.split(".")
    operator = getattr(getattr(bpy.ops, group), name)
    assert operator.get_rna_type().name == "Import Image as NeAR Object"
    # Blender invokes it with the dropped file set; the dialog's OK runs execute, as here.
    assert operator(filepath=photos.jpg, geometry="INFLATE", weights=lift_weights) == {"FINISHED"}
    obj = bpy.context.active_object
    assert obj.near.is_near and obj.name == "disc" and len(obj.data.vertices) > 0


def test_lift_onto_mesh_takes_the_evaluated_mesh_and_its_place(cube, lift_weights, photos):
    scene = bpy.context.scene
    before = _user_data()
    job = LiftJob.for_mesh(bpy.context, cube, photos.png, lift_weights, rotation_deg=30.0, elevation_deg=10.0,
                           at_cursor=False).start()
    operator, ui = _Modal(), _Window()
    context = _Context(ui)
    assert operator._run_modal(context, job) == {"RUNNING_MODAL"} and ui.timers == 1
    assert _user_data() == before  # nothing is made while it runs...
    assert _poll(operator, context) == {"FINISHED"}
    assert ui.timers == 0 and ui.progress is None and ui.status[-1] is None  # ...and the status bar is given back
    statuses = ui.status[:-1]
    assert all(s.startswith("NeAR: lifting 'disc.png' (mesh): ") and s.endswith("| Esc to cancel") for s in statuses)
    assert any("sampling the latent, 70%" in s for s in statuses)
    (kind, message), = operator.reports
    obj = bpy.context.active_object
    assert _user_data() == {**before, "objects": before["objects"] + 1, "meshes": before["meshes"] + 1}
    assert obj.near.is_near and obj.name == "Cube NeAR" and "geometry:mesh" in obj.near.source
    voxels = _world_voxels(obj)
    assert kind == "INFO" and message.startswith(f"'Cube NeAR': {len(voxels)} voxels (geometry: mesh)")
    assert len(voxels) > 0
    # The voxels are the arrayed cube's (modifier applied), in its place: x 2..6, y 0.5..1.5, z 0.25..0.75, turned
    # 30 degrees for the lift and back. Centres lie within a voxel of the surface; one voxel spans the turned box's
    # largest side (4 cos 30 + 1 sin 30 m) / 64.
    voxel = (4 * math.cos(math.radians(30)) + math.sin(math.radians(30))) / 64
    np.testing.assert_allclose(voxels.min(0), [2.0, 0.5, 0.25], atol=voxel)
    np.testing.assert_allclose(voxels.max(0), [6.0, 1.5, 0.75], atol=voxel)
    assert cube.hide_get() and cube.hide_render and "the mesh 'Cube' is hidden" in message
    assert list(bpy.context.selected_objects) == [obj]
    assert scene.objects["Cube"].data.vertices[0].co.length == pytest.approx(math.sqrt(3))  # the mesh is untouched


def test_lift_onto_mesh_at_the_cursor_leaves_the_mesh(cube, lift_weights, photos):
    bpy.context.scene.cursor.location = (-4.0, 0.0, 2.0)
    result = bpy.ops.object.near_lift_image(filepath=photos.png, weights=lift_weights, at_cursor=True)
    assert result == {"FINISHED"}
    obj = bpy.context.active_object
    assert obj.near.is_near and obj is not cube and not cube.hide_get() and not cube.select_get()
    voxels = _world_voxels(obj)
    assert voxels[:, 2].min() - 0.5 / obj.near.resolution == pytest.approx(2.0, abs=1e-5)
    assert voxels[:, 0].max() - voxels[:, 0].min() == pytest.approx(1.0 - 1 / 64, abs=1e-5)  # unit size, X largest


@pytest.mark.parametrize("operator, case, expected", [
    ("import_scene.near_image", "corrupt", "corrupt.png: not an image this reads"),
    ("import_scene.near_image", "no lift", "these weights cannot lift a photo"),
    ("object.near_lift_image", "no lift", "these weights cannot lift a photo"),
    ("import_scene.near_image", "trellis", "TRELLIS.*TRELLIS-image-large weights"),
    ("import_scene.near_image", "no folder", "not a weights folder"),
    ("object.near_lift_image", "no image", "No image chosen"),
])
def test_a_failed_lift_is_an_error_report_and_changes_nothing(cube, lift_weights, renderer_only_weights, photos,
                                                              tmp_path, operator, case, expected):
    options = {"filepath": photos.png, "weights": lift_weights}
    if case == "corrupt":
        options["filepath"] = photos.corrupt
    elif case == "no lift":
        options["weights"] = renderer_only_weights
    elif case == "trellis":
        options["geometry"] = "TRELLIS"
    elif case == "no folder":
        options["weights"] = str(tmp_path / "missing")
    elif case == "no image":
        del options["filepath"]
    if operator == "import_scene.near_image" and case != "trellis":
        options["geometry"] = "INFLATE"
    before = _user_data()
    group, name = operator.split(".")
    with pytest.raises(RuntimeError, match=r"^Error: .*" + expected):  # bpy.ops raises on an ERROR report
        getattr(getattr(bpy.ops, group), name)(**options)
    assert _user_data() == before
    assert bpy.context.active_object is cube and list(bpy.context.selected_objects) == [cube]
    assert not cube.hide_get()


def test_lift_onto_mesh_needs_a_mesh(clean_blender, lift_weights, photos):
    assert not bpy.ops.object.near_lift_image.poll()  # nothing active
    with pytest.raises(RuntimeError, match="Select a mesh object"):
        bpy.ops.object.near_lift_image(filepath=photos.png, weights=lift_weights)
    bpy.ops.object.empty_add()
    assert not bpy.ops.object.near_lift_image.poll()
    assert bpy.ops.import_scene.near_image(filepath=photos.png, geometry="INFLATE", weights=lift_weights) == \
        {"FINISHED"}
    assert bpy.context.active_object.near.is_near and not bpy.ops.object.near_lift_image.poll()  # not onto a NeAR
    bpy.ops.mesh.primitive_cube_add()
    assert bpy.ops.object.near_lift_image.poll()


@pytest.mark.parametrize("when", ["Esc at once", "Esc while sampling", "Blender ends the operator"])
def test_cancel_stops_the_lift_and_changes_nothing(cube, lift_weights, photos, when):
    before = _user_data()
    job = LiftJob.for_image(bpy.context, photos.png, lift_weights, "inflate", 0.0).start()
    operator, ui = _Modal(), _Window()
    context = _Context(ui)
    operator._run_modal(context, job)
    if when == "Esc while sampling":
        deadline = time.monotonic() + 120
        while "sampling the" not in ui.status[-1]:  # the networks are loaded and the image prepared
            assert operator.modal(context, SimpleNamespace(type="TIMER")) == {"PASS_THROUGH"}
            assert time.monotonic() < deadline
            time.sleep(0.02)
    if when == "Blender ends the operator":  # the file is closed or Blender quits: wait for the thread
        operator.cancel(context)
        assert not job._thread.is_alive() and operator.reports == []
    else:
        assert operator.modal(context, SimpleNamespace(type="ESC")) == {"CANCELLED"}
        assert operator.reports == [("INFO", "Lifting 'disc.png' cancelled")]
    assert ui.timers == 0 and ui.progress is None and ui.status[-1] is None
    with pytest.raises(LiftCancelled):  # the thread stops at its next stage and its result is dropped
        job.wait(120)
    assert not job._thread.is_alive()
    with pytest.raises(LiftCancelled):
        job.finish(bpy.context)
    assert _user_data() == before
    assert bpy.context.active_object is cube and list(bpy.context.selected_objects) == [cube]


def test_a_failure_while_polling_is_an_error_report_and_changes_nothing(cube, lift_weights, photos):
    before = _user_data()
    operator, ui = _Modal(), _Window()
    context = _Context(ui)
    operator.cancel(context)  # the file browser was closed before any lift: nothing to stop
    operator._run_modal(context, LiftJob.for_image(bpy.context, photos.corrupt, lift_weights, "inflate", 0.0).start())
    assert _poll(operator, context) == {"CANCELLED"}
    (kind, message), = operator.reports
    assert kind == "ERROR" and "corrupt.png: not an image this reads" in message
    assert ui.timers == 0 and ui.status[-1] is None
    assert _user_data() == before and list(bpy.context.selected_objects) == [cube]


class _Layout:
    def __init__(self) -> None:
        self.items = []

    def operator(self, idname: str, text: str = "") -> None:
        self.items.append((idname, text))

    def separator(self) -> None:
        pass


def _menu(menu: type, context) -> list[tuple[str, str]]:
    """The entries the add-on's draw functions append to `menu`."""
    layout = _Layout()
    for draw in menu._dyn_ui_initialize():
        if draw.__module__ == "near_blender.operators":
            draw(SimpleNamespace(layout=layout), context)
    return layout.items


def test_the_menus_offer_the_lift_operators(clean_blender):
    assert ("import_scene.near_image", "Image as NeAR Object") in _menu(bpy.types.TOPBAR_MT_file_import, bpy.context)
    assert ("object.near_lift_image", "NeAR Object from Image...") in _menu(bpy.types.VIEW3D_MT_object_convert,
                                                                            bpy.context)
    assert _menu(bpy.types.VIEW3D_MT_object_context_menu, bpy.context) == []  # no mesh to lift onto
    bpy.ops.mesh.primitive_cube_add()
    assert _menu(bpy.types.VIEW3D_MT_object_context_menu, bpy.context) == [
        ("object.near_lift_image", "Lift Image onto Mesh (NeAR)...")]


def test_register_and_unregister_the_lift_operators(clean_blender, lift_weights, photos):
    assert "NEAR_FH_image" in dir(bpy.types) and "OBJECT_OT_near_lift_image" in dir(bpy.types)
    assert "IMPORT_SCENE_OT_near_image" in dir(bpy.types)
    import near_blender

    job = LiftJob.for_image(bpy.context, photos.png, lift_weights, "inflate", 0.0).start()
    near_blender.unregister()  # stops the lift still running
    assert not job._thread.is_alive()
    with pytest.raises(LiftCancelled):
        job.step()
    assert not {"NEAR_FH_image", "OBJECT_OT_near_lift_image", "IMPORT_SCENE_OT_near_image"} & set(dir(bpy.types))
    assert _menu(bpy.types.TOPBAR_MT_file_import, bpy.context) == []
    assert _menu(bpy.types.VIEW3D_MT_object_convert, bpy.context) == []
    near_blender.register()  # the fixture unregisters again
