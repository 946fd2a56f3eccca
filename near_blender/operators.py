"""Operators: import a .near asset (menu and drag and drop), export the relit Gaussians as a 3DGS PLY, convert a
mesh object into a NeAR object (`convert.ConvertJob`), lift a photo into a NeAR object, alone (menu and drag and
drop) or onto a mesh object's voxels (`lift.LiftJob`).

Every failure is an operator report; nothing in the .blend changes when an operator fails.
"""

from __future__ import annotations

import math
from pathlib import Path

import bpy
import numpy as np
from bpy.props import BoolProperty, CollectionProperty, EnumProperty, FloatProperty, IntProperty, StringProperty
from bpy_extras.io_utils import ExportHelper, ImportHelper

from near_engine.asset import read_asset
from near_engine.errors import NearError

from . import runtime
from .convert import STAGES, ConvertJob
from .lift import LiftJob, stop_all
from .objects import asset_to_object, is_near_object
from .scene import AssetCache, render_camera, world_light


class NEAR_OT_import_asset(bpy.types.Operator, ImportHelper):
    """Import NeAR assets (.near) as NeAR objects at the 3D cursor"""

    bl_idname = "import_scene.near_asset"
    bl_label = "Import NeAR Asset"
    bl_options = {"REGISTER", "UNDO", "PRESET"}

    filename_ext = ".near"
    filter_glob: StringProperty(default="*.near", options={"HIDDEN"})
    files: CollectionProperty(type=bpy.types.OperatorFileListElement, options={"HIDDEN", "SKIP_SAVE"})
    directory: StringProperty(subtype="DIR_PATH", options={"HIDDEN", "SKIP_SAVE"})

    def _paths(self) -> list[Path]:
        if self.files and self.directory:
            return [Path(self.directory) / f.name for f in self.files if f.name]
        return [Path(self.filepath)]

    def execute(self, context: bpy.types.Context) -> set[str]:
        paths = self._paths()
        try:  # read every file first: a bad one imports nothing
            assets = [(path, read_asset(path)) for path in paths]
        except NearError as error:
            self.report({"ERROR"}, str(error))
            return {"CANCELLED"}
        collection = context.collection or context.scene.collection
        created = []
        try:
            for path, asset in assets:
                created.append(asset_to_object(asset, path.stem, collection))
        except NearError as error:  # e.g. an extra latent whose name cannot be an attribute: undo what was made
            for obj in created:
                mesh = obj.data
                bpy.data.objects.remove(obj)
                bpy.data.meshes.remove(mesh)
            self.report({"ERROR"}, str(error))
            return {"CANCELLED"}
        for obj in context.selected_objects:
            obj.select_set(False)
        for obj in created:
            obj.location = context.scene.cursor.location
            obj.select_set(True)
            context.view_layer.objects.active = obj
        self.report({"INFO"}, f"Imported {len(assets)} NeAR asset(s)")
        return {"FINISHED"}


class NEAR_FH_asset(bpy.types.FileHandler):
    """Drop .near files into the 3D viewport or the outliner to import them."""

    bl_idname = "NEAR_FH_asset"
    bl_label = "NeAR asset"
    bl_import_operator = "import_scene.near_asset"
    bl_file_extensions = ".near"

    @classmethod
    def poll_drop(cls, context: bpy.types.Context) -> bool:
        return context.area is not None and context.area.type in {"VIEW_3D", "OUTLINER"}


class NEAR_OT_export_ply(bpy.types.Operator, ExportHelper):
    """Export NeAR objects as 3D Gaussians relit for the current frame, world and camera (3DGS PLY)"""

    bl_idname = "export_scene.near_ply"
    bl_label = "Export Relit Gaussians (.ply)"

    filename_ext = ".ply"
    filter_glob: StringProperty(default="*.ply", options={"HIDDEN"})
    selected_only: BoolProperty(name="Selected Only", default=True,
                                description="Export only the selected NeAR objects (otherwise every visible one)")
    color_space: EnumProperty(
        name="Colours", default="SRGB",
        items=[("SRGB", "Display (sRGB)", "sRGB-encoded colour, clipped to [0, 1]: what splat viewers display"),
               ("LINEAR", "Scene Linear", "Scene-linear colour clipped to [0, 1], for tools that expect linear "
                                          "data (splat viewers show it too dark)")],
        description="How the relit colour is stored in the PLY's SH DC coefficients")

    def execute(self, context: bpy.types.Context) -> set[str]:
        from near_engine.pipeline import Scene

        depsgraph = context.evaluated_depsgraph_get()
        selected = {obj.name for obj in context.selected_objects} if self.selected_only else None
        assets = AssetCache()
        try:
            objects = [(assets.asset(inst.object), np.array(inst.matrix_world, dtype=np.float64))
                       for inst in depsgraph.object_instances if is_near_object(inst.object)
                       and (selected is None or inst.object.original.name in selected)]
            if not objects:
                raise NearError("no NeAR objects to export: select one (or turn off Selected Only)")
            world = world_light(depsgraph)
            scene = Scene(objects, world.envmap, render_camera(depsgraph))
            gaussians = runtime.pipeline(context.scene).gaussians(scene).lit
            gaussians.write_ply(self.filepath, color_channel="color", color_space=self.color_space.lower())
        except (NearError, OSError) as error:
            self.report({"ERROR"}, str(error))
            return {"CANCELLED"}
        self.report({"INFO"}, f"Exported {len(gaussians)} Gaussians to {self.filepath}")
        return {"FINISHED"}


