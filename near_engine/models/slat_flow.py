"""The structured-latent flow model of TRELLIS and NeAR: noisy latent on the object's voxels + t + image -> velocity.

Re-implements TRELLIS's `SLatFlowModel` (`trellis/models/structured_latent_flow.py`, commit 6b0d647; NeAR's copy,
used as `ElasticSLatFlowModel`, is byte-identical and its elastic mixin adds no parameters) so that `state_dict()`
equals the official checkpoints' names and shapes (reference/checkpoints/slat_flow_img_dit_L_64l8p2_fp16.json and
near_slat_flow_model.json). With the official arguments:

    feats [N, 8] on 64^3 -> input_layer (Linear 8 -> 128)
    input_blocks.0  SparseResBlock3d 128 -> 128                      (64^3)
    input_blocks.1  downsample 2x, SparseResBlock3d 128 -> 1024       (32^3)            skips: both outputs
    + APE of the 32^3 coordinates
    blocks.0..23    ModulatedCrossBlock (1024 wide, 16 heads, QK RMS norm on self-attention) over the image tokens
    out_blocks.0    concat skip (2048), upsample 2x, SparseResBlock3d 2048 -> 128   (64^3)
    out_blocks.1    concat skip (256), SparseResBlock3d 256 -> 128
    LN (no affine, eps 1e-5) -> out_layer (Linear 128 -> 8)  = the velocity on the input voxels

`SparseResBlock3d`: h = SubMConv3x3x3(SiLU(norm1(x)));  h = SiLU(LN(h) * (1 + scale) + shift) with (scale, shift) =
`emb_layers` (SiLU -> Linear) of the timestep embedding; out = SubMConv(h) + skip_connection(x) (Linear when the
width changes). Sparse convolutions and the 2x resampling are `models.sparse_conv` (spconv layout, TRELLIS pooling).

Deliberate differences that leave the maths unchanged: `use_fp16` does not cast (built in float32; fp16 checkpoint
tensors are cast by `checkpoints.load_weights`); `use_checkpoint` is ignored; the condition's cross-attention keys
and values can be computed once per sampling run (`project_condition`) instead of at every step.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..sparse import SparseTensor
from .blocks import AbsolutePositionEmbedder, layer_norm
from .flow_blocks import ConditionKV, ModulatedCrossBlock, TimestepEmbedder, affine_layer_norm, per_voxel
from .sparse_conv import SubmanifoldConv3d, downsample, upsample

__all__ = ["SLatFlowModel", "SparseResBlock3d"]


class SparseResBlock3d(nn.Module):
    """TRELLIS's sparse residual block with timestep scale/shift. Keys: `norm1`, `conv1.conv`, `conv2.conv`,
    `emb_layers.1`, `skip_connection` (only when the width changes). Resampling is done by the caller, before."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int | None = None) -> None:
        super().__init__()
        out_channels = out_channels or channels
        self.norm1 = nn.LayerNorm(channels, eps=1e-6)
        self.conv1 = SubmanifoldConv3d(channels, out_channels, 3)
        self.conv2 = SubmanifoldConv3d(out_channels, out_channels, 3)
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels))
        self.skip_connection = nn.Linear(channels, out_channels) if channels != out_channels else nn.Identity()

    def forward(self, x: SparseTensor, emb: torch.Tensor) -> SparseTensor:
        """x [N, channels], emb [B, emb_channels] -> [N, out_channels] on the same voxels."""
        scale, shift = per_voxel(self.emb_layers(emb).to(x.dtype), x).chunk(2, dim=1)
        h = self.conv1(x.replace(F.silu(affine_layer_norm(self.norm1, x.feats)))).feats
        h = F.silu(layer_norm(h) * (1 + scale) + shift)
        h = self.conv2(x.replace(h)).feats
        return x.replace(h + self.skip_connection(x.feats))


