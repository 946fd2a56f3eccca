"""The Intrinsic-Aware Decoder (IAD): an LH-SLAT -> view- and light-independent features h per voxel.

Re-implements NeAR's `SLatGaussianDecoder` (`trellis/models/structured_latent_vae/decoder_gs.py`, trunk
`SparseTransformerRegisterSelfBase` in `base.py`, commit 163c214) so that `state_dict()` equals the official
checkpoint's names and shapes (reference/checkpoints/near_decoder.json):

    feats [N, latent_channels] -> input_layer (Linear -> C) + APE(voxel xyz)          (pe_mode "ape")
    num_blocks x RegisterSelfBlock: LN -> cross-attn to the registers (full)
                                    LN -> self-attn, "swin": window 8, shift 0 on even / 4 on odd blocks
                                    LN -> FFN (4x, GELU tanh)
    -> h [N, C] and the registers [B, R, C]

`reg_tokens` [1, R, C] is a learned parameter; the decoder returns it, expanded to the batch, unchanged (the LAD uses it
as keys/values too). There is no output layer and no `offset_perturbation` here (unlike TRELLIS's decoder).

The constructor takes the official JSON `args` unchanged. Deliberate differences, none of which changes the maths:
`use_fp16` does not cast (modules are built in float32; fp16 files load through `checkpoints.load_weights`, which
casts); `use_checkpoint` is ignored; `pretrained_decoder_path` (a training-time initialisation on the authors'
machine) is ignored, since a checkpoint's weights replace it anyway. As in the official base class, `qk_rms_norm_cross`
is accepted but never reaches the blocks (so it adds no parameters).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..sparse import SparseTensor
from .blocks import AbsolutePositionEmbedder, RegisterSelfBlock

__all__ = ["IntrinsicAwareDecoder", "block_windows"]


def block_windows(attn_mode: str, num_blocks: int, window_size: int | None) -> list[tuple[int | None, int]]:
    """(window, shift) per block: "swin" -> (w, w // 2 * (i % 2)) (TRELLIS `block_attn_config`); "full" -> (None, 0)."""
    if attn_mode == "swin":
        if not window_size or window_size <= 0:
            raise ValueError(f"attn_mode 'swin' needs a positive window_size, got {window_size!r}")
        return [(window_size, window_size // 2 * (i % 2)) for i in range(num_blocks)]
    if attn_mode == "full":
        return [(None, 0)] * num_blocks
    raise ValueError(f"attn_mode {attn_mode!r} is not supported (use 'swin' or 'full')")


class IntrinsicAwareDecoder(nn.Module):
    """NeAR IAD. `forward(slat)` -> (h SparseTensor [N, model_channels], registers [B, R, model_channels])."""

    def __init__(
        self,
        resolution: int = 64,
        model_channels: int = 768,
        latent_channels: int = 8,
        cond_channels: int = 768,
        num_blocks: int = 12,
        num_register_tokens: int = 16,
        pretrained_decoder_path: str | None = None,
        num_heads: int | None = None,
        num_head_channels: int | None = 64,
        mlp_ratio: float = 4,
        attn_mode: str = "swin",
        window_size: int = 8,
        pe_mode: str = "ape",
        use_fp16: bool = False,
        use_checkpoint: bool = False,
        qk_rms_norm: bool = False,
        qk_rms_norm_cross: bool = False,
        representation_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if cond_channels != model_channels:
            raise ValueError(
                f"cond_channels ({cond_channels}) must equal model_channels ({model_channels}): the register tokens "
                "are the keys/values of the register attention"
            )
        if pe_mode not in ("ape", "null"):
            raise ValueError(f"pe_mode {pe_mode!r} is not supported (use 'ape')")
        self.resolution = resolution
        self.model_channels = model_channels
        self.latent_channels = latent_channels
        self.num_blocks = num_blocks
        self.num_heads = num_heads or model_channels // (num_head_channels or 64)
        self.pe_mode = pe_mode
        self.window_size = window_size
        self.attn_mode = attn_mode
        self.use_fp16 = use_fp16
        self.representation_config = representation_config
        self.pos_embedder = AbsolutePositionEmbedder(model_channels) if pe_mode == "ape" else None
        self.input_layer = nn.Linear(latent_channels, model_channels)
        self.blocks = nn.ModuleList(
            RegisterSelfBlock(
                model_channels,
                cond_channels,
                self.num_heads,
                mlp_ratio=mlp_ratio,
                window=window,
                shift=shift,
                qk_rms_norm=qk_rms_norm,
            )
            for window, shift in block_windows(attn_mode, num_blocks, window_size)
        )
        self.reg_tokens = nn.Parameter(torch.randn(1, num_register_tokens, model_channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """TRELLIS init: xavier-uniform Linear weights, zero biases; registers ~ N(0, 1)."""
        if self.reg_tokens.is_meta:
            return
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, slat: SparseTensor) -> tuple[SparseTensor, torch.Tensor]:
        """slat feats [N, latent_channels] -> h [N, C] on the same voxels (input dtype) and registers [B, R, C]."""
        if slat.feats.ndim != 2 or slat.feats.shape[1] != self.latent_channels:
            raise ValueError(
                f"IAD expects latent features [N, {self.latent_channels}], got {tuple(slat.feats.shape)}"
            )
        dtype = self.input_layer.weight.dtype
        h = self.input_layer(slat.feats.to(dtype))
        if self.pos_embedder is not None:
            h = h + self.pos_embedder(slat.coords[:, 1:]).to(dtype)
        registers = self.reg_tokens.expand(slat.batch_size, -1, -1)
        for block in self.blocks:
            h = block(h, slat, registers)
        return slat.replace(h.to(slat.feats.dtype)), registers.to(slat.feats.dtype)
