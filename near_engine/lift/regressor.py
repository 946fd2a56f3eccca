"""near-tiny's stage 1 proper: one photo under unknown light + the voxels -> the LH latent and the material latents.

NeAR trains its flow model on pairs (a view of an object under random light -> the latent its uniformly lit views
encode to): the network learns to take the light *out*. near-tiny learns the same map with a direct regressor, the
mesh encoder's two networks trained again on one lit view:

* `lift_features` (an `ImageFeatures`) runs on the prepared photo;
* the photo's colours are read as they are, scene-linear: an earlier version scaled every photo to the same mean
  brightness, and a near-black metal then came out a mid-grey dielectric (14 dB against 22 with its true
  materials); the brightness of a photo says much about the object's albedo once a camera has exposed it, and the
  renders it is trained on are exposed the same way (`image.metered`);
* its maps are lifted onto the voxels the photo sees (`models.encoder.lift_features`, visibility from the voxels'
  own z-buffer, `views.voxel_depth`), next to each voxel's unit direction towards the camera (where a highlight or a
  shadow sits depends on it);
* `lift_encoder` (a `LatentEncoder` with 8 + 6 outputs) spreads that over all voxels, the hidden back included, and
  returns the LH latent (8) and the material latents (base colour, roughness, metallic, specular level).

Both start from the trained mesh encoder (`init_from_encoder`): at step 0 the regressor *is* the mesh encoder run on
the lit photo, which is the "no homogenization" ablation of `near eval`; training moves it to the even latent.
A regressor and not a flow: on two cores a 12-step sampler costs 12 network passes per lift and its training needs
many more steps to converge than a regression of the same network (`benchmarks/lift_flow_vs_regressor.py` measures
both).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..camera import Camera
from ..models.encoder import ImageFeatures, LatentEncoder, lift_features
from ..sparse import SparseTensor
from .views import VISIBILITY_TOLERANCE_VOXELS, voxel_depth, voxel_points

if TYPE_CHECKING:
    from .delight import LightPrior

__all__ = ["LIFT_KEYS", "LATENT_CHANNELS", "MATERIAL_CHANNELS", "lift_inputs", "predict_latents", "init_from_encoder",
           "surfel_materials_from_photo"]

#: The networks of near-tiny's regressor in a weights folder.
LIFT_KEYS: tuple[str, ...] = ("lift_features", "lift_encoder")
LATENT_CHANNELS = 8
MATERIAL_CHANNELS = 6  # base colour (3), roughness, metallic, specular level: `frame.MATERIAL_LATENTS`
#: Per-voxel inputs besides the image features: the unit direction from the voxel to the camera (asset space).
DIRECTION_CHANNELS = 3


def lift_inputs(image_features: nn.Module, coords: np.ndarray, photo: torch.Tensor, camera: Camera,
                resolution: int) -> torch.Tensor:
    """Per-voxel inputs [N, C + 3] of the regressor: photo features where the photo sees the voxel (zero elsewhere),
    then the voxel -> camera direction. `photo` [S, S, 4] premultiplied linear RGBA, `camera` its camera."""
    weight = next(image_features.parameters())
    maps = image_features(photo.to(weight)[None])
    depth = torch.from_numpy(voxel_depth(coords, resolution, camera))[None].to(weight)
    points = torch.from_numpy(voxel_points(coords, resolution)).to(weight)
    lifted = lift_features(maps, points, [camera], depth, tolerance=VISIBILITY_TOLERANCE_VOXELS / resolution)
    towards = torch.from_numpy(camera.position).to(weight) - points
    return torch.cat([lifted, towards / towards.norm(dim=-1, keepdim=True).clamp_min(1e-9)], -1)


def photo_colours(photo: torch.Tensor, points: torch.Tensor, coords: np.ndarray, camera: Camera, resolution: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(colour [P, 3] straight linear, seen [P] bool) of the photo [S, S, 4] (premultiplied) at the asset-space
    `points` [P, 3], where the photo sees them: depth-tested against the voxels' own z-buffer."""
    maps = photo.permute(2, 0, 1)[None].float()
    depth = torch.from_numpy(voxel_depth(coords, resolution, camera))[None].float()
    lifted = lift_features(maps, points.float(), [camera], depth, VISIBILITY_TOLERANCE_VOXELS / resolution)
    return lifted[:, :3] / lifted[:, 3:].clamp_min(1e-6), lifted[:, 3] > 1e-3


