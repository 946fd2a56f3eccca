"""The one pass table: every consumer agrees with it."""

from __future__ import annotations

import numpy as np
import pytest

from near_engine.camera import Camera
from near_engine.configs import random_weights
from near_engine.envmap import EnvMap
from near_engine.errors import NearError
from near_engine.passes import BLENDER_PASSES, BY_NAME, PASS_NAMES, PASSES, exr_channels
from near_engine.pipeline import PASSES as PIPELINE_PASSES
from near_engine.pipeline import NearPipeline, Scene


def test_table_is_consistent() -> None:
    assert len(set(PASS_NAMES)) == len(PASSES) and PASS_NAMES[0] == "combined"
    for p in PASSES:
        assert len(p.exr_letters) == p.channels, p.name
        assert p.source in ("combined", "alpha", "depth", "intrinsic", "lit"), p.name
        if p.blender_name:
            assert len(p.blender_letters) == p.channels and p.blender_type in ("COLOR", "VALUE", "VECTOR"), p.name
    layers = [p.exr_layer for p in PASSES]
    assert len(set(layers)) == len(layers)
    assert [p.name for p in BLENDER_PASSES] == ["depth", "base_color", "roughness", "metallic", "normal", "shadow"]
    assert PIPELINE_PASSES == PASS_NAMES


@pytest.fixture(scope="module")
def pipeline() -> NearPipeline:
    return NearPipeline(random_weights("near-tiny", seed=1), "random near-tiny", "cpu", light_size=32)


def test_every_pass_renders_with_the_table_width(pipeline: NearPipeline) -> None:
    from near_engine.asset import Asset

    rng = np.random.default_rng(0)
    coords = np.unique(rng.integers(28, 36, (200, 3)), axis=0).astype(np.int32)
    extras = {"base_color": rng.random((len(coords), 3)).astype(np.float32),
              "material": rng.random((len(coords), 3)).astype(np.float32)}
    asset = Asset(coords, rng.standard_normal((len(coords), 8)).astype(np.float32), extras)
    camera = Camera.look_at(np.array([1.2, -1.0, 0.6]), np.zeros(3), width=24, height=20, fov_x_deg=40.0)
    env = EnvMap.from_array(np.full((8, 16, 3), 0.5, np.float32))
    for scene in (Scene([(asset, np.eye(4))], env, camera), Scene([], env, camera)):  # objects, and the world alone
        images = pipeline.render(scene, PASS_NAMES)
        assert set(images) == set(PASS_NAMES)
        for name, image in images.items():
            assert image.shape == (20, 24, BY_NAME[name].channels), name
        channels = exr_channels(images)
        assert len(channels) == sum(p.channels for p in PASSES)
        assert np.array_equal(channels["Normal.Y"], images["normal"][..., 1])
    with pytest.raises(NearError, match="unknown render pass"):
        pipeline.render(Scene([], env, camera), ("combined", "glossiness"))
