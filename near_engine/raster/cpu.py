"""The CPU rasterizer: tile-binned, depth-sorted alpha compositing of 2D Gaussians, compiled with numba.

Same shape and rules as gsplat's CUDA kernels, so the two backends agree up to floating-point rounding:
- binning: a radix sort by depth, then a stable counting sort by tile lists every visible Gaussian front to back in
  each 16x16 tile its box overlaps;
- forward: each tile is a parallel task. Per pixel row, every Gaussian of the tile that can reach alpha 1/255 on
  that row gets its exact pixel span (the row cuts its ellipse in an interval); spans are composited in depth order
  with `alpha = min(0.999, o * exp(-sigma))` (skipping alpha < 1/255), exp(-sigma) stepped along the span by a
  recurrence, and each pixel stops before its transmittance would fall to 1e-4;
- backward: the same spans back to front, recovering the transmittance by division as gsplat does. Gradients are
  summed per span, written per (tile, Gaussian) intersection so threads never share a slot, then summed per
  Gaussian: race-free and deterministic.
Kernels are generic over float32/float64 (float64 serves finite-difference gradient checks) and cached on disk.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numba as nb
import numpy as np
import torch

from .projection import ALPHA_MAX, ALPHA_MIN, T_MIN

# numba's fallback threading layer (workqueue) aborts the process if two threads enter parallel kernels at once;
# Blender may render and draw the viewport from different threads, so kernel calls take turns.
KERNEL_LOCK = threading.Lock()


@nb.njit(cache=True, nogil=True)
def _tile_rect(x: float, y: float, rx: int, ry: int, tile_size: int, tiles_x: int, tiles_y: int):
    x0 = min(max(int(math.floor((x - rx) / tile_size)), 0), tiles_x)
    x1 = min(max(int(math.ceil((x + rx) / tile_size)), 0), tiles_x)
    y0 = min(max(int(math.floor((y - ry) / tile_size)), 0), tiles_y)
    y1 = min(max(int(math.ceil((y + ry) / tile_size)), 0), tiles_y)
    return x0, x1, y0, y1


@nb.njit(cache=True, nogil=True)
def _radix_sort(keys, values):
    """Rows of `values` [n, 2] (int64) stably sorted by uint32 `keys`: three 11-bit LSD radix passes that carry
    the rows along, so every pass streams through memory."""
    n = keys.shape[0]
    k, v = keys.copy(), values.copy()
    k_out, v_out = np.empty_like(k), np.empty_like(v)
    for shift in (0, 11, 22):
        starts = np.zeros(2049, np.int64)
        for i in range(n):
            starts[((k[i] >> shift) & 2047) + 1] += 1
        for b in range(2048):
            starts[b + 1] += starts[b]
        for i in range(n):
            b = (k[i] >> shift) & 2047
            j = starts[b]
            k_out[j] = k[i]
            v_out[j, 0] = v[i, 0]
            v_out[j, 1] = v[i, 1]
            starts[b] = j + 1
        k, k_out = k_out, k
        v, v_out = v_out, v
    return v


@nb.njit(cache=True, nogil=True)
def bin_gaussians(means2d, radii, depths, tile_size, tiles_x, tiles_y):
    """Per-tile lists of the Gaussians with non-zero radii, each front to back (equal depths keep index order).

    In memory order, each visible Gaussian's index and tile rectangle are packed into two int64s; a radix sort by
    depth carries them along, so the counting sort by tile that follows streams instead of jumping around memory.
    Returns (offsets [tiles+1], ids [intersections]); tile t owns ids[offsets[t]:offsets[t+1]].
    """
    n = means2d.shape[0]
    keys = np.empty(n, np.uint32)
    rows = np.empty((n, 2), np.int64)  # (index << 32 | x0 << 16 | x1, y0 << 16 | y1); tiles per side < 2^16
    counts = np.zeros(tiles_x * tiles_y + 1, np.int64)
    m = 0
    for g in range(n):
        if radii[g, 0] <= 0 or radii[g, 1] <= 0:
            continue
        x0, x1, y0, y1 = _tile_rect(means2d[g, 0], means2d[g, 1], radii[g, 0], radii[g, 1], tile_size, tiles_x, tiles_y)
        for ty in range(y0, y1):
            for tx in range(x0, x1):
                counts[ty * tiles_x + tx + 1] += 1
        # Visible depths are positive, and positive float32 bit patterns sort like the numbers they encode.
        keys[m] = np.float32(depths[g]).view(np.uint32)
        rows[m, 0] = (np.int64(g) << 32) | (np.int64(x0) << 16) | x1
        rows[m, 1] = (np.int64(y0) << 16) | y1
        m += 1
    rows = _radix_sort(keys[:m], rows[:m])
    offsets = np.cumsum(counts)
    cursor = offsets[:-1].copy()
    ids = np.empty(offsets[-1], np.int32)
    for i in range(m):
        g = np.int32(rows[i, 0] >> 32)
        x0, x1 = (rows[i, 0] >> 16) & 0xFFFF, rows[i, 0] & 0xFFFF
        y0, y1 = rows[i, 1] >> 16, rows[i, 1] & 0xFFFF
        for ty in range(y0, y1):
            for tx in range(x0, x1):
                t = ty * tiles_x + tx
                ids[cursor[t]] = g
                cursor[t] += 1
    return offsets, ids


PARAMS = 8  # packed row: mean x, mean y, conic a, b, c, opacity, sigma_max, box half-height; then features


@nb.njit(parallel=True, cache=True, nogil=True)
def pack_gaussians(means2d, conics, opacities, radii, feats):
    """One row per Gaussian with everything the pixel loops read, so fetching a Gaussian costs one cache miss, not
    five (tiles visit Gaussians in depth order, which is random in memory).

    Besides the inputs each row holds sigma_max = ln(255 o), beyond which alpha < 1/255, and the box half-height
    (from the projection), beyond which no row of the Gaussian reaches that alpha.
    """
    n, k = feats.shape
    packed = np.empty((n, PARAMS + k), feats.dtype)
    for g in nb.prange(n):
        a, b, c, o = conics[g, 0], conics[g, 1], conics[g, 2], opacities[g]
        sigma_max = math.log(max(o, 1e-30) / ALPHA_MIN)
        packed[g, 0] = means2d[g, 0]
        packed[g, 1] = means2d[g, 1]
        packed[g, 2] = a
        packed[g, 3] = b
        packed[g, 4] = c
        packed[g, 5] = o
        packed[g, 6] = sigma_max
        packed[g, 7] = radii[g, 1]
        for i in range(k):
            packed[g, PARAMS + i] = feats[g, i]
    return packed


@nb.njit(cache=True, nogil=True, inline="always")
def _tile(packed, ids, start, end, t, tiles_x, tile_size, width):
    """What both passes need for tile t: its Gaussians copied into one contiguous block (so the pixel loops stream
    through cache) as (params [n, PARAMS], features [n, K]) views, span buffers, and the tile's pixel bounds."""
    n = end - start
    local = np.empty((n, packed.shape[1]), packed.dtype)
    for j in range(n):
        local[j, :] = packed[ids[start + j], :]
    x_start = (t % tiles_x) * tile_size
    y_start = (t // tiles_x) * tile_size
    return (local[:, :PARAMS], local[:, PARAMS:], np.empty(n, np.int32), np.empty(n, np.int32),
            np.empty(n, np.int32), x_start, min(x_start + tile_size, width), y_start)


@nb.njit(cache=True, nogil=True, inline="always")
def _row_spans(params, fy, x_start, x_end, rows, span_lo, span_hi):
    """The Gaussians (tile-local index, in depth order) that can reach alpha 1/255 on the pixel row at height `fy`,
    each with the pixel columns it spans there.

    On a row, sigma(dx) = a/2 dx^2 + b dy dx + c/2 dy^2 is a parabola, so {sigma <= sigma_max} is an interval: solve
    for it and widen by one pixel (the per-pixel test stays exact; the span only has to contain every hit).
    """
    m = 0
    for j in range(params.shape[0]):
        dy = fy - params[j, 1]
        if abs(dy) > params[j, 7]:
            continue
        qa = 0.5 * params[j, 2]
        qb = params[j, 3] * dy
        qc = 0.5 * params[j, 4] * dy * dy - params[j, 6]
        disc = qb * qb - 4.0 * qa * qc
        if disc < 0.0 or qa <= 0.0:
            continue
        root = math.sqrt(disc)
        lo = params[j, 0] + (-qb - root) / (2.0 * qa)  # pixel-centre x where the span starts
        hi = params[j, 0] + (-qb + root) / (2.0 * qa)
        px_lo = max(x_start, int(math.floor(lo - 0.5)))
        px_hi = min(x_end - 1, int(math.ceil(hi - 0.5)))
        if px_lo > px_hi:
            continue
        rows[m] = j
        span_lo[m] = px_lo
        span_hi[m] = px_hi
        m += 1
    return m


@nb.njit(cache=True, nogil=True, inline="always")
def _span_start(params, j, fx, fy):
    """exp(-sigma) at the first pixel of a span, and the factors that step it one pixel right.

    Along a row sigma is quadratic in x, so exp(-sigma) moves right by multiplying with `step`, which itself is
    multiplied by `decay` = exp(-a) each pixel: two exps per span instead of one per pixel. Float64, so the recurrence
    loses nothing over the ~10 pixels of a span.
    """
    dx = fx - float(params[j, 0])
    dy = fy - float(params[j, 1])
    a, b, c = float(params[j, 2]), float(params[j, 3]), float(params[j, 4])
    sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
    return math.exp(-sigma), math.exp(-(a * dx + 0.5 * a + b * dy)), math.exp(-a), dy


@nb.njit(cache=True, nogil=True, inline="always")
def _alpha(params, j, gauss):
    """Gaussian j's alpha at a pixel where exp(-sigma) = gauss; 0 where it is skipped (alpha < 1/255)."""
    alpha = min(ALPHA_MAX, params[j, 5] * gauss)
    return alpha if alpha >= ALPHA_MIN else 0.0


@nb.njit(parallel=True, fastmath=True, cache=True, nogil=True)
def composite_forward(packed, offsets, ids, width, height, tile_size, tiles_x):
    """Front-to-back compositing. Returns (features [H,W,K], final transmittance [H,W], last [H,W]): `last` is one
    past the tile-local index of each pixel's last contributing Gaussian (0 if none), for the backward pass.

    Within a tile row the loop runs Gaussian by Gaussian (depth order) over the pixels each one spans, keeping every
    pixel's transmittance; each pixel therefore sees its Gaussians in the same order as a per-pixel loop would.
    """
    k = packed.shape[1] - PARAMS
    dtype = packed.dtype
    out = np.zeros((height, width, k), dtype)
    out_t = np.ones((height, width), dtype)
    last = np.zeros((height, width), np.int32)
    for t in nb.prange(offsets.shape[0] - 1):
        start, end = offsets[t], offsets[t + 1]
        if start == end:
            continue
        params, local_feats, rows, span_lo, span_hi, x_start, x_end, y_start = _tile(
            packed, ids, start, end, t, tiles_x, tile_size, width)
        trans = np.empty(tile_size, dtype)
        acc = np.empty((tile_size, k), dtype)
        used = np.empty(tile_size, np.int32)
        done = np.empty(tile_size, np.bool_)
        for py in range(y_start, min(y_start + tile_size, height)):
            fy = py + 0.5
            m = _row_spans(params, fy, x_start, x_end, rows, span_lo, span_hi)
            trans[:] = 1.0
            acc[:, :] = 0.0
            used[:] = 0
            done[:] = False
            n_done = 0
            for r in range(m):
                j = rows[r]
                gauss, step, decay, dy = _span_start(params, j, span_lo[r] + 0.5, fy)
                for px in range(span_lo[r], span_hi[r] + 1):
                    i = px - x_start
                    alpha = _alpha(params, j, gauss)
                    gauss *= step
                    step *= decay
                    if alpha == 0.0 or done[i]:
                        continue
                    next_t = trans[i] * (1.0 - alpha)
                    if next_t <= T_MIN:
                        done[i] = True
                        n_done += 1
                        continue
                    w = alpha * trans[i]
                    for c in range(k):
                        acc[i, c] += w * local_feats[j, c]
                    trans[i] = next_t
                    used[i] = j + 1
                if n_done == x_end - x_start:
                    break
            for px in range(x_start, x_end):
                i = px - x_start
                for c in range(k):
                    out[py, px, c] = acc[i, c]
                out_t[py, px] = trans[i]
                last[py, px] = used[i]
    return out, out_t, last


@nb.njit(parallel=True, fastmath=True, cache=True, nogil=True)
def composite_backward(packed, offsets, ids, width, height, tile_size, tiles_x, out_t, last, grad_out, grad_alpha):
    """Gradients of a loss w.r.t. means2d, conics, opacities and features, from d loss / d (features, alpha).

    Walks each row's spans back to front, recovering each pixel's transmittance by division (as gsplat does). A
    pixel's contributors are recognised by Gaussian index (< last), not by position in the span list, so a span list
    that rounds differently from the forward pass's cannot shift gradients onto the wrong Gaussians.
    """
    k = packed.shape[1] - PARAMS
    dtype = packed.dtype
    n_isect = ids.shape[0]
    g_geom = np.zeros((n_isect, 6), dtype)  # d/d (mean x, mean y, conic a, b, c, opacity) per intersection
    g_feat = np.zeros((n_isect, k), dtype)
    for t in nb.prange(offsets.shape[0] - 1):
        start, end = offsets[t], offsets[t + 1]
        if start == end:
            continue
        params, local_feats, rows, span_lo, span_hi, x_start, x_end, y_start = _tile(
            packed, ids, start, end, t, tiles_x, tile_size, width)
        trans = np.empty(tile_size, dtype)
        suffix = np.empty((tile_size, k), dtype)  # per pixel: sum over the Gaussians behind of feature * weight
        span_feat = np.empty(k, dtype)
        for py in range(y_start, min(y_start + tile_size, height)):
            fy = py + 0.5
            m = _row_spans(params, fy, x_start, x_end, rows, span_lo, span_hi)
            used = 0  # Gaussians behind every pixel's last contributor (early termination) need no visit
            for px in range(x_start, x_end):
                trans[px - x_start] = out_t[py, px]
                used = max(used, last[py, px])
            suffix[:, :] = 0.0
            for r in range(m - 1, -1, -1):
                j = rows[r]
                if j >= used:
                    continue
                gauss, step, decay, dy = _span_start(params, j, span_lo[r] + 0.5, fy)
                # Along a span dy is fixed, so the geometry gradients need only these sums over its pixels:
                # d_sigma, d_sigma * dx, d_sigma * dx^2 and d_alpha * exp(-sigma). Written once per span.
                s0 = s1 = s2 = s_opacity = 0.0
                span_feat[:] = 0.0
                for px in range(span_lo[r], span_hi[r] + 1):
                    g_px = gauss
                    alpha = _alpha(params, j, gauss)
                    gauss *= step
                    step *= decay
                    if alpha == 0.0 or j >= last[py, px]:
                        continue
                    i = px - x_start
                    one_minus = 1.0 - alpha
                    trans[i] = trans[i] / one_minus  # transmittance in front of this Gaussian
                    w = alpha * trans[i]
                    d_alpha = grad_alpha[py, px] * out_t[py, px] / one_minus
                    for c in range(k):
                        g = grad_out[py, px, c]
                        span_feat[c] += g * w
                        d_alpha += g * (local_feats[j, c] * trans[i] - suffix[i, c] / one_minus)
                        suffix[i, c] += local_feats[j, c] * w
                    if alpha >= ALPHA_MAX:
                        continue  # clamped: alpha does not depend on the parameters here
                    dx = px + 0.5 - params[j, 0]
                    d_sigma = -d_alpha * alpha
                    s_opacity += d_alpha * g_px
                    s0 += d_sigma
                    s1 += d_sigma * dx
                    s2 += d_sigma * dx * dx
                e = start + j
                a, b, c2 = params[j, 2], params[j, 3], params[j, 4]
                g_geom[e, 0] += -(a * s1 + b * dy * s0)
                g_geom[e, 1] += -(b * s1 + c2 * dy * s0)
                g_geom[e, 2] += 0.5 * s2
                g_geom[e, 3] += dy * s1
                g_geom[e, 4] += 0.5 * dy * dy * s0
                g_geom[e, 5] += s_opacity
                for c in range(k):
                    g_feat[e, c] += span_feat[c]
    return g_geom, g_feat


@nb.njit(cache=True, nogil=True)
def _sum_per_gaussian(ids, g_geom, g_feat, n):
    """Sum per-intersection gradients per Gaussian (sequential: it is bound by memory latency, not arithmetic)."""
    geom = np.zeros((n, 6), g_geom.dtype)
    feat = np.zeros((n, g_feat.shape[1]), g_feat.dtype)
    for e in range(ids.shape[0]):
        g = ids[e]
        for c in range(6):
            geom[g, c] += g_geom[e, c]
        for c in range(g_feat.shape[1]):
            feat[g, c] += g_feat[e, c]
    return geom, feat


@dataclass(frozen=True)
class TileBins:
    """Which Gaussians each tile composites: ids[offsets[t]:offsets[t+1]], front to back; plus the box radii."""

    offsets: np.ndarray
    ids: np.ndarray
    radii: np.ndarray
    width: int
    height: int
    tile_size: int

    @property
    def tiles_x(self) -> int:
        return -(-self.width // self.tile_size)


def bin_projected(means2d: np.ndarray, radii: np.ndarray, depths: np.ndarray, width: int, height: int,
                  tile_size: int) -> TileBins:
    """Tile lists for the Gaussians with non-zero radii, front to back (equal depths keep index order)."""
    tiles_x, tiles_y = -(-width // tile_size), -(-height // tile_size)
    with KERNEL_LOCK:
        offsets, ids = bin_gaussians(means2d, radii, depths, tile_size, tiles_x, tiles_y)
    return TileBins(offsets, ids, radii, width, height, tile_size)


class CompositeCPU(torch.autograd.Function):
    """Differentiable CPU compositing: (means2d, conics, opacities, features) -> (features image, alpha image)."""

    @staticmethod
    def forward(ctx, means2d, conics, opacities, feats, bins: TileBins):
        arrays = [x.detach().contiguous().numpy() for x in (means2d, conics, opacities)]
        layout = (bins.offsets, bins.ids, bins.width, bins.height, bins.tile_size, bins.tiles_x)
        with KERNEL_LOCK:
            packed = pack_gaussians(*arrays, bins.radii, feats.detach().contiguous().numpy())
            out, out_t, last = composite_forward(packed, *layout)
        ctx.saved = (packed, layout, out_t, last)
        return torch.from_numpy(out), 1.0 - torch.from_numpy(out_t)

    @staticmethod
    def backward(ctx, grad_out, grad_alpha):
        packed, layout, out_t, last = ctx.saved
        dtype = torch.from_numpy(packed[:0]).dtype
        g_out = grad_out.detach().to(dtype).contiguous().numpy()
        g_alpha = grad_alpha.detach().to(dtype).contiguous().numpy()
        with KERNEL_LOCK:
            g_geom, g_feat = composite_backward(packed, *layout, out_t, last, g_out, g_alpha)
            sums = _sum_per_gaussian(layout[1], g_geom, g_feat, packed.shape[0])
        geom, feat = (torch.from_numpy(a) for a in sums)
        return geom[:, 0:2], geom[:, 2:5], geom[:, 5], feat, None
