"""Taking a photo's light out on known geometry (`near_engine.lift.delight`), against closed forms: the spherical
harmonics' orthonormality, the irradiance of a linear sky (1 + (2/3) a n_z for radiance 1 + a w_z), a white furnace,
and a painted sphere photographed under a sky whose albedo comes back; and a metal's base colour from its reflection
(against the shading core's own forward model)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from near_engine.envmap import EnvMap
from near_engine.errors import NearError
from near_engine.ibl import IBLLight, prefilter, shade
from near_engine.lift.delight import (UNIFORM_PRIOR, Y00, LightPrior, SeenSurface, delit, estimate_light, fit_light,
                                      photo_response, project_envmap, read_light_prior, sh_basis, transfer)
from near_engine.visibility import sphere_directions
from near_engine.voxelize import voxelize_mesh
from test_surfels import _sphere

SKY = 0.8  # radiance 1 + SKY * w_z: brighter above, mean 1


def _sky_map(height: int = 64, tilt_x: float = 0.0) -> EnvMap:
    """Radiance 1 + SKY w_z (+ tilt_x w_x) in the map's frame, drawn on an equirect grid (Cycles' convention)."""
    rows = (np.arange(height) + 0.5) / height * math.pi  # polar angle, row 0 at +Z
    u = (np.arange(2 * height) + 0.5) / (2 * height)
    phi = math.pi - 2 * math.pi * u
    z = np.cos(rows)[:, None] * np.ones_like(phi)[None]
    x = np.sin(rows)[:, None] * np.cos(phi)[None]
    return EnvMap.from_array(np.repeat((1 + SKY * z + tilt_x * x)[..., None], 3, -1).astype(np.float32))


def test_the_basis_is_orthonormal_over_the_sphere():
    d = torch.from_numpy(sphere_directions(4096))
    y = sh_basis(d)
    np.testing.assert_allclose((y.T @ y * (4 * math.pi / len(d))).numpy(), np.eye(9), atol=0.01)


def test_a_linear_sky_lights_a_surface_as_the_closed_form_says():
    """Radiance 1 + a w_z gives a surface facing n the irradiance E / pi = 1 + (2/3) a n_z; a uniform world (a white
    furnace) gives its own level whatever the facing."""
    normals = torch.nn.functional.normalize(torch.randn(50, 3, generator=torch.Generator().manual_seed(0)), dim=-1)
    t = transfer(normals, torch.from_numpy(sphere_directions(1024)))
    sky = project_envmap(_sky_map())
    np.testing.assert_allclose((t @ sky).numpy(), np.repeat((1 + 2 / 3 * SKY * normals[:, 2:]).numpy(), 3, 1),
                               atol=0.02)
    furnace = project_envmap(EnvMap.uniform(0.6, height=16))
    np.testing.assert_allclose((t @ furnace).numpy(), 0.6, atol=0.01)
    assert float(furnace[0, 0] * Y00) == pytest.approx(0.6, abs=1e-4)  # the mean radiance


def test_a_map_turned_by_its_mapping_rotation_projects_as_the_map_samples():
    env = _sky_map(tilt_x=0.5).with_settings(rotation_z=1.1, strength=2.0)
    d = sphere_directions(8192)
    sampled = sh_basis(torch.from_numpy(d)).T.double() @ torch.from_numpy(env.sample(d.astype(np.float64))).double()
    np.testing.assert_allclose(project_envmap(env).numpy(), (sampled * 4 * math.pi / len(d)).float().numpy(), atol=0.03)
    assert float(project_envmap(env)[0, 0] * Y00) == pytest.approx(float(env.mean_radiance()[0]), rel=1e-3)


def _painted_sphere(count: int = 3000) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(points, normals, albedo) of a sphere's half that a camera at -Y sees, painted in stripes."""
    d = torch.from_numpy(sphere_directions(2 * count))
    front = d[d[:, 1] < -0.3]
    stripes = 0.35 + 0.2 * torch.sign(torch.sin(front[:, 0] * 12))
    albedo = torch.stack([stripes, torch.full_like(stripes, 0.4), 0.5 * stripes], -1)
    return 0.4 * front, front, albedo


def test_a_painted_sphere_under_a_sky_gives_back_its_albedo():
    """A Lambertian sphere (specular level 0) photographed from the front under the linear sky, metered (its mean
    radiance 1): the photo is albedo x (1 + (2/3) a n_z), dark below and bright above. Plain grey, the light fitted
    from the photo alone is the sky; painted in stripes, the fit (no prior but a uniform one) still divides most of
    the shading out: the albedo comes back at least 3 times closer than the photo's own colours (0.018 against
    0.073)."""
    points, normals, albedo = _painted_sphere()
    shading = 1 + 2 / 3 * SKY * normals[:, 2:]
    surface = SeenSurface(normals, torch.tensor([[0.0, -1.0, 0.0]]).expand_as(normals),
                          torch.ones(len(normals), 128, dtype=torch.uint8))
    fitted = fit_light(0.3 * shading.expand(-1, 3), surface.transfers())
    assert float(fitted[0, 0] * Y00) == pytest.approx(1.0)
    assert float(fitted[2, 0]) == pytest.approx(SKY * 0.488603 * 4 * math.pi / 3, rel=0.05)  # the sky's w_z term
    assert float(fitted[[1, 3, 4, 5, 7, 8]].abs().max()) < 0.05 * float(fitted[2, 0])

    photo = albedo * shading
    materials = torch.tensor([[0.5, 0.0, 0.0]]).expand(len(normals), 3)
    light = estimate_light(photo, surface, materials, UNIFORM_PRIOR)
    out, reliable = delit(photo, light, surface, materials)
    assert bool(reliable.all())
    before, after = float((photo - albedo).abs().mean()), float((out - albedo).abs().mean())
    assert before > 0.07 and after < before / 3, (before, after)