class NEAR_OT_convert_mesh(bpy.types.Operator):
    """Encode the active mesh object into a NeAR object (renders its views with Cycles in a separate Blender)"""

    bl_idname = "object.near_convert_mesh"
    bl_label = "Convert to NeAR Object"
    bl_options = {"REGISTER", "UNDO"}

    views: IntProperty(name="Views", default=24, min=1, max=150, description="Views rendered for the encoder")
    size: IntProperty(name="Resolution", default=256, min=16, max=1024, description="Side of each view, pixels")
    samples: IntProperty(name="Samples", default=32, min=1, max=4096, description="Cycles samples per view")
    timeout: IntProperty(name="Time Limit", default=1800, min=10, description="Seconds before encoding is stopped")

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        obj = context.active_object
        return obj is not None and obj.type == "MESH" and not is_near_object(obj)

    def _start(self, context: bpy.types.Context) -> ConvertJob | None:
        try:
            return ConvertJob(context.scene, context.active_object, views=self.views, size=self.size,
                              samples=self.samples, timeout=self.timeout)
        except NearError as error:
            self.report({"ERROR"}, str(error))
            return None

    def _finish(self, context: bpy.types.Context, job: ConvertJob) -> set[str]:
        try:
            _, message = job.finish(context)
        except NearError as error:
            self.report({"ERROR"}, str(error))
            return {"CANCELLED"}
        self.report({"INFO"}, message)
        return {"FINISHED"}

    def execute(self, context: bpy.types.Context) -> set[str]:
        """Scripts and the Redo panel: convert and wait (Blender is busy meanwhile)."""
        job = self._start(context)
        if job is None:
            return {"CANCELLED"}
        try:
            job.wait()
        except NearError as error:
            self.report({"ERROR"}, str(error))
            return {"CANCELLED"}
        return self._finish(context, job)

    def invoke(self, context: bpy.types.Context, event: bpy.types.Event) -> set[str]:
        """The menu: convert beside Blender, with the stage in the status bar and Esc to cancel."""
        self._job = self._start(context)
        if self._job is None:
            return {"CANCELLED"}
        wm = context.window_manager
        self._timer = wm.event_timer_add(0.5, window=context.window)
        wm.modal_handler_add(self)
        wm.progress_begin(0, len(STAGES) - 1)
        self._show(context)
        return {"RUNNING_MODAL"}

    def modal(self, context: bpy.types.Context, event: bpy.types.Event) -> set[str]:
        if event.type == "ESC":
            self._job.cancel()
            self._end(context)
            self.report({"INFO"}, f"Converting '{self._job.source_name}' cancelled")
            return {"CANCELLED"}
        if event.type != "TIMER":
            return {"PASS_THROUGH"}  # the rest of Blender stays usable meanwhile
        try:
            done = self._job.step()
        except NearError as error:
            self._end(context)
            self.report({"ERROR"}, str(error))
            return {"CANCELLED"}
        if not done:
            self._show(context)
            return {"PASS_THROUGH"}
        self._end(context)
        return self._finish(context, self._job)

    def cancel(self, context: bpy.types.Context) -> None:
        """Blender ends the operator (the file is closed, Blender quits): stop the encoder with it."""
        self._job.cancel()
        self._end(context)

    def _show(self, context: bpy.types.Context) -> None:
        context.window_manager.progress_update(self._job.stage_index())
        if context.workspace is not None:
            context.workspace.status_text_set(self._job.status())

    def _end(self, context: bpy.types.Context) -> None:
        wm = context.window_manager
        wm.event_timer_remove(self._timer)
        wm.progress_end()
        if context.workspace is not None:
            context.workspace.status_text_set(None)


#: The photos the lift reads (`near_engine.lift.image`), in the file browser and for drag and drop.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".exr")


