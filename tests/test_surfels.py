"""Surfels (`near_engine.surfels`): where the surface lies in each voxel, and near-tiny's Gaussians starting there.

References are closed form: a sphere's radius and radial normals, a plane's height in its voxels, the exact
projection of a square, rotation matrices built from angles.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from near_engine.asset import Asset
from near_engine.camera import Camera
from near_engine.configs import build_networks
from near_engine.envmap import EnvMap
from near_engine.errors import NearError
from near_engine.frame import VoxelPriors, decode_gaussians, filter_2d, light_tokens, rasterize_passes
from near_engine.gaussians import quat_to_rotmat, rotmat_to_quat
from near_engine.ibl import IBLLight, prefilter
from near_engine.models.gaussian_heads import intrinsic_gaussians, voxel_centres
from near_engine.sparse import SparseTensor
from near_engine.surfels import (
    EXTRA_NAME,
    PER_VOXEL,
    SURFEL_CHANNELS,
    asset_surfels,
    mesh_surfels,
    nearest_points,
    surfel_centres,
    surfel_tensors,
    voxel_surfels,
)
from near_engine.voxelize import voxelize_mesh

R = 64


def _sphere(radius: float = 0.4, rings: int = 32, segments: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """A UV sphere (the poles as single vertices) of `radius` about the origin."""
    theta = np.linspace(0, np.pi, rings + 1)[1:-1]
    phi = np.linspace(0, 2 * np.pi, segments, endpoint=False)
    t, p = np.meshgrid(theta, phi, indexing="ij")
    ring = np.stack([np.sin(t) * np.cos(p), np.sin(t) * np.sin(p), np.cos(t)], -1).reshape(-1, 3)
    vertices = np.concatenate([[[0, 0, 1]], ring, [[0, 0, -1]]]) * radius
    faces = [[0, 1 + j, 1 + (j + 1) % segments] for j in range(segments)]
    for i in range(rings - 2):
        for j in range(segments):
            a, b = 1 + i * segments + j, 1 + i * segments + (j + 1) % segments
            faces += [[a, a + segments, b], [b, a + segments, b + segments]]
    last, base = len(vertices) - 1, 1 + (rings - 2) * segments
    faces += [[base + j, last, base + (j + 1) % segments] for j in range(segments)]
    return vertices, np.array(faces)


def _square(z: float = 0.013, half: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """A horizontal square at height z (two triangles)."""
    vertices = np.array([[-half, -half, z], [half, -half, z], [half, half, z], [-half, half, z]])
    return vertices, np.array([[0, 1, 2], [0, 2, 3]])


def _positions(coords: np.ndarray, surfels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Surfel centres [N, P, 3] (asset space), normals [N, P, 3] and sigmas [N, P, 3] (voxels)."""
    table = surfels.reshape(len(coords), PER_VOXEL, SURFEL_CHANNELS)
    centres = voxel_centres(torch.from_numpy(coords), R).numpy()[:, None] + table[..., :3] / R
    normals = quat_to_rotmat(torch.from_numpy(table[..., 3:7]).double()).numpy()[..., :, 2]
    return centres, normals, table[..., 7:]


def test_batched_rotmat_to_quat_inverts_quat_to_rotmat_at_every_angle() -> None:
    rng = np.random.default_rng(0)
    angles = np.concatenate([rng.uniform(-np.pi, np.pi, 200), [0.0, np.pi, -np.pi, np.pi / 2]])
    axes = rng.normal(size=(len(angles), 3))
    axes[-4:] = np.eye(3)[[0, 0, 1, 2]]
    axes /= np.linalg.norm(axes, axis=-1, keepdims=True)
    k = np.zeros((len(angles), 3, 3))  # Rodrigues: R = I + sin a K + (1 - cos a) K^2
    k[:, 0, 1], k[:, 0, 2], k[:, 1, 2] = -axes[:, 2], axes[:, 1], -axes[:, 0]
    k -= k.transpose(0, 2, 1)
    rotations = np.eye(3) + np.sin(angles)[:, None, None] * k + (1 - np.cos(angles))[:, None, None] * k @ k
    quats = rotmat_to_quat(torch.from_numpy(rotations))
    assert torch.allclose(quats.norm(dim=-1), torch.ones(len(angles), dtype=torch.float64))
    back = quat_to_rotmat(quats).numpy()
    assert np.abs(back - rotations).max() < 1e-9


