"""Training near-tiny on a real (tiny) Cycles data set: overfitting, exact resume, DDP on 2 CPU processes, export."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("bpy")

from near_engine.asset import Asset  # noqa: E402
from near_engine.camera import Camera  # noqa: E402
from near_engine.configs import ENCODER_KEYS, NETWORK_KEYS, tiny_config, tiny_encoder_config  # noqa: E402
from near_engine.datagen.dataset import DatagenConfig, run_datagen  # noqa: E402
from near_engine.cycles.settings import RenderSettings  # noqa: E402
from near_engine.envmap import EnvMap  # noqa: E402
from near_engine.errors import NearError  # noqa: E402
from near_engine.pipeline import NearPipeline, Scene  # noqa: E402
from near_engine.train.data import Sample, TrainObject, list_objects, load_training_object  # noqa: E402
from near_engine.lift.encode import encode_views  # noqa: E402
from near_engine.train.losses import LossWeights  # noqa: E402
from near_engine.train.loop import TrainConfig, Trainer  # noqa: E402
from train_ddp_worker import ddp_worker, free_port, params  # noqa: E402

pytestmark = [pytest.mark.cycles, pytest.mark.timeout(300)]

RES, SIZE = 16, 16
# One object, 3 uniform views (2 of them also lit by one training HDRI), 32 px renders trained at 16 px.
DATA = DatagenConfig(objects=1, views=3, hdri_views=2, hdris_per_object=1, skies_per_object=0, seed=7,
                     render=RenderSettings(size=32, samples=2, denoise=False))


def _network_config() -> dict:
    config = {**tiny_config(width=16, iad_blocks=1, lad_blocks=1, num_gaussians=4, num_tokens=16),
              **tiny_encoder_config(width=16, blocks=1, feature_channels=8, resolution=RES)}
    for key in ("decoder", "renderer"):
        config[key]["args"]["resolution"] = RES
    return config


CONFIG = TrainConfig(steps=8, lr=3e-3, warmup=2, size=SIZE, light_size=32, seed=3, network_config=_network_config(),
                     images_per_step=3, uniform_images=1)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train_data")
    assert run_datagen(out, DATA, log=lambda *_: None)["rendered"] == ["00000"]
    return out


@pytest.fixture(scope="module")
def obj(data_dir) -> TrainObject:
    (folder,) = list_objects(data_dir, "train")
    o = load_training_object(folder, SIZE, RES)
    assert o.rgba.shape == (3, SIZE, SIZE, 4) and len(o.lights) == 1 and o.lit_views == [0, 2]
    assert o.lit_rgba.shape == (1, 2, SIZE, SIZE, 4) and o.cameras[0].width == SIZE
    # the material latents lifted from the G-buffers are the recipe's (constant per object; the base colour may be a
    # procedural texture, so only its range is checked)
    recipe = json.loads((folder / "meta.json").read_text())["recipe"]["material"]
    assert o.materials.shape == (len(o.coords), 6)
    assert np.allclose(np.median(o.materials[:, 3:], axis=0), [recipe["roughness"], recipe["metallic"],
                                                                recipe["specular"]], atol=0.02)
    assert 0 <= o.materials[:, :3].min() and o.materials[:, :3].max() <= 1
    return o


def _params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return params(trainer)


def test_a_few_steps_overfit_one_view(obj):
    trainer = Trainer(CONFIG, [obj])
    sample = [Sample(obj, 0, 0)]
    losses = [trainer.train_step(sample)["loss"] for _ in range(8)]
    assert all(np.isfinite(losses))
    assert min(losses[5:]) < 0.9 * losses[0], losses


def test_resume_repeats_an_uninterrupted_run_exactly(obj, tmp_path):
    whole = Trainer(CONFIG, [obj])
    expected = [whole.train_step()["loss"] for _ in range(3)]
    first = Trainer(CONFIG, [obj])
    first.train_step(), first.train_step()
    first.save_checkpoint(tmp_path / "checkpoint.pt")
    resumed = Trainer(CONFIG, [obj])
    resumed.load_checkpoint(tmp_path / "checkpoint.pt")
    assert resumed.step == 2 and resumed.scheduler.last_epoch == 2
    assert resumed.train_step()["loss"] == pytest.approx(expected[2], rel=1e-5)  # same images, same networks
    a, b = _params(whole), _params(resumed)
    # the loss above repeats to float32 rounding (exactly, but in 1 run of 5 here); the parameters after the resumed
    # update agree to float32 rounding, as Adam
    # scales it: a reduction's thread order can differ between runs, and a gradient that is zero in exact arithmetic
    # (an attention key's bias: softmax ignores it) is then rounding noise that Adam normalizes into a step of a few
    # 1e-6 (measured: 2.4e-6, 1 run in 3). A resume that lost the optimizer's or the scheduler's state moves every
    # parameter by about the learning rate (3e-3).
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=2e-5) for k in a)
    assert any(not torch.equal(a[k], _params(Trainer(CONFIG, [obj]))[k]) for k in a)  # training moved them


def test_ddp_on_two_cpu_processes_matches_one_process_on_both_samples(obj, data_dir, tmp_path, blender_hdri_dir):
    folder = str(list_objects(data_dir, "train")[0])
    args = (free_port(), folder, str(tmp_path), CONFIG, SIZE, RES, str(blender_hdri_dir))
    torch.multiprocessing.spawn(ddp_worker, args=args, nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(r0["params"][k], r1["params"][k]) for k in r0["params"])
    single = Trainer(CONFIG, [obj])
    start = _params(single)
    single.train_step([Sample(obj, 0, 0), Sample(obj, 0, 1)])  # the two ranks' samples in one batch
    grads = {n: p.grad for n, p in single.model.named_parameters() if p.grad is not None}
    assert grads.keys() == r0["grads"].keys()
    # DDP averages the two ranks' gradients: one process on both samples, up to float32 rounding. Compared as one
    # vector: single tensors whose gradients nearly cancel (the tokenizer's q/k projections) differ by more, because
    # the workers run 1 thread and the parent several, and rounding differences grow layer by layer.
    flat = torch.cat([g.flatten() for g in grads.values()])
    assert float((torch.cat([r0["grads"][n].flatten() for n in grads]) - flat).norm() / flat.norm()) < 2e-2
    assert float(flat.norm()) > 0
    assert any(not torch.equal(r0["params"][k], start[k]) for k in start)


def test_exported_weights_load_and_render(obj, tmp_path):
    trainer = Trainer(CONFIG, [obj])
    trainer.train_step()
    trainer.export(tmp_path / "weights")
    pipeline = NearPipeline.from_pretrained(tmp_path / "weights", "cpu")
    assert set(pipeline.networks) == set(NETWORK_KEYS) and pipeline.light_size == CONFIG.light_size
    with torch.no_grad():
        latent = encode_views(trainer.networks, obj.coords, obj.rgba, obj.cameras, obj.depth, RES)
    asset = Asset(obj.coords, latent.numpy(), resolution=RES)
    camera = Camera.orbit(30.0, 20.0, 2.0, width=16, height=16, fov_x_deg=40.0)
    images = pipeline.render(Scene([(asset, np.eye(4))], EnvMap.uniform(1.0), camera, transparent=True),
                             ("combined", "alpha"))
    assert images["combined"].shape == (16, 16, 4) and np.isfinite(images["combined"]).all()
    assert images["alpha"].max() > 0.1  # the object shows up
    saved = set(trainer.networks)
    assert saved == set(NETWORK_KEYS) | set(ENCODER_KEYS)


def test_init_from_weights_and_checkpoints_from_before_exposure(obj, tmp_path):
    trained = Trainer(CONFIG, [obj])
    trained.train_step()
    trained.export(tmp_path / "weights")
    tuned = Trainer(replace(CONFIG, weights=LossWeights(exposure=2.0)), [obj])
    # Other run settings, same networks: every tensor loads; a fresh optimizer and schedule.
    assert tuned.init_networks(tmp_path / "weights") == []
    tuned.export(tmp_path / "tuned")  # its note says where it started, and counts the steps of both runs
    note = json.loads((tmp_path / "tuned" / "pipeline.json").read_text())["training"]
    assert note["steps"] == 0 and note["total_steps"] == 1 and note["started_from"]["training"]["steps"] == 1
    a, b = _params(trained), _params(tuned)
    assert all(torch.equal(a[k], b[k]) for k in a) and tuned.step == 0
    # A changed network (a wider image-feature CNN) keeps its own fresh tensors where shapes differ, loads the rest.
    wider = _network_config()
    wider["image_features"]["args"]["hidden_channels"] = 48
    changed = Trainer(replace(CONFIG, network_config=wider), [obj])
    fresh = _params(changed)
    skipped = changed.init_networks(tmp_path / "weights")
    assert skipped and all(name.startswith("image_features.") for name in skipped)
    after = _params(changed)
    for name in after:
        assert torch.equal(after[name], (fresh if name in skipped else a)[name]), name
    # A checkpoint written before LossWeights had `exposure` resumes under exposure 1 (the loss it trained with), not
    # under today's default.
    trained.save_checkpoint(tmp_path / "checkpoint.pt")
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    old = json.loads(state["config"])
    del old["weights"]["exposure"]
    torch.save({**state, "config": json.dumps(old)}, tmp_path / "old.pt")
    resumed = Trainer(replace(CONFIG, weights=replace(CONFIG.weights, exposure=1.0)), [obj])
    resumed.load_checkpoint(tmp_path / "old.pt")
    assert resumed.step == 1 and resumed.started_from is None
    with pytest.raises(NearError, match="other settings"):
        tuned.load_checkpoint(tmp_path / "old.pt")


def test_frozen_networks_stay_as_loaded_and_weights_from_before_surfels_restart_their_geometry(obj, tmp_path):
    """`--freeze encoder` keeps the LH latent a lift was trained on; weights whose pipeline.json does not say their
    Gaussians start at surfels restart the LAD's geometry rows at zero when a run starts from them."""
    trained = Trainer(CONFIG, [obj])
    trained.train_step()
    trained.export(tmp_path / "weights")
    assert json.loads((tmp_path / "weights" / "pipeline.json").read_text())["gaussians"] == "surfels"
    frozen = Trainer(replace(CONFIG, frozen=("image_features", "encoder")), [obj])
    assert frozen.init_networks(tmp_path / "weights") == []  # surfel weights: nothing restarted
    before = _params(frozen)
    frozen.train_step()
    after = _params(frozen)
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(("encoder.", "image_features.")))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("renderer."))
    with pytest.raises(NearError, match="cannot freeze"):
        replace(CONFIG, frozen=("everything",))
    # The input ablation's start: the encoder as trained, the renderer networks fresh; no steps carried over.
    part = Trainer(CONFIG, [obj])
    fresh, loaded = _params(part), _params(trained)
    assert part.init_networks(tmp_path / "weights", keys=("image_features", "encoder")) == []
    now = _params(part)
    assert all(torch.equal(now[k], (loaded if k.startswith(("encoder.", "image_features.")) else fresh)[k])
               for k in now)
    assert any(not torch.equal(fresh[k], loaded[k]) for k in now if k.startswith("encoder."))
    part.export(tmp_path / "part")
    note = json.loads((tmp_path / "part" / "pipeline.json").read_text())["training"]
    assert note["total_steps"] == 0 and note["started_from"]["networks"] == ["image_features", "encoder"]
    with pytest.raises(NearError, match="no network named"):
        part.init_networks(tmp_path / "weights", keys=("everything",))
    settings = json.loads((tmp_path / "weights" / "pipeline.json").read_text())
    del settings["gaussians"]  # as the weights before surfels wrote it
    (tmp_path / "weights" / "pipeline.json").write_text(json.dumps(settings))
    older = Trainer(CONFIG, [obj])
    assert any("restarted" in name for name in older.init_networks(tmp_path / "weights"))
    xyz = older.networks["renderer"].gs_out_layer[-1].weight[:3 * older.networks["renderer"].num_gaussians]
    assert not xyz.abs().sum()


