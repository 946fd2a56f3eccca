"""Stage 1 (`near_engine.lift`): cameras, visibility, geometry sources, the regressor and `lift_image`, against
closed forms and independent computations."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from near_engine.camera import Camera
from near_engine.errors import NearError
from near_engine.frame import DEFAULT_MATERIAL
from near_engine.lift import LiftCancelled, LiftRequest, lift_image, photo_camera
from near_engine.lift.geometry import inflate_silhouette, poisson_height, solid, surface_of, voxel_iou
from near_engine.lift.image import CROP_MARGIN, crop_object
from near_engine.lift.views import fit_crop_camera, front_camera, voxel_depth, voxel_points

R = 64


def _ball(radius: float = 0.4, centre=(0.0, 0.0, 0.0)) -> np.ndarray:
    grid = np.argwhere(np.ones((R,) * 3, dtype=bool))
    points = (grid + 0.5) / R - 0.5
    return (np.linalg.norm(points - np.asarray(centre), axis=1) <= radius).reshape((R,) * 3)


def test_front_camera_looks_from_minus_y_at_the_origin():
    camera = front_camera(30.0, 64)
    position = camera.position
    assert position == pytest.approx([0.0, -2 * math.cos(math.radians(30)), 2 * math.sin(math.radians(30))])
    pixel, depth = camera.project(np.zeros((1, 3)))
    assert pixel[0] == pytest.approx([32, 32]) and depth[0] == pytest.approx(2.0)
    with pytest.raises(ValueError):
        front_camera(95.0)


def test_crop_camera_frames_the_voxels_in_the_1_2_square():
    shell = surface_of(_ball(0.3, (0.1, 0.0, 0.05)))
    camera = fit_crop_camera(front_camera(0.0, 512), shell, R, 100)
    points = voxel_points(shell, R)
    pixels, _ = camera.project(points)
    extent = pixels.max(0) - pixels.min(0)  # centres: half a voxel inside the padded box on each side
    assert max(extent) == pytest.approx(100 / CROP_MARGIN, rel=0.05)
    assert (pixels.max(0) + pixels.min(0)) / 2 == pytest.approx([50, 50], abs=1.0)


def test_voxel_depth_matches_the_ray_sphere_intersection():
    shell = surface_of(_ball(0.4))
    camera = fit_crop_camera(front_camera(0.0), shell, R, 96)
    depth = voxel_depth(shell, R, camera)
    origins, directions = camera.pixel_rays()
    # closed form: first hit of each ray with the sphere of radius 0.4 at the origin, as camera z
    b = (origins * directions).sum(-1)
    c = (origins ** 2).sum(-1) - 0.4 ** 2
    hit = b * b - c > 0.01
    t = -b - np.sqrt(np.clip(b * b - c, 0, None))
    z = t * (directions @ camera.world_to_camera[2, :3])
    wide = (origins ** 2).sum(-1) - (0.4 + 1.5 / R) ** 2  # beyond the voxels' own half-voxel overhang
    assert (depth[hit] < 1e9).mean() > 0.97 and (depth[b * b - wide < 0] > 1e9).all()
    both = hit & (depth < 1e9)
    assert np.abs(depth[both] - z[both]).mean() < 1.5 / R  # within the voxels' own quantization
    far = voxel_depth(shell, R, camera, farthest=True)
    z_far = (-b + np.sqrt(np.clip(b * b - c, 0, None))) * (directions @ camera.world_to_camera[2, :3])
    assert np.abs(far[both] - z_far[both]).mean() < 1.5 / R  # the last voxel along the ray: the ball's back


def test_poisson_height_of_a_disc_is_the_closed_form():
    yy, xx = np.mgrid[:64, :64] + 0.5
    r2 = (yy - 32) ** 2 + (xx - 32) ** 2
    disc = r2 < 20 ** 2
    h = poisson_height(disc[None])[0].numpy()
    exact = np.clip((20.5 ** 2 - r2) / 4, 0, None)  # the discrete outline lies about half a pixel out
    assert np.abs(h - exact)[disc].max() < 0.06 * exact.max()
    assert not h[~disc].any()


def test_solid_and_surface_are_inverse_and_iou_scores_overlap():
    ball = _ball(0.35)
    shell = surface_of(ball)
    assert np.array_equal(solid(shell), ball)
    assert voxel_iou(shell, shell) == 1.0
    smaller = surface_of(_ball(0.3))
    assert voxel_iou(smaller, shell) == pytest.approx(_ball(0.3).sum() / ball.sum(), rel=1e-6)
    assert voxel_iou(np.zeros((0, 3), np.int32), shell) == 0.0


def test_inflating_a_ball_silhouette_gives_a_ball():
    shell = surface_of(_ball(0.4))
    camera = fit_crop_camera(front_camera(0.0), shell, R, 128)
    alpha = (voxel_depth(shell, R, camera) < 1e9).astype(np.float32)
    inflated = inflate_silhouette(alpha, camera)
    assert voxel_iou(inflated, shell) > 0.75
    # a flat disc's silhouette seen edge-on is a line: inflating it gives a thin slab, not a ball
    assert voxel_iou(inflated, surface_of(_ball(0.2))) < 0.3
    with pytest.raises(NearError, match="empty"):
        inflate_silhouette(np.zeros((64, 64), np.float32), camera)


def test_photo_camera_maps_the_square_to_the_object_extent():
    camera = photo_camera(0.0, 128)
    from near_engine.lift import PHOTO_OBJECT_EXTENT

    left, _ = camera.project(np.array([[-PHOTO_OBJECT_EXTENT / 2, 0.0, 0.0], [PHOTO_OBJECT_EXTENT / 2, 0.0, 0.0]]))
    assert left[1, 0] - left[0, 0] == pytest.approx(128 / CROP_MARGIN, rel=1e-6)


def test_crop_camera_of_a_prepared_view_sees_what_the_view_sees():
    shell = surface_of(_ball(0.3, (0.1, 0.0, 0.0)))
    view = front_camera(20.0, 96)
    alpha = (voxel_depth(shell, R, view) < 1e9).astype(np.float32)
    rgba = np.concatenate([np.full(alpha.shape + (3,), 0.5, np.float32) * alpha[..., None], alpha[..., None]], -1)
    prepared = crop_object(rgba, 64)
    cropped_view = prepared.crop_camera(view)
    expected = (voxel_depth(shell, R, cropped_view) < 1e9).astype(np.float32)
    assert np.abs(prepared.rgba[..., 3] - expected).mean() < 0.03


# ---- the regressor and lift_image ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lift_weights(tmp_path_factory) -> Path:
    """near-tiny's renderer weights with a lift regressor at its step-0 state (the mesh encoder on the photo):
    plumbing for the tests, not a model."""
    from near_engine.bundled import weights_folder
    from near_engine.checkpoints import read_model_entry
    from near_engine.configs import ENCODER_KEYS, load_networks
    from near_engine.frame import DEFAULT_MATERIAL
    from near_engine.lift.regressor import init_from_encoder
    from near_engine.train.lift import export_lift

    source = Path(weights_folder("near-tiny"))
    encoders, _ = load_networks(source, "cpu", keys=ENCODER_KEYS)
    args = read_model_entry("encoder", source / "encoder").args
    networks = init_from_encoder(encoders["image_features"], encoders["encoder"], args, DEFAULT_MATERIAL)
    folder = tmp_path_factory.mktemp("lift") / "weights"
    export_lift(folder, source, networks, args, {"test": True})
    return folder


def _disc_png(path: Path, colour=(200, 40, 40), size: int = 96) -> Path:
    yy, xx = np.mgrid[:size, :size]
    inside = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2
    rgba = np.zeros((size, size, 4), np.uint8)
    rgba[inside] = (*colour, 255)
    Image.fromarray(rgba, "RGBA").save(path)
    return path


def test_step0_regressor_is_the_mesh_encoder_on_the_photo(lift_weights):
    from near_engine.configs import ENCODER_KEYS, load_networks
    from near_engine.lift import load_lift_networks
    from near_engine.lift.regressor import lift_inputs, predict_latents
    from near_engine.models.encoder import lift_features
    from near_engine.sparse import SparseTensor

    networks = load_lift_networks(lift_weights, "mesh")
    encoders, _ = load_networks(lift_weights, "cpu", keys=ENCODER_KEYS)
    shell = surface_of(_ball(0.3))
    camera = fit_crop_camera(front_camera(0.0), shell, R, 64)
    alpha = torch.from_numpy((voxel_depth(shell, R, camera) < 1e9).astype(np.float32))[..., None]
    photo = torch.cat([torch.tensor([0.6, 0.2, 0.1]) * alpha, alpha], -1)
    with torch.no_grad():
        latent, materials = predict_latents(networks, shell, photo, camera)
        # independently: the mesh encoder's features of the photo, depth-tested by the voxels
        maps = encoders["image_features"](photo[None])
        depth = torch.from_numpy(voxel_depth(shell, R, camera))[None].float()
        points = torch.from_numpy(voxel_points(shell, R)).float()
        feats = lift_features(maps, points, [camera], depth, tolerance=2.0 / R)
        expected = encoders["encoder"](SparseTensor.from_list([(torch.from_numpy(shell), feats)], R)).feats
        seen = lift_inputs(networks["lift_features"], shell, photo, camera, R)[:, 3 + 12] > 0.5  # alpha channel
    torch.testing.assert_close(latent, expected, atol=1e-4, rtol=1e-4)
    assert 0.2 < seen.float().mean() < 0.8  # the front half of the ball is seen, the back is not
    assert materials.min() >= 0 and materials.max() <= 1
    # at step 0 the base colour is the photo's own colour (the ball is one colour, seen or not) and the rest default
    torch.testing.assert_close(materials[:, :3], torch.tensor([[0.6, 0.2, 0.1]]).expand(len(shell), 3), atol=2e-3,
                               rtol=0)
    torch.testing.assert_close(materials[:, 3:], torch.tensor([DEFAULT_MATERIAL[3:]]).expand(len(shell), 3))


def _regressor_at_step0(material: tuple[float, ...], frozen: bool = False) -> tuple[dict, dict]:
    """(the regressor's networks at step 0 with `material` as its default, the near-tiny encoders it copies)."""
    from near_engine.bundled import weights_folder
    from near_engine.checkpoints import read_model_entry
    from near_engine.configs import ENCODER_KEYS, load_networks
    from near_engine.lift.regressor import init_from_encoder

    source = Path(weights_folder("near-tiny"))
    encoders, _ = load_networks(source, "cpu", keys=ENCODER_KEYS)
    if frozen:
        for net in encoders.values():
            net.requires_grad_(False)
    networks = init_from_encoder(encoders["image_features"], encoders["encoder"],
                                 read_model_entry("encoder", source / "encoder").args, material)
    return networks, encoders


def test_lift_weights_carry_their_light_prior_and_a_broken_one_is_a_clear_error(lift_weights, tmp_path):
    """A weights folder's light prior (`lift_light_prior.json`) is read with its lift networks; weights without one
    lift as before; a broken one names its file. near-tiny's own says what its training lights say: the sky is
    above."""
    from near_engine.lift import LIGHT_PRIOR_FILE, LIGHT_PRIOR_KEY, load_lift_networks
    from near_engine.lift.delight import UNIFORM_PRIOR

    from near_engine.checkpoints import read_model_entry
    from near_engine.train.lift import export_lift

    networks = load_lift_networks(lift_weights, "mesh")
    assert LIGHT_PRIOR_KEY not in networks
    folder = tmp_path / "weights"
    export_lift(folder, Path(lift_weights), networks, read_model_entry("encoder", Path(lift_weights) / "encoder").args,
                {"test": True}, UNIFORM_PRIOR)  # as `near train-lift` writes it
    assert torch.equal(load_lift_networks(folder, "mesh")[LIGHT_PRIOR_KEY].mean, UNIFORM_PRIOR.mean)
    (folder / LIGHT_PRIOR_FILE).write_text('{"mean": NaN}')
    with pytest.raises(NearError, match=LIGHT_PRIOR_FILE):
        load_lift_networks(folder, "mesh")
    assert float(load_lift_networks("near-tiny", "mesh")[LIGHT_PRIOR_KEY].mean[2]) > 1.0  # +Z, 1 is mean radiance


def _ball_photo(colour: tuple[float, float, float]) -> tuple[np.ndarray, object, torch.Tensor]:
    """(a ball's surface voxels, a front camera fitted to them, its one-colour photo [64, 64, 4] premultiplied)."""
    shell = surface_of(_ball(0.3))
    camera = fit_crop_camera(front_camera(0.0), shell, R, 64)
    alpha = torch.from_numpy((voxel_depth(shell, R, camera) < 1e9).astype(np.float32))[..., None]
    return shell, camera, torch.cat([torch.tensor(colour) * alpha, alpha], -1)


def test_the_regressor_trains_both_networks_even_from_a_frozen_encoder():
    """`near train-lift` freezes the mesh encoder it starts from (it makes the targets); the regressor's copies of its
    networks must still learn: a photo's gradient reaches the image features too (they stayed frozen once)."""
    from near_engine.frame import DEFAULT_MATERIAL
    from near_engine.lift.regressor import predict_latents

    networks, encoders = _regressor_at_step0(DEFAULT_MATERIAL, frozen=True)
    shell, camera, photo = _ball_photo((0.6, 0.3, 0.2))
    latent, materials = predict_latents(networks, shell, photo, camera)
    (latent.square().mean() + materials.square().mean()).backward()
    for name, net in networks.items():
        grads = [p.grad for p in net.parameters()]
        assert all(g is not None for g in grads), name
        assert sum(float(g.abs().sum()) for g in grads) > 0, name
    assert all(not p.requires_grad for p in encoders["image_features"].parameters())  # the source stays frozen


@pytest.mark.parametrize("probability, snapped", [(0.3, 0.0), (0.7, 1.0)])
def test_metallic_is_snapped_to_metal_or_not_at_inference(probability, snapped):
    """The regressor's metallic output is a probability of metal; a lift takes the likelier of the two, while
    training sees the probability itself (its gradient)."""
    from near_engine.frame import DEFAULT_MATERIAL
    from near_engine.lift.regressor import METALLIC, predict_latents

    networks, _ = _regressor_at_step0((*DEFAULT_MATERIAL[:4], probability, DEFAULT_MATERIAL[5]))
    shell, camera, photo = _ball_photo((0.5, 0.5, 0.5))
    _, trained = predict_latents(networks, shell, photo, camera)
    torch.testing.assert_close(trained[:, METALLIC], torch.full((len(shell),), probability), atol=1e-5, rtol=0)
    assert trained.requires_grad
    with torch.no_grad():
        _, lifted = predict_latents(networks, shell, photo, camera)
    assert torch.equal(lifted[:, METALLIC], torch.full((len(shell),), snapped))
    torch.testing.assert_close(lifted[:, 3], trained[:, 3].detach())  # roughness untouched


def test_lift_image_with_inflated_geometry_writes_a_renderable_asset(lift_weights, tmp_path):
    from near_engine.asset import read_asset, write_asset
    from near_engine.envmap import EnvMap
    from near_engine.pipeline import NearPipeline, Scene
    from near_engine.camera import Camera

    photo = _disc_png(tmp_path / "disc.png")
    stages = []
    asset = lift_image(LiftRequest(photo, lift_weights, "inflate"), lambda s, f: stages.append((s, f)))
    assert [s for s, _ in stages] == ["loading the lift networks", "preparing the image",
                                      "sampling the structure (inflate)", "sampling the latent", "done"]
    assert [f for _, f in stages] == sorted(f for _, f in stages)
    assert asset.num_voxels > 500 and asset.extras["base_color"].shape == (asset.num_voxels, 3)
    assert asset.source.startswith("photo:disc.png:sha256:") and asset.source.endswith("geometry:inflate")
    # the disc inflates into a ball: as wide as it is deep
    extent = asset.coords.max(0) - asset.coords.min(0)
    assert extent[0] == pytest.approx(extent[1], rel=0.2) and extent[0] == pytest.approx(extent[2], rel=0.2)
    write_asset(tmp_path / "disc.near", asset)
    pipeline = NearPipeline.from_pretrained(lift_weights, "cpu")
    camera = Camera.orbit(-90, 0, 2.0, width=48, height=48)
    out = pipeline.render(Scene([(read_asset(tmp_path / "disc.near"), np.eye(4))], EnvMap.uniform(1.0), camera,
                                transparent=True), ("combined", "alpha"))
    assert out["alpha"][24, 24, 0] > 0.9 and out["alpha"][2, 2, 0] < 0.1
    # NearPipeline.lift is the same stages on the pipeline's own weights
    again = pipeline.lift(photo, geometry="inflate")
    np.testing.assert_array_equal(again.coords, asset.coords)
    np.testing.assert_allclose(again.feats, asset.feats, atol=1e-5)


def test_lift_errors_are_clear_and_cancel_stops(lift_weights, tmp_path):
    photo = _disc_png(tmp_path / "disc.png")
    with pytest.raises(NearError, match="cannot lift a photo"):
        lift_image(LiftRequest(photo, _renderer_only(tmp_path), "inflate"))
    with pytest.raises(NearError, match="needs a mesh to take"):
        lift_image(LiftRequest(photo, lift_weights, "mesh"))
    with pytest.raises(NearError, match="own"):
        lift_image(LiftRequest(photo, lift_weights, "own"))  # these test weights have no geometry model
    with pytest.raises(NearError, match="TRELLIS-image-large"):
        lift_image(LiftRequest(photo, lift_weights, "trellis"))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(NearError):
        lift_image(LiftRequest(tmp_path / "broken.png", lift_weights, "inflate"))
    calls = []
    with pytest.raises(LiftCancelled):
        lift_image(LiftRequest(photo, lift_weights, "inflate"), cancel=lambda: calls.append(1) or len(calls) > 2)
    assert len(calls) == 3


def _renderer_only(tmp_path: Path) -> Path:
    """near-tiny without its lift networks."""
    from near_engine.bundled import weights_folder

    folder = tmp_path / "renderer_only"
    shutil.copytree(weights_folder("near-tiny"), folder)
    pipeline = json.loads((folder / "pipeline.json").read_text())
    for key in ("lift_features", "lift_encoder", "occupancy"):
        pipeline["models"].pop(key, None)
    (folder / "pipeline.json").write_text(json.dumps(pipeline))
    return folder


def test_surface_fill_is_the_laplace_solution_along_a_line():
    """Known values 0 and 1 at the ends of a straight row of voxels: the unknown ones between are the linear ramp
    (the 1-D Laplace equation's solution), not a step from the nearest end."""
    from near_engine.lift.regressor import surface_filled

    coords = np.stack([np.arange(10, 30), np.full(20, 32), np.full(20, 32)], -1)
    values = torch.zeros(20, 1)
    values[-1] = 1.0
    known = torch.zeros(20, dtype=torch.bool)
    known[[0, -1]] = True
    filled = surface_filled(values, known, coords, R)[:, 0].numpy()
    np.testing.assert_allclose(filled, np.linspace(0, 1, 20), atol=0.02)


def test_the_level_fill_carries_a_band_round_the_hidden_sides_of_an_upright_cylinder():
    """A cylinder's shell painted with a band (1 between two heights, 0 elsewhere), known on its front and back
    arcs only. Filled level (`LEVEL_FILL`), the sides take the band at its heights; an isotropic fill blurs it. A
    voxel with no level neighbour keeps its nearest known value."""
    from near_engine.lift.regressor import LEVEL_FILL, surface_filled

    grid = np.stack(np.meshgrid(*[np.arange(R)] * 3, indexing="ij"), -1)
    x, y, z = (grid[..., 0] + 0.5 - R / 2), (grid[..., 1] + 0.5 - R / 2), grid[..., 2]
    coords = surface_of((np.hypot(x, y) < 20) & (z >= 10) & (z < 54))
    coords = coords[(coords[:, 2] > 10) & (coords[:, 2] < 53)]  # the side wall only: no lids
    cx, cy = coords[:, 0] + 0.5 - R / 2, coords[:, 1] + 0.5 - R / 2
    band = ((coords[:, 2] >= 28) & (coords[:, 2] < 34)).astype(np.float32)
    known = torch.from_numpy(np.abs(cy) > 0.5 * np.hypot(cx, cy))  # front and back arcs, 60 degrees either way
    values = torch.from_numpy(band[:, None]) * known[:, None]
    sides = ~known.numpy()
    level = surface_filled(values, known, coords, R, vertical=LEVEL_FILL)[:, 0].numpy()
    isotropic = surface_filled(values, known, coords, R)[:, 0].numpy()
    assert np.abs(level - band)[sides].mean() < 0.01
    assert np.abs(isotropic - band)[sides].mean() > 0.1
    lone = np.array([[2, 32, 31]])  # a voxel with no neighbour, level with the band: its nearest known value
    filled = surface_filled(torch.cat([values, torch.zeros(1, 1)]), torch.cat([known, torch.zeros(1, dtype=bool)]),
                            np.concatenate([coords, lone]), R, vertical=LEVEL_FILL)
    assert float(filled[-1, 0]) == 1.0 and torch.isfinite(filled).all()


def _paint(x: np.ndarray) -> np.ndarray:
    """Stripes along x, 1.5 voxels a period."""
    return np.stack([0.5 + 0.3 * np.sin(2 * np.pi * x * R / 1.5), np.full_like(x, 0.4), np.full_like(x, 0.2)], -1)


def _striped_sphere(shading) -> tuple[np.ndarray, np.ndarray, np.ndarray, object, np.ndarray]:
    """(coords, surfels, photo [512, 512, 4], its camera, the surfels' centres) of a sphere of radius 0.4 painted
    with `_paint` and photographed from the front, each pixel's colour times `shading(normal [..., 3], facing [...])`
    (facing: |cos| between the normal and the line of sight)."""
    from near_engine.surfels import mesh_surfels, surfel_centres
    from near_engine.voxelize import voxelize_mesh
    from test_surfels import _sphere

    vertices, faces = _sphere(0.4)
    coords = voxelize_mesh(vertices, faces, R)
    surfels = mesh_surfels(vertices, faces, coords, R)
    camera = fit_crop_camera(front_camera(0.0, 512), coords, R, 512)
    origins, directions = camera.pixel_rays()
    b = (origins * directions).sum(-1)
    c = (origins ** 2).sum(-1) - 0.4 ** 2
    hit = b * b - c > 0
    point = origins + (-b - np.sqrt(np.clip(b * b - c, 0, None)))[..., None] * directions
    facing = np.abs((point / 0.4 * -directions).sum(-1))
    rgb = _paint(point[..., 0]) * shading(point / 0.4, facing)[..., None]
    photo = np.concatenate([rgb * hit[..., None], hit[..., None]], -1).astype(np.float32)
    return coords, surfels, photo, camera, surfel_centres(coords, surfels, R)


def test_a_lift_colours_its_surfels_from_the_photo_face_on_and_continues_them_round_the_back():
    """A sphere photographed from the front: painted with stripes finer than a voxel where it faces the camera, and
    darkened at its rim, where it is seen at a slant (as shading and Fresnel darken a real photo's rim). The surfels
    facing the camera take the stripes (closed form at their centres); the hidden back, the front's mirror image
    (the stripes run on round it), never the dark rim."""
    from near_engine.lift.regressor import surfel_materials_from_photo
    from near_engine.surfels import PER_VOXEL

    coords, surfels, photo, camera, centres = _striped_sphere(lambda normal, facing: np.where(facing > 0.45, 1.0, 0.2))
    materials = torch.tensor([DEFAULT_MATERIAL]).expand(len(coords), 6)
    out = surfel_materials_from_photo(torch.from_numpy(photo), camera, coords, surfels, materials,
                                      torch.ones(len(coords), 3), R).numpy()
    assert out.shape == (len(coords) * PER_VOXEL, 6)
    towards = camera.position - centres
    cosine = (centres / 0.4 * towards / np.linalg.norm(towards, axis=1, keepdims=True)).sum(1)
    front, back = cosine > 0.8, cosine < -0.5
    assert np.abs(out[front, 0] - _paint(centres[front, 0])[:, 0]).mean() < 0.05  # the stripes, per surfel
    assert np.abs(out[back, 1] - 0.4).mean() < 0.05 and np.abs(out[back, 2] - 0.2).mean() < 0.05  # not the rim's
    deep = cosine < -0.8  # whose mirror image the photo sees face on
    assert np.abs(out[deep, 0] - _paint(centres[deep, 0])[:, 0]).mean() < 0.05  # the stripes, mirrored
    np.testing.assert_allclose(out[:, 3:], np.broadcast_to(DEFAULT_MATERIAL[3:], (len(out), 3)), atol=1e-6)


def test_the_hidden_side_of_a_shape_that_is_not_symmetric_takes_the_mean_of_what_the_photo_shows():
    """A teardrop pointing at the camera (not mirror symmetric front to back), photographed red on its left half and
    blue on its right. Its hidden back is neither: it takes the mean of the colours the photo shows, a purple, even
    next to either rim (continuing the rims drew it red on one side and blue on the other)."""
    from near_engine.lift.regressor import _facing, photo_colours, surfel_materials_from_photo
    from near_engine.surfels import mesh_surfels, surfel_centres, surfel_normals
    from near_engine.voxelize import voxelize_mesh
    from test_surfels import _sphere

    vertices, faces = _sphere(0.4)
    vertices = vertices * np.where(np.arange(3) == 1, 1.0, 1 - 0.9 * (0.4 - vertices[:, 1:2]) / 0.8)
    coords = voxelize_mesh(vertices, faces, R)
    surfels = mesh_surfels(vertices, faces, coords, R)
    camera = fit_crop_camera(front_camera(0.0, 256), coords, R, 256)  # at -Y, the teardrop's tip towards it
    inside = voxel_depth(coords, R, camera) < 1e9
    left = (np.arange(256) < camera.cx)[None, :].repeat(256, 0)
    rgb = np.where(left[..., None], [0.8, 0.1, 0.1], [0.1, 0.1, 0.8]) * inside[..., None]
    photo = torch.from_numpy(np.concatenate([rgb, inside[..., None]], -1).astype(np.float32))
    materials = torch.tensor([DEFAULT_MATERIAL]).expand(len(coords), 6)
    out = surfel_materials_from_photo(photo, camera, coords, surfels, materials, torch.ones(len(coords), 3), R)
    points = torch.from_numpy(surfel_centres(coords, surfels, R))
    colours, seen = photo_colours(photo, points, coords, camera, R)
    seen = seen & _facing(points, surfel_normals(surfels), camera)
    back = points[:, 1] > 0.15  # far behind the part the photo sees face on
    assert bool(back.any()) and not bool((seen & back).any())
    mean = colours[seen].mean(0)
    assert 0.3 < float(mean[0]) < 0.6 and 0.3 < float(mean[2]) < 0.6  # both halves seen
    assert float((out[back, :3] - mean).abs().max()) < 0.1


def test_a_lift_with_a_light_prior_takes_the_photos_shading_out():
    """The striped sphere photographed under a sky of radiance 1 + 0.8 w_z (metered: mean 1), Lambertian (specular
    level 0): each point shows its paint times 1 + (2/3) 0.8 n_z, half as bright below as above. Lifted with a light
    prior, the surfels the photo sees get their paint back (closed form); without one they keep the shading."""
    from near_engine.lift.delight import UNIFORM_PRIOR
    from near_engine.lift.regressor import surfel_materials_from_photo

    coords, surfels, photo, camera, centres = _striped_sphere(lambda normal, facing: 1 + 2 / 3 * 0.8 * normal[..., 2])
    materials = torch.tensor([[*DEFAULT_MATERIAL[:3], 0.5, 0.0, 0.0]]).expand(len(coords), 6)
    towards = camera.position - centres
    seen = (centres / 0.4 * towards / np.linalg.norm(towards, axis=1, keepdims=True)).sum(1) > 0.6
    errors = []
    for prior in (None, UNIFORM_PRIOR):
        out = surfel_materials_from_photo(torch.from_numpy(photo), camera, coords, surfels, materials,
                                          torch.ones(len(coords), 3), R, prior).numpy()
        errors.append(np.abs(out[seen, :3] - _paint(centres[seen, 0])).mean())
    assert errors[0] > 0.05 and errors[1] < errors[0] / 4, errors  # 0.061 and 0.0075


def test_the_front_back_mirror_is_upright_and_maps_a_symmetric_object_onto_itself():
    """The mirror plane stands upright (assets stand on +Z) across the line of sight, even from an elevated camera,
    through the middle of the points' extent: heights and sideways positions stay, depths flip."""
    from near_engine.lift.regressor import front_back_mirrored

    camera = Camera.orbit(-90.0, 35.0, 2.0, width=64, height=64)  # at -Y, looking down at 35 degrees
    rng = np.random.default_rng(0)
    half = rng.uniform(-0.3, 0.3, (500, 3))
    p = np.concatenate([half, half * [-1, 1, 1]]) + [0.0, 0.05, 0.1]  # symmetric in x: the sight line is along y
    normals = rng.normal(size=(1000, 3))
    (mirrored, turned), y = front_back_mirrored(torch.from_numpy(p), torch.from_numpy(normals), camera), p[:, 1]
    mirrored = mirrored.numpy()
    np.testing.assert_allclose(mirrored[:, [0, 2]], p[:, [0, 2]], atol=1e-9)
    np.testing.assert_allclose(mirrored[:, 1], y.min() + y.max() - y, atol=1e-9)
    np.testing.assert_allclose(turned.numpy(), normals * [1, -1, 1], atol=1e-9)
    above = Camera.look_at(np.array([0.0, 0.0, 2.0]), np.zeros(3), width=64, height=64, fov_x_deg=40.0)  # straight down: flips z
    level = np.concatenate([half, half * [-1, -1, 1]])  # centred under it
    flipped = front_back_mirrored(torch.from_numpy(level), torch.from_numpy(normals), above)[0].numpy()
    np.testing.assert_allclose(flipped[:, :2], level[:, :2], atol=1e-9)
    np.testing.assert_allclose(flipped[:, 2], level[:, 2].min() + level[:, 2].max() - level[:, 2], atol=1e-9)


def test_the_mirror_stands_in_for_the_back_only_where_the_object_is_symmetric():
    """A sphere mirrored front to back lands on itself, surfel on parallel surfel; a teardrop pointing at the camera
    lands its round back on its narrow front, across the surface, so its front's colours are not copied there."""
    from near_engine.lift.regressor import _symmetric, front_back_mirrored
    from near_engine.surfels import mesh_surfels, surfel_centres, surfel_normals
    from near_engine.voxelize import voxelize_mesh
    from test_surfels import _sphere

    camera = front_camera(0.0)  # at -Y
    shares = []
    for squeeze in (0.0, 0.9):
        vertices, faces = _sphere(0.4)
        vertices = vertices * np.where(np.arange(3) == 1, 1.0, 1 - squeeze * (0.4 - vertices[:, 1:2]) / 0.8)
        coords = voxelize_mesh(vertices, faces, R)
        surfels = mesh_surfels(vertices, faces, coords, R)
        points = torch.from_numpy(surfel_centres(coords, surfels, R))
        normals = surfel_normals(surfels)
        back = points[:, 1] > 0.1
        mirrored = front_back_mirrored(points, normals, camera)
        shares.append(float(_symmetric(*mirrored, coords, normals, R)[back].float().mean()))
    assert shares[0] > 0.9 and shares[1] < 0.3, shares
