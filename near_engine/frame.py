"""One NeAR frame for one object, in its own asset space: light tokens -> LAD -> Gaussians -> shading -> two passes.

This is the per-frame half of NeAR's stage 2 (the IAD output `h, registers` is computed once per asset by the caller).
The pipeline layers caching, several objects and world/object transforms on top of these functions:

    tokens  = light_tokens(networks["hdri_encoder"], envmap, rotation_z)      # per environment map (+ object yaw)
    context = networks["renderer"].project_context(registers, tokens)        # optional, per (asset, light)
    frame   = decode_gaussians(networks, h, registers, tokens_or_context, camera_position=cam_pos_in_asset_space)
    passes  = rasterize_passes(frame.pass_gaussians(), camera, background)   # one object at the origin
    # several objects: frame.pass_gaussians().transformed(matrix_world) for each, PassGaussians.concatenate(...),
    # then rasterize_passes(joined, world_camera, background).

Nothing here forces `torch.no_grad()`: training needs the gradients, inference wraps the calls itself.

Facts of the official code this follows (Luh1124/NeAR at commit 163c214):

* **Camera position of the LAD.** `SLatGaussianRenderer.forward` (`trellis/models/structured_latent_vae/renderer_gs.py`
  l. 242-248) takes `cam_pos = inverse(extrinsics)[:, :3, 3]` and compares it with the voxel positions
  `(coord + 0.5) / 64` in [0, 1]^3. The *same* extrinsics then rasterize the Gaussians (`render_view`,
  `trellis/pipelines/near_image_to_relightable_3d.py` l. 407-412; `render_frames` in `trellis/utils/render_utils_rl.py`
  l. 66-67), whose means `get_xyz` (`gaussian_model.py` l. 316-317) are shifted by the aabb origin (-0.5, -0.5, -0.5)
  into the +-0.5 cube, and the cameras look at the origin (`render_utils_rl.py` l. 35). So the official `cam_pos` is the
  camera centre in the +-0.5 frame, i.e. **our asset-space camera position, unchanged** (not +0.5): the half-voxel-cube
  offset is a quirk *inside* the LAD's view embedding (it sees the camera as if it were 0.5 lower on every axis), and the
  trained weights expect exactly that. `models.lad.LightingAwareDecoder.view_embedding` reproduces the [0, 1] voxel
  positions, so `decode_gaussians` passes the asset-space camera position as is.
* **Shading runs per Gaussian, before rasterization.** `render_gsplat` (`trellis/renderers/gaussian_render.py`)
  l. 181: `global_normal_view = pc.get_normal_view(camera)` (world-frame normal: shortest axis under the lit scales
  ŝ, flipped to face the camera); l. 184: `batched_neural_basis(neural_basis, global_normal_view, rgb_features, ...)`
  gives per-Gaussian outputs; l. 185-187 split them into rgb (HDR), brightness, nush1; l. 198-206 rasterize them as
  Gaussian colours. It is not deferred shading.
* **Normal flip quirk.** `get_normal` / `get_normal_view` (`gaussian_model.py` l. 378-390) test
  `camera_center - self._xyz` with the unshifted [0, 1] `_xyz`; `shading_normals(flip_reference_offset=0.5)` does the
  same (`NORMAL_FLIP_OFFSET`).
* **Two passes** (`gaussian_render.py` l. 211-247), sharing means, quats and opacities: scales s with
  [base colour, metallic, roughness, pbr1, view normal from s] and scales ŝ with [rgb, shadow, brightness, nush1,
  hdri1, hdri2, view normal from ŝ], both "RGB+ED" (expected depth), antialiased. The final colour is the lit pass's
  rgb alone (l. 261; the shadow is not multiplied in) and is composited with the *lit* pass's alpha (`alpha_view`:
  `render_frames` l. 75 and 92, `render_relight_color_numpy` l. 492-496).
* **Normal passes** in the official code are view-space: `global_normal @ world_view_transform[:3, :3]` (l. 179, 182)
  turns world normals into OpenCV camera axes, then y and z are negated (l. 270-271), i.e. OpenGL view axes
  (x right, y up, z towards the viewer).

Design decisions:

* The `normal` pass is **world-space, unit length** by default (`normal_space="world"`): Cycles' Normal pass is
  world-space, and that is what Blender compositing set-ups (relighting with a Normal node, masks by orientation)
  expect. `normal_space="view"` gives the official OpenGL view-space normals instead, `"camera"` OpenCV camera axes.
  The composited normal (a weighted sum of unit normals) is renormalized where it is not zero.
* Intrinsic and lit passes are **premultiplied by their alpha** (composited over zero, as the official renders with a
  black background). Only `combined` gets the background: `rgb = colour + (1 - lit_alpha) * background`, with alpha =
  lit alpha (transparent film, no background) or 1 (background given), as Blender's Combined pass.
* Depth is the expected camera-space z of the pass (gsplat's "ED"); where the pass's alpha is 0 it is
  `BACKGROUND_DEPTH` = 1e10, the value Cycles writes for the background in its Depth pass.
* Scene-linear HDR throughout: no clamping of radiance (the ELU output may dip to -0.001, as the official), no
  tone-mapping.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .camera import Camera
from .envmap import EnvMap
from .gaussians import Gaussians
from .ibl import IBLLight, ShadingTerms, shade
from .models.blocks import BlockContext
from .models.gaussian_heads import (
    MATERIAL_CHANNELS,
    HeadGaussians,
    IntrinsicGaussians,
    LitParameters,
    heads_to_gaussians,
    facing_camera,
    shading_normals,
)
from .models.tokenizer import tokenizer_input
from .passes import gaussian_channels
from .raster import rasterize
from .sparse import SparseTensor
from .surfels import PER_VOXEL, surfel_normals, surfel_tensors, voxel_surfels
from .visibility import diffuse_occlusion, sphere_directions, surfel_visibility

__all__ = [
    "BACKGROUND_DEPTH",
    "NORMAL_FLIP_OFFSET",
    "DEFAULT_MATERIAL",
    "FrameGaussians",
    "PassGaussians",
    "INPUTS",
    "VoxelPriors",
    "ablation_inputs",
    "decoder_input",
    "material_latents",
    "surfel_materials",
    "light_planes",
    "light_tokens",
    "decode_gaussians",
    "rasterize_passes",
]

#: Depth written where a pass has no coverage (Cycles' background depth).
BACKGROUND_DEPTH = 1.0e10
#: The official normal flip compares the camera with the unshifted [0, 1] Gaussian positions (see module docstring).
NORMAL_FLIP_OFFSET = 0.5
_NORMAL_SPACES = ("world", "view", "camera")
#: Extra latents (`Asset.extras`) of near-tiny's material latents, with their channels.
MATERIAL_LATENTS: tuple[tuple[str, int], ...] = (("base_color", 3), ("material", 3))  # material: rough, metal, spec
#: The material of an asset that carries no material latents (assets from before them): Blender's default grey
#: dielectric (base 0.8^2.2 linear grey, roughness 0.5, metallic 0, Specular IOR Level 0.5).
DEFAULT_MATERIAL: tuple[float, ...] = (0.61, 0.61, 0.61, 0.5, 0.0, 0.5)
#: Extra of the materials at each surfel's centre, [V, PER_VOXEL * MATERIAL_CHANNELS] (`lift.encode`): the material
#: heads start from them instead of the voxel's, so painted detail keeps the surfels' resolution.
SURFEL_MATERIALS = "surfel_materials"


def material_latents(extras: Mapping[str, np.ndarray], count: int) -> np.ndarray:
    """The material latents [V, 6] (base colour, roughness, metallic, specular level) of an asset's extras, or
    `DEFAULT_MATERIAL` for assets without them. Partial or mis-shaped material latents are an error."""
    present = [name for name, _ in MATERIAL_LATENTS if name in extras]
    if not present:
        return np.tile(np.asarray(DEFAULT_MATERIAL, np.float32), (count, 1))
    if len(present) != len(MATERIAL_LATENTS):
        raise ValueError(f"the asset carries {', '.join(present)} but not all of "
                         f"{', '.join(n for n, _ in MATERIAL_LATENTS)}")
    parts = []
    for name, channels in MATERIAL_LATENTS:
        value = np.asarray(extras[name], np.float32)
        if value.shape != (count, channels):
            raise ValueError(f"the asset's {name} latent is {value.shape}, expected ({count}, {channels})")
        parts.append(value)
    return np.concatenate(parts, 1)


def surfel_materials(extras: Mapping[str, np.ndarray], count: int) -> np.ndarray | None:
    """The asset's materials per surfel [V * PER_VOXEL, 6] (checked), or None when it carries none."""
    if SURFEL_MATERIALS not in extras:
        return None
    value = np.asarray(extras[SURFEL_MATERIALS], np.float32)
    if value.shape != (count, PER_VOXEL * MATERIAL_CHANNELS):
        raise ValueError(f"the asset's {SURFEL_MATERIALS} are {value.shape}, expected "
                         f"({count}, {PER_VOXEL * MATERIAL_CHANNELS})")
    if not np.isfinite(value).all() or value.min() < 0 or value.max() > 1:
        raise ValueError(f"the asset's {SURFEL_MATERIALS} must be finite and in [0, 1]: re-encode it")
    return value.reshape(count * PER_VOXEL, MATERIAL_CHANNELS)


