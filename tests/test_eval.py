"""`near_engine.eval`: metrics against closed forms, the Lambertian baseline, and the whole evaluation on a one-object
data set rendered with Cycles at 24 px.

The evaluation test uses `random_weights("near-tiny-train")`: seeded, UNTRAINED networks. Its numbers mean nothing;
it checks the report's shape (every row and column, finite values) and one number against a direct computation.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from near_engine.camera import Camera
from near_engine.envmap import EnvMap, diffuse_irradiance
from near_engine.eval import metrics
from near_engine.eval.tasks import COLUMNS, METHODS, lambertian_radiance
from near_engine.images import linear_to_srgb

RNG = np.random.default_rng(0)
C1, C2 = metrics.SSIM_K1**2, metrics.SSIM_K2**2


# ---- metrics ---------------------------------------------------------------------------------------------------------

def test_identical_images_have_infinite_psnr_and_ssim_one():
    image = RNG.random((32, 32, 3))
    assert metrics.psnr(image, image) == math.inf
    assert metrics.ssim(image, image) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("offset", [0.01, 0.1, 0.25])
def test_a_constant_offset_gives_the_known_psnr(offset):
    image = RNG.uniform(0.0, 0.7, (20, 24, 3))
    assert metrics.psnr(image, image + offset) == pytest.approx(-20 * math.log10(offset), rel=1e-9)


@pytest.mark.parametrize("a, b", [(0.2, 0.5), (0.9, 0.1), (0.4, 0.4)])
def test_ssim_of_constant_images_matches_the_closed_form(a, b):
    """Constant images have no variance: SSIM = (2ab + C1) / (a^2 + b^2 + C1) at every pixel."""
    expected = (2 * a * b + C1) / (a * a + b * b + C1)
    s = metrics.ssim_map(np.full((16, 16, 3), a), np.full((16, 16, 3), b))
    np.testing.assert_allclose(s, expected, rtol=1e-9)


def test_ssim_of_a_shifted_copy_is_its_luminance_term():
    """x + c keeps variance and covariance, so only the luminance term (2 mu_x mu_y + C1)/(mu_x^2 + mu_y^2 + C1) of
    the local means is left; for a constant image that is the closed form above, otherwise it is below 1."""
    image = RNG.random((24, 24))
    s = metrics.ssim(image, image + 0.1)
    assert 0.9 < s < 1.0
    assert metrics.ssim(np.full((24, 24), 0.3), np.full((24, 24), 0.4)) == pytest.approx(
        (2 * 0.3 * 0.4 + C1) / (0.3**2 + 0.4**2 + C1), rel=1e-9)


def test_ssim_is_symmetric_and_below_one_for_noise():
    a = RNG.random((32, 32, 3))
    b = np.clip(a + RNG.normal(0, 0.1, a.shape), 0, 1)
    assert metrics.ssim(a, b) == pytest.approx(metrics.ssim(b, a), abs=1e-12)
    assert metrics.ssim(a, b) < 0.99


def test_a_mask_restricts_the_metrics_to_the_region():
    a = RNG.random((32, 32, 3))
    b = a.copy()
    b[:, 16:] = RNG.random((32, 16, 3))  # only the right half differs
    left = np.zeros((32, 32), dtype=bool)
    left[:, :16] = True
    assert metrics.psnr(a, b, left) == math.inf
    assert metrics.psnr(a, b, ~left) == pytest.approx(-10 * math.log10(((a - b)[:, 16:] ** 2).mean()))
    assert metrics.ssim(a, b, ~left) == pytest.approx(metrics.ssim_map(a, b)[:, 16:].mean())
    assert metrics.ssim(a, b, left[:, :] & (np.arange(32) < 8)) == pytest.approx(1.0)  # windows clear of the change
    with pytest.raises(ValueError, match="empty"):
        metrics.psnr(a, b, np.zeros((32, 32), dtype=bool))


# ---- diffuse irradiance and the Lambertian baseline ------------------------------------------------------------------

UP, DOWN, SIDE = [0.0, 0.0, 1.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]


def test_a_uniform_map_sends_pi_l_onto_any_normal():
    normals = RNG.normal(size=(50, 3))
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    irradiance = diffuse_irradiance(EnvMap.uniform((0.5, 1.0, 2.0)), normals)
    np.testing.assert_allclose(irradiance, np.pi * np.array([0.5, 1.0, 2.0])[None].repeat(50, 0), rtol=5e-3)


def test_an_upper_hemisphere_map_lights_up_down_and_sideways_as_the_cosine_law_says():
    pixels = np.zeros((64, 128, 3), np.float32)
    pixels[:32] = 2.0  # top rows: +Z
    e_up, e_down, e_side = diffuse_irradiance(EnvMap.from_array(pixels), np.array([UP, DOWN, SIDE]))[:, 0]
    assert e_up == pytest.approx(2 * np.pi, rel=5e-3)
    assert e_down == pytest.approx(0.0, abs=1e-9)
    assert e_side == pytest.approx(np.pi, rel=5e-3)


def test_the_lambertian_baseline_of_white_under_a_uniform_map_is_l():
    normals = np.zeros((4, 5, 3))
    normals[..., 2] = 1.0
    normals[0, 0] = [0.0, 0.6, -0.8]
    radiance = lambertian_radiance(EnvMap.uniform(0.7), np.ones((4, 5, 3)), normals)
    np.testing.assert_allclose(radiance, 0.7, rtol=5e-3)
    assert not lambertian_radiance(EnvMap.uniform(0.7), np.ones((1, 3)), np.zeros((1, 3))).any()  # no surface


# ---- the whole evaluation ------------------------------------------------------------------------------------------

@pytest.mark.cycles
@pytest.mark.timeout(300)
def test_eval_reports_every_method_and_metric_on_a_tiny_dataset(tmp_path):
    pytest.importorskip("bpy")
    from near_engine.cli import main
    from near_engine.configs import random_weights, save_networks
    from near_engine.datagen.dataset import DatagenConfig, load_object, run_datagen
    from near_engine.cycles.settings import RenderSettings

    data = tmp_path / "data"
    config = DatagenConfig(objects=10, views=2, hdri_views=2, hdris_per_object=1, seed=3,
                           render=RenderSettings(size=24, samples=4))
    assert run_datagen(data, config, shard=(9, 10), log=lambda *_: None)["rendered"] == ["00009"]  # validation
    renderer = tmp_path / "renderer"
    networks = random_weights("near-tiny-train", seed=0)
    save_networks(renderer, networks, "near-tiny-train", {"light_size": 64})
    # random weights with a lift regressor at its step-0 state: plumbing, so the lift rows run too
    from near_engine.checkpoints import read_model_entry
    from near_engine.frame import DEFAULT_MATERIAL
    from near_engine.lift.regressor import init_from_encoder
    from near_engine.train.lift import export_lift

    args = read_model_entry("encoder", renderer / "encoder").args
    weights = tmp_path / "weights"
    export_lift(weights, renderer, init_from_encoder(networks["image_features"], networks["encoder"], args,
                                                     DEFAULT_MATERIAL), args, {"test": True})
    report_path = tmp_path / "reports" / "report.md"  # a folder that does not exist yet is made first
    assert main(["eval", "--data", str(data), "--weights", str(weights), "-o", str(report_path)]) == 0

    report = json.loads(report_path.with_suffix(".json").read_text())
    text = report_path.read_text()
    columns = [c for c in COLUMNS if metrics.flip_available() or not c.startswith("flip")]
    assert report["objects"] == ["00009"] and report["hdris"] == ["city", "night"] and report["samples"] == 4
    assert list(report["table"]) == list(METHODS)
    for method, label in METHODS.items():
        assert list(report["table"][method]) == columns and label in text
        assert all(math.isfinite(v) for v in report["table"][method].values())
    assert all(COLUMNS[c] in text for c in columns)
    assert ("not installed" in text) != metrics.flip_available()

    # the single-image tasks: a photo per held-out HDRI, the same view under it, the other view under the other HDRI
    from near_engine.eval.lift_tasks import LIFT_METHODS, LIFT_TASKS

    lift = report["lift"]
    assert list(lift["table"]) == list(LIFT_TASKS) and "Single-image lift" in text
    assert len([r for r in lift["records"] if r["task"] == "reconstruction"]) == 2
    assert {(r["photo_hdri"], r["hdri"]) for r in lift["records"] if r["task"] == "relighting"} == {
        ("city", "night"), ("night", "city")}
    for rows in lift["table"].values():
        assert list(rows) == list(LIFT_METHODS)
        assert all(math.isfinite(v) for row in rows.values() for v in row.values())
    assert lift["geometry_iou"]["mesh"] == [1.0] and 0.0 <= lift["geometry_iou"]["inflate"][0] < 1.0

    # the baked-light baseline, computed directly: uniform-lit image vs the Cycles image, both over the HDRI
    from near_engine.blender_data import blender_hdri
    from near_engine.eval.tasks import _camera

    obj = load_object(data / "objects" / "00009")
    expected = []
    for index, light in enumerate(obj["meta"]["lights"]):
        if light["kind"] == "hdri" and light["hdri"] in ("city", "night"):
            env = EnvMap.read(blender_hdri(light["hdri"]), rotation_z=light["rotation_z"], strength=light["strength"])
            for k, view in enumerate(int(v) for v in obj["lit_views"]):
                bg = env.background(_camera(obj["meta"]["cameras"][view]))
                truth, baked = obj["lit_rgba"][index, k], obj["rgba"][view]
                over = [linear_to_srgb(x[..., :3] + (1 - x[..., 3:]) * bg) for x in (truth, baked)]
                expected.append(metrics.psnr(*over))
    assert report["table"]["baked_light"]["psnr_full"] == pytest.approx(np.mean(expected), rel=1e-9)

    # A subset of the rows (the input ablation scores one row per decoder): the same numbers as the full run.
    from near_engine.errors import NearError
    from near_engine.eval.tasks import Model, evaluate_object, summarize

    model = Model.load(weights, "cpu")
    subset = evaluate_object(model, data / "objects" / "00009", ["city", "night"], with_flip=metrics.flip_available(),
                             methods=["baked_light"])
    assert [list(r["scores"]) for r in subset] == [["baked_light"]] * 4
    assert summarize(subset)["baked_light"] == pytest.approx(report["table"]["baked_light"], rel=1e-9)
    with pytest.raises(NearError, match="shades the passes"):
        evaluate_object(model, data / "objects" / "00009", ["city"], methods=["lambertian"])
    with pytest.raises(NearError, match="must be among"):
        evaluate_object(model, data / "objects" / "00009", ["city"], methods=["nothing"])


def test_the_lift_photo_is_the_view_nearest_a_photographers_eye():
    """The single-image tasks photograph each object from the relit view nearest 15 degrees above it, not from
    the data set's lowest view."""
    from near_engine.eval.lift_tasks import photo_index

    cameras = [Camera.orbit(30.0 * k, elevation, 2.0, width=8, height=8)
               for k, elevation in enumerate((-70.0, -35.0, -12.0, 11.0, 36.0, 66.0))]
    assert photo_index(cameras) == 3
    assert photo_index(cameras[:3]) == 2  # none above: the highest
