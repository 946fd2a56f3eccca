"""DINOv2 ViT-L/14 with 4 registers (`dinov2_vitl14_reg`): the image encoder whose tokens condition TRELLIS and NeAR.

Re-implemented from facebookresearch/dinov2 (`dinov2/models/vision_transformer.py`, `dinov2/layers/`,
`dinov2/hub/backbones.py`, commit b8931f7) so that `state_dict()` equals the hub model's, and the hub's weights file
(`dinov2_vitl14_reg4_pretrain.pth`) loads unchanged:

    patch_embed.proj      Conv2d 3 -> 1024, kernel = stride = 14             -> 37 x 37 patch tokens at 518^2
    cls_token [1,1,C]     pos_embed [1, 1 + 37^2, C]    register_tokens [1,4,C]    mask_token [1,C] (unused here)
    tokens = [cls, patches] + pos_embed (bicubic-resized, antialiased, for other image sizes), then the 4 registers
             are inserted after cls (they get no position): [cls, reg x4, patches]
    blocks.0..23          x += ls1.gamma * attn.proj(SDPA(attn.qkv(norm1 x)))
                          x += ls2.gamma * mlp.fc2(GELU(mlp.fc1(norm2 x)))
    norm                  the final LayerNorm (eps 1e-6, as every norm here)

TRELLIS conditions on `x_prenorm`, the tokens *before* `norm`, put through a LayerNorm without affine parameters
(eps 1e-5): all 1 + 4 + 1369 = 1374 tokens x 1024 at 518^2 (`trellis/pipelines/trellis_image_to_3d.py`
`encode_image`; NeAR's pipeline does the same). `encode` returns exactly that, from RGB in [0, 1] normalised with the
ImageNet mean and standard deviation as TRELLIS does. `norm` is loaded (it is in the file) but not used by `encode`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DINOV2_VITL14_REG", "DinoV2", "IMAGENET_MEAN", "IMAGENET_STD"]

#: Constructor arguments of the hub's `dinov2_vitl14_reg` (vit_large, patch 14, 518^2, layer scale, 4 registers).
DINOV2_VITL14_REG: dict[str, int | float] = {
    "img_size": 518, "patch_size": 14, "embed_dim": 1024, "depth": 24, "num_heads": 16, "mlp_ratio": 4.0,
    "num_register_tokens": 4,
}
#: torchvision's ImageNet normalisation, which TRELLIS applies before DINOv2.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_EPS = 1e-6


class _PatchEmbed(nn.Module):
    """Key `proj`: the non-overlapping patch convolution; [B, 3, H, W] -> [B, (H/p)(W/p), C], rows first."""

    def __init__(self, patch_size: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class _Attention(nn.Module):
    """Keys `qkv` (C -> 3C, laid out [3, heads, head_dim]) and `proj`; scale 1/sqrt(head_dim)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class _Mlp(nn.Module):
    """Keys `fc1`, `fc2`; exact (erf) GELU between."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _LayerScale(nn.Module):
    """Key `gamma` [C]: a learned per-channel scale of a residual branch (initialised to 1, as the hub's)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class _Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=_EPS)
        self.attn = _Attention(dim, num_heads)
        self.ls1 = _LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=_EPS)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = _LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoV2(nn.Module):
    """The DINOv2 ViT with registers. `forward(images)` -> `x_prenorm`; `encode(rgb)` -> TRELLIS's condition.

    Defaults are `dinov2_vitl14_reg` (`DINOV2_VITL14_REG`); smaller widths/depths serve tests.
    """

    def __init__(
        self,
        img_size: int = 518,
        patch_size: int = 14,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_register_tokens: int = 4,
    ) -> None:
        super().__init__()
        if img_size % patch_size or embed_dim % num_heads or num_register_tokens < 1:
            raise ValueError(f"img_size {img_size} must be a multiple of patch_size {patch_size}, embed_dim "
                             f"{embed_dim} of num_heads {num_heads}, and there must be registers (got "
                             f"{num_register_tokens})")
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.num_register_tokens = num_register_tokens
        grid = img_size // patch_size
        self.patch_embed = _PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, embed_dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
        self.blocks = nn.ModuleList(_Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=_EPS)
        # The hub model's (masked-token pre-training) parameter: in the weights file, never used for inference.
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        if not self.pos_embed.is_meta:  # the hub's initialisation scales, so untrained outputs stay moderate
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
            nn.init.normal_(self.cls_token, std=1e-6)
            nn.init.normal_(self.register_tokens, std=1e-6)

    def position_embedding(self, rows: int, cols: int) -> torch.Tensor:
        """[1, 1 + rows cols, C]: the stored embedding, or its patch part resized (bicubic, antialiased) to rows x cols
        patches as the hub's register models resize it (`interpolate_antialias=True`, `interpolate_offset=0`)."""
        stored = self.pos_embed.shape[1] - 1
        if rows * cols == stored and rows == cols:
            return self.pos_embed
        side = math.isqrt(stored)
        patch = self.pos_embed[:, 1:].float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
        patch = F.interpolate(patch, size=(rows, cols), mode="bicubic", antialias=True)
        patch = patch.permute(0, 2, 3, 1).reshape(1, rows * cols, -1).to(self.pos_embed.dtype)
        return torch.cat([self.pos_embed[:, :1], patch], dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W], already normalised (H, W multiples of the patch size) -> x_prenorm
        [B, 1 + registers + (H/p)(W/p), C]: the tokens after the last block, before `norm`."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"DINOv2 expects images [B, 3, H, W], got {tuple(images.shape)}")
        h, w = images.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {self.patch_size}")
        x = self.patch_embed(images.to(self.patch_embed.proj.weight.dtype))
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.position_embedding(h // self.patch_size, w // self.patch_size)
        x = torch.cat([x[:, :1], self.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:]], dim=1)
        for block in self.blocks:
            x = block(x)
        return x

    def encode(self, rgb: torch.Tensor) -> torch.Tensor:
        """The image condition TRELLIS and NeAR use: rgb [B, 3, H, W] in [0, 1] (sRGB-encoded) -> ImageNet
        normalisation -> x_prenorm -> LayerNorm without affine (eps 1e-5): [B, 1 + registers + patches, C]."""
        mean = torch.tensor(IMAGENET_MEAN, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
        tokens = self.forward((rgb - mean) / std)
        return F.layer_norm(tokens.float(), tokens.shape[-1:])
