"""Gaussian rasterization behind one function: gsplat on CUDA, a compiled numba kernel on the CPU.

Both backends are differentiable and return, per pixel, the composited channels (any count, HDR), alpha and the
expected depth (gsplat's "ED": accumulated depth / alpha, 0 where nothing was hit), composited over an optional
background.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..camera import Camera
from ..errors import RasterError
from .projection import project_gaussians

__all__ = ["RasterOutput", "rasterize"]


@dataclass
class RasterOutput:
    """Per-pixel results, each [H,W,*]: `channels` [H,W,C], `alpha` [H,W,1], `depth` [H,W,1] (expected z)."""

    channels: torch.Tensor
    alpha: torch.Tensor
    depth: torch.Tensor


def rasterize(
    means: torch.Tensor,
    quats: torch.Tensor,
    scales: torch.Tensor,
    opacities: torch.Tensor,
    channels: torch.Tensor,
    camera: Camera,
    background: torch.Tensor | None = None,
    *,
    antialiased: bool = True,
    eps2d: float = 0.3,
    tile_size: int = 16,
    backend: str = "auto",
) -> RasterOutput:
    """Render N Gaussians (means [N,3], wxyz quats [N,4], scales [N,3], opacities [N], channels [N,C]) for `camera`.

    `background` is [C] or [H,W,C] and is composited under the result. `backend` is "auto" (CUDA tensors go to
    gsplat, CPU tensors to the numba kernel), "cpu" or "cuda". Antialiasing is gsplat's "antialiased" mode: a
    `eps2d` pixel^2 low-pass on each 2D covariance with the matching opacity compensation.
    """
    _check_inputs(means, quats, scales, opacities, channels, camera, background)
    if not 0.1 <= eps2d <= 100.0:
        # Below 0.1 px^2 a thin Gaussian's conic grows so large that the CPU kernel's per-row exp recurrence
        # overflows; one limit for both backends keeps their images alike.
        raise RasterError(f"eps2d (the 2D blur in pixels^2) must be between 0.1 and 100, got {eps2d}")
    if not 1 <= tile_size <= 256 or -(-max(camera.width, camera.height) // tile_size) >= 2**16:
        raise RasterError(f"tile_size must be 1..256 and leave fewer than 65536 tiles per side, got {tile_size}")
    if backend == "auto":
        backend = "cuda" if means.is_cuda else "cpu"
    tensors = (means, quats, scales, opacities, channels)
    if backend == "cuda":
        if not (torch.cuda.is_available() and all(x.is_cuda for x in tensors)):
            raise RasterError("the 'cuda' rasterizer needs a CUDA device and CUDA tensors")
        from .cuda import rasterize_gsplat

        return rasterize_gsplat(means, quats, scales, opacities, channels, camera, background,
                                antialiased=antialiased, eps2d=eps2d, tile_size=tile_size)
    if backend != "cpu":
        raise RasterError(f"unknown rasterizer backend {backend!r} (use 'auto', 'cpu' or 'cuda')")
    if any(x.device.type != "cpu" for x in tensors):
        raise RasterError("the 'cpu' rasterizer needs CPU tensors (use backend='auto' for CUDA tensors)")
    return _rasterize_cpu(means, quats, scales, opacities, channels, camera, background, antialiased, eps2d, tile_size)


def _rasterize_cpu(means, quats, scales, opacities, channels, camera, background, antialiased, eps2d, tile_size):
    from .cpu import CompositeCPU, bin_projected

    dtype = torch.float64 if channels.dtype == torch.float64 else torch.float32
    means, quats, scales, opacities, channels = (x.to(dtype) for x in (means, quats, scales, opacities, channels))
    proj = project_gaussians(means, quats, scales, opacities, camera, eps2d=eps2d, antialiased=antialiased)
    bins = bin_projected(proj.means2d.detach().numpy(), proj.radii.numpy(), proj.depths.detach().numpy(),
                         camera.width, camera.height, tile_size)
    feats = torch.cat([channels, proj.depths[:, None]], dim=-1)  # depth rides along as one more channel
    image, alpha = CompositeCPU.apply(proj.means2d, proj.conics, proj.opacities, feats, bins)
    alpha = alpha[..., None]
    color, depth_sum = image[..., :-1], image[..., -1:]
    depth = torch.where(alpha > 0, depth_sum / alpha.clamp_min(1e-10), torch.zeros_like(depth_sum))
    if background is not None:
        color = color + (1.0 - alpha) * background.to(color)
    return RasterOutput(color, alpha, depth)


def _check_inputs(means, quats, scales, opacities, channels, camera, background) -> None:
    n = means.shape[0] if means.ndim == 2 else -1
    shapes = {"means": (means, (n, 3)), "quats": (quats, (n, 4)), "scales": (scales, (n, 3)),
              "opacities": (opacities, (n,))}
    for name, (x, shape) in shapes.items():
        if tuple(x.shape) != shape:
            raise RasterError(f"{name} must have shape {list(shape)} for {n} Gaussians, got {list(x.shape)}")
    if channels.ndim != 2 or channels.shape[0] != n:
        raise RasterError(f"channels must have shape [{n}, C], got {list(channels.shape)}")
    if background is not None and tuple(background.shape) not in (
            (channels.shape[1],), (camera.height, camera.width, channels.shape[1])):
        raise RasterError(f"background must have shape [C] or [H, W, C] = [{camera.height}, {camera.width}, "
                          f"{channels.shape[1]}], got {list(background.shape)}")
    for name, x in (("means", means), ("quats", quats), ("scales", scales), ("opacities", opacities),
                    ("channels", channels)):
        if not x.is_floating_point():
            raise RasterError(f"{name} must be a floating-point tensor, got {x.dtype}")
        if not torch.isfinite(x).all():
            raise RasterError(f"{name} contains NaN or infinite values")
