"""Training objects from a `near datagen` folder, resized to the training image size and voxelized.

Only lightings that an environment map describes train (HDRIs, baked skies, and the uniform light of the G-buffer
views): the tokenizer and the PBR core need the map, and an area-light frame has none. Validation objects (`split`
"val") and the held-out HDRIs never train. Each object also carries its material latents, its surfels and the
materials at them (`lift.encode.material_extras` of its G-buffers), computed once when it is loaded.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..blender_data import blender_hdri
from ..camera import Camera
from ..cycles.lights import UNIFORM, Light
from ..datagen.dataset import load_object
from ..envmap import EnvMap
from ..errors import NearError
from ..frame import SURFEL_MATERIALS, VoxelPriors, light_planes
from ..ibl import PrefilteredLight, prefilter
from ..surfels import mesh_surfels
from ..voxelize import voxelize_mesh
from ..lift.encode import material_extras

__all__ = ["TrainObject", "Sample", "list_objects", "load_training_object", "hdri", "hdri_planes", "LightSource"]

#: G-buffer passes supervised on the intrinsic pass, with their channel counts.
GBUFFERS: tuple[tuple[str, int], ...] = (("base_color", 3), ("roughness", 1), ("metallic", 1), ("specular", 1),
                                         ("normal", 3))
#: The uniform light as an environment map: radiance 1 (the light's strength 0.6 divides the targets).
UNIFORM_MAP = EnvMap.uniform(1.0, height=8)


@dataclass(frozen=True)
class LightSource:
    """One training light: its `Light` record, and the environment map (strength 1, rotation 0) it shows."""

    light: Light
    envmap: EnvMap

    def planes(self, size: int) -> torch.Tensor:
        """The tokenizer's input planes [1, 9, size, size] at the light's rotation (cached per map)."""
        return _planes(self, size)

    def prefiltered(self) -> PrefilteredLight:
        """The map's split-sum terms (`ibl.prefilter`), computed once per map."""
        return _prefiltered_map(self.envmap)


@functools.lru_cache(maxsize=512)
def _planes(source: LightSource, size: int) -> torch.Tensor:
    return light_planes(source.envmap, source.light.rotation_z, size)


_PREFILTERED: dict[int, tuple[EnvMap, PrefilteredLight]] = {}


def _prefiltered_map(envmap: EnvMap) -> PrefilteredLight:
    """One prefiltered set per map (a bundled HDRI is shared by many objects and rotations); the entry holds the map,
    so its id cannot be reused while it is cached."""
    entry = _PREFILTERED.get(id(envmap))
    if entry is None or entry[0] is not envmap:
        entry = _PREFILTERED[id(envmap)] = (envmap, prefilter(envmap))
    return entry[1]


@dataclass
class TrainObject:
    """One object at training resolution S. Images are float32 tensors; `lit_*` cover the HDRI lights only."""

    id: str
    coords: np.ndarray  # int32 [N, 3] surface voxels
    cameras: list[Camera]  # the uniform views, [V]
    rgba: torch.Tensor  # [V, S, S, 4] uniform light, premultiplied
    depth: torch.Tensor  # [V, S, S] camera z of the first hit (1e10 on the background)
    gbuffers: dict[str, torch.Tensor]  # name -> [V, S, S, k] (premultiplied, as Cycles filters them)
    lights: list[LightSource]  # [L] lights with an environment map (HDRIs, skies)
    lit_views: list[int]  # [K] indices into `cameras`
    lit_rgba: torch.Tensor  # [L, K, S, S, 4]
    materials: np.ndarray  # [N, 6] material latents (base colour, roughness, metallic, specular level)
    priors: VoxelPriors  # material latents and the mesh's surfels as tensors


@dataclass(frozen=True)
class Sample:
    """One supervised image: an object, one of its lights (-1: the uniform light, then `view` indexes all views)
    and one of its lit views (an index into `object.lit_views`)."""

    object: TrainObject
    light: int
    view: int

    @property
    def camera_index(self) -> int:
        return self.view if self.light < 0 else self.object.lit_views[self.view]

    @property
    def source(self) -> LightSource:
        return UNIFORM_SOURCE if self.light < 0 else self.object.lights[self.light]

    def target(self) -> torch.Tensor:
        """The Cycles image [S, S, 4] (premultiplied RGBA, the light's strength still in)."""
        return self.object.rgba[self.view] if self.light < 0 else self.object.lit_rgba[self.light, self.view]


