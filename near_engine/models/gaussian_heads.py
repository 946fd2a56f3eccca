"""From the renderer's raw per-voxel head outputs to Gaussians: NeAR's `to_representation` + `Gaussian_view`, anew.

The four heads of the official renderer (`SLatGaussianRenderer`, `renderer_gs.py` in Luh1124/NeAR) give, per voxel and
for G Gaussians per voxel (G = 32), **attribute-major** blocks (all G offsets, then all G base colours, ...):

=============  ====================================================================================================
``gs_out``     ``[xyz G*3 | base_color G*3 | scaling G*3 | rotation G*4 | opacity G*1]`` = 14 G (448)
``pbr_out``    ``[roughness G | metallic G | pbr1 G]`` = 3 G (96)
``scale_out``  ``[scaling_view G*3]`` = 3 G (96), the "lit" scales ŝ
``rgb_out``    ``[rgb G*32 | shadow G | hdri1 G | hdri2 G]`` = 35 G (1120); rgb is the colour feature f
=============  ====================================================================================================

Within a block each Gaussian's components are contiguous (``reshape(G, k)``). Every raw value is first multiplied by
its attribute's ``lr``; then the activations of `Gaussian_view` (`trellis/representations/gaussian/gaussian_model.py`)
and of the renderer (`trellis/renderers/gaussian_render.py`) apply:

- position ``x = c + tanh(o * lr + p) / R * 0.5 * voxel_size`` with ``c`` the voxel centre and ``p`` the atanh'd
  Hammersley buffer (`hammersley_offsets`); with zero offsets the 32 Gaussians sit at the Hammersley points
  ``c + (2 h - 1) / (2 R)`` spread over the voxel;
- base colour ``max(SH_C0 * raw + 0.5, 0)`` (degree-0 SH evaluation, as the renderer does before rasterizing);
- scales ``sqrt(softplus(raw + softplus^-1(scaling_bias))^2 + min_kernel_size^2)`` for both s and ŝ
  (``min_kernel_size`` is the config's ``3d_filter_kernel_size``; ``exp`` instead of softplus if so configured);
- rotation ``normalize(raw * 0.1 + (1, 0, 0, 0))``, (w, x, y, z) as in gsplat;
- opacity ``tanh(raw + atanh(opacity_bias))``, in (-1, 1): negative values are *not* clamped by the reference, and
  gsplat simply skips any Gaussian whose alpha is below 1/255, so `IntrinsicGaussians.to_gaussians` clamps at 0;
- roughness, metallic, pbr1, shadow, hdri1, hdri2: sigmoid; the colour feature f: identity.

**Voxel centres.** The reference computes ``_xyz = (coord + 0.5) / R`` in [0, 1] and its ``get_xyz`` adds the aabb
origin ``(-0.5, -0.5, -0.5)`` (aabb ``[-0.5, -0.5, -0.5, 1, 1, 1]``), so the rendered means are exactly our asset-space
convention ``(i + 0.5) / R - 0.5`` (DESIGN.md); `voxel_centres` returns that. Two reference code paths use the
*unshifted* [0, 1] position instead: the LAD's view embedding (``xyz - cam_pos`` with ``xyz = (coord + 0.5) / R``) and
the normal flip of `get_normal` / `get_normal_view` (``camera_center - _xyz``). `shading_normals` takes
``flip_reference_offset=0.5`` to reproduce the latter bit for bit.

**Config values.** NeAR ships no config for the renderer, so `RepresentationConfig` defaults to TRELLIS's GS-decoder
``representation_config`` (``slat_vae_enc_dec_gs_swin8_B_64l8_fp16.json``: voxel_size 1.5, scaling_bias 4e-3,
opacity_bias 0.1, 3d_filter_kernel_size 9e-4, softplus, lr 1 except rotation 0.1), extended with lr 1 for NeAR's extra
attributes, exactly as listed in ``reference/checkpoints/near_renderer.json``. All are fields that can be changed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

import torch
from torch.nn import functional as F

from ..gaussians import SH_C0, Gaussians, quat_multiply, quat_to_rotmat

FEATURE_DIM = 32  # width of the colour feature f in the shipped architecture (`hdri_layout['_rgb']`)

_DEFAULT_LR = MappingProxyType({
    "_xyz": 1.0, "_base_color": 1.0, "_scaling": 1.0, "_rotation": 0.1, "_opacity": 1.0,
    "_roughness": 1.0, "_metallic": 1.0, "_pbr1": 1.0,
    "_scaling_view": 1.0, "_rgb": 1.0, "_shadow": 1.0, "_hdri1": 1.0, "_hdri2": 1.0,
})


@dataclass(frozen=True)
class RepresentationConfig:
    """The renderer's ``representation_config``; defaults are TRELLIS's GS decoder's (NeAR's own is unpublished)."""

    num_gaussians: int = 32
    resolution: int = 64
    voxel_size: float = 1.5
    perturb_offset: bool = True
    scaling_bias: float = 4e-3
    opacity_bias: float = 0.1
    min_kernel_size: float = 9e-4  # '3d_filter_kernel_size'
    filter_2d_kernel_size: float = 0.1  # '2d_filter_kernel_size': the rasterizer's 2D low-pass (`frame.filter_2d`)
    scaling_activation: str = "softplus"
    feature_dim: int = FEATURE_DIM
    lr: Mapping[str, float] = field(default_factory=lambda: dict(_DEFAULT_LR))

    def __post_init__(self) -> None:
        missing = sorted(set(_DEFAULT_LR) - set(self.lr))
        if missing:
            raise ValueError(f"representation_config.lr lacks {missing}")
        if self.scaling_activation not in ("softplus", "exp"):
            raise ValueError(f"scaling_activation must be 'softplus' or 'exp', got {self.scaling_activation!r}")
        if not 0 < self.opacity_bias < 1 or self.scaling_bias <= 0:
            raise ValueError("opacity_bias must be in (0, 1) and scaling_bias > 0")

    @staticmethod
    def from_official(config: Mapping) -> "RepresentationConfig":
        """From an official ``representation_config`` dict (keys as in the NeAR/TRELLIS json)."""
        lr = dict(_DEFAULT_LR)
        lr.update(config.get("lr", {}))
        return RepresentationConfig(
            num_gaussians=int(config.get("num_gaussians", 32)), voxel_size=float(config.get("voxel_size", 1.5)),
            perturb_offset=bool(config.get("perturb_offset", True)),
            scaling_bias=float(config.get("scaling_bias", 4e-3)), opacity_bias=float(config.get("opacity_bias", 0.1)),
            min_kernel_size=float(config.get("3d_filter_kernel_size", 9e-4)),
            filter_2d_kernel_size=float(config.get("2d_filter_kernel_size", 0.1)),
            scaling_activation=str(config.get("scaling_activation", "softplus")), lr=lr)

    @property
    def gs_channels(self) -> int:
        return self.num_gaussians * 14

    @property
    def pbr_channels(self) -> int:
        return self.num_gaussians * 3

    @property
    def scale_channels(self) -> int:
        return self.num_gaussians * 3

    @property
    def rgb_channels(self) -> int:
        return self.num_gaussians * (self.feature_dim + 3)


def radical_inverse(base: int, n: int) -> float:
    """Van der Corput radical inverse of the integer n in the given base."""
    value, scale = 0.0, 1.0 / base
    while n > 0:
        n, digit = divmod(n, base)
        value += digit * scale
        scale /= base
    return value


def hammersley_points(n: int = 32) -> torch.Tensor:
    """The first n 3-D Hammersley points as TRELLIS makes them: ``(i / n, radinv_2(i), radinv_3(i))`` (float64)."""
    return torch.tensor([[i / n, radical_inverse(2, i), radical_inverse(3, i)] for i in range(n)], dtype=torch.float64)


def hammersley_offsets(n: int = 32, voxel_size: float = 1.5) -> torch.Tensor:
    """The renderer's ``offset_perturbation`` buffer [n, 3] (float32): ``atanh((2 h - 1) / voxel_size)``.

    So that ``tanh(0 + buffer) / R * 0.5 * voxel_size`` puts Gaussian i at ``(2 h_i - 1) / (2 R)`` from its voxel
    centre.
    """
    return torch.atanh((hammersley_points(n) * 2 - 1).float() / voxel_size)


def voxel_centres(coords: torch.Tensor, resolution: int = 64) -> torch.Tensor:
    """Voxel indices [N, 3] -> centres in asset space [-0.5, 0.5]^3: ``(i + 0.5) / R - 0.5``.

    The reference's ``(coord + 0.5) / R`` in [0, 1] is this plus 0.5 (its ``get_xyz`` subtracts the 0.5 again).
    """
    return (coords.float() + 0.5) / resolution - 0.5


@dataclass(frozen=True)
class IntrinsicGaussians:
    """View- and light-independent Gaussians (from ``gs_out`` and ``pbr_out``), N = voxels * G of them."""

    means: torch.Tensor  # [N, 3] asset space
    quats: torch.Tensor  # [N, 4] unit (w, x, y, z)
    scales: torch.Tensor  # [N, 3] s (intrinsic pass)
    opacities: torch.Tensor  # [N] tanh: in (-1, 1)
    base_color: torch.Tensor  # [N, 3] >= 0
    roughness: torch.Tensor  # [N, 1] in (0, 1)
    metallic: torch.Tensor  # [N, 1] in (0, 1)
    pbr1: torch.Tensor  # [N, 1] in (0, 1), auxiliary

    def to_gaussians(self, channels: Mapping[str, torch.Tensor] | None = None, scales: torch.Tensor | None = None
                     ) -> Gaussians:
        """A `Gaussians` batch for rasterization (opacities clamped at 0: gsplat skips alpha < 1/255 anyway).

        Default channels are the intrinsic pass's (base_color, metallic, roughness, pbr1); pass ``scales=lit.scales``
        and the lit channels for the lit pass, which shares means, rotations and opacities.
        """
        if channels is None:
            channels = {"base_color": self.base_color, "metallic": self.metallic, "roughness": self.roughness,
                        "pbr1": self.pbr1}
        return Gaussians(self.means, self.quats, self.scales if scales is None else scales,
                         self.opacities.clamp_min(0.0), dict(channels))


@dataclass(frozen=True)
class LitParameters:
    """View- and light-dependent parameters (from ``scale_out`` and ``rgb_out``), same order as the intrinsic ones."""

    scales: torch.Tensor  # [N, 3] ŝ (lit pass, and the shading normals)
    features: torch.Tensor  # [N, feature_dim] colour feature f (identity)
    shadow: torch.Tensor  # [N, 1] in (0, 1)
    hdri1: torch.Tensor  # [N, 1] in (0, 1), auxiliary
    hdri2: torch.Tensor  # [N, 1] in (0, 1), auxiliary


def _check(name: str, raw: torch.Tensor, channels: int) -> None:
    if raw.ndim != 2 or raw.shape[1] != channels:
        raise ValueError(f"{name} must have shape [N, {channels}], got {tuple(raw.shape)}")


def _scale_activation(raw: torch.Tensor, config: RepresentationConfig, bias: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """Scales from raw head outputs: zero raw gives `bias` (default `config.scaling_bias`; per Gaussian and axis
    with surfels), widened by the 3D filter."""
    b = torch.as_tensor(config.scaling_bias if bias is None else bias, dtype=raw.dtype, device=raw.device)
    if config.scaling_activation == "softplus":
        s = F.softplus(raw + (b + torch.log(-torch.expm1(-b))))  # softplus^-1(b) = b + log(1 - e^-b)
    else:
        s = torch.exp(raw + torch.log(b))
    return torch.sqrt(s * s + config.min_kernel_size ** 2)


def _split(raw: torch.Tensor, widths: list[int], g: int) -> list[torch.Tensor]:
    """Attribute-major blocks of a [V, sum(w) * g] tensor -> [V * g, w] tensors."""
    out, start = [], 0
    for w in widths:
        out.append(raw[:, start:start + w * g].reshape(-1, w))
        start += w * g
    return out


#: Channels of a material prior: linear base colour RGB, roughness, metallic, Specular IOR Level.
MATERIAL_CHANNELS = 6
_PRIOR_EPS = 0.02  # material values in (0, 1) are kept this far from 0 and 1 before their logit


def _check_surfels(surfels: Mapping[str, torch.Tensor], count: int) -> None:
    shapes = {"offsets": (count, 3), "quats": (count, 4), "sigmas": (count, 3)}
    for name, shape in shapes.items():
        if name not in surfels or tuple(surfels[name].shape) != shape:
            raise ValueError(f"surfels need {name} of shape {shape} (one per Gaussian), got "
                             f"{tuple(surfels[name].shape) if name in surfels else 'none'}")


def _logit(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(_PRIOR_EPS, 1 - _PRIOR_EPS)
    return torch.log(p) - torch.log1p(-p)


def intrinsic_gaussians(coords: torch.Tensor, gs_out: torch.Tensor, pbr_out: torch.Tensor,
                        config: RepresentationConfig = RepresentationConfig(),
                        offset_perturbation: torch.Tensor | None = None,
                        material_prior: torch.Tensor | None = None,
                        surfels: Mapping[str, torch.Tensor] | None = None) -> IntrinsicGaussians:
    """``coords`` [V, 3] voxel indices, ``gs_out`` [V, 14 G], ``pbr_out`` [V, 3 G] -> V * G intrinsic Gaussians
    (Gaussian ``v * G + k`` is the k-th of voxel v). ``offset_perturbation`` [G, 3] defaults to `hammersley_offsets`;
    pass the checkpoint's buffer to use exactly its values.

    ``material_prior`` [V, 6] or, one per Gaussian, [V * G, 6] (`MATERIAL_CHANNELS`: base colour, roughness,
    metallic, specular level; near-tiny's material latents, or the materials at its surfels) makes the material
    heads residuals on it: base colour ``max(prior + SH_C0 raw, 0)`` and
    ``sigmoid(logit(prior) + raw)`` for roughness, metallic and pbr1 (the specular level), so zero head outputs give
    the prior itself.

    ``surfels`` (near-tiny; `surfels.surfel_tensors`: per Gaussian "offsets", "quats", "sigmas" in voxel units)
    make the geometry heads residuals on them too: the mean is the surfel's centre plus at most half a voxel
    (``tanh``), the rotation is the surfel's followed by the head's, and the scales start at the surfel's sigmas.
    Zero head outputs give the surfels themselves."""
    g, lr = config.num_gaussians, config.lr
    _check("gs_out", gs_out, config.gs_channels)
    _check("pbr_out", pbr_out, config.pbr_channels)
    if coords.ndim != 2 or coords.shape != (gs_out.shape[0], 3) or pbr_out.shape[0] != gs_out.shape[0]:
        raise ValueError(f"coords must be [V, 3] with V = {gs_out.shape[0]} head rows, got {tuple(coords.shape)}")
    offset, base, scale, rot, opacity = _split(gs_out, [3, 3, 3, 4, 1], g)
    offset = (offset * lr["_xyz"]).reshape(-1, g, 3)
    centres = voxel_centres(coords, config.resolution).to(gs_out)
    identity = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=gs_out.dtype, device=gs_out.device)
    quats = F.normalize(rot * lr["_rotation"] + identity, dim=-1)
    scale_bias = None
    if surfels is not None:
        _check_surfels(surfels, gs_out.shape[0] * g)
        start = centres[:, None, :] + surfels["offsets"].to(gs_out).reshape(-1, g, 3) / config.resolution
        means = (start + torch.tanh(offset) / config.resolution * 0.5).reshape(-1, 3)
        quats = quat_multiply(surfels["quats"].to(gs_out), quats)
        scale_bias = surfels["sigmas"].to(gs_out) / config.resolution
    else:
        if config.perturb_offset:
            if offset_perturbation is None:
                offset_perturbation = hammersley_offsets(g, config.voxel_size)
            offset = offset + offset_perturbation.to(offset)
        offset = torch.tanh(offset) / config.resolution * 0.5 * config.voxel_size
        means = (centres[:, None, :] + offset).reshape(-1, 3)
    roughness, metallic, pbr1 = _split(pbr_out, [1, 1, 1], g)
    base = SH_C0 * (base * lr["_base_color"])
    roughness, metallic, pbr1 = roughness * lr["_roughness"], metallic * lr["_metallic"], pbr1 * lr["_pbr1"]
    if material_prior is None:
        base = base + 0.5
    else:
        v = gs_out.shape[0]
        if material_prior.shape not in ((v, MATERIAL_CHANNELS), (v * g, MATERIAL_CHANNELS)):
            raise ValueError(f"material_prior must be [V, {MATERIAL_CHANNELS}] or [V * G, {MATERIAL_CHANNELS}], got "
                             f"{tuple(material_prior.shape)}")
        prior = material_prior.to(gs_out)
        if len(prior) == v:
            prior = prior.repeat_interleave(g, dim=0)  # [V * G, 6]
        logits = _logit(prior[:, 3:6])
        base = base + prior[:, :3]
        roughness, metallic, pbr1 = roughness + logits[:, 0:1], metallic + logits[:, 1:2], pbr1 + logits[:, 2:3]
    return IntrinsicGaussians(
        means=means,
        quats=quats,
        scales=_scale_activation(scale * lr["_scaling"], config, scale_bias),
        opacities=torch.tanh(opacity[:, 0] * lr["_opacity"] + math.atanh(config.opacity_bias)),
        base_color=torch.clamp_min(base, 0.0),
        roughness=torch.sigmoid(roughness),
        metallic=torch.sigmoid(metallic),
        pbr1=torch.sigmoid(pbr1),
    )


def lit_parameters(scale_out: torch.Tensor, rgb_out: torch.Tensor,
                   config: RepresentationConfig = RepresentationConfig(),
                   surfels: Mapping[str, torch.Tensor] | None = None) -> LitParameters:
    """``scale_out`` [V, 3 G], ``rgb_out`` [V, (feature_dim + 3) G] -> per-Gaussian lit parameters (the lit scales
    start at the surfels' sigmas where `surfels` are given, as the intrinsic ones do)."""
    g, lr = config.num_gaussians, config.lr
    _check("scale_out", scale_out, config.scale_channels)
    _check("rgb_out", rgb_out, config.rgb_channels)
    if rgb_out.shape[0] != scale_out.shape[0]:
        raise ValueError("scale_out and rgb_out must have one row per voxel each")
    (scale,) = _split(scale_out, [3], g)
    features, shadow, hdri1, hdri2 = _split(rgb_out, [config.feature_dim, 1, 1, 1], g)
    scale_bias = None
    if surfels is not None:
        _check_surfels(surfels, scale.shape[0])
        scale_bias = surfels["sigmas"].to(scale) / config.resolution
    return LitParameters(
        scales=_scale_activation(scale * lr["_scaling_view"], config, scale_bias),
        features=features * lr["_rgb"],
        shadow=torch.sigmoid(shadow * lr["_shadow"]),
        hdri1=torch.sigmoid(hdri1 * lr["_hdri1"]),
        hdri2=torch.sigmoid(hdri2 * lr["_hdri2"]),
    )


@dataclass(frozen=True)
class HeadGaussians:
    """Everything the four heads give: the intrinsic Gaussians and their lit parameters (same order)."""

    intrinsic: IntrinsicGaussians
    lit: LitParameters


def heads_to_gaussians(coords: torch.Tensor, gs_out: torch.Tensor, pbr_out: torch.Tensor, scale_out: torch.Tensor,
                       rgb_out: torch.Tensor, config: RepresentationConfig = RepresentationConfig(),
                       offset_perturbation: torch.Tensor | None = None,
                       material_prior: torch.Tensor | None = None,
                       surfels: Mapping[str, torch.Tensor] | None = None) -> HeadGaussians:
    """All four heads at once: `intrinsic_gaussians` + `lit_parameters`."""
    return HeadGaussians(intrinsic_gaussians(coords, gs_out, pbr_out, config, offset_perturbation, material_prior,
                                             surfels),
                         lit_parameters(scale_out, rgb_out, config, surfels))


def shading_normals(quats: torch.Tensor, scales: torch.Tensor, camera_position: torch.Tensor, means: torch.Tensor,
                    flip_reference_offset: float = 0.0) -> torch.Tensor:
    """World-space unit normals [N, 3]: the rotation matrix's column for the smallest of ``scales`` (pass the lit
    scales ŝ for the shading MLP, as `get_normal_view` does), negated where it points away from the camera
    (``dot(n, camera - (means + flip_reference_offset)) < 0``; a zero dot product is left as is).

    ``flip_reference_offset=0.5`` reproduces the reference exactly, which tests against its unshifted [0, 1] positions.
    """
    rot = quat_to_rotmat(quats)  # [N, 3, 3]; column k is the Gaussian's k-th axis
    index = scales.argmin(dim=-1)
    axis = rot.gather(2, index[:, None, None].expand(-1, 3, 1)).squeeze(2)
    return facing_camera(axis, camera_position, means, flip_reference_offset)


def facing_camera(normals: torch.Tensor, camera_position: torch.Tensor, means: torch.Tensor,
                  flip_reference_offset: float = 0.0) -> torch.Tensor:
    """`normals` [N, 3] negated where they point away from the camera (`dot(n, camera - (means + offset)) < 0`)."""
    to_camera = camera_position.to(means).reshape(1, 3) - (means + flip_reference_offset)
    facing = (normals * to_camera).sum(-1, keepdim=True)
    return torch.where(facing < 0, -normals, normals)
