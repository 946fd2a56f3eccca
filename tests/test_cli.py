"""The `near` command and the main job: real files written and read back, closed-form shading and tone-mapping."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import OpenEXR
import pytest
from PIL import Image

from near_engine.asset import Asset, read_asset, write_asset
from near_engine.cli import main
from near_engine.envmap import EnvMap, diffuse_irradiance
from near_engine.errors import NearError
from near_engine.images import linear_to_srgb, write_exr, write_png


def test_irradiance_closed_form():
    normals = np.array([[0, 0, 1.0], [0, 0, -1.0], [1.0, 0, 0], [0, -0.6, 0.8]])
    # A uniform sky of radiance L gives E = pi L on every surface.
    uniform = EnvMap.uniform([0.5, 1.0, 2.0], height=64)
    np.testing.assert_allclose(diffuse_irradiance(uniform, normals), np.pi * np.array([[0.5, 1.0, 2.0]] * 4), rtol=2e-3)
    # Upper hemisphere only: E = pi L facing up, 0 facing down, pi L / 2 for a vertical wall, pi L (1 + cos)/2 tilted.
    sky = np.zeros((64, 128, 3), np.float32)
    sky[:32] = 1.0
    e = diffuse_irradiance(EnvMap.from_array(sky, strength=3.0), normals, height=64)[:, 0]
    np.testing.assert_allclose(e, 3 * np.pi * np.array([1.0, 0.0, 0.5, 0.9]), rtol=1e-2, atol=1e-2)


def test_irradiance_follows_world_rotation():
    # A bright patch facing +X in the image; a Mapping rotation of +90 degrees shows it towards -Y.
    img = np.zeros((32, 64, 3), np.float32)
    img[14:18, 30:34] = 100.0  # image centre faces +X
    env = EnvMap.from_array(img)
    x, minus_y = np.array([[1.0, 0, 0]]), np.array([[0, -1.0, 0]])
    assert diffuse_irradiance(env, x, height=32)[0, 0] > 10 * diffuse_irradiance(env, minus_y, height=32)[0, 0]
    turned = env.with_settings(rotation_z=math.pi / 2)
    np.testing.assert_allclose(diffuse_irradiance(turned, minus_y, height=32), diffuse_irradiance(env, x, height=32),
                               rtol=1e-3)


def test_standard_view_transform_values():
    np.testing.assert_allclose(linear_to_srgb(np.array([0.0, 0.0031308, 0.18, 0.5, 1.0, 7.0, np.nan])),
                               [0.0, 0.04045, 0.46135, 0.73536, 1.0, 1.0, 0.0], atol=1e-4)
    np.testing.assert_allclose(linear_to_srgb(np.array([0.25]), exposure=1.0), linear_to_srgb(np.array([0.5])))


def test_png_and_exr_writers(tmp_path):
    rgb = np.zeros((4, 6, 3), np.float32)
    rgb[..., 0] = 0.18
    alpha = np.full((4, 6), 0.5, np.float32)
    write_png(tmp_path / "a.png", rgb * alpha[..., None], alpha)  # premultiplied in, straight alpha out
    png = np.asarray(Image.open(tmp_path / "a.png"))
    assert png.shape == (4, 6, 4)
    assert png[0, 0, 0] == round(0.46135 * 255) and png[0, 0, 3] == 128
    write_exr(tmp_path / "a.exr", {"R": rgb[..., 0], "A": alpha, "Depth.Z": alpha * 3})
    channels = OpenEXR.File(str(tmp_path / "a.exr"), separate_channels=True).channels()
    assert set(channels) == {"R", "A", "Depth.Z"}
    np.testing.assert_array_equal(channels["Depth.Z"].pixels, alpha * 3)


@pytest.mark.cycles
def test_demo_encodes_the_sample_and_relights_it_next_to_cycles(tmp_path, capsys):
    """The main job at a small size: encode the bundled vase, Cycles references, a 6-view turntable per HDRI."""
    assert main(["demo", "-o", str(tmp_path), "--size", "64", "--hdri", "city", "--views", "6",
                 "--samples", "8"]) == 0
    assert "contact sheet" in capsys.readouterr().out
    sheet = np.asarray(Image.open(tmp_path / "contact_sheet.png"))
    assert sheet.shape == (2 * 64, 7 * 64, 3)  # Cycles, then 6 turntable views; then the photo and its lift
    assert sheet.std() > 10  # a picture, not a flat fill
    assert read_asset(tmp_path / "sample.near").num_voxels > 1000
    channels = OpenEXR.File(str(tmp_path / "city_az060.exr"), separate_channels=True).channels()
    assert {"R", "G", "B", "A", "Depth.Z"} <= set(channels)
    alpha, depth = channels["A"].pixels, channels["Depth.Z"].pixels
    assert 0.1 < (alpha > 0.5).mean() < 0.6  # the object fills part of the frame
    # The camera orbits at 2 units and the vase fits in the unit cube (a ball of radius 0.87): depths lie between.
    assert 1.1 < depth[alpha > 0.5].min() and depth[alpha > 0.5].max() < 2.9
    assert np.all(alpha <= 1.0) and np.isfinite(channels["R"].pixels).all()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["frames"]) == 6
    # The encoded vase stands where Cycles draws it: the silhouettes agree.
    assert summary["cycles"]["city"]["silhouette_iou"] > 0.85
    # the photo row: a Cycles photo under courtyard, lifted onto the vase and relit under city
    assert (tmp_path / "photo.png").is_file() and summary["lift"]["voxels"] > 1000
    for view in ("photo view", "novel view"):  # relit in the photo's own view and in a turntable view
        assert summary["lift"]["cycles"][view]["city"]["psnr_object"] > 10.0  # not empty, not black


def test_demo_refuses_a_file_as_output_folder(tmp_path, capsys):
    (tmp_path / "taken").write_text("not a folder")
    assert main(["demo", "-o", str(tmp_path / "taken"), "--size", "16", "--hdri", "sunset"]) == 2  # before any work
    assert "not a folder" in capsys.readouterr().err
    assert (tmp_path / "taken").read_text() == "not a folder"


def test_info_describes_exr_and_asset(tmp_path, capsys):
    EnvMap.uniform([1.0, 2.0, 3.0], height=8).write_exr(tmp_path / "env.exr", compression="PIZ")
    assert main(["info", str(tmp_path / "env.exr")]) == 0
    out = capsys.readouterr().out
    assert "16 x 8" in out and "PIZ" in out
    coords = np.array([[1, 2, 3], [4, 5, 6]], np.int32)
    write_asset(tmp_path / "a.near", Asset(coords, np.ones((2, 8), np.float32), model="tiny-test"))
    assert main(["info", str(tmp_path / "a.near")]) == 0
    out = capsys.readouterr().out
    assert "voxels       2 " in out and "channels     8" in out and "tiny-test" in out


@pytest.mark.parametrize("content", [None, b"", b"garbage that is no file format", b"\x76\x2f\x31\x01broken"])
def test_info_on_bad_files_reports_clearly(tmp_path, capsys, content):
    path = tmp_path / "bad.near"
    if content is not None:
        path.write_bytes(content)
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("near: error:") and "bad.near" in err and "Traceback" not in err


def test_bench_prints_one_json_line():
    out = subprocess.run([sys.executable, "-m", "near_engine.cli", "bench", "raster", "--gaussians", "3000",
                          "--size", "64", "--repeats", "1"], check=True, capture_output=True, text=True).stdout
    lines = out.strip().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["gaussians"] == 3000 and record["width"] == record["height"] == 64
    for key in ("forward_ms", "backward_ms", "naive_numpy_ms", "speedup_vs_naive"):
        assert record[key] > 0


def test_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "near_engine.cli", "--help"], check=True, capture_output=True,
                         text=True).stdout
    for name in ("demo", "info", "bench"):
        assert name in out


def test_render_writes_every_pass_and_matches_the_pipeline(tmp_path, capsys, blender_hdri_dir):
    """`near render` with seeded, untrained near-tiny weights saved as a folder (no trained weights exist yet)."""
    import torch

    from near_engine.camera import Camera
    from near_engine.configs import random_weights, save_networks
    from near_engine.pipeline import NearPipeline, Scene

    save_networks(tmp_path / "w", random_weights("near-tiny", seed=0), "near-tiny")
    grid = np.stack(np.meshgrid(*[np.arange(64)] * 3, indexing="ij"), -1).reshape(-1, 3)
    r = np.linalg.norm(grid + 0.5 - 32, axis=-1)
    coords = grid[(r > 9.3) & (r < 10.3)].astype(np.int32)
    feats = torch.randn(len(coords), 8, generator=torch.Generator().manual_seed(0)).numpy()
    write_asset(tmp_path / "a.near", Asset(coords, feats, model="near-tiny (untrained)"))
    hdri = str(blender_hdri_dir / "sunset.exr")
    common = ["render", str(tmp_path / "a.near"), "--hdri", hdri, "--rotation", "30", "--azimuth", "40",
              "--size", "40x32", "--weights", str(tmp_path / "w")]
    assert main([*common, "--passes", "depth", "normal", "-o", str(tmp_path / "out.exr")]) == 0
    channels = OpenEXR.File(str(tmp_path / "out.exr"), separate_channels=True).channels()
    assert {"R", "G", "B", "A", "Depth.Z", "Normal.X", "Normal.Y", "Normal.Z"} == set(channels)
    assert main([*common, "-o", str(tmp_path / "all.exr")]) == 0  # EXR keeps every pass by default
    every = OpenEXR.File(str(tmp_path / "all.exr"), separate_channels=True).channels()
    assert {"BaseColor.R", "Roughness.V", "Metallic.V", "Shadow.V", "Alpha.V", "Depth.Z"} <= set(every)
    assert main([*common, "--passes", "depth", "-o", str(tmp_path / "p.png")]) == 2
    env = EnvMap.read(hdri, rotation_z=math.radians(30))
    cam = Camera.orbit(40, 20, 2.0, width=40, height=32, fov_x_deg=40)
    direct = NearPipeline.from_pretrained(tmp_path / "w").render(Scene([(Asset(coords, feats), np.eye(4))], env, cam))
    np.testing.assert_allclose(channels["R"].pixels, direct["combined"][..., 0], rtol=1e-6, atol=1e-6)
    assert np.all(channels["A"].pixels == 1.0)  # the world is the background
    assert main([*common, "--transparent", "-o", str(tmp_path / "out.png")]) == 0
    png = np.asarray(Image.open(tmp_path / "out.png"))
    assert png.shape == (32, 40, 4) and png[0, 0, 3] == 0 and png[..., 3].max() > 200
    capsys.readouterr()
    assert main(["render", str(tmp_path / "a.near"), "--hdri", hdri, "--weights", "near-official",
                 "-o", str(tmp_path / "x.png")]) == 2
    assert "no trained weights ship for 'near-official'" in capsys.readouterr().err
    # No --weights: the near-tiny weights that ship with near_engine.
    assert main(["render", str(tmp_path / "a.near"), "--hdri", hdri, "--size", "40x32", "-o",
                 str(tmp_path / "default.exr")]) == 0
    shipped = NearPipeline.from_pretrained("near-tiny").render(Scene([(Asset(coords, feats), np.eye(4))],
                                                                     EnvMap.read(hdri), Camera.orbit(
                                                                         30, 20, 2.0, width=40, height=32,
                                                                         fov_x_deg=40)))
    default = OpenEXR.File(str(tmp_path / "default.exr"), separate_channels=True).channels()
    np.testing.assert_allclose(default["G"].pixels, shipped["combined"][..., 1], rtol=1e-6, atol=1e-6)


# ---- bad input at the command line gets a usage error, never a traceback (issue 11, items 3, 4 and 6)

@pytest.mark.parametrize("option, value", [
    ("--azimuth", "inf"), ("--azimuth", "nan"), ("--azimuth", "-inf"), ("--rotation", "1e300"),
    ("--elevation", "91"), ("--distance", "0"), ("--distance", "nan"), ("--fov", "180"), ("--fov", "0"),
    ("--strength", "-1"), ("--strength", "inf"), ("--azimuth", "north"),
])
def test_render_numbers_must_be_finite_and_in_range(tmp_path, capsys, option, value):
    with pytest.raises(SystemExit) as exit_info:
        main(["render", str(tmp_path / "a.near"), "--hdri", "x.exr", f"{option}={value}", "-o",
              str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"argument {option}:" in err and "Traceback" not in err, err
    assert value in err


@pytest.mark.parametrize("argv", [["demo", "--size", "0"], ["encode-mesh", "m.obj", "-o", "a.near", "--views", "1e9"],
                                  ["train", "--data", "d", "--out", "o", "--lr", "nan"],
                                  ["datagen", "-o", "d", "--samples", "-3"]])
def test_other_commands_check_their_numbers(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and "Traceback" not in capsys.readouterr().err


def test_a_render_size_past_the_memory_limit_is_refused_before_anything_loads(tmp_path, capsys):
    assert main(["render", str(tmp_path / "missing.near"), "--hdri", "x.exr", "--size", "16384x16384",
                 "-o", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err
    assert "16384 x 16384 pixels would need about 64.0 GiB" in err and "8 GiB limit" in err, err


def test_the_pipeline_refuses_a_render_past_the_memory_limit():
    from near_engine.camera import Camera
    from near_engine.pipeline import MAX_RENDER_BYTES, RENDER_BYTES_PER_PIXEL, NearPipeline, Scene

    pipeline = NearPipeline.from_pretrained("near-tiny", device="cpu")
    width = 8192
    height = MAX_RENDER_BYTES // RENDER_BYTES_PER_PIXEL // width + 1  # one row past the limit
    camera = Camera.orbit(0, 0, 2.0, width=width, height=height)
    with pytest.raises(NearError, match="GiB limit"):
        pipeline.render(Scene([], EnvMap.uniform(1.0), camera, transparent=True), ("alpha",))
    small = Camera.orbit(0, 0, 2.0, width=8, height=4)
    assert pipeline.render(Scene([], EnvMap.uniform(1.0), small), ("combined",))["combined"].shape == (4, 8, 4)


def test_info_on_a_folder_says_folder(tmp_path, capsys):
    assert main(["info", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is a folder" in err and "no such file" not in err, err


def test_info_shows_control_characters_from_a_file_as_escapes(tmp_path, capsys):
    path = tmp_path / "evil.hdr"
    path.write_bytes(b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\nSOFTWARE=\x1b[2J\x1b]0;owned\x07\n\n-Y 1 +X 2\n"
                     + bytes([128, 128, 128, 129]) * 2)
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out
    assert "SOFTWARE=\\x1b[2J\\x1b]0;owned\\x07" in out