class _LiftOperator:
    """What both lift operators share. Scripts (EXEC_DEFAULT) and the Redo panel block until the lift is done; from
    the UI (the file browser, the drop dialog) the lift runs on a thread that this modal operator polls, with the stage
    in the status bar and Esc to cancel. A failure is an ERROR report and changes nothing. Each operator makes its
    job in `_make_job(context, image, weights)`."""

    weights: StringProperty(
        name="Weights", subtype="DIR_PATH", default="",
        description="Weights folder with the lift networks, or a bundled model name (near-tiny); empty: the scene's "
                    "NeAR weights, else the add-on preferences', else near-tiny. Render with the same weights")
    elevation: FloatProperty(
        name="Elevation", subtype="ANGLE", default=0.0, min=math.radians(-89.0), max=math.radians(89.0),
        description="How far above the object the photo was taken (0: level with it, looking along +Y)")

    _interactive = False  # set by invoke: the execute that follows runs modal
    _job = None  # the LiftJob the modal operator polls

    def _weights(self, context: bpy.types.Context) -> str:
        chosen = self.weights.strip()
        return bpy.path.abspath(chosen) if chosen else str(runtime.weights_folder(context.scene))

    def execute(self, context: bpy.types.Context) -> set[str]:
        interactive, self._interactive = self._interactive, False  # a Redo runs execute again: that one blocks
        if not self.filepath:
            self.report({"ERROR"}, f"No image chosen: pick a {', '.join(IMAGE_EXTENSIONS)} file")
            return {"CANCELLED"}
        try:
            job = self._make_job(context, bpy.path.abspath(self.filepath), self._weights(context)).start()
        except NearError as error:
            self.report({"ERROR"}, str(error))
            return {"CANCELLED"}
        if interactive:
            return self._run_modal(context, job)
        try:
            job.wait()
        except NearError as error:
            self.report({"ERROR"}, str(error))
            return {"CANCELLED"}
        return self._finish(context, job)

    def _run_modal(self, context: bpy.types.Context, job: LiftJob) -> set[str]:
        """Started from execute (it follows the file browser or the drop dialog): Blender keeps an operator that
        returns RUNNING_MODAL there with its modal handler."""
        self._job = job
        wm = context.window_manager
        self._timer = wm.event_timer_add(0.2, window=context.window)
        wm.modal_handler_add(self)
        wm.progress_begin(0, 100)
        self._show(context)
        return {"RUNNING_MODAL"}

    def modal(self, context: bpy.types.Context, event: bpy.types.Event) -> set[str]:
        if event.type == "ESC":
            self._job.cancel()
            self._end(context)
            self.report({"INFO"}, f"Lifting '{Path(self._job.request.image).name}' cancelled")
            return {"CANCELLED"}
        if event.type != "TIMER":
            return {"PASS_THROUGH"}  # the rest of Blender stays usable meanwhile
        try:
            done = self._job.step()
        except NearError as error:
            self._end(context)
            self.report({"ERROR"}, str(error))
            return {"CANCELLED"}
        if not done:
            self._show(context)
            return {"PASS_THROUGH"}
        self._end(context)
        return self._finish(context, self._job)

    def cancel(self, context: bpy.types.Context) -> None:
        """Blender ends the operator: the file browser or the drop dialog was closed (no lift yet), or the file is
        closed or Blender quits while lifting (the lift stops with it)."""
        if self._job is not None:
            self._job.stop()
            self._end(context)

    def _finish(self, context: bpy.types.Context, job: LiftJob) -> set[str]:
        try:
            _, message = job.finish(context)
        except NearError as error:
            self.report({"ERROR"}, str(error))
            return {"CANCELLED"}
        self.report({"INFO"}, message)
        return {"FINISHED"}

    def _show(self, context: bpy.types.Context) -> None:
        context.window_manager.progress_update(round(100 * self._job.fraction))
        if context.workspace is not None:
            context.workspace.status_text_set(self._job.status())

    def _end(self, context: bpy.types.Context) -> None:
        wm = context.window_manager
        wm.event_timer_remove(self._timer)
        wm.progress_end()
        if context.workspace is not None:
            context.workspace.status_text_set(None)


class NEAR_OT_import_image(_LiftOperator, bpy.types.Operator, ImportHelper):
    """Lift a photo of an object into a relightable NeAR object standing on the 3D cursor"""

    bl_idname = "import_scene.near_image"
    bl_label = "Import Image as NeAR Object"
    bl_options = {"REGISTER", "UNDO"}

    filter_glob: StringProperty(default=";".join(f"*{ext}" for ext in IMAGE_EXTENSIONS), options={"HIDDEN"})
    geometry: EnumProperty(
        name="Geometry", default="OWN", description="Where the object's voxels come from",
        items=[("OWN", "Own Model", "The weights' own geometry model, from the photo"),
               ("INFLATE", "Inflated Silhouette", "The photo's outline inflated into a rounded solid (no model)"),
               ("TRELLIS", "TRELLIS", "The official TRELLIS sparse-structure model (needs the official "
                                      "TRELLIS-image-large weights)")])

    def invoke(self, context: bpy.types.Context, event: bpy.types.Event) -> set[str]:
        """The menu: the file browser; a drop (the file is set): a dialog with the options."""
        self._interactive = True
        return self.invoke_popup(context)

    def _make_job(self, context: bpy.types.Context, image: str, weights: str) -> LiftJob:
        return LiftJob.for_image(context, image, weights, self.geometry.lower(),
                                 math.degrees(self.elevation))


