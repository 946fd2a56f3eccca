"""Gaussian heads (raw head outputs -> Gaussians) and the shading MLP: official names/shapes, closed-form activations,
the Hammersley buffer, normals, output ranges and gradients. Seeded random inputs throughout (no trained weights)."""

from __future__ import annotations

import math

import pytest
import torch
from manifests import load_manifest
from torch.nn import functional as F

from near_engine.gaussians import SH_C0, Gaussians, quat_to_rotmat
from near_engine.models.blocks import nerf_encoding
from near_engine.models.gaussian_heads import (
    RepresentationConfig,
    hammersley_offsets,
    hammersley_points,
    heads_to_gaussians,
    intrinsic_gaussians,
    lit_parameters,
    radical_inverse,
    shading_normals,
    voxel_centres,
)
from near_engine.models.shading import ShadingMLP

G = 32


def _manifest(name: str) -> dict:
    return load_manifest(name.removesuffix(".json"))


def _state_shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _build_meta(args: dict) -> ShadingMLP:
    with torch.device("meta"):
        return ShadingMLP(**args)


# ---------------------------------------------------------------- shading MLP: official names and shapes


def test_shading_mlp_state_dict_equals_manifest() -> None:
    manifest = _manifest("near_neural_basis.json")
    net = _build_meta(manifest["args"])
    expected = {name: tuple(shape) for name, shape, _ in manifest["params"]}
    assert _state_shapes(net) == expected
    assert list(net.state_dict()) == [p[0] for p in manifest["params"]]
    assert sum(p.numel() for p in net.parameters()) == manifest["total_params"]
    assert not manifest["buffers"] and not list(net.buffers())


@pytest.mark.parametrize("index", range(4))
def test_shading_mlp_alternatives_equal_manifest(index: int) -> None:
    manifest = _manifest("near_neural_basis.json")
    alternative = manifest["alternatives"][index]
    net = _build_meta({**manifest["args"], **alternative["changes"]})
    expected = {name: tuple(shape) for name, shape, _ in manifest["params"]}
    for name, _old, new in alternative["shape_changed"]:
        expected[name] = tuple(new)
    for name, shape, *_ in alternative["added"]:
        expected[name] = tuple(shape)
    for name, *_ in alternative["removed"]:
        del expected[name]
    assert _state_shapes(net) == expected
    assert sum(p.numel() for p in net.parameters()) == alternative["total_params"]


@pytest.mark.parametrize("activation", ["relu", "silu", "gelu"])
def test_other_activations_keep_names(activation: str) -> None:
    manifest = _manifest("near_neural_basis.json")
    net = _build_meta({**manifest["args"], "activation": activation})
    assert _state_shapes(net) == {name: tuple(shape) for name, shape, _ in manifest["params"]}


def test_residual_and_dropout_layouts_match_reference_indices() -> None:
    residual = _build_meta({"num_layers": 4, "use_residual": True})
    assert set(_state_shapes(residual)) == {"mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias",
                                            "mlp.4.linear1.weight", "mlp.4.linear1.bias", "mlp.4.linear2.weight",
                                            "mlp.4.linear2.bias", "mlp.5.weight", "mlp.5.bias"}
    dropout = _build_meta({"dropout_rate": 0.1})
    assert set(_state_shapes(dropout)) == {"mlp.0.weight", "mlp.0.bias", "mlp.3.weight", "mlp.3.bias",
                                           "mlp.6.weight", "mlp.6.bias"}


def test_unknown_activation_is_an_error() -> None:
    with pytest.raises(ValueError, match="activation"):
        ShadingMLP(activation="tanh")


# ---------------------------------------------------------------- shading MLP: maths


