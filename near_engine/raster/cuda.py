"""The CUDA backend: gsplat's fused kernels, imported only when a CUDA tensor arrives."""

from __future__ import annotations

import torch

from ..camera import Camera
from ..errors import RasterError


def rasterize_gsplat(means, quats, scales, opacities, channels, camera: Camera, background, *, antialiased: bool,
                     eps2d: float, tile_size: int):
    """gsplat.rasterization with render mode RGB+ED, returning the same RasterOutput as the CPU path."""
    from . import RasterOutput

    try:
        from gsplat import rasterization
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise RasterError("the CUDA rasterizer needs the 'gsplat' package (pip install gsplat)") from exc
    device = means.device
    viewmat = torch.as_tensor(camera.world_to_camera, dtype=torch.float32, device=device)[None]
    K = torch.as_tensor(camera.K, dtype=torch.float32, device=device)[None]
    image, alpha, _ = rasterization(
        means.float(), quats.float(), scales.float(), opacities.float(), channels.float(), viewmat, K,
        camera.width, camera.height, near_plane=camera.near, far_plane=camera.far, eps2d=eps2d,
        tile_size=tile_size, render_mode="RGB+ED",
        rasterize_mode="antialiased" if antialiased else "classic",
        camera_model="ortho" if camera.orthographic else "pinhole",
    )
    color, depth, alpha = image[0, ..., :-1], image[0, ..., -1:], alpha[0]
    if background is not None:
        color = color + (1.0 - alpha) * background.to(color)
    return RasterOutput(color, alpha, depth)