def test_exposure_scales_inside_the_log():
    from near_engine.train.losses import stage2_losses

    rng = torch.Generator().manual_seed(0)
    color, target = torch.rand(8, 8, 3, generator=rng) * 0.3, torch.rand(8, 8, 3, generator=rng) * 0.3
    alpha = torch.ones(8, 8, 1)
    passes = {"color": color, "lit_alpha": alpha, "alpha": alpha, "base_color": color, "roughness": alpha,
              "metallic": alpha, "normal": torch.nn.functional.normalize(torch.ones(8, 8, 3), dim=-1)}
    gbuffers = {"base_color": color, "roughness": alpha, "metallic": alpha, "normal": passes["normal"]}

    class Frame:  # the regularizers' inputs: unit scales and opacities
        intrinsic = lit = type("G", (), {"scales": torch.ones(4, 3), "opacities": torch.ones(4)})

    for exposure in (1.0, 4.0):
        l1 = stage2_losses(passes, Frame, target, alpha, gbuffers, LossWeights(exposure=exposure))["l1"]
        expected = (torch.log1p(exposure * color) - torch.log1p(exposure * target)).abs().mean()
        torch.testing.assert_close(l1, expected)


def test_the_colour_loss_sees_the_outline_over_the_lights_background():
    """A silhouette a pixel too wide shows the object where the sky should be: over a bright background the L1 term
    counts it at the sky's brightness (independently computed here), over none it costs only the object's own
    colour; a prediction equal to the target costs nothing either way."""
    from near_engine.train.losses import stage2_losses

    target_alpha = torch.zeros(8, 8, 1)
    target_alpha[2:6, 2:6] = 1.0
    wide_alpha = torch.zeros(8, 8, 1)
    wide_alpha[1:7, 1:7] = 1.0
    colour = torch.full((8, 8, 3), 0.05)
    sky = torch.full((8, 8, 3), 3.0)
    normal = torch.nn.functional.normalize(torch.ones(8, 8, 3), dim=-1)
    gbuffers = {"base_color": colour, "roughness": target_alpha, "metallic": target_alpha, "normal": normal}

    class Frame:
        intrinsic = lit = type("G", (), {"scales": torch.ones(4, 3), "opacities": torch.ones(4)})

    def l1(alpha, background):
        passes = {"color": colour * alpha, "lit_alpha": alpha, "alpha": alpha, "base_color": colour,
                  "roughness": alpha, "metallic": alpha, "normal": normal}
        return float(stage2_losses(passes, Frame, colour * target_alpha, target_alpha, gbuffers,
                                   LossWeights(exposure=1.0), background)["l1"])

    ring = 36 - 16  # pixels the wide silhouette adds, each showing 0.05 where the target shows the sky's 3.0
    expected = ring * 3 * (math.log1p(3.0) - math.log1p(0.05)) / (8 * 8 * 3)
    assert l1(wide_alpha, sky) == pytest.approx(expected, rel=1e-5)
    assert l1(wide_alpha, None) == pytest.approx(ring * 3 * math.log1p(0.05) / (8 * 8 * 3), rel=1e-5)
    assert l1(target_alpha, sky) == 0.0 and l1(target_alpha, None) == 0.0