def test_sine_initialisation_follows_reference() -> None:
    torch.manual_seed(0)
    net = ShadingMLP()
    w0, w1, w2 = net.mlp[0].weight, net.mlp[2].weight, net.mlp[4].weight
    assert w0.abs().max() <= 1 / 71 and w0.abs().max() > 0.9 / 71
    bound = math.sqrt(6 / 64) / 30
    assert w1.abs().max() <= bound and w2.abs().max() <= bound and w1.abs().max() > 0.9 * bound
    assert net.mlp[0].bias.abs().max() <= 1 / 71 and net.mlp[2].bias.abs().max() <= 1 / 64
    relu = ShadingMLP(activation="relu")
    assert torch.count_nonzero(relu.mlp[0].bias) == 0


def test_shading_mlp_forward_is_the_reference_formula() -> None:
    torch.manual_seed(1)
    net = ShadingMLP()
    f, n = torch.randn(50, 32), torch.randn(50, 3) * 3
    out = net(f, n)
    x = torch.cat([f, nerf_encoding(F.normalize(n, dim=-1), 6)], dim=-1)
    for index in (0, 2):
        x = torch.sin(30.0 * net.mlp[index](x))
    raw = net.mlp[4](x)
    assert torch.allclose(out[:, :3], F.elu(raw[:, :3], alpha=1e-3), atol=1e-6)
    assert torch.allclose(out[:, 3:], torch.sigmoid(raw[:, 3:]), atol=1e-6)
    assert torch.allclose(net(f, n * 7.0), out, atol=1e-5)  # normals are normalized first


@pytest.mark.parametrize("activation", ["sine", "relu"])
def test_shading_mlp_ranges_and_gradients(activation: str) -> None:
    torch.manual_seed(2)
    net = ShadingMLP(activation=activation)
    with torch.no_grad():  # push the outputs far into both tails
        net.mlp[4].weight.mul_(200.0)
        net.mlp[4].bias.copy_(torch.tensor([-50.0, 50.0, 0.0, -20.0, 20.0]))
    f = torch.randn(200, 32, requires_grad=True)
    n = torch.randn(200, 3, requires_grad=True)
    out = net(f, n)
    assert out.shape == (200, 5)
    assert (out[:, :3] >= -1e-3).all() and out[:, 0].min() < -9e-4 and out[:, 1].max() > 10
    assert ((out[:, 3:] >= 0) & (out[:, 3:] <= 1)).all()
    out[:, :3].sum().backward()
    assert f.grad.abs().sum() > 0 and n.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_shading_mlp_without_normals_and_missing_normals() -> None:
    net = ShadingMLP(use_normal=False, output_dim=4)
    assert net(torch.randn(3, 32)).shape == (3, 4)
    with pytest.raises(ValueError, match="normals"):
        ShadingMLP()(torch.randn(3, 32))


# ---------------------------------------------------------------- Hammersley buffer


def test_hammersley_points_closed_form() -> None:
    p = hammersley_points(32)
    assert p.shape == (32, 3)
    expected = torch.tensor([[0, 0, 0], [1 / 32, 1 / 2, 1 / 3], [2 / 32, 1 / 4, 2 / 3], [3 / 32, 3 / 4, 1 / 9],
                             [4 / 32, 1 / 8, 4 / 9], [5 / 32, 5 / 8, 7 / 9]], dtype=torch.float64)
    assert torch.allclose(p[:6], expected)
    assert radical_inverse(2, 6) == 3 / 8 and math.isclose(radical_inverse(3, 5), 7 / 9)
    assert ((p >= 0) & (p < 1)).all()
    assert torch.allclose(p[:, 0], torch.arange(32, dtype=torch.float64) / 32)
    # base-2 radical inverse of 0..31 is a permutation of k/32
    assert torch.equal(torch.sort(p[:, 1]).values, torch.arange(32, dtype=torch.float64) / 32)


