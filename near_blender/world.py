"""The World -> environment map conversion: what NeAR objects are lit by is what Cycles shows as the World.

Common worlds (a colour, or an equirectangular Environment Texture behind an optional Z-only Mapping rotation) are read
directly from Blender's data: the image's pixels plus the Mapping rotation and Background strength, which `EnvMap`
applies itself (so animating them costs no re-read). Every other world (procedural textures, Sky Texture, mixes,
mirror-ball projection, ...) is *baked*: rendered by Cycles through a panoramic equirectangular camera in a separate
process, because a nested render is impossible while our own RenderEngine.render() is running. Bakes are cached by a
signature of everything that changes them.

Nothing here changes the user's data: no data-block is created, modified or removed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import bpy
import numpy as np

from near_engine.envmap import EnvMap, EnvMapWarning
from near_engine.errors import EnvMapError
from near_engine.images import srgb_to_linear
from near_engine.pipeline import LRUCache

from .background import run_in_blender

#: Bake resolution (height; the width is twice that), Cycles samples per pixel and subprocess time limit.
BAKE_HEIGHT = 256
BAKE_SAMPLES = 16
BAKE_TIMEOUT_S = 300.0

# Byte-image colour spaces whose pixels we can turn into scene linear ourselves; any other one is baked.
_SRGB_SPACES = {"sRGB"}
_LINEAR_SPACES = {"Non-Color", "Linear Rec.709", "Linear", "Raw"}
# Node properties that only change how the node editor looks, not what the World emits (and the sockets, keyed apart).
_NODE_UI_PROPERTIES = {
    "rna_type", "name", "label", "location", "width", "height", "dimensions", "select", "show_options", "show_preview",
    "show_texture", "hide", "color", "use_custom_color", "parent", "inputs", "outputs", "internal_links",
    "location_absolute", "color_tag", "warning_propagation", "bl_width_default", "bl_width_min", "bl_width_max",
    "bl_height_default", "bl_height_min", "bl_height_max", "bl_icon", "bl_description", "bl_label", "bl_static_type",
    "bl_idname"}
# The same for the structs nodes hold (colour ramps, curves, texture mappings).
_STRUCT_UI_PROPERTIES = {"rna_type", "select"}


class _NeedsBake(Exception):
    """Raised while reading the node tree when the world is not one of the shapes we can read directly."""


def world_envmap(world: "bpy.types.World | None", *, bake_cache: LRUCache | None = None,
                 bake_height: int = BAKE_HEIGHT, bake_samples: int = BAKE_SAMPLES,
                 bake_timeout: float = BAKE_TIMEOUT_S,
                 background: "Callable[[str, PreparedBake], None] | None" = None) -> tuple[EnvMap, list[str]]:
    """The environment map Cycles would light with for `world` (original or evaluated), and warnings for the user.

    Raises EnvMapError for a world that cannot be used (an image that cannot be loaded, a failed bake). A World that
    must be baked and is not in `bake_cache` is baked here, unless `background` is given: then the prepared bake
    (`PreparedBake`) is handed to `background(key, bake)` and `BakeStarted` is raised, so the viewport never waits;
    the runner puts the result in the cache under `key` (on the main thread) for the next call.
    """
    messages: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", EnvMapWarning)
        if world is None:
            messages.append("No World: NeAR objects are lit by black; add a World in the Scene properties")
            env = EnvMap.uniform(0.0)
        elif not world.use_nodes or world.node_tree is None:
            env = EnvMap.uniform(tuple(world.color))
        else:
            try:
                env = _read_node_tree(world, messages)
            except _NeedsBake:
                env = _baked(world, messages, bake_cache, bake_height, bake_samples, bake_timeout, background)
    messages += [str(w.message) for w in caught if issubclass(w.category, EnvMapWarning)]
    return env, messages


# ---------------------------------------------------------------------------------------------------------------------
# reading the common node trees directly


def _linked_from(socket: "bpy.types.NodeSocket") -> "bpy.types.NodeSocket | None":
    """The output socket feeding `socket` (through reroutes), None when unlinked; muted parts need a bake."""
    while socket.is_linked:
        link = socket.links[0]
        if link.is_muted or not link.is_valid:
            raise _NeedsBake
        node = link.from_node
        if node.mute:
            raise _NeedsBake
        if node.type != "REROUTE":
            return link.from_socket
        socket = node.inputs[0]
    return None


def _world_output(tree: "bpy.types.NodeTree") -> "bpy.types.Node | None":
    """The World Output Cycles uses: the active one among those for All/Cycles, else the first of those."""
    outputs = [n for n in tree.nodes if n.type == "OUTPUT_WORLD" and n.target in ("ALL", "CYCLES") and not n.mute]
    return next((n for n in outputs if n.is_active_output), outputs[0] if outputs else None)


def _read_node_tree(world: "bpy.types.World", messages: list[str]) -> EnvMap:
    output = _world_output(world.node_tree)
    if output is None:
        messages.append(f"World '{world.name}' has no World Output node: NeAR objects are lit by black")
        return EnvMap.uniform(0.0)
    source = _linked_from(output.inputs["Surface"])
    if source is None:
        return EnvMap.uniform(0.0)
    background = source.node
    if background.type != "BACKGROUND" or background.inputs["Strength"].is_linked:
        raise _NeedsBake
    strength = float(background.inputs["Strength"].default_value)
    colour = _linked_from(background.inputs["Color"])
    if colour is None:
        return EnvMap.uniform(tuple(background.inputs["Color"].default_value)[:3], strength=strength)
    texture = colour.node
    if texture.type != "TEX_ENVIRONMENT" or colour.identifier != "Color" or texture.projection != "EQUIRECTANGULAR":
        raise _NeedsBake
    if texture.image is None:
        messages.append(f"World '{world.name}': the Environment Texture has no image, so Cycles shows magenta; "
                        f"open an image in it")
        return EnvMap.uniform((1.0, 0.0, 1.0), strength=strength)  # Cycles' missing-texture colour
    rotation_z = _texture_rotation(texture.inputs["Vector"])
    return _image_envmap(texture.image).with_settings(rotation_z=rotation_z, strength=strength)


#: Direct reads of World images, by what decides their pixels. Frames of an animation (and viewport updates) then
#: share one pixel array, so neither the read nor the pipeline's content hash of it is repeated.
_image_reads = LRUCache(2)


def clear_caches() -> None:
    """Forget cached image reads (on unregister)."""
    _image_reads.clear()


def _image_envmap(image: "bpy.types.Image") -> EnvMap:
    """The image as an EnvMap (rotation 0, strength 1); cached unless it has unsaved edits (painting changes it)."""
    image = _original(image)
    read = lambda: EnvMap.from_array(_image_rgb(image), name=f"World image '{image.name}'")  # noqa: E731
    return read() if image.is_dirty else _image_reads.get(_image_key(image), read)


def _texture_rotation(vector: "bpy.types.NodeSocket") -> float:
    """The Z rotation the Environment Texture's Vector input applies, when it is the ray direction rotated about Z."""
    source = _linked_from(vector)
    if source is None or _is_generated(source):
        return 0.0
    mapping = source.node
    if mapping.type != "MAPPING" or mapping.vector_type not in ("POINT", "TEXTURE"):
        raise _NeedsBake
    inputs = mapping.inputs
    if any(s.is_linked for s in (inputs["Location"], inputs["Rotation"], inputs["Scale"])):
        raise _NeedsBake
    rotation = tuple(inputs["Rotation"].default_value)
    if (any(v != 0.0 for v in inputs["Location"].default_value) or any(v != 1.0 for v in inputs["Scale"].default_value)
            or rotation[0] != 0.0 or rotation[1] != 0.0):
        raise _NeedsBake
    # The Mapping's own Vector input must be the ray direction: unlinked it is a constant (0, 0, 0), not the ray.
    inner = _linked_from(inputs["Vector"])
    if inner is None or not _is_generated(inner):
        raise _NeedsBake
    return float(rotation[2]) if mapping.vector_type == "POINT" else -float(rotation[2])


