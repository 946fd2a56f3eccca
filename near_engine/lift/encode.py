"""An object's views -> its latents: the LH latent from the uniformly lit views with near-tiny's trained encoder
(`models.encoder`), and the material latents lifted from its material G-buffers (Cycles AOVs)."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..camera import Camera
from ..models.encoder import lift_features
from ..models.gaussian_heads import voxel_centres
from ..sparse import SparseTensor

__all__ = ["encode_views", "lift_materials"]

#: The G-buffers the material latents are lifted from, in the latents' channel order (`frame.MATERIAL_LATENTS`).
MATERIAL_GBUFFERS: tuple[str, ...] = ("base_color", "roughness", "metallic", "specular")


def encode_views(networks: Mapping[str, nn.Module], coords: np.ndarray, rgba: torch.Tensor,
                 cameras: Sequence[Camera], depth: torch.Tensor | None = None, resolution: int = 64) -> torch.Tensor:
    """The LH latent [N, latent_channels] of the voxels `coords` int [N, 3] (asset space = the cameras' world).

    `rgba` [V, H, W, 4]: the uniformly lit views, scene-linear, premultiplied; `depth` [V, H, W]: their depth passes
    (camera z of the first hit), used to skip views where a voxel is hidden. `networks` holds "image_features" and
    "encoder". Differentiable in the networks' parameters; row i of the result belongs to `coords[i]`.
    """
    features, encoder = networks["image_features"], networks["encoder"]
    weight = next(encoder.parameters())
    coords_t = torch.as_tensor(np.asarray(coords), dtype=torch.int32, device=weight.device)
    points = voxel_centres(coords_t, resolution).to(weight)
    maps = features(rgba.to(weight))
    depth = None if depth is None else depth.to(weight)
    lifted = lift_features(maps, points, cameras, depth, tolerance=2.0 / resolution)
    return encoder(SparseTensor.from_list([(coords_t, lifted)], resolution)).feats


def lift_materials(gbuffers: Mapping[str, torch.Tensor], alpha: torch.Tensor, cameras: Sequence[Camera],
                   depth: torch.Tensor | None, coords: np.ndarray, resolution: int = 64) -> np.ndarray:
    """near-tiny's material latents [N, 6] (float32): each voxel's base colour (linear RGB), roughness, metallic and
    Specular IOR Level, averaged over the views that see it.

    `gbuffers[name]` [V, H, W, k] are the Cycles AOVs of those views, premultiplied by `alpha` [V, H, W, 1] as Cycles
    filters them: both are lifted (`lift_features`, depth-tested) and divided, so edge pixels count at their true
    value. A voxel no view sees gets the mean material of those seen (Blender's default material,
    `frame.DEFAULT_MATERIAL`, when none is).
    """
    from ..frame import DEFAULT_MATERIAL

    maps = torch.cat([gbuffers[name].float() if gbuffers[name].ndim == 4 else gbuffers[name][..., None].float()
                      for name in MATERIAL_GBUFFERS] + [alpha.float()], -1).permute(0, 3, 1, 2)
    points = voxel_centres(torch.as_tensor(np.asarray(coords), dtype=torch.int32), resolution)
    lifted = lift_features(maps, points, cameras, None if depth is None else depth.float(),
                           tolerance=2.0 / resolution)
    covered = lifted[:, -1:]
    values = lifted[:, :-1] / covered.clamp_min(1e-6)
    seen = covered > 1e-3
    default = (values * seen).sum(0) / seen.sum() if bool(seen.any()) else torch.tensor(DEFAULT_MATERIAL)
    values = torch.where(seen, values, default).clamp(0.0, 1.0)
    return values.numpy().astype(np.float32)
