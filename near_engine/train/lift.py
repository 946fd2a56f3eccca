"""Training near-tiny's lift regressor (`lift.regressor`): one lit view -> the object's even latents.

Pairs, as NeAR's `SLatI2E` data set pairs them: the input is one view of a training object under one of its lights (an
HDRI, a baked sky, or the uniform light itself), exposed and white-balanced as a camera does it (`image.metered`),
prepared exactly as a user's photo is (`image.crop_object` at `LIFT_SIZE`, the camera fitted from the voxels as for a
photo: `views.fit_crop_camera`); the targets are what the trained mesh encoder makes of the object's 12 uniformly lit
views (the LH latent, `encode.encode_views`) and its material latents from the G-buffers (`encode.lift_materials`).
Targets are computed once per object. The loss is the mean squared error of the LH latent, each channel divided by its
variance over the training voxels, plus 4 x the squared error of the material latents (squared, not absolute: an L1
loss learns the median, and with a third of the objects metal the median metallic is 0 for every object whose photo
leaves it open; measured after 600 steps, a dark metal lifted with L1 came out a grey dielectric at 14 dB, against 22
dB with its true materials).

Resumable: `out/lift_checkpoint.pt` holds the networks, the optimizer and the step; the weights are written into
`out/weights/` (a copy of the renderer's weights folder with the lift networks added) at every checkpoint.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..camera import Camera
from ..cycles.lights import Light
from ..checkpoints import read_model_entry, save_model
from ..configs import ENCODER_KEYS, load_networks
from ..errors import NearError
from ..files import write_atomically
from ..frame import DEFAULT_MATERIAL
from ..lift import LIFT_SIZE, LIGHT_PRIOR_FILE
from ..lift.delight import LightPrior
from ..lift.encode import encode_views
from ..lift.image import crop_object, metered
from ..lift.regressor import LATENT_CHANNELS, LIFT_KEYS, init_from_encoder, lift_network_args, predict_latents
from ..lift.views import fit_crop_camera
from ..progress import duration, progress
from .data import UNIFORM_SOURCE, LightSource, light_source, list_objects, load_training_object
from .loop import warmup_cosine

__all__ = ["LiftConfig", "LiftObject", "load_lift_object", "lift_photo", "train_lift", "LIFT_SIZE"]

CHECKPOINT = "lift_checkpoint.pt"
#: How the cached photos were exposed; a cache written otherwise is computed again.
PHOTO_EXPOSURE = "metered, white-balanced"


@dataclass
class LiftConfig:
    steps: int = 3000
    lr: float = 3e-4
    warmup: int = 50
    batch: int = 4  # photos per step, each of another object
    material_weight: float = 4.0  # of the material latents' squared error
    uniform_fraction: float = 0.15  # of the photos, those under the uniform light
    seed: int = 0
    geometry_steps: int = 1500  # then near-tiny's own geometry model (`train_occupancy`), this many steps
    objective: str = "regression"  # or "flow": rectified flow matching, for the comparison


@dataclass
class LiftObject:
    """A training object reduced to what the lift needs: voxels, its photos with cameras, and its targets."""

    id: str
    coords: np.ndarray
    photos: list[tuple[torch.Tensor, Any]]  # (prepared photo [S, S, 4], its crop camera), lit views first
    lit_count: int
    latent: torch.Tensor  # [N, 8] the mesh encoder's LH latent
    materials: torch.Tensor  # [N, 6]


def lift_photo(image: torch.Tensor | np.ndarray, view_camera, coords: np.ndarray, resolution: int,
               white: np.ndarray) -> tuple[torch.Tensor, Any]:
    """A rendered view [H, W, 4] under a light whose mean radiance is `white` [3] -> (the photo exposed and
    white-balanced (`image.metered`) and prepared as the lift prepares it, its crop camera fitted from the voxels)."""
    prepared = crop_object(metered(np.asarray(image, dtype=np.float32), white), LIFT_SIZE)
    return torch.from_numpy(prepared.rgba), fit_crop_camera(view_camera, coords, resolution, LIFT_SIZE)


def source_white(source: LightSource) -> np.ndarray:
    """What a white card reads [3] under a training light (`image.light_white`): its map's mean radiance times its
    strength."""
    return np.asarray(source.envmap.mean_radiance()) * source.light.strength


def load_lift_object(folder: str | Path, encoders: dict, resolution: int = 64, size: int = 128,
                     cache: Path | None = None) -> LiftObject:
    """One finished data-set object with its lift targets (the mesh encoder run once on its uniform views), read
    from `cache/<id>.pt` when an earlier run stored it there (it holds no code: tensors and numbers only)."""
    cached = None if cache is None else cache / f"{Path(folder).name}.pt"
    state = torch.load(cached, map_location="cpu", weights_only=True) if cached is not None and cached.is_file() else {}
    if state.get("exposure") == PHOTO_EXPOSURE:
        cameras = [Camera(int(c[0]), int(c[1]), *map(float, c[2:6]), w2c.numpy())
                   for c, w2c in zip(state["intrinsics"].tolist(), state["world_to_camera"])]
        return LiftObject(state["id"], state["coords"].numpy(), list(zip(state["photos"], cameras)),
                          int(state["lit_count"]), state["latent"], state["materials"])
    obj = load_training_object(folder, size, resolution)
    with torch.no_grad():
        latent = encode_views(encoders, obj.coords, obj.rgba, obj.cameras, obj.depth, resolution)
    photos = [lift_photo(obj.lit_rgba[light, k], obj.cameras[view], obj.coords, resolution, source_white(source))
              for light, source in enumerate(obj.lights) for k, view in enumerate(obj.lit_views)]
    lit_count = len(photos)
    photos += [lift_photo(obj.rgba[v], obj.cameras[v], obj.coords, resolution, source_white(UNIFORM_SOURCE))
               for v in range(len(obj.cameras))]
    result = LiftObject(obj.id, obj.coords, photos, lit_count, latent, torch.from_numpy(obj.materials))
    if cached is not None:
        cache.mkdir(parents=True, exist_ok=True)
        state = {"exposure": PHOTO_EXPOSURE, "id": result.id, "coords": torch.from_numpy(result.coords),
                 "lit_count": lit_count,
                 "photos": torch.stack([p for p, _ in photos]), "latent": latent, "materials": result.materials,
                 "intrinsics": torch.tensor([[c.width, c.height, c.fx, c.fy, c.cx, c.cy] for _, c in photos],
                                            dtype=torch.float64),
                 "world_to_camera": torch.from_numpy(np.stack([c.world_to_camera for _, c in photos]))}
        write_atomically(cached, lambda f: torch.save(state, f))
    return result


def flow_targets(obj: LiftObject, latent_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0 [N, 14]: the targets with each channel at about unit scale, that scale [14])."""
    scale = torch.cat([latent_scale.sqrt(), torch.full((obj.materials.shape[1],), 0.3)])
    return torch.cat([obj.latent, obj.materials], -1) / scale, scale


