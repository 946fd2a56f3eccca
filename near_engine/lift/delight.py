"""Take the light out of a photo's colours on known geometry: the physical half of illumination homogenization.

Where a surface faces its light it is bright, where it faces away or its own shape hides the sky it is dark, and a
glossy one adds the light's reflection. A lift that paints the photo's colours on the surface paints all of that
on, and relit under another light it shows both lights at once. With the surface known (its surfels, their normals,
which directions its own voxels block) and the light known, near-tiny's shading core (`ibl.shade` with
`visibility.diffuse_occlusion`) says what the photo shows for any base colour, ``base colour x gain + offset``
(`photo_response`: a dielectric's gain is its diffuse response, its offset the light's specular reflection; a
metal's gain is its specular response), and a dielectric's base colour is the photo's colour divided by the gain
(`delit`; the offset is taken out of the light's fit, not off the colours); a metal's is found by inverting its
reflection (`metal_base_colour`), which is not proportional to its base colour. The photo is exposed and
white-balanced (`image.metered`: a white card lit by the whole scene reads 1 in every channel), so the light is wanted
grey, at a mean radiance of 1 in every channel.

The light is unknown, so it is estimated from the photo itself (`estimate_light`): order-2 spherical harmonics
(Ramamoorthi and Hanrahan 2001: the cosine lobe keeps little above order 2), fitted to the photo's colours on the
surfels it sees face on, through each surfel's visibility (precomputed radiance transfer, `transfer`). One photo
shows at most half of the directions a surface faces, and from an eye-level view it cannot tell a dim world from a
dark object: the fit is the most probable light under a prior over lights (`LightPrior`: the mean and variance of
the training lights' terms, over every turn about Z, kept with the lift's weights). Albedo and the light's colour
cannot be told apart from one photo either, and a camera's white balance has taken the light's mean colour out:
the light's direction is fitted to the colours' mean over the channels and is the same in each.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from ..errors import NearError
from ..envmap import EnvMap, equirect_solid_angles, rotation_z_matrix, uv_to_direction
from ..ibl import IBLLight, prefilter, shade
from ..visibility import diffuse_occlusion, point_visibility, sphere_directions

__all__ = ["SH_COEFFICIENTS", "sh_basis", "transfer", "project_envmap", "fit_light", "sh_environment", "SeenSurface",
           "photo_response", "estimate_light", "delit", "metal_base_colour", "LightPrior", "read_light_prior"]

SH_COEFFICIENTS = 9
#: Y_00: a light of radiance L everywhere has the single coefficient L / Y_00.
Y00 = 0.5 / math.sqrt(math.pi)


def sh_basis(directions: torch.Tensor) -> torch.Tensor:
    """Real spherical harmonics of order <= 2 [K, 9] at unit `directions` [K, 3] (the usual graphics ordering)."""
    x, y, z = directions.unbind(-1)
    return torch.stack([
        torch.full_like(x, Y00),
        0.488603 * y, 0.488603 * z, 0.488603 * x,
        1.092548 * x * y, 1.092548 * y * z, 0.315392 * (3 * z * z - 1), 1.092548 * x * z,
        0.546274 * (x * x - y * y)], -1)


def transfer(normals: torch.Tensor, directions: torch.Tensor, visibility: torch.Tensor | None = None
             ) -> torch.Tensor:
    """[P, 9]: what a white diffuse point with unit `normals` [P, 3] reflects, E / pi, per unit coefficient of the
    light, over the evenly spread `directions` [K, 3], blocked where `visibility` [P, K] is 0."""
    cosine = (normals @ directions.T).clamp_min(0.0)
    if visibility is not None:
        cosine = cosine * visibility.to(cosine)
    return cosine @ sh_basis(directions) * (4.0 / len(directions))  # (4 pi / K) / pi


def project_envmap(env: EnvMap, height: int = 64) -> torch.Tensor:
    """The coefficients [9, 3] of an environment map's light (its rotation and strength applied), summed over its
    texels shrunk by area to `height` rows, so a sun a few texels wide keeps its energy."""
    small = env.resized(height)
    width = small.width
    uv = np.stack(np.meshgrid((np.arange(width) + 0.5) / width, 1 - (np.arange(height) + 0.5) / height), -1)
    directions = uv_to_direction(uv.reshape(-1, 2)) @ rotation_z_matrix(env.rotation_z)  # the map's texel -> world
    weights = np.repeat(equirect_solid_angles(height, width), width)[:, None]
    radiance = small.pixels.reshape(-1, 3).astype(np.float64) * weights * env.strength
    return (sh_basis(torch.from_numpy(directions)).T @ torch.from_numpy(radiance)).float()


#: Pairs of coefficients that a turn about Z (an HDRI's Mapping rotation) mixes: (y, x), (yz, xz), (xy, x^2 - y^2).
_TURNING_PAIRS = ((1, 3), (5, 7), (4, 8))


@dataclass(frozen=True)
class LightPrior:
    """What lights are like, from a set of them: the mean [9] and variance [9] of their coefficients (each light
    scaled to a mean radiance of 1), over every turn about Z. How bright the directions are that a photo's surfaces
    do not face, next to those they do, the photo alone cannot say; the prior (a sky above, brighter than the
    ground) can."""

    mean: torch.Tensor
    variance: torch.Tensor

    @staticmethod
    def of(lights: list[EnvMap]) -> "LightPrior":
        rows, known = [], {}
        for env in lights:  # many lights share a map (the bundled HDRIs): each is projected once
            if id(env) not in known:
                coefficients = project_envmap(env.with_settings(rotation_z=0.0)).double().mean(-1)
                known[id(env)] = coefficients / (coefficients[0] * Y00).clamp_min(1e-12)
            rows.append(known[id(env)])
        if not rows:
            raise ValueError("a light prior needs at least one light")
        table = torch.stack(rows)
        mean, second = table.mean(0), (table ** 2).mean(0)
        for a, b in _TURNING_PAIRS:  # averaged over turns about Z, a pair's mean is 0, its energy shared
            mean[[a, b]] = 0.0
            second[[a, b]] = 0.5 * (second[a] + second[b])
        return LightPrior(mean.float(), (second - mean ** 2).clamp_min(1e-4).float())

    def as_dict(self) -> dict[str, list[float]]:
        return {"mean": [float(x) for x in self.mean], "variance": [float(x) for x in self.variance]}

    @staticmethod
    def from_dict(record: dict) -> "LightPrior":
        if not isinstance(record, dict):
            raise ValueError("a light prior is a JSON object")
        mean, variance = (torch.tensor(record[k], dtype=torch.float32) for k in ("mean", "variance"))
        if mean.shape != (SH_COEFFICIENTS,) or variance.shape != (SH_COEFFICIENTS,) or not bool(
                torch.isfinite(mean).all() & torch.isfinite(variance).all() & (variance > 0).all()):
            raise ValueError("a light prior holds 9 finite means and 9 positive variances")
        return LightPrior(mean, variance)


def read_light_prior(path: str | Path) -> LightPrior:
    """A `LightPrior` from its JSON file (`LightPrior.as_dict`), with a clear error for a broken one."""
    try:
        if Path(path).stat().st_size > 65536:  # nine numbers twice: anything this big is not one
            raise ValueError("the file is far too big")
        return LightPrior.from_dict(json.loads(Path(path).read_text()))
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError) as error:
        raise NearError(f"{path}: not a light prior ({error}); train the lift again with `near train-lift`") from None


#: Without a prior: every directional coefficient 0 (a uniform light), with this variance.
UNIFORM_PRIOR = LightPrior(torch.tensor([1.0 / Y00] + [0.0] * 8), torch.full((SH_COEFFICIENTS,), 1.0))
#: How many independent observations a photo's surfels count as against the prior: neighbouring surfels share their
#: albedo's pattern and errors, so thousands of them are worth far fewer.
EVIDENCE = 20.0
#: Reweighted fits: a painted pattern or a highlight is an outlier to a smooth shading; each pass weighs the surfels
#: down by how far they sit from it (Cauchy weights, the scale their median absolute residual).
ROBUST_PASSES = 5


def fit_light(colours: torch.Tensor, transfers: torch.Tensor, prior: LightPrior = UNIFORM_PRIOR) -> torch.Tensor:
    """The light's coefficients [9, 3] (mean radiance 1) that best explain the `colours` [P, 3] of diffuse points
    with `transfers` [P, 9], taking their albedo as one colour: the most probable light under the `prior` given the
    photo (a robust least squares, the surfels worth `EVIDENCE` observations). Its direction is fitted to the
    colours' mean over the channels and is the same in each: fitted per channel, the dark glossy objects, whose
    colour is mostly the light's reflection, came out in false colours."""
    grey = colours.double().mean(-1)
    target = grey / grey.mean().clamp_min(1e-6)  # the albedo's scale near 1
    transfers, mean, variance = transfers.double(), prior.mean.double(), prior.variance.double()
    albedo = float(target.mean() / (transfers @ mean).mean().clamp_min(1e-6))
    x = albedo * mean
    for _ in range(ROBUST_PASSES):
        residual = transfers @ x - target
        sigma = residual.abs().median().clamp_min(1e-3)
        robust = 1.0 / (1.0 + (residual / (2.0 * sigma)) ** 2)
        weight = EVIDENCE / (robust.sum() * sigma ** 2)
        precision = 1.0 / (albedo ** 2 * variance)
        precision[0] = 1e-9  # the mean radiance is the albedo's: free (but solvable where nothing sees the light)
        system = weight * transfers.T @ (transfers * robust[:, None]) + torch.diag(precision)
        x = torch.linalg.solve(system, weight * transfers.T @ (target * robust) + precision * albedo * mean)
        albedo = max(float(x[0] * Y00), 1e-6)
    light = x / albedo
    if not bool(torch.isfinite(light).all()):  # a photo with nothing to fit (black, or a single colour)
        light = mean
    return light.float()[:, None].expand(SH_COEFFICIENTS, 3).contiguous()


