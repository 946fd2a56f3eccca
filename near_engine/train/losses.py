"""NeAR's stage-2 losses (reference §2.5), without LPIPS: its VGG/AlexNet weights cannot be downloaded here.

    L = L1(log1p) + 0.2 (1 - SSIM) + w_pbr L_pbr + 1 L_alpha + 1e4 L_vol + 1e-3 L_opacity

with the reference's w_pbr = 0.3 and exposure 1; near-tiny trains with w_pbr = 1 and exposure 4 (`LossWeights`).

* reconstruction: L1 between log1p(exposure * colour) of the predicted and the Cycles lit colour (premultiplied,
  linear HDR; exposure 1 is the reference's loss), both over the light's own background where it is given (as a
  user and `near eval` see the object: a silhouette a fraction of a pixel too wide shows a bright sky's edge as the
  object's colour; over black it costs little), and
  D-SSIM on gamma-2.2 images clipped to [0, 1] (the released code's choice; the paper uses AgX);
* L_pbr: L1 of the intrinsic pass's base colour, roughness, metallic (and specular level where the data has it)
  against the G-buffers (0.5 each, as the code)
  and of its unit normal against Cycles' normal where the object covers the pixel (0.5; the paper found normal losses
  hurt at full scale, so it is a separate term and weight);
* L_alpha: L1 of the lit and intrinsic alphas against Cycles' alpha (the silhouette);
* L_vol = mean prod(s) + mean prod(s_hat), L_opacity = mean (1 - opacity)^2 (regularizers, the paper's weights).
The shadow term needs a ground-truth shadow pass, which the data set does not render: left out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..frame import FrameGaussians

__all__ = ["LossWeights", "ssim", "stage2_losses"]


@dataclass(frozen=True)
class LossWeights:
    """Term weights, and `exposure`, the gain inside the L1's log1p. Blender's bundled HDRIs light objects to a
    median of about 0.1 (linear), where log1p is nearly linear and the colour terms pull the shared networks about
    3x less than the alpha term; a gain of 4 puts typical values into log1p's compressive range, as brighter HDRIs
    would."""

    l1: float = 1.0
    exposure: float = 4.0
    dssim: float = 0.2
    pbr: float = 1.0  # the reference's 0.3 left materials wrong for thousands of steps on CPU budgets
    normal: float = 0.5  # inside L_pbr, like each material channel's 0.5
    alpha: float = 1.0
    volume: float = 1e4
    opacity: float = 1e-3


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Mean SSIM of two images [H, W, C] in [0, 1] (Gaussian window, zero padding shrunk by the window's weight)."""
    x = torch.arange(window, dtype=a.dtype, device=a.device) - window // 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    kernel = (g[:, None] * g[None]) / g.sum() ** 2
    channels = a.shape[-1]
    weight = kernel.expand(channels, 1, window, window)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, weight, padding=window // 2, groups=channels)

    pa, pb = a.permute(2, 0, 1)[None], b.permute(2, 0, 1)[None]
    norm = blur(torch.ones_like(pa))
    mu_a, mu_b = blur(pa) / norm, blur(pb) / norm
    var_a = blur(pa * pa) / norm - mu_a ** 2
    var_b = blur(pb * pb) / norm - mu_b ** 2
    cov = blur(pa * pb) / norm - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    value = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return value.mean()


def _gamma(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(1e-6, 1.0) ** (1 / 2.2)


def stage2_losses(passes: dict[str, torch.Tensor], frame: FrameGaussians, target_rgb: torch.Tensor,
                  target_alpha: torch.Tensor, gbuffers: dict[str, torch.Tensor],
                  weights: LossWeights = LossWeights(), background: torch.Tensor | None = None
                  ) -> dict[str, torch.Tensor]:
    """Loss terms (weighted) and their sum under "loss", for one rendered view.

    `passes`: `rasterize_passes` output; `target_rgb` [H, W, 3] the Cycles lit colour (premultiplied, at the strength
    the networks render: see `loop.py`); `target_alpha` [H, W, 1]; `gbuffers`: base_color, roughness, metallic,
    normal [H, W, k] of the same camera under uniform light; `background` [H, W, 3] the light's map as the camera sees
    it (at the targets' strength), under both colours in the L1 term.
    """
    color = passes["color"]
    seen, seen_target = color.clamp_min(0.0), target_rgb
    if background is not None:
        seen = seen + (1.0 - passes["lit_alpha"]) * background
        seen_target = seen_target + (1.0 - target_alpha) * background
    terms = {
        "l1": weights.l1 * (torch.log1p(weights.exposure * seen)
                            - torch.log1p(weights.exposure * seen_target)).abs().mean(),
        "dssim": weights.dssim * (1.0 - ssim(_gamma(color), _gamma(target_rgb))),
        "alpha": weights.alpha * ((passes["lit_alpha"] - target_alpha).abs().mean()
                                  + (passes["alpha"] - target_alpha).abs().mean()),
    }
    material = sum(0.5 * (passes[name] - gbuffers[name]).abs().mean() for name in ("base_color", "roughness",
                                                                                     "metallic", "specular")
                   if name in gbuffers)
    covered = (target_alpha > 0.5).to(color)
    normal_gt = F.normalize(gbuffers["normal"], dim=-1)
    normal = ((passes["normal"] - normal_gt).abs() * covered).sum() / (3 * covered.sum()).clamp_min(1.0)
    terms["pbr"] = weights.pbr * (material + weights.normal * normal)
    terms["volume"] = weights.volume * (frame.intrinsic.scales.prod(-1).mean() + frame.lit.scales.prod(-1).mean())
    terms["opacity"] = weights.opacity * (1.0 - frame.intrinsic.opacities).pow(2).mean()
    terms["loss"] = sum(terms.values())
    return terms
