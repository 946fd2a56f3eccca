"""The DDP test's worker process (a module without bpy, so that spawned processes can import it)."""

from __future__ import annotations

import socket
from pathlib import Path

import torch
import torch.distributed as dist

from near_engine.envmap import EnvMap
from near_engine.train import data
from near_engine.train.data import Sample, load_training_object
from near_engine.train.loop import TrainConfig, Trainer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.networks.state_dict().items()}


def ddp_worker(rank: int, port: int, folder: str, out: str, config: TrainConfig, size: int, res: int,
               hdri_dir: str) -> None:
    """One rank: a DDP step on lit view `rank` of the object; saves its parameters and (averaged) gradients.

    A process spawned from pytest cannot import bpy (its `_bpy` extension is not found there), so the HDRIs are read
    from the folder the parent found.
    """
    data.hdri = lambda name: EnvMap.read(Path(hdri_dir) / f"{name}.exr")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        obj = load_training_object(folder, size, res)
        trainer = Trainer(config, [obj], rank=rank, world_size=2)
        trainer.train_step([Sample(obj, 0, rank)])
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        torch.save({"params": params(trainer), "grads": grads}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
