"""Panels: NeAR render settings, passes, the NeAR object panel, and Blender's own panels enabled for the engine."""

from __future__ import annotations

import bpy

from near_engine.errors import NearError
from near_engine.passes import BLENDER_PASSES

from . import runtime
from .objects import is_near_object

ENGINE = "NEAR"

#: Blender's panels the engine reuses: everything made for any engine that users need here (camera, world
#: surface, output, colour management, dimensions ...). Panels that only make sense for Eevee/Cycles are left out.
_BLENDER_PANELS_EXCLUDED = {"VIEWLAYER_PT_filter", "VIEWLAYER_PT_layer_passes", "RENDER_PT_freestyle"}


def _blender_panels() -> list[type]:
    panels = []
    for panel in bpy.types.Panel.__subclasses__():
        engines = getattr(panel, "COMPAT_ENGINES", None)
        if engines is None or panel.__name__ in _BLENDER_PANELS_EXCLUDED:
            continue
        if "BLENDER_RENDER" in engines or panel.__name__ in ("EEVEE_WORLD_PT_surface", "WORLD_PT_context_world"):
            panels.append(panel)
    return panels


class NearPanel:
    bl_space_type = "PROPERTIES"
    bl_region_type = "WINDOW"
    COMPAT_ENGINES = {ENGINE}

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        return context.engine in cls.COMPAT_ENGINES


class RENDER_PT_near(NearPanel, bpy.types.Panel):
    bl_label = "NeAR"
    bl_context = "render"

    def draw(self, context: bpy.types.Context) -> None:
        layout = self.layout
        layout.use_property_split = True
        settings = context.scene.near
        layout.prop(settings, "weights_folder")
        layout.prop(settings, "device")
        layout.prop(settings, "viewport_scale")
        layout.prop(settings, "light_size")
        try:
            folder = runtime.weights_folder(context.scene)
        except NearError as error:
            layout.label(text=str(error), icon="ERROR")
        else:
            layout.label(text=f"Weights: {folder.name}", icon="CHECKMARK")


class VIEWLAYER_PT_near_passes(NearPanel, bpy.types.Panel):
    bl_label = "Passes"
    bl_context = "view_layer"

    def draw(self, context: bpy.types.Context) -> None:
        layout = self.layout
        layout.use_property_split = True
        view_layer = context.view_layer
        column = layout.column(heading="Include")
        for render_pass in BLENDER_PASSES:
            if render_pass.own_switch:
                column.prop(view_layer.near, render_pass.own_switch)
            else:
                column.prop(view_layer, render_pass.switch)


class OBJECT_PT_near(NearPanel, bpy.types.Panel):
    bl_label = "NeAR Object"
    bl_context = "object"

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        return is_near_object(context.object)

    def draw(self, context: bpy.types.Context) -> None:
        layout = self.layout
        layout.use_property_split = True
        obj = context.object
        settings = obj.near
        layout.label(text=f"{len(obj.data.vertices)} voxels on a {settings.resolution}^3 grid")
        column = layout.column()
        column.enabled = False
        column.prop(settings, "latent")
        column.prop(settings, "model")
        column.prop(settings, "source")


_classes = (RENDER_PT_near, VIEWLAYER_PT_near_passes, OBJECT_PT_near)


def register() -> None:
    for cls in _classes:
        bpy.utils.register_class(cls)
    for panel in _blender_panels():
        panel.COMPAT_ENGINES.add(ENGINE)


def unregister() -> None:
    for panel in _blender_panels():
        panel.COMPAT_ENGINES.discard(ENGINE)
    for cls in reversed(_classes):
        bpy.utils.unregister_class(cls)
