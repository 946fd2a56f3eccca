"""A user's photo -> the square, matted RGBA the lift consumes, prepared as NeAR's official pipeline prepares it.

The object's alpha comes from the image when it has one. An image without alpha gets a simple offline cut-out: when
its border is one colour (a studio backdrop), pixels close to that colour are background; any other background is
refused with a message that names the fix (an image with alpha). The object is then cropped to a square of 1.2x its
bounding box, matted on black (RGB premultiplied by alpha) and resized.

Colours come back scene-linear (8/16-bit images are decoded with the sRGB EOTF; EXR is already linear), as the
camera exposed and white-balanced them. A render that stands in for a photo (training, evaluation, the demo) is
exposed and white-balanced the way a camera does it first (`metered`): its light's strength and colour are numbers no
photo of the object alone can reveal.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..camera import Camera
from ..errors import NearError
from ..images import srgb_to_linear

#: The largest photo read (pixels); bounds memory before decoding (4 float32 channels: 1 GiB).
MAX_PIXELS = 64 * 1024 * 1024
#: Crop margin around the object's bounding box, as the official pipeline crops.
CROP_MARGIN = 1.2
#: An image border whose colours spread less than this (linear RGB, per channel standard deviation) is a backdrop.
BACKDROP_SPREAD = 0.03
#: Pixels within this distance of the backdrop colour (linear RGB) are background.
BACKDROP_DISTANCE = 0.08
#: The exposure the lift expects of a photo: a white diffuse card lit by the whole scene reads this in every channel
#: (linear).
METERED_WHITE = 1.0


class ImageError(NearError):
    """A photo that cannot be read or prepared."""


def read_photo(path: str | os.PathLike) -> tuple[np.ndarray, bool]:
    """The photo at `path` as straight (not premultiplied) linear RGBA float32 [H, W, 4], and whether it had alpha."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such image file")
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: the file is empty")
    if path.suffix.lower() == ".exr":
        return _read_exr(path)
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            _check_size(path, image.width, image.height)
            image.load()
            has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
            depth16 = image.mode in ("I;16", "I;16B", "I;16L", "I")
            if depth16:  # 16-bit greyscale
                grey = np.clip(np.asarray(image, dtype=np.float32) / 65535.0, 0.0, 1.0)
                rgba = np.concatenate([np.repeat(grey[..., None], 3, -1), np.ones_like(grey)[..., None]], -1)
            else:
                rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise ImageError(f"{path}: not an image this reads (PNG, JPEG, EXR, ...): {error}") from None
    rgba[..., :3] = srgb_to_linear(rgba[..., :3])
    return rgba, has_alpha


def _check_size(path: Path, width: int, height: int) -> None:
    if width < 1 or height < 1:
        raise ImageError(f"{path}: the image has no pixels ({width}x{height})")
    if width * height > MAX_PIXELS:
        raise ImageError(f"{path}: {width}x{height} is more than the {MAX_PIXELS // 2**20} megapixels the lift reads; "
                         "scale the photo down")


def _read_exr(path: Path) -> tuple[np.ndarray, bool]:
    import OpenEXR

    try:
        with OpenEXR.File(str(path), separate_channels=True, header_only=True) as header_file:
            (x0, y0), (x1, y1) = header_file.header()["dataWindow"]
            _check_size(path, int(x1) - int(x0) + 1, int(y1) - int(y0) + 1)
        with OpenEXR.File(str(path), separate_channels=True) as exr:
            channels = exr.channels()
            missing = [c for c in "RGB" if c not in channels]
            if missing:
                raise ImageError(f"{path}: the EXR has no {', '.join(missing)} channel(s) (it has "
                                 f"{', '.join(sorted(channels)) or 'none'})")
            rgb = [np.asarray(channels[c].pixels, dtype=np.float32) for c in "RGB"]
            alpha = channels.get("A")
            a = np.asarray(alpha.pixels, dtype=np.float32) if alpha is not None else np.ones_like(rgb[0])
    except ImageError:
        raise
    except Exception as error:  # OpenEXR raises plain RuntimeError/TypeError on damaged files
        raise ImageError(f"{path}: not a readable OpenEXR image: {error}") from None
    rgba = np.stack(rgb + [a], -1)
    if not np.isfinite(rgba).all():
        raise ImageError(f"{path}: the EXR holds NaN or infinite values")
    if alpha is not None:  # EXR colours are premultiplied; straighten them
        rgba[..., :3] = np.where(a[..., None] > 1e-6, rgba[..., :3] / np.maximum(a[..., None], 1e-6), 0.0)
    return np.clip(rgba, 0.0, None), alpha is not None


def light_white(mean_radiance: np.ndarray) -> np.ndarray:
    """What a white diffuse card reads [3] under a uniform world of a light's mean radiance [3] (`EnvMap.mean_radiance`,
    strength applied): the reading a camera exposes and white-balances a photo by (a grey card's)."""
    white = np.asarray(mean_radiance, np.float64).reshape(-1)
    if white.shape != (3,) or not np.isfinite(white).all() or (white <= 0).any():
        raise ImageError(f"the light's mean radiance {white.tolist()} has no positive level in every channel to "
                         "expose and white-balance a photo by")
    return white