#: Rows of the equirect map a fitted light is drawn into for the shading core (order 2 has no finer detail).
LIGHT_ROWS = 32


def sh_environment(coefficients: torch.Tensor, height: int = LIGHT_ROWS) -> EnvMap:
    """The light of `coefficients` [9, 3] drawn as an equirect map (negative radiance, where the truncated series
    rings, clipped to 0)."""
    width = 2 * height
    uv = np.stack(np.meshgrid((np.arange(width) + 0.5) / width, 1 - (np.arange(height) + 0.5) / height), -1)
    directions = torch.from_numpy(uv_to_direction(uv.reshape(-1, 2))).float()
    radiance = (sh_basis(directions) @ coefficients.float()).clamp_min(0.0)
    return EnvMap.from_array(radiance.reshape(height, width, 3).numpy(), name="fitted light")


@dataclass(frozen=True)
class SeenSurface:
    """Points of a surface as a photo shows them: `normals` [P, 3] turned towards the camera, unit `views` [P, 3]
    towards it, and the `visibility` [P, K] of `sphere_directions` through the asset's voxels."""

    normals: torch.Tensor
    views: torch.Tensor
    visibility: torch.Tensor

    @staticmethod
    def of(points: torch.Tensor, normals: torch.Tensor, eye: np.ndarray, coords: np.ndarray, resolution: int
           ) -> "SeenSurface":
        points, normals = points.float(), normals.float()
        views = F.normalize(torch.from_numpy(np.asarray(eye, np.float32)) - points, dim=-1)
        facing = normals * torch.where((views * normals).sum(-1, keepdim=True) < 0, -1.0, 1.0)
        visible = point_visibility(coords, points.double().numpy(), facing.double().numpy(), resolution)
        return SeenSurface(facing, views, torch.from_numpy(visible))

    def subset(self, rows: torch.Tensor) -> "SeenSurface":
        """The points at `rows` (a bool mask or indices)."""
        return SeenSurface(self.normals[rows], self.views[rows], self.visibility[rows])

    def transfers(self) -> torch.Tensor:
        return transfer(self.normals, torch.from_numpy(sphere_directions(self.visibility.shape[1])), self.visibility)