def test_hammersley_offsets_buffer() -> None:
    buf = hammersley_offsets(32)
    assert buf.shape == (32, 3) and buf.dtype == torch.float32
    limit = math.atanh(1 / 1.5)
    assert (buf.abs() <= limit + 1e-6).all() and torch.isfinite(buf).all()
    assert torch.allclose(buf[0], torch.full((3,), -limit))
    assert torch.allclose(buf[1], torch.tensor([math.atanh((2 / 32 - 1) / 1.5), 0.0, math.atanh((2 / 3 - 1) / 1.5)]))
    assert torch.allclose(torch.tanh(buf) * 1.5, (hammersley_points(32) * 2 - 1).float(), atol=1e-6)
    manifest = _manifest("near_renderer.json")
    assert [list(buf.shape)] == [b[1] for b in manifest["buffers"] if b[0] == "offset_perturbation"]


# ---------------------------------------------------------------- head activations, closed form


def _zeros(v: int, config: RepresentationConfig = RepresentationConfig()):
    return (torch.zeros(v, config.gs_channels), torch.zeros(v, config.pbr_channels),
            torch.zeros(v, config.scale_channels), torch.zeros(v, config.rgb_channels))


def test_head_widths_match_renderer_manifest() -> None:
    manifest = _manifest("near_renderer.json")
    shapes = {name: shape for name, shape, _ in manifest["params"]}
    c = RepresentationConfig.from_official(manifest["args"]["representation_config"])
    assert c == RepresentationConfig()
    assert shapes["gs_out_layer.2.weight"][0] == c.gs_channels == 448
    assert shapes["pbr_out_layer.2.weight"][0] == c.pbr_channels == 96
    assert shapes["scale_out_layer.weight"][0] == c.scale_channels == 96
    assert shapes["rgb_out_layer.weight"][0] == c.rgb_channels == 1120


def test_zero_outputs_give_the_closed_form_gaussians() -> None:
    coords = torch.tensor([[0, 0, 0], [63, 10, 31]])
    heads = heads_to_gaussians(coords, *_zeros(2))
    g, lit = heads.intrinsic, heads.lit
    assert g.means.shape == (64, 3)
    centres = voxel_centres(coords)
    assert torch.allclose(centres, torch.tensor([[-0.5 + 0.5 / 64] * 3, [0.5 - 0.5 / 64, 10.5 / 64 - 0.5, -0.5 / 64]]))
    spread = (hammersley_points(32).float() * 2 - 1) / (2 * 64)  # tanh(atanh(u / 1.5)) / 64 * 0.5 * 1.5
    assert torch.allclose(g.means, (centres[:, None] + spread).reshape(-1, 3), atol=1e-6)
    assert ((g.means.reshape(2, 32, 3) - centres[:, None]).abs() <= 0.5 / 64 + 1e-7).all()
    assert torch.allclose(g.quats, torch.tensor([1.0, 0, 0, 0]).expand(64, 4))
    scale = math.sqrt(0.004 ** 2 + 9e-4 ** 2)  # softplus(softplus^-1(bias)) = bias, then the 3-D filter
    assert torch.allclose(g.scales, torch.full((64, 3), scale)) and torch.allclose(lit.scales, g.scales)
    assert torch.allclose(g.opacities, torch.full((64,), 0.1))
    assert torch.allclose(g.base_color, torch.full((64, 3), 0.5))
    for t in (g.roughness, g.metallic, g.pbr1, lit.shadow, lit.hdri1, lit.hdri2):
        assert t.shape == (64, 1) and torch.allclose(t, torch.full_like(t, 0.5))
    assert lit.features.shape == (64, 32) and torch.count_nonzero(lit.features) == 0


