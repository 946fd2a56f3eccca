"""HDR environment maps: the world light NeAR relights objects with, read the way Blender/Cycles reads it.

An `EnvMap` is an equirectangular, float32, scene-linear RGB image `pixels [H, W, 3]` stored top row first (+Z), plus
the two World settings that change what Cycles shows without touching the image: the Mapping node's Z rotation and the
Background strength. Everything here reproduces Cycles (checked against real Cycles renders in
tests/test_envmap_cycles.py), because the engine's renders are composited with and compared to Cycles renders:

* Direction -> texture coordinates (Cycles `direction_to_equirectangular`, v measured from the bottom row)::

      u = 0.5 - atan2(d.y, d.x) / (2 pi)        v = 1 - acos(d.z / |d|) / pi

  so the image centre faces +X, u = 0.25 faces +Y, the top row faces +Z.
* Linear interpolation samples pixel centres at ((i + 0.5) / W, (j + 0.5) / H) and the Environment Texture uses
  Cycles' EXTENSION_REPEAT: periodic in u (the seam) *and* in v, so within half a pixel of a pole Cycles blends the top
  row with the bottom row. `sample(..., pole_wrap=False)` clamps instead.
* Mapping node (type Point, rotation (0, 0, theta)) feeds the texture `Rz(theta) @ d`, so the environment appears
  rotated by -theta. Background strength multiplies the texture colour.
* NaN/Inf values become 0 (with a warning), channel by channel. Cycles 4.5 (measured) interpolates them as they are
  and zeroes non-finite channels of the shaded result, so that channel goes black over the bad texel's 2x2 bilinear
  footprint; zeroing the texel's channel gives the same image everywhere else and keeps every value finite.
* Negative values are clamped to 0: Cycles would emit negative light, but nothing physical does and downstream
  encodings (log, importance sampling) need non-negative radiance. Lossy codecs ring slightly below zero near dark
  pixels (Blender's own bundled DWAB HDRIs go down to -0.3% of their mean), so only negatives deeper than
  NEGATIVE_WARN_FRACTION of the mean magnitude warn: those mean the data itself is wrong.

Files: OpenEXR through the `OpenEXR` 3.x bindings (every compression Blender writes, any part/layer naming Blender
writes) and Radiance `.hdr` (RGBE) through a small reader here, so no image library has to be bundled for it.
"""

from __future__ import annotations

import math
import os
import re
import sys
import warnings
import weakref
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import OpenEXR

from .errors import EnvMapError
from .images import write_exr

if TYPE_CHECKING:  # pragma: no cover
    from .camera import Camera

# Refuse images wider or taller than this before allocating anything: 16K (16384 x 8192) is the largest HDRI in common
# use and already 1.5 GiB as float32 RGB; a bigger size in a header is far more likely corruption than a real map.
MAX_DIMENSION = 16384
# ... and images with more pixels than that 16K map (16384 x 16384 would be 3 GiB as float32 RGB, 10 GiB at the peak
# of reading it).
MAX_PIXELS = 16384 * 8192
# Reading an EXR decodes every channel of every part: at most the values of a 16K RGBA map (2 GiB as float32).
MAX_EXR_SAMPLES = 4 * MAX_PIXELS

# Negative values below -NEGATIVE_WARN_FRACTION * mean(|rgb|) warn when clamped; shallower ones are codec ringing.
NEGATIVE_WARN_FRACTION = 0.05
_HALF_MAX = float(np.finfo(np.float16).max)
_EXR_MAGIC = b"\x76\x2f\x31\x01"
# Layer names that mean "the beauty image" when a multilayer EXR holds several RGB layers (Blender: ViewLayer.Combined).
_BEAUTY_LAYERS = ("combined", "image", "beauty", "rgba")
# Arrays this module has validated and frozen, by id: new settings on a map (with_settings) then cost no re-check.
_VALIDATED: "weakref.WeakValueDictionary[int, np.ndarray]" = weakref.WeakValueDictionary()


class EnvMapWarning(UserWarning):
    """An environment map was usable only after a repair (NaN/Inf, negative values, luminance-only file)."""


