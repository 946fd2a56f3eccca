"""Stage 1, one home for image -> asset and mesh -> asset.

`lift_image` turns one photo into a relightable asset in the three named stages of TRELLIS's image pipeline:

1. `prepare_image`: alpha from the image or a one-colour backdrop, the 1.2x square crop matted on black
   (`image.prepare_photo`);
2. `sample_structure`: the surface voxels on the 64^3 grid from one of the geometry sources (`GEOMETRY_SOURCES`,
   see `geometry`), and the camera of the prepared photo (`views`);
3. `sample_latent`: the LH latent and the material latents from the photo under its unknown light (near-tiny's
   regressor, `regressor`; the official flow model, `official`).

`mesh.encode_mesh` is the other way in: a mesh rendered under uniform light with Cycles and encoded.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..asset import Asset
from ..camera import Camera
from ..errors import NearError
from ..surfels import EXTRA_NAME as SURFELS

__all__ = ["GEOMETRY_SOURCES", "LiftCancelled", "LiftRequest", "lift_image", "prepare_image", "sample_structure",
           "sample_latent", "photo_camera"]

#: Where the voxels come from: a mesh the user gives, near-tiny's own model, the silhouette-inflation baseline, or
#: the official TRELLIS sparse-structure flow.
GEOMETRY_SOURCES: tuple[str, ...] = ("mesh", "own", "inflate", "trellis")
#: Size of the photo near-tiny's lift reads (its image features are one per voxel of the 64^3 grid).
LIFT_SIZE = 128
#: Size of the same crop the surfels' colours are read from: a surfel is half a voxel, so 128 px would blur them.
DETAIL_SIZE = 512
#: Without a mesh, the object's silhouette box spans this many asset units at the origin (a normalized object's
#: largest side is 1).
PHOTO_OBJECT_EXTENT = 0.95


class LiftCancelled(NearError):
    """The user cancelled the lift (Esc in Blender); nothing was written."""


@dataclass(frozen=True)
class LiftRequest:
    """What to lift and how. `mesh`: a mesh file, or (vertices [V, 3], triangles [T, 3]) in any placement;
    `mesh_rotation`: degrees about Z that turn the mesh to face the photo's camera (-Y); `elevation`: the photo's
    camera elevation in degrees (`views.front_camera`)."""

    image: str | Path
    weights: str | Path = "near-tiny"
    geometry: str | None = None  # None: "mesh" when a mesh is given, else "own"
    mesh: str | Path | tuple[np.ndarray, np.ndarray] | None = None
    mesh_rotation: float = 0.0
    elevation: float = 0.0
    seed: int = 0
    trellis: str | Path | None = None  # a TRELLIS-image-large folder: the sparse-structure flow and decoder
    dinov2: str | Path | None = None  # the DINOv2 ViT-L/14-reg weights file (else looked for in the folders)

    @property
    def source(self) -> str:
        source = self.geometry or ("mesh" if self.mesh is not None else "own")
        if source not in GEOMETRY_SOURCES:
            raise NearError(f"unknown geometry source {source!r}; choose one of {', '.join(GEOMETRY_SOURCES)}")
        if (source == "mesh") != (self.mesh is not None):
            raise NearError("the mesh geometry source needs a mesh to take the voxels from" if source == "mesh"
                            else f"a mesh was given, but the geometry source is {source!r}: choose the mesh source, "
                            "or leave the mesh out")
        return source


Progress = Callable[[str, float], object]  # (stage, fraction of the whole lift done)


def photo_camera(elevation: float, size: int = LIFT_SIZE) -> Camera:
    """The camera of a prepared photo when no mesh frames it: the convention's front view, zoomed so the square
    spans `image.CROP_MARGIN` x `PHOTO_OBJECT_EXTENT` asset units at the origin."""
    from .image import CROP_MARGIN
    from .views import front_camera

    camera = front_camera(elevation, size)
    distance = float(camera.world_to_camera[2, 3])
    focal = size * distance / (CROP_MARGIN * PHOTO_OBJECT_EXTENT)
    return Camera(size, size, focal, focal, size / 2, size / 2, camera.world_to_camera, camera.near, camera.far)


def prepare_image(request: LiftRequest, size: int = LIFT_SIZE):
    """Stage 1: the prepared photo (`image.PreparedPhoto`)."""
    from .image import prepare_photo

    return prepare_photo(request.image, size)


def sample_structure(request: LiftRequest, photo, networks: dict, resolution: int = 64
                     ) -> tuple[np.ndarray, Camera, np.ndarray | None]:
    """Stage 2: (surface voxels [N, 3], the camera of the prepared photo, their surfels: on the mesh, or on the
    predicted or inflated surface)."""
    from .geometry import inflate_silhouette, mesh_geometry, triangles_geometry
    from .views import fit_crop_camera, front_camera

    source = request.source
    size = photo.rgba.shape[0]
    if source == "mesh":
        if isinstance(request.mesh, tuple):
            coords, surfels = triangles_geometry(*request.mesh, request.mesh_rotation, resolution,
                                                 "the selected mesh")
        else:
            coords, surfels = mesh_geometry(request.mesh, request.mesh_rotation, resolution)
        return coords, fit_crop_camera(front_camera(request.elevation, size), coords, resolution, size), surfels
    camera = photo_camera(request.elevation, size)
    if source == "inflate":
        coords, surfels = inflate_silhouette(photo.rgba[..., 3], camera, resolution, with_surfels=True)
        return coords, camera, surfels
    if source == "own":
        from .occupancy import predict_geometry

        if "occupancy" not in networks:
            raise NearError("these weights have no geometry model of their own (occupancy): take the geometry "
                            "from a mesh, or from the inflated silhouette")
        coords, surfels = predict_geometry(networks["occupancy"], photo.rgba, camera, resolution, with_surfels=True)
        return coords, camera, surfels
    raise NearError("internal: the trellis structure is sampled by `lift_image`")


def sample_latent(networks: dict, coords: np.ndarray, photo: np.ndarray, camera: Camera, resolution: int = 64,
                  surfels: np.ndarray | None = None, detail: np.ndarray | None = None
                  ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Stage 3: (LH latent [N, 8], material extras) of the prepared photo [S, S, 4] seen by `camera`, with
    near-tiny's regressor. With the `surfels`, the extras hold the materials at them as well
    (`regressor.surfel_materials_from_photo`), read from `detail`, the same crop prepared sharper (default: the
    photo), and the voxels' materials are their surfels' mean."""
    from ..frame import SURFEL_MATERIALS
    from ..surfels import PER_VOXEL
    from .regressor import predict_latents, surfel_materials_from_photo

    with torch.no_grad():
        latent, materials, gain = predict_latents(networks, coords, torch.from_numpy(photo), camera, resolution,
                                                  with_gain=True)
        extras = {}
        if surfels is not None:
            sharp = photo if detail is None else detail
            per_surfel = surfel_materials_from_photo(torch.from_numpy(sharp), camera.scaled(
                sharp.shape[0] / photo.shape[0]), coords, surfels, materials, gain, resolution,
                networks.get(LIGHT_PRIOR_KEY))
            materials = per_surfel.reshape(len(coords), PER_VOXEL, -1).mean(1)
            extras[SURFEL_MATERIALS] = per_surfel.reshape(len(coords), -1).numpy().astype(np.float32)
    materials = materials.numpy().astype(np.float32)
    return latent.numpy().astype(np.float32), {"base_color": materials[:, :3], "material": materials[:, 3:],
                                               **extras}