def _is_generated(socket: "bpy.types.NodeSocket") -> bool:
    """Texture Coordinate "Generated": in a World it is the ray direction."""
    return socket.node.type == "TEX_COORD" and socket.identifier == "Generated"


def _original(id_data: Any) -> Any:
    return id_data.original if getattr(id_data, "is_evaluated", False) else id_data


def _image_path(image: "bpy.types.Image") -> str:
    return bpy.path.abspath(image.filepath_raw, library=image.library) if image.filepath_raw else ""


def _check_loaded(image: "bpy.types.Image") -> None:
    """Load the image (reading `size` loads it) and fail clearly when that is impossible."""
    if tuple(image.size) == (0, 0) or not image.has_data:
        path = _image_path(image)
        raise EnvMapError(f"World image '{image.name}' could not be loaded from '{path}': the file is missing or "
                          f"unreadable; find it (File > External Data > Find Missing Files) or pack it")


def _image_rgb(image: "bpy.types.Image") -> np.ndarray:
    """The image as scene-linear RGB [H, W, 3], top row first, or _NeedsBake when Blender's data is not that.

    Float images are already scene linear in Blender (converted on load, as Cycles converts them). 8-bit sRGB texels
    are decoded exactly; Cycles decodes *after* interpolating them (measured), which differs only between the texels
    of a strongly magnified image, so it is not worth a bake.
    """
    image = _original(image)
    if image.source not in ("FILE", "GENERATED"):  # sequences, movies, UDIMs: frame/tile dependent
        raise _NeedsBake
    _check_loaded(image)
    width, height = image.size
    channels = image.channels
    if channels not in (3, 4):
        raise _NeedsBake
    space = image.colorspace_settings.name
    if not image.is_float and space not in _SRGB_SPACES | _LINEAR_SPACES:
        raise _NeedsBake
    flat = np.empty(width * height * channels, dtype=np.float32)
    image.pixels.foreach_get(flat)  # 20x faster than pixels[:]
    pixels = flat.reshape(height, width, channels)[::-1]  # Blender stores the bottom row first
    if channels == 4 and image.alpha_mode not in ("NONE", "CHANNEL_PACKED") and (pixels[..., 3] != 1.0).any():
        raise _NeedsBake  # Cycles un-premultiplies partly transparent texels; the bake reproduces that
    rgb = pixels[..., :3]
    if not image.is_float and space in _SRGB_SPACES:
        rgb = srgb_to_linear(rgb)
    return rgb


