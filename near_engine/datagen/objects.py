"""Seeded procedural objects: 1-3 primitives with modifiers, one Principled BSDF material, normalized to the unit cube.

A recipe (`make_recipe`) is plain data drawn from `numpy.random.default_rng([seed, index])`, so object `index` of `seed`
is always the same object and the recipe can be stored next to the renders. `build_object` turns it into a Blender
object (bpy is imported there, never at module level).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from ..cycles.materials import AOVS
from ..cycles.meshes import mesh_arrays, normalized
from ..errors import NearError

PRIMITIVES = ("cube", "uv_sphere", "cylinder", "cone", "torus", "ico_sphere", "monkey")
TEXTURES = ("plain", "noise", "voronoi", "checker", "wave")


@dataclass(frozen=True)
class Part:
    """One primitive: its placement (before the whole object is normalized) and modifiers (0 = modifier off)."""

    kind: str
    location: tuple[float, float, float]
    rotation: tuple[float, float, float]  # Euler XYZ, radians
    scale: tuple[float, float, float]
    bevel: float = 0.0  # bevel width
    subdivision: int = 0  # Catmull-Clark levels
    displacement: float = 0.0  # displace strength along normals (cloud noise)
    noise_size: float = 0.5  # cloud noise size of the displacement


@dataclass(frozen=True)
class MaterialRecipe:
    """A Principled BSDF: base colour (plain or mixed with a procedural texture), roughness, metallic, specular."""

    base_color: tuple[float, float, float]
    texture: str = "plain"
    texture_color: tuple[float, float, float] = (0.0, 0.0, 0.0)
    texture_scale: float = 5.0
    roughness: float = 0.5
    metallic: float = 0.0
    specular: float = 0.5  # Specular IOR Level: 0.5 is a plain dielectric (IOR 1.5), 0 turns the specular layer off


@dataclass(frozen=True)
class ObjectRecipe:
    """Everything that defines one object; `to_json`/`from_json` store it next to its renders."""

    seed: int
    index: int
    parts: tuple[Part, ...]
    material: MaterialRecipe

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "ObjectRecipe":
        parts = tuple(Part(**{k: tuple(v) if isinstance(v, list) else v for k, v in p.items()}) for p in data["parts"])
        material = MaterialRecipe(**{k: tuple(v) if isinstance(v, list) else v for k, v in data["material"].items()})
        return cls(int(data["seed"]), int(data["index"]), parts, material)


def make_recipe(seed: int, index: int) -> ObjectRecipe:
    """The recipe of object `index` of data set `seed` (deterministic; no bpy needed)."""
    rng = np.random.default_rng([seed, index])
    parts = []
    for k in range(int(rng.integers(1, 4))):
        kind = str(rng.choice(PRIMITIVES))
        subdivision = int(rng.choice([0, 0, 1, 2]))
        displace = rng.random() < 0.3
        parts.append(Part(
            kind=kind,
            location=(0.0, 0.0, 0.0) if k == 0 else tuple(float(x) for x in rng.uniform(-0.8, 0.8, 3)),
            rotation=tuple(float(x) for x in rng.uniform(0, 2 * math.pi, 3)),
            scale=tuple(float(x) for x in rng.uniform(0.4, 1.0, 3)),
            bevel=float(rng.uniform(0.02, 0.15)) if rng.random() < 0.4 else 0.0,
            subdivision=max(subdivision, 2) if displace else subdivision,  # displacement needs vertices to move
            displacement=float(rng.uniform(0.03, 0.15)) if displace else 0.0,
            noise_size=float(rng.uniform(0.2, 0.8)),
        ))
    metallic_draw = rng.random()
    metallic = 0.0 if metallic_draw < 0.6 else 1.0 if metallic_draw < 0.9 else float(rng.random())
    material = MaterialRecipe(
        base_color=_random_colour(rng),
        texture=str(rng.choice(TEXTURES, p=[0.4, 0.15, 0.15, 0.15, 0.15])),
        texture_color=_random_colour(rng),
        texture_scale=float(rng.uniform(2.0, 12.0)),
        roughness=float(rng.uniform(0.05, 1.0)),
        metallic=metallic,
        specular=float(rng.uniform(0.3, 0.7)),
    )
    return ObjectRecipe(int(seed), int(index), tuple(parts), material)


def _random_colour(rng: np.random.Generator) -> tuple[float, float, float]:
    """A linear RGB colour from a random hue, saturation and value (so greys and saturated colours both occur)."""
    import colorsys

    h, s, v = rng.random(), rng.uniform(0.0, 0.9), rng.uniform(0.15, 0.95)
    return tuple(float(c) ** 2.2 for c in colorsys.hsv_to_rgb(h, s, v))


# ---------------------------------------------------------------------------------------------------------------------
# Blender side


def build_object(recipe: ObjectRecipe, name: str = "object"):
    """Build the recipe in the current (empty) Blender scene: one mesh object in asset space, with its material.

    The parts are evaluated with their modifiers, merged into one mesh (overlapping, not boolean: the renders and the
    voxelizer only see surfaces) and normalized: bounding-box centre at the origin, largest side 1.
    """
    import bpy

    vertices, triangles = [], []
    offset = 0
    for part in recipe.parts:
        v, t = _part_mesh(part)
        vertices.append(v)
        triangles.append(t + offset)
        offset += len(v)
    v, t = normalized(np.concatenate(vertices)), np.concatenate(triangles)

    mesh = bpy.data.meshes.new(name)
    mesh.from_pydata(v.tolist(), [], t.tolist())
    mesh.shade_smooth()
    mesh.set_sharp_from_angle(angle=math.radians(40))
    mesh.validate()
    mesh.materials.append(build_material(recipe.material, name))
    obj = bpy.data.objects.new(name, mesh)
    bpy.context.scene.collection.objects.link(obj)
    return obj


def _part_mesh(part: Part) -> tuple[np.ndarray, np.ndarray]:
    """Add one primitive with its modifiers, read its evaluated mesh and remove it again."""
    import bpy

    adders = {"cube": bpy.ops.mesh.primitive_cube_add, "uv_sphere": bpy.ops.mesh.primitive_uv_sphere_add,
              "cylinder": bpy.ops.mesh.primitive_cylinder_add, "cone": bpy.ops.mesh.primitive_cone_add,
              "torus": bpy.ops.mesh.primitive_torus_add, "ico_sphere": bpy.ops.mesh.primitive_ico_sphere_add,
              "monkey": bpy.ops.mesh.primitive_monkey_add}
    if part.kind not in adders:
        raise NearError(f"unknown primitive {part.kind!r}; known: {', '.join(PRIMITIVES)}")
    adders[part.kind](location=part.location, rotation=part.rotation)  # the torus operator takes no scale
    obj = bpy.context.active_object
    obj.scale = part.scale
    if part.bevel > 0:
        bevel = obj.modifiers.new("bevel", "BEVEL")
        bevel.width, bevel.segments, bevel.limit_method = part.bevel, 3, "ANGLE"
    if part.subdivision > 0:
        subsurf = obj.modifiers.new("subdivision", "SUBSURF")
        subsurf.levels = subsurf.render_levels = part.subdivision
    if part.displacement > 0:
        texture = bpy.data.textures.new(f"{obj.name}_clouds", "CLOUDS")
        texture.noise_scale = part.noise_size
        displace = obj.modifiers.new("displacement", "DISPLACE")
        displace.texture, displace.strength, displace.mid_level = texture, part.displacement, 0.5
    try:
        return mesh_arrays(obj)
    finally:
        mesh = obj.data
        bpy.data.objects.remove(obj)
        bpy.data.meshes.remove(mesh)


def build_material(recipe: MaterialRecipe, name: str = "material"):
    """A Principled BSDF material that also writes base colour, roughness, metallic and Specular IOR Level to the
    G-buffer AOVs (`cycles.materials.AOVS`).

    Textures are placed in Object coordinates, i.e. asset space, so they do not depend on the render's camera.
    """
    import bpy

    material = bpy.data.materials.new(name)
    material.use_nodes = True
    nodes, links = material.node_tree.nodes, material.node_tree.links
    bsdf = nodes["Principled BSDF"]
    colour = _base_colour_socket(recipe, nodes, links)
    links.new(colour, bsdf.inputs["Base Color"])
    values = {"roughness": recipe.roughness, "metallic": recipe.metallic, "specular": recipe.specular}
    bsdf.inputs["Roughness"].default_value = recipe.roughness
    bsdf.inputs["Metallic"].default_value = recipe.metallic
    bsdf.inputs["Specular IOR Level"].default_value = recipe.specular
    for aov_name, aov_type in AOVS.items():
        aov = nodes.new("ShaderNodeOutputAOV")
        aov.aov_name = aov_name
        if aov_type == "COLOR":
            links.new(colour, aov.inputs["Color"])
        else:
            aov.inputs["Value"].default_value = values[aov_name]
    return material


def _base_colour_socket(recipe: MaterialRecipe, nodes, links):
    """The output socket of the base colour: an RGB node, or two colours mixed by a procedural texture."""
    if recipe.texture == "plain":
        rgb = nodes.new("ShaderNodeRGB")
        rgb.outputs[0].default_value = (*recipe.base_color, 1.0)
        return rgb.outputs[0]
    node_types = {"noise": ("ShaderNodeTexNoise", "Fac"), "voronoi": ("ShaderNodeTexVoronoi", "Distance"),
                  "checker": ("ShaderNodeTexChecker", "Fac"), "wave": ("ShaderNodeTexWave", "Fac")}
    if recipe.texture not in node_types:
        raise NearError(f"unknown texture {recipe.texture!r}; known: {', '.join(TEXTURES)}")
    node_type, output = node_types[recipe.texture]
    texture = nodes.new(node_type)
    texture.inputs["Scale"].default_value = recipe.texture_scale
    links.new(nodes.new("ShaderNodeTexCoord").outputs["Object"], texture.inputs["Vector"])
    mix = nodes.new("ShaderNodeMix")
    mix.data_type = "RGBA"
    sockets = {s.identifier: s for s in (*mix.inputs, *mix.outputs)}  # names repeat per data type; identifiers don't
    sockets["A_Color"].default_value = (*recipe.base_color, 1.0)
    sockets["B_Color"].default_value = (*recipe.texture_color, 1.0)
    links.new(texture.outputs[output], sockets["Factor_Float"])
    return sockets["Result_Color"]