def flow_loss(networks, obj: LiftObject, photo: int, latent_scale: torch.Tensor, resolution: int,
              rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """Rectified flow matching: x_t = (1 - t) x0 + t noise, the velocity noise - x0 regressed (t uniform)."""
    from ..lift.regressor import flow_velocity, lift_inputs

    image, camera = obj.photos[photo]
    x0, _ = flow_targets(obj, latent_scale)
    t = float(rng.random())
    noise = torch.from_numpy(rng.standard_normal(x0.shape).astype(np.float32))
    inputs = lift_inputs(networks["lift_features"], obj.coords, image, camera, resolution)
    velocity = flow_velocity(networks, obj.coords, inputs, (1 - t) * x0 + t * noise, t, resolution)
    return {"velocity": ((velocity - (noise - x0)) ** 2).mean()}


def lift_losses(networks, obj: LiftObject, photo: int, latent_scale: torch.Tensor, resolution: int
                ) -> dict[str, torch.Tensor]:
    image, camera = obj.photos[photo]
    latent, materials = predict_latents(networks, obj.coords, image, camera, resolution)
    return {"latent": (((latent - obj.latent) ** 2) / latent_scale).mean(),
            "material": ((materials - obj.materials) ** 2).mean()}


def training_light_prior(data: str | Path) -> LightPrior | None:
    """What the training objects' lights are like (`delight.LightPrior`): every HDRI and sky they were rendered
    under (area lights have no map; None when no light has one, and the lift then keeps the photo's light)."""
    lights = []
    for folder in list_objects(data, "train"):
        for record in json.loads((folder / "meta.json").read_text())["lights"]:
            light = Light.from_json(record)
            if light.kind in ("hdri", "sky"):
                lights.append(light_source(light, folder).envmap)
    return LightPrior.of(lights) if lights else None


def export_lift(folder: Path, renderer_weights: Path, networks, encoder_args: dict, note: dict,
                light_prior: LightPrior | None = None) -> None:
    """`folder`: the renderer's weights folder with the lift networks added (their pipeline.json entries too) and
    the `light_prior` the lift takes a photo's light out with (`LIGHT_PRIOR_FILE`)."""
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(renderer_weights, tmp, ignore=shutil.ignore_patterns(
        *(f"{k}.*" for k in LIFT_KEYS + ("occupancy",)), LIGHT_PRIOR_FILE))
    if light_prior is not None:
        (tmp / LIGHT_PRIOR_FILE).write_text(json.dumps(light_prior.as_dict(), indent=1))
    feature_args = read_model_entry("image_features", renderer_weights / "image_features").args
    save_model(tmp, "lift_features", networks["lift_features"], feature_args)
    save_model(tmp, "lift_encoder", networks["lift_encoder"], lift_network_args(encoder_args))
    keys = list(LIFT_KEYS)
    if "occupancy" in networks:
        save_model(tmp, "occupancy", networks["occupancy"], {"width": networks["occupancy"].width})
        keys.append("occupancy")
    pipeline = json.loads((tmp / "pipeline.json").read_text())
    pipeline["models"].pop("occupancy", None)  # the renderer's folder may have had one; only `keys` are written
    pipeline["models"].update({k: k for k in keys})
    pipeline["lift"] = note
    (tmp / "pipeline.json").write_text(json.dumps(pipeline, indent=1))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)