# ---------------------------------------------------------------------------------------------------------------------
# baking everything else with Cycles, in a subprocess


class BakeStarted(Exception):
    """`world_envmap` handed a World bake to its `background` runner: keep the previous light until it is done."""


def _baked(world: "bpy.types.World", messages: list[str], cache: LRUCache | None, height: int, samples: int,
           timeout: float, background: "Callable[[str, PreparedBake], None] | None") -> EnvMap:
    images: dict[str, "bpy.types.Image"] = {}
    key = hashlib.sha256(repr((_tree_key(world.node_tree, images, set()), tuple(world.color), height,
                               samples)).encode()).hexdigest()
    for image in images.values():
        if image.source != "GENERATED":
            _check_loaded(image)
        if image.is_dirty:
            messages.append(f"World image '{image.name}' has unsaved edits, which the World bake does not see: "
                            f"save the image")
    if cache is not None and key in cache:
        return cache.get(key, lambda: None)
    bake = PreparedBake(world, height, samples, timeout)
    if background is not None:
        background(key, bake)
        raise BakeStarted
    env = bake.run()
    if cache is not None:
        cache.put(key, env)
    return env


def _tree_key(tree: "bpy.types.NodeTree", images: dict, seen: set) -> tuple:
    """Everything in a node tree that changes what it renders (nodes, values, links, images, groups), as a tuple."""
    if tree.name_full in seen:
        return ("tree", tree.name_full)
    seen.add(tree.name_full)
    nodes = []
    for node in sorted(tree.nodes, key=lambda n: n.name):
        inputs = tuple((s.identifier, _value_key(getattr(s, "default_value", None), images, seen, 2))
                       for s in node.inputs)
        settings = _struct_key(node, images, seen, 6, _NODE_UI_PROPERTIES)
        nodes.append((node.name, node.bl_idname, node.mute, settings, inputs))
    links = sorted((link.from_node.name, link.from_socket.identifier, link.to_node.name, link.to_socket.identifier,
                    link.is_muted) for link in tree.links)
    return ("tree", tuple(nodes), tuple(links))


def _struct_key(struct: Any, images: dict, seen: set, depth: int,
                skip: set[str] = _STRUCT_UI_PROPERTIES) -> tuple:
    """The values of an RNA struct's settings (nested structs and collections included, to `depth`)."""
    values = []
    for prop in struct.bl_rna.properties:
        name = prop.identifier
        if name in skip:
            continue
        values.append((name, _value_key(getattr(struct, name, None), images, seen, depth - 1)))
    return tuple(values)


def _value_key(value: Any, images: dict, seen: set, depth: int) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, bpy.types.Image):
        image = _original(value)
        images[image.name_full] = image
        return _image_key(image)
    if isinstance(value, bpy.types.NodeTree):
        return _tree_key(value, images, seen)
    if isinstance(value, bpy.types.Object):
        return ("object", value.name_full, tuple(map(tuple, value.matrix_world)))
    if isinstance(value, bpy.types.Text):
        return ("text", value.name_full, hashlib.sha256(value.as_string().encode()).hexdigest())
    if isinstance(value, bpy.types.ID):
        return ("id", type(value).__name__, value.name_full)
    if isinstance(value, bpy.types.bpy_struct):
        return _struct_key(value, images, seen, depth) if depth > 0 else None
    if isinstance(value, (set, frozenset)):  # enum flags
        return tuple(sorted(value))
    try:
        return tuple(_value_key(v, images, seen, depth) for v in value)  # arrays and collections
    except TypeError:
        return repr(value)


