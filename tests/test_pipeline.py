"""`NearPipeline`: scenes of several objects, the world light in each object's frame, caches, errors.

Every test uses `random_weights("near-tiny", seed)`: seeded, UNTRAINED networks (they render noise). The tests check
wiring, caching, transforms and invariances, never image quality.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from near_engine.asset import Asset
from near_engine.camera import Camera
from near_engine.configs import random_weights, save_networks
from near_engine.envmap import EnvMap, rotation_z_matrix
from near_engine.errors import CheckpointError, NearError
from near_engine.pipeline import PASSES, NearPipeline, Scene, object_light_rotation

WIDTH, HEIGHT, LIGHT_SIZE = 48, 40, 64


@pytest.fixture(scope="module")
def networks():
    return random_weights("near-tiny", seed=3)


def _asset(seed: int) -> Asset:
    """About 300 voxels in a blob around the grid centre, with random latents."""
    g = torch.Generator().manual_seed(seed)
    coords = torch.unique(torch.randint(25, 39, (420, 3), generator=g), dim=0)[:300]
    return Asset(coords.numpy(), torch.randn(coords.shape[0], 8, generator=g).numpy())


def _env(seed: int, **kwargs) -> EnvMap:
    rng = np.random.default_rng(seed)
    return EnvMap.from_array((rng.random((16, 32, 3)) * 3).astype(np.float32), **kwargs)


def _camera(eye=(1.6, -1.4, 0.8)) -> Camera:
    return Camera.look_at(np.array(eye), np.zeros(3), width=WIDTH, height=HEIGHT, fov_x_deg=50.0)


def _matrix(yaw_deg: float = 0.0, translation=(0.0, 0.0, 0.0), scale: float = 1.0) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = rotation_z_matrix(math.radians(yaw_deg)) * scale
    m[:3, 3] = translation
    return m


def _pipeline(networks, weights_id: str = "w0") -> NearPipeline:
    return NearPipeline(networks, weights_id, "cpu", light_size=LIGHT_SIZE)


@pytest.fixture(scope="module")
def assets():
    return _asset(0), _asset(1)


@pytest.fixture(scope="module")
def two_objects(assets):
    return [(assets[0], _matrix(30.0, (0.0, -0.45, 0.0), 0.9)), (assets[1], _matrix(-70.0, (0.1, 0.45, 0.1)))]


def _counts(pipeline: NearPipeline) -> tuple[int, int, int, int]:
    return (pipeline.iad_cache.hits, pipeline.iad_cache.misses, pipeline.light_cache.hits,
            pipeline.light_cache.misses)


def test_object_light_rotation_matches_envmap_sampling() -> None:
    """An object turned by yaw phi receives, along its own direction d, what the world sends along Rz(phi) d."""
    rng = np.random.default_rng(0)
    image = (rng.random((32, 64, 3)) * 2).astype(np.float32)
    directions = rng.normal(size=(200, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    theta = 0.7
    for yaw in (0.0, 35.0, -120.0, 200.0):
        m = _matrix(yaw, (1.0, -2.0, 0.5), 1.7)
        world = EnvMap.from_array(image, rotation_z=theta).sample(directions @ m[:3, :3].T / 1.7)
        seen = EnvMap.from_array(image, rotation_z=object_light_rotation(theta, m)).sample(directions)
        np.testing.assert_allclose(seen, world, rtol=1e-4, atol=1e-5)


def test_cached_render_equals_uncached(networks, two_objects) -> None:
    scene = Scene(two_objects, _env(1, rotation_z=0.4), _camera())
    pipeline = _pipeline(networks)
    first = pipeline.render(scene, PASSES)
    assert _counts(pipeline) == (0, 2, 0, 2)
    again = pipeline.render(scene, PASSES)
    assert _counts(pipeline) == (2, 2, 2, 2)  # nothing recomputed but the frame
    fresh = _pipeline(networks).render(scene, PASSES)
    assert set(first) == set(PASSES)
    for name in PASSES:
        assert again[name].dtype == np.float32 and again[name].shape[:2] == (HEIGHT, WIDTH)
        np.testing.assert_array_equal(again[name], fresh[name])
        np.testing.assert_array_equal(first[name], fresh[name])


def test_caches_invalidate_exactly(networks, assets) -> None:
    a, b = assets
    env, camera = _env(1), _camera()
    pipeline = _pipeline(networks)
    pipeline.render(Scene([(a, np.eye(4))], env, camera))
    assert _counts(pipeline) == (0, 1, 0, 1)
    pipeline.render(Scene([(a, np.eye(4))], _env(2), camera))  # another image: light only
    assert _counts(pipeline) == (1, 1, 0, 2)
    pipeline.render(Scene([(a, np.eye(4))], env.with_settings(strength=2.0), camera))  # strength: a hit (scaled after)
    assert _counts(pipeline) == (2, 1, 1, 2)
    pipeline.render(Scene([(a, _matrix(40.0))], env, camera))  # object turned: light seen at another rotation
    assert _counts(pipeline) == (3, 1, 1, 3)
    pipeline.render(Scene([(b, np.eye(4))], env, camera))  # another asset: IAD only
    assert _counts(pipeline) == (3, 2, 2, 3)
    pipeline.render(Scene([(a, np.eye(4))], EnvMap.from_array(env.pixels.copy()), camera))  # same content: hit
    assert _counts(pipeline) == (4, 2, 3, 3)
    pipeline.set_networks(random_weights("near-tiny", seed=4), "w1")  # other weights: both
    scene = Scene([(a, np.eye(4))], env, camera)
    cached = pipeline.render(scene)
    assert _counts(pipeline) == (4, 3, 3, 4)
    fresh = _pipeline(random_weights("near-tiny", seed=4), "w1").render(scene)
    np.testing.assert_array_equal(cached["combined"], fresh["combined"])


def test_rotating_everything_together_changes_nothing(networks, two_objects) -> None:
    """Camera, both objects and the world light turned together about Z by 90 degrees: the same image.

    Each object sees the same light rotation (theta - a) + (phi + a) and the same camera position in its asset space
    (up to float64 rounding), so the networks get the same inputs; only the float32 Gaussian means, their projection
    and the compositing order of nearly coincident depths are computed on different numbers. 1e-4 (relative to
    radiance and depths of order 1) bounds that rounding with margin while any real error (a wrong sign of the light
    rotation, a missing transform) changes pixels by order 0.1 or more.
    """
    a = math.radians(90.0)
    turn = _matrix(90.0)
    env, camera = _env(1, rotation_z=0.3), _camera()
    turned_camera = camera.with_world_to_camera(camera.world_to_camera @ np.linalg.inv(turn))
    turned = Scene([(asset, turn @ m) for asset, m in two_objects], env.with_settings(rotation_z=0.3 - a),
                   turned_camera)
    pipeline = _pipeline(networks)
    passes = ("combined", "depth", "alpha", "base_color", "shadow", "normal")
    before = pipeline.render(Scene(two_objects, env, camera), passes)
    after = pipeline.render(turned, passes)
    assert before["alpha"].max() > 0.5
    for name in ("combined", "alpha", "base_color", "shadow"):
        np.testing.assert_allclose(after[name], before[name], atol=1e-4, err_msg=name)
    covered = before["alpha"][..., 0] > 0.5
    np.testing.assert_allclose(after["depth"][covered], before["depth"][covered], rtol=1e-4)
    # the normal pass is world-space: it turns with the world
    np.testing.assert_allclose(after["normal"], before["normal"] @ turn[:3, :3].T, atol=1e-4)

    wrong = pipeline.render(Scene(turned.objects, env.with_settings(rotation_z=0.3 + a), turned_camera))
    assert np.abs(wrong["combined"] - before["combined"]).max() > 1e-2  # the light's sign matters


def test_two_objects_render_together(networks, two_objects) -> None:
    env, camera = _env(1), _camera()
    pipeline = _pipeline(networks)
    both = pipeline.render(Scene(two_objects, env, camera), ("alpha", "depth"))["alpha"][..., 0]
    alone = [pipeline.render(Scene([obj], env, camera), ("alpha",))["alpha"][..., 0] for obj in two_objects]
    assert np.all(both >= np.maximum(*alone) - 1e-5)
    masks = [x > 0.5 for x in alone]
    assert all(m.any() for m in masks) and not np.array_equal(masks[0], masks[1])
    union = both > 0.5
    for mask in masks:
        assert np.all(union[mask]) and union.sum() > mask.sum()


def test_transparent_film(networks, two_objects) -> None:
    env, camera = _env(1), _camera()
    pipeline = _pipeline(networks)
    opaque = pipeline.render(Scene(two_objects, env, camera))["combined"]
    clear = pipeline.render(Scene(two_objects, env, camera, transparent=True))["combined"]
    np.testing.assert_array_equal(opaque[..., 3], 1.0)
    background = clear[..., 3] < 1e-3
    assert background.any() and (clear[..., 3] > 0.5).any()
    np.testing.assert_allclose(clear[background][:, :3], 0.0, atol=1e-3)  # no object there: no lit colour
    expected = clear[..., :3] + (1.0 - clear[..., 3:]) * env.background(camera)
    np.testing.assert_allclose(opaque[..., :3], expected, rtol=1e-5, atol=1e-5)


def test_clear_errors(networks, assets) -> None:
    pipeline = _pipeline(networks)
    scene = Scene([(assets[0], np.eye(4))], _env(1), _camera())
    with pytest.raises(NearError, match="unknown render pass.*'glossy'.*available: combined"):
        pipeline.render(scene, ("combined", "glossy"))
    with pytest.raises(NearError, match="none requested"):
        pipeline.render(scene, ())
    bad = Asset(np.array([[1, 2, 3]], np.int32), np.zeros((1, 16), np.float32))
    with pytest.raises(NearError, match="16 latent channels.*expect 8 channels"):
        pipeline.render(Scene([(bad, np.eye(4))], scene.envmap, scene.camera))
    with pytest.raises(NearError, match="invertible 4x4"):
        pipeline.render(Scene([(assets[0], np.zeros((4, 4)))], _env(1), _camera()))
    for matrix in (np.diag([1.0, 2.0, 1.0, 1.0]), np.diag([-1.0, 1.0, 1.0, 1.0])):
        with pytest.raises(NearError, match="not mirrored, sheared or scaled unevenly"):
            pipeline.render(Scene([(assets[0], matrix)], _env(1), _camera()))
    with pytest.raises(CheckpointError, match="no trained weights ship for 'near-official'"):
        NearPipeline.from_pretrained("near-official")
    with pytest.raises(CheckpointError, match="not a weights folder"):
        NearPipeline.from_pretrained("/nonexistent/weights")


def test_from_pretrained_folder_renders_like_the_networks(networks, assets, tmp_path) -> None:
    save_networks(tmp_path, networks, "near-tiny", {"gaussians": "surfels"})
    automatic = NearPipeline.from_pretrained(tmp_path, light_size=LIGHT_SIZE)
    assert automatic.device == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loaded = NearPipeline.from_pretrained(tmp_path, "cpu", light_size=LIGHT_SIZE)  # compared on the same device
    scene = Scene([(assets[0], np.eye(4))], _env(1), _camera())
    np.testing.assert_array_equal(loaded.render(scene)["combined"], _pipeline(networks).render(scene)["combined"])


def test_weights_from_before_surfels_place_their_gaussians_over_the_voxels(networks, assets, tmp_path) -> None:
    """A weights folder whose pipeline.json does not say its Gaussians start at surfels was trained with them spread
    over the voxels, and renders that way (the same networks placed at surfels draw another image)."""
    save_networks(tmp_path, networks, "near-tiny")
    older = NearPipeline.from_pretrained(tmp_path, "cpu", light_size=LIGHT_SIZE)
    assert older.placement == "voxels" and _pipeline(networks).placement == "surfels"
    scene = Scene([(assets[0], np.eye(4))], _env(1), _camera())
    assert np.abs(older.render(scene)["combined"] - _pipeline(networks).render(scene)["combined"]).max() > 1e-3


def test_scene_without_objects_renders_the_world(networks) -> None:
    env, camera = _env(2), _camera()
    out = _pipeline(networks).render(Scene([], env, camera), ("combined", "depth", "alpha", "normal"))
    np.testing.assert_array_equal(out["combined"][..., :3], env.background(camera))
    assert (out["combined"][..., 3] == 1).all() and (out["alpha"] == 0).all() and (out["normal"] == 0).all()
    assert (out["depth"] == 1e10).all() and out["normal"].shape == (HEIGHT, WIDTH, 3)
    clear = _pipeline(networks).render(Scene([], env, camera, transparent=True))
    assert (clear["combined"] == 0).all()


def test_progress_reports_and_can_cancel(networks, assets) -> None:
    scene = Scene([(assets[0], np.eye(4)), (assets[1], _matrix(30.0, (0.3, 0.0, 0.0)))], _env(1), _camera())
    seen = []
    _pipeline(networks).render(scene, progress=seen.append)
    assert seen == pytest.approx([1 / 3, 2 / 3])

    class Stop(Exception):
        pass

    def cancel(fraction: float) -> None:
        raise Stop

    with pytest.raises(Stop):
        _pipeline(networks).render(scene, progress=cancel)


def test_world_strength_scales_the_radiance_exactly(networks, assets) -> None:
    """Light transport is linear: strength x2 doubles the object's colour and the background, without a new tokenizer
    run; the intrinsic passes do not change."""
    pipeline = _pipeline(networks)
    env = _env(1)
    scene = Scene([(assets[0], np.eye(4))], env, _camera())
    passes = ("combined", "base_color", "shadow")
    once = pipeline.render(scene, passes)
    misses = pipeline.light_cache.misses
    twice = pipeline.render(Scene(scene.objects, env.with_settings(strength=2.0), scene.camera), passes)
    assert pipeline.light_cache.misses == misses
    np.testing.assert_allclose(twice["combined"][..., :3], 2 * once["combined"][..., :3], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(twice["base_color"], once["base_color"])
    np.testing.assert_array_equal(twice["shadow"], once["shadow"])
    assert np.abs(once["combined"][..., :3]).max() > 0


def test_the_gaussians_are_rasterized_with_the_2d_filter_their_weights_were_trained_with(assets, tmp_path) -> None:
    """The renderer's representation config names its 2D low-pass (`2d_filter_kernel_size`: near-tiny 0.2, the
    official config 0.1); a weights folder saying another one renders another outline, and rendering the pipeline's
    own Gaussians with the filter written in the folder gives the pipeline's image."""
    from near_engine.configs import get_config
    from near_engine.frame import filter_2d, rasterize_passes
    from near_engine.models.gaussian_heads import RepresentationConfig

    official = get_config("near-official")["renderer"]["args"]["representation_config"]
    assert RepresentationConfig.from_official(official).filter_2d_kernel_size == 0.1
    scene = Scene([(assets[0], np.eye(4))], _env(1), _camera(), transparent=True)
    alphas = {}
    networks = random_weights("near-tiny", seed=3)
    assert filter_2d(networks) == 0.2
    for value in (0.1, 0.3):
        config = get_config("near-tiny")
        config["renderer"]["args"]["representation_config"]["2d_filter_kernel_size"] = value
        save_networks(tmp_path / str(value), networks, config, {"gaussians": "surfels"})
        pipeline = NearPipeline.from_pretrained(tmp_path / str(value), "cpu", light_size=LIGHT_SIZE)
        assert filter_2d(pipeline.networks) == value
        alphas[value] = pipeline.render(scene, ("alpha",))["alpha"]
        with torch.no_grad():
            by_hand = rasterize_passes(pipeline.gaussians(scene), scene.camera, filter_2d=value)["alpha"].numpy()
        np.testing.assert_array_equal(alphas[value], by_hand)
    assert np.abs(alphas[0.1] - alphas[0.3]).max() > 0.05
