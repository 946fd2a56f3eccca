"""An object's views -> its latents: the LH latent from the uniformly lit views with near-tiny's trained encoder
(`models.encoder`), and the material latents lifted from its material G-buffers (Cycles AOVs)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..camera import Camera
from ..models.encoder import lift_features
from ..models.gaussian_heads import MATERIAL_CHANNELS, voxel_centres
from ..sparse import SparseTensor

if TYPE_CHECKING:
    from ..asset import Asset
    from ..gaussians import Gaussians
    from ..pipeline import NearPipeline

__all__ = ["encode_views", "lift_materials", "lift_surfel_materials", "fit_surfel_materials", "material_extras",
           "fit_asset_materials"]

#: The G-buffers the material latents are lifted from, in the latents' channel order (`frame.MATERIAL_LATENTS`).
MATERIAL_GBUFFERS: tuple[str, ...] = ("base_color", "roughness", "metallic", "specular")


def encode_views(networks: Mapping[str, nn.Module], coords: np.ndarray, rgba: torch.Tensor,
                 cameras: Sequence[Camera], depth: torch.Tensor | None = None, resolution: int = 64) -> torch.Tensor:
    """The LH latent [N, latent_channels] of the voxels `coords` int [N, 3] (asset space = the cameras' world).

    `rgba` [V, H, W, 4]: the uniformly lit views, scene-linear, premultiplied; `depth` [V, H, W]: their depth passes
    (camera z of the first hit), used to skip views where a voxel is hidden. `networks` holds "image_features" and
    "encoder". Differentiable in the networks' parameters; row i of the result belongs to `coords[i]`.
    """
    features, encoder = networks["image_features"], networks["encoder"]
    weight = next(encoder.parameters())
    coords_t = torch.as_tensor(np.asarray(coords), dtype=torch.int32, device=weight.device)
    points = voxel_centres(coords_t, resolution).to(weight)
    maps = features(rgba.to(weight))
    depth = None if depth is None else depth.to(weight)
    lifted = lift_features(maps, points, cameras, depth, tolerance=2.0 / resolution)
    return encoder(SparseTensor.from_list([(coords_t, lifted)], resolution)).feats


def _lift_gbuffers(gbuffers: Mapping[str, torch.Tensor], alpha: torch.Tensor, cameras: Sequence[Camera],
                   depth: torch.Tensor | None, points: torch.Tensor, tolerance: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(materials [P, 6], seen [P, 1] bool) of the asset-space `points` from the premultiplied G-buffers: lifted
    with their alpha and divided by it, so edge pixels count at their true value."""
    maps = torch.cat([gbuffers[name].float() if gbuffers[name].ndim == 4 else gbuffers[name][..., None].float()
                      for name in MATERIAL_GBUFFERS] + [alpha.float()], -1).permute(0, 3, 1, 2)
    lifted = lift_features(maps, points.float(), cameras, None if depth is None else depth.float(), tolerance)
    covered = lifted[:, -1:]
    return (lifted[:, :-1] / covered.clamp_min(1e-6)).clamp(0.0, 1.0), covered > 1e-3


def lift_materials(gbuffers: Mapping[str, torch.Tensor], alpha: torch.Tensor, cameras: Sequence[Camera],
                   depth: torch.Tensor | None, coords: np.ndarray, resolution: int = 64) -> np.ndarray:
    """near-tiny's material latents [N, 6] (float32): each voxel's base colour (linear RGB), roughness, metallic and
    Specular IOR Level, averaged over the views that see it.

    `gbuffers[name]` [V, H, W, k] are the Cycles AOVs of those views, premultiplied by `alpha` [V, H, W, 1] as Cycles
    filters them. A voxel no view sees gets the mean material of those seen (Blender's default material,
    `frame.DEFAULT_MATERIAL`, when none is).
    """
    from ..frame import DEFAULT_MATERIAL

    points = voxel_centres(torch.as_tensor(np.asarray(coords), dtype=torch.int32), resolution)
    values, seen = _lift_gbuffers(gbuffers, alpha, cameras, depth, points, 2.0 / resolution)
    default = (values * seen).sum(0) / seen.sum() if bool(seen.any()) else torch.tensor(DEFAULT_MATERIAL)
    return torch.where(seen, values, default).numpy().astype(np.float32)


def lift_surfel_materials(gbuffers: Mapping[str, torch.Tensor], alpha: torch.Tensor, cameras: Sequence[Camera],
                          depth: torch.Tensor | None, coords: np.ndarray, surfels: np.ndarray,
                          voxel_materials: np.ndarray, resolution: int = 64) -> np.ndarray:
    """The materials at each surfel's centre [N, PER_VOXEL * 6] (the asset extra `frame.SURFEL_MATERIALS`).

    A voxel centre lies up to a voxel off the surface, so its projections into the views land on different surface
    points, whose average blurs painted lines over about a voxel; a surfel's centre lies on the surface, where the
    views agree, and there are four of them per voxel. A surfel no view sees takes its voxel's material."""
    from ..surfels import PER_VOXEL, surfel_centres

    points = torch.from_numpy(surfel_centres(coords, surfels, resolution))
    values, seen = _lift_gbuffers(gbuffers, alpha, cameras, depth, points, 1.0 / resolution)
    fallback = torch.from_numpy(np.repeat(np.asarray(voxel_materials, np.float32), PER_VOXEL, 0))
    return torch.where(seen, values, fallback).reshape(len(coords), -1).numpy().astype(np.float32)


#: Sweeps of `fit_surfel_materials` over all views (on a one-view closed form, `tests/test_material_fit.py`, 20 sweeps
#: come within 2 % of the error that 100 reach).
FIT_SWEEPS = 20
#: How strongly a surfel's fitted material is held to the one sampled at its centre, as a share of the pixel weight
#: an average surfel gathers: it decides surfels that few solid pixels see, and damps the fit's ringing.
FIT_ANCHOR = 0.05
#: Only pixels that both the view and the surfels cover this fully constrain the fit: an outline pixel mixes the
#: surface with the background in proportions the two disagree on.
SOLID = 0.99
#: Views larger than this (pixels, the longer side) are fitted box-filtered down to it: four surfels a voxel of the
#: 64^3 grid resolve no finer, and the fit's cost grows with the pixels.
FIT_SIZE = 256


def fit_surfel_materials(sampled: np.ndarray, gaussians: "Gaussians", gbuffers: Mapping[str, torch.Tensor],
                         alpha: torch.Tensor, cameras: Sequence[Camera], sweeps: int = FIT_SWEEPS,
                         step: Callable[[], object] | None = None, filter_2d: float = 0.3) -> np.ndarray:
    """The materials at the surfels [N, PER_VOXEL * 6] that, drawn by `gaussians` (the intrinsic Gaussians a
    renderer makes of the asset, one per surfel in order, in the cameras' frame), best reproduce the views'
    G-buffers; `sampled` (`lift_surfel_materials`) is where the fit starts and what it holds surfels few pixels see
    to.

    A G-buffer pixel is already the surface filtered by the film's pixel filter. Sampled at a surfel's centre and
    drawn again by a Gaussian as wide as the surfel, a painted line is blurred twice: a held-out object's fine stripes
    lost most of their contrast. The views are linear in the surfels' materials (each pixel a fixed blend of the
    Gaussians over it), so the materials that reproduce them are a least-squares problem, solved here by Jacobi
    sweeps (each surfel's step is its residual's back-projection over the pixel weight it gathers), with the
    rasterizer's own backward pass as the transpose. Only solid, finite pixels count (`SOLID`), and views larger
    than `FIT_SIZE` count box-filtered down to it. All views share one size. `step()` is called after each sweep.
    `filter_2d`: the renderer's 2D low-pass (`frame.filter_2d`), so the Gaussians are drawn as it draws them."""
    from ..raster import rasterize

    means, quats, scales, opacities = (t.detach().float().cpu() for t in (gaussians.means, gaussians.quats,
                                                                           gaussians.scales, gaussians.opacities))
    shape = np.shape(sampled)
    start = torch.from_numpy(np.array(sampled, np.float32).reshape(-1, MATERIAL_CHANNELS))
    targets = torch.cat([gbuffers[name].float() if gbuffers[name].ndim == 4 else gbuffers[name][..., None].float()
                         for name in MATERIAL_GBUFFERS] + [alpha.float()], -1)
    if len(start) != len(means) or targets.shape[0] != len(cameras):
        raise ValueError(f"{len(start)} sampled materials for {len(means)} surfels, {targets.shape[0]} G-buffer views "
                         f"for {len(cameras)} cameras")
    side = max(targets.shape[1:3])
    if side > FIT_SIZE:
        cameras = [camera.scaled(FIT_SIZE / side) for camera in cameras]
        size = (cameras[0].height, cameras[0].width)
        targets = F.interpolate(targets.permute(0, 3, 1, 2), size=size, mode="area").permute(0, 2, 3, 1)
    targets, alpha = targets[..., :-1], targets[..., -1:]
    finite = torch.isfinite(targets).all(-1, keepdim=True) & torch.isfinite(alpha)  # a broken pixel constrains nothing
    targets, alpha = torch.nan_to_num(targets), torch.where(finite, alpha, torch.zeros_like(alpha))

    def draw(values: torch.Tensor, view: int):
        return rasterize(means, quats, scales, opacities, values, cameras[view], eps2d=filter_2d, backend="cpu")

    with torch.enable_grad():
        masks, gathered = [], torch.zeros(len(start), 1)
        for view in range(len(cameras)):  # the pixel weight each surfel gathers: A^T (m A 1)
            ones = torch.ones(len(start), 1, requires_grad=True)
            out = draw(ones, view)
            mask = ((out.alpha > SOLID) & (alpha[view] > SOLID)).float()
            masks.append(mask)
            gathered += torch.autograd.grad((out.channels * mask * out.channels.detach()).sum(), ones)[0]
        anchor = FIT_ANCHOR * gathered[gathered > 0].mean() if bool((gathered > 0).any()) else torch.tensor(1.0)
        values = start.clone()
        for _ in range(sweeps):
            values.requires_grad_(True)
            update = torch.zeros_like(start)
            for view, mask in enumerate(masks):
                out = draw(values, view)
                residual = (out.channels - targets[view]) * mask
                update += torch.autograd.grad((out.channels * residual.detach()).sum(), values)[0]
            with torch.no_grad():
                values = (values - (update + anchor * (values - start)) / (gathered + anchor)).clamp(0.0, 1.0)
            if step is not None:
                step()
    return values.detach().reshape(shape).numpy().astype(np.float32)


def material_extras(gbuffers: Mapping[str, torch.Tensor], alpha: torch.Tensor, cameras: Sequence[Camera],
                    depth: torch.Tensor | None, coords: np.ndarray, surfels: np.ndarray | None,
                    resolution: int = 64) -> dict[str, np.ndarray]:
    """An asset's material extras from its views' G-buffers: the material latents ("base_color", "material") and,
    where the surfels are known, the materials at them (`frame.SURFEL_MATERIALS`), sampled at their centres (a
    renderer then fits them to the views: `fit_asset_materials`)."""
    from ..frame import SURFEL_MATERIALS

    materials = lift_materials(gbuffers, alpha, cameras, depth, coords, resolution)
    extras = {"base_color": materials[:, :3], "material": materials[:, 3:]}
    if surfels is not None:
        extras[SURFEL_MATERIALS] = lift_surfel_materials(gbuffers, alpha, cameras, depth, coords, surfels, materials,
                                                         resolution)
    return extras


def fit_asset_materials(pipeline: "NearPipeline", asset: "Asset", gbuffers: Mapping[str, torch.Tensor],
                        alpha: torch.Tensor, cameras: Sequence[Camera], step: Callable[[], object] | None = None
                        ) -> "Asset":
    """`asset` with the materials at its surfels fitted (`fit_surfel_materials`) to the G-buffers of the views
    `cameras`, as `pipeline`'s renderer draws them: its Gaussians under the uniform world the views were lit by,
    seen from the first camera (the LAD moves them from the surfels by up to half a voxel, and a fit to the surfels
    themselves sharpened stripes where they are not drawn: 28.97 dB against 29.16 unfitted on held-out objects).
    Unchanged for weights without the PBR core or an asset without materials at its surfels. `step()` is called
    after each of the fit's sweeps."""
    import dataclasses

    from ..envmap import EnvMap
    from ..frame import SURFEL_MATERIALS, filter_2d
    from ..pipeline import Scene

    if not cameras or SURFEL_MATERIALS not in asset.extras or not pipeline.pbr_core or pipeline.placement != "surfels":
        return asset
    scene = Scene([(asset, np.eye(4))], EnvMap.uniform(1.0, height=8), cameras[0], transparent=True)
    gaussians = pipeline.gaussians(scene).intrinsic
    fitted = fit_surfel_materials(asset.extras[SURFEL_MATERIALS], gaussians, gbuffers, alpha, cameras, step=step,
                                  filter_2d=filter_2d(pipeline.networks))
    return dataclasses.replace(asset, extras={**asset.extras, SURFEL_MATERIALS: fitted})
