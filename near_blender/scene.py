"""Depsgraph -> the engine's scene description (`near_engine.pipeline.Scene`): NeAR objects, world light, camera.

Only plain data crosses into near_engine: assets, 4x4 matrices, an EnvMap and a Camera. Object instances come from
the depsgraph, so parenting, collection instances, hiding and animation work as Blender evaluates them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import bpy
import numpy as np

from near_engine.asset import Asset
from near_engine.camera import Camera
from near_engine.envmap import EnvMap
from near_engine.errors import CameraError
from near_engine.pipeline import LRUCache, Scene

from .objects import is_near_object, object_to_asset
from .world import PreparedBake, world_envmap


@dataclass
class BorderRect:
    """The part of the frame a render covers, in pixels from the bottom-left corner (Blender's convention)."""

    x: int
    y: int
    width: int
    height: int


class AssetCache:
    """Assets read from NeAR meshes, reused until a depsgraph update says the mesh changed (`invalidate`)."""

    def __init__(self) -> None:
        self._assets: dict[str, Asset] = {}

    def invalidate(self, mesh_names: set[str] | None = None) -> None:
        """Forget the given meshes (all when None), e.g. after a depsgraph update that touched them."""
        for name in list(self._assets) if mesh_names is None else mesh_names:
            self._assets.pop(name, None)

    def asset(self, obj: bpy.types.Object) -> Asset:
        key = obj.data.original.name_full
        if key not in self._assets:
            self._assets[key] = object_to_asset(obj)
        return self._assets[key]


def near_instances(depsgraph: bpy.types.Depsgraph, assets: AssetCache | None = None) -> list[tuple[Asset, np.ndarray]]:
    """Every visible NeAR object instance (duplis included) as (asset, matrix_world) in the depsgraph's evaluation."""
    found = []
    for instance in depsgraph.object_instances:
        obj = instance.object
        if not is_near_object(obj):
            continue
        asset = assets.asset(obj) if assets is not None else object_to_asset(obj)
        found.append((asset, np.array(instance.matrix_world, dtype=np.float64)))
    return found


def _render_size(render: bpy.types.RenderSettings) -> tuple[int, int]:
    """Blender's integer arithmetic (as `Camera.from_blender`): a float product can come out a pixel short."""
    percent = render.resolution_percentage
    return render.resolution_x * percent // 100, render.resolution_y * percent // 100


def border_rect(render: bpy.types.RenderSettings) -> BorderRect:
    """The pixels a final render covers: the whole frame, or the render border as Blender rounds it."""
    width, height = _render_size(render)
    if not render.use_border:
        return BorderRect(0, 0, width, height)
    x0, x1 = int(render.border_min_x * width), int(render.border_max_x * width)
    y0, y1 = int(render.border_min_y * height), int(render.border_max_y * height)
    return BorderRect(x0, y0, max(x1 - x0, 1), max(y1 - y0, 1))


def render_camera(depsgraph: bpy.types.Depsgraph) -> Camera:
    """The scene camera as Cycles frames it (lens, sensor fit, shift, clip, orthographic, pixel aspect, border)."""
    scene = depsgraph.scene
    camera_object = scene.camera
    if camera_object is None:
        raise CameraError("The scene has no active camera: add one, or set it in Scene Properties > Camera")
    camera_object = camera_object.evaluated_get(depsgraph)
    if camera_object.type != "CAMERA":
        raise CameraError(f"The active camera '{camera_object.name}' is not a camera object")
    data, render = camera_object.data, scene.render
    if data.type not in ("PERSP", "ORTHO"):
        raise CameraError(f"Camera '{camera_object.name}' is {data.type.lower()}: NeAR renders perspective and "
                          "orthographic cameras only")
    camera = Camera.from_blender(
        np.array(camera_object.matrix_world), type=data.type, lens=data.lens, sensor_width=data.sensor_width,
        sensor_height=data.sensor_height, sensor_fit=data.sensor_fit, shift_x=data.shift_x, shift_y=data.shift_y,
        ortho_scale=data.ortho_scale, clip_start=data.clip_start, clip_end=data.clip_end,
        resolution_x=render.resolution_x, resolution_y=render.resolution_y,
        resolution_percentage=render.resolution_percentage, pixel_aspect_x=render.pixel_aspect_x,
        pixel_aspect_y=render.pixel_aspect_y)
    rect = border_rect(render)
    if (rect.width, rect.height) == (camera.width, camera.height):
        return camera
    top = camera.height - (rect.y + rect.height)  # the border's top row, counted from the top as Camera does
    return dataclasses.replace(camera, width=rect.width, height=rect.height, cx=camera.cx - rect.x,
                               cy=camera.cy - top)


@dataclass
class WorldLight:
    """The World as NeAR sees it, with the warnings to show the user."""

    envmap: EnvMap
    warnings: list[str]


def world_light(depsgraph: bpy.types.Depsgraph, bake_cache: LRUCache | None = None,
                background: "Callable[[str, PreparedBake], None] | None" = None) -> WorldLight:
    """The scene's World as light (see `world.world_envmap`, whose `BakeStarted` passes through with `background`)."""
    envmap, warnings = world_envmap(depsgraph.scene.world, bake_cache=bake_cache, background=background)
    return WorldLight(envmap, warnings)


#: Object types Cycles would draw that NeAR does not (yet): under NEAR they vanish, so a render says which.
UNRENDERED_TYPES = {"MESH": "mesh", "CURVE": "curve", "SURFACE": "surface", "META": "metaball", "FONT": "text",
                    "CURVES": "hair curves", "POINTCLOUD": "point cloud", "VOLUME": "volume",
                    "GREASEPENCIL": "grease pencil", "GPENCIL": "grease pencil", "LIGHT": "light"}
#: How many names one warning lists before it says "and N more".
NAMED_AT_MOST = 5


def unrendered_objects(depsgraph: bpy.types.Depsgraph) -> list[tuple[str, str]]:
    """(name, kind) of every visible object NeAR does not render (ordinary meshes, lamps, ...), each once."""
    found: dict[str, str] = {}
    for instance in depsgraph.object_instances:
        obj = instance.object
        kind = UNRENDERED_TYPES.get(obj.type)
        if kind is not None and not is_near_object(obj):
            found.setdefault(obj.original.name, kind)
    return sorted(found.items())


def unrendered_warning(objects: list[tuple[str, str]]) -> str | None:
    """One warning naming what the render leaves out, or None when it leaves nothing out."""
    if not objects:
        return None
    named = ", ".join(f"'{name}' ({kind})" for name, kind in objects[:NAMED_AT_MOST])
    more = f" and {len(objects) - NAMED_AT_MOST} more" if len(objects) > NAMED_AT_MOST else ""
    return (f"NeAR renders only NeAR objects lit by the World; not rendered: {named}{more}. Convert meshes with "
            "Object > Convert > NeAR Object; lamps have no effect")


def describe(depsgraph: bpy.types.Depsgraph, camera: Camera, *, world: WorldLight | None = None,
             assets: AssetCache | None = None, bake_cache: LRUCache | None = None) -> tuple[Scene, list[str]]:
    """The engine scene for this depsgraph and camera, plus warnings for the user (the World's, and one naming the
    scene content NeAR does not render)."""
    world = world if world is not None else world_light(depsgraph, bake_cache)
    transparent = bool(depsgraph.scene.render.film_transparent)
    warnings = list(world.warnings)
    dropped = unrendered_warning(unrendered_objects(depsgraph))
    if dropped is not None:
        warnings.append(dropped)
    return Scene(near_instances(depsgraph, assets), world.envmap, camera, transparent), warnings


__all__ = ["AssetCache", "BorderRect", "WorldLight", "border_rect", "describe", "near_instances", "render_camera",
           "unrendered_objects", "world_light"]
