"""`near_engine.envmap` without Blender: the equirect convention in closed form, sampling, resampling, EXR and HDR I/O
and every kind of bad input. (The same convention is checked against real Cycles renders in test_envmap_cycles.py.)"""

from __future__ import annotations

import math
import struct
import warnings
from pathlib import Path

import numpy as np
import OpenEXR
import pytest

from benchmarks.fuzz import rgbe_rle
from near_engine.camera import Camera
from near_engine.envmap import (
    MAX_DIMENSION,
    EnvMap,
    EnvMapWarning,
    describe_image_file,
    direction_to_uv,
    equirect_solid_angles,
    rotation_z_matrix,
    uv_to_direction,
)
from near_engine.errors import EnvMapError
from near_engine.images import EXR_COMPRESSIONS

H, W = 32, 64


def azimuth_dir(azimuth: float, elevation: float = 0.0) -> np.ndarray:
    """World direction at an azimuth (from +X towards +Y) and elevation."""
    return np.array([math.cos(elevation) * math.cos(azimuth), math.cos(elevation) * math.sin(azimuth),
                     math.sin(elevation)])


def linear_map(h: int = H, w: int = W) -> np.ndarray:
    """Pixels linear in the Cycles texel coordinates (col, row from the bottom): bilinear filtering is exact on it."""
    col = np.arange(w)[None, :]
    row_from_bottom = (h - 1 - np.arange(h))[:, None]
    r = 1.0 + 0.25 * col + 0.0 * row_from_bottom
    g = 2.0 + 0.5 * row_from_bottom + 0.0 * col
    b = 1.0 + 0.1 * col + 0.2 * row_from_bottom
    return np.stack(np.broadcast_arrays(r, g, b), axis=-1).astype(np.float32)


def linear_map_value(u: np.ndarray, v: np.ndarray, h: int = H, w: int = W) -> np.ndarray:
    """The closed-form value of `linear_map` at texture coordinates (away from the seam and the poles)."""
    x, y = np.broadcast_arrays(u * w - 0.5, v * h - 0.5)
    return np.stack([1.0 + 0.25 * x, 2.0 + 0.5 * y, 1.0 + 0.1 * x + 0.2 * y], axis=-1)


def write_exr(path: Path, channels: dict[str, np.ndarray], compression: str = "ZIP", parts=None) -> Path:
    header = {"compression": getattr(OpenEXR, f"{compression}_COMPRESSION"), "type": OpenEXR.scanlineimage}
    if parts is not None:
        OpenEXR.File([OpenEXR.Part(dict(header), chs, name=name) for name, chs in parts]).write(str(path))
    else:
        OpenEXR.File(header, {k: np.ascontiguousarray(v) for k, v in channels.items()}).write(str(path))
    return path


def rgb_channels(img: np.ndarray, prefix: str = "") -> dict[str, np.ndarray]:
    return {f"{prefix}{c}": np.ascontiguousarray(img[..., i]) for i, c in enumerate("RGB")}


def psnr(a: np.ndarray, ref: np.ndarray) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - ref) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(float(ref.max()) ** 2 / mse)


# ---------------------------------------------------------------------------------------------------------------------
# the convention


def test_direction_to_uv_at_the_axes():
    dirs = np.array([[1, 0, 0], [0, 1, 0], [0, -1, 0], [-1, 0, 0], [0, 0, 1], [0, 0, -1], [3, 0, 0], [0, 0, 0]], float)
    uv = direction_to_uv(dirs)
    expected = [[0.5, 0.5], [0.25, 0.5], [0.75, 0.5], [0.0, 0.5], [0.5, 1.0], [0.5, 0.0], [0.5, 0.5], [0.0, 0.0]]
    np.testing.assert_allclose(uv, expected, atol=1e-12)


