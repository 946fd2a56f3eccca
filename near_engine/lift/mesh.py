"""Mesh -> `.near` asset: import and normalize, voxelize, render views with Cycles, lift and encode the latents.

The LH latent is encoded from views under uniform white light (world colour 1, strength 0.6), as NeAR's
illumination-homogenized latent is; the *shaded* latent (the paper's ablation) from the same views under an HDRI.
Both use near-tiny's trained image-feature network and encoder from the weights folder (`configs.ENCODER_KEYS`).
The material latents (`base_color`, `material`: roughness, metallic, specular level) are lifted from the same
views' material AOVs, rendered from the mesh's own materials (`cycles.materials.add_material_aovs`); the surfels
(`surfels`: where the surface lies in each voxel) come from the mesh itself.

A mesh with no surface is refused (`cycles.meshes.check_surface`); one whose voxels form a line is encoded with a
warning (`thin_shape_warning`): a few voxels across cannot hold much of an object.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..asset import Asset
from ..configs import ENCODER_KEYS, load_networks
from ..errors import NearError
from ..progress import Progress

#: Views of the object on a Hammersley sphere (radius 2, 40 degrees), as in the training data.
DEFAULT_VIEWS = 24


@dataclass(frozen=True)
class ShadedLight:
    """The HDRI that lights the views of a shaded latent (a bundled Blender HDRI name, Mapping rotation, strength)."""

    hdri: str
    rotation_z: float = 0.0
    strength: float = 1.0


def encode_mesh(mesh: str | Path, weights: str | Path, *, views: int = DEFAULT_VIEWS, size: int = 256,
                samples: int = 32, shaded: ShadedLight | None = None, device: str = "cpu",
                log: Callable[[str], object] = print) -> Asset:
    """The asset of the mesh file `mesh` (OBJ, glTF/GLB, PLY, .blend) encoded with the encoder in `weights`."""
    from ..cycles.lights import Light
    from ..cycles.meshes import import_mesh
    from ..cycles.render import image_count, read_uniform_views, render_views
    from ..cycles.settings import RenderSettings
    from ..cycles.views import view_cameras
    from ..exr_layers import read_channels, stack_channels
    from ..pipeline import NearPipeline
    from .encode import FIT_SWEEPS, MATERIAL_GBUFFERS, encode_views, fit_asset_materials, material_extras
    from ..surfels import EXTRA_NAME as SURFELS, mesh_surfels
    from ..voxelize import voxelize_mesh

    if views < 1 or size < 8 or samples < 1:
        raise NearError(f"encode-mesh needs at least 1 view, 8 px and 1 sample (got {views}, {size}, {samples})")
    networks, _ = load_networks(weights, device, keys=ENCODER_KEYS)
    resolution = int(networks["encoder"].resolution)
    mesh = Path(mesh)
    vertices, triangles = import_mesh(mesh)
    coords = voxelize_mesh(vertices, triangles, resolution)
    log(f"{mesh.name}: {len(vertices)} vertices -> {len(coords)} voxels on a {resolution}^3 grid")
    warning = thin_shape_warning(coords)
    if warning:
        log(f"warning: {mesh.name}: {warning}")
    cameras = view_cameras(views, (0.5, 0.5), size)
    lights = [] if shaded is None else [Light("hdri", shaded.hdri, shaded.rotation_z, shaded.strength)]
    with tempfile.TemporaryDirectory() as tmp:
        with Progress(f"{mesh.name}: rendering views with Cycles", image_count(views, len(lights), views)) as bar:
            render_views(cameras, lights, list(range(views)) if lights else [], Path(tmp),
                         RenderSettings(size, samples), bar)
        uniform = {k: torch.from_numpy(v) for k, v in read_uniform_views(Path(tmp), views).items()}
        rgba = uniform["rgba"] if not lights else torch.from_numpy(np.stack([
            stack_channels(read_channels(Path(tmp) / lights[0].name / f"view_{v:03d}.exr"), "", "RGBA")
            for v in range(views)]))
    depth, alpha = uniform["depth"], uniform["alpha"]
    gbuffers = {name: uniform[name] for name in MATERIAL_GBUFFERS}
    log(f"{mesh.name}: encoding the latent from {views} views")
    with torch.no_grad():
        latent = encode_views(networks, coords, rgba, cameras, depth, resolution)
    surfels = mesh_surfels(vertices, triangles, coords, resolution)
    extras = material_extras(gbuffers, alpha, cameras, depth, coords, surfels, resolution)
    digest = hashlib.sha256(mesh.read_bytes()).hexdigest()[:16]
    asset = Asset(coords, latent.cpu().numpy(), resolution=resolution, extras={**extras, SURFELS: surfels},
                  latent="lh-slat" if shaded is None else f"shaded-slat:{shaded.hdri}",
                  model=Path(weights).name, source=f"mesh:{mesh.name}:sha256:{digest}")
    log(f"{mesh.name}: fitting the materials to the views")
    pipeline = NearPipeline.from_pretrained(weights, device)
    with Progress(f"{mesh.name}: least-squares sweeps", FIT_SWEEPS) as bar:
        return fit_asset_materials(pipeline, asset, gbuffers, alpha, cameras, step=bar.advance)


#: Voxels that spread less than this across their second-widest direction form a line, not a shape.
LINE_SPREAD_VOXELS = 1.0


def thin_shape_warning(coords: np.ndarray) -> str | None:
    """What is odd about voxels `coords` [N, 3] that form a line (their spread across the second principal direction
    is under `LINE_SPREAD_VOXELS`), or None for a shape with area or volume."""
    if len(coords) < 2:
        return f"it covers {len(coords)} voxel(s) only: the asset will be a dot"
    centred = coords.astype(np.float64) - coords.mean(axis=0)
    variances = np.clip(np.linalg.eigvalsh(centred.T @ centred / len(coords)), 0, None)
    spread = np.sqrt(variances)[::-1]  # widest direction first
    if spread[1] < LINE_SPREAD_VOXELS:
        return (f"its {len(coords)} voxels form a line (about {spread[1]:.1f} voxel across): the mesh is a line or a "
                "sliver with almost no area, and the asset will be a thin stick")
    return None
