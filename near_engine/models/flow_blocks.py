"""Layers shared by TRELLIS's two flow transformers (sparse structure and structured latent), at the official names.

Re-implemented from TRELLIS commit 6b0d647 (`trellis/models/sparse_structure_flow.py`,
`trellis/modules/transformer/modulated.py`, `trellis/modules/sparse/transformer/modulated.py`):

* `TimestepEmbedder`: `t_embedder.mlp.{0,2}`. The sinusoid of t (the sampler feeds 1000 t) has 256 channels,
  `[cos(t f), sin(t f)]` with `f = exp(-ln(10000) * arange(128) / 128)`, then Linear -> SiLU -> Linear.
* `ModulatedCrossBlock`: one DiT block, adaLN-modulated by the timestep embedding:

      shift1, scale1, gate1, shift2, scale2, gate2 = adaLN_modulation(t_emb)       SiLU -> Linear(C, 6C)
      x += gate1 * self_attn(LN(x) * (1 + scale1) + shift1)                          LN: no affine, eps 1e-6
      x += cross_attn(norm2(x), cond)                                                norm2: affine LN, eps 1e-6
      x += gate2 * mlp(LN(x) * (1 + scale2) + shift2)

  Self-attention is full (per batch element) with optional per-head QK RMS norms; cross-attention attends to the
  image tokens. The dense SS flow and the sparse SLAT flow use the same block: the SS flow's 16^3 tokens are simply a
  sparse tensor with every voxel present, and full attention over it is the dense attention.

All norms are computed in float32 (TRELLIS `LayerNorm32`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..sparse import SparseTensor
from .blocks import CrossAttention, FeedForward, SelfAttention, layer_norm

__all__ = ["ConditionKV", "ModulatedCrossBlock", "TimestepEmbedder", "affine_layer_norm", "per_voxel"]

#: One block's cross-attention keys and values of the condition, each [B, heads, L, head_dim].
ConditionKV = tuple[torch.Tensor, torch.Tensor]


def affine_layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """`norm(x)` computed in float32 and cast back (TRELLIS `LayerNorm32` with affine parameters)."""
    return F.layer_norm(x.float(), norm.normalized_shape, norm.weight.float(), norm.bias.float(), norm.eps).to(x.dtype)


def per_voxel(values: torch.Tensor, tensor: SparseTensor) -> torch.Tensor:
    """Per-batch-element rows [B, C] as per-voxel rows [N, C] (or [1, C], which broadcasts, when B == 1)."""
    if values.shape[0] == 1:
        return values
    if values.shape[0] != tensor.batch_size:
        raise ValueError(f"per-sample values have batch size {values.shape[0]}, the voxels {tensor.batch_size}")
    return values.index_select(0, tensor.coords[:, 0].long())


class TimestepEmbedder(nn.Module):
    """t [B] (the sampler's 1000 t) -> [B, hidden]: sinusoid of `frequency_embedding_size` channels, then an MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    @staticmethod
    def sinusoid(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """[B] -> [B, dim]: `[cos(t f_j), sin(t f_j)]`, f_j = max_period^(-j / (dim // 2)); a zero column for odd
        dim."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return F.pad(embedding, (0, dim % 2))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        if t.ndim != 1:
            raise ValueError(f"timesteps must be a 1-D tensor [B], got shape {tuple(t.shape)}")
        freq = self.sinusoid(t, self.frequency_embedding_size).to(self.mlp[0].weight.dtype)
        return self.mlp(freq)


class ModulatedCrossBlock(nn.Module):
    """TRELLIS `ModulatedSparseTransformerCrossBlock` / `ModulatedTransformerCrossBlock` (full attention,
    `share_mod=False`). Keys: `norm2.{weight,bias}`, `self_attn.{to_qkv, q_rms_norm, k_rms_norm, to_out}`,
    `cross_attn.{to_q, to_kv, to_out}`, `mlp.mlp.{0,2}`, `adaLN_modulation.1`."""

    def __init__(
        self,
        channels: int,
        ctx_channels: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qk_rms_norm: bool = False,
        qk_rms_norm_cross: bool = False,
    ) -> None:
        super().__init__()
        self.norm2 = nn.LayerNorm(channels, eps=1e-6)
        self.self_attn = SelfAttention(channels, num_heads, window=None, qk_rms_norm=qk_rms_norm)
        self.cross_attn = CrossAttention(channels, ctx_channels, num_heads, qk_rms_norm=qk_rms_norm_cross)
        self.mlp = FeedForward(channels, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 6 * channels))

    def forward(
        self,
        x: torch.Tensor,
        tensor: SparseTensor,
        t_emb: torch.Tensor,
        context: torch.Tensor | None = None,
        kv: ConditionKV | None = None,
    ) -> torch.Tensor:
        """x [N, C] (rows of `tensor`), t_emb [B, C], context [B or 1, L, C_ctx] (or its `cross_attn.project_context`
        as `kv`) -> [N, C]."""
        mod = per_voxel(self.adaLN_modulation(t_emb).to(x.dtype), tensor)
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=1)
        x = x + gate1 * self.self_attn(layer_norm(x) * (1 + scale1) + shift1, tensor)
        x = x + self.cross_attn(affine_layer_norm(self.norm2, x), tensor, context, kv=kv)
        return x + gate2 * self.mlp(layer_norm(x) * (1 + scale2) + shift2)
