"""Operators: import a .near asset (menu and drag and drop), export the relit Gaussians as a 3DGS PLY.

Every failure is an operator report; nothing in the .blend changes when an operator fails.
"""

from __future__ import annotations

from pathlib import Path

import bpy
import numpy as np
from bpy.props import BoolProperty, CollectionProperty, StringProperty
from bpy_extras.io_utils import ExportHelper, ImportHelper

from near_engine.asset import read_asset
from near_engine.errors import NearError

from . import runtime
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
        for obj in context.selected_objects:
            obj.select_set(False)
        for path, asset in assets:
            obj = asset_to_object(asset, path.stem, collection)
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

    def execute(self, context: bpy.types.Context) -> set[str]:
        from near_engine.pipeline import Scene

        depsgraph = context.evaluated_depsgraph_get()
        selected = {obj.name for obj in context.selected_objects} if self.selected_only else None
        assets = AssetCache()
        try:
            objects = [(assets.asset(inst.object), np.array(inst.matrix_world, dtype=np.float64)) for inst in depsgraph.object_instances
                       if is_near_object(inst.object)
                       and (selected is None or inst.object.original.name in selected)]
            if not objects:
                raise NearError("no NeAR objects to export: select one (or turn off Selected Only)")
            world = world_light(depsgraph)
            scene = Scene(objects, world.envmap, render_camera(depsgraph))
            gaussians = runtime.pipeline(context.scene).gaussians(scene).lit
            gaussians.write_ply(self.filepath, color_channel="color")
        except NearError as error:
            self.report({"ERROR"}, str(error))
            return {"CANCELLED"}
        self.report({"INFO"}, f"Exported {len(gaussians)} Gaussians to {self.filepath}")
        return {"FINISHED"}


def _menu_import(self: bpy.types.Menu, context: bpy.types.Context) -> None:
    self.layout.operator(NEAR_OT_import_asset.bl_idname, text="NeAR Asset (.near)")


def _menu_export(self: bpy.types.Menu, context: bpy.types.Context) -> None:
    self.layout.operator(NEAR_OT_export_ply.bl_idname, text="NeAR Relit Gaussians (.ply)")


_classes = (NEAR_OT_import_asset, NEAR_FH_asset, NEAR_OT_export_ply)


def register() -> None:
    for cls in _classes:
        bpy.utils.register_class(cls)
    bpy.types.TOPBAR_MT_file_import.append(_menu_import)
    bpy.types.TOPBAR_MT_file_export.append(_menu_export)


def unregister() -> None:
    bpy.types.TOPBAR_MT_file_export.remove(_menu_export)
    bpy.types.TOPBAR_MT_file_import.remove(_menu_import)
    for cls in reversed(_classes):
        bpy.utils.unregister_class(cls)
