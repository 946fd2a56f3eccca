"""TRELLIS's sparse-structure flow model: a dense noisy 16^3 x 8 occupancy latent + t + image -> velocity.

Re-implements `SparseStructureFlowModel` (`trellis/models/sparse_structure_flow.py`, commit 6b0d647) so that
`state_dict()` equals the official checkpoint's names and shapes
(reference/checkpoints/ss_flow_img_dit_L_16l8_fp16.json):

    x [B, 8, 16, 16, 16] -> 4096 tokens (x, y, z row-major, z fastest) -> input_layer (Linear 8 -> 1024) + pos_emb
    blocks.0..23  ModulatedCrossBlock (1024 wide, 16 heads, QK RMS norm on self-attention) over the image tokens
    LN (no affine, eps 1e-5) -> out_layer (Linear 1024 -> 8) -> [B, 8, 16, 16, 16]

`pos_emb` [4096, 1024] is a persistent buffer in the checkpoint: the sinusoidal APE
(`blocks.AbsolutePositionEmbedder`) of the grid coordinates in that token order; it is rebuilt here identically, and
loading overwrites it with the file's copy. The tokens are run through the sparse blocks as a sparse tensor with every
voxel present, which is exactly the dense computation.

Only `patch_size` 1 is supported (the released configuration); `use_fp16` / `use_checkpoint` are accepted and
ignored as in the other networks (float32 build, casting on load).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..sparse import SparseTensor
from .blocks import AbsolutePositionEmbedder
from .flow_blocks import ConditionKV, ModulatedCrossBlock, TimestepEmbedder

__all__ = ["SparseStructureFlowModel", "grid_coords"]


def grid_coords(resolution: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Every voxel of a `resolution`^3 grid, int64 [R^3, 3], x major and z fastest (`meshgrid(..., indexing="ij")`)."""
    axis = torch.arange(resolution, device=device)
    return torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)


class SparseStructureFlowModel(nn.Module):
    """TRELLIS `SparseStructureFlowModel`. `forward(x, t, cond)` -> velocity [B, out_channels, R, R, R].

    Arguments and their defaults are TRELLIS's, so a checkpoint's JSON args mean the same here; the ones TRELLIS
    requires default to the released values. TRELLIS's default `patch_size` is 2: the released JSON sets 1, the
    only size built here.
    """

    def __init__(
        self,
        resolution: int = 16,
        in_channels: int = 8,
        model_channels: int = 1024,
        cond_channels: int = 1024,
        out_channels: int = 8,
        num_blocks: int = 24,
        num_heads: int | None = None,
        num_head_channels: int | None = 64,
        mlp_ratio: float = 4,
        patch_size: int = 2,
        pe_mode: str = "ape",
        use_fp16: bool = False,
        use_checkpoint: bool = False,
        share_mod: bool = False,
        qk_rms_norm: bool = False,
        qk_rms_norm_cross: bool = False,
    ) -> None:
        super().__init__()
        if patch_size != 1 or pe_mode != "ape" or share_mod:
            raise ValueError("only patch_size 1, pe_mode 'ape' and share_mod false are supported (the released "
                             "configuration)")
        self.resolution = resolution
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.model_channels = model_channels
        self.cond_channels = cond_channels
        self.num_heads = num_heads or model_channels // (num_head_channels or 64)
        self.use_fp16 = use_fp16
        self.t_embedder = TimestepEmbedder(model_channels)
        self.register_buffer("pos_emb", AbsolutePositionEmbedder(model_channels)(grid_coords(resolution)))
        self.input_layer = nn.Linear(in_channels, model_channels)
        self.blocks = nn.ModuleList(
            ModulatedCrossBlock(model_channels, cond_channels, self.num_heads, mlp_ratio, qk_rms_norm,
                                qk_rms_norm_cross)
            for _ in range(num_blocks)
        )
        self.out_layer = nn.Linear(model_channels, out_channels)

    def project_condition(self, cond: torch.Tensor) -> list[ConditionKV]:
        """Every block's cross-attention keys/values of `cond` [B, L, cond_channels], reusable at every step."""
        return [block.cross_attn.project_context(cond) for block in self.blocks]

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor | None = None,
        cond_kv: list[ConditionKV] | None = None,
    ) -> torch.Tensor:
        """x [B, in_channels, R, R, R], t [B] (1000 x flow time), cond [B or 1, L, cond_channels] (or
        `project_condition(cond)` as cond_kv) -> [B, out_channels, R, R, R]."""
        r = self.resolution
        if x.ndim != 5 or tuple(x.shape[1:]) != (self.in_channels, r, r, r):
            raise ValueError(f"the structure flow expects [B, {self.in_channels}, {r}, {r}, {r}], got {tuple(x.shape)}")
        if cond_kv is None:
            if cond is None:
                raise ValueError("the flow needs a condition (cond or cond_kv)")
            cond_kv = self.project_condition(cond)
        batch, dtype = x.shape[0], self.input_layer.weight.dtype
        tokens = x.reshape(batch, self.in_channels, -1).transpose(1, 2).to(dtype)  # [B, R^3, C_in]
        feats = (self.input_layer(tokens) + self.pos_emb.to(dtype)).reshape(batch * r**3, -1)
        xyz = grid_coords(r, x.device).repeat(batch, 1)
        b = torch.arange(batch, device=x.device).repeat_interleave(r**3)
        grid = SparseTensor(torch.cat([b[:, None], xyz], dim=1), feats, r, batch, check_duplicates=False)
        t_emb = self.t_embedder(t)
        for block, kv in zip(self.blocks, cond_kv):
            feats = block(feats, grid, t_emb, kv=kv)
        out = self.out_layer(F.layer_norm(feats.float(), feats.shape[-1:]).to(dtype))
        return out.reshape(batch, r**3, -1).transpose(1, 2).reshape(batch, -1, r, r, r).to(x.dtype)