def test_uv_direction_round_trips():
    rng = np.random.default_rng(0)
    d = rng.normal(size=(1000, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    np.testing.assert_allclose(uv_to_direction(direction_to_uv(d)), d, atol=1e-12)
    uv = rng.uniform([0.0, 0.001], [1.0, 0.999], size=(1000, 2))
    np.testing.assert_allclose(direction_to_uv(uv_to_direction(uv)), uv, atol=1e-12)
    assert np.all((direction_to_uv(d)[:, 0] >= 0) & (direction_to_uv(d)[:, 0] < 1))


def test_solid_angles_cover_the_sphere():
    w = equirect_solid_angles(16, 32)
    assert w.shape == (16,)
    assert math.isclose(w.sum() * 32, 4 * math.pi, rel_tol=1e-12)
    assert w[0] < w[7] and math.isclose(w[0], w[-1], rel_tol=1e-9)  # poles small, symmetric


def test_uniform_map_is_constant_everywhere():
    env = EnvMap.uniform((0.2, 0.5, 1.0), height=4, strength=3.0)
    rng = np.random.default_rng(1)
    dirs = np.concatenate([rng.normal(size=(200, 3)), [[0, 0, 1], [0, 0, -1], [-1, 0, 0], [-1, 1e-9, 0], [0, 0, 0]]])
    np.testing.assert_allclose(env.sample(dirs), np.tile([0.6, 1.5, 3.0], (len(dirs), 1)), rtol=1e-6)
    assert env.pixels.shape == (4, 8, 3) and env.pixels.dtype == np.float32
    np.testing.assert_allclose(env.mean_radiance(), [0.6, 1.5, 3.0], rtol=1e-6)


def bright_column_map(col: int) -> np.ndarray:
    p = np.zeros((H, W, 3), np.float32)
    p[:, col] = [10.0, 5.0, 1.0]
    return p


def test_bright_column_lands_where_the_formula_says():
    col = 40
    env = EnvMap(bright_column_map(col))
    u = (col + 0.5) / W
    azimuth = math.pi - 2 * math.pi * u  # the formula u = 0.5 - atan2(y, x) / 2pi, solved for the azimuth
    for elevation in (-0.6, 0.0, 0.9):
        np.testing.assert_allclose(env.sample(azimuth_dir(azimuth, elevation)), [10, 5, 1], rtol=1e-5)
    step = 2 * math.pi / W  # one pixel further in azimuth is the (dark) neighbour column
    np.testing.assert_allclose(env.sample(azimuth_dir(azimuth + step)), 0, atol=1e-5)
    np.testing.assert_allclose(env.sample(azimuth_dir(azimuth - step)), 0, atol=1e-5)
    # half-way to the neighbour: bilinear weight 1/2
    np.testing.assert_allclose(env.sample(azimuth_dir(azimuth - step / 2)), [5, 2.5, 0.5], rtol=1e-5)


def test_mapping_rotation_turns_the_world_the_other_way():
    col = 40
    azimuth = math.pi - 2 * math.pi * (col + 0.5) / W
    env = EnvMap(bright_column_map(col), rotation_z=math.pi / 2)
    # A Mapping rotation of +90 degrees shows the column 90 degrees clockwise (seen from above) of where it was.
    np.testing.assert_allclose(env.sample(azimuth_dir(azimuth - math.pi / 2)), [10, 5, 1], rtol=1e-5)
    np.testing.assert_allclose(env.sample(azimuth_dir(azimuth)), 0, atol=1e-5)
    np.testing.assert_allclose(rotation_z_matrix(math.pi / 2) @ [1, 0, 0], [0, 1, 0], atol=1e-12)


def test_strength_scales_linearly():
    p = linear_map()
    d = np.random.default_rng(2).normal(size=(50, 3))
    base = EnvMap(p).sample(d)
    np.testing.assert_allclose(EnvMap(p, strength=2.5).sample(d), 2.5 * base, rtol=1e-6)
    np.testing.assert_allclose(EnvMap(p, strength=2.5).with_settings(strength=0.0).sample(d), 0.0)


def cycles_bilinear_reference(pixels_top_first: np.ndarray, u: float, v: float) -> np.ndarray:
    """Cycles' interp_linear with EXTENSION_REPEAT, written out pixel by pixel on a bottom-first image."""
    img = pixels_top_first[::-1]  # Blender's storage order
    h, w = img.shape[:2]
    x, y = u * w - 0.5, v * h - 0.5
    ix, iy = math.floor(x), math.floor(y)
    tx, ty = x - ix, y - iy
    ix, iy = ix % w, iy % h
    nix, niy = (ix + 1) % w, (iy + 1) % h
    return ((1 - ty) * ((1 - tx) * img[iy, ix] + tx * img[iy, nix])
            + ty * ((1 - tx) * img[niy, ix] + tx * img[niy, nix]))


def test_bilinear_matches_a_pixel_by_pixel_reference():
    rng = np.random.default_rng(3)
    p = rng.random((8, 16, 3)).astype(np.float32)
    env = EnvMap(p)
    uv = np.concatenate([rng.random((300, 2)), [[0.0, 0.5], [0.999, 0.5], [0.5, 1.0], [0.5, 0.0], [0.01, 0.99]]])
    expected = np.array([cycles_bilinear_reference(p, u, v) for u, v in uv])
    np.testing.assert_allclose(env.sample_uv(uv), expected, rtol=1e-5, atol=1e-6)


def test_bilinear_wraps_around_the_seam():
    p = np.ones((H, W, 3), np.float32)
    p[:, 0] = 2.0
    p[:, -1] = 6.0
    env = EnvMap(p)
    # Direction -X is u = 0: half-way between the first and the last column.
    np.testing.assert_allclose(env.sample([-1.0, 0.0, 0.0]), 4.0, rtol=1e-6)
    # Just either side of the seam.
    np.testing.assert_allclose(env.sample_uv([[0.5 / W, 0.5], [1 - 0.5 / W, 0.5]]), [[2.0] * 3, [6.0] * 3], rtol=1e-6)


def test_poles_wrap_like_cycles_or_clamp():
    p = np.ones((H, W, 3), np.float32)
    p[0] = 5.0  # top row (+Z)
    p[-1] = 1.0  # bottom row (-Z)
    env = EnvMap(p)
    # Cycles' EXTENSION_REPEAT wraps v too: straight up blends the top row with the bottom row half and half.
    np.testing.assert_allclose(env.sample([0.0, 0.0, 1.0]), 3.0, rtol=1e-6)
    np.testing.assert_allclose(env.sample([0.0, 0.0, 1.0], pole_wrap=False), 5.0, rtol=1e-6)
    np.testing.assert_allclose(env.sample([0.0, 0.0, -1.0], pole_wrap=False), 1.0, rtol=1e-6)


def test_background_of_pinhole_and_orthographic_cameras():
    env = EnvMap(linear_map(), rotation_z=0.3, strength=2.0)
    cam = Camera.look_at([0, 0, 0], [1, 2, 0.3], width=9, height=7, fov_x_deg=50)
    img = env.background(cam)
    assert img.shape == (7, 9, 3) and img.dtype == np.float32
    _, d = cam.pixel_rays()
    uv = direction_to_uv(d @ rotation_z_matrix(0.3).T)
    np.testing.assert_allclose(img, 2.0 * linear_map_value(uv[..., 0], uv[..., 1]), rtol=1e-5)
    # Centre pixel (odd size) looks exactly along the camera axis.
    axis = np.array([1, 2, 0.3]) / np.linalg.norm([1, 2, 0.3])
    np.testing.assert_allclose(img[3, 4], env.sample(axis), rtol=1e-6)
    ortho = Camera(8, 6, 10.0, 10.0, 4.0, 3.0, cam.world_to_camera, orthographic=True)
    np.testing.assert_allclose(env.background(ortho), np.broadcast_to(env.sample(axis), (6, 8, 3)), rtol=1e-6)


def test_panorama_facing_plus_x_reproduces_the_map():
    p = np.random.default_rng(4).random((H, W, 3)).astype(np.float32)
    # OpenCV camera axes in the world: right = -Y, down = -Z, forward = +X.
    c2w = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    np.testing.assert_allclose(EnvMap(p).panorama(c2w, W, H), p, atol=2e-5)
    # A panorama camera turned 90 degrees left (facing +Y) shifts the image a quarter turn.
    turned = rotation_z_matrix(math.pi / 2) @ c2w
    np.testing.assert_allclose(EnvMap(p).panorama(turned, W, H), np.roll(p, W // 4, axis=1), atol=2e-5)


def test_rotating_camera_and_world_together_changes_nothing():
    env = EnvMap(np.random.default_rng(5).random((H, W, 3)).astype(np.float32))
    cam = Camera.look_at([0, 0, 0], [0.3, 1, 0.2], width=16, height=12, fov_x_deg=70)
    for theta in (0.4, -2.0):
        rz = np.eye(4)
        rz[:3, :3] = rotation_z_matrix(theta)
        turned = cam.with_world_to_camera(cam.world_to_camera @ rz)  # camera turned by -theta about world Z
        np.testing.assert_allclose(env.with_settings(rotation_z=theta).background(turned), env.background(cam),
                                   rtol=1e-4, atol=1e-5)
        c2w = rotation_z_matrix(-theta) @ cam.camera_to_world[:3, :3]
        np.testing.assert_allclose(env.with_settings(rotation_z=theta).panorama(c2w, 32, 16),
                                   env.panorama(cam.camera_to_world, 32, 16), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# resampling


def test_shrinking_preserves_the_mean_and_matches_block_averages():
    p = np.random.default_rng(6).gamma(0.5, 2.0, (H, W, 3)).astype(np.float32)
    env = EnvMap(p, rotation_z=0.2, strength=1.5)
    small = env.resized(12)  # 64 x 32 -> 24 x 12: a non-integer factor of 8/3
    assert small.pixels.shape == (12, 24, 3)
    assert (small.rotation_z, small.strength) == (0.2, 1.5)
    np.testing.assert_allclose(small.pixels.mean(axis=(0, 1)), p.mean(axis=(0, 1)), rtol=1e-5)
    np.testing.assert_allclose(small.mean_radiance(), env.mean_radiance(), rtol=0.02)
    blocks = p.reshape(8, 4, 16, 4, 3).mean(axis=(1, 3))  # integer factor: plain block averages
    np.testing.assert_allclose(env.resized(8).pixels, blocks, rtol=1e-5)


def test_shrinking_keeps_a_tiny_sun():
    p = np.full((H, W, 3), 0.1, np.float32)
    p[9, 21] = 1000.0  # one very bright pixel: point sampling by 4 would miss it 15 times out of 16
    small = EnvMap(p).resized(8)
    assert math.isclose(float(small.pixels.sum()) * 16, float(p.sum()), rel_tol=1e-5)
    assert math.isclose(float(small.pixels[2, 5, 0]), 0.1 * 15 / 16 + 1000 / 16, rel_tol=1e-5)


def test_enlarging_interpolates_bilinearly():
    p = linear_map(8, 16)
    big = EnvMap(p).resized(32, 64).pixels
    assert big.shape == (32, 64, 3)
    # Away from the borders, output pixel centres fall between input texels where the linear map is exact.
    u = (np.arange(64) + 0.5) / 64
    v = 1 - (np.arange(32) + 0.5) / 32
    expected = linear_map_value(u[None, :], v[:, None], 8, 16)
    np.testing.assert_allclose(big[4:-4, 4:-4], expected[4:-4, 4:-4], rtol=1e-5)
    np.testing.assert_allclose(EnvMap.uniform(2.0, height=8).resized(20).pixels, 2.0, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# files


def sample_image() -> np.ndarray:
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:H, 0:W]
    base = np.stack([np.sin(xx / 7) + 1.2, np.cos(yy / 5) + 1.1, xx * yy / (H * W) + 0.1], axis=-1)
    img = (base * np.exp(rng.normal(0, 0.05, (H, W, 3)))).astype(np.float32)
    img[5, 7] = [500.0, 300.0, 100.0]
    return img


LOSSLESS = {"NONE", "RLE", "ZIPS", "ZIP", "PIZ"}


@pytest.mark.parametrize("pixel_type", ["FLOAT", "HALF"])
@pytest.mark.parametrize("compression", EXR_COMPRESSIONS)
def test_exr_round_trip(tmp_path, compression, pixel_type):
    img = sample_image()
    path = tmp_path / "map.exr"
    EnvMap(img).write_exr(path, compression=compression, pixel_type=pixel_type)
    header = OpenEXR.File(str(path), header_only=True).header()
    codec = "NO" if compression == "NONE" else compression
    assert header["compression"] == getattr(OpenEXR, f"{codec}_COMPRESSION")
    assert not list(tmp_path.glob(".*tmp"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean map reads back without repairs
        back = EnvMap.read(path).pixels
    ref = img if pixel_type == "FLOAT" else img.astype(np.float16).astype(np.float32)
    if compression in LOSSLESS:
        np.testing.assert_array_equal(back, ref)
    elif compression == "PXR24":  # 24-bit floats: 15 mantissa bits; halves stay exact
        np.testing.assert_allclose(back, ref, rtol=2.0**-15 if pixel_type == "FLOAT" else 0)
    elif compression in ("B44", "B44A") and pixel_type == "FLOAT":  # B44 leaves FLOAT channels uncompressed
        np.testing.assert_array_equal(back, ref)
    else:  # lossy: B44 on HALF, DWAA/DWAB
        assert psnr(back, img) > 60
        assert float(np.mean(np.abs(back - img) / img)) < 0.01


def test_reads_blenders_bundled_dwab_hdris(blender_hdri_dir):
    files = sorted(blender_hdri_dir.glob("*.exr"))
    assert len(files) >= 8
    for path in files:
        raw = OpenEXR.File(str(path), separate_channels=True)
        assert raw.parts[0].compression() == OpenEXR.DWAB_COMPRESSION
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # their tiny DWAB ringing below zero must not warn
            env = EnvMap.read(path)
        ch = raw.channels()
        expected = np.maximum(np.stack([ch[c].pixels for c in "RGB"], axis=-1), 0)
        assert env.pixels.shape == (512, 1024, 3) and env.pixels.dtype == np.float32
        np.testing.assert_array_equal(env.pixels, expected)
        assert 0.05 < float(env.mean_radiance().mean()) < 5.0 and float(env.pixels.max()) > 50


def test_describe_image_file(tmp_path, blender_hdri_dir):
    text = describe_image_file(blender_hdri_dir / "forest.exr")
    for expected in ("1024 x 512", "DWAB", "B (float)", "colour from: R, G, B", "NaN 0", "max 1437"):
        assert expected in text, (expected, text)
    img = sample_image()
    img[1, 2, 0] = np.nan
    img[3, 4, 1] = np.inf
    img[5, 6, 2] = -2.0
    path = write_exr(tmp_path / "bad.exr", rgb_channels(img.astype(np.float16)), "PIZ")
    text = describe_image_file(path)
    for expected in ("PIZ", "R (half)", "R: min", "NaN 1, Inf 0, negative 0", "G:", "NaN 0, Inf 1", "negative 1"):
        assert expected in text, (expected, text)
    with pytest.raises(EnvMapError, match="not found"):
        describe_image_file(tmp_path / "missing.exr")
    # a file that reads but holds no usable colour is still described, with the reason
    chans = {**rgb_channels(img, "left."), **rgb_channels(img, "right."), "Z": img[..., 0]}
    text = describe_image_file(write_exr(tmp_path / "ambiguous.exr", chans))
    assert "left.R (float)" in text and "Z (float)" in text and "not usable as an environment map" in text


def test_channel_layouts(tmp_path):
    img = sample_image()
    ones = np.ones((H, W), np.float32)
    # RGBA: alpha dropped; channel types mixed (half, float, uint)
    chans = {"R": img[..., 0].astype(np.float16), "G": img[..., 1], "B": img[..., 2].astype(np.uint32), "A": ones * 0}
    env = EnvMap.read(write_exr(tmp_path / "rgba.exr", chans))
    np.testing.assert_allclose(env.pixels[..., 0], img[..., 0].astype(np.float16), rtol=0)
    np.testing.assert_array_equal(env.pixels[..., 1], img[..., 1])
    np.testing.assert_array_equal(env.pixels[..., 2], img[..., 2].astype(np.uint32))
    # Blender multilayer: ViewLayer.Combined wins over other passes
    chans = {**rgb_channels(img, "ViewLayer.Combined."), **rgb_channels(img * 0 + 7, "ViewLayer.DiffCol."),
             "ViewLayer.Combined.A": ones, "ViewLayer.Depth.Z": ones}
    np.testing.assert_array_equal(EnvMap.read(write_exr(tmp_path / "multi.exr", chans)).pixels, img)
    # plain R, G, B win over layers
    chans = {**rgb_channels(img), **rgb_channels(img * 0 + 7, "other.")}
    np.testing.assert_array_equal(EnvMap.read(write_exr(tmp_path / "plain.exr", chans)).pixels, img)
    # a single layer of any name is taken
    np.testing.assert_array_equal(EnvMap.read(write_exr(tmp_path / "one.exr", rgb_channels(img, "Image."))).pixels,
                                  img)
    # multi-part: the part with colour is found
    parts = [("depth", {"Z": ones}), ("beauty", rgb_channels(img))]
    np.testing.assert_array_equal(EnvMap.read(write_exr(tmp_path / "parts.exr", {}, parts=parts)).pixels, img)
    # two equally plausible layers: refuse, naming both
    chans = {**rgb_channels(img, "left."), **rgb_channels(img, "right.")}
    with pytest.raises(EnvMapError, match=r"ambig|several RGB layers.*left.*right"):
        EnvMap.read(write_exr(tmp_path / "ambiguous.exr", chans))


def test_tiled_and_offset_exr(tmp_path):
    img = sample_image()
    tiles = OpenEXR.TileDescription()
    tiles.xSize, tiles.ySize, tiles.mode = 16, 16, OpenEXR.ONE_LEVEL
    header = {"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.tiledimage, "tiles": tiles}
    OpenEXR.File(header, rgb_channels(img)).write(str(tmp_path / "tiled.exr"))
    np.testing.assert_array_equal(EnvMap.read(tmp_path / "tiled.exr").pixels, img)
    window = (np.array([10, 5], np.int32), np.array([10 + W - 1, 5 + H - 1], np.int32))
    header = {"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage, "dataWindow": window}
    OpenEXR.File(header, rgb_channels(img)).write(str(tmp_path / "offset.exr"))
    np.testing.assert_array_equal(EnvMap.read(tmp_path / "offset.exr").pixels, img)


def test_luminance_only_exr_becomes_grey_with_a_warning(tmp_path):
    y = sample_image()[..., 0]
    with pytest.warns(EnvMapWarning, match="luminance-only"):
        env = EnvMap.read(write_exr(tmp_path / "y.exr", {"Y": y}))
    np.testing.assert_array_equal(env.pixels, np.repeat(y[..., None], 3, axis=-1))
    with pytest.raises(EnvMapError, match="luminance/chroma"):
        EnvMap.read(write_exr(tmp_path / "yc.exr", {"Y": y, "RY": y, "BY": y}))
    with pytest.raises(EnvMapError, match="no colour channels.*Z"):
        EnvMap.read(write_exr(tmp_path / "z.exr", {"Z": y}))


# ---------------------------------------------------------------------------------------------------------------------
# bad files


@pytest.fixture
def valid_exr(tmp_path) -> Path:
    return write_exr(tmp_path / "valid.exr", rgb_channels(sample_image()), "ZIP")


def test_missing_empty_folder_and_not_an_image(tmp_path):
    cases = {
        tmp_path / "nothing.exr": "file not found",
        tmp_path: "is a folder",
    }
    (tmp_path / "empty.exr").write_bytes(b"")
    cases[tmp_path / "empty.exr"] = "empty"
    (tmp_path / "notes.exr").write_text("just some text\n" * 20)
    cases[tmp_path / "notes.exr"] = "not an OpenEXR or Radiance HDR"
    (tmp_path / "photo.hdr").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    cases[tmp_path / "photo.hdr"] = "PNG"
    for path, message in cases.items():
        with pytest.raises(EnvMapError, match=message) as info:
            EnvMap.read(path)
        assert str(path) in str(info.value)


@pytest.mark.parametrize("keep", [4, 40, 300, 0.5, -10])
def test_truncated_exr(valid_exr, keep):
    data = valid_exr.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else (keep if keep > 0 else len(data) + keep)
    valid_exr.write_bytes(data[:n])
    with pytest.raises(EnvMapError, match="truncated or corrupt") as info:
        EnvMap.read(valid_exr)
    assert str(valid_exr) in str(info.value)


def test_corrupt_exr_bytes_give_a_clean_error_or_a_clean_map(valid_exr, tmp_path):
    data = valid_exr.read_bytes()
    rng = np.random.default_rng(8)
    positions = list(range(0, 400, 7)) + list(rng.integers(400, len(data), 40))
    outcomes = {"error": 0, "read": 0}
    for i, pos in enumerate(positions):
        corrupt = bytearray(data)
        corrupt[pos] ^= 0xFF if i % 2 else 0x5A
        path = tmp_path / f"corrupt{i}.exr"
        path.write_bytes(bytes(corrupt))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", EnvMapWarning)
                env = EnvMap.read(path)
        except EnvMapError as exc:
            assert str(path) in str(exc)
            outcomes["error"] += 1
        else:  # the damage fell in pixel data or an unused attribute: the map is still well formed
            assert env.pixels.ndim == 3 and env.pixels.shape[2] == 3
            assert np.isfinite(env.pixels).all() and (env.pixels >= 0).all()
            outcomes["read"] += 1
    assert outcomes["error"] > 10  # header damage is detected


def test_huge_exr_is_refused_before_reading_pixels(tmp_path, valid_exr):
    data = bytearray(valid_exr.read_bytes())
    key = b"dataWindow\x00box2i\x00"
    at = data.index(key) + len(key) + 4  # skip the attribute size
    data[at + 8:at + 12] = np.int32(99999).tobytes()  # xMax
    valid_exr.write_bytes(bytes(data))
    with pytest.raises(EnvMapError, match=f"{MAX_DIMENSION} pixel limit"):
        EnvMap.read(valid_exr)
    wide = np.zeros((1, MAX_DIMENSION + 1), np.float16)
    with pytest.raises(EnvMapError, match="pixel limit"):
        EnvMap.read(write_exr(tmp_path / "wide.exr", {"R": wide, "G": wide, "B": wide}))


def test_nan_inf_and_negative_pixels_are_repaired_with_warnings(tmp_path):
    img = sample_image()
    img[1, 2] = [np.nan, 1.0, 2.0]
    img[3, 4] = [np.inf, -np.inf, 1.0]
    img[5, 6, 2] = -50.0
    path = write_exr(tmp_path / "bad.exr", rgb_channels(img))
    with pytest.warns(EnvMapWarning) as record:
        env = EnvMap.read(path)
    messages = " | ".join(str(w.message) for w in record)
    assert "3 NaN or infinite values" in messages and "1 negative values" in messages and str(path) in messages
    expected = img.copy()
    expected[~np.isfinite(expected)] = 0
    expected = np.maximum(expected, 0)
    np.testing.assert_array_equal(env.pixels, expected)
    assert env.pixels[1, 2].tolist() == [0.0, 1.0, 2.0]  # only the bad channel goes, as in Cycles


# ---------------------------------------------------------------------------------------------------------------------
# Radiance HDR


def rgbe_bytes(h: int, w: int, seed: int) -> np.ndarray:
    """Random RGBE pixels with runs in them; no (1, 1, 1, x) patterns (those are old-RLE markers)."""
    rng = np.random.default_rng(seed)
    px = rng.integers(2, 256, (h, w, 4)).astype(np.uint8)
    px[..., 3] = rng.integers(120, 140, (h, 1))  # exponent constant along each row: long runs
    px[:, 10:30, 0] = 77  # a run in red
    px[0, :3] = 0  # exponent 0 means black
    return px


def rgbe_to_float(px: np.ndarray) -> np.ndarray:
    e = px[..., 3:4].astype(np.int64)
    return np.where(e > 0, px[..., :3] * np.ldexp(1.0, e - 136), 0.0).astype(np.float32)


def encode_old_rle(line: np.ndarray) -> bytes:
    out = bytearray()
    i, w = 0, line.shape[0]
    while i < w:
        out += bytes(line[i])
        run = 0
        while i + 1 + run < w and (line[i + 1 + run] == line[i]).all():
            run += 1
        shift = 0
        remaining = run
        while remaining:  # counts are base-256 digits, least significant first
            out += bytes([1, 1, 1, remaining & 255])
            remaining >>= 8
            shift += 8
        i += 1 + run
    return bytes(out)


def write_hdr(path: Path, scanlines: np.ndarray, resolution: str, encoding: str, extra_header: str = "") -> Path:
    body = bytearray()
    for line in scanlines:
        body += {"flat": lambda ln: ln.tobytes(), "rle": rgbe_rle, "old": encode_old_rle}[encoding](line)
    head = f"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n{extra_header}\n{resolution}\n".encode()
    path.write_bytes(head + bytes(body))
    return path


@pytest.mark.parametrize("encoding", ["flat", "rle", "old"])
def test_hdr_encodings(tmp_path, encoding):
    px = rgbe_bytes(12, 600, seed=9)
    px[3, 5:] = px[3, 4]  # a run of 595 pixels: two old-RLE repeat markers (83 + 2 << 8)
    path = write_hdr(tmp_path / f"{encoding}.hdr", px, "-Y 12 +X 600", encoding, "EXPOSURE=2.0\n")
    if encoding == "old":
        assert len(path.read_bytes()) < px.nbytes  # the encoder really used repeat markers
    env = EnvMap.read(path)
    np.testing.assert_array_equal(env.pixels, rgbe_to_float(px))
    # closed form: mantissa 128 with exponent 129 is 1.0
    one = np.array([[[128, 64, 32, 129]]], np.uint8)
    np.testing.assert_array_equal(EnvMap.read(write_hdr(tmp_path / "one.hdr", one, "-Y 1 +X 1", "flat")).pixels,
                                  [[[1.0, 0.5, 0.25]]])


@pytest.mark.parametrize("resolution,to_file", [
    ("+Y 12 +X 40", lambda img: img[::-1]),  # first scanline at the bottom
    ("-Y 12 -X 40", lambda img: img[:, ::-1]),  # mirrored
    ("+X 40 -Y 12", lambda img: img.transpose(1, 0, 2)),  # scanlines are columns, each top to bottom
])
def test_hdr_orientations(tmp_path, resolution, to_file):
    img = rgbe_bytes(12, 40, seed=10)  # top row first, as EnvMap stores it
    env = EnvMap.read(write_hdr(tmp_path / "o.hdr", np.ascontiguousarray(to_file(img)), resolution, "rle"))
    np.testing.assert_array_equal(env.pixels, rgbe_to_float(img))


def test_bad_hdr_files(tmp_path):
    px = rgbe_bytes(12, 40, seed=11)
    good = write_hdr(tmp_path / "good.hdr", px, "-Y 12 +X 40", "rle").read_bytes()
    cases = {
        "truncated": (good[:-30], "truncated"),
        "cut_in_header": (good[:15], "header never ends"),
        "no_resolution": (b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\nhello\n", "resolution line"),
        "huge": (b"#?RADIANCE\n\n-Y 100000 +X 200000\n" + bytes(64), "pixel limit"),
        "zero": (b"#?RADIANCE\n\n-Y 0 +X 0\n", "empty"),
        "xyze": (b"#?RADIANCE\nFORMAT=32-bit_rle_xyze\n\n-Y 1 +X 1\n" + bytes(4), "not supported"),
    }
    corrupt = bytearray(good)
    first = good.index(b"\n-Y 12 +X 40\n") + len(b"\n-Y 12 +X 40\n")
    corrupt[first + 4] = 255  # a run of 127 in a 40-pixel scanline
    cases["bad_run"] = (bytes(corrupt), "corrupt run-length")
    for name, (data, message) in cases.items():
        path = tmp_path / f"{name}.hdr"
        path.write_bytes(data)
        with pytest.raises(EnvMapError, match=message) as info:
            EnvMap.read(path)
        assert str(path) in str(info.value), name


@pytest.mark.timeout(30)
def test_an_hdr_bomb_is_refused_before_decoding(tmp_path, capsys):
    """96 KB of obsolete run-length data declaring 16384 x 8192 pixels: it took 86 s and 4.8 GB in `near info`."""
    from near_engine.cli import main

    line = encode_old_rle(np.full((16384, 4), 128, np.uint8))  # one pixel, then "repeat it 16383 times"
    path = tmp_path / "bomb.hdr"
    path.write_bytes(b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y 8192 +X 16384\n" + line * 8192)
    assert path.stat().st_size < 100_000
    with pytest.raises(EnvMapError, match=r"bomb\.hdr: .*8192 scanlines of 16384 pixels.*obsolete run-length"):
        EnvMap.read(path)
    assert main(["info", str(path)]) == 2
    assert "fewer than the 8,552,448 even the tightest run-length encoding needs" in capsys.readouterr().err
    # the same size, honestly run-length encoded (one run per 127 values), is not refused for its length
    rle = rgbe_rle(np.full((16384, 4), 128, np.uint8))
    assert len(rle) == 4 + 4 * 2 * 130
    honest = tmp_path / "honest.hdr"
    honest.write_bytes(b"#?RADIANCE\n\n-Y 2 +X 16384\n" + rle * 2)
    assert EnvMap.read(honest).pixels.shape == (2, 16384, 3)


def test_an_exr_declaring_more_values_than_a_16k_rgba_map_is_refused_before_decoding(tmp_path):
    from near_engine.images import write_exr

    channels = {f"pass{i}.{c}": np.zeros((1, 2), np.float32) for i in range(3) for c in "RGB"}
    write_exr(tmp_path / "wide.exr", channels)
    data = bytearray((tmp_path / "wide.exr").read_bytes())
    at = data.index(b"dataWindow\0box2i\0") + len(b"dataWindow\0box2i\0") + 4
    data[at:at + 16] = struct.pack("<4i", 0, 0, 16383, 8191)  # 16384 x 8192, 9 channels, no data behind it
    (tmp_path / "wide.exr").write_bytes(bytes(data))
    with pytest.raises(EnvMapError, match="wide.exr: its parts and channels hold 1,207,959,552 values"):
        EnvMap.read(tmp_path / "wide.exr")


def test_more_pixels_than_a_16k_map_are_refused():
    with pytest.raises(EnvMapError, match="more than the 134,217,728 pixels"):
        EnvMap.from_array(np.broadcast_to(np.float32(1), (MAX_DIMENSION, MAX_DIMENSION, 3)), name="test array")


# ---------------------------------------------------------------------------------------------------------------------
# bad arrays and settings


def test_bad_arrays_are_refused():
    cases = [
        (np.zeros((0, 0, 3), np.float32), "empty"),
        (np.zeros((4, 0, 3), np.float32), "empty"),
        (np.zeros(12, np.float32), r"shape \[H, W, 3\]"),
        (np.zeros((4, 8), np.float32), r"shape \[H, W, 3\]"),
        (np.zeros((1, 4, 8, 3), np.float32), r"shape \[H, W, 3\]"),
        (np.zeros((4, 8, 2), np.float32), r"shape \[H, W, 3\]"),
        (np.zeros((4, 8, 3), np.uint8), "floating point.*uint8.*8-bit"),
        (np.zeros((4, 8, 3), bool), "floating point"),
        (np.full((4, 8, 3), "x"), "floating point"),
        (np.broadcast_to(np.float32(1), (2, MAX_DIMENSION + 1, 3)), "pixel limit"),  # a view: nothing allocated
    ]
    for array, message in cases:
        with pytest.raises(EnvMapError, match=message):
            EnvMap.from_array(array, name="test array")
    with pytest.raises(EnvMapError, match="floating point"):
        EnvMap.from_array([[["a", "b", "c"]]])
    for kwargs, message in [({"rotation_z": float("nan")}, "rotation_z must be finite"),
                            ({"strength": -1.0}, "strength must be >= 0"),
                            ({"strength": "bright"}, "strength must be a number")]:
        with pytest.raises(EnvMapError, match=message):
            EnvMap.from_array(np.ones((2, 4, 3), np.float32), **kwargs)
    with pytest.raises(EnvMapError, match="rgb must be"):
        EnvMap.uniform(np.ones((2, 2)))
    env = EnvMap.uniform(1.0, height=2)
    with pytest.raises(EnvMapError, match="NaN/Inf"):
        env.sample([[0.0, np.nan, 1.0]])
    with pytest.raises(EnvMapError, match=r"shape \(4, 2\)"):
        env.sample(np.ones((4, 2)))


def test_good_arrays_are_accepted_copied_and_frozen():
    src = np.random.default_rng(12).random((5, 7, 4))  # float64, RGBA, not 2:1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # odd aspect ratios are fine, as in Cycles: no warning
        env = EnvMap.from_array(src)
    assert env.pixels.dtype == np.float32 and env.pixels.shape == (5, 7, 3)
    np.testing.assert_allclose(env.pixels, src[..., :3], rtol=1e-6)
    src[:] = 9.0
    assert float(env.pixels.max()) < 1.0  # not aliased
    with pytest.raises(ValueError):
        env.pixels[0, 0, 0] = 1.0  # read-only: caches keyed on a map stay valid
    assert env.with_settings(rotation_z=1.0).pixels is env.pixels  # no copy for new settings


def test_array_repairs_warn_and_shallow_negatives_do_not():
    p = np.ones((4, 8, 3), np.float32)
    p[0, 0, 0] = np.nan
    p[1, 1, 1] = -np.inf
    p[2, 2, 2] = -3.0
    with pytest.warns(EnvMapWarning) as record:
        env = EnvMap.from_array(p, name="test array")
    assert [str(w.message).split(" (")[0] for w in record] == ["test array: 2 NaN or infinite values set to 0",
                                                              "test array: 1 negative values"]
    assert all(w.filename == __file__ for w in record)  # attributed to the caller's line
    assert np.isfinite(env.pixels).all() and (env.pixels >= 0).all()
    assert env.pixels[0, 0].tolist() == [0.0, 1.0, 1.0] and env.pixels[2, 2, 2] == 0.0
    q = np.ones((4, 8, 3), np.float32)
    q[0, 0, 0] = -0.001  # codec ringing
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert EnvMap.from_array(q).pixels[0, 0, 0] == 0.0
    big = np.full((2, 4, 3), 1e39)  # float64 beyond float32's range
    with pytest.warns(EnvMapWarning, match="24 NaN or infinite"):
        assert float(EnvMap.from_array(big).pixels.max()) == 0.0


def test_write_errors(tmp_path):
    env = EnvMap.uniform(1.0, height=4)
    with pytest.raises(EnvMapError, match="unknown EXR compression 'LZW'"):
        env.write_exr(tmp_path / "a.exr", compression="LZW")
    with pytest.raises(EnvMapError, match="Could not write 'folder.exr'"):
        env.write_exr(tmp_path / "no" / "such" / "folder.exr")
    env.write_exr(tmp_path / "kept.exr")
    with pytest.raises(EnvMapError, match="unknown EXR compression"):
        EnvMap.uniform(2.0, height=4).write_exr(tmp_path / "kept.exr", compression="LZW")
    assert float(EnvMap.read(tmp_path / "kept.exr").pixels.max()) == 1.0  # a failed write leaves the old file
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    with pytest.warns(EnvMapWarning, match="clamped to fit HALF"):
        EnvMap.uniform(1e6, height=2).write_exr(tmp_path / "h.exr", pixel_type="HALF")
    assert float(EnvMap.read(tmp_path / "h.exr").pixels.max()) == 65504.0
