"""Layers shared by the Intrinsic-Aware and Lighting-Aware decoders, with the parameter names of NeAR/TRELLIS.

Re-implemented (not copied) from NeAR commit 163c214 (github Luh1124/NeAR), which carries TRELLIS's sparse modules:

* `layer_norm`: `LayerNorm32(channels, elementwise_affine=False, eps=1e-6)` of
  `trellis/modules/sparse/transformer/blocks.py` (computed in float32, cast back). No parameters, so no state-dict keys.
* `SelfAttention` / `CrossAttention`: `SparseMultiHeadAttention` (`trellis/modules/sparse/attention/modules.py`):
  self-attention has `to_qkv` (Linear C -> 3C, laid out [3, heads, head_dim]) and `to_out`; cross-attention has
  `to_q` (C -> C, [heads, head_dim]), `to_kv` (ctx C_ctx -> 2C, laid out [2, heads, head_dim]) and `to_out`. Optional
  per-head RMS norms `q_rms_norm.gamma` / `k_rms_norm.gamma` [heads, head_dim] (`SparseMultiHeadRMSNorm`:
  `normalize(x) * gamma * sqrt(head_dim)`). Cross-attention is always full attention: every voxel of batch element b
  attends to all L tokens of `context[b]` (the 16 registers, or the light tokens).
* `FeedForward`: `SparseFeedForwardNet` - `mlp.0` Linear C -> ratio*C, GELU(tanh), `mlp.2` Linear back.
* `AbsolutePositionEmbedder`: TRELLIS `trellis/modules/transformer/blocks.py`: `freq_dim = C // 3 // 2`,
  `freqs = 1 / 10000 ** (arange(freq_dim) / freq_dim)`; per voxel the (integer) coordinates x, y, z are each embedded
  as `[sin(c * freqs), cos(c * freqs)]` and concatenated axis by axis, zero-padded to C channels.
* `NeRFEncoding`: NeAR `trellis/models/structured_latent_vae/nerf_encoding.py` (nerfstudio-style): frequencies
  `2 ** linspace(0, F-1, F)`, output `[x (if include_input), sin(x_d * f_k) for d, k (d major), cos(...) likewise]`,
  i.e. `in_dim * (2F + 1)` channels with the input.
* `RMSNorm`: the renderer uses `torch.nn.RMSNorm(C)` (default eps, parameter `.weight`), re-exported here.

Every attention goes through `torch.nn.functional.scaled_dot_product_attention` (scale 1/sqrt(head_dim)), so CPU and
CUDA share one code path. Modules work on a features tensor [N, C] plus the `SparseTensor` that gives its structure
(batch layout and window partitions); the decoders wrap this in SparseTensor in/out.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..sparse import SparseTensor, sparse_self_attention, windowed_attention

__all__ = [
    "LN_EPS",
    "layer_norm",
    "MultiHeadRMSNorm",
    "SelfAttention",
    "CrossAttention",
    "FeedForward",
    "AbsolutePositionEmbedder",
    "NeRFEncoding",
    "RMSNorm",
    "RegisterSelfBlock",
    "RegisterCrossBlock",
    "BlockContext",
]

RMSNorm = nn.RMSNorm
# (keys, values) of the registers and of the light tokens for one LAD block, each [B, heads, L, head_dim].
BlockContext = tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

# LayerNorm32(..., eps=1e-6) in every TRELLIS/NeAR sparse transformer block.
LN_EPS = 1e-6
# Upper bound on the elements of one cross-attention score tensor [1, heads, queries, L]; queries are chunked above.
_MAX_SCORE_ELEMENTS = 1 << 25


def layer_norm(x: torch.Tensor, eps: float = LN_EPS) -> torch.Tensor:
    """LayerNorm over the last dimension without affine parameters, computed in float32 (TRELLIS `LayerNorm32`)."""
    return F.layer_norm(x.float(), x.shape[-1:], eps=eps).to(x.dtype)


class MultiHeadRMSNorm(nn.Module):
    """Per-head RMS norm of queries or keys: `normalize(x, dim=-1) * gamma * sqrt(dim)`, gamma [heads, dim]."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(heads, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [..., heads, dim]
        return (F.normalize(x.float(), dim=-1) * self.gamma * self.scale).to(x.dtype)