def projected_colours(photo: torch.Tensor, coords: np.ndarray, camera: Camera, resolution: int) -> torch.Tensor:
    """Each voxel's colour in the photo [N, 3] (straight, linear) where the photo sees it, the mean of those seen
    elsewhere: the photo painted on the geometry, light and all."""
    colour, seen = photo_colours(photo, torch.from_numpy(voxel_points(coords, resolution)), coords, camera,
                                 resolution)
    seen = seen[:, None]
    fill = (colour * seen).sum(0) / seen.sum().clamp_min(1) if bool(seen.any()) else torch.full((3,), 0.5)
    return torch.where(seen, colour, fill)


def nearest_filled(values: torch.Tensor, points: torch.Tensor, known: torch.Tensor, chunk: int = 4096
                   ) -> torch.Tensor:
    """`values` [P, k] where `known` [P] (bool), and elsewhere the value of the nearest known point (`points`
    [P, 3]): on a symmetric object, what the photo does not show is taken to continue what it shows nearest (a band
    round a vase continues round its back)."""
    if bool(known.all()) or not bool(known.any()):
        return values
    source, target = points[known], torch.nonzero(~known)[:, 0]
    out = values.clone()
    for start in range(0, len(target), chunk):
        rows = target[start:start + chunk]
        out[rows] = values[known][torch.cdist(points[rows], source).argmin(1)]
    return out


#: The base colour the regressor predicts is the photo's colour on the voxel times exp(output), clamped to this.
BASE_GAIN_LIMIT = 3.0
#: Column of metallic in the material latents, and the probability of metal above which a lifted surface is metal.
METALLIC = 4
METAL_THRESHOLD = 0.5