UNIFORM_SOURCE = LightSource(UNIFORM, UNIFORM_MAP)


def list_objects(data: str | Path, split: str = "train") -> list[Path]:
    """The finished objects (done.json) of a data set folder in the given split, sorted by id."""
    folders = sorted(p.parent for p in Path(data).glob("objects/*/done.json"))
    chosen = [f for f in folders if json.loads((f / "meta.json").read_text())["split"] == split]
    if not chosen:
        raise NearError(f"{data}: no finished {split} objects (run `near datagen` first)")
    return chosen


@functools.lru_cache(maxsize=16)
def hdri(name: str) -> EnvMap:
    """Blender's bundled HDRI `name` at strength 1, no rotation (each light applies its own)."""
    return EnvMap.read(blender_hdri(name))


def hdri_planes(name: str, rotation_z: float, size: int) -> torch.Tensor:
    """The tokenizer's input planes [1, 9, size, size] of a bundled HDRI (strength 1, cached)."""
    return LightSource(Light("hdri", name, rotation_z, 1.0), hdri(name)).planes(size)


def light_source(light: Light, folder: Path) -> LightSource:
    """The environment map of a data-set light: a bundled HDRI, or the object's baked sky (`sky.exr`)."""
    if light.kind == "hdri":
        return LightSource(light, hdri(light.hdri))
    if light.kind == "sky":
        return LightSource(light, EnvMap.read(folder / "sky.exr"))
    raise NearError(f"light {light.name} has no environment map")


def _pool(images: np.ndarray, factor: int, mode: str = "mean") -> torch.Tensor:
    """[..., H, W, C] -> [..., H/f, W/f, C]: box average (premultiplied values), or the minimum (depth)."""
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    if factor == 1:
        return x
    lead, (h, w, c) = x.shape[:-3], x.shape[-3:]
    flat = x.reshape(-1, h, w, c).permute(0, 3, 1, 2)
    pooled = F.avg_pool2d(flat, factor) if mode == "mean" else -F.max_pool2d(-flat, factor)
    return pooled.permute(0, 2, 3, 1).reshape(*lead, h // factor, w // factor, c).contiguous()


def load_training_object(folder: str | Path, size: int, resolution: int) -> TrainObject:
    """Load, resize (box filter by an integer factor) and voxelize one finished object for training."""
    data = load_object(folder)
    height = data["rgba"].shape[1]
    if size <= 0 or height % size:
        raise NearError(f"training size {size} must divide the rendered size {height}")
    factor = height // size
    cameras = [Camera(c["width"], c["height"], c["fx"], c["fy"], c["cx"], c["cy"],
                      np.array(c["world_to_camera"])).scaled(1.0 / factor) for c in data["meta"]["cameras"]]
    lights = [Light.from_json(light) for light in data["meta"]["lights"]]
    keep = [i for i, light in enumerate(lights) if light.kind in ("hdri", "sky")]
    gbuffers = {name: _pool(data[name] if k > 1 else data[name][..., None], factor) for name, k in GBUFFERS}
    coords = voxelize_mesh(data["vertices"], data["triangles"], resolution)
    rgba = _pool(data["rgba"], factor)
    depth = _pool(data["depth"][..., None], factor, "min")[..., 0]
    surfels = mesh_surfels(data["vertices"], data["triangles"], coords, resolution)
    extras = material_extras(gbuffers, rgba[..., 3:], cameras, depth, coords, surfels, resolution)
    materials = np.concatenate([extras["base_color"], extras["material"]], 1)
    return TrainObject(
        id=Path(folder).name, coords=coords, cameras=cameras, rgba=rgba, depth=depth, gbuffers=gbuffers,
        lights=[light_source(lights[i], Path(folder)) for i in keep], lit_views=[int(v) for v in data["lit_views"]],
        lit_rgba=_pool(data["lit_rgba"][keep], factor), materials=materials,
        priors=VoxelPriors.of(coords, resolution, materials, surfels, surfel_materials=extras[SURFEL_MATERIALS]))
