"""The Lighting-Aware Decoder (LAD): IAD features + view + light tokens -> raw per-voxel Gaussian head outputs.

Re-implements NeAR's `SLatGaussianRenderer` (`trellis/models/structured_latent_vae/renderer_gs.py`, trunk
`SparseTransformerCrossViewRegisterBase` in `base.py`, commit 163c214); `state_dict()` equals the official
checkpoint's names and shapes (reference/checkpoints/near_renderer.json) unless near-tiny's `normal_head` adds its
`normal_out_layer`. Forward, as `SLatGaussianRenderer.forward`:

    xyz   = (voxel index + 0.5) / resolution            in [0, 1]^3 (NOT the +-0.5 asset cube: an official quirk)
    ob    = xyz - cam_pos;  dist = |ob|;  view = ob / dist
    e_v   = ob_views_norm(ob_views_encoder(NeRF(view, 12 freqs, +input) [75]))      RMSNorm(C), weight `.weight`
          + ob_dists_norm(ob_dists_encoder(NeRF(dist, 12 freqs, +input) [25]))
    h1    = input_layer(h) (+ APE if pe_mode == "ape"; default "null") + e_v
    num_blocks x RegisterCrossBlock: LN -> attn to registers; LN -> attn to light tokens; LN -> FFN
    hn, h1n = layer_norm(h), layer_norm(h1)          F.layer_norm with its default eps 1e-5 (not the blocks' 1e-6)
    gs    = gs_out_layer(hn + e_v)    Linear-GELU(erf)-Linear      pbr = pbr_out_layer(hn + e_v)
    scale = scale_out_layer(h1n)                                   rgb = rgb_out_layer(h1n)

`cam_pos` is the camera centre in the frame the official code uses (`inverse(extrinsics)[:, :3, 3]` of its
world-to-camera matrices; see `camera_positions`), compared as is against voxel positions in [0, 1]^3.

Returned layout (`forward` -> dict of [N, ...] raw outputs, before any `lr` scale or activation; G = num_gaussians).
Inside each block of k values per Gaussian the values are Gaussian-major: `block.reshape(N, G, k)`:

    "gs"    [N, 14G]: _xyz 3G (offset logits) | _base_color 3G | _scaling 3G | _rotation 4G | _opacity G
    "pbr"   [N,  3G]: _roughness G | _metallic G | _pbr1 G
    "scale" [N,  3G]: _scaling_view 3G
    "rgb"   [N, 35G]: _rgb 32G (colour feature) | _shadow G | _hdri1 G | _hdri2 G
    "normal" [N, 3G]: with `normal_head` only (near-tiny): per Gaussian a residual on its voxel's normal

`split_heads` cuts these into named [N, G, k] views. The official `to_representation` then multiplies each field by
`representation_config["lr"][name]`, and for `_xyz` adds the buffer `offset_perturbation` [G, 3] (atanh of a
Hammersley set / voxel_size) before `tanh(.) / resolution * 0.5 * voxel_size` is added to `xyz`; that, and the
activations of `Gaussian_view`, belong to the Gaussian heads, not here.

Constructor arguments are the official JSON `args`; `use_fp16`, `use_checkpoint` and `pretrained_decoder_path` are
accepted and ignored (float32 build; checkpoints load with casting), as `num_register_tokens` is in the official class.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..sparse import SparseTensor
from .blocks import AbsolutePositionEmbedder, BlockContext, NeRFEncoding, RegisterCrossBlock
from .gaussian_heads import RepresentationConfig, hammersley_offsets

__all__ = [
    "LightingAwareDecoder",
    "HEAD_LAYOUT",
    "camera_positions",
    "split_heads",
]

# head -> ordered (field, values per Gaussian), as `_calc_layout` / `_view_calc_layout` of the official renderer.
HEAD_LAYOUT: dict[str, tuple[tuple[str, int], ...]] = {
    "gs": (("_xyz", 3), ("_base_color", 3), ("_scaling", 3), ("_rotation", 4), ("_opacity", 1)),
    "pbr": (("_roughness", 1), ("_metallic", 1), ("_pbr1", 1)),
    "scale": (("_scaling_view", 3),),
    "rgb": (("_rgb", 32), ("_shadow", 1), ("_hdri1", 1), ("_hdri2", 1)),
}
VIEW_FREQUENCIES = 12  # NeRFEncoding(3, 12, include_input=True) -> 75; NeRFEncoding(1, 12, True) -> 25


def camera_positions(extrinsics: torch.Tensor) -> torch.Tensor:
    """Camera centres [B, 3] from world-to-camera matrices [B, 4, 4] (the official `inverse(extrinsics)[:, :3, 3]`)."""
    return torch.linalg.inv(extrinsics)[:, :3, 3]


def split_heads(heads: dict[str, torch.Tensor], num_gaussians: int) -> dict[str, torch.Tensor]:
    """Raw head outputs -> {field: [N, G, k]} views (`_xyz`, `_base_color`, ..., `_hdri2`), see `HEAD_LAYOUT`."""
    out = {}
    for head, fields in HEAD_LAYOUT.items():
        t, start = heads[head], 0
        expected = num_gaussians * sum(k for _, k in fields)
        if t.ndim != 2 or t.shape[1] != expected:
            raise ValueError(
                f"head {head!r} has shape {tuple(t.shape)}, expected [N, {expected}] for {num_gaussians} Gaussians"
            )
        for name, k in fields:
            out[name] = t[:, start : start + k * num_gaussians].reshape(t.shape[0], num_gaussians, k)
            start += k * num_gaussians
    return out


class LightingAwareDecoder(nn.Module):
    """NeAR LAD. `forward(h, registers, light_tokens, cam_pos)` -> {"gs", "pbr", "scale", "rgb"} raw outputs [N, .]."""

    def __init__(
        self,
        resolution: int = 64,
        model_channels: int = 768,
        latent_channels: int = 768,
        cond_channels: int = 768,
        num_blocks: int = 12,
        num_register_tokens: int = 16,
        pretrained_decoder_path: str | None = None,
        num_heads: int | None = None,
        num_head_channels: int | None = 64,
        mlp_ratio: float = 4,
        attn_mode: str = "swin",
        window_size: int = 8,
        pe_mode: str = "null",
        use_fp16: bool = False,
        use_checkpoint: bool = False,
        qk_rms_norm: bool = False,
        qk_rms_norm_cross: bool = False,
        representation_config: dict[str, Any] | None = None,
        zero_init_heads: bool = False,
        normal_head: bool = False,
    ) -> None:
        super().__init__()
        self.zero_init_heads = bool(zero_init_heads)
        if latent_channels != model_channels:
            raise ValueError(
                f"latent_channels ({latent_channels}) must equal model_channels ({model_channels}): the heads add the "
                "IAD features to the view embedding"
            )
        if pe_mode not in ("ape", "null"):
            raise ValueError(f"pe_mode {pe_mode!r} is not supported (use 'null' or 'ape')")
        rep = RepresentationConfig.from_official(representation_config or {})
        self.resolution = resolution
        self.model_channels = model_channels
        self.num_blocks = num_blocks
        self.num_heads = num_heads or model_channels // (num_head_channels or 64)
        self.pe_mode = pe_mode
        self.rep_config = rep
        self.num_gaussians = rep.num_gaussians
        g = self.num_gaussians
        self.head_channels = {head: g * sum(k for _, k in fields) for head, fields in HEAD_LAYOUT.items()}

        self.pos_embedder = AbsolutePositionEmbedder(model_channels) if pe_mode == "ape" else None
        self.input_layer = nn.Linear(latent_channels, model_channels)
        self.blocks = nn.ModuleList(
            RegisterCrossBlock(
                model_channels, cond_channels, self.num_heads, mlp_ratio=mlp_ratio, qk_rms_norm_cross=qk_rms_norm_cross
            )
            for _ in range(num_blocks)
        )
        self.ob_views_pe = NeRFEncoding(3, VIEW_FREQUENCIES, include_input=True)
        self.ob_views_encoder = nn.Linear(self.ob_views_pe.out_dim, model_channels)
        self.ob_views_norm = nn.RMSNorm(model_channels)
        self.ob_dists_pe = NeRFEncoding(1, VIEW_FREQUENCIES, include_input=True)
        self.ob_dists_encoder = nn.Linear(self.ob_dists_pe.out_dim, model_channels)
        self.ob_dists_norm = nn.RMSNorm(model_channels)
        c = model_channels
        self.gs_out_layer = nn.Sequential(nn.Linear(c, c), nn.GELU(), nn.Linear(c, self.head_channels["gs"]))
        self.pbr_out_layer = nn.Sequential(nn.Linear(c, c), nn.GELU(), nn.Linear(c, self.head_channels["pbr"]))
        self.scale_out_layer = nn.Linear(c, self.head_channels["scale"])
        self.rgb_out_layer = nn.Linear(c, self.head_channels["rgb"])
        # near-tiny: a per-Gaussian residual on the voxel normal (not in the official renderer; always starts at zero)
        self.normal_out_layer = nn.Linear(c, 3 * g) if normal_head else None
        self.register_buffer("offset_perturbation", hammersley_offsets(g, rep.voxel_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """TRELLIS init: xavier-uniform Linear weights, zero biases (RMSNorm weights stay 1). With `zero_init_heads`
        (near-tiny) the gs, pbr and scale heads' last layers start at zero: the Gaussians start at their voxels'
        surfels (or, without surfels, Hammersley points with the configured scale) and opacity, and the materials at
        the asset's material prior. The
        normal residual head (`normal_head`) always starts at zero: the voxel normals as they are."""
        if self.input_layer.weight.is_meta:
            return
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        zeroed = (self.gs_out_layer[-1], self.pbr_out_layer[-1], self.scale_out_layer) if self.zero_init_heads else ()
        if self.normal_out_layer is not None:
            zeroed += (self.normal_out_layer,)
        for last in zeroed:
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    #: The fields of the Gaussians' shape and place: what `restart_geometry` sets back to zero.
    GEOMETRY_FIELDS = ("_xyz", "_scaling", "_rotation", "_scaling_view")

    @torch.no_grad()
    def restart_geometry(self) -> None:
        """Zero the head rows of the Gaussians' offsets, rotations and scales (`GEOMETRY_FIELDS`) and the normal
        residual, so the Gaussians start again where the renderer places them at zero (near-tiny: its surfels);
        colour, opacity and material rows keep what they learned. For weights trained before surfels."""
        g = self.num_gaussians
        for head, layer in (("gs", self.gs_out_layer[-1]), ("scale", self.scale_out_layer)):
            start = 0
            for name, k in HEAD_LAYOUT[head]:
                if name in self.GEOMETRY_FIELDS:
                    layer.weight[start:start + k * g] = 0
                    layer.bias[start:start + k * g] = 0
                start += k * g
        if self.normal_out_layer is not None:  # its corrections were of the voxel normals
            self.normal_out_layer.weight.zero_()
            self.normal_out_layer.bias.zero_()

    def view_embedding(self, tensor: SparseTensor, cam_pos: torch.Tensor) -> torch.Tensor:
        """e_v [N, C] for every voxel of `tensor`, seen from `cam_pos` [B, 3] (or [3] / [1, 3] for all elements)."""
        dtype = self.ob_views_encoder.weight.dtype
        cam_pos = cam_pos.to(device=tensor.device, dtype=torch.float32).reshape(-1, 3)
        if cam_pos.shape[0] not in (1, tensor.batch_size):
            raise ValueError(f"cam_pos must be [B={tensor.batch_size}, 3] or [3], got {tuple(cam_pos.shape)}")
        xyz = (tensor.coords[:, 1:].float() + 0.5) / self.resolution
        cam = cam_pos[0:1] if cam_pos.shape[0] == 1 else cam_pos[tensor.coords[:, 0].long()]
        ob = xyz - cam
        dist = torch.linalg.vector_norm(ob, dim=-1, keepdim=True)
        view = ob / dist
        e_view = self.ob_views_norm(self.ob_views_encoder(self.ob_views_pe(view).to(dtype)))
        e_dist = self.ob_dists_norm(self.ob_dists_encoder(self.ob_dists_pe(dist).to(dtype)))
        return e_view + e_dist

    def project_context(self, registers: torch.Tensor, light_tokens: torch.Tensor) -> list[BlockContext]:
        """Every block's keys/values of the registers and light tokens. They depend on neither the voxels nor the
        camera, so a renderer can compute them once per (asset, light) and pass them to `forward(context=...)`."""
        dtype = self.input_layer.weight.dtype
        registers, light_tokens = registers.to(dtype), light_tokens.to(dtype)
        return [block.project_context(registers, light_tokens) for block in self.blocks]

    def forward(
        self,
        h: SparseTensor,
        registers: torch.Tensor | None,
        light_tokens: torch.Tensor | None,
        cam_pos: torch.Tensor,
        context: list[BlockContext] | None = None,
    ) -> dict[str, torch.Tensor]:
        """h: IAD output [N, C]; registers [B|1, R, C]; light_tokens [B|1, L, cond_channels]; cam_pos [B|1, 3].

        `context` (from `project_context`) replaces registers and light_tokens, which may then be None.
        Returns {"gs": [N, 14G], "pbr": [N, 3G], "scale": [N, 3G], "rgb": [N, 35G]} in the input's dtype, rows in
        `h`'s voxel order (layout in the module docstring), and with `normal_head` "normal" [N, 3G]: per Gaussian
        (Gaussian-major within a voxel) a residual added to the camera-facing voxel normal.
        """
        if h.feats.ndim != 2 or h.feats.shape[1] != self.model_channels:
            raise ValueError(f"LAD expects IAD features [N, {self.model_channels}], got {tuple(h.feats.shape)}")
        dtype = self.input_layer.weight.dtype
        feats = h.feats.to(dtype)
        e_v = self.view_embedding(h, cam_pos)
        x = self.input_layer(feats)
        if self.pos_embedder is not None:
            x = x + self.pos_embedder(h.coords[:, 1:]).to(dtype)
        x = x + e_v
        if context is None:
            if registers is None or light_tokens is None:
                raise ValueError("LAD needs registers and light tokens, or their projected context")
            context = self.project_context(registers, light_tokens)
        if len(context) != len(self.blocks):
            raise ValueError(f"LAD context has {len(context)} blocks, the model {len(self.blocks)}")
        for block, projected in zip(self.blocks, context):
            x = block(x, h, projected=projected)
        hn = F.layer_norm(feats, feats.shape[-1:])
        xn = F.layer_norm(x, x.shape[-1:])
        out = {
            "gs": self.gs_out_layer(hn + e_v),
            "pbr": self.pbr_out_layer(hn + e_v),
            "scale": self.scale_out_layer(xn),
            "rgb": self.rgb_out_layer(xn),
        }
        if self.normal_out_layer is not None:
            out["normal"] = self.normal_out_layer(hn + e_v)
        return {k: v.to(h.feats.dtype) for k, v in out.items()}
