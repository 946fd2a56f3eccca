"""Training objects from a `near datagen` folder, resized to the training image size and voxelized.

Only HDRI lightings train: the tokenizer needs an environment map, and an area-light frame has none (its lamp is not
in any map), so those frames are left out. Validation objects (`split` "val") and the held-out HDRIs never train.
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
from ..datagen.dataset import load_object
from ..datagen.lights import Light
from ..envmap import EnvMap
from ..errors import NearError
from ..frame import light_planes
from ..voxelize import voxelize_mesh

__all__ = ["TrainObject", "Sample", "list_objects", "load_training_object", "hdri", "hdri_planes"]

#: G-buffer passes supervised on the intrinsic pass, with their channel counts.
GBUFFERS: tuple[tuple[str, int], ...] = (("base_color", 3), ("roughness", 1), ("metallic", 1), ("normal", 3))


@dataclass
class TrainObject:
    """One object at training resolution S. Images are float32 tensors; `lit_*` cover the HDRI lights only."""

    id: str
    coords: np.ndarray  # int32 [N, 3] surface voxels
    cameras: list[Camera]  # the uniform views, [V]
    rgba: torch.Tensor  # [V, S, S, 4] uniform light, premultiplied
    depth: torch.Tensor  # [V, S, S] camera z of the first hit (1e10 on the background)
    gbuffers: dict[str, torch.Tensor]  # name -> [V, S, S, k] (premultiplied, as Cycles filters them)
    lights: list[Light]  # [L] HDRI lights
    lit_views: list[int]  # [K] indices into `cameras`
    lit_rgba: torch.Tensor  # [L, K, S, S, 4]


@dataclass(frozen=True)
class Sample:
    """What one training step looks at: an object, one of its HDRI lights and one of its lit views."""

    object: TrainObject
    light: int
    view: int  # index into `object.lit_views`


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


@functools.lru_cache(maxsize=64)
def hdri_planes(name: str, rotation_z: float, size: int) -> torch.Tensor:
    """The tokenizer's input planes [1, 9, size, size] of a bundled HDRI (strength 1), cached: a data set has few
    (HDRI, rotation) pairs and building the planes costs more than the tokenizer's forward pass at small sizes."""
    return light_planes(hdri(name), rotation_z, size)


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
    keep = [i for i, light in enumerate(lights) if light.kind == "hdri"]
    gbuffers = {name: _pool(data[name] if k > 1 else data[name][..., None], factor) for name, k in GBUFFERS}
    return TrainObject(
        id=Path(folder).name, coords=voxelize_mesh(data["vertices"], data["triangles"], resolution),
        cameras=cameras, rgba=_pool(data["rgba"], factor), depth=_pool(data["depth"][..., None], factor, "min")[..., 0],
        gbuffers=gbuffers, lights=[lights[i] for i in keep], lit_views=[int(v) for v in data["lit_views"]],
        lit_rgba=_pool(data["lit_rgba"][keep], factor))
