"""Per-frame NeAR rendering (`near_engine.frame`): light tokens -> LAD -> Gaussians -> shading -> two passes.

Every test uses `random_weights("near-tiny", seed)`: seeded, UNTRAINED networks. They check shapes, ranges, wiring,
invariances and gradients, never image quality (the renders are noise). near-tiny has the PBR shading core, so every
frame also takes the asset's priors (material latents, voxel normals) and the prefiltered light.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from near_engine.camera import Camera
from near_engine.configs import random_weights
from near_engine.envmap import EnvMap
from near_engine.frame import (
    BACKGROUND_DEPTH,
    PassGaussians,
    VoxelPriors,
    decode_gaussians,
    light_planes,
    light_tokens,
    rasterize_passes,
)
from near_engine.ibl import IBLLight, prefilter
from near_engine.sparse import SparseTensor

WIDTH, HEIGHT, PLANES = 64, 48, 64
INTRINSIC_PASSES = ("base_color", "roughness", "metallic", "normal", "depth", "alpha")


@pytest.fixture(scope="module")
def networks():
    return random_weights("near-tiny", seed=3)


@pytest.fixture(scope="module")
def asset():
    """About 300 voxels in a blob around the grid centre: random LH latents next to random material latents (what
    near-tiny's IAD reads)."""
    g = torch.Generator().manual_seed(0)
    coords = torch.unique(torch.randint(25, 39, (420, 3), generator=g), dim=0)[:300]
    feats = torch.cat([torch.randn(coords.shape[0], 8, generator=g), torch.rand(coords.shape[0], 6, generator=g)], 1)
    return SparseTensor.from_list([(coords, feats)], 64)


def _priors(asset: SparseTensor) -> VoxelPriors:
    return VoxelPriors.of(asset.coords[:, 1:].numpy(), 64, asset.feats[:, 8:].numpy())


def _ibl(env: EnvMap) -> IBLLight:
    return IBLLight.for_frame(prefilter(env), env.rotation_z, strength=env.strength)


def _env(seed: int, **kwargs) -> EnvMap:
    rng = np.random.default_rng(seed)
    return EnvMap.from_array((rng.random((16, 32, 3)) * 3).astype(np.float32), **kwargs)


def _camera(eye=(1.3, -1.1, 0.7), target=(0.0, 0.0, 0.0)) -> Camera:
    return Camera.look_at(np.array(eye), np.array(target), width=WIDTH, height=HEIGHT, fov_x_deg=40.0)


def _render(networks, asset, env, camera, background=None, **kwargs):
    h, registers = networks["decoder"](asset)
    tokens = light_tokens(networks["hdri_encoder"], env, size=PLANES)
    frame = decode_gaussians(networks, h, registers, tokens, camera_position=camera.position, priors=_priors(asset),
                             ibl=_ibl(env))
    return frame, rasterize_passes(frame.pass_gaussians(), camera, background, **kwargs)


@pytest.fixture(scope="module")
def rendered(networks, asset):
    with torch.no_grad():
        return _render(networks, asset, _env(1), _camera(), _env(1))


def test_light_tokens_shape_and_strength(networks) -> None:
    env = _env(1)
    with torch.no_grad():
        tokens = light_tokens(networks["hdri_encoder"], env, size=PLANES)
        brighter = light_tokens(networks["hdri_encoder"], env.with_settings(strength=4.0), size=PLANES)
    assert tokens.shape == (1, networks["hdri_encoder"].num_tokens, networks["hdri_encoder"].output_dim)
    assert torch.isfinite(tokens).all()
    assert not torch.equal(tokens, brighter)
    scaled = EnvMap.from_array(env.pixels * 4.0)
    assert torch.equal(light_planes(env.with_settings(strength=4.0), size=PLANES), light_planes(scaled, size=PLANES))


def test_pass_shapes_and_ranges(rendered) -> None:  # near-tiny: 300 voxels x 4 Gaussians
    frame, passes = rendered
    widths = {"combined": 4, "color": 3, "shadow": 1, "lit_alpha": 1, "lit_depth": 1, "base_color": 3,
              "roughness": 1, "metallic": 1, "specular": 1, "normal": 3, "depth": 1, "alpha": 1}
    assert set(passes) == set(widths)
    for name, k in widths.items():
        assert passes[name].shape == (HEIGHT, WIDTH, k), name
        assert torch.isfinite(passes[name]).all(), name
    assert len(frame) == 300 * 4 and frame.radiance.shape == (len(frame), 3)
    for name in ("alpha", "lit_alpha", "roughness", "metallic", "shadow"):
        assert passes[name].min() >= 0 and passes[name].max() <= 1 + 1e-6, name
    alpha = passes["alpha"][..., 0]
    assert (alpha > 0.5).sum() > 50, "the object should cover part of the image"
    length = torch.linalg.vector_norm(passes["normal"][alpha > 0.5], dim=-1)
    assert torch.allclose(length, torch.ones_like(length), atol=1e-4)
    # combined: over a background its alpha is 1; HDR colour is finite and >= the ELU floor
    assert torch.all(passes["combined"][..., 3] == 1)
    assert passes["color"].min() >= -1e-3
    depth = passes["depth"][alpha > 0.5]
    assert depth.min() > 0.5 and depth.max() < 3.0  # camera about 1.85 from the centre of a small object
    assert torch.all(passes["depth"][alpha == 0] == BACKGROUND_DEPTH)


def test_environment_changes_only_the_lit_passes(networks, asset) -> None:
    camera = _camera()
    with torch.no_grad():
        _, a = _render(networks, asset, _env(1), camera)
        _, b = _render(networks, asset, _env(2, rotation_z=1.0, strength=2.5), camera)
    for name in INTRINSIC_PASSES:
        assert torch.equal(a[name], b[name]), name
    covered = a["lit_alpha"][..., 0] > 0.5
    assert (a["color"][covered] - b["color"][covered]).abs().max() > 1e-4
    assert not torch.equal(a["combined"], b["combined"])


def test_deterministic(networks, asset) -> None:
    camera = _camera()
    with torch.no_grad():
        _, a = _render(networks, asset, _env(1), camera, _env(1))
        _, b = _render(networks, asset, _env(1), camera, _env(1))
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_projected_context_and_feature_tensor_inputs_match(networks, asset, rendered) -> None:
    frame, _ = rendered
    camera = _camera()
    with torch.no_grad():
        h, registers = networks["decoder"](asset)
        tokens = light_tokens(networks["hdri_encoder"], _env(1), size=PLANES)
        context = networks["renderer"].project_context(registers, tokens)
        other = decode_gaussians(networks, h.feats, None, context, asset.coords[:, 1:], 64,
                                 camera_position=camera.position, priors=_priors(asset), ibl=_ibl(_env(1)))
    assert torch.allclose(other.radiance, frame.radiance, atol=1e-5)
    assert torch.allclose(other.intrinsic.means, frame.intrinsic.means)


def test_gradients_reach_every_network_through_the_lit_colour(networks, asset) -> None:
    for net in networks.values():
        net.zero_grad(set_to_none=True)
    camera = _camera()
    _, passes = _render(networks, asset, _env(1), camera)
    loss = (passes["color"] - 0.3).square().mean()
    loss.backward()
    for key, net in networks.items():
        grads = {n: p.grad for n, p in net.named_parameters() if p.requires_grad}
        assert any(g is not None and g.abs().sum() > 0 for g in grads.values()), f"no gradient reaches {key}"
        assert all(g is None or torch.isfinite(g).all() for g in grads.values()), key
        missing = sorted(n for n, g in grads.items() if g is None)
        if key == "renderer":  # roughness/metallic/pbr1 feed only the intrinsic pass (the PBR core takes them detached)
            assert all(n.startswith("pbr_out_layer.") for n in missing), missing
        else:
            assert not missing, (key, missing)
    for net in networks.values():
        net.zero_grad(set_to_none=True)


def test_object_behind_the_camera_gives_background(networks, asset) -> None:
    camera = _camera(eye=(2.0, 0.0, 0.0), target=(4.0, 0.0, 0.0))  # looking away from the object
    background = torch.tensor([0.25, 0.5, 2.0])
    with torch.no_grad():
        _, passes = _render(networks, asset, _env(1), camera, background)
    assert torch.all(passes["alpha"] == 0) and torch.all(passes["lit_alpha"] == 0)
    assert torch.equal(passes["combined"][..., :3], background.expand(HEIGHT, WIDTH, 3))
    assert torch.all(passes["combined"][..., 3] == 1)
    assert torch.all(passes["depth"] == BACKGROUND_DEPTH)
    # an environment map as background: what the camera sees of it
    with torch.no_grad():
        _, passes = _render(networks, asset, _env(1), camera, _env(4))
    expected = torch.from_numpy(_env(4).background(camera))
    assert torch.allclose(passes["combined"][..., :3], expected)


def test_transparent_combined_is_premultiplied_lit_colour(networks, asset) -> None:
    with torch.no_grad():
        _, passes = _render(networks, asset, _env(1), _camera())
    assert torch.equal(passes["combined"][..., :3], passes["color"])
    assert torch.equal(passes["combined"][..., 3:], passes["lit_alpha"])


def test_view_space_normals_are_the_official_axes(rendered) -> None:
    frame, passes = rendered
    camera = _camera()
    view = rasterize_passes(frame.pass_gaussians(), camera, normal_space="view")["normal"]
    rot = torch.as_tensor(np.diag([1.0, -1.0, -1.0]) @ camera.world_to_camera[:3, :3]).float()
    assert torch.allclose(view, passes["normal"] @ rot.T, atol=1e-5)
    covered = passes["alpha"][..., 0] > 0.5
    assert (view[covered][:, 2] > 0).float().mean() > 0.9  # facing the camera: +z towards the viewer (OpenGL)


def test_transformed_gaussians_render_like_a_moved_camera(rendered) -> None:
    """Moving the object by M and the camera by M gives the same image, normals turned by M's rotation."""
    frame, passes = rendered
    camera = _camera()
    a = math.radians(50.0)
    m = np.eye(4)
    m[:3, :3] = [[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]]
    m[:3, 3] = [0.3, -0.2, 0.1]
    moved = camera.with_world_to_camera(camera.world_to_camera @ np.linalg.inv(m))
    with torch.no_grad():
        world = rasterize_passes(frame.pass_gaussians().transformed(m), moved)
        joined = PassGaussians.concatenate([frame.pass_gaussians().transformed(m)])
    for name in ("color", "alpha", "base_color", "depth"):
        assert torch.allclose(world[name], passes[name], atol=2e-4), name
    rot = torch.as_tensor(m[:3, :3]).float()
    covered = passes["alpha"][..., 0] > 0.5
    assert torch.allclose(world["normal"][covered], passes["normal"][covered] @ rot.T, atol=1e-3)
    assert len(joined.intrinsic) == len(frame)


def test_bad_inputs(networks, asset) -> None:
    with torch.no_grad():
        h, registers = networks["decoder"](asset)
    tokens = torch.zeros(1, 4, networks["renderer"].model_channels)
    with pytest.raises(ValueError):
        decode_gaussians(networks, h.feats, registers, tokens, camera_position=(0, 0, 2))  # no coords
    with pytest.raises(ValueError):
        decode_gaussians(networks, h, registers, tokens, camera_position=(math.nan, 0.0, 0.0))
    with pytest.raises(KeyError):
        decode_gaussians({"renderer": networks["renderer"]}, h, registers, tokens, camera_position=(0, 0, 2))
    with pytest.raises(ValueError, match="PBR"):  # the PBR core without the asset's priors and the light
        decode_gaussians(networks, h, registers, tokens, camera_position=(0, 0, 2))
    wrong = VoxelPriors(torch.zeros(3, 6), torch.zeros(3, 40))
    with pytest.raises(ValueError, match="priors"):
        decode_gaussians(networks, h, registers, tokens, camera_position=(0, 0, 2), priors=wrong, ibl=_ibl(_env(1)))


def test_the_lit_colour_does_not_train_the_materials(networks, asset) -> None:
    """near-tiny's materials learn from the G-buffers alone: the lit colour's gradient stops at the PBR core."""
    _, passes = _render(networks, asset, _env(1), _camera())
    base_rows = networks["renderer"].gs_out_layer[-1]
    for net in networks.values():
        net.zero_grad(set_to_none=True)
    passes["color"].sum().backward(retain_graph=True)
    assert all(p.grad is None or not p.grad.abs().sum() for p in networks["renderer"].pbr_out_layer[-1].parameters())
    networks["renderer"].zero_grad(set_to_none=True)
    passes["base_color"].sum().backward()
    assert base_rows.weight.grad is not None and base_rows.weight.grad.abs().sum() > 0
    for net in networks.values():
        net.zero_grad(set_to_none=True)


def test_ablation_inputs_leave_out_what_the_decoder_was_trained_without() -> None:
    from near_engine.frame import DEFAULT_MATERIAL, ablation_inputs

    latent, materials = torch.randn(5, 8), torch.rand(5, 6)
    same = ablation_inputs(latent, materials, "lh+material")
    assert torch.equal(same[0], latent) and torch.equal(same[1], materials)
    lh = ablation_inputs(latent, materials, "lh")
    assert torch.equal(lh[0], latent) and torch.equal(lh[1], torch.tensor(DEFAULT_MATERIAL).expand(5, 6))
    only = ablation_inputs(latent, materials, "material")
    assert torch.equal(only[0], torch.zeros(5, 8)) and torch.equal(only[1], materials)
    with pytest.raises(ValueError, match="inputs"):
        ablation_inputs(latent, materials, "everything")


def test_normal_residual_starts_at_the_surfel_normals_and_learns_from_the_normal_pass(asset) -> None:
    """near-tiny's LAD corrects each Gaussian's surfel normal: untrained, the normals are the camera-facing surfel
    normals exactly; a residual turns them (still unit), and the normal pass's loss reaches the head."""
    from near_engine.configs import build_networks
    from near_engine.models.gaussian_heads import facing_camera

    torch.manual_seed(0)
    nets = build_networks("near-tiny")
    camera, env = _camera(), _env(1)
    frame, _ = _render(nets, asset, env, camera)
    expected = facing_camera(_priors(asset).normals, frame.camera_position, frame.intrinsic.means)
    assert torch.allclose(frame.normals, expected, atol=1e-6)

    head, g = nets["renderer"].normal_out_layer, nets["renderer"].num_gaussians
    with torch.no_grad():  # Gaussian k of every voxel gets a large residual along axis k % 3: the row order must agree
        bias = torch.zeros(g, 3)
        bias[torch.arange(g), torch.arange(g) % 3] = 20.0
        head.bias.copy_(bias.reshape(-1))
    frame, passes = _render(nets, asset, env, camera)
    assert torch.allclose(torch.linalg.vector_norm(frame.normals, dim=-1), torch.ones(len(frame)), atol=1e-5)
    axis = torch.arange(len(frame)) % g % 3  # Gaussian v * g + k is Gaussian k of voxel v
    along = frame.normals.detach().abs().argmax(-1)
    assert bool((along == axis).all())
    covered = passes["alpha"] > 0.5
    (passes["normal"] * covered).sum().backward()
    assert head.weight.grad is not None and float(head.weight.grad.abs().sum()) > 0


def test_the_official_renderer_has_no_normal_residual() -> None:
    from near_engine.configs import build_networks

    assert build_networks("near-official", keys=("renderer",))["renderer"].normal_out_layer is None
