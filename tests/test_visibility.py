"""Visibility of the environment from the surfels (`near_engine.visibility`), against closed forms: a convex sphere
sees its whole outward hemisphere, and the bottom of a well sees the cosine-weighted share sin^2(beta) of a uniform
sky through its opening of half-angle beta."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from near_engine.configs import build_networks
from near_engine.envmap import EnvMap
from near_engine.frame import VoxelPriors, decode_gaussians, light_tokens
from near_engine.ibl import IBLLight, prefilter
from near_engine.sparse import SparseTensor
from near_engine.surfels import mesh_surfels, surfel_centres
from near_engine.visibility import occlusion_factors, sphere_directions, surfel_visibility
from near_engine.voxelize import voxelize_mesh
from test_surfels import _sphere

R = 64


def _well(radius: float = 0.2, bottom: float = -0.3, top: float = 0.3, segments: int = 64
          ) -> tuple[np.ndarray, np.ndarray]:
    """A cylinder open at the top, closed by a disc at the bottom."""
    angle = np.linspace(0, 2 * np.pi, segments, endpoint=False)
    ring = np.stack([radius * np.cos(angle), radius * np.sin(angle)], -1)
    vertices = np.concatenate([[[0, 0, bottom]], np.c_[ring, np.full(segments, bottom)],
                               np.c_[ring, np.full(segments, top)]])
    faces = [[0, 1 + j, 1 + (j + 1) % segments] for j in range(segments)]
    for j in range(segments):
        a, b = 1 + j, 1 + (j + 1) % segments
        faces += [[a, b, a + segments], [b, b + segments, a + segments]]
    return vertices, np.array(faces)


def _uniform_factors(visibility: np.ndarray, normals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    directions = torch.from_numpy(sphere_directions(visibility.shape[1]))
    return occlusion_factors(torch.from_numpy(visibility), directions, torch.ones(len(directions), 3), normals,
                             normals, torch.full((len(normals), 1), 0.5))


def test_directions_cover_the_sphere_evenly() -> None:
    d = sphere_directions(128)
    assert d.shape == (128, 3) and np.allclose(np.linalg.norm(d, axis=1), 1, atol=1e-6)
    assert np.abs(d.mean(0)).max() < 0.02  # balanced
    assert (d @ np.array([0, 0, 1.0]) > 0).mean() == pytest.approx(0.5, abs=0.01)


def test_a_convex_sphere_sees_all_of_its_outward_light() -> None:
    vertices, faces = _sphere()
    coords = voxelize_mesh(vertices, faces, R)
    surfels = mesh_surfels(vertices, faces, coords, R)
    visibility = surfel_visibility(coords, surfels, R)
    centres = surfel_centres(coords, surfels, R)
    outward = torch.from_numpy(centres / np.linalg.norm(centres, axis=1, keepdims=True)).float()
    diffuse, specular = _uniform_factors(visibility, outward)
    assert float(diffuse.mean()) > 0.995 and float(diffuse.min()) > 0.95
    assert float(specular.mean()) > 0.995
    dots = outward.numpy() @ sphere_directions().T
    assert visibility[dots < -0.3].mean() < 0.01  # rays into the sphere meet its far side


def test_the_bottom_of_a_well_sees_the_sky_through_its_opening() -> None:
    radius, depth = 0.2, 0.6
    vertices, faces = _well(radius, -0.3, 0.3)
    coords = voxelize_mesh(vertices, faces, R)
    surfels = mesh_surfels(vertices, faces, coords, R)
    visibility = surfel_visibility(coords, surfels, R)
    centre = np.argmin(np.linalg.norm(surfel_centres(coords, surfels, R) - [0, 0, -0.3], axis=1))
    up = torch.tensor([[0.0, 0.0, 1.0]])
    diffuse, specular = _uniform_factors(visibility[centre:centre + 1], up)
    expected = math.sin(math.atan(radius / depth)) ** 2  # 0.1: the cosine-weighted share of the opening's cone
    assert float(diffuse[0, 0]) == pytest.approx(expected, abs=0.03)
    assert float(specular[0, 0]) > 3 * float(diffuse[0, 0])  # the lobe points straight out of the opening


def test_factors_are_one_when_nothing_blocks_and_zero_when_everything_does() -> None:
    normals = torch.nn.functional.normalize(torch.randn(5, 3, generator=torch.Generator().manual_seed(0)), dim=-1)
    directions = torch.from_numpy(sphere_directions())
    light = torch.rand(len(directions), 3, generator=torch.Generator().manual_seed(1)) + 0.1
    for value in (0, 1):
        visibility = torch.full((5, len(directions)), value, dtype=torch.uint8)
        diffuse, specular = occlusion_factors(visibility, directions, light, normals, normals,
                                              torch.full((5, 1), 0.3))
        assert torch.allclose(diffuse, torch.full_like(diffuse, float(value)))
        assert torch.allclose(specular, torch.full_like(specular, float(value)))


def test_occlusion_follows_the_light_that_is_blocked() -> None:
    """Light only from +Z, a surfel facing +X+Z: blocking the +Z half of the sky darkens it, blocking -Z does not."""
    directions = torch.from_numpy(sphere_directions())
    light = (directions[:, 2:3] > 0.5).float().expand(-1, 3).contiguous()
    normal = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0, 1.0]]), dim=-1)
    upper = (directions[:, 2] > 0).to(torch.uint8)[None]
    diffuse_open, _ = occlusion_factors(upper, directions, light, normal, normal, torch.tensor([[0.5]]))
    diffuse_shut, _ = occlusion_factors(1 - upper, directions, light, normal, normal, torch.tensor([[0.5]]))
    assert float(diffuse_open[0, 0]) == pytest.approx(1.0) and float(diffuse_shut[0, 0]) == pytest.approx(0.0)


def test_priors_carry_visibility_and_the_renderer_dims_what_is_blocked() -> None:
    """The PBR core of an untrained near-tiny under a uniform world: the floor of the well gets about sin^2(beta) of
    its unshadowed diffuse light, and all of it once its visibility is set to all ones."""
    vertices, faces = _well()
    coords = voxelize_mesh(vertices, faces, R)
    surfels = mesh_surfels(vertices, faces, coords, R)
    materials = np.tile(np.array([0.8, 0.8, 0.8, 0.9, 0.0, 0.5], np.float32), (len(coords), 1))
    priors = VoxelPriors.of(coords, R, materials, surfels)
    assert priors.visibility is not None and tuple(priors.visibility.shape) == (len(coords) * 4, 128)
    torch.manual_seed(0)
    nets = build_networks("near-tiny")
    env = EnvMap.uniform(1.0)
    camera = np.array([0.0, 0.0001, 2.0])
    with torch.no_grad():
        h, registers = nets["decoder"](SparseTensor.from_list(
            [(torch.from_numpy(coords), torch.cat([torch.zeros(len(coords), 8), priors.materials], 1))], R))
        tokens = light_tokens(nets["hdri_encoder"], env, size=32)
        ibl = IBLLight.for_frame(prefilter(env), 0.0)
        shaded = decode_gaussians(nets, h, registers, tokens, camera_position=camera, priors=priors, ibl=ibl)
        unblocked = VoxelPriors(priors.materials, priors.surfels, visibility=torch.ones_like(priors.visibility))
        bright = decode_gaussians(nets, h, registers, tokens, camera_position=camera, priors=unblocked, ibl=ibl)
    centres = surfel_centres(coords, surfels, R)
    floor = (np.linalg.norm(centres[:, :2], axis=1) < 0.1) & (centres[:, 2] < -0.28)
    assert floor.sum() > 10
    ratio = float(shaded.radiance[floor].mean() / bright.radiance[floor].mean())
    assert 0.07 < ratio < 0.2  # sin^2(beta) = 0.1 of a uniform sky