def test_seen_surfaces_face_the_camera_and_see_past_nothing_on_a_convex_ball():
    points, normals, _ = _painted_sphere(500)
    flipped = torch.where(torch.arange(len(normals))[:, None] % 2 == 0, normals, -normals)  # surfels are two-sided
    coords = voxelize_mesh(*_sphere(0.4), 64)
    surface = SeenSurface.of(points, flipped, np.array([0.0, -2.0, 0.0]), coords, 64)
    assert bool(((surface.normals * surface.views).sum(-1) > 0).all())
    np.testing.assert_allclose(surface.normals.numpy(), normals.numpy(), atol=1e-6)
    facing = (surface.normals @ torch.from_numpy(sphere_directions()).T) > 0.2
    assert bool(surface.visibility[facing].bool().all())  # a convex ball blocks none of its outward sky


def test_a_light_prior_averages_over_turns_and_reads_back(tmp_path):
    sky = _sky_map(tilt_x=0.5)
    prior = LightPrior.of([sky, sky.with_settings(rotation_z=2.0), EnvMap.uniform(3.0, height=16)])
    assert float(prior.mean[0]) == pytest.approx(1 / Y00)  # each light scaled to mean radiance 1
    one = project_envmap(sky)[:, 0]
    assert float(prior.mean[2]) == pytest.approx(2 / 3 * float(one[2] / (one[0] * Y00)), rel=1e-3)  # 2 of 3 lights
    assert float(prior.mean[1]) == 0.0 and float(prior.mean[3]) == 0.0  # a turn about Z spreads x and y
    assert bool((prior.variance[[1, 3]] > 0).all())
    path = tmp_path / "prior.json"
    path.write_text(json.dumps(prior.as_dict()))
    np.testing.assert_allclose(read_light_prior(path).mean.numpy(), prior.mean.numpy(), rtol=1e-6)
    for broken in ("{", json.dumps({"mean": [1.0] * 9, "variance": [float("nan")] * 9}),
                   json.dumps({"mean": [1.0] * 8, "variance": [1.0] * 9}), "[]", ""):
        path.write_text(broken)
        with pytest.raises(NearError, match="not a light prior"):
            read_light_prior(path)
    with pytest.raises(ValueError):
        LightPrior.of([])


def test_a_black_photo_fits_the_prior_light_and_delights_to_black():
    """Nothing to fit (a black object, or surfels that see none of the sky): the prior's light, finite, and a black
    base colour."""
    _, normals, _ = _painted_sphere(200)
    surface = SeenSurface(normals, torch.tensor([[0.0, -1.0, 0.0]]).expand_as(normals),
                          torch.ones(len(normals), 128, dtype=torch.uint8))
    black = torch.zeros(len(normals), 3)
    np.testing.assert_allclose(fit_light(black, surface.transfers())[:, 0].numpy(), UNIFORM_PRIOR.mean.numpy())
    unlit = fit_light(torch.rand(len(normals), 3), torch.zeros(len(normals), 9))  # every surfel's sky blocked
    np.testing.assert_allclose(unlit[:, 0].numpy(), UNIFORM_PRIOR.mean.numpy())
    materials = torch.tensor([[0.5, 0.0, 0.5]]).expand(len(normals), 3)
    out, _ = delit(black, estimate_light(black, surface, materials), surface, materials)
    assert torch.equal(out, black)


def _seen_from_the_front(count: int = 2000) -> SeenSurface:
    """The front of a sphere seen from -Y (orthographic), its sky unblocked."""
    _, normals, _ = _painted_sphere(count)
    return SeenSurface(normals, torch.tensor([[0.0, -1.0, 0.0]]).expand_as(normals),
                       torch.ones(len(normals), 128, dtype=torch.uint8))


def test_a_metals_base_colour_comes_back_from_its_reflection():
    """A rough gold-coloured metal under the sky: the shading core's own reflection of base colour (0.9, 0.6, 0.3)
    gives that colour back (to 0.005). Divided by a white metal's reflection instead, the white share of a rough
    metal's reflection (its grazing and multiply scattered light) made it darker and more saturated."""
    surface = _seen_from_the_front()
    light = IBLLight.for_frame(prefilter(_sky_map()))
    base = torch.tensor([[0.9, 0.6, 0.3]]).expand(len(surface.normals), 3)
    materials = torch.tensor([[0.9, 1.0, 0.5]]).expand(len(surface.normals), 3)
    photo = shade(base, materials[:, :1], materials[:, 1:2], materials[:, 2:], surface.normals, surface.views,
                  light).radiance
    out, reliable = delit(photo, light, surface, materials)
    assert bool(reliable.all())
    assert float((out - base).abs().max()) < 0.005
    gain, _ = photo_response(light, surface, materials)
    divided = photo / gain
    assert float((divided[:, 2] - 0.3).mean()) < -0.02  # what `delit` did before: the blue much too dark