def _warn(message: str) -> None:
    """Warn, attributed to the first caller outside this module (so the user sees their own line)."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename in (__file__, "<string>"):  # "<string>": dataclass __init__
        frame, level = frame.f_back, level + 1
    warnings.warn(message, EnvMapWarning, stacklevel=level)


# ---------------------------------------------------------------------------------------------------------------------
# the equirectangular convention


def direction_to_uv(directions: np.ndarray) -> np.ndarray:
    """Directions [..., 3] (any length) -> texture coordinates [..., 2], u in [0, 1), v in [0, 1] from the bottom.

    Cycles' formula; a zero vector maps to (0, 0) as in Cycles.
    """
    d = np.asarray(directions, dtype=np.float64)
    length = np.linalg.norm(d, axis=-1)
    safe = np.where(length > 0, length, 1.0)
    u = 0.5 - np.arctan2(d[..., 1], d[..., 0]) / (2 * math.pi)
    v = 1.0 - np.arccos(np.clip(d[..., 2] / safe, -1.0, 1.0)) / math.pi
    zero = length == 0
    return np.stack([np.where(zero, 0.0, u), np.where(zero, 0.0, v)], axis=-1)


def uv_to_direction(uv: np.ndarray) -> np.ndarray:
    """Texture coordinates [..., 2] (v from the bottom) -> unit directions [..., 3]: inverse of `direction_to_uv`."""
    uv = np.asarray(uv, dtype=np.float64)
    phi = math.pi - 2 * math.pi * uv[..., 0]
    theta = math.pi - math.pi * uv[..., 1]
    sin_theta = np.sin(theta)
    return np.stack([sin_theta * np.cos(phi), sin_theta * np.sin(phi), np.cos(theta)], axis=-1)


def rotation_z_matrix(angle: float) -> np.ndarray:
    """The 3x3 rotation a Mapping node with rotation (0, 0, angle) applies to a direction (Cycles' euler order)."""
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def equirect_solid_angles(height: int, width: int) -> np.ndarray:
    """Solid angle [H] (steradians) of one pixel in each row, top row first; they sum to 4 pi over the image.

    Needed wherever an average over the sphere matters (mean radiance, importance sampling): rows near the poles
    cover far less of the sphere than rows at the horizon.
    """
    edges = np.cos(np.linspace(0.0, math.pi, height + 1))  # cos(polar angle) at row boundaries, top first
    return (edges[:-1] - edges[1:]) * (2 * math.pi / width)


# ---------------------------------------------------------------------------------------------------------------------
# the map


@dataclass(frozen=True, eq=False)
class EnvMap:
    """An equirectangular HDR environment as the World shows it: image, Mapping Z rotation, Background strength.

    `pixels` is float32 [H, W, 3], top row first, finite and non-negative, and read-only (caches key on it). Building
    one validates and repairs the array (see `from_array`). `name` is the file or source, used in messages.
    """

    pixels: np.ndarray
    rotation_z: float = 0.0
    strength: float = 1.0
    name: str = "array"

    def __post_init__(self) -> None:
        object.__setattr__(self, "pixels", _clean_pixels(self.pixels, self.name))
        for key in ("rotation_z", "strength"):
            try:
                value = float(getattr(self, key))
            except (TypeError, ValueError):
                raise EnvMapError(f"{self.name}: {key} must be a number, got {getattr(self, key)!r}") from None
            if not math.isfinite(value):
                raise EnvMapError(f"{self.name}: {key} must be finite, got {value}")
            object.__setattr__(self, key, value)
        if self.strength < 0:
            raise EnvMapError(f"{self.name}: strength must be >= 0 (a Background strength), got {self.strength}")

    # ---- construction ------------------------------------------------------------------------------------------------

    @classmethod
    def from_array(cls, array: np.ndarray, *, rotation_z: float = 0.0, strength: float = 1.0,
                   name: str = "array") -> "EnvMap":
        """A map from a float array [H, W, 3] or [H, W, 4] (alpha dropped), top row first, linear RGB.

        Integer arrays are refused (8-bit data is display-encoded, not radiance: convert it yourself). NaN/Inf values
        and negative values become 0, with an `EnvMapWarning` (see the module docstring for when negatives warn).
        Any aspect ratio is accepted, as in Cycles. The array is copied unless it is already a read-only float32 one.
        """
        return cls(array, rotation_z, strength, name)

    @classmethod
    def uniform(cls, rgb: float | Sequence[float], *, height: int = 8, width: int | None = None,
                rotation_z: float = 0.0, strength: float = 1.0) -> "EnvMap":
        """A constant environment (uniform white light when rgb = 1): the light NeAR's LH-SLAT is homogenized under."""
        rgb_arr = np.broadcast_to(np.asarray(rgb, dtype=np.float32), (3,)) if np.ndim(rgb) <= 1 else None
        if rgb_arr is None:
            raise EnvMapError(f"uniform: rgb must be a number or 3 numbers, got shape {np.shape(rgb)}")
        width = 2 * int(height) if width is None else int(width)
        _check_size(int(height), width, "uniform map")
        pixels = np.empty((int(height), width, 3), dtype=np.float32)
        pixels[...] = rgb_arr
        return cls(pixels, rotation_z, strength, f"uniform{tuple(float(c) for c in rgb_arr)}")

    @classmethod
    def read(cls, path: str | os.PathLike, *, rotation_z: float = 0.0, strength: float = 1.0) -> "EnvMap":
        """Read an OpenEXR or Radiance HDR file (recognised by content, not extension).

        Files that cannot be used raise EnvMapError naming the file and the problem; repairable values are repaired
        with an `EnvMapWarning`, as in `from_array`. EXR alpha is dropped (EXR colour is premultiplied, which is what
        Cycles' Environment Texture shows).
        """
        name = str(path)
        raw = _read_raw(path)
        return cls(_repair(raw.rgb, name), rotation_z, strength, name)

    def with_settings(self, *, rotation_z: float | None = None, strength: float | None = None) -> "EnvMap":
        """The same image under other World settings (no copy of the pixels)."""
        return replace(self, rotation_z=self.rotation_z if rotation_z is None else rotation_z,
                       strength=self.strength if strength is None else strength)

    # ---- properties --------------------------------------------------------------------------------------------------

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    def mean_radiance(self) -> np.ndarray:
        """Radiance [3] averaged over the sphere (solid-angle weighted, strength applied): the map's ambient level."""
        weights = equirect_solid_angles(self.height, self.width)
        row_means = self.pixels.mean(axis=1, dtype=np.float64)
        return (weights @ row_means) * self.width / (4 * math.pi) * self.strength

    # ---- sampling ----------------------------------------------------------------------------------------------------

    def sample(self, directions: np.ndarray, *, pole_wrap: bool = True) -> np.ndarray:
        """Radiance [..., 3] (float32) the World emits towards world-space `directions` [..., 3], as Cycles shades it.

        Applies the Mapping rotation and the strength; bilinear, wrapping at the u seam. `pole_wrap=True` also wraps v,
        as Cycles does (see the module docstring); False clamps rows at the poles.
        """
        d = np.asarray(directions, dtype=np.float64)
        if d.shape[-1:] != (3,) or not np.isfinite(d).all():
            raise EnvMapError(f"sample: directions must be finite with shape [..., 3], got shape {d.shape}"
                              + ("" if np.isfinite(d).all() else " with NaN/Inf values"))
        if self.rotation_z != 0.0:
            d = d @ rotation_z_matrix(self.rotation_z).T
        radiance = self.sample_uv(direction_to_uv(d), pole_wrap=pole_wrap)
        return radiance * np.float32(self.strength) if self.strength != 1.0 else radiance

    def sample_uv(self, uv: np.ndarray, *, pole_wrap: bool = True) -> np.ndarray:
        """The image at texture coordinates [..., 2] (v from the bottom), bilinear like Cycles' Linear interpolation.

        No rotation, no strength: this is the Environment Texture node's lookup alone.
        """
        uv = np.asarray(uv, dtype=np.float64)
        h, w = self.height, self.width
        x = uv[..., 0] * w - 0.5
        y = uv[..., 1] * h - 0.5  # rows counted from the bottom, as Blender stores images
        x0, y0 = np.floor(x), np.floor(y)
        tx = (x - x0).astype(np.float32)[..., None]  # float32 weights, as Cycles computes them
        ty = (y - y0).astype(np.float32)[..., None]
        x0 = x0.astype(np.int64) % w
        x1 = (x0 + 1) % w
        y0 = y0.astype(np.int64)
        y1 = y0 + 1
        if pole_wrap:
            y0, y1 = y0 % h, y1 % h
        else:
            y0, y1 = np.clip(y0, 0, h - 1), np.clip(y1, 0, h - 1)
        row0, row1 = (h - 1 - y0) * w, (h - 1 - y1) * w  # our arrays are stored top row first
        flat = self.pixels.reshape(-1, 3)
        lower = flat.take(row0 + x0, axis=0) * (1 - tx) + flat.take(row0 + x1, axis=0) * tx
        upper = flat.take(row1 + x0, axis=0) * (1 - tx) + flat.take(row1 + x1, axis=0) * tx
        return lower * (1 - ty) + upper * ty

    def background(self, camera: "Camera") -> np.ndarray:
        """What a pinhole/orthographic `Camera` sees of the World alone: float32 [H, W, 3], one ray per pixel centre."""
        _, directions = camera.pixel_rays()
        return self.sample(directions)

    def panorama(self, camera_to_world: np.ndarray, width: int, height: int, *,
                 latitude_min: float = -math.pi / 2, latitude_max: float = math.pi / 2,
                 longitude_min: float = -math.pi, longitude_max: float = math.pi) -> np.ndarray:
        """What a Cycles panoramic equirectangular camera renders: float32 [height, width, 3], top row first.

        `camera_to_world` is in OpenCV axes like `Camera.camera_to_world` (for a Blender camera object pass
        `matrix_world @ diag(1, -1, -1, 1)`; scale is ignored). The image centre looks along the camera's view axis,
        its top row up the camera's up axis; latitude/longitude ranges are the camera's (radians).
        Cycles maps pixel centre (u, v) (v from the bottom) to longitude
        phi = (lon_min - lon_max) u - lon_min and polar angle theta = (lat_min - lat_max) v + pi/2 - lat_min.
        """
        m = np.asarray(camera_to_world, dtype=np.float64)
        if m.shape not in ((4, 4), (3, 3)) or not np.isfinite(m).all() or width < 1 or height < 1:
            raise EnvMapError(f"panorama: need a finite 3x3/4x4 camera_to_world and a positive size, got "
                              f"{m.shape} and {width}x{height}")
        rot = m[:3, :3] / np.maximum(np.linalg.norm(m[:3, :3], axis=0), 1e-300)
        u = (np.arange(width) + 0.5) / width
        v = 1.0 - (np.arange(height) + 0.5) / height  # top row first
        phi = (longitude_min - longitude_max) * u[None, :] - longitude_min
        theta = (latitude_min - latitude_max) * v[:, None] + math.pi / 2 - latitude_min
        sin_t = np.sin(theta)
        local = np.stack(np.broadcast_arrays(sin_t * np.cos(phi), sin_t * np.sin(phi), np.cos(theta)), axis=-1)
        # Cycles' panorama frame: +X looks forward, +Y left, +Z up. In OpenCV camera axes that is (-y, -z, x).
        cv = np.stack([-local[..., 1], -local[..., 2], local[..., 0]], axis=-1)
        return self.sample(cv @ rot.T)

    # ---- resampling --------------------------------------------------------------------------------------------------

    def resized(self, height: int, width: int | None = None) -> "EnvMap":
        """The map resampled to `height` x `width` (width keeps the aspect ratio when omitted); settings kept.

        Shrinking averages each output pixel's footprint (exact box/area filter): an HDRI's energy sits in a few tiny,
        very bright pixels (the sun), which point or bilinear sampling would miss or blow up, changing the light it
        casts; area averaging keeps the mean. Enlarging interpolates bilinearly, like Cycles does when it renders.
        """
        height = int(height)
        width = max(1, round(self.width * height / self.height)) if width is None else int(width)
        _check_size(height, width, f"{self.name} resized")
        out = _resample_axis(self.pixels, height, axis=0, periodic=False)
        out = _resample_axis(out, width, axis=1, periodic=True)
        out = np.ascontiguousarray(out, dtype=np.float32)
        if out.flags.writeable:  # a fresh array: freeze it so the EnvMap takes it without another copy
            _readonly(out)
        return EnvMap(out, self.rotation_z, self.strength, self.name)

    # ---- writing -----------------------------------------------------------------------------------------------------

    def write_exr(self, path: str | os.PathLike, *, compression: str = "ZIP", pixel_type: str = "FLOAT") -> None:
        """Write the image (not rotation or strength) as a single-part RGB OpenEXR; R, G, B channels, top row first.

        `compression` is one of EXR_COMPRESSIONS (Blender's names). PXR24, B44(A), DWAA and DWAB are lossy; B44(A) only
        compress HALF data. `pixel_type` "HALF" clamps values above 65504 (with a warning). The file is written next to
        the target and renamed, so a failed write leaves any existing file untouched.
        """
        name = str(path)
        if str(pixel_type).upper() not in ("FLOAT", "HALF"):
            raise EnvMapError(f"{name}: pixel_type must be 'FLOAT' or 'HALF', got {pixel_type!r}")
        data = self.pixels
        if str(pixel_type).upper() == "HALF":
            over = int((data > _HALF_MAX).sum())
            if over:
                _warn(f"{name}: {over} values above {_HALF_MAX:g} clamped to fit HALF")
            data = np.minimum(data, _HALF_MAX).astype(np.float16)
        write_exr(path, {c: data[..., i] for i, c in enumerate("RGB")}, compression, error=EnvMapError)


# ---------------------------------------------------------------------------------------------------------------------
# validation and repair


def diffuse_irradiance(env: EnvMap, normals: np.ndarray, height: int = 32) -> np.ndarray:
    """Irradiance [N, 3] on surfaces facing `normals` [N, 3]: the sum of L(w) max(0, n.w) dOmega over the map
    downsampled to `height` rows (rotation and strength included)."""
    small = env.resized(height)
    uv = np.stack(np.meshgrid((np.arange(small.width) + 0.5) / small.width,
                              1 - (np.arange(small.height) + 0.5) / small.height), -1)  # v from the bottom
    dirs = uv_to_direction(uv.reshape(-1, 2))
    dirs = dirs @ rotation_z_matrix(env.rotation_z)  # sample() turns world directions by Rz into the map: undo it
    radiance = small.pixels.reshape(-1, 3).astype(np.float64) * env.strength
    weights = equirect_solid_angles(small.height, small.width).repeat(small.width)
    cosines = np.clip(np.asarray(normals, dtype=np.float64) @ dirs.T, 0.0, None)
    return cosines @ (radiance * weights[:, None])


def _readonly(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


def _check_size(height: int, width: int, name: str) -> None:
    if height < 1 or width < 1:
        raise EnvMapError(f"{name}: the image is empty ({width} x {height} pixels)")
    if height > MAX_DIMENSION or width > MAX_DIMENSION:
        raise EnvMapError(f"{name}: {width} x {height} pixels is larger than the {MAX_DIMENSION} pixel limit per side; "
                          "downscale the map first")
    if height * width > MAX_PIXELS:
        raise EnvMapError(f"{name}: {width} x {height} pixels is more than the {MAX_PIXELS:,} pixels (16384 x 8192) an "
                          "environment map may have; downscale the map first")


def _clean_pixels(array: object, name: str) -> np.ndarray:
    """Validate an array as an environment image and return a read-only float32 [H, W, 3] (repairs warn)."""
    if isinstance(array, np.ndarray) and _VALIDATED.get(id(array)) is array:
        return array
    if (isinstance(array, np.ndarray) and array.dtype == np.float32 and array.ndim == 3 and array.shape[2] == 3
            and not array.flags.writeable and array.flags.c_contiguous):
        _check_size(array.shape[0], array.shape[1], name)
        if np.isfinite(array).all() and not (array < 0).any():
            _VALIDATED[id(array)] = array
            return array  # already clean and frozen: no copy needed
    try:
        a = np.asarray(array)
    except Exception as exc:
        raise EnvMapError(f"{name}: cannot be used as an image ({exc})") from None
    if a.dtype.kind != "f":
        hint = " (8-bit/16-bit images are display-encoded: convert to linear float first)" if a.dtype.kind in "ui" \
            else ""
        raise EnvMapError(f"{name}: environment pixels must be floating point linear RGB, got dtype {a.dtype}{hint}")
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise EnvMapError(f"{name}: environment pixels must have shape [H, W, 3] or [H, W, 4], got {list(a.shape)}")
    _check_size(a.shape[0], a.shape[1], name)
    return _repair(a[..., :3], name)


def _repair(rgb: np.ndarray, name: str) -> np.ndarray:
    """A private float32 copy with NaN/Inf values and negative values set to 0, warning about real problems."""
    with np.errstate(over="ignore", invalid="ignore"):  # float64 beyond float32's range becomes Inf, repaired below
        out = np.array(rgb, dtype=np.float32, order="C")  # always a private copy
    bad = ~np.isfinite(out)
    n_bad = int(bad.sum())
    if n_bad:
        out[bad] = 0.0
        _warn(f"{name}: {n_bad} NaN or infinite values set to 0 (Cycles renders them black)")
    lowest = float(out.min())
    if lowest < 0:
        n_neg = int((out < 0).sum())
        scale = float(np.abs(out).mean(dtype=np.float64))
        np.maximum(out, 0.0, out=out)
        if lowest < -NEGATIVE_WARN_FRACTION * scale:
            _warn(f"{name}: {n_neg} negative values (lowest {lowest:.4g}, mean magnitude {scale:.4g}) clamped to 0")
    _VALIDATED[id(out)] = _readonly(out)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# resampling


def _resample_axis(a: np.ndarray, n_out: int, *, axis: int, periodic: bool) -> np.ndarray:
    """Resample one axis: exact area average when shrinking, linear interpolation (pixel centres) when enlarging."""
    n = a.shape[axis]
    if n_out == n:
        return a
    a = np.moveaxis(a, axis, 0)
    if n_out < n:
        scale = n / n_out
        edges = np.arange(n_out + 1) * scale
        k = np.minimum(np.floor(edges).astype(np.int64), n - 1)
        frac = (edges - k)[:, None]
        out = np.empty((n_out,) + a.shape[1:], dtype=np.float32)
        # Work in column blocks: the float64 running sum of a 16K map would otherwise need gigabytes.
        flat_in = a.reshape(n, -1)
        flat_out = out.reshape(n_out, -1)
        step = max(1, (1 << 24) // n)
        for s in range(0, flat_in.shape[1], step):
            block = flat_in[:, s:s + step].astype(np.float64)
            csum = np.concatenate([np.zeros((1, block.shape[1])), np.cumsum(block, axis=0)])
            integral = csum[k] + frac * block[k]  # the running integral evaluated at each output edge
            flat_out[:, s:s + step] = (integral[1:] - integral[:-1]) / scale
    else:
        pos = (np.arange(n_out) + 0.5) * (n / n_out) - 0.5
        i0 = np.floor(pos).astype(np.int64)
        t = (pos - i0).reshape(-1, *([1] * (a.ndim - 1))).astype(np.float32)
        i1 = i0 + 1
        i0, i1 = (i0 % n, i1 % n) if periodic else (np.clip(i0, 0, n - 1), np.clip(i1, 0, n - 1))
        out = a[i0] * (1 - t) + a[i1] * t
    return np.moveaxis(out, 0, axis)


# ---------------------------------------------------------------------------------------------------------------------
# files


@dataclass
class _RawImage:
    """A decoded file before repair: RGB as stored (float32) and facts for `describe_image_file`.

    `rgb` is None only when reading leniently (for `describe_image_file`) and no colour could be chosen: `problem`
    then says why.
    """

    rgb: np.ndarray | None
    lines: list[str]
    problem: str | None = None


def _read_raw(path: str | os.PathLike, strict: bool = True) -> _RawImage:
    name = str(path)
    p = Path(path)
    if not p.exists():
        raise EnvMapError(f"{name}: file not found")
    if p.is_dir():
        raise EnvMapError(f"{name}: is a folder, not an image file")
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(16)
    except OSError as exc:
        raise EnvMapError(f"{name}: cannot be read ({exc.strerror or exc})") from None
    if size == 0:
        raise EnvMapError(f"{name}: the file is empty")
    if head.startswith(_EXR_MAGIC):
        return _read_exr(name, strict)
    if head.startswith(b"#?"):
        return _read_hdr(name)
    raise EnvMapError(f"{name}: not an OpenEXR or Radiance HDR image ({_guess_format(head)}); "
                      "environment maps must be .exr or .hdr")


def _guess_format(head: bytes) -> str:
    known = {b"\x89PNG": "a PNG image, 8/16-bit display-referred", b"\xff\xd8\xff": "a JPEG image, 8-bit",
             b"II*\x00": "a TIFF image", b"MM\x00*": "a TIFF image", b"BM": "a BMP image", b"GIF8": "a GIF image",
             b"RIFF": "a RIFF/WebP file", b"BLENDER": "a .blend file", b"PK\x03\x04": "a zip archive"}
    for magic, what in known.items():
        if head.startswith(magic):
            return f"it is {what}"
    return "unrecognised content"


def _exr_fail(name: str, exc: BaseException) -> EnvMapError:
    return EnvMapError(f"{name}: the OpenEXR file is truncated or corrupt ({type(exc).__name__}: {exc})")


def _read_exr(name: str, strict: bool) -> _RawImage:
    """Read an EXR's colour channels, choosing the layer sensibly (see `_choose_exr_layer`).

    Not `strict`: a file that reads but has no usable colour returns its description and the problem instead.
    """
    try:
        header_file = OpenEXR.File(name, separate_channels=True, header_only=True)
        headers = [part.header for part in header_file.parts]
    except Exception as exc:  # RuntimeError, ValueError, UnicodeDecodeError... from the bindings
        raise _exr_fail(name, exc) from exc
    if not headers:
        raise EnvMapError(f"{name}: the OpenEXR file has no readable parts (truncated or corrupt)")
    samples = 0
    for index, header in enumerate(headers):
        kind = str(header.get("type", ""))
        if "deep" in kind:
            raise EnvMapError(f"{name}: part {index} is a deep EXR image; environment maps must be flat images")
        try:
            (x0, y0), (x1, y1) = header["dataWindow"]
            width, height = int(x1) - int(x0) + 1, int(y1) - int(y0) + 1
        except Exception as exc:
            raise EnvMapError(f"{name}: part {index} has no valid data window (corrupt header)") from exc
        _check_size(height, width, f"{name} (part {index})")
        samples += height * width * len(header.get("channels", ()))
    if samples > MAX_EXR_SAMPLES:  # every channel of every part is decoded: refuse before allocating them
        raise EnvMapError(f"{name}: its parts and channels hold {samples:,} values, more than the {MAX_EXR_SAMPLES:,} "
                          "(a 16384 x 8192 RGBA map) an environment map file may have; save the map alone")
    try:
        exr = OpenEXR.File(name, separate_channels=True)
        parts = [(part.name() or "", dict(part.channels), part.header) for part in exr.parts]
    except Exception as exc:
        raise _exr_fail(name, exc) from exc
    if len(parts) != len(headers):
        raise EnvMapError(f"{name}: the OpenEXR file is truncated or corrupt (pixel data of "
                          f"{len(headers) - len(parts)} of {len(headers)} parts unreadable)")

    lines = [f"format: OpenEXR, {len(parts)} part{'s' if len(parts) != 1 else ''}"]
    for index, (part_name, channels, header) in enumerate(parts):
        (x0, y0), (x1, y1) = header["dataWindow"]
        label = f"part {index}" + (f" '{part_name}'" if part_name else "")
        compression = str(header.get("compression", "?")).split(".")[-1].replace("_COMPRESSION", "")
        storage = str(header.get("type", "?")).split(".")[-1]
        size = f"{int(x1) - int(x0) + 1} x {int(y1) - int(y0) + 1}"
        lines.append(f"{label}: {size}, {storage}, {compression} compression")
        described = ", ".join(f"{key} ({_channel_type(ch)})" for key, ch in sorted(channels.items()))
        lines.append(f"  channels: {described or 'none'}")

    try:
        rgb = _exr_colour(name, parts, lines)
    except EnvMapError as exc:
        if strict:
            raise
        return _RawImage(None, lines, str(exc))
    return _RawImage(rgb, lines)


def _exr_colour(name: str, parts: list[tuple[str, dict, dict]], lines: list[str]) -> np.ndarray:
    """The chosen colour channels as float32 [H, W, 3]; notes the choice in `lines`."""
    rgb_keys, alpha_key, part_index, luminance = _choose_exr_layer(name, parts)
    channels = parts[part_index][1]
    for key in rgb_keys:
        ch = channels[key]
        if ch.xSampling != 1 or ch.ySampling != 1:
            raise EnvMapError(f"{name}: channel {key} is subsampled ({ch.xSampling}x{ch.ySampling}); "
                              "re-save the map with full-resolution RGB")
    try:
        planes = [np.asarray(channels[key].pixels, dtype=np.float32) for key in rgb_keys]
    except Exception as exc:
        raise _exr_fail(name, exc) from exc
    if any(pl.ndim != 2 or pl.shape != planes[0].shape for pl in planes):
        raise EnvMapError(f"{name}: colour channels have inconsistent sizes (corrupt file)")
    _check_size(planes[0].shape[0], planes[0].shape[1], name)
    if luminance:
        planes = planes * 3
        _warn(f"{name}: luminance-only EXR (channel {rgb_keys[0]}); using it as grey RGB")
    lines.append("colour from: " + ", ".join(rgb_keys) + (f" (part {part_index})" if len(parts) > 1 else "")
                 + (" as grey" if luminance else "") + (f"; alpha {alpha_key} ignored" if alpha_key else ""))
    return np.stack(planes, axis=-1)


def _channel_type(channel: object) -> str:
    try:
        return str(channel.type()).split(".")[-1].lower()  # HALF / FLOAT / UINT
    except Exception:
        return "?"


def _choose_exr_layer(name: str, parts: list[tuple[str, dict, dict]]) -> tuple[list[str], str | None, int, bool]:
    """Pick the channels that hold the colour: (R, G, B keys or [Y], alpha key, part index, luminance-only?).

    Plain R/G/B win; then a single layer named like a beauty pass (Blender's `ViewLayer.Combined`, `Image`); several
    candidates are ambiguous and name themselves in the error. Luminance-only (Y) files are accepted as grey; Y/RY/BY
    luminance-chroma files are refused (no chroma reconstruction here).
    """
    groups: dict[tuple[int, str], dict[str, str]] = {}
    for index, (_, channels, _) in enumerate(parts):
        for key in channels:
            prefix, _, suffix = key.rpartition(".")
            groups.setdefault((index, prefix), {})[suffix.upper()] = key

    def label(group: tuple[int, str]) -> str:
        layer = group[1] or "(unnamed layer)"
        return f"part {group[0]} {layer}" if len(parts) > 1 else layer

    def best(candidates: list[tuple[int, str]], what: str) -> tuple[int, str]:
        if len(candidates) == 1:
            return candidates[0]
        for rank in (lambda g: g[1] == "", lambda g: g[1].rpartition(".")[2].lower() in _BEAUTY_LAYERS):
            preferred = [g for g in candidates if rank(g)]
            if len(preferred) == 1:
                return preferred[0]
            if len(preferred) > 1:
                candidates = preferred
                break
        raise EnvMapError(f"{name}: several {what} layers and no way to tell which is the image: "
                          f"{', '.join(label(g) for g in candidates)}; save the map with a single RGB layer")

    rgb = [g for g, ch in groups.items() if {"R", "G", "B"} <= ch.keys()]
    if rgb:
        group = best(rgb, "RGB")
        ch = groups[group]
        return [ch["R"], ch["G"], ch["B"]], ch.get("A"), group[0], False
    lum = [g for g, ch in groups.items() if "Y" in ch]
    if lum:
        group = best(lum, "luminance")
        ch = groups[group]
        if "RY" in ch or "BY" in ch:
            raise EnvMapError(f"{name}: luminance/chroma (Y, RY, BY) EXR is not supported; re-save it as RGB")
        return [ch["Y"]], ch.get("A"), group[0], True
    found = ", ".join(sorted(k for _, chs, _ in parts for k in chs)) or "none"
    raise EnvMapError(f"{name}: no colour channels (need R, G, B, or Y); channels found: {found}")


_RESOLUTION = re.compile(rb"^([+-])([XY]) +(\d+) +([+-])([XY]) +(\d+)\s*$")


def _read_hdr(name: str) -> _RawImage:
    """Radiance RGBE (.hdr / .pic): header, resolution string, flat / old RLE / new RLE scanlines."""
    try:
        with open(name, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise EnvMapError(f"{name}: cannot be read ({exc.strerror or exc})") from None
    end = data.find(b"\n\n", 0, 1 << 16)
    if end < 0:
        raise EnvMapError(f"{name}: Radiance HDR header never ends (truncated or corrupt)")
    header_lines = data[:end].split(b"\n")
    fmt = b"32-bit_rle_rgbe"
    for line in header_lines[1:]:
        if line.startswith(b"FORMAT="):
            fmt = line[7:].strip()
    if fmt != b"32-bit_rle_rgbe":
        raise EnvMapError(f"{name}: Radiance format {fmt.decode('latin-1')!r} is not supported (only 32-bit_rle_rgbe)")
    res_end = data.find(b"\n", end + 2)
    match = _RESOLUTION.match(data[end + 2:res_end if res_end >= 0 else len(data)])
    if res_end < 0 or match is None or match.group(2) == match.group(5):
        raise EnvMapError(f"{name}: Radiance HDR resolution line is missing or malformed (truncated or corrupt)")
    sign1, axis1, n1, sign2, _, n2 = match.groups()
    n_major, n_minor = int(n1), int(n2)
    height, width = (n_major, n_minor) if axis1 == b"Y" else (n_minor, n_major)
    _check_size(height, width, name)
    _check_encoded_length(name, len(data) - res_end - 1, n_major, n_minor)
    rgbe = _decode_rgbe_scanlines(name, data, res_end + 1, n_major, n_minor)
    if axis1 == b"X":
        rgbe = rgbe.transpose(1, 0, 2)
        y_sign, x_sign = sign2, sign1
    else:
        y_sign, x_sign = sign1, sign2
    if y_sign == b"+":  # +Y: the first scanline is the bottom one
        rgbe = rgbe[::-1]
    if x_sign == b"-":
        rgbe = rgbe[:, ::-1]
    exponent = rgbe[..., 3:4].astype(np.int32)
    scale = np.where(exponent > 0, np.ldexp(np.float32(1.0), exponent - 136), 0.0).astype(np.float32)
    rgb = rgbe[..., :3].astype(np.float32) * scale  # no +0.5 offset: Blender (OIIO) decodes RGBE this way
    lines = [f"format: Radiance HDR (RGBE), {width} x {height}, orientation {data[end + 2:res_end].decode('latin-1')}"]
    lines += [f"  header: {ln.decode('latin-1')}" for ln in header_lines[1:] if ln.strip()]
    lines.append("colour from: RGBE (exponent header lines such as EXPOSURE are ignored, as Blender does)")
    return _RawImage(rgb, lines)


def _check_encoded_length(name: str, available: int, n_lines: int, length: int) -> None:
    """Refuse, before allocating or decoding, pixel data too short for the size the header declares.

    Radiance's own writer and the common libraries use the per-channel run-length scheme for scanlines of 8 to
    32767 pixels; its tightest encoding is a 4-byte scanline header and 2 bytes per run of up to 127 values in each of
    the 4 channels. The obsolete scheme can repeat a pixel millions of times in 4 bytes, so a file of 96 KB could
    declare 16384 x 8192 pixels (a decompression bomb: 4.8 GB and 86 s to read); it is held to the same minimum.
    """
    per_line = 4 + 4 * 2 * -(-length // 127) if 8 <= length < 0x8000 else 4 * length
    need = n_lines * per_line
    if available < need:
        raise EnvMapError(f"{name}: Radiance HDR declares {n_lines} scanlines of {length} pixels but holds "
                          f"{available:,} bytes of pixel data, fewer than the {need:,} even the tightest run-length "
                          "encoding needs (truncated, corrupt, or packed with the obsolete run-length scheme, which "
                          "is refused)")


def _decode_rgbe_scanlines(name: str, data: bytes, pos: int, n_lines: int, length: int) -> np.ndarray:
    out = np.empty((n_lines, length, 4), dtype=np.uint8)
    view = np.frombuffer(data, dtype=np.uint8)
    size = len(data)
    for line in range(n_lines):
        if pos + 4 > size:
            raise EnvMapError(f"{name}: Radiance HDR is truncated (scanline {line} of {n_lines} missing)")
        if (8 <= length < 0x8000 and data[pos] == 2 and data[pos + 1] == 2
                and (data[pos + 2] << 8 | data[pos + 3]) == length):
            pos += 4
            for channel in range(4):
                chunks = []
                filled = 0
                while filled < length:
                    if pos >= size:
                        raise EnvMapError(f"{name}: Radiance HDR is truncated (in scanline {line} of {n_lines})")
                    count = data[pos]
                    pos += 1
                    if count > 128:
                        count -= 128
                        if filled + count > length or pos >= size:
                            raise EnvMapError(f"{name}: Radiance HDR has corrupt run-length data at byte {pos}")
                        chunks.append(bytes((data[pos],)) * count)
                        pos += 1
                    else:
                        if count == 0 or filled + count > length:
                            raise EnvMapError(f"{name}: Radiance HDR has corrupt run-length data at byte {pos}")
                        if pos + count > size:
                            raise EnvMapError(f"{name}: Radiance HDR is truncated (in scanline {line} of {n_lines})")
                        chunks.append(data[pos:pos + count])
                        pos += count
                    filled += count
                out[line, :, channel] = np.frombuffer(b"".join(chunks), dtype=np.uint8)
        else:
            pos = _decode_flat_scanline(name, data, view, pos, out[line], line, n_lines)
    return out


def _decode_flat_scanline(name: str, data: bytes, view: np.ndarray, pos: int, row: np.ndarray, line: int,
                          n_lines: int) -> int:
    """An uncompressed scanline, or one in the old run-length scheme ((1, 1, 1, n) repeats the previous pixel)."""
    length = row.shape[0]
    block = view[pos:pos + 4 * length]
    if block.size == 4 * length:
        pixels = block.reshape(length, 4)
        if not ((pixels[:, 0] == 1) & (pixels[:, 1] == 1) & (pixels[:, 2] == 1)).any():
            row[:] = pixels
            return pos + 4 * length
    filled, shift, size = 0, 0, len(data)
    while filled < length:
        if pos + 4 > size:
            raise EnvMapError(f"{name}: Radiance HDR is truncated (in scanline {line} of {n_lines})")
        r, g, b, e = data[pos:pos + 4]
        pos += 4
        if r == 1 and g == 1 and b == 1:
            count = e << shift
            if filled == 0 or filled + count > length:
                raise EnvMapError(f"{name}: Radiance HDR has corrupt run-length data at byte {pos - 4}")
            row[filled:filled + count] = row[filled - 1]
            filled += count
            shift += 8
        else:
            row[filled] = (r, g, b, e)
            filled += 1
            shift = 0
    return pos


# ---------------------------------------------------------------------------------------------------------------------
# `near info`


def describe_image_file(path: str | os.PathLike) -> str:
    """A human-readable summary of an EXR/HDR file for `near info`: layout, channels, value ranges, bad values.

    Statistics are of the colour as stored (before the NaN/negative repairs `EnvMap.read` applies), so problems show.
    Raises EnvMapError (only) for files that cannot be read at all.
    """
    name = str(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EnvMapWarning)
        raw = _read_raw(path, strict=False)
    if raw.rgb is None:
        return "\n".join([name, *raw.lines, f"not usable as an environment map: {raw.problem}"])
    rgb = raw.rgb
    h, w = rgb.shape[:2]
    lines = [name, *raw.lines, f"size: {w} x {h} (aspect {w / h:.3g}:1"
             + (", not the 2:1 of a full equirectangular panorama)" if w != 2 * h else ")")]
    for i, channel in enumerate("RGB"):
        values = rgb[..., i]
        finite = np.isfinite(values)
        n_nan = int(np.isnan(values).sum())
        n_inf = int((~finite).sum()) - n_nan
        n_neg = int((values < 0).sum())
        if finite.any():
            good = values[finite]
            average = float(good.mean(dtype=np.float64))
            stats = f"min {float(good.min()):.6g}, max {float(good.max()):.6g}, mean {average:.6g}"
        else:
            stats = "no finite values"
        lines.append(f"{channel}: {stats}; NaN {n_nan}, Inf {n_inf}, negative {n_neg}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EnvMapWarning)
        env = EnvMap(_repair(rgb, name), name=name)
    mean = env.mean_radiance()
    lines.append(f"mean radiance over the sphere (after repairs): {mean[0]:.6g}, {mean[1]:.6g}, {mean[2]:.6g}")
    return "\n".join(lines)
