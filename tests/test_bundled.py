"""The near-tiny weights and the sample object that ship inside near_engine.

The quality check compares with Cycles: the bundled vase (never in training) encoded and relit by the shipped weights
against a Cycles render under a held-out HDRI, and against the same networks untrained.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from near_engine import bundled
from near_engine.blender_data import blender_hdri
from near_engine.configs import ENCODER_KEYS, load_networks, random_weights, save_networks
from near_engine.envmap import EnvMap
from near_engine.errors import CheckpointError
from near_engine.eval.tasks import score
from near_engine.pipeline import NearPipeline, Scene

MB = 1 << 20


def test_near_tiny_ships_complete_and_small():
    folder = bundled.weights_folder("near-tiny")
    pipeline = NearPipeline.from_pretrained("near-tiny", "cpu")
    assert pipeline.weights_id.startswith(str(folder))
    assert pipeline.networks["decoder"].latent_channels == 8 and pipeline.networks["decoder"].resolution == 64
    encoders, _ = load_networks("near-tiny", "cpu", keys=ENCODER_KEYS)
    assert set(encoders) == set(ENCODER_KEYS)
    assert sum(p.stat().st_size for p in folder.iterdir()) < 40 * MB  # the budget
    settings = json.loads((folder / "pipeline.json").read_text())
    assert settings["training"]["total_steps"] >= 1000  # trained, and the folder says how long
    assert pipeline.light_size == settings["light_size"]


def test_weights_names_and_folders_are_checked(tmp_path):
    assert bundled.weights_folder(tmp_path) == tmp_path
    with pytest.raises(CheckpointError, match="not a weights folder"):
        bundled.weights_folder(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="no trained weights ship for 'near-official'"):
        NearPipeline.from_pretrained("near-official")


@pytest.mark.cycles
def test_shipped_weights_beat_the_untrained_networks_against_cycles(tmp_path):
    """Vase under the held-out city HDRI, 64 px: the trained silhouette matches Cycles, the untrained one does not."""
    from near_engine.demo import WORLD_ROTATION_DEG, cycles_references, silhouette_iou, turntable_camera
    from near_engine.encode_mesh import encode_mesh

    camera = turntable_camera(30, 64)
    reference = cycles_references(bundled.SAMPLE_MESH, ["city"], camera, samples=8)["city"]
    env = EnvMap.read(blender_hdri("city"), rotation_z=math.radians(WORLD_ROTATION_DEG))
    untrained = tmp_path / "untrained"
    save_networks(untrained, random_weights("near-tiny-train", seed=0), "near-tiny-train", {"light_size": 128})
    results = {}
    for name, weights in (("trained", "near-tiny"), ("untrained", untrained)):
        asset = encode_mesh(bundled.SAMPLE_MESH, weights, views=6, size=64, samples=4, log=lambda _: None)
        image = NearPipeline.from_pretrained(weights, "cpu").render(Scene([(asset, np.eye(4))], env, camera,
                                                                          transparent=True))["combined"]
        results[name] = {"iou": silhouette_iou(reference[..., 3], image[..., 3]),
                         **score(reference, image, env.background(camera), with_flip=False)}
    assert results["trained"]["iou"] > 0.85 > results["untrained"]["iou"] + 0.15, results
    assert results["trained"]["psnr_full"] > results["untrained"]["psnr_full"] + 0.5, results