def test_mesh_surfels_lie_on_a_sphere_with_radial_normals() -> None:
    vertices, faces = _sphere()
    coords = voxelize_mesh(vertices, faces, R)
    centres, normals, sigmas = _positions(coords, mesh_surfels(vertices, faces, coords, R))
    radius = np.linalg.norm(centres, axis=-1)
    error = np.abs(radius - 0.4) * R  # in voxels
    assert error.mean() < 0.12 and np.quantile(error, 0.99) < 0.5
    radial = np.abs((normals * centres / radius[..., None]).sum(-1))
    assert radial.mean() > 0.995 and radial.min() > 0.95
    assert (sigmas[..., 2] < sigmas[..., :2].min(-1)).all()  # flat: thinner than wide
    # the surfels from the voxels alone sit at the voxel centres: a third of a voxel off, several times worse
    centres_v, _, _ = _positions(coords, voxel_surfels(coords, R))
    assert (np.abs(np.linalg.norm(centres_v, axis=-1) - 0.4) * R).mean() > 2 * error.mean()


def test_mesh_surfels_of_a_plane_sit_at_its_height_and_tile_each_voxel() -> None:
    z = 0.013  # 0.832 voxels above the grid's centre plane: inside voxel layer 32, 0.332 voxel above its centre
    vertices, faces = _square(z)
    coords = voxelize_mesh(vertices, faces, R)
    assert set(coords[:, 2]) == {32}
    centres, normals, sigmas = _positions(coords, mesh_surfels(vertices, faces, coords, R))
    assert np.abs(centres[..., 2] - z).max() < 1e-6
    assert np.abs(np.abs(normals[..., 2]) - 1).max() < 1e-6
    inner = (coords[:, :2] > 13).all(-1) & (coords[:, :2] < 50).all(-1)  # voxels the square covers whole
    # each quadrant is half a voxel wide: its samples spread by 0.5 / sqrt(12) along both in-plane axes
    spread = sigmas[inner][..., :2] / 2.2
    assert np.abs(spread.mean() - 0.5 / math.sqrt(12)) < 0.01
    offsets = (centres[inner][..., :2] - voxel_centres(torch.from_numpy(coords[inner]), R).numpy()[:, None, :2]) * R
    balance = np.abs(offsets.mean(1))  # the four quadrants balance about the voxel centre (up to sampling)...
    assert balance.mean() < 0.05 and balance.max() < 0.2
    distance = np.linalg.norm(offsets, axis=-1)  # ...each a quarter voxel or so away (the split's angle is free)
    assert distance.min() > 0.15 and distance.max() < 0.5 and abs(distance.mean() - 0.33) < 0.05


def test_nearest_points_equal_brute_force_near_and_far_from_the_points() -> None:
    """Against `torch.cdist`'s argmin: a surface's samples (a sphere's, grouped in voxels) with queries on it, inside
    it and far outside (up to a third of the cube away), points outside the cube, and no queries at all."""
    rng = np.random.default_rng(3)
    on_sphere = rng.normal(size=(20000, 3))
    points = 0.3 * on_sphere / np.linalg.norm(on_sphere, axis=1, keepdims=True)
    points = np.concatenate([points, rng.uniform(-0.7, 0.7, (50, 3))])  # a few beyond the cube's faces
    queries = rng.uniform(-0.5, 0.5, (700, 3))
    for resolution in (64, 8):
        for chunk in (1 << 22, 1000):  # one block of queries, and many
            found = nearest_points(queries, points, resolution, chunk=chunk)
            truth = torch.cdist(torch.from_numpy(queries), torch.from_numpy(points)).argmin(1).numpy()
            distance = lambda idx: ((points[idx] - queries) ** 2).sum(-1)  # noqa: E731 (ties may differ)
            np.testing.assert_allclose(distance(found), distance(truth), rtol=0, atol=1e-15)
    assert nearest_points(np.zeros((0, 3)), points, 64).shape == (0,)