def train_lift(data: str | Path, out: str | Path, renderer_weights: str | Path, config: LiftConfig, *,
               resume: bool = True, log_every: int = 20, checkpoint_every: int = 200,
               log: Callable[[str], object] = print) -> dict[str, Any]:
    """Train the lift regressor on the training objects of `data`, starting from the mesh encoder in
    `renderer_weights`; writes `out/lift_checkpoint.pt` and `out/weights/`."""
    from ..bundled import weights_folder

    renderer_weights = Path(weights_folder(renderer_weights))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    encoders, _ = load_networks(renderer_weights, "cpu", keys=ENCODER_KEYS)
    for net in encoders.values():
        net.requires_grad_(False)
    resolution = int(encoders["encoder"].resolution)
    encoder_args = read_model_entry("encoder", Path(renderer_weights) / "encoder").args
    def load_new(objects: list[LiftObject]) -> list[LiftObject]:
        """The training objects not loaded yet (a data set still being rendered grows while the lift trains)."""
        known = {o.id for o in objects}
        folders = [f for f in list_objects(data, "train") if f.name not in known]
        return [load_lift_object(f, encoders, resolution, cache=out / "objects")
                for f in progress(folders, "loading objects", log)]

    objects = load_new([])
    light_prior = training_light_prior(data)
    all_latents = torch.cat([o.latent for o in objects])
    latent_scale = all_latents.var(0).clamp_min(1e-4)
    flow = config.objective == "flow"
    networks = torch.nn.ModuleDict(init_from_encoder(encoders["image_features"], encoders["encoder"], encoder_args,
                                                     DEFAULT_MATERIAL, flow))
    optimizer = torch.optim.AdamW(networks.parameters(), lr=config.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(config.warmup, config.steps))
    step = 0
    if resume and (out / CHECKPOINT).is_file():
        state = torch.load(out / CHECKPOINT, map_location="cpu", weights_only=True)
        networks.load_state_dict(state["networks"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        step = int(state["step"])
        log(f"resumed at step {step}")
    log(f"{len(objects)} objects, {len(all_latents)} voxels; training the lift from step {step} to {config.steps}")
    note = {"data": str(Path(data).name), "objects": [o.id for o in objects], "config": asdict(config)}
    if light_prior is not None:  # what the lift's weights folder says of its light prior
        note["light_prior"] = {"file": LIGHT_PRIOR_FILE, "from": f"the HDRIs and skies of the {len(objects)} training "
                                                                  "objects, near_engine.train.lift.training_light_prior"}
    start, first, last = time.perf_counter(), step, {}
    while step < config.steps:
        rng = np.random.default_rng([config.seed, step])
        chosen = rng.choice(len(objects), size=min(config.batch, len(objects)), replace=False)
        optimizer.zero_grad()
        terms: dict[str, float] = {}
        for index in chosen:
            obj = objects[int(index)]
            uniform = rng.random() < config.uniform_fraction or obj.lit_count == 0
            photo = int(rng.integers(obj.lit_count, len(obj.photos)) if uniform else rng.integers(obj.lit_count))
            if flow:
                losses = flow_loss(networks, obj, photo, latent_scale, resolution, rng)
                total = losses["velocity"] / len(chosen)
            else:
                losses = lift_losses(networks, obj, photo, latent_scale, resolution)
                total = (losses["latent"] + config.material_weight * losses["material"]) / len(chosen)
            total.backward()
            for k, v in losses.items():
                terms[k] = terms.get(k, 0.0) + float(v.detach()) / len(chosen)
        torch.nn.utils.clip_grad_norm_(networks.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        step += 1
        last = terms
        if step % log_every == 0 or step == config.steps:
            left = (config.steps - step) * (time.perf_counter() - start) / (step - first)
            log(f"lift step {step:5d}/{config.steps}  " + "  ".join(f"{k} {v:.4f}" for k, v in terms.items())
                + f"  {duration(left)} left")
        if step % checkpoint_every == 0 or step == config.steps:
            state = {"networks": networks.state_dict(), "optimizer": optimizer.state_dict(),
                     "schedule": schedule.state_dict(), "step": step}
            write_atomically(out / CHECKPOINT, lambda f: torch.save(state, f))
            if not flow:  # the flow is a comparison, not a product: its networks stay in the checkpoint
                export_lift(out / "weights", Path(renderer_weights), networks, encoder_args,
                            {**note, "objects": [o.id for o in objects], "steps": step}, light_prior)
            if step < config.steps:
                objects += load_new(objects)
    result = {"last": last, "step": step, "seconds": time.perf_counter() - start, "objects": len(objects)}
    if config.geometry_steps and not flow:
        occupancy = train_occupancy(objects, OccupancyConfig(steps=config.geometry_steps, seed=config.seed),
                                    resolution, log)
        networks["occupancy"] = occupancy
        export_lift(out / "weights", Path(renderer_weights), networks, encoder_args,
                    {**note, "objects": [o.id for o in objects], "steps": step,
                     "geometry_steps": config.geometry_steps}, light_prior)
    return result


@dataclass
class OccupancyConfig:
    steps: int = 1500
    lr: float = 1e-3
    batch: int = 16
    photos_per_object: int = 8  # the first lit views, then uniform ones
    seed: int = 0


def train_occupancy(objects: list[LiftObject], config: OccupancyConfig, resolution: int = 64,
                    log: Callable[[str], object] = print) -> torch.nn.Module:
    """near-tiny's own geometry model (`lift.occupancy.SlabNet`) on the lift's prepared views: front and back depth
    per pixel against the voxelized mesh. Inputs and targets are computed once per photo."""
    from ..lift.occupancy import SlabNet, slab_inputs, slab_targets

    torch.manual_seed(config.seed)
    pairs = [(o, i) for o in objects for i in list(range(min(o.lit_count, config.photos_per_object - 2)))
             + list(range(o.lit_count, min(len(o.photos), o.lit_count + 2)))]
    inputs, targets, masks = [], [], []
    for start in progress(range(0, len(pairs), 32), "preparing the geometry model's photos", log,
                          total=(len(pairs) + 31) // 32):
        chunk = pairs[start:start + 32]
        inputs.append(slab_inputs(torch.stack([o.photos[i][0] for o, i in chunk])))
        for o, i in chunk:
            t, m = slab_targets(o.coords, o.photos[i][1], resolution)
            targets.append(torch.from_numpy(t))
            masks.append(torch.from_numpy(m))
    inputs, targets, masks = torch.cat(inputs), torch.stack(targets), torch.stack(masks)[:, None].float()
    net = SlabNet()
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(50, config.steps))
    rng = np.random.default_rng(config.seed)
    for step in range(1, config.steps + 1):
        chosen = torch.from_numpy(rng.choice(len(inputs), size=min(config.batch, len(inputs)), replace=False))
        predicted = net(inputs[chosen])
        loss = ((predicted - targets[chosen]).abs() * masks[chosen]).sum() / masks[chosen].sum().clamp_min(1) / 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == config.steps:
            log(f"geometry step {step:5d}/{config.steps}  depth L1 {float(loss):.3f} map pixels")
    return net


def check_lift_weights(folder: str | Path) -> None:
    """Raise a clear error when a weights folder has no lift networks (trained with `near train-lift`)."""
    pipeline = json.loads((Path(folder) / "pipeline.json").read_text())
    missing = [k for k in LIFT_KEYS if k not in pipeline.get("models", {})]
    if missing:
        raise NearError(f"{folder}: these weights have no lift networks ({', '.join(missing)}); train them with "
                        "`near train-lift` or use weights that include them")


__all__ += ["check_lift_weights", "LATENT_CHANNELS"]
