"""The illumination tokenizer: an HDR environment map -> light tokens [B, N, C] the Lighting-Aware Decoder attends to.

Re-implements NeAR's `Hdri_Encoder` (trellis/models/structured_latent_vae/hdri_encoder.py at commit 163c214) so that
its `state_dict()` names and shapes equal the official checkpoint's (reference/checkpoints/near_hdri_encoder.json):

    9 input planes [LDR 3 | LOG 3 | DIR 3] at 512x512
      LDR+LOG -> ConvNeXt-Tiny (stem Conv2d(6, 96, 4, 4)) -> c3 192@H/8, c4 384@H/16, c5 768@H/32
      DIR -> Fourier features (x, sin/cos of 2^k pi x, k < 8: 51 channels), bilinearly resized to each scale
      per scale: DirectionGuidedFusion(visual, dir) -> cnn_out channels, bilinearly resized to 64x64
      concat -> 1x1 conv -> output_dim, flattened row-major to 4096 tokens
      -> pre-RMSNorm transformer layers with 1-D rotary embeddings -> RMSNorm

Quirks of the official code kept on purpose, because the weights were trained with them:
* all transformer layers are ONE layer object repeated (shared weights; the state dict lists every index);
* attention output goes through two dropouts (attention's resid_dropout and the layer's dropout1), the FFN hidden
  and output through the same `dropout2` module;
* RoPE positions are the flat token index 0..N-1 (row-major over the 64x64 grid), not 2-D positions.

ConvNeXt is written here (torchvision cannot be installed beside our torch) with torchvision's module names, so
`stage{k}` keys equal torchvision `convnext_tiny().features[2k-2 : 2k]` keys. Widths and depths are arguments (defaults
are ConvNeXt-Tiny's) so small configurations can share the class.

`tokenizer_input` builds the 9 planes from one of our equirect maps (Blender/Cycles convention) exactly as the official
`HDRI_Preprocessor.preprcess_envir_map` lays them out; see its docstring for the mapping.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..envmap import uv_to_direction
from ..errors import EnvMapError

__all__ = [
    "IlluminationTokenizer",
    "tokenizer_input",
    "OFFICIAL_GRID",
    "LOG_SCALE",
    "REINHARD_WHITE",
]

# The official preprocessor resamples every HDRI onto this lat-long grid (HDRI_Preprocessor(envmap_h=512, envmap_w=1024)).
OFFICIAL_GRID = (512, 1024)
# LOG plane: log1p(10 x) / log1p(LOG_SCALE) - 1 (hdri_processer.py: self.log_scale = 1000).
LOG_SCALE = 1000.0
# LDR plane: extended Reinhard x (1 + x / w^2) / (1 + x) with white point w = 16 (hdri_processer.py `reinhard`).
REINHARD_WHITE = 16.0


# ---------------------------------------------------------------------------------------------------------------------
# input planes


def _srgb_encode(x: torch.Tensor) -> torch.Tensor:
    """Linear [0, 1] -> sRGB-encoded, the piecewise curve the official `rgb2srgb` uses."""
    return torch.where(x <= 0.0031308, 12.92 * x, 1.055 * x.clamp_min(0.0031308) ** (1 / 2.4) - 0.055)


def _nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each output index for a nearest resize (floor(i * in / out)), as cv2 INTER_NEAREST and torch do."""
    return np.minimum((np.arange(n_out) * (n_in / n_out)).astype(np.int64), n_in - 1)