class SLatFlowModel(nn.Module):
    """TRELLIS `SLatFlowModel` / NeAR `ElasticSLatFlowModel`. `forward(x, t, cond)` -> velocity on x's voxels.

    Arguments and their defaults are TRELLIS's, so a checkpoint's JSON args mean the same here; the ones TRELLIS
    requires default to the released values (TRELLIS-image-large and NeAR share them; the released JSON also sets
    `patch_size=2`, `io_block_channels=[128]`, `qk_rms_norm=true`). `io_block_channels` lists the widths of the
    down/up stages; each downsamples 2x, so `patch_size` must be 2 ** len(io_block_channels).
    """

    def __init__(
        self,
        resolution: int = 64,
        in_channels: int = 8,
        model_channels: int = 1024,
        cond_channels: int = 1024,
        out_channels: int = 8,
        num_blocks: int = 24,
        num_heads: int | None = None,
        num_head_channels: int | None = 64,
        mlp_ratio: float = 4,
        patch_size: int = 2,
        num_io_res_blocks: int = 2,
        io_block_channels: Sequence[int] | None = None,
        pe_mode: str = "ape",
        use_fp16: bool = False,
        use_checkpoint: bool = False,
        use_skip_connection: bool = True,
        share_mod: bool = False,
        qk_rms_norm: bool = False,
        qk_rms_norm_cross: bool = False,
    ) -> None:
        super().__init__()
        if pe_mode != "ape" or share_mod or not use_skip_connection:
            raise ValueError("only pe_mode 'ape', share_mod false and use_skip_connection true are supported (the "
                             "released configuration)")
        stages = list(io_block_channels or [])
        if stages and 2 ** len(stages) != patch_size:
            raise ValueError(f"patch_size {patch_size} must be 2 ** len(io_block_channels) = {2 ** len(stages)}")
        if num_io_res_blocks < 1:
            raise ValueError(f"num_io_res_blocks must be at least 1, got {num_io_res_blocks}")
        self.resolution = resolution
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.model_channels = model_channels
        self.cond_channels = cond_channels
        self.num_heads = num_heads or model_channels // (num_head_channels or 64)
        self.use_fp16 = use_fp16
        self.t_embedder = TimestepEmbedder(model_channels)
        self.pos_embedder = AbsolutePositionEmbedder(model_channels)
        self.input_layer = nn.Linear(in_channels, stages[0] if stages else model_channels)
        # Per stage: (num_io_res_blocks - 1) blocks at its width, then one that downsamples first and widens.
        self.input_blocks = nn.ModuleList()
        self._downsamples: list[bool] = []
        for chs, next_chs in zip(stages, stages[1:] + [model_channels]):
            for last in [False] * (num_io_res_blocks - 1) + [True]:
                self.input_blocks.append(SparseResBlock3d(chs, model_channels, next_chs if last else chs))
                self._downsamples.append(last)
        self.blocks = nn.ModuleList(
            ModulatedCrossBlock(model_channels, cond_channels, self.num_heads, mlp_ratio, qk_rms_norm,
                                qk_rms_norm_cross)
            for _ in range(num_blocks)
        )
        # Mirror image: per stage, one block that upsamples first (after the skip concatenation), then the rest.
        self.out_blocks = nn.ModuleList()
        self._upsamples: list[bool] = []
        for chs, prev_chs in zip(reversed(stages), [model_channels] + list(reversed(stages[1:]))):
            for first in [True] + [False] * (num_io_res_blocks - 1):
                self.out_blocks.append(SparseResBlock3d(2 * (prev_chs if first else chs), model_channels, chs))
                self._upsamples.append(first)
        self.out_layer = nn.Linear(stages[0] if stages else model_channels, out_channels)

    def project_condition(self, cond: torch.Tensor) -> list[ConditionKV]:
        """Every block's cross-attention keys/values of `cond` [B, L, cond_channels]: they depend only on the
        condition, so a sampler computes them once and passes them to `forward` as `cond_kv` at every step."""
        return [block.cross_attn.project_context(cond) for block in self.blocks]

    def forward(
        self,
        x: SparseTensor,
        t: torch.Tensor,
        cond: torch.Tensor | None = None,
        cond_kv: list[ConditionKV] | None = None,
    ) -> SparseTensor:
        """x feats [N, in_channels] on the `resolution`^3 grid, t [B] (1000 x flow time), cond [B or 1, L,
        cond_channels] (or `project_condition(cond)` as cond_kv) -> velocity [N, out_channels] on x's voxels."""
        if x.resolution != self.resolution or x.feats.ndim != 2 or x.feats.shape[1] != self.in_channels:
            raise ValueError(f"the flow expects features [N, {self.in_channels}] on a {self.resolution}^3 grid, got "
                             f"{tuple(x.feats.shape)} on {x.resolution}^3")
        if cond_kv is None:
            if cond is None:
                raise ValueError("the flow needs a condition (cond or cond_kv)")
            cond_kv = self.project_condition(cond)
        dtype = self.input_layer.weight.dtype
        t_emb = self.t_embedder(t)
        h = x.replace(self.input_layer(x.feats.to(dtype)))
        skips: list[torch.Tensor] = []
        finer: list[tuple[SparseTensor, torch.Tensor]] = []  # (structure before each downsampling, parent index)
        for block, down in zip(self.input_blocks, self._downsamples):
            if down:
                coarse, index = downsample(h)
                finer.append((h, index))
                h = coarse
            h = block(h, t_emb)
            skips.append(h.feats)
        feats = h.feats + self.pos_embedder(h.coords[:, 1:]).to(dtype)
        for block, kv in zip(self.blocks, cond_kv):
            feats = block(feats, h, t_emb, kv=kv)
        h = h.replace(feats)
        for block, up, skip in zip(self.out_blocks, self._upsamples, reversed(skips)):
            h = h.replace(torch.cat([h.feats, skip], dim=1))
            if up:
                fine, index = finer.pop()
                h = upsample(h, fine, index)
            h = block(h, t_emb)
        out = self.out_layer(F.layer_norm(h.feats.float(), h.feats.shape[-1:]).to(dtype))
        return x.replace(out.to(x.feats.dtype))