def _image_key(image: "bpy.types.Image") -> tuple:
    """What decides an image's pixels as the bake sees them: source, file (and its modification), colour settings."""
    path = _image_path(image)
    try:
        stat = os.stat(path)
        file_state = (stat.st_mtime_ns, stat.st_size)
    except OSError:
        file_state = None
    packed = image.packed_file.size if image.packed_file else None
    generated = (image.generated_type, tuple(image.generated_color), image.generated_width,
                 image.generated_height, image.use_generated_float) if image.source == "GENERATED" else None
    return ("image", image.name_full, image.source, path, file_state, packed, generated,
            image.colorspace_settings.name, image.alpha_mode)


# The script the bake subprocess runs (argv[-1] is a JSON job). Everything it touches is its own throwaway scene.
_BAKE_SCRIPT = r"""
import json, math, sys
import bpy
job = json.loads(sys.argv[-1])
bpy.ops.wm.read_factory_settings(use_empty=True)
with bpy.data.libraries.load(job["blend"], link=False) as (source, target):
    target.worlds = [job["world"]]
world = target.worlds[0]
scene = bpy.context.scene
scene.world = world
# The evaluated values (animation, drivers) at the caller's frame replace the animation.
world.animation_data_clear()
world.color = job["color"]
if world.node_tree is not None:
    world.node_tree.animation_data_clear()
    for node_name, index, value in job["inputs"]:
        world.node_tree.nodes[node_name].inputs[index].default_value = value
world.cycles.sampling_method = "NONE"  # camera rays only: no importance map needed
scene.render.engine = "CYCLES"
cycles = scene.cycles
cycles.device = "CPU"
cycles.samples = job["samples"]
cycles.seed = 0
cycles.use_adaptive_sampling = False
cycles.use_denoising = False
cycles.pixel_filter_type = "BOX"  # a texel is the average over its own footprint
cycles.filter_width = 1.0
render = scene.render
render.resolution_x, render.resolution_y, render.resolution_percentage = 2 * job["height"], job["height"], 100
render.film_transparent = False
render.use_compositing = False
render.use_sequencer = False
scene.view_settings.view_transform = "Standard"
settings = render.image_settings
settings.file_format, settings.color_mode, settings.color_depth, settings.exr_codec = "OPEN_EXR", "RGB", "32", "ZIP"
data = bpy.data.cameras.new("Bake")
data.type, data.panorama_type = "PANO", "EQUIRECTANGULAR"
camera = bpy.data.objects.new("Bake", data)
camera.rotation_euler = (math.pi / 2, 0.0, -math.pi / 2)  # looks along +X, up +Z: the image centre faces +X
scene.collection.objects.link(camera)
scene.camera = camera
render.filepath = job["output"]
bpy.ops.render.render(write_still=True)
"""


def _evaluated_inputs(world: "bpy.types.World") -> list:
    """Every unlinked input value of the world's own tree as evaluated now (so animated values bake as shown)."""
    values = []
    for node in world.node_tree.nodes:
        for index, socket in enumerate(node.inputs):
            value = getattr(socket, "default_value", None)
            if isinstance(value, (bool, int, float)):
                values.append((node.name, index, value))
            elif value is not None and not isinstance(value, (str, bpy.types.bpy_struct)):
                values.append((node.name, index, [float(v) for v in value]))
    return values


class PreparedBake:
    """A World bake whose files are written (on Blender's main thread): `run()` does the slow, bpy-free part on any
    thread (Cycles in a separate Blender, then reading the map, rotation 0); `discard()` drops it unrun."""

    def __init__(self, world: "bpy.types.World", height: int, samples: int, timeout: float) -> None:
        original = _original(world)
        self.name, self.timeout = world.name, timeout
        self.folder = Path(tempfile.mkdtemp(prefix="near_world_bake_"))
        self.output = self.folder / "world.exr"
        try:
            blend = self.folder / "world.blend"
            bpy.data.libraries.write(str(blend), {original}, fake_user=True, path_remap="ABSOLUTE")
        except BaseException:
            self.discard()
            raise
        self.job = {"blend": str(blend), "world": original.name, "output": str(self.output), "height": int(height),
                    "samples": int(samples), "color": list(world.color), "inputs": _evaluated_inputs(world)}

    def run(self) -> EnvMap:
        try:
            run_in_blender(_BAKE_SCRIPT, self.job, timeout=self.timeout, what=f"Baking World '{self.name}' with Cycles",
                           error=EnvMapError)
            if not self.output.is_file():
                raise EnvMapError(f"Baking World '{self.name}' with Cycles wrote no image")
            baked = EnvMap.read(self.output)
        finally:
            self.discard()
        return EnvMap.from_array(baked.pixels, name=f"World '{self.name}' (baked)")

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
