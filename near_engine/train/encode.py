"""Encoding an object's uniformly lit views into its LH latent with near-tiny's trained encoder (`models.encoder`)."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..camera import Camera
from ..models.encoder import lift_features
from ..models.gaussian_heads import voxel_centres
from ..sparse import SparseTensor

__all__ = ["encode_views"]


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
