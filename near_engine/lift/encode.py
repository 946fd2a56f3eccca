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

__all__ = ["encode_views", "lift_materials", "lift_surfel_materials", "material_extras"]

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


def _lift_gbuffers(gbuffers: Mapping[str, torch.Tensor], alpha: torch.Tensor, cameras: Sequence[Camera],
                   depth: torch.Tensor | None, points: torch.Tensor, tolerance: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(materials [P, 6], seen [P, 1] bool) of the asset-space `points` from the premultiplied G-buffers: lifted
    with their alpha and divided by it, so edge pixels count at their true value."""
    maps = torch.cat([gbuffers[name].float() if gbuffers[name].ndim == 4 else gbuffers[name][..., None].float()
                      for name in MATERIAL_GBUFFERS] + [alpha.float()], -1).permute(0, 3, 1, 2)
    lifted = lift_features(maps, points.float(), cameras, None if depth is None else depth.float(), tolerance)
    covered = lifted[:, -1:]
    return (lifted[:, :-1] / covered.clamp_min(1e-6)).clamp(0.0, 1.0), covered > 1e-3


def lift_materials(gbuffers: Mapping[str, torch.Tensor], alpha: torch.Tensor, cameras: Sequence[Camera],
                   depth: torch.Tensor | None, coords: np.ndarray, resolution: int = 64) -> np.ndarray:
    """near-tiny's material latents [N, 6] (float32): each voxel's base colour (linear RGB), roughness, metallic and
    Specular IOR Level, averaged over the views that see it.

    `gbuffers[name]` [V, H, W, k] are the Cycles AOVs of those views, premultiplied by `alpha` [V, H, W, 1] as Cycles
    filters them. A voxel no view sees gets the mean material of those seen (Blender's default material,
    `frame.DEFAULT_MATERIAL`, when none is).
    """
    from ..frame import DEFAULT_MATERIAL

    points = voxel_centres(torch.as_tensor(np.asarray(coords), dtype=torch.int32), resolution)
    values, seen = _lift_gbuffers(gbuffers, alpha, cameras, depth, points, 2.0 / resolution)
    default = (values * seen).sum(0) / seen.sum() if bool(seen.any()) else torch.tensor(DEFAULT_MATERIAL)
    return torch.where(seen, values, default).numpy().astype(np.float32)


def lift_surfel_materials(gbuffers: Mapping[str, torch.Tensor], alpha: torch.Tensor, cameras: Sequence[Camera],
                          depth: torch.Tensor | None, coords: np.ndarray, surfels: np.ndarray,
                          voxel_materials: np.ndarray, resolution: int = 64) -> np.ndarray:
    """The materials at each surfel's centre [N, PER_VOXEL * 6] (the asset extra `frame.SURFEL_MATERIALS`).

    A voxel centre lies up to a voxel off the surface, so its projections into the views land on different surface
    points, whose average blurs painted lines over about a voxel; a surfel's centre lies on the surface, where the
    views agree, and there are four of them per voxel. A surfel no view sees takes its voxel's material."""
    from ..surfels import PER_VOXEL, surfel_centres

    points = torch.from_numpy(surfel_centres(coords, surfels, resolution))
    values, seen = _lift_gbuffers(gbuffers, alpha, cameras, depth, points, 1.0 / resolution)
    fallback = torch.from_numpy(np.repeat(np.asarray(voxel_materials, np.float32), PER_VOXEL, 0))
    return torch.where(seen, values, fallback).reshape(len(coords), -1).numpy().astype(np.float32)


def material_extras(gbuffers: Mapping[str, torch.Tensor], alpha: torch.Tensor, cameras: Sequence[Camera],
                    depth: torch.Tensor | None, coords: np.ndarray, surfels: np.ndarray | None,
                    resolution: int = 64) -> dict[str, np.ndarray]:
    """An asset's material extras from its views' G-buffers: the material latents ("base_color", "material") and,
    where the surfels are known, the materials at them (`frame.SURFEL_MATERIALS`)."""
    from ..frame import SURFEL_MATERIALS

    materials = lift_materials(gbuffers, alpha, cameras, depth, coords, resolution)
    extras = {"base_color": materials[:, :3], "material": materials[:, 3:]}
    if surfels is not None:
        extras[SURFEL_MATERIALS] = lift_surfel_materials(gbuffers, alpha, cameras, depth, coords, surfels, materials,
                                                         resolution)
    return extras
