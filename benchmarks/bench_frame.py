"""Per-frame time of NeAR rendering on the CPU, split by stage, one JSON line per measurement.

    .venv/bin/python benchmarks/bench_frame.py            # near-tiny at 256 and 512 px + a full-size forward
    .venv/bin/python benchmarks/bench_frame.py --quick    # near-tiny at 256 px only

The networks carry seeded random weights: speed does not depend on the values, and no trained near-tiny weights
exist yet. The object is a ~5,000-voxel sphere shell (a surface-only structured latent, like a real asset).
Stages: tokenizer (per environment map), IAD (per asset), LAD, heads + shading, two-pass rasterization; then a whole
first frame through `NearPipeline` (empty caches) against a cached frame (camera moved, same light and asset).
The full-size line times IAD + LAD of the near-official configuration at a few voxel counts.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from near_engine.asset import Asset
from near_engine.camera import Camera
from near_engine.configs import build_networks, random_weights
from near_engine.envmap import EnvMap
from near_engine.frame import decode_gaussians, light_tokens, rasterize_passes
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


def bench_tiny(size: int) -> dict:
    networks = random_weights("near-tiny", seed=0)
    coords = shell(17.5)
    feats = torch.randn(len(coords), 8, generator=torch.Generator().manual_seed(0))
    env = EnvMap.uniform([1.0, 0.9, 0.8], height=256)
    cam = Camera.orbit(30, 20, 2.0, width=size, height=size, fov_x_deg=40)
    slat = SparseTensor.from_list([(torch.from_numpy(coords), feats)], 64)
    cam_pos = torch.from_numpy(cam.position[None]).float()
    with torch.no_grad():
        for _ in range(2):  # the first round loads the compiled kernels and warms the allocator; the second is timed
            tokens, tok_ms = timed(lambda: light_tokens(networks["hdri_encoder"], env, 0.0, 512))
            (h, reg), iad_ms = timed(lambda: networks["decoder"](slat))
            _, lad_ms = timed(lambda: networks["renderer"](h, reg, tokens, cam_pos))
            frame, decode_ms = timed(lambda: decode_gaussians(networks, h, reg, tokens, camera_position=cam.position))
            _, raster_ms = timed(lambda: rasterize_passes(frame.pass_gaussians(), cam, torch.ones(3)))

    pipeline = NearPipeline(networks, "bench-random", light_size=512)
    scene = Scene([(Asset(coords, feats.numpy()), np.eye(4))], env, cam)
    _, first_ms = timed(lambda: pipeline.render(scene))
    moved = Scene(scene.objects, env, Camera.orbit(60, 25, 2.0, width=size, height=size, fov_x_deg=40))
    _, cached_ms = timed(lambda: pipeline.render(moved))
    return {"config": "near-tiny (random weights)", "voxels": len(coords), "gaussians": len(frame), "size": size,
            "tokenizer_ms": round(tok_ms, 1), "iad_ms": round(iad_ms, 1), "lad_ms": round(lad_ms, 1),
            "heads_shading_ms": round(decode_ms - lad_ms, 1), "raster_two_pass_ms": round(raster_ms, 1),
            "first_frame_ms": round(first_ms, 1), "cached_frame_ms": round(cached_ms, 1)}


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
        print(json.dumps(bench_tiny(size)), flush=True)
    if not args.quick:
        for row in bench_full((500, 2000)):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