def test_zero_heads_put_the_gaussians_exactly_at_the_surfels() -> None:
    vertices, faces = _sphere()
    coords = voxelize_mesh(vertices, faces, R)[:50]
    surfels = mesh_surfels(vertices, faces, voxelize_mesh(vertices, faces, R), R)[:50]
    lad = build_networks("near-tiny")["renderer"]
    config = lad.rep_config
    g = config.num_gaussians
    zeros = torch.zeros(len(coords), config.gs_channels)
    out = intrinsic_gaussians(torch.from_numpy(coords), zeros, torch.zeros(len(coords), config.pbr_channels),
                              config, surfels=surfel_tensors(surfels))
    centres, normals, sigmas = _positions(coords, surfels)
    assert np.allclose(out.means.numpy(), centres.reshape(-1, 3), atol=1e-6)
    rot = quat_to_rotmat(out.quats).numpy()
    assert np.allclose(np.abs((rot[:, :, 2] * normals.reshape(-1, 3)).sum(-1)), 1.0, atol=1e-5)
    expected = np.sqrt((sigmas.reshape(-1, 3) / R) ** 2 + config.min_kernel_size ** 2)
    assert np.allclose(out.scales.numpy(), expected, rtol=1e-4)
    assert g == PER_VOXEL


def _square_alpha(placement: str) -> tuple[np.ndarray, np.ndarray]:
    """Alpha of the untrained near-tiny (zero heads) rendering the square from above, and the square's exact mask."""
    torch.manual_seed(0)
    nets = build_networks("near-tiny")
    vertices, faces = _square()
    coords = voxelize_mesh(vertices, faces, R)
    surfels = mesh_surfels(vertices, faces, coords, R)
    materials = np.tile(np.array([0.5, 0.5, 0.5, 0.5, 0.0, 0.5], np.float32), (len(coords), 1))
    priors = VoxelPriors.of(coords, R, materials, surfels)
    priors = VoxelPriors(priors.materials, priors.surfels, at_surfels=placement == "surfels")
    camera = Camera.look_at(np.array([0.0, -0.0001, 2.0]), np.zeros(3), width=320, height=320, fov_x_deg=40.0)
    env = EnvMap.uniform(1.0)
    with torch.no_grad():
        h, registers = nets["decoder"](SparseTensor.from_list(
            [(torch.from_numpy(coords), torch.cat([torch.zeros(len(coords), 8), priors.materials], 1))], R))
        tokens = light_tokens(nets["hdri_encoder"], env, size=32)
        frame = decode_gaussians(nets, h, registers, tokens, camera_position=camera.position, priors=priors,
                                 ibl=IBLLight.for_frame(prefilter(env), 0.0))
        alpha = rasterize_passes(frame.pass_gaussians(), camera, filter_2d=filter_2d(nets))["alpha"][..., 0].numpy()
    # the exact mask: project the square's corners (a square parallel to the image plane stays a square)
    corners = vertices @ camera.world_to_camera[:3, :3].T + camera.world_to_camera[:3, 3]
    u = camera.fx * corners[:, 0] / corners[:, 2] + camera.cx
    v = camera.fy * corners[:, 1] / corners[:, 2] + camera.cy
    ys, xs = np.mgrid[0:320, 0:320] + 0.5
    mask = (xs > u.min()) & (xs < u.max()) & (ys > v.min()) & (ys < v.max())
    return alpha, mask


def _grow(mask: np.ndarray, pixels: int) -> np.ndarray:
    """`mask` dilated by `pixels` (a square neighbourhood)."""
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    return torch.nn.functional.max_pool2d(t, 2 * pixels + 1, 1, pixels)[0, 0].numpy() > 0


def test_untrained_near_tiny_draws_a_square_solid_and_tight_from_its_surfels() -> None:
    """The dotted look and the wide outline were Gaussians spread over whole voxels: from the surfels, the square
    is opaque inside and ends where it ends."""
    alpha, mask = _square_alpha("surfels")
    inside, outside = _grow(~mask, 2) == 0, _grow(mask, 2) == 0
    assert alpha[inside].min() > 0.85 and alpha[inside].mean() > 0.96  # measured 0.89 and 0.97 (voxels: 0.89 mean)
    assert alpha[outside].max() < 0.2  # measured 0.13 (voxels: 0.89, half a voxel of blur around the outline)
    iou = ((alpha > 0.5) & mask).sum() / ((alpha > 0.5) | mask).sum()
    assert iou > 0.96
    voxel_alpha, _ = _square_alpha("voxels")  # the same weights, Gaussians over the voxels: a worse outline
    voxel_iou = ((voxel_alpha > 0.5) & mask).sum() / ((voxel_alpha > 0.5) | mask).sum()
    assert voxel_iou < iou