class NEAR_FH_image(bpy.types.FileHandler):
    """Drop a photo into the 3D viewport to lift it into a NeAR object."""

    bl_idname = "NEAR_FH_image"
    bl_label = "NeAR object from image"
    bl_import_operator = NEAR_OT_import_image.bl_idname
    bl_file_extensions = ";".join(IMAGE_EXTENSIONS)

    @classmethod
    def poll_drop(cls, context: bpy.types.Context) -> bool:
        return context.area is not None and context.area.type == "VIEW_3D"


class NEAR_OT_lift_onto_mesh(_LiftOperator, bpy.types.Operator, ImportHelper):
    """Lift a photo of the active mesh object onto the mesh's voxels: a relightable NeAR object in its place"""

    bl_idname = "object.near_lift_image"
    bl_label = "Lift Image onto Mesh"
    bl_options = {"REGISTER", "UNDO"}

    filter_glob: StringProperty(default=";".join(f"*{ext}" for ext in IMAGE_EXTENSIONS), options={"HIDDEN"})
    mesh_rotation: FloatProperty(
        name="Mesh Rotation", subtype="ANGLE", default=0.0,
        description="Turn the mesh about Z by this much so that the side the photo shows faces the Front view (-Y)")
    at_cursor: BoolProperty(
        name="At 3D Cursor", default=False,
        description="Put the NeAR object on the 3D cursor at unit size and leave the mesh visible, instead of putting "
                    "it in the mesh's place and size and hiding the mesh")

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        obj = context.active_object
        if obj is None or obj.type != "MESH" or is_near_object(obj):
            cls.poll_message_set("Select a mesh object (not a NeAR object) to lift the image onto")
            return False
        return True

    def invoke(self, context: bpy.types.Context, event: bpy.types.Event) -> set[str]:
        """The file browser picks the photo."""
        self._interactive = True
        return ImportHelper.invoke(self, context, event)

    def _make_job(self, context: bpy.types.Context, image: str, weights: str) -> LiftJob:
        return LiftJob.for_mesh(context, context.active_object, image, weights,
                                math.degrees(self.mesh_rotation), math.degrees(self.elevation), self.at_cursor)


def _menu_convert(self: bpy.types.Menu, context: bpy.types.Context) -> None:
    self.layout.operator(NEAR_OT_convert_mesh.bl_idname, text="NeAR Object")
    self.layout.operator(NEAR_OT_lift_onto_mesh.bl_idname, text="NeAR Object from Image...")


def _menu_context(self: bpy.types.Menu, context: bpy.types.Context) -> None:
    if NEAR_OT_lift_onto_mesh.poll(context):
        self.layout.separator()
        self.layout.operator(NEAR_OT_lift_onto_mesh.bl_idname, text="Lift Image onto Mesh (NeAR)...")


def _menu_import(self: bpy.types.Menu, context: bpy.types.Context) -> None:
    self.layout.operator(NEAR_OT_import_asset.bl_idname, text="NeAR Asset (.near)")
    self.layout.operator(NEAR_OT_import_image.bl_idname, text="Image as NeAR Object")


def _menu_export(self: bpy.types.Menu, context: bpy.types.Context) -> None:
    self.layout.operator(NEAR_OT_export_ply.bl_idname, text="NeAR Relit Gaussians (.ply)")


_classes = (NEAR_OT_import_asset, NEAR_FH_asset, NEAR_OT_export_ply, NEAR_OT_convert_mesh, NEAR_OT_import_image,
            NEAR_FH_image, NEAR_OT_lift_onto_mesh)


def register() -> None:
    for cls in _classes:
        bpy.utils.register_class(cls)
    bpy.types.TOPBAR_MT_file_import.append(_menu_import)
    bpy.types.TOPBAR_MT_file_export.append(_menu_export)
    bpy.types.VIEW3D_MT_object_convert.append(_menu_convert)
    bpy.types.VIEW3D_MT_object_context_menu.append(_menu_context)


def unregister() -> None:
    bpy.types.VIEW3D_MT_object_context_menu.remove(_menu_context)
    bpy.types.VIEW3D_MT_object_convert.remove(_menu_convert)
    bpy.types.TOPBAR_MT_file_export.remove(_menu_export)
    bpy.types.TOPBAR_MT_file_import.remove(_menu_import)
    stop_all()  # a lift still running would outlive its operator
    for cls in reversed(_classes):
        bpy.utils.unregister_class(cls)
