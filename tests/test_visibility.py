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
from near_engine.visibility import diffuse_occlusion, sphere_directions, surfel_visibility
from near_engine.voxelize import voxelize_mesh
from test_surfels import _sphere

R = 64


def _well(radius: float = 0.2, bottom: float = -0.3, top: float = 0.3, segments: int = 64
          ) -> tuple[np.ndarray, np.ndarray]:
    """A cylinder open at the top, with a floor at `bottom` and a closed cellar 0.1 below it: the floor's underside
    sees nothing, as the floor of a well dug into solid ground."""
    angle = np.linspace(0, 2 * np.pi, segments, endpoint=False)
    ring = np.stack([radius * np.cos(angle), radius * np.sin(angle)], -1)
    levels = (bottom - 0.1, bottom, top)
    vertices = np.concatenate([[[0, 0, bottom - 0.1]], [[0, 0, bottom]]]
                              + [np.c_[ring, np.full(segments, z)] for z in levels])
    faces = []
    for centre, first in ((0, 2), (1, 2 + segments)):  # the cellar's floor and the well's floor
        faces += [[centre, first + j, first + (j + 1) % segments] for j in range(segments)]
    for level in range(2):  # the wall, from the cellar's floor to the top
        start = 2 + level * segments
        for j in range(segments):
            a, b = start + j, start + (j + 1) % segments
            faces += [[a, b, a + segments], [b, b + segments, a + segments]]
    return vertices, np.array(faces)


def _uniform_share(visibility: np.ndarray, normals: torch.Tensor) -> torch.Tensor:
    directions = torch.from_numpy(sphere_directions(visibility.shape[1]))
    return diffuse_occlusion(torch.from_numpy(visibility), directions, torch.ones(len(directions), 3), normals)


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
    diffuse = _uniform_share(visibility, outward)
    assert float(diffuse.mean()) > 0.995 and float(diffuse.min()) > 0.95
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
    expected = math.sin(math.atan(radius / depth)) ** 2  # 0.1: the cosine-weighted share of the opening's cone
    for normal in (up, -up):  # either side of the floor's surfel: the one that sees more (the solid below sees none)
        assert float(_uniform_share(visibility[centre:centre + 1], normal)[0, 0]) == pytest.approx(expected, abs=0.03)


def test_the_share_is_one_when_nothing_blocks_and_zero_when_everything_does() -> None:
    normals = torch.nn.functional.normalize(torch.randn(5, 3, generator=torch.Generator().manual_seed(0)), dim=-1)
    directions = torch.from_numpy(sphere_directions())
    light = torch.rand(len(directions), 3, generator=torch.Generator().manual_seed(1)) + 0.1
    for value in (0, 1):
        visibility = torch.full((5, len(directions)), value, dtype=torch.uint8)
        share = diffuse_occlusion(visibility, directions, light, normals)
        assert torch.allclose(share, torch.full_like(share, float(value)))


def test_occlusion_follows_the_light_that_is_blocked() -> None:
    """Light only from near +Z, a surfel facing +X+Z: blocking the upper half of the sky darkens it, blocking the
    lower half does not; and the side of the surfel that sees the light counts."""
    directions = torch.from_numpy(sphere_directions())
    light = (directions[:, 2:3] > 0.5).float().expand(-1, 3).contiguous()
    normal = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0, 1.0]]), dim=-1)
    upper = (directions[:, 2] > 0).to(torch.uint8)[None]
    assert float(diffuse_occlusion(upper, directions, light, normal)[0, 0]) == pytest.approx(1.0)
    assert float(diffuse_occlusion(1 - upper, directions, light, normal)[0, 0]) == pytest.approx(0.0)
    assert float(diffuse_occlusion(upper, directions, light, -normal)[0, 0]) == pytest.approx(1.0)
    half = ((directions[:, 0] > 0) | (directions[:, 2] < 0)).to(torch.uint8)[None]  # the sky's -X half blocked
    share = float(diffuse_occlusion(half, directions, light, normal)[0, 0])
    assert 0.55 < share < 0.95  # the lobe leans to +X: more than half of its light comes from there


def test_priors_carry_visibility_and_the_renderer_dims_what_is_blocked() -> None:
    """The PBR core of an untrained near-tiny under a uniform world: the floor of the well gets about sin^2(beta) of
    its unshadowed diffuse light, and all of it once its visibility is set to all ones (a rough dielectric, whose
    specular term is small)."""
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
    floor = (np.linalg.norm(centres[:, :2], axis=1) < 0.1) & (np.abs(centres[:, 2] + 0.3) < 0.02)
    assert floor.sum() > 10
    ratio = float(shaded.radiance[floor].mean() / bright.radiance[floor].mean())
    assert 0.07 < ratio < 0.25  # sin^2(beta) = 0.1 of the diffuse light, the weak specular term unoccluded


def test_the_share_is_the_same_in_chunks(monkeypatch) -> None:
    import near_engine.visibility as visibility

    generator = torch.Generator().manual_seed(2)
    normals = torch.nn.functional.normalize(torch.randn(50, 3, generator=generator), dim=-1)
    directions = torch.from_numpy(sphere_directions())
    light = torch.rand(len(directions), 3, generator=generator)
    seen = (torch.rand(50, len(directions), generator=generator) > 0.5).to(torch.uint8)
    whole = diffuse_occlusion(seen, directions, light, normals)
    monkeypatch.setattr(visibility, "CHUNK", 7)
    torch.testing.assert_close(diffuse_occlusion(seen, directions, light, normals), whole)
    assert diffuse_occlusion(seen[:0], directions, light, normals[:0]).shape == (0, 3)
