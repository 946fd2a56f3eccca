"""Worlds and lamps for Cycles: uniform white light (NeAR's illumination-homogenized target), Blender's bundled HDRIs
at a rotation and strength, Nishita Sky Texture worlds (baked to an equirectangular map that the views are then
rendered under, so the networks see exactly the light Cycles used), and area lights.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import NearError
from ..exr_layers import read_render_passes, stack_channels
from .quiet import render_still

UNIFORM_STRENGTH = 0.6  # NeAR's homogenized light: world colour (1, 1, 1) at strength 0.6, no lamps
AREA_WORLD_GREY = 0.35  # world colour behind the random area light
AREA_SIZE = 100.0  # the reference scales a 1 m area light by 100: a wide, soft sky-like panel above the object
SKY_MEAN = 0.6  # a baked sky is scaled to this mean radiance (the uniform light's level) before its own strength
SKY_HEIGHT = 128  # rows of a baked sky map (256 x 128: the sun covers about one texel, as it does in Blender's HDRIs)
SKY_SAMPLES = 16  # camera samples per texel of the bake (box filter: each texel is its footprint's average)


@dataclass(frozen=True)
class Light:
    """One lighting of an object: kind 'uniform', 'hdri' (name, Mapping Z rotation, strength), 'sky' (sun elevation
    and rotation of a Nishita Sky Texture, baked to `<object>/sky.exr` at mean radiance `SKY_MEAN`, then strength) or
    'area'."""

    kind: str
    hdri: str = ""
    rotation_z: float = 0.0  # radians, as the World's Mapping node rotation (and EnvMap.rotation_z)
    strength: float = UNIFORM_STRENGTH
    energy: float = 0.0  # area light power, W
    location: tuple[float, float, float] = (0.0, 0.0, 0.0)
    sun_elevation: float = 0.0  # radians above the horizon (sky)
    sun_rotation: float = 0.0  # radians about +Z (sky)

    @property
    def name(self) -> str:
        """A short id used in file names ('uniform', 'hdri_forest', 'sky', 'area')."""
        return f"hdri_{self.hdri}" if self.kind == "hdri" else self.kind

    @property
    def has_envmap(self) -> bool:
        """Whether an environment map describes this light completely (the networks need one)."""
        return self.kind in ("hdri", "sky", "uniform")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Light":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


UNIFORM = Light("uniform")


def sky_world_nodes(nodes, light: Light):
    """A Nishita Sky Texture for `light` (sun disc on) in a world node tree; returns its colour output."""
    sky = nodes.new("ShaderNodeTexSky")
    sky.sky_type = "NISHITA"
    sky.sun_disc = True
    sky.sun_elevation, sky.sun_rotation = light.sun_elevation, light.sun_rotation
    return sky.outputs["Color"]


def apply_light(scene, light: Light, envmap_file: str | None = None) -> None:
    """Set the scene's world (and its one area lamp) to `light`; lamps of a previous light are removed.

    A sky light is shown through its baked map `envmap_file` (`bake_sky`), at the light's strength."""
    import bpy

    from ..blender_data import blender_hdri

    for obj in [o for o in scene.objects if o.type == "LIGHT"]:
        data = obj.data
        bpy.data.objects.remove(obj)
        bpy.data.lights.remove(data)
    world = scene.world or bpy.data.worlds.new("world")
    scene.world = world
    world.use_nodes = True
    nodes, links = world.node_tree.nodes, world.node_tree.links
    nodes.clear()
    background = nodes.new("ShaderNodeBackground")
    links.new(background.outputs[0], nodes.new("ShaderNodeOutputWorld").inputs["Surface"])
    background.inputs["Strength"].default_value = light.strength
    if light.kind == "hdri":
        env = nodes.new("ShaderNodeTexEnvironment")
        env.image = bpy.data.images.load(str(blender_hdri(light.hdri)), check_existing=True)
        mapping = nodes.new("ShaderNodeMapping")
        mapping.inputs["Rotation"].default_value = (0.0, 0.0, light.rotation_z)
        links.new(nodes.new("ShaderNodeTexCoord").outputs["Generated"], mapping.inputs["Vector"])
        links.new(mapping.outputs[0], env.inputs["Vector"])
        links.new(env.outputs["Color"], background.inputs["Color"])
    elif light.kind == "sky":
        if envmap_file is None:
            raise NearError("a sky light renders under its baked map: bake it first (bake_sky)")
        env = nodes.new("ShaderNodeTexEnvironment")
        env.image = bpy.data.images.load(envmap_file, check_existing=False)
        links.new(env.outputs["Color"], background.inputs["Color"])
    elif light.kind in ("uniform", "area"):
        background.inputs["Color"].default_value = (1.0, 1.0, 1.0, 1.0)
    else:
        raise NearError(f"unknown light kind {light.kind!r}")
    if light.kind == "area":
        lamp = bpy.data.lights.new("area", "AREA")
        lamp.energy, lamp.size = light.energy, AREA_SIZE
        obj = bpy.data.objects.new("area", lamp)
        obj.location = light.location  # pointing down (-Z), as a new area light does
        scene.collection.objects.link(obj)