#: The lift's light prior (`delight.LightPrior`) in a weights folder, and its key among the lift's networks.
LIGHT_PRIOR_FILE = "lift_light_prior.json"
LIGHT_PRIOR_KEY = "light_prior"


def load_lift_networks(weights: str | Path, geometry: str) -> dict:
    """The regressor (and near-tiny's own geometry model when asked for) from a weights folder, with a clear error
    when the folder has none, and the prior over lights the lift takes the photo's light out with when the folder
    has one (`LIGHT_PRIOR_FILE`)."""
    import json

    from ..bundled import weights_folder
    from ..configs import load_networks
    from .regressor import LIFT_KEYS

    folder = weights_folder(weights)
    pipeline = json.loads((Path(folder) / "pipeline.json").read_text())
    keys = LIFT_KEYS + (("occupancy",) if geometry == "own" and "occupancy" in pipeline.get("models", {}) else ())
    missing = [k for k in LIFT_KEYS if k not in pipeline.get("models", {})]
    if missing:
        raise NearError(f"{folder}: these weights cannot lift a photo: they have no {' or '.join(missing)} network "
                        "(train them with `near train-lift`, or use the bundled near-tiny)")
    networks, _ = load_networks(folder, "cpu", keys=keys)
    prior = Path(folder) / LIGHT_PRIOR_FILE
    if prior.is_file():  # weights from before it lift without taking the light out (`delight`)
        from .delight import read_light_prior

        networks[LIGHT_PRIOR_KEY] = read_light_prior(prior)
    return networks