def test_asset_surfels_are_checked_and_default_to_the_voxels() -> None:
    vertices, faces = _square()
    coords = voxelize_mesh(vertices, faces, R)
    assert np.array_equal(asset_surfels({}, coords, R), voxel_surfels(coords, R))
    good = mesh_surfels(vertices, faces, coords, R)
    assert np.array_equal(asset_surfels({EXTRA_NAME: good}, coords, R), good)
    with pytest.raises(NearError, match="expected"):
        asset_surfels({EXTRA_NAME: good[:, :12]}, coords, R)
    for bad in (np.where(np.arange(good.shape[1]) % 10 == 0, 3.0, good),  # an offset of 3 voxels
                np.where(np.arange(good.shape[1]) % 10 == 8, -1.0, good),  # a negative width
                np.where(np.arange(good.shape[1]) % 10 == 3, 5.0, good)):  # not a unit quaternion
        with pytest.raises(NearError, match="out of range"):
            asset_surfels({EXTRA_NAME: bad.astype(np.float32)}, coords, R)
    nan = good.copy()
    nan[0, 0] = np.nan
    with pytest.raises(NearError):
        asset_surfels({EXTRA_NAME: nan}, coords, R)
    # an asset carries them through its file
    asset = Asset(coords, np.zeros((len(coords), 8), np.float32), resolution=R, extras={EXTRA_NAME: good})
    assert np.array_equal(asset.extras[EXTRA_NAME], good)


def test_a_lad_restarts_its_geometry_rows_only() -> None:
    from near_engine.models.lad import HEAD_LAYOUT

    torch.manual_seed(1)
    lad = build_networks("near-tiny")["renderer"]
    with torch.no_grad():
        for layer in (lad.gs_out_layer[-1], lad.scale_out_layer, lad.normal_out_layer):
            layer.weight.normal_()
            layer.bias.normal_()
    lad.restart_geometry()
    g, start, kept = lad.num_gaussians, 0, 0
    for name, k in HEAD_LAYOUT["gs"]:
        rows = lad.gs_out_layer[-1].weight[start:start + k * g]
        if name in ("_xyz", "_scaling", "_rotation"):
            assert not rows.abs().sum()
        else:
            kept += int(rows.abs().sum() > 0)
        start += k * g
    assert kept == 2  # base colour and opacity keep what they learned
    assert not lad.scale_out_layer.weight.abs().sum() and not lad.normal_out_layer.weight.abs().sum()


def test_a_lift_without_a_mesh_puts_its_surfels_on_the_surface_it_inflated() -> None:
    """`own` and `inflate` lifts triangulate their slab's front and back depth maps: the surfels lie on those
    surfaces (checked against the maps themselves), where the voxel centres lie up to half a voxel off."""
    from near_engine.lift import photo_camera
    from near_engine.lift.geometry import inflate_silhouette, inflated_slab

    size = 256
    camera = photo_camera(0.0, size)
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    alpha = (((xs - 128) / 90) ** 2 + ((ys - 128) / 60) ** 2 < 1).astype(np.float32)  # an ellipse
    coords, surfels = inflate_silhouette(alpha, camera, R, with_surfels=True)
    front, back, mask, small = inflated_slab(alpha, camera)

    def off_surface(points: np.ndarray) -> np.ndarray:
        """Distance in voxels along the view axis to the nearer of the two surfaces, where the pixel is inside."""
        pixels, z = small.project(points)
        grid = torch.from_numpy(2 * pixels / np.array(mask.shape[::-1]) - 1).float()[None, None]
        maps = torch.from_numpy(np.stack([front, back, mask]).astype(np.float32))[None]
        near, far, inside = torch.nn.functional.grid_sample(maps, grid, align_corners=False)[0, :, 0].numpy()
        keep = (inside > 0.999) & (far - near > 8.0 / R)  # away from the rim, where the surfaces are steep and meet
        return (np.minimum(np.abs(z - near), np.abs(z - far)) * R)[keep]

    on = off_surface(_positions(coords, surfels)[0].reshape(-1, 3))
    centres = off_surface(_positions(coords, voxel_surfels(coords, R))[0].reshape(-1, 3))
    assert np.median(on) < 0.1 and np.median(on) < 0.5 * np.median(centres)


