"""Writing the engine's images: scene-linear OpenEXR (every pass kept) and display PNG (tone-mapped, said how).

The engine's passes are scene-linear HDR; only PNG output is display-referred. PNG uses Blender's "Standard" view
transform: linear values times 2^exposure, clipped to [0, 1], encoded with the sRGB transfer function. Alpha is
written straight (not premultiplied), as PNG expects.
"""

from __future__ import annotations

import os

import numpy as np
import OpenEXR

from .errors import NearError
from .files import write_atomically

# The codecs Blender's EXR writer offers (ImageFormatSettings.exr_codec), by their Blender names.
EXR_COMPRESSIONS: tuple[str, ...] = ("NONE", "RLE", "ZIPS", "ZIP", "PIZ", "PXR24", "B44", "B44A", "DWAA", "DWAB")
_EXR_CODECS = {name: getattr(OpenEXR, "NO_COMPRESSION" if name == "NONE" else f"{name}_COMPRESSION")
               for name in EXR_COMPRESSIONS}


def linear_to_srgb(linear: np.ndarray, exposure: float = 0.0) -> np.ndarray:
    """Blender's "Standard" view transform: exposure, clip to [0, 1], sRGB OETF. Returns float in [0, 1]."""
    x = np.clip(np.nan_to_num(np.asarray(linear, dtype=np.float64) * 2.0**exposure), 0.0, 1.0)
    return np.where(x <= 0.0031308, 12.92 * x, 1.055 * np.power(x, 1 / 2.4) - 0.055)


def srgb_to_linear(encoded: np.ndarray) -> np.ndarray:
    """The sRGB EOTF (piecewise; what Blender's "sRGB" colour space decodes with), float32."""
    x = np.asarray(encoded, dtype=np.float32)
    return np.where(x <= 0.04045, x / np.float32(12.92), ((x + np.float32(0.055)) / np.float32(1.055)) ** 2.4)


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
    image = Image.fromarray(np.round(pixels * 255).astype(np.uint8), mode)
    write_atomically(path, lambda tmp: image.save(tmp, format="PNG"))


def write_exr(path: str | os.PathLike, channels: dict[str, np.ndarray], compression: str = "ZIP",
              error: type[NearError] = NearError) -> None:
    """Write named [H,W] channels (e.g. "R", "G", "B", "A", "Depth.Z") as one scanline OpenEXR part.

    float16 arrays are stored as HALF, everything else as FLOAT. `compression` is one of EXR_COMPRESSIONS
    (Blender's names); PXR24, B44(A), DWAA and DWAB are lossy, and B44(A) only compress HALF channels.
    """
    codec = _EXR_CODECS.get(str(compression).upper())
    if codec is None:
        raise error(f"{path}: unknown EXR compression {compression!r}; use one of {', '.join(EXR_COMPRESSIONS)}")
    shapes = {np.shape(v) for v in channels.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2 or 0 in next(iter(shapes)):
        raise error(f"{path}: an EXR needs non-empty [H, W] channels of one size, got shapes {sorted(shapes)}")
    data = {name: np.ascontiguousarray(v, dtype=np.float16 if np.asarray(v).dtype == np.float16 else np.float32)
            for name, v in channels.items()}
    header = {"compression": codec, "type": OpenEXR.scanlineimage}
    write_atomically(path, lambda tmp: OpenEXR.File(header, data).write(tmp), error)