class SelfAttention(nn.Module):
    """Multi-head self-attention over a sparse tensor: windowed ("swin") when `window` is set, else full per element.

    `shift` follows `near_engine.sparse.windowed_attention`: a voxel's cell is `(xyz + shift) // window`.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int,
        window: int | None = None,
        shift: int = 0,
        qk_rms_norm: bool = False,
        qkv_bias: bool = True,
    ) -> None:
        super().__init__()
        if channels % num_heads != 0:
            raise ValueError(f"channels {channels} must be divisible by num_heads {num_heads}")
        self.channels = channels
        self.num_heads = num_heads
        self.window = window
        self.shift = shift
        self.qk_rms_norm = qk_rms_norm
        self.to_qkv = nn.Linear(channels, channels * 3, bias=qkv_bias)
        if qk_rms_norm:
            self.q_rms_norm = MultiHeadRMSNorm(channels // num_heads, num_heads)
            self.k_rms_norm = MultiHeadRMSNorm(channels // num_heads, num_heads)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, tensor: SparseTensor) -> torch.Tensor:
        """x [N, C] (rows of `tensor`) -> [N, C]."""
        qkv = self.to_qkv(x).reshape(x.shape[0], 3, self.num_heads, -1)
        q, k, v = qkv.unbind(dim=1)
        if self.qk_rms_norm:
            q, k = self.q_rms_norm(q), self.k_rms_norm(k)
        if self.window is None:
            h = sparse_self_attention(q, k, v, tensor)
        else:
            h = windowed_attention(q, k, v, tensor, self.window, self.shift)
        return self.to_out(h.reshape(x.shape[0], -1))


class CrossAttention(nn.Module):
    """Multi-head cross-attention from voxels to dense tokens: voxels of batch element b attend to `context[b]`.

    `context` is [B, L, C_ctx] with B equal to the sparse tensor's batch size, or 1 (then shared by every element).
    """

    def __init__(
        self,
        channels: int,
        ctx_channels: int,
        num_heads: int,
        qk_rms_norm: bool = False,
        qkv_bias: bool = True,
    ) -> None:
        super().__init__()
        if channels % num_heads != 0:
            raise ValueError(f"channels {channels} must be divisible by num_heads {num_heads}")
        self.channels = channels
        self.ctx_channels = ctx_channels
        self.num_heads = num_heads
        self.qk_rms_norm = qk_rms_norm
        self.to_q = nn.Linear(channels, channels, bias=qkv_bias)
        self.to_kv = nn.Linear(ctx_channels, channels * 2, bias=qkv_bias)
        if qk_rms_norm:
            self.q_rms_norm = MultiHeadRMSNorm(channels // num_heads, num_heads)
            self.k_rms_norm = MultiHeadRMSNorm(channels // num_heads, num_heads)
        self.to_out = nn.Linear(channels, channels)

    def project_context(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, heads, L, head_dim] of `context` [B, L, C_ctx] (k RMS-normed if enabled).

        They depend only on the context, so a caller may compute them once and pass them to `forward` as `kv`
        (e.g. the light tokens' keys/values while only the camera moves).
        """
        if context.ndim != 3 or context.shape[-1] != self.ctx_channels:
            raise ValueError(f"cross-attention context must be [B, L, {self.ctx_channels}], got {tuple(context.shape)}")
        kv = self.to_kv(context.to(self.to_kv.weight.dtype))
        k, v = kv.reshape(context.shape[0], context.shape[1], 2, self.num_heads, -1).unbind(dim=2)  # [B, L, H, D]
        if self.qk_rms_norm:
            k = self.k_rms_norm(k)
        return k.transpose(1, 2), v.transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        tensor: SparseTensor,
        context: torch.Tensor | None = None,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x [N, C] (rows of `tensor`), context [B or 1, L, C_ctx] (or its `project_context` result as kv) -> [N, C]."""
        if kv is None:
            if context is None:
                raise ValueError("cross-attention needs a context or its projected keys/values")
            kv = self.project_context(context)
        k, v = kv
        if k.shape[0] not in (1, tensor.batch_size):
            raise ValueError(
                f"cross-attention context must have batch size {tensor.batch_size} or 1, got {k.shape[0]}"
            )
        n, heads = x.shape[0], self.num_heads
        q = self.to_q(x).reshape(n, heads, -1)
        if self.qk_rms_norm:
            q = self.q_rms_norm(q)
        k, v = k.to(q.dtype), v.to(q.dtype)
        step = max(1, _MAX_SCORE_ELEMENTS // max(1, heads * k.shape[2]))
        outs = []
        for b, rows in enumerate(tensor.layout):
            kb, vb = (k[0:1], v[0:1]) if k.shape[0] == 1 else (k[b : b + 1], v[b : b + 1])
            for s in range(rows.start, rows.stop, step):
                qb = q[s : min(s + step, rows.stop)].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
                outs.append(F.scaled_dot_product_attention(qb, kb, vb)[0].transpose(0, 1))
        h = torch.cat(outs) if outs else q.new_zeros(q.shape)
        return self.to_out(h.reshape(n, -1))


class FeedForward(nn.Module):
    """Two-layer MLP with tanh-approximated GELU: keys `mlp.0` and `mlp.2`."""

    def __init__(self, channels: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(channels * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class AbsolutePositionEmbedder(nn.Module):
    """Sinusoidal embedding of integer voxel coordinates [N, 3] -> [N, channels] (TRELLIS layout, no parameters)."""

    def __init__(self, channels: int, in_channels: int = 3) -> None:
        super().__init__()
        self.channels = channels
        self.in_channels = in_channels
        self.freq_dim = channels // in_channels // 2
        if self.freq_dim < 1:
            raise ValueError(f"position embedding needs channels >= {2 * in_channels}, got {channels}")

    def freqs(self, device: torch.device) -> torch.Tensor:
        exponent = torch.arange(self.freq_dim, dtype=torch.float32, device=device) / self.freq_dim
        return 1.0 / (10000**exponent)

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        n = coords.shape[0]
        if coords.ndim != 2 or coords.shape[1] != self.in_channels:
            raise ValueError(f"positions must be [N, {self.in_channels}], got {tuple(coords.shape)}")
        angles = coords.reshape(-1).float()[:, None] * self.freqs(coords.device)[None, :]  # [N*3, F]
        embed = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1).reshape(n, -1)
        if embed.shape[1] < self.channels:
            embed = F.pad(embed, (0, self.channels - embed.shape[1]))
        return embed


def nerf_encoding(x: torch.Tensor, num_frequencies: int, include_input: bool = True) -> torch.Tensor:
    """NeRF positional encoding in the layout of nerfstudio's / NeAR's `NeRFEncoding` (min exponent 0).

    For ``x`` [..., D] and frequencies ``2**k`` (k = 0..F-1) the output is
    ``[x (if include_input), sin(x_d 2^k) for d, k (d major), sin(x_d 2^k + pi/2) for d, k]``: ``sin(. + pi/2)``
    rather than ``cos`` keeps the numbers identical to the reference's.
    """
    freqs = 2.0 ** torch.linspace(0.0, num_frequencies - 1, num_frequencies, device=x.device, dtype=x.dtype)
    scaled = (x[..., None] * freqs).flatten(-2)
    encoded = torch.sin(torch.cat([scaled, scaled + math.pi / 2.0], dim=-1))
    return torch.cat([x, encoded], dim=-1) if include_input else encoded


def nerf_encoding_dim(in_dim: int, num_frequencies: int, include_input: bool = True) -> int:
    """Width of `nerf_encoding`'s output for an ``in_dim``-wide input."""
    return in_dim * (2 * num_frequencies + (1 if include_input else 0))


