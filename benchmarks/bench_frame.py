"""Per-frame time of NeAR rendering on the CPU, split by stage, one JSON line per measurement.

    .venv/bin/python benchmarks/bench_frame.py            # near-tiny at 256 and 512 px + a full-size forward
    .venv/bin/python benchmarks/bench_frame.py --quick    # near-tiny at 256 px only

The networks carry seeded random weights: speed does not depend on the values. The object is a ~5,000-voxel sphere
shell (a surface-only structured latent, like a real asset). Per configuration: a whole first frame through
`NearPipeline` (empty caches: tokenizer, IAD, and for the PBR core the prefiltered light) against a cached frame
(camera moved, same light and asset). Four configurations run in the same process: near-tiny (PBR core, 4 Gaussians
per voxel starting at surfels, self-occlusion from its voxels), the same without self-occlusion, the same with its
Gaussians spread over the voxels (before surfels), and the design
the PBR core replaced (16 Gaussians per voxel, sine shading MLP, no PBR core, 8-channel input); the ratios of their
cached frames are printed. The full-size line times IAD + LAD of near-official at a few voxel
counts.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from near_engine.asset import Asset
from near_engine.camera import Camera
from near_engine.configs import build_networks, random_weights, tiny_config
from near_engine.envmap import EnvMap
from near_engine.pipeline import NearPipeline, Scene
from near_engine.sparse import SparseTensor


def shell(radius: float, width: float = 1.3) -> np.ndarray:
    """Voxel coords [N, 3] of a sphere shell on the 64 grid."""
    grid = np.stack(np.meshgrid(*[np.arange(64)] * 3, indexing="ij"), -1).reshape(-1, 3)
    r = np.linalg.norm(grid + 0.5 - 32, axis=-1)
    return grid[(r > radius) & (r < radius + width)].astype(np.int32)


def timed(fn):
    t0 = time.perf_counter()
    value = fn()
    return value, (time.perf_counter() - t0) * 1e3


def previous_tiny_config() -> dict:
    """near-tiny as it was before the PBR core: 16 Gaussians per voxel with the official scale and opacity biases,
    a sine shading MLP making radiance on its own, the 8-channel LH latent alone as the IAD's input."""
    config = tiny_config(num_gaussians=16)
    config["decoder"]["args"]["latent_channels"] = 8
    rep = config["renderer"]["args"]
    rep["representation_config"].update({"scaling_bias": 0.004, "opacity_bias": 0.1, "voxel_size": 1.5})
    rep["zero_init_heads"] = False
    rep["normal_head"] = False  # its residual corrects the normals of the PBR core, which this design lacks
    config["neural_basis"]["args"].update({"activation": "sine", "core": "none"})
    return config


def bench_tiny(size: int, name: str, config: str | dict, placement: str = "surfels", self_occlusion: bool = True
               ) -> dict:
    networks = random_weights(config, seed=0)
    coords = shell(17.5)
    feats = torch.randn(len(coords), 8, generator=torch.Generator().manual_seed(0)).numpy()
    env = EnvMap.uniform([1.0, 0.9, 0.8], height=256)
    cam = Camera.orbit(30, 20, 2.0, width=size, height=size, fov_x_deg=40)
    pipeline = NearPipeline(networks, f"bench-{name}", light_size=512, placement=placement,
                            self_occlusion=self_occlusion)
    scene = Scene([(Asset(coords, feats), np.eye(4))], env, cam)
    pipeline.render(Scene(scene.objects, env, Camera.orbit(10, 25, 2.0, width=size, height=size, fov_x_deg=40)))
    pipeline.iad_cache.clear(), pipeline.light_cache.clear(), pipeline.ibl_cache.clear()  # warm kernels, cold caches
    _, first_ms = timed(lambda: pipeline.render(scene))
    cached = []
    for azimuth in (60, 90, 120):
        moved = Scene(scene.objects, env, Camera.orbit(azimuth, 25, 2.0, width=size, height=size, fov_x_deg=40))
        cached.append(timed(lambda: pipeline.render(moved))[1])
    gaussians = len(coords) * networks["renderer"].num_gaussians
    return {"config": f"{name} (random weights)", "voxels": len(coords), "gaussians": gaussians, "size": size,
            "first_frame_ms": round(first_ms, 1), "cached_frame_ms": round(min(cached), 1)}


def bench_full(voxel_counts: tuple[int, ...]) -> list[dict]:
    networks = build_networks("near-official", device="cpu", keys=("decoder", "renderer"))
    rows = []
    rng = np.random.default_rng(0)
    for n in voxel_counts:
        flat = rng.choice(64**3, size=n, replace=False)
        coords = np.stack(np.unravel_index(flat, (64, 64, 64)), -1).astype(np.int32)
        slat = SparseTensor.from_list([(torch.from_numpy(coords), torch.randn(n, 8))], 64)
        tokens = torch.randn(1, 4096, 768)
        with torch.no_grad():
            (h, reg), iad_ms = timed(lambda: networks["decoder"](slat))
            _, lad_ms = timed(lambda: networks["renderer"](h, reg, tokens, torch.tensor([[2.0, 0.0, 0.5]])))
        rows.append({"config": "near-official (random weights)", "voxels": n, "iad_ms": round(iad_ms, 1),
                     "lad_ms": round(lad_ms, 1)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="near-tiny at 256 px only")
    args = parser.parse_args()
    torch.manual_seed(0)
    for size in (256,) if args.quick else (256, 512):
        ours = bench_tiny(size, "near-tiny", "near-tiny")
        unoccluded = bench_tiny(size, "near-tiny without self-occlusion", "near-tiny", self_occlusion=False)
        voxels = bench_tiny(size, "near-tiny, Gaussians over the voxels (before surfels)", "near-tiny", "voxels",
                            self_occlusion=False)
        before = bench_tiny(size, "near-tiny before the PBR core", previous_tiny_config())
        for row in (ours, unoccluded, voxels, before):
            print(json.dumps(row), flush=True)
        print(json.dumps({"size": size, "cached_frame_ratio_new_over_previous":
                          round(ours["cached_frame_ms"] / before["cached_frame_ms"], 2),
                          "cached_frame_ratio_surfels_over_voxels":
                          round(unoccluded["cached_frame_ms"] / voxels["cached_frame_ms"], 2),
                          "cached_frame_ratio_occlusion_over_none":
                          round(ours["cached_frame_ms"] / unoccluded["cached_frame_ms"], 2),
                          "first_frame_ratio_occlusion_over_none":
                          round(ours["first_frame_ms"] / unoccluded["first_frame_ms"], 2)}), flush=True)
    if not args.quick:
        for row in bench_full((500, 2000)):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