def bake_sky(scene, light: Light, target: str) -> None:
    """Bake `light`'s Sky Texture to the equirectangular EXR `target` (2:1, `SKY_HEIGHT` rows, mean radiance
    `SKY_MEAN`) with Cycles through a panoramic camera; the scene's objects are hidden from it meanwhile."""
    import tempfile

    import bpy

    from ..envmap import EnvMap

    world = bpy.data.worlds.new("sky_bake")
    world.use_nodes = True
    nodes, links = world.node_tree.nodes, world.node_tree.links
    nodes.clear()
    background = nodes.new("ShaderNodeBackground")
    links.new(sky_world_nodes(nodes, light), background.inputs["Color"])
    links.new(background.outputs[0], nodes.new("ShaderNodeOutputWorld").inputs["Surface"])
    data = bpy.data.cameras.new("sky_bake")
    data.type, data.panorama_type = "PANO", "EQUIRECTANGULAR"
    camera = bpy.data.objects.new("sky_bake", data)
    camera.rotation_euler = (math.pi / 2, 0.0, -math.pi / 2)  # looks along +X, up +Z: the image centre faces +X
    scene.collection.objects.link(camera)
    saved = (scene.world, scene.camera, scene.render.resolution_x, scene.render.resolution_y,
             scene.render.film_transparent, scene.cycles.samples, scene.cycles.use_denoising,
             scene.cycles.use_adaptive_sampling, scene.render.filepath)
    hidden = [o for o in scene.objects if o.type == "MESH" and o.visible_camera]
    try:
        for obj in hidden:
            obj.visible_camera = False
        scene.world, scene.camera = world, camera
        scene.render.resolution_x, scene.render.resolution_y = 2 * SKY_HEIGHT, SKY_HEIGHT
        scene.render.film_transparent = False
        scene.cycles.samples, scene.cycles.use_denoising, scene.cycles.use_adaptive_sampling = SKY_SAMPLES, False, False
        with tempfile.TemporaryDirectory() as tmp:
            render_still(scene, str(Path(tmp) / "sky.exr"))
            pixels = stack_channels(read_render_passes(Path(tmp) / "sky.exr"), "Combined.", "RGB")
    finally:
        for obj in hidden:
            obj.visible_camera = True
        (scene.world, scene.camera, scene.render.resolution_x, scene.render.resolution_y,
         scene.render.film_transparent, scene.cycles.samples, scene.cycles.use_denoising,
         scene.cycles.use_adaptive_sampling, scene.render.filepath) = saved
        bpy.data.objects.remove(camera)
        bpy.data.cameras.remove(data)
        bpy.data.worlds.remove(world)
    weights = np.sin((np.arange(SKY_HEIGHT) + 0.5) / SKY_HEIGHT * math.pi)[:, None, None]  # solid angle per row
    mean = float((pixels.mean(-1, keepdims=True) * weights).sum() / (weights.sum() * pixels.shape[1]))
    if not math.isfinite(mean) or mean <= 0:
        raise NearError(f"the sky bake of {light} came out black")
    EnvMap.from_array((pixels * (SKY_MEAN / mean)).astype(np.float32), name="sky").write_exr(target)
