"""The training loop: one object per rank per step, many images of it, AdamW + warm-up + cosine, resumable, DDP.

A step encodes one object once and supervises `images_per_step` of its Cycles images (amortized: the encoder and
the IAD run once, the LAD, heads, shading and rasterizer once per image):
    uniform views --encode_views--> LH latent; G-buffers --lift_materials--> material latents (at load time)
    [LH latent, material latents] --IAD--> h, registers
    each light's map (strength 1, its Z rotation) --tokenizer--> light tokens; --ibl.prefilter--> split-sum terms
    per image: LAD + heads + PBR core + shading MLP (`frame.decode_gaussians`) --`frame.rasterize_passes`--> passes
    lit colour vs the Cycles render divided by the light's strength (the pipeline renders at strength 1 and scales
    the radiance afterwards: `pipeline._scale_radiance`), both over the light's background, intrinsic passes vs
    the G-buffers of the same camera, both alphas vs Cycles' alpha; see `losses.py`.
The images are drawn from the relit views (HDRIs and skies) and the uniform-lit views (targets under the uniform
world). `TrainConfig.inputs` chooses what the IAD reads, for the paper's input ablation: "lh+material" (near-tiny),
"lh", "shaded" (the latent encoded from views under one of the object's HDRIs) or "material"; a latent left out is
replaced by zeros (LH) or the default material (material latents).
The six networks (near-tiny's four renderer networks, the image features and the encoder) train together.

Distributed: `torchrun --nproc-per-node N -m near_engine.cli train ...` (or any launcher that sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Each rank trains on its own shard of the objects (`ids[rank::world]`), DDP
averages the gradients (gloo on CPU, NCCL on CUDA). Sampling is a pure function of (seed, step, rank), and the torch
RNG state is checkpointed, so a resumed run repeats an uninterrupted one exactly (on the same device and world size).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..bundled import weights_folder
from ..configs import build_networks, get_config, save_networks
from ..errors import NearError
from ..files import write_atomically
from ..frame import (INPUTS, VoxelPriors, ablation_inputs, decode_gaussians, decoder_input, filter_2d,
                     rasterize_passes)
from ..ibl import IBLLight
from ..progress import duration, progress
from ..sparse import SparseTensor
from .data import Sample, TrainObject, list_objects, load_training_object
from ..lift.encode import encode_views
from .losses import LossWeights, stage2_losses

__all__ = ["TrainConfig", "Trainer", "StepModel", "fit", "load_objects", "train", "warmup_cosine"]

CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainConfig:
    """A training run. `network_config`: a configuration name or dict with the six networks."""

    steps: int = 2000
    lr: float = 5e-4
    warmup: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    size: int = 128  # training image side (the renders are box-filtered down to it)
    light_size: int = 128  # side of the tokenizer's input planes
    seed: int = 0
    network_config: str | dict = "near-tiny-train"
    weights: LossWeights = field(default_factory=LossWeights)
    images_per_step: int = 8  # images of the step's object supervised per step
    uniform_images: int = 2  # of those, uniform-lit views (the rest: relit views)
    inputs: str = "lh+material"  # what the IAD reads (module docstring)
    frozen: tuple[str, ...] = ()  # networks kept as loaded (e.g. the encoder, whose latents a lift was trained on)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "TrainConfig":
        """The config `to_json` wrote; fields added since take their defaults (which reproduce older runs)."""
        # loss settings added since: the values older runs trained with (not today's defaults)
        weights = {"exposure": 1.0, "pbr": 0.3, **data.get("weights", {})}
        return cls(**{"images_per_step": 1, "uniform_images": 0, **data, "weights": LossWeights(**weights)})

    def __post_init__(self) -> None:
        if self.inputs not in INPUTS:
            raise NearError(f"training inputs must be one of {', '.join(INPUTS)}, got {self.inputs!r}")
        if not 0 <= self.uniform_images <= self.images_per_step or self.images_per_step < 1:
            raise NearError("images_per_step must be at least 1 and uniform_images between 0 and it")
        object.__setattr__(self, "frozen", tuple(self.frozen))
        unknown = sorted(set(self.frozen) - set(get_config(self.network_config)))
        if unknown:
            raise NearError(f"cannot freeze {', '.join(unknown)}: the networks are "
                            f"{', '.join(get_config(self.network_config))}")

    @property
    def resolution(self) -> int:
        return int(get_config(self.network_config)["decoder"]["args"]["resolution"])


#: Where the exported weights' Gaussians start (recorded in pipeline.json): at the assets' surfels (`surfels`).
GAUSSIANS = "surfels"


def warmup_cosine(warmup: int, total: int) -> Callable[[int], float]:
    """Learning-rate factor at step s: linear from 1/warmup to 1 over `warmup` steps, then cosine down to 0."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