def tokenizer_input(pixels_equirect: np.ndarray | torch.Tensor, rotation_z: float = 0.0, size: int = 512) -> torch.Tensor:
    """Our equirect map [H, W, 3] (linear HDR, top row +Z, centre +X) -> the tokenizer's planes [9, size, size] float32.

    Follows `HDRI_Preprocessor.preprcess_envir_map` (NeAR trellis/datasets/hdri_processer.py) as called by
    `NearImageTo3DPipeline.process_hdri` (trellis/pipelines/near_image_to_relightable_3d.py:180):

    1. the map is resized to 512x1024 (nearest; process_hdri uses cv2 INTER_NEAREST);
    2. official texel (i, j) of the 512x1024 grid (hdri_processer.py:161-178, 246-248) has direction
       `d = (-cos(p) cos(e), -sin(p) cos(e), sin(e))`, elevation `e = pi/2 - (i + 0.5) pi / 512` (row 0 at the top,
       Z up), `p = pi - 2 pi (j + 0.5) / 1024 - hdri_rot - pi/2`; i.e. azimuth `3 pi/2 - 2 pi u_j - hdri_rot` with
       `u_j = (j + 0.5) / 1024`. Its colour is the HDRI sampled at `d` (`get_light`, lines 183-209), and the HDRI is
       read with top row +Z and azimuth `pi - 2 pi u`: the Blender/Cycles convention, the same as ours. So in our
       texture coordinates texel j shows `u = u_j - 1/4 + hdri_rot / (2 pi)` (mod 1) at its row's own v: the official
       layout is our map rolled right by a quarter turn, then left by `hdri_rot`;
    3. DIR is `d` itself (a unit vector in the map's own frame), so the direction -> radiance pairing does not depend
       on the rotation: `hdri_rot` only moves where things sit in the image;
    4. LDR = sRGB(clamp(Reinhard_16(x), 0, 1)) * 2 - 1, LOG = log1p(10 x) / log1p(1000) - 1 (no clamp);
    5. each plane is resized to size x size (nearest, torch `F.interpolate`).

    Step 2 samples with Cycles' bilinear filter, periodic in u (official: `grid_sample(align_corners=True)`, which is
    off by less than half a texel); rows fall on texel centres, so only u is interpolated and a rotation by a multiple
    of 2 pi / 1024 is an exact roll.

    `rotation_z` is the World Mapping node's Z rotation (radians) as `EnvMap` uses it (the texture is read at
    `Rz(rotation_z) d`), and the official `hdri_rot` is set to `-rotation_z`. With that sign each texel position always
    stands for the same direction in the object's frame, whatever the rotation: the layout is the world as the object
    sees it (tested against `EnvMap.sample`). The official code is not self-consistent here (its preview
    `rotate_hdri_image`, hdri_processer.py:89-110, rolls the other way from its conditioning), so which sign the
    released weights were trained with is unverified; our own weights are trained with this one. Strength is the
    caller's to apply to `pixels_equirect` beforehand.
    """
    if isinstance(pixels_equirect, torch.Tensor):
        pixels = pixels_equirect.detach().to("cpu", torch.float32).numpy()
    else:
        pixels = np.asarray(pixels_equirect, dtype=np.float32)
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.shape[0] < 1 or pixels.shape[1] < 1:
        raise EnvMapError(f"tokenizer input: expected an equirect image [H, W, 3], got shape {pixels.shape}")
    if not np.all(np.isfinite(pixels)):
        raise EnvMapError("tokenizer input: the environment map holds NaN or Inf values")
    rotation = float(rotation_z)
    if not math.isfinite(rotation):
        raise EnvMapError(f"tokenizer input: rotation must be finite, got {rotation_z!r}")
    if int(size) != size or size < 1:
        raise EnvMapError(f"tokenizer input: size must be a positive integer, got {size!r}")
    size = int(size)
    grid_h, grid_w = OFFICIAL_GRID

    # 1. nearest resize onto the official grid
    src = pixels[_nearest_indices(pixels.shape[0], grid_h)][:, _nearest_indices(pixels.shape[1], grid_w)]
    src = np.maximum(src, 0.0)  # negative radiance is not light (EnvMap clamps it too); log1p would fail below -0.1

    # 2. texel j shows texture u = u_j - 1/4 + hdri_rot / 2pi with hdri_rot = -rotation_z (see the docstring)
    u = (np.arange(grid_w) + 0.5) / grid_w - 0.25 - rotation / (2 * math.pi)
    position = u * grid_w - 0.5
    left = np.floor(position)
    frac = (position - left).astype(np.float32)[None, :, None]
    left = left.astype(np.int64) % grid_w
    right = (left + 1) % grid_w
    colour = src[:, left] * (1.0 - frac) + src[:, right] * frac  # [512, 1024, 3]

    # 3. DIR: the direction of each texel, from our own uv convention (v from the bottom)
    v = 1.0 - (np.arange(grid_h) + 0.5) / grid_h
    uv = np.stack(np.broadcast_arrays(u[None, :], v[:, None]), axis=-1)
    directions = uv_to_direction(uv).astype(np.float32)  # [512, 1024, 3]

    # 4. tone curves
    x = torch.from_numpy(np.ascontiguousarray(colour)).permute(2, 0, 1)
    reinhard = x * (1 + x / REINHARD_WHITE**2) / (1 + x)
    ldr = _srgb_encode(reinhard.clamp(0.0, 1.0)) * 2.0 - 1.0
    log = torch.log1p(10.0 * x) / math.log1p(LOG_SCALE) - 1.0
    dirs = torch.from_numpy(np.ascontiguousarray(directions)).permute(2, 0, 1)

    # 5. nearest resize of every plane
    planes = torch.cat([ldr, log, dirs], dim=0)[None]
    return F.interpolate(planes, size=(size, size), mode="nearest")[0].contiguous().float()


