"""Image metrics of the evaluation: PSNR, SSIM (Wang et al. 2004) and HDR-FLIP where NVIDIA's package is installed.

* **Tone mapping.** PSNR and SSIM are LDR metrics. Like the paper's, they are computed on display images: the
  scene-linear renders go through Blender's "Standard" view transform (clip to [0, 1], sRGB encoding;
  `near_engine.images.linear_to_srgb`) before `psnr` / `ssim` see them, so both take images in [0, 1] (data range 1).
  HDR-FLIP (`flip`) takes the scene-linear images themselves: it tone-maps over a range of exposures internally.
* **SSIM** is the standard one: 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, per colour channel, averaged
  over channels. The SSIM map has the image's size: images are reflected at their borders before filtering (as
  scikit-image filters), so every pixel, the border ones included, has a value.
* **Masks** restrict a metric to a region (the object): PSNR is computed from the mean squared error over the masked
  pixels, SSIM and FLIP are the mean of their per-pixel maps over the masked pixels. The maps are computed on the
  whole image, so windows at the region's edge see their true surroundings.
"""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import torch

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two images as float64 [H, W, C] of equal shape ([H, W] gains a channel axis)."""
    a, b = (np.asarray(x, dtype=np.float64) for x in (a, b))
    if a.shape != b.shape or a.ndim not in (2, 3) or a.size == 0:
        raise ValueError(f"metrics compare two non-empty images [H, W] or [H, W, C] of one shape, got {a.shape} "
                         f"and {b.shape}")
    return (a[..., None], b[..., None]) if a.ndim == 2 else (a, b)


def _region(mask: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    """A boolean [H, W] mask (all pixels when None); an empty region is an error, not a silent NaN."""
    if mask is None:
        return np.ones(shape[:2], dtype=bool)
    region = np.asarray(mask, dtype=bool)
    if region.shape != shape[:2]:
        raise ValueError(f"the mask must be [H, W] = {list(shape[:2])}, got {list(region.shape)}")
    if not region.any():
        raise ValueError("the mask is empty: there is no region to measure")
    return region


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Peak signal-to-noise ratio in dB of two images in [0, 1] (data range 1), over `mask` if given; inf if equal."""
    a, b = _pair(a, b)
    mse = float(((a - b) ** 2)[_region(mask, a.shape)].mean())
    return math.inf if mse == 0.0 else -10.0 * math.log10(mse)


def _gaussian_blur(x: torch.Tensor) -> torch.Tensor:
    """Separable 11x11 Gaussian filter (sigma 1.5, weights sum to 1) of [C, 1, H, W], borders reflected."""
    r = SSIM_WINDOW // 2
    t = torch.arange(SSIM_WINDOW, dtype=x.dtype) - r
    g = torch.exp(-(t**2) / (2 * SSIM_SIGMA**2))
    g = g / g.sum()
    x = torch.nn.functional.pad(x, (r, r, r, r), mode="reflect")
    x = torch.nn.functional.conv2d(x, g.view(1, 1, 1, -1))
    return torch.nn.functional.conv2d(x, g.view(1, 1, -1, 1))


def ssim_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The SSIM map [H, W] of two images in [0, 1] (channel mean of the per-channel maps); symmetric in a and b."""
    a, b = _pair(a, b)
    if min(a.shape[:2]) <= SSIM_WINDOW // 2:
        raise ValueError(f"SSIM needs images larger than {SSIM_WINDOW // 2} pixels per side, got {list(a.shape[:2])}")
    x = torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))[:, None]
    y = torch.from_numpy(np.ascontiguousarray(b.transpose(2, 0, 1)))[:, None]
    mu_x, mu_y = _gaussian_blur(x), _gaussian_blur(y)
    var_x = _gaussian_blur(x * x) - mu_x**2
    var_y = _gaussian_blur(y * y) - mu_y**2
    cov = _gaussian_blur(x * y) - mu_x * mu_y
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s[:, 0].mean(dim=0).numpy()


def ssim(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean SSIM of two images in [0, 1], over `mask` if given (the map is computed on the whole image)."""
    s = ssim_map(a, b)
    return float(s[_region(mask, s.shape)].mean())


def flip_available() -> bool:
    """Whether NVIDIA's `flip_evaluator` (pip `flip-evaluator`, an optional extra) can be imported."""
    return importlib.util.find_spec("flip_evaluator") is not None


def flip(reference: np.ndarray, test: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean HDR-FLIP error (lower is better) of two scene-linear RGB images [H, W, 3], over `mask` if given.

    Negative values are clipped to 0 first (HDR-FLIP needs non-negative radiance). Needs `flip_evaluator`.
    """
    import flip_evaluator

    ref, tst = (np.ascontiguousarray(np.clip(x, 0.0, None), dtype=np.float32) for x in _pair(reference, test))
    error_map = np.asarray(flip_evaluator.evaluate(ref, tst, "HDR", applyMagma=False, computeMeanError=False)[0])
    error_map = error_map.reshape(ref.shape[:2])
    return float(error_map[_region(mask, ref.shape)].mean())