def test_materials_at_the_surfels_hold_detail_finer_than_a_voxel() -> None:
    """A plane painted with a colour ramp that changes fast across each voxel, seen from above by two views with
    exact G-buffers: the materials lifted at the surfels match the paint at their centres, those of the voxel (the
    same for its four surfels) do not."""
    from near_engine.lift.encode import lift_materials, lift_surfel_materials

    height = 0.013
    vertices, faces = _square(height, 0.25)
    coords = voxelize_mesh(vertices, faces, R)
    surfels = mesh_surfels(vertices, faces, coords, R)

    def paint(x: np.ndarray) -> np.ndarray:  # red rises, blue falls, over 2 voxels
        t = 0.5 + 0.45 * np.sin(2 * np.pi * x * R / 2.0)
        return np.stack([t, np.full_like(t, 0.3), 1 - t], -1)

    cameras = [Camera.look_at(np.array([dx, -0.0001, 1.5]), np.array([dx, 0.0, 0.0]), width=512, height=512,
                              fov_x_deg=30.0) for dx in (-0.05, 0.05)]
    gbuffers = {name: [] for name in ("base_color", "roughness", "metallic", "specular")}
    alphas, depths = [], []
    for camera in cameras:
        origins, directions = camera.pixel_rays()
        t = (height - origins[..., 2]) / directions[..., 2]
        hit = origins + t[..., None] * directions
        inside = (np.abs(hit[..., :2]) <= 0.25).all(-1)
        alpha = inside[..., None].astype(np.float32)
        gbuffers["base_color"].append(paint(hit[..., 0]) * alpha)
        for name, value in (("roughness", 0.4), ("metallic", 0.0), ("specular", 0.5)):
            gbuffers[name].append(np.full(alpha.shape[:2], value, np.float32) * alpha[..., 0])
        alphas.append(alpha)
        depths.append(np.where(inside, t * (directions @ camera.camera_to_world[:3, 2]), 1e10))
    g = {k: torch.from_numpy(np.stack(v).astype(np.float32)) for k, v in gbuffers.items()}
    alpha, depth = torch.from_numpy(np.stack(alphas)), torch.from_numpy(np.stack(depths).astype(np.float32))
    voxel = lift_materials(g, alpha, cameras, depth, coords, R)
    at_surfels = lift_surfel_materials(g, alpha, cameras, depth, coords, surfels, voxel, R).reshape(-1, 6)
    truth = paint(surfel_centres(coords, surfels, R)[:, 0])
    inner = np.repeat((np.abs((coords + 0.5) / R - 0.5)[:, :2] < 0.2).all(-1), PER_VOXEL)  # away from the edges
    surfel_error = np.abs(at_surfels[inner, :3] - truth[inner]).mean()
    voxel_error = np.abs(np.repeat(voxel, PER_VOXEL, 0)[inner, :3] - truth[inner]).mean()
    assert surfel_error < 0.03, surfel_error
    assert voxel_error > 3 * surfel_error, (voxel_error, surfel_error)
    assert np.allclose(at_surfels[inner, 3:], [0.4, 0.0, 0.5], atol=1e-4)


def test_materials_at_the_surfels_are_checked_before_use() -> None:
    from near_engine.frame import SURFEL_MATERIALS, surfel_materials

    assert surfel_materials({}, 3) is None  # assets from before them
    good = np.full((3, PER_VOXEL * 6), 0.5, np.float32)
    assert surfel_materials({SURFEL_MATERIALS: good}, 3).shape == (3 * PER_VOXEL, 6)
    with pytest.raises(ValueError, match="expected"):
        surfel_materials({SURFEL_MATERIALS: good[:, :12]}, 3)
    for bad in (np.nan, 1.5, -0.1):
        table = good.copy()
        table[1, 2] = bad
        with pytest.raises(ValueError, match="re-encode"):
            surfel_materials({SURFEL_MATERIALS: table}, 3)