#: The diffuse response divided out is kept above this share of the light's mean: a surface the light barely
#: reaches would be blown up from noise.
MIN_RESPONSE = 0.1


def photo_response(light: IBLLight, surface: SeenSurface, materials: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(gain, offset) [P, 3]: the shading core's colour at each point is ``base colour x gain + offset`` under
    `light`, for `materials` [P, 3] (roughness, metallic 0 or 1, specular level). A dielectric's gain is its
    diffuse response (the self-occlusion of `visibility.diffuse_occlusion` included) and its offset the specular
    reflection of the light; a metal's gain is its specular response (its base colour is its F0)."""
    ones = torch.ones_like(surface.normals)
    roughness, metallic, level = materials[:, :1], materials[:, 1:2], materials[:, 2:3]
    dielectric = shade(ones, roughness, torch.zeros_like(metallic), level, surface.normals, surface.views, light)
    directions = torch.from_numpy(sphere_directions(surface.visibility.shape[1]))
    diffuse = dielectric.diffuse * diffuse_occlusion(surface.visibility, directions,
                                                     light.blurred_radiance(directions), surface.normals)
    is_metal = metallic > 0.5
    if not bool(is_metal.any()):
        return diffuse.clamp_min(MIN_RESPONSE), dielectric.specular
    metal = shade(ones, roughness, torch.ones_like(metallic), level, surface.normals, surface.views, light).specular
    gain = torch.where(is_metal, metal, diffuse).clamp_min(MIN_RESPONSE)
    return gain, torch.where(is_metal, torch.zeros_like(metal), dielectric.specular)


#: Fits of the light: the first takes the photo as all diffuse, each next one first takes out the specular
#: reflection of the light the last one found.
LIGHT_PASSES = 3


def estimate_light(colours: torch.Tensor, surface: SeenSurface, materials: torch.Tensor,
                   prior: LightPrior = UNIFORM_PRIOR) -> IBLLight:
    """The light (grey, mean radiance 1 in every channel, the level a metered photo is exposed and white-balanced
    for) that best explains a metered photo's `colours` [P, 3] of the `surface`'s points with `materials` [P, 3]
    (`photo_response`)."""
    transfers = surface.transfers()
    offset = torch.zeros_like(colours)
    for done in range(1, LIGHT_PASSES + 1):
        light = IBLLight.for_frame(prefilter(sh_environment(fit_light((colours - offset).clamp_min(0.0),
                                                                      transfers, prior))))
        if done < LIGHT_PASSES:
            _, offset = photo_response(light, surface, materials)
    return light


#: A point whose response to the light is below this (a share of the light's mean) says little about its albedo: what
#: the photo shows there is mostly light bounced off the object itself, which the shading core leaves out, and
#: divided by its small share of the light it came out several times too bright (the inside of a cup).
RELIABLE_RESPONSE = 0.3


#: Bisection steps that find a metal's base colour (its F0) from its colour: the reflection of a metal is not
#: proportional to its F0 (the grazing and multiply scattered light is white), so it is inverted, not divided out.
METAL_STEPS = 20


def metal_base_colour(colours: torch.Tensor, light: IBLLight, surface: SeenSurface, materials: torch.Tensor
                      ) -> torch.Tensor:
    """The base colour [P, 3] in [0, 1] of metal points that the shading core shows as `colours` [P, 3] under
    `light`: its specular term is monotonic in the base colour, so a bisection finds it. Dividing by the
    reflection of a white metal instead (the linear gain of `photo_response`) took the white part of a rough
    metal's reflection for its colour: its base colour came out too dark and too saturated (held-out metals with
    their true materials, novel-view relighting: 21.06 dB divided, 23.92 inverted)."""
    roughness, level = materials[:, :1], materials[:, 2:3]
    low, high = torch.zeros_like(colours), torch.ones_like(colours)
    for _ in range(METAL_STEPS):
        middle = 0.5 * (low + high)
        shown = shade(middle, roughness, torch.ones_like(roughness), level, surface.normals, surface.views,
                      light).specular
        below = shown < colours
        low, high = torch.where(below, middle, low), torch.where(below, high, middle)
    return 0.5 * (low + high)


def delit(colours: torch.Tensor, light: IBLLight, surface: SeenSurface, materials: torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(base colour [P, 3] in [0, 1] that shows as `colours` [P, 3] at the `surface`'s points under `light`, whether
    each is reliable [P] (`RELIABLE_RESPONSE`)).

    A dielectric's colours are divided by their diffuse response to the light, and the light's reflection is *not*
    taken off them (only out of the light's fit): its roughness is the regressor's, the same for every object, and
    where it put a broad highlight that a glossy glaze draws sharp, taking it off darkened the surface (taking off up
    to half of each colour: the demo's vase 15.5 dB against 16.0; the held-out objects 23.48 against 23.59). A
    metal's base colour is found by `metal_base_colour`."""
    gain, _ = photo_response(light, surface, materials)
    base = colours / gain
    metal = materials[:, 1] > 0.5
    if bool(metal.any()):
        base[metal] = metal_base_colour(colours[metal], light, surface.subset(metal), materials[metal])
    return base.clamp(0.0, 1.0), gain.mean(-1) >= RELIABLE_RESPONSE
