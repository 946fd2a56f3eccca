"""Photo preparation for the lift: alpha, backdrop cut-out, 1.2x square crop matted on black, and bad input."""

import numpy as np
import OpenEXR
import pytest
from PIL import Image

from near_engine.images import srgb_to_linear
from near_engine.lift.image import ImageError, prepare_photo, read_photo


def _disc_rgba(size=200, centre=(80, 120), radius=30, colour=(200, 40, 40)):
    yy, xx = np.mgrid[:size, :size]
    inside = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2
    rgba = np.zeros((size, size, 4), np.uint8)
    rgba[inside] = (*colour, 255)
    return rgba


def test_alpha_png_is_cropped_square_around_the_object_and_matted_on_black(tmp_path):
    path = tmp_path / "disc.png"
    Image.fromarray(_disc_rgba()).save(path)
    out = prepare_photo(path, size=64).rgba
    assert out.shape == (64, 64, 4)
    alpha = out[..., 3]
    # The disc (diameter 61 px) fills 1/1.2 of the crop: its opaque width is about 64/1.2 = 53 px, centred.
    row = alpha[32] > 0.5
    assert abs(row.sum() - 64 / 1.2) <= 2
    cols = np.nonzero(row)[0]
    assert abs((cols.min() + cols.max()) / 2 - 31.5) <= 1
    assert alpha[0, 0] == 0 and np.all(out[0, 0, :3] == 0)  # outside is black, transparent
    expected = srgb_to_linear(np.array([200, 40, 40]) / 255.0)
    np.testing.assert_allclose(out[32, 32, :3], expected, rtol=0.02)  # linear colour kept at the centre


def test_backdrop_photo_without_alpha_is_cut_out(tmp_path):
    rgba = _disc_rgba(colour=(30, 160, 60))
    rgb = np.where(rgba[..., 3:] > 0, rgba[..., :3], np.uint8(235))  # white studio backdrop
    path = tmp_path / "disc.jpg"
    Image.fromarray(rgb).save(path, quality=95)
    alpha = prepare_photo(path, size=48).rgba[..., 3]
    assert alpha[24, 24] > 0.9 and alpha[0, 0] == 0
    assert abs((alpha[24] > 0.5).sum() - 48 / 1.2) <= 2


def test_busy_background_without_alpha_names_the_fix(tmp_path):
    path = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    with pytest.raises(ImageError, match="use an image with alpha"):
        prepare_photo(path)


@pytest.mark.parametrize("mode", ["L", "P", "I;16"])
def test_greyscale_palette_and_16_bit_pngs_read(tmp_path, mode):
    rgba = _disc_rgba()
    path = tmp_path / f"{mode.replace(';', '')}.png"
    if mode == "I;16":
        grey = (rgba[..., 0].astype(np.uint16) * 257) + 1000
        Image.fromarray(grey).save(path)  # uint16 -> a 16-bit greyscale PNG
    else:
        Image.fromarray(rgba[..., :3]).convert(mode).save(path)
    image, has_alpha = read_photo(path)
    assert image.shape == (200, 200, 4) and not has_alpha and np.isfinite(image).all()
    assert prepare_photo(path, size=32).rgba[16, 16, 3] > 0.9  # the disc on its plain black backdrop is found


def test_exr_with_alpha_is_straightened_and_prepared(tmp_path):
    rgba = _disc_rgba().astype(np.float32) / 255
    rgba[..., :3] = srgb_to_linear(rgba[..., :3]) * rgba[..., 3:]  # premultiplied, as EXR stores it
    path = tmp_path / "disc.exr"
    OpenEXR.File({"compression": OpenEXR.ZIP_COMPRESSION},
                 {c: np.ascontiguousarray(rgba[..., i]) for i, c in enumerate("RGBA")}).write(str(path))
    out = prepare_photo(path, size=32).rgba
    assert out[16, 16, 3] > 0.99 and out[16, 16, 0] > 0.5


