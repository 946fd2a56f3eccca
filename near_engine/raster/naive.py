"""A plainly vectorized NumPy splatter: the baseline the compiled kernel is measured against in benchmarks.

Gaussians are splatted one at a time, front to back, each over its pixel box with whole-array NumPy operations and
the same compositing rules as the kernel (alpha clamp and threshold, early termination). Correct but slow: the
Python loop runs once per Gaussian.
"""

from __future__ import annotations

import numpy as np

from .projection import ALPHA_MAX, ALPHA_MIN, T_MIN


def splat_naive(means2d: np.ndarray, conics: np.ndarray, opacities: np.ndarray, radii: np.ndarray,
                depths: np.ndarray, feats: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Composite projected Gaussians into (features [H,W,K], alpha [H,W])."""
    out = np.zeros((height, width, feats.shape[1]), np.float32)
    trans = np.ones((height, width), np.float32)
    done = np.zeros((height, width), bool)
    visible = np.flatnonzero(radii[:, 0] > 0)
    for g in visible[np.argsort(depths[visible], kind="stable")]:
        x0, x1 = max(int(means2d[g, 0] - radii[g, 0]), 0), min(int(means2d[g, 0] + radii[g, 0]) + 1, width)
        y0, y1 = max(int(means2d[g, 1] - radii[g, 1]), 0), min(int(means2d[g, 1] + radii[g, 1]) + 1, height)
        if x0 >= x1 or y0 >= y1:
            continue
        dx = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5 - means2d[g, 0]
        dy = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5 - means2d[g, 1]
        a, b, c = conics[g]
        sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
        alpha = np.minimum(ALPHA_MAX, opacities[g] * np.exp(-sigma))
        t = trans[y0:y1, x0:x1]
        d = done[y0:y1, x0:x1]
        active = (sigma >= 0) & (alpha >= ALPHA_MIN) & ~d
        stop = active & (t * (1 - alpha) <= T_MIN)
        d |= stop
        active &= ~stop
        w = np.where(active, alpha * t, 0.0).astype(np.float32)
        out[y0:y1, x0:x1] += w[..., None] * feats[g]
        t *= np.where(active, 1 - alpha, 1.0).astype(np.float32)
    return out, 1.0 - trans