def test_block_layout_and_each_activation() -> None:
    """One recognisable value per attribute block, to pin the split order (attribute-major, Gaussian-minor)."""
    gs, pbr, sc, rgb = _zeros(1)
    k = 5  # the 6th Gaussian of the voxel
    gs[0, 0 * 96 + 3 * k + 1] = 2.0  # xyz offset, y component
    gs[0, 1 * 96 + 3 * k + 2] = 1.0  # base colour, blue (SH DC)
    gs[0, 2 * 96 + 3 * k + 0] = 3.0  # scale x
    gs[0, 3 * 96 + 4 * k + 3] = 10.0  # rotation z component (times lr 0.1 -> 1.0)
    gs[0, 3 * 96 + 4 * 32 + k] = -5.0  # opacity
    pbr[0, 0 * 32 + k], pbr[0, 1 * 32 + k], pbr[0, 2 * 32 + k] = 1.0, 2.0, 3.0
    sc[0, 3 * k + 2] = -2.0  # lit scale z
    rgb[0, 32 * k + 7] = 4.25  # colour feature 7
    rgb[0, 32 * 32 + k], rgb[0, 33 * 32 + k], rgb[0, 34 * 32 + k] = -1.0, -2.0, -3.0
    coords = torch.tensor([[7, 8, 9]])
    h = heads_to_gaussians(coords, gs, pbr, sc, rgb)
    g, lit = h.intrinsic, h.lit
    pert = hammersley_offsets()[k]
    centre = voxel_centres(coords)[0]
    expected = centre + torch.tanh(pert + torch.tensor([0.0, 2.0, 0.0])) / 64 * 0.5 * 1.5
    assert torch.allclose(g.means[k], expected, atol=1e-7)
    assert torch.allclose(g.base_color[k], torch.tensor([0.5, 0.5, 0.5 + SH_C0]))
    bias = 0.004 + math.log(-math.expm1(-0.004))
    s = lambda raw: math.sqrt(F.softplus(torch.tensor(raw + bias)).item() ** 2 + 9e-4 ** 2)  # noqa: E731
    assert torch.allclose(g.scales[k], torch.tensor([s(3.0), s(0.0), s(0.0)]))
    assert torch.allclose(g.quats[k], torch.tensor([1.0, 0, 0, 1.0]) / math.sqrt(2))
    assert math.isclose(g.opacities[k].item(), math.tanh(-5 + math.atanh(0.1)), rel_tol=1e-6)
    assert g.opacities[k] < 0  # tanh allows negative density; to_gaussians clamps it for the rasterizer
    assert torch.sigmoid(torch.tensor([1.0, 2.0, 3.0])).allclose(
        torch.cat([g.roughness[k], g.metallic[k], g.pbr1[k]]))
    assert torch.allclose(lit.scales[k], torch.tensor([s(0.0), s(0.0), s(-2.0)]))
    assert lit.features[k, 7] == 4.25 and torch.count_nonzero(lit.features) == 1
    aux = torch.cat([lit.shadow[k], lit.hdri1[k], lit.hdri2[k]])
    assert torch.sigmoid(torch.tensor([-1.0, -2.0, -3.0])).allclose(aux)
    others = torch.arange(32) != k
    assert torch.allclose(g.opacities[others], torch.full((31,), 0.1))
    gaussians = g.to_gaussians()
    assert isinstance(gaussians, Gaussians) and gaussians.opacities[k] == 0 and len(gaussians) == 32
    assert set(gaussians.channels) == {"base_color", "metallic", "roughness", "pbr1"}
    lit_pass = g.to_gaussians({"shadow": lit.shadow}, scales=lit.scales)
    assert torch.equal(lit_pass.scales, lit.scales) and torch.equal(lit_pass.means, g.means)


def test_lr_and_config_are_applied() -> None:
    lr = dict(RepresentationConfig().lr, _xyz=0.5, _opacity=2.0)
    config = RepresentationConfig(lr=lr, perturb_offset=False, voxel_size=1.0, opacity_bias=0.2,
                                  scaling_activation="exp", min_kernel_size=0.0)
    gs, pbr, _, _ = _zeros(1, config)
    gs[0, 0] = 2.0
    gs[0, 13 * 32] = 1.0
    g = intrinsic_gaussians(torch.zeros(1, 3, dtype=torch.long), gs, pbr, config)
    assert math.isclose(g.means[0, 0].item(), -0.5 + 0.5 / 64 + math.tanh(1.0) / 64 * 0.5, rel_tol=1e-6)
    assert torch.allclose(g.means[1:], voxel_centres(torch.zeros(1, 3)).expand(31, 3))  # no perturbation
    assert math.isclose(g.opacities[0].item(), math.tanh(2.0 + math.atanh(0.2)), rel_tol=1e-6)
    assert torch.allclose(g.scales, torch.full((32, 3), 0.004))
    with pytest.raises(ValueError, match="lr"):
        RepresentationConfig(lr={"_xyz": 1.0})