#: What a decoder may read, for the paper's input ablation (`train.loop.TrainConfig.inputs`).
INPUTS: tuple[str, ...] = ("lh+material", "lh", "shaded", "material")


def ablation_inputs(latent: torch.Tensor, materials: torch.Tensor, inputs: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The (latent, material latents) a decoder trained on `inputs` reads: a latent left out becomes zeros, left-out
    material latents become `DEFAULT_MATERIAL`. Training and rendering both go through here."""
    if inputs not in INPUTS:
        raise ValueError(f"inputs must be one of {', '.join(INPUTS)}, got {inputs!r}")
    if inputs == "material":
        latent = torch.zeros_like(latent)
    if "material" not in inputs:
        materials = torch.tensor(DEFAULT_MATERIAL, dtype=materials.dtype, device=materials.device).expand_as(
            materials).contiguous()
    return latent, materials


def decoder_input(latent: torch.Tensor, materials: torch.Tensor | None, latent_channels: int) -> torch.Tensor:
    """What the IAD reads: the latent alone, or (near-tiny) the latent and the material latents side by side."""
    if latent.shape[-1] == latent_channels:
        return latent
    if materials is not None and latent.shape[-1] + materials.shape[-1] == latent_channels:
        return torch.cat([latent, materials.to(latent)], -1)
    raise ValueError(f"the decoder reads {latent_channels} channels; the latent has {latent.shape[-1]}"
                     + (f" and the material latents {materials.shape[-1]}" if materials is not None else ""))


@dataclass(frozen=True)
class VoxelPriors:
    """What near-tiny's PBR core takes from the asset itself, per voxel: `materials` [V, 6] (its material latents)
    and `surfels` [V, `surfels.PER_VOXEL` * `surfels.SURFEL_CHANNELS`] (where the surface lies in the voxel: from the
    mesh when the asset carries them, else from the voxels alone), from which every Gaussian starts."""

    materials: torch.Tensor
    surfels: torch.Tensor
    at_surfels: bool = True  # False: weights from before surfels, whose Gaussians spread over the voxel (normals
    # still come from the surfels: without a mesh those are the voxel normals those weights were trained with)
    surfel_materials: torch.Tensor | None = None  # [V * PER_VOXEL, 6]: the materials at the surfels' centres
    visibility: torch.Tensor | None = None  # [V * PER_VOXEL, K] uint8: the directions each surfel sees

    @property
    def gaussian_materials(self) -> torch.Tensor:
        """The materials the material heads start from: one per Gaussian at its surfel where the asset has them
        (and the Gaussians sit at the surfels), else the voxel's material latents."""
        if self.surfel_materials is not None and self.at_surfels:
            return self.surfel_materials
        return self.materials

    @functools.cached_property
    def normals(self) -> torch.Tensor:
        """Unit normals [V * PER_VOXEL, 3], one per surfel (sign arbitrary: the renderer turns them to the camera);
        computed once per priors, which the pipeline caches per asset, not per frame."""
        return surfel_normals(self.surfels)

    @staticmethod
    def of(coords: np.ndarray, resolution: int, materials: np.ndarray, surfels: np.ndarray | None = None,
           device: torch.device | str = "cpu", surfel_materials: np.ndarray | None = None,
           visibility: bool = True) -> "VoxelPriors":
        """Priors of voxels `coords` with their material latents, surfels (default: `voxel_surfels`), the
        materials at the surfels ([V * PER_VOXEL, 6] or [V, PER_VOXEL * 6], optional) and what each surfel sees
        (`visibility.surfel_visibility`, ray-marched here unless `visibility` is False)."""
        if surfels is None:
            surfels = voxel_surfels(np.asarray(coords), int(resolution))
        seen = torch.from_numpy(surfel_visibility(coords, surfels, int(resolution))).to(device) if visibility else None
        per_surfel = None if surfel_materials is None else torch.from_numpy(
            np.array(surfel_materials, np.float32).reshape(-1, MATERIAL_CHANNELS)).to(device)
        return VoxelPriors(torch.from_numpy(np.ascontiguousarray(materials, np.float32)).to(device),
                           torch.from_numpy(np.array(surfels, np.float32)).to(device),  # a writable copy
                           surfel_materials=per_surfel, visibility=seen)


# ---------------------------------------------------------------------------------------------------------------------
# light


def light_planes(envmap: EnvMap, rotation_z: float | None = None, size: int = 512) -> torch.Tensor:
    """The tokenizer's input planes [1, 9, size, size] for `envmap` (its strength applied).

    `rotation_z` (radians, the official `hdri_rot`) defaults to the map's own Mapping rotation. For an object turned
    in the world, the pipeline passes the light's rotation as seen from the object's frame instead (DESIGN.md,
    "Lighting vs. object transforms").
    """
    rotation = envmap.rotation_z if rotation_z is None else float(rotation_z)
    pixels = envmap.pixels if envmap.strength == 1.0 else envmap.pixels * np.float32(envmap.strength)
    return tokenizer_input(pixels, rotation, size)[None]


def light_tokens(tokenizer: nn.Module, envmap: EnvMap, rotation_z: float | None = None, size: int = 512
                 ) -> torch.Tensor:
    """Light tokens [1, T, C] of `envmap` seen with Z rotation `rotation_z` (default: the map's own), strength applied.

    The planes are built on the CPU and moved to the tokenizer's device and dtype. `size` is the planes' side (512 for
    the official tokenizer; smaller works for small configurations).
    """
    weight = next(tokenizer.parameters())
    planes = light_planes(envmap, rotation_z, size).to(device=weight.device, dtype=weight.dtype)
    return tokenizer(planes)


# ---------------------------------------------------------------------------------------------------------------------
# decoding


@dataclass(frozen=True)
class FrameGaussians:
    """Everything one object needs for a frame, in asset space, one row per Gaussian (V voxels * G Gaussians).

    `normals` come from the intrinsic scales s (intrinsic pass), `lit_normals` from the lit scales ŝ (shading input);
    both unit, asset-space, facing `camera_position` (official flip). `radiance` [N, 3] is the shading MLP's HDR RGB,
    `shading_extra` [N, k] its other outputs (official: brightness, nush1).
    """

    intrinsic: IntrinsicGaussians
    lit: LitParameters
    normals: torch.Tensor
    lit_normals: torch.Tensor
    radiance: torch.Tensor
    shading_extra: torch.Tensor
    camera_position: torch.Tensor

    def __len__(self) -> int:
        return self.intrinsic.means.shape[0]

    def pass_gaussians(self) -> "PassGaussians":
        """The two rasterizable Gaussian batches (asset space): the intrinsic batch carries the "intrinsic" passes
        of `passes.PASSES`, the lit batch the lit colour and the "lit" passes."""
        g = self.intrinsic
        opacities = g.opacities.clamp_min(0.0)  # gsplat skips alpha < 1/255; negative tanh opacities never show
        intrinsic = Gaussians(g.means, g.quats, g.scales, opacities, {
            "base_color": g.base_color, "roughness": g.roughness, "metallic": g.metallic, "specular": g.pbr1,
            "normal": self.normals})
        lit = Gaussians(g.means, g.quats, self.lit.scales, opacities, {
            "color": self.radiance, "shadow": self.lit.shadow})
        return PassGaussians(intrinsic, lit)


@dataclass(frozen=True)
class PassGaussians:
    """The intrinsic (scales s) and lit (scales ŝ) Gaussian batches of one or more objects, same order and frame.

    The `normal` channel is in the frame of the means: `transformed` rotates it with them.
    """

    intrinsic: Gaussians
    lit: Gaussians

    def transformed(self, matrix: np.ndarray | torch.Tensor) -> "PassGaussians":
        """Apply a 4x4 similarity (an object's matrix_world) to both batches, normals included."""
        m = torch.as_tensor(np.asarray(matrix.detach().cpu() if isinstance(matrix, torch.Tensor) else matrix,
                                       dtype=np.float64))
        linear = m[:3, :3]
        rotation = (linear / torch.linalg.det(linear).abs().pow(1.0 / 3.0)).to(self.intrinsic.means)
        intrinsic = self.intrinsic.transformed(matrix)
        channels = dict(intrinsic.channels)
        channels["normal"] = self.intrinsic.channels["normal"] @ rotation.T
        return PassGaussians(replace(intrinsic, channels=channels), self.lit.transformed(matrix))

    @staticmethod
    def concatenate(parts: Sequence["PassGaussians"]) -> "PassGaussians":
        return PassGaussians(Gaussians.concatenate([p.intrinsic for p in parts]),
                             Gaussians.concatenate([p.lit for p in parts]))


def filter_2d(networks: Mapping[str, nn.Module]) -> float:
    """The 2D low-pass (pixels^2) the renderer's Gaussians are rasterized with: its representation config's
    `2d_filter_kernel_size`, as TRELLIS's renderer passes it to its rasterizer (mip-splatting's kernel_size, the
    same dilation with opacity compensation as gsplat's `eps2d`)."""
    return float(_network(networks, "renderer").rep_config.filter_2d_kernel_size)


def _network(networks: Mapping[str, nn.Module], key: str) -> nn.Module:
    if key not in networks:
        raise KeyError(f"networks lack {key!r} (have {', '.join(sorted(networks))})")
    return networks[key]


def decode_gaussians(
    networks: Mapping[str, nn.Module],
    h: SparseTensor | torch.Tensor,
    registers: torch.Tensor | None,
    light: torch.Tensor | Sequence[BlockContext],
    coords: torch.Tensor | None = None,
    resolution: int | None = None,
    *,
    camera_position: np.ndarray | torch.Tensor | Sequence[float],
    normal_flip_offset: float = NORMAL_FLIP_OFFSET,
    priors: VoxelPriors | None = None,
    ibl: IBLLight | None = None,
) -> FrameGaussians:
    """LAD + heads + shading for one object: IAD output -> per-Gaussian intrinsic and lit parameters and radiance.

    - `networks`: needs "renderer" (LAD) and "neural_basis" (shading MLP).
    - `h`: the IAD output, a single-object `SparseTensor` [V, C] (then `coords`/`resolution` come from it), or its
      features [V, C] with `coords` int [V, 3] voxel indices and `resolution`.
    - `registers` [1, R, C] from the IAD; `light`: light tokens [1, T, C] (`light_tokens`) or the LAD's projected
      context (`renderer.project_context(registers, tokens)`, then `registers` may be None).
    - `camera_position` [3]: the camera centre in this object's asset space (passed to the LAD as is; see the module
      docstring for why that is the official `cam_pos`).

    Follows `SLatGaussianRenderer.forward` + `to_representation` and `render_gsplat` l. 155-187: Gaussians from the
    four heads, normals from the smallest axis (s for the intrinsic pass, ŝ for shading) flipped towards the camera,
    then the shading MLP per Gaussian on (colour feature f, ŝ-normal).

    A shading MLP with the PBR core (near-tiny) also needs `priors` (the asset's material latents and surfels)
    and `ibl` (the prefiltered light, turned into this object's asset space): the material and geometry heads are
    residuals on the material latents and the surfels, every Gaussian takes its surfel's normal (towards the camera),
    and the MLP corrects the split-sum PBR radiance of the Gaussian's material (`ibl.shade`), whose diffuse term is
    dimmed by the light that the asset's own voxels block from its surfel (`priors.visibility`).
    """
    lad = _network(networks, "renderer")
    shading = _network(networks, "neural_basis")
    if isinstance(h, SparseTensor):
        if h.batch_size != 1:
            raise ValueError(f"decode_gaussians renders one object; h has batch size {h.batch_size}")
        if coords is not None and not torch.equal(coords.to(h.coords.device, torch.int32), h.coords[:, 1:]):
            raise ValueError("coords differ from the SparseTensor's own coordinates")
        if resolution is not None and resolution != h.resolution:
            raise ValueError(f"resolution {resolution} differs from the SparseTensor's {h.resolution}")
        tensor = h
    else:
        if coords is None or resolution is None:
            raise ValueError("decode_gaussians needs coords and resolution when h is a feature tensor")
        coords = torch.as_tensor(coords).to(h.device)
        tensor = SparseTensor.from_list([(coords, h)], int(resolution))
    if tensor.resolution != lad.resolution:
        raise ValueError(f"the asset's grid is {tensor.resolution}^3 but the LAD was trained on {lad.resolution}^3")
    feats = tensor.feats
    cam = torch.as_tensor(np.asarray(camera_position, dtype=np.float64) if not isinstance(camera_position, torch.Tensor)
                          else camera_position).to(device=feats.device, dtype=feats.dtype).reshape(3)
    if not bool(torch.isfinite(cam).all()):
        raise ValueError("camera_position must be finite")

    if isinstance(light, torch.Tensor):
        heads = lad(tensor, registers, light, cam[None])
    else:
        heads = lad(tensor, None, None, cam[None], context=list(light))

    config = replace(lad.rep_config, resolution=tensor.resolution)
    pbr_core = getattr(shading, "core", "none") == "pbr"
    if pbr_core:
        if priors is None or ibl is None:
            raise ValueError("this near-tiny has a PBR shading core: decode_gaussians needs the asset's priors and "
                             "the prefiltered light (ibl)")
        width = priors.surfels.shape[-1]
        if priors.materials.shape != (len(feats), MATERIAL_CHANNELS) or priors.surfels.shape[0] != len(feats):
            raise ValueError(f"priors must be [V={len(feats)}, {MATERIAL_CHANNELS}] materials and [V, {width}] "
                             "surfels")
        if config.num_gaussians != PER_VOXEL:
            raise ValueError(f"the PBR core starts its Gaussians at {PER_VOXEL} surfels per voxel; the LAD makes "
                             f"{config.num_gaussians}")
    surfels = surfel_tensors(priors.surfels) if pbr_core and priors.at_surfels else None
    gaussians: HeadGaussians = heads_to_gaussians(tensor.coords[:, 1:], heads["gs"], heads["pbr"], heads["scale"],
                                                  heads["rgb"], config, lad.offset_perturbation,
                                                  priors.gaussian_materials if pbr_core else None, surfels)
    g, lit = gaussians.intrinsic, gaussians.lit
    if not pbr_core:
        if "normal" in heads:
            raise ValueError("the LAD's normal_head corrects voxel normals, which only the PBR shading core uses")
        normals = shading_normals(g.quats, g.scales, cam, g.means, normal_flip_offset)
        lit_normals = shading_normals(g.quats, lit.scales, cam, g.means, normal_flip_offset)
        shaded = shading(lit.features, lit_normals)
        return FrameGaussians(g, lit, normals, lit_normals, shaded[:, :3], shaded[:, 3:], cam)
    normals = facing_camera(priors.normals.to(g.means), cam, g.means)
    if "normal" in heads:  # near-tiny's learned correction of the surfel normal (starts at zero), still facing
        corrected = torch.nn.functional.normalize(normals + heads["normal"].reshape(-1, 3).to(normals), dim=-1)
        normals = facing_camera(corrected, cam, g.means)
    view = torch.nn.functional.normalize(cam.reshape(1, 3) - g.means, dim=-1)
    # The materials enter the PBR terms detached: they are intrinsic and learn from the G-buffers alone, so lighting
    # errors are fixed where they belong (visibility factors, interreflection term) and not by darkening the base
    # colour, which is what the relit loss drove them to (a -0.03 shift of every base colour after 175 steps).
    terms = shade(g.base_color.detach(), g.roughness.detach(), g.metallic.detach(), g.pbr1.detach(), normals, view,
                  ibl)
    if priors.visibility is not None:  # the diffuse light the asset's own voxels block (`visibility`)
        directions = torch.from_numpy(sphere_directions(priors.visibility.shape[1])).to(normals)
        terms = ShadingTerms(terms.diffuse * diffuse_occlusion(priors.visibility, directions,
                                                               ibl.blurred_radiance(directions), normals),
                             terms.specular)
    shaded = shading(lit.features, normals, terms)
    return FrameGaussians(g, lit, normals, normals, shaded[:, :3], shaded[:, 3:], cam)


# ---------------------------------------------------------------------------------------------------------------------
# rasterization


def _background_tensor(background, camera: Camera, like: torch.Tensor) -> torch.Tensor | None:
    if background is None:
        return None
    if isinstance(background, EnvMap):
        background = background.background(camera)
    bg = torch.as_tensor(np.asarray(background, dtype=np.float32) if not isinstance(background, torch.Tensor)
                         else background).to(like)
    if tuple(bg.shape) not in ((3,), (camera.height, camera.width, 3)):
        raise ValueError(f"background must be [3] or [H, W, 3] = [{camera.height}, {camera.width}, 3], "
                         f"got {tuple(bg.shape)}")
    return bg


def _normals_to(normals: torch.Tensor, space: str, camera: Camera) -> torch.Tensor:
    if space == "world":
        return normals
    rot = torch.as_tensor(camera.world_to_camera[:3, :3]).to(normals)
    n = normals @ rot.T  # OpenCV camera axes
    if space == "view":  # OpenGL view axes, as the official (gaussian_render.py l. 270-271)
        n = n * torch.tensor([1.0, -1.0, -1.0]).to(n)
    return n


def rasterize_passes(
    gaussians: PassGaussians,
    camera: Camera,
    background: EnvMap | torch.Tensor | np.ndarray | Sequence[float] | None = None,
    *,
    normal_space: str = "world",
    filter_2d: float = 0.3,
    backend: str = "auto",
) -> dict[str, torch.Tensor]:
    """Rasterize the intrinsic and lit batches for `camera` (same frame as the Gaussians) -> passes, each [H, W, k].

    Intrinsic pass (scales s): "base_color" 3, "roughness" 1, "metallic" 1, "specular" 1 (pbr1: near-tiny's
    Specular IOR Level), "normal" 3 (unit, `normal_space`),
    "depth" 1, "alpha" 1. Lit pass (scales ŝ): "color" 3 (HDR, premultiplied), "shadow" 1, "lit_alpha" 1,
    "lit_depth" 1. "combined" 4: HDR RGBA, the lit colour over `background` (an EnvMap seen by this camera, [3] or
    [H, W, 3]); alpha is the lit alpha without background, 1 with one. Scene-linear, not tone-mapped.
    `filter_2d`: the rasterizer's 2D low-pass in pixels^2, the one the weights were trained with (`filter_2d`).
    """
    if normal_space not in _NORMAL_SPACES:
        raise ValueError(f"normal_space must be one of {_NORMAL_SPACES}, got {normal_space!r}")
    gi, gl = gaussians.intrinsic, gaussians.lit
    intrinsic = [p.name for p in gaussian_channels("intrinsic")]
    lit = ["color", *(p.name for p in gaussian_channels("lit"))]
    values = {**gi.channels, "normal": _normals_to(gi.channels["normal"], normal_space, camera)}
    out_i = rasterize(gi.means, gi.quats, gi.scales, gi.opacities, torch.cat([values[n] for n in intrinsic], -1),
                      camera, eps2d=filter_2d, backend=backend)
    out_l = rasterize(gl.means, gl.quats, gl.scales, gl.opacities, torch.cat([gl.channels[n] for n in lit], -1),
                      camera, eps2d=filter_2d, backend=backend)
    out = {**_split_channels(out_i.channels, intrinsic, gi.channels), **_split_channels(out_l.channels, lit,
                                                                                        gl.channels)}

    alpha, lit_alpha = out_i.alpha, out_l.alpha
    normal = out["normal"]
    length = torch.linalg.vector_norm(normal, dim=-1, keepdim=True)
    covered = length > 1e-12
    out["normal"] = torch.where(covered, normal / torch.where(covered, length, torch.ones_like(length)),
                                torch.zeros_like(normal))
    far = torch.full_like(out_i.depth, BACKGROUND_DEPTH)
    color = out["color"]
    bg = _background_tensor(background, camera, color)
    if bg is None:
        combined = torch.cat([color, lit_alpha], -1)
    else:
        combined = torch.cat([color + (1.0 - lit_alpha) * bg, torch.ones_like(lit_alpha)], -1)
    return {
        **out,
        "combined": combined,
        "lit_alpha": lit_alpha,
        "lit_depth": torch.where(lit_alpha > 0, out_l.depth, far),
        "depth": torch.where(alpha > 0, out_i.depth, far),
        "alpha": alpha,
    }


def _split_channels(stacked: torch.Tensor, names: Sequence[str], like: Mapping[str, torch.Tensor]
                    ) -> dict[str, torch.Tensor]:
    """Rasterized [H, W, sum k] channels -> {name: [H, W, k]}, k the width of the per-Gaussian channel `like[name]`."""
    return dict(zip(names, torch.split(stacked, [like[n].shape[-1] for n in names], dim=-1)))
