"""Writing the engine's images: scene-linear OpenEXR (every pass kept) and display PNG (tone-mapped, said how).

The engine's passes are scene-linear HDR; only PNG output is display-referred. PNG uses Blender's "Standard" view
transform: linear values times 2^exposure, clipped to [0, 1], encoded with the sRGB transfer function. Alpha is
written straight (not premultiplied), as PNG expects.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import OpenEXR

from .errors import NearError


def linear_to_srgb(linear: np.ndarray, exposure: float = 0.0) -> np.ndarray:
    """Blender's "Standard" view transform: exposure, clip to [0, 1], sRGB OETF. Returns float in [0, 1]."""
    x = np.clip(np.nan_to_num(np.asarray(linear, dtype=np.float64) * 2.0**exposure), 0.0, 1.0)
    return np.where(x <= 0.0031308, 12.92 * x, 1.055 * np.power(x, 1 / 2.4) - 0.055)


def write_png(path: str | os.PathLike, rgb: np.ndarray, alpha: np.ndarray | None = None, exposure: float = 0.0) -> None:
    """Tone-map scene-linear `rgb` [H,W,3] (premultiplied by `alpha` [H,W] or [H,W,1] if given) to an 8-bit PNG."""
    from PIL import Image

    rgb = np.asarray(rgb, dtype=np.float64)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise NearError(f"write_png needs an [H, W, 3] image, got shape {rgb.shape}")
    if alpha is not None:
        a = np.clip(np.asarray(alpha, dtype=np.float64).reshape(rgb.shape[:2]), 0.0, 1.0)
        straight = np.where(a[..., None] > 0, rgb / np.maximum(a[..., None], 1e-12), 0.0)
        pixels = np.concatenate([linear_to_srgb(straight, exposure), a[..., None]], axis=-1)
        mode = "RGBA"
    else:
        pixels, mode = linear_to_srgb(rgb, exposure), "RGB"
    _atomic(path, lambda tmp: Image.fromarray(np.round(pixels * 255).astype(np.uint8), mode).save(tmp, format="PNG"))


def write_exr(path: str | os.PathLike, channels: dict[str, np.ndarray], compression: str = "ZIP") -> None:
    """Write named float32 [H,W] channels (e.g. "R", "G", "B", "A", "Depth.Z") as one scanline OpenEXR part."""
    if not channels:
        raise NearError("write_exr needs at least one channel")
    shapes = {np.shape(v) for v in channels.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise NearError(f"write_exr needs [H, W] channels of one size, got shapes {sorted(shapes)}")
    try:
        codec = getattr(OpenEXR, "NO_COMPRESSION" if compression == "NONE" else f"{compression}_COMPRESSION")
    except AttributeError:
        raise NearError(f"unknown EXR compression {compression!r}") from None
    data = {name: np.ascontiguousarray(v, dtype=np.float32) for name, v in channels.items()}
    header = {"compression": codec, "type": OpenEXR.scanlineimage}
    _atomic(path, lambda tmp: OpenEXR.File(header, data).write(tmp))


def _atomic(path: str | os.PathLike, write) -> None:
    """Write through a temporary file in the same folder, so a failure never leaves half an image behind."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        write(str(tmp))
        os.replace(tmp, target)
    except (OSError, RuntimeError, ValueError) as exc:
        raise NearError(f"could not write {target}: {exc}") from exc
    finally:
        if tmp.exists():
            tmp.unlink()
