"""TRELLIS's sparse-structure decoder: the dense 16^3 x 8 occupancy latent -> 64^3 occupancy logits.

Re-implements `SparseStructureDecoder` (`trellis/models/sparse_structure_vae.py`, commit 6b0d647) so that
`state_dict()` equals the official checkpoint's names and shapes (reference/checkpoints/ss_dec_conv3d_16l8_fp16.json):

    z [B, 8, 16^3] -> input_layer (Conv3d 3^3, 8 -> 512)
    middle_block.0..1   ResBlock3d 512
    blocks: per width c in (512, 128, 32): num_res_blocks ResBlock3d(c), then (except after the last) an upsampler:
            Conv3d 3^3 c -> 8 c_next, then a 3-D pixel shuffle (2x per axis)
    out_layer: ChannelLayerNorm -> SiLU -> Conv3d 3^3 (32 -> 1)            -> logits [B, 1, 64^3]; occupied = logit > 0

`ResBlock3d`: h = conv1(SiLU(norm1(x))); h = conv2(SiLU(norm2(h))); out = h + skip(x) (1^3 conv when the width
changes; never in the released decoder). The norms are LayerNorms over the channels of each voxel (affine,
eps 1e-5, computed in float32). `use_fp16` is accepted and ignored (float32 build, casting on load).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ChannelLayerNorm", "ResBlock3d", "SparseStructureDecoder", "pixel_shuffle_3d"]


def pixel_shuffle_3d(x: torch.Tensor, factor: int) -> torch.Tensor:
    """[B, C f^3, D, H, W] -> [B, C, D f, H f, W f]: channel c * f^3 + (i * f + j) * f + k goes to sub-voxel (i, j, k)
    (TRELLIS `pixel_shuffle_3d`)."""
    b, c, d, h, w = x.shape
    out = c // factor**3
    x = x.reshape(b, out, factor, factor, factor, d, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(b, out, d * factor, h * factor, w * factor)


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels (dim 1) of a [B, C, ...] tensor, in float32 (TRELLIS `ChannelLayerNorm32`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.layer_norm(x.movedim(1, -1).float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                         self.eps)
        return h.movedim(-1, 1).to(x.dtype)


class ResBlock3d(nn.Module):
    """Dense residual block. Keys: `norm1`, `conv1`, `norm2`, `conv2` (and `skip_connection` when widths differ)."""

    def __init__(self, channels: int, out_channels: int | None = None) -> None:
        super().__init__()
        out_channels = out_channels or channels
        self.norm1 = ChannelLayerNorm(channels)
        self.norm2 = ChannelLayerNorm(out_channels)
        self.conv1 = nn.Conv3d(channels, out_channels, 3, padding=1)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1)
        self.skip_connection = nn.Conv3d(channels, out_channels, 1) if channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip_connection(x)


class _Upsample(nn.Module):
    """Conv3d 3^3 to 8x the next width, then a 2x pixel shuffle (TRELLIS `UpsampleBlock3d`, mode "conv"). Key `conv`."""

    def __init__(self, channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(channels, out_channels * 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pixel_shuffle_3d(self.conv(x), 2)


class SparseStructureDecoder(nn.Module):
    """TRELLIS `SparseStructureDecoder`. `forward(z [B, latent_channels, r^3])` -> logits [B, out_channels,
    (r 2^(len(channels) - 1))^3]. Arguments and defaults are TRELLIS's; the ones TRELLIS requires default to the
    released values (16^3 -> 64^3)."""

    def __init__(
        self,
        out_channels: int = 1,
        latent_channels: int = 8,
        num_res_blocks: int = 2,
        channels: Sequence[int] = (512, 128, 32),
        num_res_blocks_middle: int = 2,
        norm_type: str = "layer",
        use_fp16: bool = False,
    ) -> None:
        super().__init__()
        channels = list(channels)
        if norm_type != "layer" or not channels:
            raise ValueError("the decoder needs at least one width and norm_type 'layer' (the released configuration)")
        self.out_channels = out_channels
        self.latent_channels = latent_channels
        self.upsampling = 2 ** (len(channels) - 1)
        self.use_fp16 = use_fp16
        self.input_layer = nn.Conv3d(latent_channels, channels[0], 3, padding=1)
        self.middle_block = nn.Sequential(*[ResBlock3d(channels[0]) for _ in range(num_res_blocks_middle)])
        self.blocks = nn.ModuleList()
        for i, ch in enumerate(channels):
            self.blocks.extend(ResBlock3d(ch) for _ in range(num_res_blocks))
            if i < len(channels) - 1:
                self.blocks.append(_Upsample(ch, channels[i + 1]))
        self.out_layer = nn.Sequential(ChannelLayerNorm(channels[-1]), nn.SiLU(),
                                       nn.Conv3d(channels[-1], out_channels, 3, padding=1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 5 or z.shape[1] != self.latent_channels:
            raise ValueError(f"the decoder expects a latent [B, {self.latent_channels}, D, H, W], got {tuple(z.shape)}")
        h = self.middle_block(self.input_layer(z.to(self.input_layer.weight.dtype)))
        for block in self.blocks:
            h = block(h)
        return self.out_layer(h).to(z.dtype)
