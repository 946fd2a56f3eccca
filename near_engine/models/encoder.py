"""near-tiny's mesh-to-latent encoder: per-view image features, lifted onto the surface voxels, encoded to an LH latent.

TRELLIS builds a structured latent by running DINOv2 on 150 uniformly lit views, averaging each voxel's patch features
over the views and encoding them with its sparse VAE encoder, trained together with its Gaussian decoder. DINOv2 is
not available offline and far too slow for a CPU product, so near-tiny trains its own small pair with the decoder:

* `ImageFeatures`: a 3-layer CNN on premultiplied scene-linear RGBA (RGB as `log1p(16 RGB)`: uniform light puts
  object colours at about 0.05-0.6, which the gain spreads over 0.6-2.3, the scale of alpha; log1p compresses HDR
  values the way the reconstruction loss does) -> C - 4 feature maps at half the image resolution, plus that input
  itself box-averaged to the same resolution. Both matter: trained on plain `log1p(RGB)` and without the skip, the
  maps followed the silhouette (alpha) and hardly the colour (swapping an object's red and blue moved them by 3%),
  and the decoded base colour came out the same grey for every object;
* `lift_features`: each voxel centre is projected into every view and the maps are sampled bilinearly there; a voxel
  counts for a view only when it is *visible* in it: inside the image and, when the view's depth pass is given, not
  behind the first surface hit (camera z <= depth + tolerance; the tolerance covers a voxel centre lying up to half a
  voxel diagonal behind the surface it belongs to). Features are averaged over the visible views (zero if none);
* `LatentEncoder`: a small sparse transformer over the voxels -> `latent_channels` (8) per voxel. Its trunk is the
  IAD's (input layer + APE + register/self-attention blocks with shifted 8^3 windows), reused as is, plus a LayerNorm
  and a linear output, and a linear skip from the lifted features to the latent (zero at first). Without the skip
  the trained latent explained a quarter of the voxels' colour variance (a linear probe): the trunk, busy with
  position and shape, let colour fade. Deterministic (no posterior sampling; TRELLIS encodes with
  `sample_posterior=False` too).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..camera import Camera
from ..sparse import SparseTensor
from .blocks import layer_norm
from .iad import IntrinsicAwareDecoder

__all__ = ["ImageFeatures", "LatentEncoder", "lift_features"]


class ImageFeatures(nn.Module):
    """Premultiplied RGBA [V, H, W, 4] (scene-linear) -> feature maps [V, out_channels, ceil(H/2), ceil(W/2)]:
    `out_channels - 4` learned maps, then the encoded input (log1p(16 RGB), alpha) box-averaged to their resolution."""

    INPUT_CHANNELS = 4
    INPUT_GAIN = 16.0  # colour gain inside log1p (see the module docstring)

    def __init__(self, out_channels: int = 16, hidden_channels: int = 32) -> None:
        super().__init__()
        if out_channels <= self.INPUT_CHANNELS:
            raise ValueError(f"ImageFeatures needs more than {self.INPUT_CHANNELS} output channels (the input's own "
                             f"{self.INPUT_CHANNELS} are among them), got {out_channels}")
        self.out_channels = out_channels
        self.net = nn.Sequential(
            nn.Conv2d(self.INPUT_CHANNELS, hidden_channels, 3, padding=1), nn.GELU(),
            nn.Conv2d(hidden_channels, hidden_channels, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(hidden_channels, out_channels - self.INPUT_CHANNELS, 1),
        )

    def forward(self, rgba: torch.Tensor) -> torch.Tensor:
        if rgba.ndim != 4 or rgba.shape[-1] != 4:
            raise ValueError(f"ImageFeatures expects RGBA images [V, H, W, 4], got {tuple(rgba.shape)}")
        colour = torch.log1p(self.INPUT_GAIN * rgba[..., :3].clamp_min(0.0))
        x = torch.cat([colour, rgba[..., 3:]], -1).permute(0, 3, 1, 2)
        return torch.cat([self.net(x), F.avg_pool2d(x, 2, ceil_mode=True)], 1)


def lift_features(maps: torch.Tensor, points: torch.Tensor, cameras: Sequence[Camera],
                  depth: torch.Tensor | None = None, tolerance: float = 0.0) -> torch.Tensor:
    """Average over views of `maps` [V, C, h, w] sampled at the projections of `points` [N, 3] (world) -> [N, C].

    `depth` [V, H, W] (camera z of the first hit, at the cameras' resolution) makes occluded voxels not count for a
    view; without it every view that sees the point inside its image counts. Differentiable in `maps`.
    """
    if len(cameras) != maps.shape[0]:
        raise ValueError(f"{maps.shape[0]} feature maps but {len(cameras)} cameras")
    w2c = torch.as_tensor(np.stack([c.world_to_camera for c in cameras])).to(points)  # [V, 4, 4]
    cam = points[None] @ w2c[:, :3, :3].transpose(1, 2) + w2c[:, None, :3, 3]  # [V, N, 3]
    z = cam[..., 2]
    safe_z = torch.where(z > 1e-6, z, torch.ones_like(z))
    intr = torch.tensor([[c.fx, c.fy, c.cx, c.cy, c.width, c.height] for c in cameras]).to(points)
    u = intr[:, None, 0] * cam[..., 0] / safe_z + intr[:, None, 2]  # pixels, centres at +0.5
    v = intr[:, None, 1] * cam[..., 1] / safe_z + intr[:, None, 3]
    width, height = intr[:, None, 4], intr[:, None, 5]
    visible = (z > 1e-6) & (u >= 0) & (u < width) & (v >= 0) & (v < height)
    if depth is not None:
        px = u.clamp(0, depth.shape[2] - 1).long()
        py = v.clamp(0, depth.shape[1] - 1).long()
        first_hit = depth[torch.arange(len(cameras))[:, None], py, px].to(points)
        visible &= z <= first_hit + tolerance
    grid = torch.stack([2 * u / width - 1, 2 * v / height - 1], -1)[:, None]  # [V, 1, N, 2], align_corners=False
    sampled = F.grid_sample(maps, grid.to(maps), mode="bilinear", padding_mode="border", align_corners=False)
    weights = visible.to(maps)[:, None, None, :]  # [V, 1, 1, N]
    total = (sampled * weights).sum(0)[:, 0].T  # [N, C]
    return total / weights.sum(0)[0, 0, :, None].clamp_min(1.0)


class LatentEncoder(nn.Module):
    """Lifted features on the voxels (SparseTensor [N, in_channels]) -> the LH latent (SparseTensor [N, latent])."""

    def __init__(self, resolution: int = 64, in_channels: int = 16, model_channels: int = 64,
                 latent_channels: int = 8, num_blocks: int = 2, num_heads: int = 2, mlp_ratio: float = 4,
                 window_size: int = 8, num_register_tokens: int = 4) -> None:
        super().__init__()
        self.resolution = resolution
        self.in_channels = in_channels
        self.latent_channels = latent_channels
        self.trunk = IntrinsicAwareDecoder(
            resolution=resolution, model_channels=model_channels, latent_channels=in_channels,
            cond_channels=model_channels, num_blocks=num_blocks, num_register_tokens=num_register_tokens,
            num_heads=num_heads, mlp_ratio=mlp_ratio, attn_mode="swin", window_size=window_size, pe_mode="ape")
        self.out_layer = nn.Linear(model_channels, latent_channels)
        self.skip = nn.Linear(in_channels, latent_channels)
        nn.init.zeros_(self.skip.weight)
        nn.init.zeros_(self.skip.bias)

    def forward(self, features: SparseTensor) -> SparseTensor:
        h, _ = self.trunk(features)
        return h.replace(self.out_layer(layer_norm(h.feats)) + self.skip(features.feats))