def test_encode_views_is_differentiable_and_follows_voxel_order(obj):
    networks = Trainer(CONFIG, [obj]).networks
    latent = encode_views(networks, obj.coords, obj.rgba, obj.cameras, obj.depth, RES)
    assert latent.shape == (len(obj.coords), 8)
    latent.square().mean().backward()
    for key in ENCODER_KEYS:
        grads = [p.grad for p in networks[key].parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), key
        assert sum(float(g.abs().sum()) for g in grads) > 0, key
    perm = np.random.default_rng(0).permutation(len(obj.coords))
    with torch.no_grad():
        shuffled = encode_views(networks, obj.coords[perm], obj.rgba, obj.cameras, obj.depth, RES)
    torch.testing.assert_close(shuffled, latent.detach()[perm], rtol=1e-4, atol=1e-5)


def test_lift_photos_are_exposed_and_white_balanced_by_their_own_light(data_dir):
    """`near train-lift`'s photos are exposed and white-balanced as a camera does it: each render divided, channel by
    channel, by the mean radiance of the light it was rendered under, read here from the object's meta.json and the
    HDRI itself, independently of the training's light records; the uniform world's is its strength in every
    channel (a white diffuse card under it reads 0.6)."""
    from near_engine.blender_data import blender_hdri
    from near_engine.bundled import weights_folder
    from near_engine.configs import load_networks
    from near_engine.cycles.lights import UNIFORM_STRENGTH
    from near_engine.datagen.dataset import load_object
    from near_engine.lift import LIFT_SIZE
    from near_engine.lift.image import crop_object
    from near_engine.train.lift import load_lift_object

    (folder,) = list_objects(data_dir, "train")
    encoders, _ = load_networks(weights_folder("near-tiny"), "cpu", keys=ENCODER_KEYS)
    lifted = load_lift_object(folder, encoders, 64, size=32)
    data = load_object(folder)
    (light,) = data["meta"]["lights"]
    white = np.asarray(EnvMap.read(blender_hdri(light["hdri"]), strength=light["strength"]).mean_radiance())
    assert (0.1 < white).all() and (white < 3.0).all() and np.ptp(white) > 0.01  # a coloured light
    expected = [data["lit_rgba"][0, k] for k in range(2)] + [data["rgba"][v] for v in range(3)]
    whites = [white] * 2 + [np.full(3, UNIFORM_STRENGTH)] * 3
    assert lifted.lit_count == 2 and len(lifted.photos) == 5
    for (photo, _), render, card in zip(lifted.photos, expected, whites):
        exposed = render / np.append(card, 1.0).astype(np.float32)
        np.testing.assert_allclose(photo.numpy(), crop_object(exposed, LIFT_SIZE).rgba, atol=1e-5)


