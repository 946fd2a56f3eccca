"""Lighting of the data set: uniform white light (the LH target), Blender's bundled HDRIs, random area lights.

Splits: the HDRIs `HELD_OUT_HDRIS` and every tenth object (`is_validation_object`) never light a training image.
'city' (hard sunlit street) and 'night' (dark, few bright lamps) are held out because they are the two least like the
others, which makes them a hard test of relighting rather than of memorized light; the six others train.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import NearError

HDRIS = ("forest", "sunset", "studio", "city", "courtyard", "interior", "night", "sunrise")
HELD_OUT_HDRIS = ("city", "night")
TRAIN_HDRIS = tuple(h for h in HDRIS if h not in HELD_OUT_HDRIS)

UNIFORM_STRENGTH = 0.6  # NeAR's homogenized light: world colour (1, 1, 1) at strength 0.6, no lamps
AREA_WORLD_GREY = 0.35  # world colour behind the random area light
AREA_SIZE = 100.0  # the reference scales a 1 m area light by 100: a wide, soft sky-like panel above the object


@dataclass(frozen=True)
class Light:
    """One lighting of an object: kind 'uniform', 'hdri' (name, Mapping Z rotation, strength) or 'area'."""

    kind: str
    hdri: str = ""
    rotation_z: float = 0.0  # radians, as the World's Mapping node rotation (and EnvMap.rotation_z)
    strength: float = UNIFORM_STRENGTH
    energy: float = 0.0  # area light power, W
    location: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @property
    def name(self) -> str:
        """A short id used in file names ('uniform', 'hdri_forest', 'area')."""
        return f"hdri_{self.hdri}" if self.kind == "hdri" else self.kind

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Light":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


UNIFORM = Light("uniform")


def is_validation_object(index: int) -> bool:
    """Every tenth object (index 9, 19, ...) is held out for validation."""
    return index % 10 == 9


def object_lights(seed: int, index: int, n_hdri: int, validation: bool | None = None) -> list[Light]:
    """The relighting conditions of one object (seeded): `n_hdri` training HDRIs and one random area light.

    Validation objects (default: `is_validation_object(index)`) are the evaluation set: they are lit by the held-out
    HDRIs as well.
    """
    if not 0 <= n_hdri <= len(TRAIN_HDRIS):
        raise NearError(f"HDRIs per object must be between 0 and {len(TRAIN_HDRIS)}, got {n_hdri}")
    rng = np.random.default_rng([seed, index, 1])
    names = list(rng.choice(TRAIN_HDRIS, size=n_hdri, replace=False))
    if is_validation_object(index) if validation is None else validation:
        names += HELD_OUT_HDRIS
    lights = [Light("hdri", hdri=str(name), rotation_z=float(rng.uniform(0, 2 * math.pi)),
                    strength=float(rng.uniform(0.5, 1.5))) for name in names]
    lights.append(Light("area", strength=AREA_WORLD_GREY, energy=float(rng.uniform(300, 500)),
                        location=(float(rng.uniform(-1, 1)), float(rng.uniform(-1, 1)), float(rng.uniform(0.5, 1.5)))))
    return lights


def apply_light(scene, light: Light) -> None:
    """Set the scene's world (and its one area lamp) to `light`; lamps of a previous light are removed."""
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