# ---------------------------------------------------------------------------------------------------------------------
# ConvNeXt (torchvision-compatible names)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels of an NCHW tensor (torchvision's convnext.LayerNorm2d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Permute(nn.Module):
    """Parameter-free permutation; exists so `block.N` indices line up with torchvision's CNBlock."""

    def __init__(self, dims: Sequence[int]) -> None:
        super().__init__()
        self.dims = tuple(dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(self.dims)


class StochasticDepth(nn.Module):
    """Drops a residual branch per sample while training ("row" mode), rescaling survivors, as ConvNeXt was trained."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        survival = 1.0 - self.p
        noise = torch.empty((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device).bernoulli_(survival)
        if survival > 0.0:
            noise = noise / survival
        return x * noise


class CNBlock(nn.Module):
    """ConvNeXt block: depthwise 7x7 -> LayerNorm -> MLP (4x, GELU) -> layer scale, residual."""

    def __init__(self, dim: int, layer_scale: float, stochastic_depth_prob: float) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim, bias=True),
            Permute([0, 2, 3, 1]),
            nn.LayerNorm(dim, eps=1e-6),
            nn.Linear(dim, 4 * dim),
            nn.GELU(),
            nn.Linear(4 * dim, dim),
            Permute([0, 3, 1, 2]),
        )
        self.layer_scale = nn.Parameter(torch.full((dim, 1, 1), float(layer_scale)))
        self.stochastic_depth = StochasticDepth(stochastic_depth_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.stochastic_depth(self.layer_scale * self.block(x))


def _convnext_stages(in_channels: int, dims: Sequence[int], depths: Sequence[int], layer_scale: float,
                     stochastic_depth_prob: float) -> list[nn.Sequential]:
    """The 4 stages as the official code slices torchvision's `features`: stage k = (stem or downsample, blocks)."""
    total = sum(depths)
    block_id = 0
    stages = []
    for k, (dim, depth) in enumerate(zip(dims, depths)):
        if k == 0:  # stem (official: re-made with 6 input channels)
            head = nn.Sequential(nn.Conv2d(in_channels, dim, kernel_size=4, stride=4), LayerNorm2d(dim, eps=1e-6))
        else:  # downsample
            head = nn.Sequential(LayerNorm2d(dims[k - 1], eps=1e-6), nn.Conv2d(dims[k - 1], dim, kernel_size=2, stride=2))
        blocks = []
        for _ in range(depth):
            p = stochastic_depth_prob * block_id / (total - 1.0) if total > 1 else 0.0
            blocks.append(CNBlock(dim, layer_scale, p))
            block_id += 1
        stages.append(nn.Sequential(head, nn.Sequential(*blocks)))
    return stages


# ---------------------------------------------------------------------------------------------------------------------
# direction features and fusion


class FourierFeatureEncoder(nn.Module):
    """Per-pixel direction -> [x, sin(f_k x), cos(f_k x)] with f_k = 2^k pi, so the network can resolve fine angles.

    Channel order (matters for the weights): the 3 inputs, then per input channel its n sines then its n cosines.
    `freq_bands` is a frozen Parameter, as in the official code, so it is in the state dict.
    """

    def __init__(self, input_channels: int = 3, num_freq_bands: int = 8) -> None:
        super().__init__()
        self.num_freq_bands = num_freq_bands
        self.output_channels = input_channels * (2 * num_freq_bands + 1)
        self.freq_bands = nn.Parameter(2.0 ** torch.arange(num_freq_bands, dtype=torch.float32) * math.pi,
                                       requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        x = x.permute(0, 2, 3, 1)
        scaled = x.unsqueeze(-1) * self.freq_bands  # [B, H, W, C, n]
        sincos = torch.cat([torch.sin(scaled), torch.cos(scaled)], dim=-1).reshape(b, h, w, -1)
        return torch.cat([x, sincos], dim=-1).permute(0, 3, 1, 2)


class DirectionGuidedFusion(nn.Module):
    """Gates visual features by direction features (1x1 convs, sigmoid), adds adapted directions, projects, residual.

    Group counts follow the official formulas (min(8, C/4) and min(4, hidden/4)); hidden = max(16, visual / 8).
    """

    def __init__(self, visual_dim: int, dir_dim: int, out_dim: int) -> None:
        super().__init__()
        hidden = max(16, visual_dim // 8)
        self.dir_adapter = nn.Sequential(
            nn.Conv2d(dir_dim, visual_dim, kernel_size=1),
            nn.GroupNorm(min(8, visual_dim // 4), visual_dim),
            nn.GELU(),
        )
        self.attention = nn.Sequential(
            nn.Conv2d(visual_dim + dir_dim, hidden, kernel_size=1),
            nn.GroupNorm(min(4, hidden // 4), hidden),
            nn.GELU(),
            nn.Conv2d(hidden, visual_dim, kernel_size=1),
            nn.Sigmoid(),
        )
        self.fusion = nn.Sequential(
            nn.Conv2d(visual_dim * 2, out_dim, kernel_size=1),
            nn.GroupNorm(min(8, out_dim // 4), out_dim),
            nn.GELU(),
        )
        self.residual_proj: nn.Module = (nn.Conv2d(visual_dim, out_dim, kernel_size=1) if visual_dim != out_dim
                                         else nn.Identity())

    def forward(self, visual: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
        adapted = self.dir_adapter(directions)
        gate = self.attention(torch.cat([visual, directions], dim=1))
        fused = self.fusion(torch.cat([visual * gate, adapted], dim=1))
        return fused + self.residual_proj(visual)


# ---------------------------------------------------------------------------------------------------------------------
# transformer


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight: the official norm (weight only, eps 1e-6)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps) * self.weight


class RotaryPositionalEmbedding(nn.Module):
    """cos/sin tables for rotary embeddings over token positions 0..T-1 (half-split layout, `rotate_half`).

    `inv_freq` is a non-persistent buffer: derived from (dim, base), never in a checkpoint.
    """

    def __init__(self, dim: int, base: float = 10000.0) -> None:
        super().__init__()
        self.dim = dim
        self.base = base
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, seq_len: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.arange(seq_len, device=self.inv_freq.device, dtype=self.inv_freq.dtype)
        freqs = torch.outer(t, self.inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class MultiHeadAttentionWithRoPE(nn.Module):
    """Self-attention with rotary q/k (q, k, v without bias; out with bias), via scaled_dot_product_attention."""

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.1, rope_base: float = 10000.0) -> None:
        super().__init__()
        if d_model % nhead:
            raise ValueError(f"d_model {d_model} is not divisible by {nhead} heads")
        self.nhead = nhead
        self.head_dim = d_model // nhead
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model)
        self.rope = RotaryPositionalEmbedding(self.head_dim, base=rope_base)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.nhead, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        cos, sin = self.rope(t, q.dtype)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        # the official attn_dropout drops softmax weights: SDPA's dropout_p is the same thing
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        out = out.transpose(1, 2).reshape(b, t, c)
        return self.resid_dropout(self.out_proj(out))


class TransformerEncoderLayerWithRoPE(nn.Module):
    """Pre-RMSNorm layer: x + attn(norm1(x)); x + FFN(norm2(x)) with GELU (dropouts placed as in the official code)."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float = 0.1,
                 rope_base: float = 10000.0) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttentionWithRoPE(d_model, nhead, dropout, rope_base)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.norm1 = RMSNorm(d_model)
        self.norm2 = RMSNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout1(self.self_attn(self.norm1(x)))
        hidden = self.dropout2(F.gelu(self.linear1(self.norm2(x))))
        return x + self.dropout2(self.linear2(hidden))


class TransformerEncoderWithRoPE(nn.Module):
    """`num_layers` applications of ONE shared layer: the official construction (weights shared across depth)."""

    def __init__(self, layer: TransformerEncoderLayerWithRoPE, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([layer for _ in range(num_layers)])
        self.num_layers = num_layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


# ---------------------------------------------------------------------------------------------------------------------
# the tokenizer


class IlluminationTokenizer(nn.Module):
    """Official `Hdri_Encoder`: planes [B, 9, S, S] -> light tokens [B, num_tokens, output_dim].

    The first 7 arguments are the official constructor's. The rest size the backbone and transformer; their defaults
    are the official values, so `IlluminationTokenizer()` is the full-size network. `num_tokens` must be a square: the
    token grid is sqrt(num_tokens) x sqrt(num_tokens), row-major.
    """

    def __init__(self, output_dim: int = 768, num_tokens: int = 4096, cnn_out_channels: int = 256, n_heads: int = 8,
                 num_transformer_layers: int = 2, rope_base: float = 10000.0, *,
                 convnext_dims: Sequence[int] = (96, 192, 384, 768), convnext_depths: Sequence[int] = (3, 3, 9, 3),
                 num_freq_bands: int = 8, dim_feedforward: int | None = None, dropout: float = 0.1,
                 stochastic_depth_prob: float = 0.1, layer_scale: float = 1e-6) -> None:
        super().__init__()
        side = math.isqrt(num_tokens)
        if side * side != num_tokens or num_tokens < 1:
            raise ValueError(f"num_tokens must be a perfect square, got {num_tokens}")
        if len(convnext_dims) != 4 or len(convnext_depths) != 4:
            raise ValueError("convnext_dims and convnext_depths need 4 entries (one per stage)")
        self.output_dim = output_dim
        self.num_tokens = num_tokens
        self.target_h = self.target_w = side
        self.config: dict[str, Any] = dict(
            output_dim=output_dim, num_tokens=num_tokens, cnn_out_channels=cnn_out_channels, n_heads=n_heads,
            num_transformer_layers=num_transformer_layers, rope_base=rope_base, convnext_dims=list(convnext_dims),
            convnext_depths=list(convnext_depths), num_freq_bands=num_freq_bands,
            dim_feedforward=dim_feedforward, dropout=dropout, stochastic_depth_prob=stochastic_depth_prob,
            layer_scale=layer_scale)

        self.dir_encoder = FourierFeatureEncoder(input_channels=3, num_freq_bands=num_freq_bands)
        dir_channels = self.dir_encoder.output_channels

        self.stage1, self.stage2, self.stage3, self.stage4 = _convnext_stages(
            6, convnext_dims, convnext_depths, layer_scale, stochastic_depth_prob)

        self.fusion_c3 = DirectionGuidedFusion(convnext_dims[1], dir_channels, cnn_out_channels)
        self.fusion_c4 = DirectionGuidedFusion(convnext_dims[2], dir_channels, cnn_out_channels)
        self.fusion_c5 = DirectionGuidedFusion(convnext_dims[3], dir_channels, cnn_out_channels)

        self.projection_conv = nn.Conv2d(cnn_out_channels * 3, output_dim, kernel_size=1)
        layer = TransformerEncoderLayerWithRoPE(output_dim, n_heads, dim_feedforward or 4 * output_dim, dropout,
                                                rope_base)
        self.transformer_encoder = TransformerEncoderWithRoPE(layer, num_transformer_layers)
        self.ln_final = RMSNorm(output_dim)
        self._initialize_weights()

    def _initialize_weights(self) -> None:
        """Official init: torchvision's ConvNeXt init, then kaiming(fan_out) for every conv and 1/0 for every norm."""
        for module in (m for stage in self._stages() for m in stage.modules()):
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.GroupNorm, nn.LayerNorm)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def _stages(self) -> tuple[nn.Sequential, ...]:
        return (self.stage1, self.stage2, self.stage3, self.stage4)

    def grid_tokens(self, context: torch.Tensor) -> torch.Tensor:
        """Planes [B, 9, S, S] -> projected token grid [B, output_dim, side, side] (backbone + fusion, before attention).

        Exposed so callers can cache the costly CNN part per environment map.
        """
        if context.ndim != 4 or context.shape[1] != 9:
            raise ValueError(f"expected planes [B, 9, H, W] (LDR, LOG, DIR), got {tuple(context.shape)}")
        ldr, log, dirs = torch.tensor_split(context, [3, 6], dim=1)
        dir_encoding = self.dir_encoder(dirs)
        c2 = self.stage1(torch.cat([ldr, log], dim=1))
        c3 = self.stage2(c2)
        c4 = self.stage3(c3)
        c5 = self.stage4(c4)
        target = (self.target_h, self.target_w)
        scales = []
        for feat, fusion in ((c3, self.fusion_c3), (c4, self.fusion_c4), (c5, self.fusion_c5)):
            d = F.interpolate(dir_encoding, size=feat.shape[2:], mode="bilinear", align_corners=False)
            scales.append(F.interpolate(fusion(feat, d), size=target, mode="bilinear", align_corners=False))
        return self.projection_conv(torch.cat(scales, dim=1))

    def transform(self, grid: torch.Tensor) -> torch.Tensor:
        """Token grid [B, C, h, w] -> tokens [B, h*w, C] through the transformer and the final RMSNorm."""
        tokens = grid.flatten(2).transpose(1, 2)
        return self.ln_final(self.transformer_encoder(tokens))

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        """Planes [B, 9, S, S] -> light tokens [B, num_tokens, output_dim]."""
        return self.transform(self.grid_tokens(context))