class StepModel(nn.Module):
    """The six networks; `forward(samples)` renders each sample's lit view and returns the mean loss terms."""

    def __init__(self, networks: Mapping[str, nn.Module], config: TrainConfig) -> None:
        super().__init__()
        self.networks = nn.ModuleDict(dict(networks))
        self.config = config

    def forward(self, samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
        """The mean loss terms over `samples` (any objects; each object is encoded once)."""
        totals: dict[str, torch.Tensor] = {}
        by_object: dict[int, list[Sample]] = {}
        for sample in samples:
            by_object.setdefault(id(sample.object), []).append(sample)
        for group in by_object.values():
            for name, value in self.object_losses(group[0].object, group).items():
                totals[name] = totals.get(name, 0.0) + value * (len(group) / len(samples))
        return totals

    def inputs(self, obj: TrainObject) -> tuple[torch.Tensor, VoxelPriors]:
        """The latent the IAD reads with the object's material latents, per `TrainConfig.inputs`."""
        nets, res, inputs = self.networks, self.config.resolution, self.config.inputs
        if inputs == "shaded":
            views = obj.lit_views
            latent = encode_views(nets, obj.coords, obj.lit_rgba[0], [obj.cameras[v] for v in views],
                                  obj.depth[views], res)
        elif inputs == "material":  # no encoder run: ablation_inputs zeroes the latent anyway
            weight = next(nets["encoder"].parameters())
            latent = torch.zeros(len(obj.coords), nets["encoder"].latent_channels, device=weight.device)
        else:
            latent = encode_views(nets, obj.coords, obj.rgba, obj.cameras, obj.depth, res)
        latent, materials = ablation_inputs(latent, obj.priors.materials.to(latent), inputs)
        per_surfel = obj.priors.surfel_materials if "material" in inputs else None
        return latent, VoxelPriors(materials, obj.priors.surfels.to(latent),
                                   surfel_materials=None if per_surfel is None else per_surfel.to(latent),
                                   visibility=obj.priors.visibility)

    def object_losses(self, obj: TrainObject, samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
        """Encode `obj` once, then render and compare each of its `samples`; the mean loss terms."""
        nets, res = self.networks, self.config.resolution
        latent, priors = self.inputs(obj)
        coords = torch.as_tensor(obj.coords, dtype=torch.int32, device=latent.device)
        decoder = nets["decoder"]
        h, registers = decoder(SparseTensor.from_list(
            [(coords, decoder_input(latent, priors.materials, decoder.latent_channels))], res))
        tokens: dict[object, torch.Tensor] = {}
        totals: dict[str, torch.Tensor] = {}
        for sample in samples:
            source = sample.source
            if source not in tokens:  # one tokenizer run per (map, rotation) of the step
                tokens[source] = nets["hdri_encoder"](source.planes(self.config.light_size).to(latent))
            ibl = IBLLight.for_frame(source.prefiltered(), source.light.rotation_z)
            camera = obj.cameras[sample.camera_index]
            frame = decode_gaussians(nets, h, registers, tokens[source], camera_position=camera.position,
                                     priors=priors, ibl=ibl)
            passes = rasterize_passes(frame.pass_gaussians(), camera, filter_2d=filter_2d(nets))
            target = sample.target().to(latent)
            gbuffers = {name: g[sample.camera_index].to(latent) for name, g in obj.gbuffers.items()}
            background = torch.from_numpy(source.envmap.with_settings(rotation_z=source.light.rotation_z)
                                          .background(camera)).to(latent)  # strength 1, as the targets
            terms = stage2_losses(passes, frame, target[..., :3] / source.light.strength,
                                  obj.rgba[sample.camera_index, ..., 3:].to(latent), gbuffers, self.config.weights,
                                  background)
            for name, value in terms.items():
                totals[name] = totals.get(name, 0.0) + value / len(samples)
        return totals


class Trainer:
    """Networks, optimizer and schedule of one rank; `train_step` runs one step, checkpoints resume it exactly."""

    def __init__(self, config: TrainConfig, objects: Sequence[TrainObject], rank: int = 0, world_size: int = 1,
                 device: str | torch.device = "cpu") -> None:
        if not objects:
            raise NearError(f"rank {rank} has no training objects")
        self.config, self.objects, self.rank, self.world_size = config, list(objects), rank, world_size
        torch.manual_seed(config.seed)
        networks = build_networks(config.network_config, device)
        for key in config.frozen:
            networks[key].requires_grad_(False)
        self.model = StepModel(networks, config).train()
        self.ddp: nn.Module = (DistributedDataParallel(self.model) if world_size > 1 else self.model)
        trained = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trained, lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(config.warmup, config.steps))
        self.step = 0
        self.started_from: dict[str, Any] | None = None  # the training note of the weights `init_networks` loaded

    @property
    def networks(self) -> nn.ModuleDict:
        return self.model.networks

    def samples(self, step: int) -> list[Sample]:
        """This rank's images for `step`, all of one object: `uniform_images` uniform-lit views and the rest relit
        (light, view) pairs, without repeats where there are enough. A pure function of (seed, step, rank), so
        resuming needs no sampler state."""
        rng = np.random.default_rng([self.config.seed, step, self.rank])
        obj = self.objects[int(rng.integers(len(self.objects)))]
        config = self.config
        uniform = rng.permutation(len(obj.cameras))[:config.uniform_images]
        relit = config.images_per_step - len(uniform)
        pairs = [(light, view) for light in range(len(obj.lights)) for view in range(len(obj.lit_views))]
        chosen = rng.permutation(len(pairs))[:relit] if pairs else []
        samples = [Sample(obj, -1, int(v)) for v in uniform] + [Sample(obj, *pairs[int(i)]) for i in chosen]
        if len(samples) < config.images_per_step:  # a small object record: fill up with uniform views
            samples += [Sample(obj, -1, int(v)) for v in rng.integers(len(obj.cameras),
                                                                      size=config.images_per_step - len(samples))]
        return samples

    def train_step(self, samples: Sequence[Sample] | None = None) -> dict[str, float]:
        """One optimizer step on `samples` (default: `self.samples(self.step)`); returns the loss terms and lr.

        The gradients of the step stay in the parameters' `.grad` (after clipping) until the next step. A step whose
        gradient is not finite updates nothing (its `grad_norm` says so).
        """
        samples = self.samples(self.step) if samples is None else samples
        self.optimizer.zero_grad(set_to_none=True)
        terms = self.ddp(samples)
        terms["loss"].backward()
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        lr = self.scheduler.get_last_lr()[0]
        if torch.isfinite(grad_norm):
            self.optimizer.step()
        else:  # a non-finite loss or gradient must not poison the weights: skip the update, keep the schedule
            self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        return {**{k: float(v.detach()) for k, v in terms.items()}, "grad_norm": float(grad_norm), "lr": lr}

    def state(self) -> dict[str, Any]:
        return {"step": self.step, "started_from": json.dumps(self.started_from),
                "networks": self.model.networks.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(), "config": json.dumps(self.config.to_json())}

    def save_checkpoint(self, path: str | Path) -> None:
        """Write the full training state atomically (a crash leaves the previous checkpoint)."""
        state = self.state()
        write_atomically(path, lambda tmp: torch.save(state, tmp))

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore a `save_checkpoint` file; its run settings must match this run's (the step count may grow)."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        saved, ours = TrainConfig.from_json(json.loads(state["config"])).to_json(), self.config.to_json()
        if {**saved, "steps": ours["steps"]} != ours:
            raise NearError(f"{path} was written by a run with other settings: {saved}")
        self.model.networks.load_state_dict(state["networks"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        self.step = int(state["step"])
        self.started_from = json.loads(state.get("started_from", "null"))

    def init_networks(self, folder: str | Path, keys: Sequence[str] | None = None) -> list[str]:
        """Start the six networks (or those named in `keys`) from a weights folder: every tensor whose name and shape
        match is loaded, the others keep their fresh initialization (an architecture change, say); returns the names
        left out."""
        from ..checkpoints import read_safetensors, read_weights_folder

        keys = tuple(self.model.networks) if keys is None else tuple(keys)
        unknown = sorted(set(keys) - set(self.model.networks))
        if unknown:
            raise NearError(f"no network named {', '.join(unknown)}: the networks are {', '.join(self.model.networks)}")
        settings, entries = read_weights_folder(weights_folder(folder), keys)
        state = self.model.networks.state_dict()
        own = {name: value for name, value in state.items() if name.split(".")[0] in keys}
        loaded, skipped = {}, []
        for key, entry in entries.items():
            for name, tensor in read_safetensors(entry.weights).items():
                full = f"{key}.{name}"
                if full in own and own[full].shape == tensor.shape:
                    loaded[full] = tensor
                else:
                    skipped.append(full)
        skipped += sorted(set(own) - set(loaded) - set(skipped))
        if not loaded:
            raise NearError(f"{folder}: no tensor fits these networks")
        self.model.networks.load_state_dict({**state, **loaded})
        if settings.get("gaussians") != GAUSSIANS and "renderer" in keys:
            self.model.networks["renderer"].restart_geometry()  # residuals learned on another placement
            skipped.append("renderer geometry rows (weights from before surfels: restarted at zero)")
        whole = set(keys) == set(self.model.networks)  # a partial start does not continue that training's steps
        self.started_from = {"folder": str(folder), "networks": list(keys),
                             "training": settings.get("training") if whole else None}
        return sorted(set(skipped))

    def export(self, folder: str | Path, note: Mapping[str, Any] | None = None) -> None:
        """Save the six networks in our weights folder format, loadable by `NearPipeline.from_pretrained`.

        `pipeline.json` says how they were trained: this run's steps and settings, plus `note`; `total_steps` and
        `started_from` (the training note of the weights this run started from) follow runs chained by `init_from`.
        """
        Path(folder).mkdir(parents=True, exist_ok=True)
        earlier = ((self.started_from or {}).get("training") or {}).get("total_steps", 0)
        training = {"steps": self.step, "total_steps": self.step + int(earlier), "config": self.config.to_json(),
                    **(note or {}), "started_from": self.started_from}
        save_networks(folder, dict(self.model.networks), self.config.network_config,
                      {"light_size": self.config.light_size, "inputs": self.config.inputs, "gaussians": GAUSSIANS,
                       "training": training})


def _distributed() -> tuple[int, int, bool]:
    """(rank, world size, whether this call started the process group) from torchrun's environment."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, False
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size(), started


def train(data: str | Path, out: str | Path, config: TrainConfig, *, resume: bool = False, log_every: int = 10,
          checkpoint_every: int = 200, init_from: str | Path | None = None,
          log: Callable[[str], object] = print) -> dict[str, Any]:
    """Train on the finished training objects of `data`, writing `out/checkpoint.pt` and the weights `out/weights/`.

    `init_from`: a weights folder (e.g. an earlier run's `weights/`) whose tensors start this run where names and
    shapes match (`Trainer.init_networks`), with a fresh optimizer and schedule (fine-tuning, changed run settings or
    architecture); ignored when a checkpoint is resumed.

    Returns the last logged terms and the mean step time. Under torchrun each rank takes its shard of the objects.
    """
    rank, world_size, started = _distributed()
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu")
    Path(out).mkdir(parents=True, exist_ok=True)
    try:
        objects = load_objects(list_objects(data, "train")[rank::world_size], config, log)
        log(f"rank {rank}/{world_size}: {len(objects)} objects, {sum(len(o.coords) for o in objects)} voxels")
        trainer = Trainer(config, objects, rank, world_size, device)
        return fit(trainer, out, resume=resume, init_from=init_from, log_every=log_every,
                   checkpoint_every=checkpoint_every, log=log)
    finally:
        if started:
            dist.destroy_process_group()


def load_objects(folders: Sequence[Path], config: TrainConfig,
                 log: Callable[[str], object] = print) -> list[TrainObject]:
    """The training objects in `folders`, loaded at the run's image size and grid, with a progress line."""
    return [load_training_object(f, config.size, config.resolution) for f in progress(folders, "loading objects", log)]


def fit(trainer: Trainer, out: str | Path, *, resume: bool = False, init_from: str | Path | None = None,
        init_keys: Sequence[str] | None = None, log_every: int = 10, checkpoint_every: int = 200,
        log: Callable[[str], object] = print) -> dict[str, Any]:
    """Run `trainer` to its last step: resume `out/checkpoint.pt` if asked and present, else start the networks (or
    `init_keys` of them) from `init_from`; checkpoint and export `out/weights/` as it goes. See `train`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config, rank, world_size = trainer.config, trainer.rank, trainer.world_size
    if resume and (out / CHECKPOINT).is_file():
        trainer.load_checkpoint(out / CHECKPOINT)
        log(f"resumed at step {trainer.step}")
    elif init_from is not None:
        skipped = trainer.init_networks(init_from, init_keys)
        log(f"networks {'initialized' if init_keys is None else ', '.join(init_keys) + ' started'} from {init_from}"
            + (f"; freshly initialized (no match there): {', '.join(skipped)}" if skipped else ""))
    last: dict[str, float] = {}
    start, first_step, times = time.perf_counter(), trainer.step, []
    while trainer.step < config.steps:
        t0 = time.perf_counter()
        last = trainer.train_step()
        times.append(time.perf_counter() - t0)
        if rank == 0 and (trainer.step % log_every == 0 or trainer.step == config.steps):
            images = ((trainer.step - first_step) * world_size * config.images_per_step
                      / (time.perf_counter() - start))
            left = (config.steps - trainer.step) * (time.perf_counter() - start) / (trainer.step - first_step)
            log(f"step {trainer.step:6d}/{config.steps}  " + "  ".join(f"{k} {v:.4g}" for k, v in last.items())
                + f"  {images:.2f} images/s, {duration(left)} left")
        if rank == 0 and (trainer.step % checkpoint_every == 0 or trainer.step == config.steps):
            trainer.save_checkpoint(out / CHECKPOINT)  # and usable weights, should the run stop here
            trainer.export(out / "weights", {"objects": [o.id for o in trainer.objects], "world_size": world_size})
    return {"last": last, "step_seconds": float(np.mean(times)) if times else 0.0, "step": trainer.step}