def predict_latents(networks: Mapping[str, nn.Module], coords: np.ndarray, photo: torch.Tensor, camera: Camera,
                    resolution: int = 64, with_gain: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(LH latent [N, 8], material latents [N, 6] in [0, 1] at inference) of the voxels `coords` from one photo,
    and with `with_gain` the base colour's gain [N, 3] too.

    At inference the metallic channel is snapped to 0 or 1 (`METAL_THRESHOLD`). Trained by squared error on surfaces
    that are metal or not, the regressor outputs the *probability* of metal, and where one photo leaves that open it
    says 0.3 for everything: a surface a third metal is neither, with the diffuse dimmed and the highlights tinted at
    once. Snapped, it is the likelier of the two (held-out objects, novel-view relighting from metered photos: 21.02
    dB unsnapped, 21.26 snapped).

    The base colour is the photo's own colour on each voxel (`projected_colours`) times a learned gain: at step 0
    it is the photo painted on, which is already a fair albedo under everyday light, and training learns how light
    and shading bend it (a regressor left to find it alone learned the data set's mean colour). Differentiable in
    the networks; the materials are clamped only when no gradient is needed."""
    inputs = lift_inputs(networks["lift_features"], coords, photo, camera, resolution)
    coords_t = torch.as_tensor(np.asarray(coords), dtype=torch.int32, device=inputs.device)
    out = networks["lift_encoder"](SparseTensor.from_list([(coords_t, inputs)], resolution)).feats
    latent, materials = out[:, :LATENT_CHANNELS], out[:, LATENT_CHANNELS:]
    prior = projected_colours(photo, coords, camera, resolution).to(out)
    gain = torch.exp(materials[:, :3].clamp(-BASE_GAIN_LIMIT, BASE_GAIN_LIMIT))
    materials = torch.cat([prior * gain, materials[:, 3:]], -1)
    if not torch.is_grad_enabled():
        materials = materials.clamp(0.0, 1.0)
        materials[:, METALLIC] = (materials[:, METALLIC] > METAL_THRESHOLD).to(materials)
    return (latent, materials, gain) if with_gain else (latent, materials)


#: A surfel whose normal is closer than this (cosine) to the photo's image plane is treated as unseen: at grazing
#: angles a photo's colour is mostly shading and Fresnel, and spread over the hidden side it darkened it.
TRUSTED_FACING = 0.5


def surface_filled(values: torch.Tensor, known: torch.Tensor, coords: np.ndarray, resolution: int,
                   iterations: int = 300, vertical: float = 1.0) -> torch.Tensor:
    """`values` [V, k] of the voxels `coords` where `known` [V], and elsewhere a smooth continuation over the
    surface: the nearest known value first, then `iterations` Jacobi steps of the surface's Laplace equation
    (each unknown voxel the weighted mean of its 26 neighbours), so colours that differ round a hidden side blend
    there instead of meeting in a seam or streaking from the nearest rim. `vertical` weighs the neighbours above
    and below against those level with the voxel (1: isotropic; 0: the fill runs round the object along level
    rings, from the nearest known values where a ring has none)."""
    from ..surfels import voxel_lookup

    coords_t = torch.as_tensor(np.asarray(coords), dtype=torch.long)
    lookup = torch.from_numpy(voxel_lookup(coords, resolution, pad=1))
    steps = torch.stack(torch.meshgrid(*[torch.arange(-1, 2)] * 3, indexing="ij"), -1).reshape(-1, 3)
    steps = steps[(steps != 0).any(-1)]
    neighbours = lookup[tuple((coords_t[:, None, :] + 1 + steps[None]).permute(2, 0, 1))]  # [V, 26]
    weight = torch.where(steps[:, 2] == 0, 1.0, float(vertical)).to(values)
    present = (neighbours >= 0).to(values)[..., None] * weight[None, :, None]
    index = neighbours.clamp_min(0)
    counts = present.sum(1)
    fixed = known[:, None] | (counts == 0)  # known, or no neighbour to take a value from
    counts = counts.clamp_min(1e-12)
    out = nearest_filled(values, torch.from_numpy(voxel_points(coords, resolution)).to(values), known)
    for _ in range(iterations):
        out = torch.where(fixed, out, (out[index] * present).sum(1) / counts)
    return out


#: On a mirror-symmetric object, the fill of the sides the photo sees neither face on nor mirrored weighs its
#: neighbours above and below this much against those level with it. At 0 it continues what the photo shows on
#: either side round the object, level (bands, rings and labels run round upright things): even 0.01 let a band
#: painted round a cylinder bleed 0.04 of its contrast over the hidden sides (`tests/test_lift.py`), 0.05 twice that.
#: Other shapes take the mean of what the photo shows (`surfel_materials_from_photo`): level rings through a random
#: shape drew streaks (-0.7 dB on a held-out object).
LEVEL_FILL = 0.0
#: An object is mirror symmetric when more than this share of the hidden surfels whose mirror image the photo sees
#: face on land on its surface (`_symmetric`). Only then does its back take mirrored colours: on a random shape the
#: few surfels that happen to land on a surface would copy the shading of unrelated parts (unchecked, the mirror and
#: the level fill cost 0.3 dB of novel-view relighting on held-out objects, 2.4 on one).
SYMMETRIC_SHARE = 0.5


def _facing(points: torch.Tensor, normals: torch.Tensor, camera: Camera) -> torch.Tensor:
    """Whether the camera sees each surfel face on (`TRUSTED_FACING`); surfels are two-sided."""
    towards = F.normalize(torch.from_numpy(camera.position).to(points) - points, dim=-1)
    return (normals.to(points) * towards).sum(-1).abs() > TRUSTED_FACING


#: A mirrored surfel counts as lying on the surface where a surfel of the voxel it lands in is this parallel to it
#: (cosine, about 18 degrees).
SYMMETRY_COSINE = 0.95


def _symmetric(points: torch.Tensor, normals: torch.Tensor, coords: np.ndarray, surfel_normals: torch.Tensor,
               resolution: int) -> torch.Tensor:
    """Whether each mirrored surfel (`points`, `normals` [P, 3]) lands on the surface: in one of the voxels `coords`,
    parallel to one of that voxel's surfels (`surfel_normals` [V * PER_VOXEL, 3]). Where it does, the object is
    mirror symmetric there and its front's colour may stand for its back; where not (a random shape), the mirror
    would copy the colour and shading of an unrelated part."""
    from ..surfels import PER_VOXEL, voxel_lookup

    lookup = torch.from_numpy(voxel_lookup(coords, resolution))
    cell = torch.floor((points.double() + 0.5) * resolution).long()
    inside = ((cell >= 0) & (cell < resolution)).all(-1)
    voxel = torch.where(inside, lookup[tuple(cell.clamp(0, resolution - 1).T)], -1)
    theirs = surfel_normals.to(normals).reshape(-1, PER_VOXEL, 3)[voxel.clamp_min(0)]  # [P, PER_VOXEL, 3]
    parallel = (theirs * normals[:, None]).sum(-1).abs().amax(-1) > SYMMETRY_COSINE
    return (voxel >= 0) & parallel


def front_back_mirrored(points: torch.Tensor, normals: torch.Tensor, camera: Camera
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Surfels (`points`, `normals` [P, 3]) mirrored front to back: through the upright plane (assets stand on +Z)
    across the camera's line of sight to their centre that halves their extent along it. On an object symmetric that
    way (a vase, a bottle, most turned or moulded things) a surfel on the hidden back lands on the front the photo
    shows. Seen from straight above, the plane is the one across the line of sight itself."""
    sight = points.mean(0) - torch.from_numpy(camera.position).to(points)
    level = sight * torch.tensor([1.0, 1.0, 0.0], dtype=points.dtype)
    axis = F.normalize(level if float(level.norm()) > 0.1 * float(sight.norm()) else sight, dim=0)
    depth = points @ axis
    middle = 0.5 * (depth.min() + depth.max())
    return points - 2.0 * (depth - middle)[:, None] * axis, normals - 2.0 * (normals @ axis)[:, None] * axis


def _delit(colour: torch.Tensor, seen: torch.Tensor, points: torch.Tensor, normals: torch.Tensor,
           mirrored: torch.Tensor, mirror_seen: torch.Tensor, mirror_points: torch.Tensor,
           mirror_normals: torch.Tensor, materials: torch.Tensor, coords: np.ndarray, camera: Camera,
           resolution: int, prior: "LightPrior") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(colour, seen, mirrored, mirror_seen) with the shading of the photo's light divided out (`delight`): the
    base colours that show as the photo's colours at the surfels and at their mirror images, under the light
    estimated from the surfels the photo sees face on (`seen`); `mirror_seen`: the mirror images the photo sees face
    on. Points the light barely reaches are no longer seen (`delight.RELIABLE_RESPONSE`). `materials` [P, 3]: each
    surfel's roughness, metallic and specular level."""
    from .delight import SeenSurface, delit, estimate_light

    surface = SeenSurface.of(points[seen], normals[seen], camera.position, coords, resolution)
    light = estimate_light(colour[seen], surface, materials[seen], prior)
    colour, mirrored, shown = colour.clone(), mirrored.clone(), seen.clone()
    colour[seen], shown[seen] = delit(colour[seen], light, surface, materials[seen])
    rows = mirror_seen & ~seen  # only a surfel the photo does not show may take its mirror image's colour
    mirror_shown = rows.clone()
    if bool(rows.any()):
        mirror = SeenSurface.of(mirror_points[rows], mirror_normals[rows], camera.position, coords, resolution)
        mirrored[rows], mirror_shown[rows] = delit(mirrored[rows], light, mirror, materials[rows])
    return colour, shown, mirrored, mirror_shown


def surfel_materials_from_photo(photo: torch.Tensor, camera: Camera, coords: np.ndarray, surfels: np.ndarray,
                                materials: torch.Tensor, gain: torch.Tensor, resolution: int = 64,
                                light_prior: "LightPrior | None" = None) -> torch.Tensor:
    """The materials at each surfel [N * PER_VOXEL, 6] of a lift.

    The base colour is the photo's colour at the surfel's centre where the photo sees the surfel face on
    (`TRUSTED_FACING`), with the photo's light taken out when a `light_prior` is given (`delight`: the light
    estimated from those colours on the known surface, its diffuse shading, self-occlusion included, divided out;
    a surfel the light barely reaches counts as unseen). On an object mirror symmetric front to back
    (`_symmetric`, `SYMMETRIC_SHARE`), the hidden back takes the colour of its mirror image (`front_back_mirrored`)
    where the photo sees that face on. Elsewhere the voxel's mean of those. Where none is known:
    - on a symmetric object, what the photo shows continued round it along level rings (`surface_filled`,
      `LEVEL_FILL`: without the mirror and the rings, the fill of a vase's back averaged its bands and zigzag away
      into a plain grey-white);
    - on any other shape, the mean colour of the voxels the photo shows. Its hidden side is not its nearest rim's
      colour: continuing the rims over the surface (the Laplace equation) spread a checker's or a speckle's nearest
      cells over it, and the grazing rims' least reliable colours. The mean scored 20.58 dB of novel-view
      relighting against 19.85 on ten training objects under their own HDRIs (better on 8, within 0.02 dB on 2).
    The colour is multiplied by the median of the regressor's gains [N, 3]: their per-voxel spread speckled a real
    photo's lift (1.1 dB below their median on the demo's vase), their median keeps the learned exposure and white
    balance. Roughness, metallic and specular level are the voxel's. `photo` [S, S, 4] may be sharper than the one
    the regressor read (`camera` is its camera): a surfel is half a voxel, finer than 128 px resolve."""
    from ..surfels import PER_VOXEL, surfel_centres, surfel_normals

    points = torch.from_numpy(surfel_centres(coords, surfels, resolution))
    colour, seen = photo_colours(photo, points, coords, camera, resolution)
    normals = surfel_normals(surfels)
    face_on = seen & _facing(points, normals, camera)
    seen = face_on if bool(face_on.any()) else seen
    mirror_points, mirror_normals = front_back_mirrored(points, normals, camera)
    mirrored, mirror_seen = photo_colours(photo, mirror_points, coords, camera, resolution)
    mirror_seen = mirror_seen & _facing(mirror_points, mirror_normals, camera)
    rest = materials[:, 3:].to(colour).repeat_interleave(PER_VOXEL, 0)
    if light_prior is not None and bool(seen.any()):
        colour, seen, mirrored, mirror_seen = _delit(colour, seen, points, normals, mirrored, mirror_seen,
                                                     mirror_points, mirror_normals, rest, coords, camera, resolution,
                                                     light_prior)
    candidates = ~seen & mirror_seen
    from_mirror = candidates & _symmetric(mirror_points, mirror_normals, coords, normals, resolution)
    symmetric = float(from_mirror.sum()) > SYMMETRIC_SHARE * float(candidates.sum())
    if symmetric:
        colour, seen = torch.where(from_mirror[:, None], mirrored, colour), seen | from_mirror
    per_voxel = seen.reshape(-1, PER_VOXEL)
    voxel_colour = ((colour.reshape(-1, PER_VOXEL, 3) * per_voxel[..., None]).sum(1)
                    / per_voxel.sum(1, keepdim=True).clamp_min(1))
    known = per_voxel.any(1)
    if symmetric:
        voxel_colour = surface_filled(voxel_colour, known, coords, resolution, vertical=LEVEL_FILL)
    elif bool(known.any()):  # what a random shape hides is not its nearest rim's colour: its seen surface's mean
        voxel_colour = torch.where(known[:, None], voxel_colour, voxel_colour[known].mean(0))
    colour = torch.where(seen[:, None], colour, voxel_colour.repeat_interleave(PER_VOXEL, 0))
    base = colour * gain.median(0).values.to(colour)
    return torch.cat([base, rest], -1).clamp(0.0, 1.0)


def lift_network_args(encoder_args: Mapping, flow: bool = False) -> dict:
    """The constructor args of the regressor's encoder, from those of the mesh encoder it starts from; `flow`: the
    flow-matching variant, which also reads the noisy latents and the flow time (`FLOW_CHANNELS`)."""
    extra = DIRECTION_CHANNELS + (FLOW_CHANNELS if flow else 0)
    return {**encoder_args, "in_channels": int(encoder_args["in_channels"]) + extra,
            "latent_channels": LATENT_CHANNELS + MATERIAL_CHANNELS}


# ---- the flow-matching variant, measured against the regressor (`benchmarks/lift_flow_vs_regressor.py`) ----------

#: The flow variant's extra inputs per voxel: the noisy latents x_t (8 + 6) and the time t.
FLOW_CHANNELS = LATENT_CHANNELS + MATERIAL_CHANNELS + 1


def flow_velocity(networks: Mapping[str, nn.Module], coords: np.ndarray, inputs: torch.Tensor, x_t: torch.Tensor,
                  t: float, resolution: int = 64) -> torch.Tensor:
    """The rectified flow's velocity [N, 14] at x_t (x_t = (1 - t) x0 + t noise, v = noise - x0), given the photo's
    per-voxel inputs (`lift_inputs`)."""
    coords_t = torch.as_tensor(np.asarray(coords), dtype=torch.int32, device=inputs.device)
    time = torch.full((len(inputs), 1), float(t), dtype=inputs.dtype, device=inputs.device)
    feats = torch.cat([inputs, x_t, time], -1)
    return networks["lift_encoder"](SparseTensor.from_list([(coords_t, feats)], resolution)).feats


def sample_flow_latents(networks: Mapping[str, nn.Module], coords: np.ndarray, photo: torch.Tensor, camera: Camera,
                        scale: torch.Tensor, steps: int = 12, seed: int = 0, resolution: int = 64) -> torch.Tensor:
    """Euler samples of the flow variant from seeded noise: [N, 14] (latent and materials, `scale` undone)."""
    inputs = lift_inputs(networks["lift_features"], coords, photo, camera, resolution)
    x = torch.randn(len(inputs), LATENT_CHANNELS + MATERIAL_CHANNELS, generator=torch.Generator().manual_seed(seed))
    times = torch.linspace(1.0, 0.0, steps + 1)
    for t, t_next in zip(times[:-1], times[1:]):
        x = x - (t - t_next) * flow_velocity(networks, coords, inputs, x, float(t), resolution)
    return x * scale


def init_from_encoder(image_features: ImageFeatures, encoder: LatentEncoder, encoder_args: Mapping,
                      default_material: tuple[float, ...], flow: bool = False) -> dict[str, nn.Module]:
    """The regressor at step 0: copies of the mesh encoder's networks, the direction inputs weighted zero, the base
    colour the photo's own and the other materials at `default_material` (so its first latent is the mesh
    encoder's on the lit photo)."""
    import copy

    features = copy.deepcopy(image_features).requires_grad_(True)  # the mesh encoder's copy may come frozen
    lifted = LatentEncoder(**lift_network_args(encoder_args, flow))
    state = lifted.state_dict()
    for name, value in encoder.state_dict().items():
        target = state[name]
        if target.shape == value.shape:
            target.copy_(value)
        else:  # wider input or output: copy the mesh encoder's block, zero the rest
            target.zero_()
            target[tuple(slice(0, n) for n in value.shape)].copy_(value)
    if not flow:  # base colour: gain 1 on the photo's colour; roughness, metallic, specular: the defaults
        state["out_layer.bias"][LATENT_CHANNELS:] = torch.tensor([0.0, 0.0, 0.0, *default_material[3:]])
    lifted.load_state_dict(state)
    return {"lift_features": features, "lift_encoder": lifted}