def metered(rgba: np.ndarray, white: np.ndarray) -> np.ndarray:
    """A render [..., 4] (linear, alpha last) exposed and white-balanced as a camera does it: each colour channel
    times `METERED_WHITE / white` (`light_white` of the light it was rendered under), so a white card lit by the whole
    scene reads `METERED_WHITE` in every channel.

    Exposure: a data set's light comes at a random strength, and the held-out night HDRI is five times darker than the
    training ones; read as rendered, a photo's brightness said more about that strength than about the object, and the
    lift regressor lifted a night photo's object several times too dark (novel-view relighting on the held-out
    objects: 18.9 dB, 21.0 fed photos divided by the light's luminance). White balance: the light's colour is as
    invisible in one photo as its strength (a red object under white light and a white one under red light are the
    same photo), and a camera takes both out before anyone sees the photo. Photos divided by the luminance only kept
    the light's colour (the night HDRI is orange: blue at 0.68 of its luminance), which the lift painted on the
    object (novel-view relighting on the held-out objects 23.89 dB; white-balanced, 24.13 with the same regressor and
    24.13 with it trained again on white-balanced photos)."""
    out = np.array(rgba, dtype=np.float32, copy=True)
    out[..., :3] *= (METERED_WHITE / light_white(white)).astype(np.float32)
    return out


def backdrop_alpha(rgb: np.ndarray) -> np.ndarray:
    """The object's alpha [H, W] in linear `rgb` [H, W, 3] shot on a one-colour backdrop (the image border's colour);
    an `ImageError` naming the fix when the border is not one colour."""
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    if border.std(axis=0).max() > BACKDROP_SPREAD:
        raise ImageError("the photo has no alpha and its background is not one plain colour, so the object cannot be "
                         "cut out; use an image with alpha (a PNG or EXR with a transparent background)")
    distance = np.linalg.norm(rgb - np.median(border, axis=0), axis=-1)
    return np.clip((distance - 0.5 * BACKDROP_DISTANCE) / (0.5 * BACKDROP_DISTANCE), 0.0, 1.0).astype(np.float32)


@dataclass(frozen=True)
class PreparedPhoto:
    """A photo prepared for the lift: `rgba` [S, S, 4] premultiplied linear, matted on black, and where that square
    lies in the source image (`centre` (row, col) and `side`, in source pixels), which `crop_camera` turns into the
    camera of the square."""

    rgba: np.ndarray
    centre: np.ndarray
    side: float

    def crop_camera(self, camera: Camera) -> Camera:
        """The camera that sees the square, given the `camera` of the whole source image (same pose and lens)."""
        scale = self.rgba.shape[0] / self.side
        top, left = self.centre - self.side / 2
        size = self.rgba.shape[0]
        return Camera(size, size, camera.fx * scale, camera.fy * scale, (camera.cx - left) * scale,
                      (camera.cy - top) * scale, camera.world_to_camera, camera.near, camera.far, camera.orthographic)


def prepare_photo(path: str | os.PathLike, size: int = 518) -> PreparedPhoto:
    """The photo at `path` cropped to 1.2x the object's box, square, matted on black, resized to `size`."""
    rgba, has_alpha = read_photo(path)
    alpha = rgba[..., 3] if has_alpha else backdrop_alpha(rgba[..., :3])
    premultiplied = np.concatenate([rgba[..., :3] * alpha[..., None], alpha[..., None]], -1)
    return crop_object(premultiplied, size, str(path))


def crop_object(rgba: np.ndarray, size: int, name: str = "the image") -> PreparedPhoto:
    """Premultiplied RGBA [H, W, 4] -> the 1.2x square around its opaque pixels (alpha > 0.5), resized to `size`.

    The one crop both the lift and its training use, so a photo and a training view are framed alike."""
    if not 8 <= size <= 4096:
        raise ImageError(f"the prepared image size must be 8 to 4096 pixels, got {size}")
    rows, cols = np.nonzero(rgba[..., 3] > 0.5)
    if len(rows) == 0:
        raise ImageError(f"{name}: the image's alpha is empty (nothing is opaque), so there is no object to lift")
    centre = np.array([(rows.min() + rows.max() + 1) / 2, (cols.min() + cols.max() + 1) / 2])
    side = CROP_MARGIN * max(rows.max() + 1 - rows.min(), cols.max() + 1 - cols.min())
    return PreparedPhoto(_crop_square(rgba, centre, side, size), centre, float(side))


def _crop_square(image: np.ndarray, centre: np.ndarray, side: float, size: int) -> np.ndarray:
    """The square of `side` pixels centred on `centre` (row, col) of `image` [H, W, C], zero outside the image,
    resampled to `size` x `size`: box-averaged by the whole part of the shrink factor, then bilinear."""
    import torch
    import torch.nn.functional as F

    step = side / size
    coords = centre[:, None] - side / 2 + (np.arange(size) + 0.5) * step  # output pixel centres (row, col)
    x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None]
    if step > 1:  # shrink first so each output pixel averages its footprint
        factor = int(np.floor(step))
        x = F.avg_pool2d(x, factor, ceil_mode=True)
        coords = coords / factor  # pooled pixel units (pixel j covers [j, j + 1))
        height, width = x.shape[2], x.shape[3]
    else:
        height, width = image.shape[0], image.shape[1]
    rows = torch.from_numpy(2 * coords[0] / height - 1).float()
    cols = torch.from_numpy(2 * coords[1] / width - 1).float()
    grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij")[::-1], -1)[None]
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[0].permute(1, 2, 0).numpy().astype(np.float32)
