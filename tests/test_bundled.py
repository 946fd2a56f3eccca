"""The near-tiny weights and the sample object that ship inside near_engine.

The quality check compares with Cycles: the bundled vase (never in training) encoded and relit by the shipped weights
against a Cycles render under a held-out HDRI, and against three things that must lose: the same networks untrained
(seeded random weights), an empty frame, and Cycles' own silhouette filled with a flat grey.
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
    decoder = pipeline.networks["decoder"]
    assert decoder.latent_channels == 8 + 6 and decoder.resolution == 64  # LH latent + material latents
    assert pipeline.pbr_core and pipeline.inputs == "lh+material"
    encoders, _ = load_networks("near-tiny", "cpu", keys=ENCODER_KEYS)
    assert set(encoders) == set(ENCODER_KEYS)
    assert sum(p.stat().st_size for p in folder.iterdir()) < 40 * MB  # the budget
    settings = json.loads((folder / "pipeline.json").read_text())
    assert settings["training"]["total_steps"] >= 200  # trained, and the folder says how long
    assert pipeline.light_size == settings["light_size"]


def test_weights_names_and_folders_are_checked(tmp_path):
    assert bundled.weights_folder(tmp_path) == tmp_path
    with pytest.raises(CheckpointError, match="not a weights folder"):
        bundled.weights_folder(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="no trained weights ship for 'near-official'"):
        NearPipeline.from_pretrained("near-official")


@pytest.mark.cycles
def test_shipped_weights_relight_the_vase_like_cycles(tmp_path):
    """Vase under the held-out city HDRI, 64 px: the trained near-tiny matches Cycles' silhouette and colours; an
    empty frame, a flat grey object with Cycles' own silhouette, and the untrained networks all score lower."""
    from near_engine.demo import WORLD_ROTATION_DEG, cycles_references, silhouette_iou, turntable_camera
    from near_engine.lift.mesh import encode_mesh

    camera = turntable_camera(30, 64)
    reference = cycles_references(bundled.SAMPLE_MESH, ["city"], camera, samples=8)["city"]
    env = EnvMap.read(blender_hdri("city"), rotation_z=math.radians(WORLD_ROTATION_DEG))
    background = env.background(camera)
    untrained = tmp_path / "untrained"
    save_networks(untrained, random_weights("near-tiny-train", seed=0), "near-tiny-train", {"light_size": 128})
    images = {}
    for name, weights in (("trained", "near-tiny"), ("untrained", untrained)):
        asset = encode_mesh(bundled.SAMPLE_MESH, weights, views=6, size=64, samples=4, log=lambda _: None)
        images[name] = NearPipeline.from_pretrained(weights, "cpu").render(
            Scene([(asset, np.eye(4))], env, camera, transparent=True))["combined"]
    images["empty"] = np.zeros_like(reference)
    alpha = reference[..., 3:]
    images["flat grey"] = np.concatenate([0.18 * alpha.repeat(3, -1), alpha], -1)
    results = {name: {"iou": silhouette_iou(reference[..., 3], image[..., 3]),
                      **score(reference, image, background, with_flip=False)} for name, image in images.items()}
    trained = results["trained"]
    assert trained["iou"] > 0.85 and trained["psnr_object"] > 16.0, results  # 17.9 dB when the weights shipped
    # measured when the weights shipped: trained 17.9, untrained 16.8 (the PBR core alone), flat grey 9.3, empty 8.4
    for other, margin in (("untrained", 0.7), ("empty", 5.0), ("flat grey", 5.0)):
        assert trained["psnr_object"] > results[other]["psnr_object"] + margin, (other, results)