class NeRFEncoding(nn.Module):
    """`nerf_encoding` as a module with a fixed input width (no parameters)."""

    def __init__(self, in_dim: int, num_frequencies: int, include_input: bool = True) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.num_frequencies = num_frequencies
        self.include_input = include_input

    @property
    def out_dim(self) -> int:
        return nerf_encoding_dim(self.in_dim, self.num_frequencies, self.include_input)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"NeRF encoding expects {self.in_dim} input channels, got {x.shape[-1]}")
        return nerf_encoding(x, self.num_frequencies, self.include_input)


class RegisterSelfBlock(nn.Module):
    """IAD block (`SparseTransformerRegisterSelfBlock`): x += reg_attn(LN x, registers); x += attn(LN x);
    x += mlp(LN x).

    Keys: `register_attn.{to_q,to_kv,to_out}`, `attn.{to_qkv,to_out}`, `mlp.mlp.{0,2}`. LayerNorms have no parameters.
    """

    def __init__(
        self,
        channels: int,
        ctx_channels: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        window: int | None = 8,
        shift: int = 0,
        qk_rms_norm: bool = False,
        qk_rms_norm_cross: bool = False,
    ) -> None:
        super().__init__()
        self.attn = SelfAttention(channels, num_heads, window=window, shift=shift, qk_rms_norm=qk_rms_norm)
        self.register_attn = CrossAttention(channels, ctx_channels, num_heads, qk_rms_norm=qk_rms_norm_cross)
        self.mlp = FeedForward(channels, mlp_ratio)

    def forward(self, x: torch.Tensor, tensor: SparseTensor, registers: torch.Tensor) -> torch.Tensor:
        x = x + self.register_attn(layer_norm(x), tensor, registers)
        x = x + self.attn(layer_norm(x), tensor)
        return x + self.mlp(layer_norm(x))


