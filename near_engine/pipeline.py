"""`NearPipeline`: scenes (NeAR objects + world light + camera) -> render passes, with the caches that keep it fast.

Layering (see `near_engine.frame`): per object, the IAD output of its asset (cached), light tokens of the world map as
seen from the object's frame (cached), the LAD + heads + shading in asset space, then the pass Gaussians are moved into
the world by the object's matrix_world. All objects are concatenated and rasterized once with the world camera.

**Light in an object's frame.** `EnvMap.sample(d)` looks the image up at `Rz(theta) d` (theta: the Mapping node's Z
rotation). An object whose matrix_world rotates by `Rz(phi)` sees, along its own direction `d_obj`, the world
direction `d = Rz(phi) d_obj`, so the radiance it receives is the image at `Rz(theta) Rz(phi) d_obj =
Rz(theta + phi) d_obj`: in its frame the world light has Mapping rotation **theta + phi** (`object_light_rotation`).
The tokenizer takes only a Z rotation, so phi is the yaw of matrix_world's rotation (the heading of its x axis in the
XY plane); a tilt of the object is ignored for the light (its camera position is still exact, the full inverse).

**Caches** (bounded LRU, `LRUCache` with hit/miss counters), keyed so that they invalidate exactly:

* `iad_cache`: the IAD output `(h, registers)` per `(asset.fingerprint(), weights_id)`;
* `light_cache`: light tokens per `(image content hash, object-frame rotation, weights_id)`. The tokenizer's
  backbone cannot be shared across rotations: the rotation rolls its input planes (with bilinear resampling) before
  the convolutions, so the whole tokenizer runs per key;
* `ibl_cache`: the split-sum terms of a world image (`ibl.prefilter`, near-tiny's PBR core) per image content hash:
  they do not depend on rotation, strength or weights (all applied at lookup).

**near-tiny's PBR core.** The IAD reads the asset's LH latent next to its material latents (`frame.MATERIAL_LATENTS`;
an asset from before them gets `frame.DEFAULT_MATERIAL`), and every frame shades with the prefiltered world light
turned into the object's frame by its full rotation (tilt included), so an object rotated in the world sees the
light rotated the other way exactly.

**Linear in strength by construction.** Light transport is linear in the light, so the tokenizer always sees the
World image at strength 1 and the lit radiance is multiplied by the Background strength afterwards: doubling the
strength doubles the object's colour exactly (as it doubles the background), and changing it costs no tokenizer
run. (A network fed the scaled image, f(s I), would only approximate s f(I); training targets are divided by the
strength to match.)

Renders never return a random network as a model: `from_pretrained` needs trained weights, a folder or a bundled model
("near-tiny", `bundled.py`); a configuration name with no trained weights ("near-official") raises `CheckpointError`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .asset import Asset
from .camera import Camera
from .bundled import BUNDLED_WEIGHTS, weights_folder
from .configs import CONFIGS, load_networks
from .envmap import EnvMap
from .errors import AssetError, CheckpointError, NearError
from .frame import (
    BACKGROUND_DEPTH,
    PassGaussians,
    VoxelPriors,
    ablation_inputs,
    decode_gaussians,
    decoder_input,
    filter_2d,
    light_tokens,
    material_latents,
    surfel_materials,
    rasterize_passes,
)
from .ibl import IBLLight, PrefilteredLight, prefilter
from .models.gaussian_heads import MATERIAL_CHANNELS
from .passes import BY_NAME, PASS_NAMES
from .sparse import SparseTensor
from .surfels import asset_surfels

__all__ = ["PASSES", "Scene", "LRUCache", "NearPipeline", "object_light_rotation", "check_render_size"]

#: The passes `render` can return: [H, W, k] float32, scene-linear (see `near_engine.frame.rasterize_passes`).
PASSES: tuple[str, ...] = PASS_NAMES  # `passes.PASSES`: the one table

#: Memory a render needs per pixel, all passes: the peak RSS of `near render` (near-tiny, 5,000 voxels, EXR with
#: every pass) grew by 135 bytes per pixel from 1024^2 (0.79 GB) to 2048^2 (1.21 GB), and 4096^2 was reported at
#: 4 GB (issue 11); 256 covers both.
RENDER_BYTES_PER_PIXEL = 256
#: The largest render the engine starts: 8 GiB by that estimate (e.g. 8192 x 4096; 4096 x 4096 needs 4 GiB).
MAX_RENDER_BYTES = 8 * 2**30


def check_render_size(width: int, height: int, what: str = "the render") -> None:
    """Refuse a render size whose estimated memory (`RENDER_BYTES_PER_PIXEL`) exceeds `MAX_RENDER_BYTES`, before
    anything is allocated, saying how much it would need."""
    need = int(width) * int(height) * RENDER_BYTES_PER_PIXEL
    if need > MAX_RENDER_BYTES:
        raise NearError(f"{what}: {width} x {height} pixels would need about {need / 2**30:.1f} GiB of memory, more "
                        f"than the {MAX_RENDER_BYTES // 2**30} GiB limit (a render uses about "
                        f"{RENDER_BYTES_PER_PIXEL} bytes per pixel); choose a smaller size")


@dataclass
class Scene:
    """What to render: NeAR objects (asset, 4x4 matrix_world) in Blender world space, the World light, a camera.

    `transparent` is Blender's transparent film: the combined pass has no background and carries the object's alpha.
    """

    objects: list[tuple[Asset, np.ndarray]]
    envmap: EnvMap
    camera: Camera
    transparent: bool = False


@dataclass
class LRUCache:
    """A small least-recently-used cache with hit/miss counters (what tests check to see what was recomputed)."""

    maxsize: int
    hits: int = 0
    misses: int = 0
    _items: OrderedDict = field(default_factory=OrderedDict, repr=False)

    def get(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        """The value for `key`, computing (and storing) it on a miss; the oldest entry goes beyond `maxsize`."""
        if key in self._items:
            self.hits += 1
            self._items.move_to_end(key)
            return self._items[key]
        self.misses += 1
        value = compute()
        self.put(key, value)
        return value

    def put(self, key: Hashable, value: Any) -> None:
        """Store `value` under `key` (replacing any), evicting the oldest entry beyond `maxsize`."""
        self._items[key] = value
        self._items.move_to_end(key)
        if len(self._items) > self.maxsize:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def clear(self) -> None:
        self._items.clear()


def object_light_rotation(world_rotation_z: float, matrix_world: np.ndarray) -> float:
    """The Mapping Z rotation the world light has in an object's frame: theta + yaw(matrix_world), in [-pi, pi].

    Derivation in the module docstring; the yaw is the heading of matrix_world's x axis (tilt ignored).
    """
    m = np.asarray(matrix_world, dtype=np.float64)
    yaw = math.atan2(m[1, 0], m[0, 0])
    return math.remainder(world_rotation_z + yaw, 2 * math.pi)


def _folder_id(folder: Path) -> str:
    """Weights id of a folder: its path plus the size and modification time of every weights file, so weights
    overwritten in place get a new id and cannot be served from caches filled with the old ones."""
    stamps = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*.safetensors"))
    return f"{folder.resolve()}:{hashlib.sha256(repr(stamps).encode()).hexdigest()[:16]}"


def _resolve_device(device: str | torch.device) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _check_matrix(matrix: np.ndarray, index: int) -> np.ndarray:
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape != (4, 4) or not np.isfinite(m).all() or abs(np.linalg.det(m[:3, :3])) < 1e-12:
        raise NearError(f"scene object {index}: matrix_world must be a finite, invertible 4x4 matrix")
    linear = m[:3, :3]
    det = np.linalg.det(linear)
    if det < 0 or not np.allclose(linear.T @ linear / abs(det) ** (2 / 3), np.eye(3), atol=1e-4):
        raise NearError(f"scene object {index}: NeAR objects can be rotated, moved and scaled uniformly, not "
                        "mirrored, sheared or scaled unevenly (apply such a transform to the mesh before encoding)")
    return m


class NearPipeline:
    """NeAR stage 2 on a set of networks ("decoder", "hdri_encoder", "renderer", "neural_basis").

    `weights_id` names the weights (a folder path, a checkpoint hash...): it is part of every cache key, so two
    different weights must never share an id. `light_size` is the side of the tokenizer's input planes (512 for the
    official tokenizer; small configurations may use less).
    """

    def __init__(self, networks: Mapping[str, nn.Module], weights_id: str, device: str | torch.device = "cpu", *,
                 light_size: int = 512, cache_size: int = 8, inputs: str = "lh+material",
                 placement: str = "surfels", self_occlusion: bool = True) -> None:
        self.device = _resolve_device(device)
        self.placement = str(placement)  # where near-tiny's Gaussians start: "surfels", or "voxels" (older weights)
        self.self_occlusion = bool(self_occlusion)  # the PBR core dims the light the asset's own voxels block
        self.light_size = int(light_size)
        self.inputs = str(inputs)  # what the decoder was trained to read (`train.loop.INPUTS`)
        self.iad_cache = LRUCache(cache_size)
        self.light_cache = LRUCache(cache_size)
        self.ibl_cache = LRUCache(cache_size)
        self._image_hashes = LRUCache(cache_size)
        self._lock = threading.RLock()  # a viewport thread and a final render may share one pipeline
        self.set_networks(networks, weights_id)

    @classmethod
    def from_pretrained(cls, name_or_folder: str | Path, device: str | torch.device = "auto",
                        **kwargs: Any) -> "NearPipeline":
        """Load a weights folder (our format or the official NeAR layout) onto `device` ("auto": CUDA if present).

        "near-tiny" names the weights that ship inside near_engine (`bundled.py`). The `light_size` and `inputs`
        saved in the folder's pipeline settings are used unless passed, and so is where the Gaussians start
        (`placement`): weights whose settings do not say "gaussians": "surfels" were trained before surfels and
        spread their Gaussians over the voxels.
        """
        if str(name_or_folder) in CONFIGS and str(name_or_folder) not in BUNDLED_WEIGHTS:
            raise CheckpointError(f"no trained weights ship for {name_or_folder!r}; pass a weights folder "
                                  "(our format or the official NeAR layout)")
        folder = weights_folder(name_or_folder)
        resolved = _resolve_device(device)
        networks, settings = load_networks(folder, resolved)
        if "light_size" in settings and "light_size" not in kwargs:
            kwargs["light_size"] = int(settings["light_size"])
        if isinstance(settings.get("inputs"), str) and "inputs" not in kwargs:
            kwargs["inputs"] = settings["inputs"]
        kwargs.setdefault("placement", "surfels" if settings.get("gaussians") == "surfels" else "voxels")
        pipeline = cls(networks, _folder_id(folder), resolved, **kwargs)
        pipeline.folder = Path(folder)
        return pipeline

    #: The weights folder `from_pretrained` read (None for networks passed in): `lift` reads its lift networks.
    folder: Path | None = None

    def lift(self, image: str | Path, *, mesh: Any = None, geometry: str | None = None, mesh_rotation: float = 0.0,
             elevation: float = 0.0, seed: int = 0, progress: Callable[[str, float], object] | None = None,
             cancel: Callable[[], bool] | None = None) -> Asset:
        """Stage 1: a photo -> a relightable asset for these weights (prepare image, sample structure, sample
        latent; see `near_engine.lift`)."""
        from .lift import LiftRequest, lift_image

        if self.folder is None:
            raise NearError("this pipeline was built from networks, not a weights folder: lift with "
                            "`near_engine.lift.lift_image` and a weights folder")
        request = LiftRequest(image, self.folder, geometry, mesh, mesh_rotation, elevation, seed)
        return lift_image(request, progress, cancel)

    def set_networks(self, networks: Mapping[str, nn.Module], weights_id: str) -> None:
        """Use other weights; cached results of the previous weights stay keyed by their own id."""
        self.networks = {key: module.to(self.device).eval() for key, module in networks.items()}
        self.weights_id = str(weights_id)

    # ---- caches --------------------------------------------------------------------------------------------------

    def _image_hash(self, pixels: np.ndarray) -> str:
        """Content hash of an environment image, computed once per array (EnvMap pixels are read-only).

        Entries hold only a weak reference, so cached hashes never keep a large HDRI alive; an id reused by another
        array fails the identity check and is hashed afresh.
        """
        def entry() -> tuple[weakref.ref, str]:
            h = hashlib.sha256(repr((pixels.shape, pixels.dtype.str)).encode())
            h.update(np.ascontiguousarray(pixels).data)
            return weakref.ref(pixels), h.hexdigest()

        ref, digest = self._image_hashes.get(id(pixels), entry)
        if ref() is not pixels:  # the id belonged to an array that is gone
            ref, digest = entry()
            self._image_hashes.put(id(pixels), (ref, digest))
        return digest

    @property
    def pbr_core(self) -> bool:
        """Whether the shading network has near-tiny's physically based core (`ibl`)."""
        return getattr(self.networks.get("neural_basis"), "core", "none") == "pbr"

    def _iad(self, asset: Asset) -> tuple[SparseTensor, torch.Tensor, VoxelPriors | None]:
        """The IAD output of `asset` and, with the PBR core, its voxel priors (material latents and surfels)."""
        decoder = self.networks["decoder"]
        extra = decoder.latent_channels - asset.channels
        if (extra not in (0, MATERIAL_CHANNELS if self.pbr_core else 0)
                or asset.resolution != decoder.resolution):
            raise AssetError(
                f"this asset ({asset.channels} latent channels on a {asset.resolution}^3 grid, made with "
                f"'{asset.model or 'unknown weights'}') does not fit the loaded weights, which expect "
                f"{decoder.latent_channels - (MATERIAL_CHANNELS if self.pbr_core else 0)} channels on a "
                f"{decoder.resolution}^3 grid: re-encode it with these weights")

        def compute() -> tuple[SparseTensor, torch.Tensor, VoxelPriors | None]:
            coords = torch.from_numpy(np.array(asset.coords)).to(self.device)
            feats = torch.from_numpy(np.array(asset.feats)).to(self.device)
            priors = None
            if self.pbr_core:
                try:
                    materials = material_latents(asset.extras, asset.num_voxels)
                    surfels = asset_surfels(asset.extras, asset.coords, asset.resolution)
                    per_surfel = (surfel_materials(asset.extras, asset.num_voxels) if "material" in self.inputs
                                  else None)
                except (ValueError, NearError) as exc:
                    raise AssetError(f"this asset's extra latents cannot be used: {exc}") from None
                priors = VoxelPriors.of(asset.coords, asset.resolution, materials, surfels, self.device, per_surfel,
                                        visibility=self.self_occlusion)
                try:
                    feats, used = ablation_inputs(feats, priors.materials, self.inputs)
                except ValueError as exc:
                    raise CheckpointError(f"the weights' pipeline.json: {exc}") from None
                priors = dataclasses.replace(priors, materials=used, at_surfels=self.placement == "surfels")
                feats = decoder_input(feats, priors.materials, decoder.latent_channels)
            h, registers = decoder(SparseTensor.from_list([(coords, feats)], asset.resolution))
            return h, registers, priors

        return self.iad_cache.get((asset.fingerprint(), self.weights_id, self.inputs, self.placement,
                                   self.self_occlusion), compute)

    def prefiltered_light(self, envmap: EnvMap) -> PrefilteredLight:
        """The split-sum terms of `envmap`'s image (`ibl.prefilter`), cached by image content."""
        key = self._image_hash(envmap.pixels)
        return self.ibl_cache.get(key, lambda: prefilter(envmap).to(self.device))

    def _light(self, envmap: EnvMap, rotation: float) -> torch.Tensor:
        key = (self._image_hash(envmap.pixels), rotation, self.weights_id)
        return self.light_cache.get(key, lambda: light_tokens(self.networks["hdri_encoder"],
                                                              envmap.with_settings(strength=1.0), rotation,
                                                              self.light_size))

    # ---- rendering -----------------------------------------------------------------------------------------------

    def gaussians(self, scene: Scene, *, progress: Callable[[float], None] | None = None) -> PassGaussians:
        """The scene's objects as world-space Gaussians, decoded for its camera and light (what `render` rasterizes).

        `progress(fraction)` is called after each object; an exception it raises stops the work and propagates.
        """
        if not scene.objects:
            raise NearError("the scene has no NeAR objects")
        camera, envmap = scene.camera, scene.envmap
        parts = []
        with self._lock, torch.no_grad():
            for index, (asset, matrix) in enumerate(scene.objects):
                m = _check_matrix(matrix, index)
                h, registers, priors = self._iad(asset)
                tokens = self._light(envmap, object_light_rotation(envmap.rotation_z, m))
                camera_in_asset = (np.linalg.inv(m) @ np.append(camera.position, 1.0))[:3]
                ibl = (IBLLight.for_frame(self.prefiltered_light(envmap), envmap.rotation_z, m[:3, :3])
                       if self.pbr_core else None)
                frame = decode_gaussians(self.networks, h, registers, tokens, camera_position=camera_in_asset,
                                         priors=priors, ibl=ibl)
                parts.append(_scale_radiance(frame.pass_gaussians(), envmap.strength).transformed(m))
                if progress is not None:
                    progress((index + 1) / (len(scene.objects) + 1))
        return PassGaussians.concatenate(parts)

    def render(self, scene: Scene, passes: Sequence[str] = ("combined",), *,
               progress: Callable[[float], None] | None = None) -> dict[str, np.ndarray]:
        """The requested `passes` (names in `PASSES`) of `scene`, each float32 [H, W, k] on the CPU.

        "combined" is HDR RGBA: the objects over the World's background (alpha 1), or with `scene.transparent` the
        premultiplied object colour and its alpha. Other passes: see `near_engine.frame.rasterize_passes`. A scene
        without objects renders the world alone (empty passes), as Blender does. `progress(fraction)` is called as
        objects are decoded; an exception it raises (a user's cancel) stops the render and propagates.
        """
        passes = tuple(passes)
        unknown = [p for p in passes if p not in PASSES]
        if unknown or not passes:
            raise NearError(f"unknown render pass(es) {', '.join(map(repr, unknown)) or '(none requested)'}; "
                             f"available: {', '.join(PASSES)}")
        check_render_size(scene.camera.width, scene.camera.height)
        if not scene.objects:
            return _world_only(scene, passes)
        with self._lock, torch.no_grad():
            gaussians = self.gaussians(scene, progress=progress)
            background = None if scene.transparent else scene.envmap.background(scene.camera)
            out = rasterize_passes(gaussians, scene.camera, background, filter_2d=filter_2d(self.networks))
        return {name: out[name].detach().cpu().numpy() for name in passes}


def _scale_radiance(gaussians: PassGaussians, strength: float) -> PassGaussians:
    """The lit colour under a World `strength` times brighter (light transport is linear in the light)."""
    if strength == 1.0:
        return gaussians
    lit = gaussians.lit
    channels = {**lit.channels, "color": lit.channels["color"] * float(strength)}
    return PassGaussians(gaussians.intrinsic, dataclasses.replace(lit, channels=channels))


def _world_only(scene: Scene, passes: Sequence[str]) -> dict[str, np.ndarray]:
    """The passes of a scene with no objects: the background (or nothing), empty depth and intrinsics."""
    h, w = scene.camera.height, scene.camera.width
    out = {name: np.zeros((h, w, BY_NAME[name].channels), np.float32) for name in passes}
    if "combined" in out and not scene.transparent:
        out["combined"][..., :3] = scene.envmap.background(scene.camera)
        out["combined"][..., 3] = 1.0
    if "depth" in out:
        out["depth"][:] = BACKGROUND_DEPTH
    return out