def test_the_lift_light_prior_is_what_the_training_lights_are_like(data_dir):
    """`near train-lift`'s light prior from a data set of one object under one HDRI: that HDRI's light, its
    spherical-harmonic terms summed here over the full-size map's texels (each texel's solid angle) and scaled to
    mean radiance 1; every turn of it about Z, so its x and y terms average to 0."""
    import math

    from near_engine.blender_data import blender_hdri
    from near_engine.datagen.dataset import load_object
    from near_engine.envmap import equirect_solid_angles, uv_to_direction
    from near_engine.lift.delight import sh_basis
    from near_engine.train.lift import training_light_prior

    (folder,) = list_objects(data_dir, "train")
    (light,) = load_object(folder)["meta"]["lights"]
    env = EnvMap.read(blender_hdri(light["hdri"]))
    h, w = env.height, env.width
    uv = np.stack(np.meshgrid((np.arange(w) + 0.5) / w, 1 - (np.arange(h) + 0.5) / h), -1).reshape(-1, 2)
    radiance = env.pixels.reshape(-1, 3).mean(-1) * np.repeat(equirect_solid_angles(h, w), w)
    terms = sh_basis(torch.from_numpy(uv_to_direction(uv))).numpy().T @ radiance
    terms = terms / (terms[0] * 0.5 / math.sqrt(math.pi))
    prior = training_light_prior(data_dir)
    np.testing.assert_allclose(prior.mean[[0, 2, 6]].numpy(), terms[[0, 2, 6]], rtol=0.02, atol=0.02)
    assert float(prior.mean[[1, 3, 4, 5, 7, 8]].abs().max()) == 0.0
    np.testing.assert_allclose(prior.variance[1].numpy(), (terms[1] ** 2 + terms[3] ** 2) / 2, rtol=0.05, atol=1e-3)