class RegisterCrossBlock(nn.Module):
    """LAD block (`SparseTransformerRegisterCrossBlock`): x += reg_attn(LN x, registers); x += cross_attn(LN x, light);
    x += mlp(LN x). No self-attention, so voxels never exchange information inside the LAD.

    Keys: `register_attn.*`, `cross_attn.*` (to_q/to_kv/to_out), `mlp.mlp.{0,2}`.
    """

    def __init__(
        self, channels: int, ctx_channels: int, num_heads: int, mlp_ratio: float = 4.0, qk_rms_norm_cross: bool = False
    ) -> None:
        super().__init__()
        self.register_attn = CrossAttention(channels, ctx_channels, num_heads, qk_rms_norm=qk_rms_norm_cross)
        self.cross_attn = CrossAttention(channels, ctx_channels, num_heads, qk_rms_norm=qk_rms_norm_cross)
        self.mlp = FeedForward(channels, mlp_ratio)

    def project_context(self, registers: torch.Tensor, context: torch.Tensor) -> BlockContext:
        """This block's keys/values of the registers and of the light tokens (reusable while they do not change)."""
        return self.register_attn.project_context(registers), self.cross_attn.project_context(context)

    def forward(
        self,
        x: torch.Tensor,
        tensor: SparseTensor,
        registers: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        projected: BlockContext | None = None,
    ) -> torch.Tensor:
        reg_kv, ctx_kv = projected if projected is not None else (None, None)
        x = x + self.register_attn(layer_norm(x), tensor, registers, kv=reg_kv)
        x = x + self.cross_attn(layer_norm(x), tensor, context, kv=ctx_kv)
        return x + self.mlp(layer_norm(x))