def test_wrong_widths_are_errors() -> None:
    gs, pbr, sc, rgb = _zeros(2)
    with pytest.raises(ValueError, match="gs_out"):
        intrinsic_gaussians(torch.zeros(2, 3), gs[:, :-1], pbr)
    with pytest.raises(ValueError, match="coords"):
        intrinsic_gaussians(torch.zeros(3, 3), gs, pbr)
    with pytest.raises(ValueError, match="rgb_out"):
        lit_parameters(sc, rgb[:, :1000])


def test_gradients_flow_through_every_head() -> None:
    torch.manual_seed(3)
    raws = [t.normal_().requires_grad_() for t in _zeros(4)]
    h = heads_to_gaussians(torch.randint(0, 64, (4, 3)), *raws)
    g, lit = h.intrinsic, h.lit
    total = sum(t.sum() for t in (g.means, g.quats * torch.arange(4.0), g.scales, g.opacities, g.base_color,
                                  g.roughness, g.metallic, g.pbr1, lit.scales, lit.features, lit.shadow, lit.hdri1,
                                  lit.hdri2))
    total.backward()
    for raw in raws:
        assert torch.isfinite(raw.grad).all() and (raw.grad != 0).float().mean() > 0.9


# ---------------------------------------------------------------- normals


def test_shading_normals_are_the_shortest_axis_facing_the_camera() -> None:
    torch.manual_seed(4)
    n = 500
    quats = torch.randn(n, 4)
    scales = torch.rand(n, 3) + 0.01
    means = torch.rand(n, 3) - 0.5
    camera = torch.tensor([1.5, -2.0, 0.7])
    normals = shading_normals(quats, scales, camera, means)
    rot = quat_to_rotmat(quats)
    order = scales.argsort(dim=-1)
    axes = rot.transpose(1, 2)  # row k = axis k
    larger = axes.gather(1, order[:, 1:, None].expand(-1, 2, 3))
    assert torch.allclose(normals.norm(dim=-1), torch.ones(n), atol=1e-5)
    assert ((larger * normals[:, None]).sum(-1).abs() < 1e-5).all()
    assert ((normals * (camera - means)).sum(-1) >= 0).all()
    # flipping a quaternion's sign changes nothing; the reference offset moves the flip test point by +0.5
    assert torch.allclose(shading_normals(-quats, scales, camera, means), normals, atol=1e-6)
    official = shading_normals(quats, scales, camera, means, flip_reference_offset=0.5)
    assert ((official * (camera - means - 0.5)).sum(-1) >= 0).all()


def test_identity_normal_is_the_z_axis_flipped() -> None:
    quats = torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0]])
    scales = torch.tensor([[0.1, 0.2, 0.01], [0.01, 0.2, 0.1]])
    means = torch.zeros(2, 3)
    normals = shading_normals(quats, scales, torch.tensor([0.0, 0.0, -3.0]), means)
    assert torch.equal(normals, torch.tensor([[0.0, 0, -1], [1.0, 0, 0]]))
    normals = shading_normals(quats, scales, torch.tensor([-2.0, 0.0, 0.0]), means)
    assert torch.equal(normals, torch.tensor([[0.0, 0, 1], [-1.0, 0, 0]]))


def test_heads_to_shading_end_to_end() -> None:
    torch.manual_seed(5)
    raws = [t.normal_() for t in _zeros(3)]
    h = heads_to_gaussians(torch.randint(0, 64, (3, 3)), *raws)
    normals = shading_normals(h.intrinsic.quats, h.lit.scales, torch.tensor([0.0, -2.0, 0.5]), h.intrinsic.means)
    out = ShadingMLP()(h.lit.features, normals)
    assert out.shape == (96, 5) and torch.isfinite(out).all()
