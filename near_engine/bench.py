"""Speed measurements that print figures (never pass/fail): the rasterizer on the issue's fixed benchmark scene.

The scene, so figures compare across runs: N Gaussians with means uniform in [-0.5, 0.5]^3, random rotations,
scales uniform in [0.002, 0.01], opacities uniform in [0.1, 1], colours uniform in [0, 1] (seed 0), seen by a pinhole
camera 2 units away (identity rotation, translation (0, 0, 2), OpenCV axes), focal length in pixels = image width.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import torch

from .camera import Camera
from .errors import NearError


def benchmark_scene(n: int, size: int, seed: int = 0):
    """(means, quats, scales, opacities, colours, camera) of the benchmark scene."""
    g = torch.Generator().manual_seed(seed)
    means = torch.rand(n, 3, generator=g) - 0.5
    quats = torch.nn.functional.normalize(torch.randn(n, 4, generator=g), dim=-1)  # uniform random rotations
    scales = 0.002 + 0.008 * torch.rand(n, 3, generator=g)
    opacities = 0.1 + 0.9 * torch.rand(n, generator=g)
    colors = torch.rand(n, 3, generator=g)
    w2c = np.eye(4)
    w2c[2, 3] = 2.0
    return means, quats, scales, opacities, colors, Camera(size, size, size, size, size / 2, size / 2, w2c)


def _best_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return min(times)


def bench_raster(n: int, size: int, repeats: int = 5, naive: bool = True) -> dict:
    """Forward and backward times (best of `repeats`, after one warm-up call) and, optionally, the NumPy baseline."""
    from .raster import rasterize
    from .raster.naive import splat_naive
    from .raster.projection import project_gaussians

    means, quats, scales, opacities, colors, cam = benchmark_scene(n, size)
    t0 = time.perf_counter()
    rasterize(means, quats, scales, opacities, colors, cam)
    first_ms = (time.perf_counter() - t0) * 1e3
    forward_ms = _best_ms(lambda: rasterize(means, quats, scales, opacities, colors, cam), repeats)

    params = [x.clone().requires_grad_() for x in (means, quats, scales, opacities, colors)]
    weights = torch.rand(size, size, 3, generator=torch.Generator().manual_seed(1))
    backward_times = []
    for _ in range(repeats + 1):  # the first run warms up the backward kernels
        out = rasterize(*params, cam)
        loss = (out.channels * weights).sum() + out.alpha.sum()
        t0 = time.perf_counter()
        loss.backward()
        backward_times.append((time.perf_counter() - t0) * 1e3)
    result = {
        "gaussians": n, "width": size, "height": size, "threads": _threads(),
        "forward_ms": round(forward_ms, 1),
        "backward_ms": round(min(backward_times[1:]), 1),
        "first_call_ms": round(first_ms, 1),
    }
    if naive:
        proj = project_gaussians(means, quats, scales, opacities, cam)
        arrays = [x.detach().numpy() for x in (proj.means2d, proj.conics, proj.opacities, proj.radii, proj.depths)]
        feats = torch.cat([colors, proj.depths[:, None]], -1).numpy()
        t0 = time.perf_counter()
        splat_naive(*arrays, feats, size, size)
        naive_ms = (time.perf_counter() - t0) * 1e3
        result["naive_numpy_ms"] = round(naive_ms, 1)
        result["speedup_vs_naive"] = round(naive_ms / forward_ms, 1)
    return result


def bench_first_call(n: int = 10_000, size: int = 256) -> dict:
    """Time of the first rasterize call in a fresh process: JIT compilation with an empty cache, then a cache hit."""
    import tempfile

    code = ("import time; t=time.perf_counter(); from near_engine.bench import benchmark_scene; "
            "from near_engine.raster import rasterize; s=benchmark_scene(%d, %d); "
            "p=[x.requires_grad_() for x in s[:5]]; o=rasterize(*p, s[5]); (o.channels.sum()+o.alpha.sum()).backward(); "
            "print((time.perf_counter()-t)*1e3)" % (n, size))
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        runs = []
        for _ in range(2):
            proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise NearError(f"the first-call benchmark process failed:\n{proc.stderr.strip()[-2000:]}")
            runs.append(float(proc.stdout.strip()))
    return {"first_call_cold_cache_ms": round(runs[0], 1), "first_call_warm_cache_ms": round(runs[1], 1)}


def _threads() -> int:
    import numba

    return numba.get_num_threads()