def _official_stage1(request: LiftRequest, official_latent: bool):
    """The official networks this request needs (latent flow from the weights, structure from --trellis), or None."""
    from .official import load_official_stage1

    if request.source == "trellis" and request.trellis is None and not official_latent:
        raise NearError("the TRELLIS geometry needs a TRELLIS-image-large weights folder (with its pipeline.json and "
                        "ckpts/, and the DINOv2 ViT-L/14-reg weights); nothing is downloaded")
    if not official_latent and request.source != "trellis":
        return None
    folder = request.weights if official_latent else request.trellis
    return load_official_stage1(folder, dinov2=request.dinov2,
                                structure_folder=request.trellis if request.trellis != folder else None)


def lift_image(request: LiftRequest, progress: Progress | None = None,
               cancel: Callable[[], bool] | None = None) -> Asset:
    """One photo -> a relightable asset, in the three stages (see the module docstring). `progress(stage, done)`
    is told each stage as it starts (and each sampler step of the official flows); `cancel()` is asked between
    stages and steps, and raises `LiftCancelled` when true.

    near-tiny weights: its regressor makes the latents. An official NeAR folder (one with `slat_flow_model`): its
    flow samples the LH latent, conditioned on DINOv2 features of the photo; such an asset has no material latents."""
    from ..bundled import weights_folder
    from . import official

    def stage(name: str, done: float) -> None:
        if cancel is not None and cancel():
            raise LiftCancelled("the lift was cancelled")
        if progress is not None:
            progress(name, done)

    def steps(name: str, start: float, end: float) -> Callable[[int, int], None]:
        return lambda done, total: stage(f"{name} (step {done}/{total})", start + (end - start) * done / max(total, 1))

    source = request.source
    stage("loading the lift networks", 0.0)
    folder = Path(weights_folder(request.weights))
    official_latent = official.has_latent_flow(folder)
    stage1 = _official_stage1(LiftRequest(**{**request.__dict__, "weights": folder}), official_latent)
    networks = {} if official_latent else load_lift_networks(folder, source)
    resolution = 64 if official_latent else int(networks["lift_encoder"].resolution)
    stage("preparing the image", 0.1)
    photo = prepare_image(request)
    cond = None
    if stage1 is not None:
        from .image import prepare_photo

        cond = official.encode_photo(stage1, prepare_photo(request.image, 518))
    stage(f"sampling the structure ({source})", 0.2)
    if source == "trellis":
        coords = official.sample_structure(stage1, cond, seed=request.seed, cancel=cancel,
                                           progress=steps("sampling the structure (trellis)", 0.2, 0.6)).numpy()
        camera = photo_camera(request.elevation, photo.rgba.shape[0])
        surfels = None
    else:
        coords, camera, surfels = sample_structure(request, photo, networks, resolution)
    if len(coords) == 0:
        raise NearError(f"the {source} geometry has no voxels: there is nothing to lift")
    stage("sampling the latent", 0.7)
    extras = {}
    if official_latent:
        latent = official.sample_latent(stage1, cond, torch.from_numpy(np.asarray(coords)), seed=request.seed,
                                        cancel=cancel, progress=steps("sampling the latent", 0.7, 1.0)).numpy()
    else:
        detail = prepare_image(request, DETAIL_SIZE).rgba if surfels is not None else None
        latent, extras = sample_latent(networks, coords, photo.rgba, camera, resolution, surfels, detail)
        if surfels is not None:
            extras[SURFELS] = surfels
    stage("done", 1.0)
    digest = hashlib.sha256(Path(request.image).read_bytes()).hexdigest()[:16]
    return Asset(coords, latent, resolution=resolution, extras=extras, latent="lh-slat", model=folder.name,
                 source=f"photo:{Path(request.image).name}:sha256:{digest}:geometry:{source}")
