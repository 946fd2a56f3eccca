"""Settings stored in the .blend: per scene (render settings) and per object (what makes a mesh a NeAR object)."""

from __future__ import annotations

import bpy
from bpy.props import BoolProperty, EnumProperty, FloatProperty, IntProperty, PointerProperty, StringProperty

from near_engine.passes import BLENDER_PASSES

DEVICE_ITEMS = [
    ("DEFAULT", "Default", "The device chosen in the add-on preferences"),
    ("AUTO", "Automatic", "CUDA when available, otherwise the CPU"),
    ("CPU", "CPU", "Render on the CPU"),
    ("CUDA", "CUDA", "Render on an NVIDIA GPU"),
]


class NearSceneSettings(bpy.types.PropertyGroup):
    """Render settings of the NeAR engine (Render Properties > NeAR)."""

    weights_folder: StringProperty(
        name="Weights",
        description="Folder of NeAR weights for this scene (our format or the official NeAR layout); "
                    "empty uses the folder set in the add-on preferences, else the bundled near-tiny model",
        subtype="DIR_PATH",
        default="",
    )
    device: EnumProperty(name="Device", items=DEVICE_ITEMS, default="DEFAULT",
                         description="Where the NeAR networks and the rasterizer run")
    viewport_scale: FloatProperty(
        name="Navigation Resolution",
        description="Viewport resolution scale while the view or the frame changes; full resolution when idle",
        min=0.05, max=1.0, default=0.35, subtype="FACTOR",
    )
    light_size: IntProperty(
        name="Light Resolution",
        description="Side of the illumination tokenizer's input planes (0: the value stored with the weights)",
        min=0, max=2048, default=0,
    )


class NearObjectSettings(bpy.types.PropertyGroup):
    """Marks a mesh as a NeAR object and keeps the asset's metadata (the latent itself is in point attributes)."""

    is_near: BoolProperty(name="NeAR Object", default=False,
                          description="This mesh holds a NeAR latent: one vertex per voxel, latent as attributes")
    resolution: IntProperty(name="Grid", min=1, max=1024, default=64,
                            description="Side of the voxel grid the latent lives on")
    latent: StringProperty(name="Latent", default="lh-slat", description="What the latent channels mean")
    model: StringProperty(name="Model", default="", description="The weights the asset was made with")
    source: StringProperty(name="Source", default="", description="Where the asset came from (e.g. an image hash)")


class NearViewLayerSettings(bpy.types.PropertyGroup):
    """Which NeAR passes a view layer writes: one switch per pass of `passes.BLENDER_PASSES` that Blender has none
    for (Depth and Normal use Blender's own).

    No `update` callbacks here: a Python update callback on a registered property makes the bpy module hang at exit
    (a deadlock in Blender's static destructors, seen with bpy 4.5.15), which would stall render farms.
    """

    __annotations__ = {p.own_switch: BoolProperty(name=p.label, default=False, description=p.description)
                       for p in BLENDER_PASSES if p.own_switch}


_classes = (NearSceneSettings, NearObjectSettings, NearViewLayerSettings)


def register() -> None:
    for cls in _classes:
        bpy.utils.register_class(cls)
    bpy.types.Scene.near = PointerProperty(type=NearSceneSettings)
    bpy.types.Object.near = PointerProperty(type=NearObjectSettings)
    bpy.types.ViewLayer.near = PointerProperty(type=NearViewLayerSettings)


def unregister() -> None:
    del bpy.types.ViewLayer.near
    del bpy.types.Object.near
    del bpy.types.Scene.near
    for cls in reversed(_classes):
        bpy.utils.unregister_class(cls)