@pytest.mark.parametrize("content", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\0" * 40])
def test_empty_and_corrupt_files_get_a_clear_error(tmp_path, content):
    path = tmp_path / "broken.png"
    path.write_bytes(content)
    with pytest.raises(ImageError, match="broken.png"):
        prepare_photo(path)


def test_empty_alpha_and_missing_file(tmp_path):
    path = tmp_path / "clear.png"
    Image.fromarray(np.zeros((16, 16, 4), np.uint8)).save(path)
    with pytest.raises(ImageError, match="alpha is empty"):
        prepare_photo(path)
    with pytest.raises(ImageError, match="no such image"):
        prepare_photo(tmp_path / "missing.png")


def test_huge_image_is_refused_before_decoding(tmp_path, monkeypatch):
    import near_engine.lift.image as image_module

    path = tmp_path / "big.png"
    Image.fromarray(_disc_rgba()).save(path)
    monkeypatch.setattr(image_module, "MAX_PIXELS", 100 * 100)
    with pytest.raises(ImageError, match="megapixels"):
        prepare_photo(path)


def test_nan_exr_is_refused(tmp_path):
    pixels = np.full((8, 8), np.nan, np.float32)
    path = tmp_path / "nan.exr"
    OpenEXR.File({"compression": OpenEXR.ZIP_COMPRESSION}, {c: pixels.copy() for c in "RGB"}).write(str(path))
    with pytest.raises(ImageError, match="NaN"):
        prepare_photo(path)


def test_a_render_is_exposed_and_white_balanced_by_its_lights_mean():
    """A white diffuse surface under a uniform world of radiance L renders at L (the white furnace); exposed and
    white-balanced by that world it reads METERED_WHITE in every channel, whatever L and whatever the light's colour,
    and any albedo keeps its ratio to white."""
    from near_engine.envmap import EnvMap
    from near_engine.lift.image import METERED_WHITE, light_white, metered

    for radiance in ((0.165, 0.165, 0.165), (0.6, 0.6, 0.6), (3.0, 2.0, 1.0), (0.2, 0.15, 0.05)):
        sky = np.broadcast_to(np.asarray(radiance, np.float32), (8, 16, 3)).copy()
        white = light_white(EnvMap.from_array(sky).mean_radiance())
        np.testing.assert_allclose(white, radiance, rtol=1e-5)
        render = np.zeros((4, 4, 4), np.float32)
        render[..., :3] = np.asarray(radiance, np.float32) * np.array([1.0, 0.5, 0.25], np.float32)  # the albedos
        render[..., 3] = 1.0
        exposed = metered(render, white)
        card = np.broadcast_to(METERED_WHITE * np.array([1.0, 0.5, 0.25]), (4, 4, 3))
        np.testing.assert_allclose(exposed[..., :3], card, rtol=1e-5)
        np.testing.assert_array_equal(exposed[..., 3], render[..., 3])
        assert render[0, 0, 0] == np.float32(radiance[0])  # the input is left as it was


def test_light_white_is_the_solid_angle_mean_radiance():
    from near_engine.envmap import EnvMap
    from near_engine.lift.image import light_white

    sky = np.zeros((64, 128, 3), np.float32)
    sky[:32] = (2.0, 1.0, 0.5)  # the upper hemisphere lit, the lower black: half of it over the sphere
    np.testing.assert_allclose(light_white(EnvMap.from_array(sky).mean_radiance()), (1.0, 0.5, 0.25), rtol=1e-3)
    grey = np.full((8, 16, 3), 0.5, np.float32)
    np.testing.assert_allclose(light_white(EnvMap.from_array(grey, strength=2.0).mean_radiance()), 1.0, rtol=1e-4)
    green = np.zeros((8, 16, 3), np.float32)
    green[..., 1] = 1.0  # a light with no red or blue cannot white-balance a photo: red and blue would be infinite
    for bad in (green.mean((0, 1)), np.zeros(3), np.array([np.nan, 1.0, 1.0]), np.ones(4)):
        with pytest.raises(ImageError, match="no positive level in every channel"):
            light_white(bad)
