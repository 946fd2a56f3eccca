"""The split-sum shading core (`near_engine.ibl`) against closed forms and a brute-force integral over the map."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from near_engine.envmap import EnvMap, equirect_solid_angles, uv_to_direction
from near_engine.ibl import IBLLight, brdf_lut, prefilter, reflect, shade


def _sphere_points(n: int = 200, seed: int = 0) -> torch.Tensor:
    d = np.random.default_rng(seed).normal(size=(n, 3))
    return torch.from_numpy(d / np.linalg.norm(d, axis=1, keepdims=True)).float()


def _materials(n: int, base: float, roughness: float, metallic: float, level: float):
    full = lambda v, k: torch.full((n, k), float(v))  # noqa: E731
    return full(base, 3), full(roughness, 1), full(metallic, 1), full(level, 1)


def _sky(height: int = 64) -> EnvMap:
    """A smooth, colourful, non-symmetric map: a bright warm lobe, a blue sky gradient and a dim floor."""
    width = 2 * height
    uv = np.stack(np.meshgrid((np.arange(width) + 0.5) / width, 1 - (np.arange(height) + 0.5) / height), -1)
    d = uv_to_direction(uv)
    sun = np.array([0.5, 0.3, 0.81])
    sun /= np.linalg.norm(sun)
    lobe = np.exp(8 * (d @ sun - 1))[..., None] * np.array([6.0, 4.0, 2.0])
    sky = np.clip(d[..., 2:3], 0, None) * np.array([0.2, 0.4, 0.9]) + 0.05
    return EnvMap.from_array((lobe + sky).astype(np.float32), name="sky")


def test_white_furnace_diffuse_and_white_metal_return_the_world_level():
    env = EnvMap.uniform(0.6, height=16)
    light = IBLLight.for_frame(prefilter(env))
    n = _sphere_points()
    v = _sphere_points(seed=1)
    v = torch.where((v * n).sum(-1, keepdim=True) < 0, -v, v)  # views in the normals' hemisphere
    diffuse = shade(*_materials(len(n), 1.0, 0.7, 0.0, 0.0), n, v, light)  # Specular IOR Level 0: no specular layer
    assert torch.allclose(diffuse.specular, torch.zeros_like(diffuse.specular), atol=1e-6)
    assert torch.allclose(diffuse.diffuse, torch.full_like(diffuse.diffuse, 0.6), rtol=0.01)
    for roughness in (0.1, 0.5, 1.0):  # a white metal conserves energy with multiple scattering
        metal = shade(*_materials(len(n), 1.0, roughness, 1.0, 0.5), n, v, light)
        assert torch.allclose(metal.diffuse, torch.zeros_like(metal.diffuse))
        assert torch.allclose(metal.specular, torch.full_like(metal.specular, 0.6), rtol=0.02)
    grey = shade(*_materials(len(n), 0.5, 0.5, 0.0, 0.5), n, v, light).radiance  # a dielectric never gains energy
    assert float(grey.max()) <= 0.6 and float(grey.min()) > 0.5 * 0.6 * 0.8


def test_mirror_sphere_reflects_the_map_in_the_mirror_direction():
    env = _sky(128)
    light = IBLLight.for_frame(prefilter(env), rotation_z=0.7, strength=1.5)
    n = _sphere_points(300)
    v = torch.tensor([[0.0, -1.0, 0.2]]).expand_as(n)
    v = torch.nn.functional.normalize(v, dim=-1)
    keep = (n * v).sum(-1) > 0.2
    n, v = n[keep], v[keep]
    out = shade(*_materials(len(n), 1.0, 0.0, 1.0, 0.5), n, v, light).radiance
    expected = env.with_settings(rotation_z=0.7, strength=1.5).sample(reflect(v, n).double().numpy())
    assert np.allclose(out.numpy(), expected, rtol=0.05, atol=0.02)


def test_rotating_world_and_object_together_leaves_the_shading_unchanged():
    env = _sky()
    pre = prefilter(env)
    n = _sphere_points(100)
    v = torch.nn.functional.normalize(n + 0.3 * _sphere_points(100, 2), dim=-1)
    materials = _materials(len(n), 0.6, 0.35, 0.3, 0.5)
    still = shade(*materials, n, v, IBLLight.for_frame(pre)).radiance
    angle = 1.1
    c, s = math.cos(angle), math.sin(angle)
    object_rotation = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    # the object turned by +angle in a world whose map turned with it (Mapping rotation -angle)
    turned = shade(*materials, n, v, IBLLight.for_frame(pre, rotation_z=-angle, frame_to_world=object_rotation))
    assert torch.allclose(turned.radiance, still, rtol=1e-3, atol=1e-4)
    other = shade(*materials, n, v, IBLLight.for_frame(pre, rotation_z=0.0, frame_to_world=object_rotation))
    assert not torch.allclose(other.radiance, still, rtol=0.05)


def _brute_force(env: EnvMap, n: np.ndarray, v: np.ndarray, base: np.ndarray, roughness: float,
                 metallic: float, with_specular: bool = True) -> np.ndarray:
    """Outgoing radiance: the sum over every texel of L f cos dOmega, f = Lambert + single-scattering GGX (Schlick)."""
    h_rows = env.height
    uv = np.stack(np.meshgrid((np.arange(2 * h_rows) + 0.5) / (2 * h_rows), 1 - (np.arange(h_rows) + 0.5) / h_rows),
                  -1)
    l = uv_to_direction(uv.reshape(-1, 2))
    radiance = env.pixels.reshape(-1, 3).astype(np.float64)
    solid = equirect_solid_angles(h_rows, 2 * h_rows).repeat(2 * h_rows)
    alpha = roughness ** 2
    nl = l @ n
    half = l + v
    half /= np.linalg.norm(half, axis=1, keepdims=True)
    nh, vh, nv = half @ n, half @ v, float(n @ v)
    d = alpha ** 2 / (math.pi * (nh ** 2 * (alpha ** 2 - 1) + 1) ** 2)
    lam = lambda c: 0.5 * (np.sqrt(1 + alpha ** 2 * (1 - c ** 2) / np.maximum(c, 1e-6) ** 2) - 1)  # noqa: E731
    g = 1 / (1 + lam(nv) + lam(np.clip(nl, 1e-6, 1)))
    f0 = 0.04 * (1 - metallic) + base * metallic
    fresnel = f0 + (1 - f0) * (1 - np.clip(vh, 0, 1))[:, None] ** 5
    spec = (d * g / (4 * np.maximum(nl, 1e-6) * nv))[:, None] * fresnel * float(with_specular)
    diffuse = base * (1 - metallic) / math.pi
    w = np.where(nl > 0, nl * solid, 0.0)[:, None]
    return ((spec + diffuse) * radiance * w).sum(0)


@pytest.mark.parametrize("roughness,metallic,level", [(0.2, 1.0, 0.5), (0.4, 1.0, 0.5), (0.6, 1.0, 0.5),
                                                       (0.9, 1.0, 0.5), (0.5, 0.0, 0.0)])
def test_split_sum_matches_a_brute_force_integral_over_the_map(roughness, metallic, level):
    """Single scattering on both sides (the reference has no multiple scattering); metals, and a diffuse surface
    with the specular layer off (Specular IOR Level 0)."""
    env = _sky(64)
    light = IBLLight.for_frame(prefilter(env))
    base = np.array([0.8, 0.5, 0.3])
    rng = np.random.default_rng(3)
    errors = []
    for _ in range(12):
        n = rng.normal(size=3)
        n /= np.linalg.norm(n)
        v = n + 0.6 * rng.normal(size=3)
        v /= np.linalg.norm(v)
        if n @ v < 0.3:
            continue
        reference = _brute_force(env, n, v, base, roughness, metallic, with_specular=level > 0)
        t = lambda a: torch.tensor(a, dtype=torch.float32)[None]  # noqa: E731
        ours = shade(t(base), t([roughness]), t([metallic]), t([level]), t(n), t(v), light,
                     multiscatter=False).radiance[0].numpy()
        errors.append(np.abs(ours - reference).sum() / reference.sum())
    # split-sum's own approximation (n = v = R in the prefilter) stays within 15% at medium roughness, where it is
    # known to be worst; without the dominant-direction lean it was 23% at roughness 0.6
    limit = 0.15 if 0.5 <= roughness < 0.8 else 0.10
    assert len(errors) >= 4 and float(np.median(errors)) < limit, errors


def test_brdf_table_is_a_valid_albedo():
    table = brdf_lut()
    e_ss = table.sum(-1)
    assert table.shape == (32, 32, 2) and bool((table >= 0).all())
    assert float(e_ss.max()) <= 1.01  # importance sampling noise at grazing views
    assert float(e_ss[-1, 0]) > 0.95  # smooth surface seen head-on: everything reflected (F0 = 1)
    assert float(e_ss[16, -1]) < 0.9  # rough surfaces lose energy to multiple scattering without compensation


def test_an_untrained_pbr_shading_mlp_is_the_identity_on_the_pbr_terms():
    from near_engine.ibl import ShadingTerms
    from near_engine.models.shading import ShadingMLP

    torch.manual_seed(0)
    mlp = ShadingMLP(input_dim=32, output_dim=5, hidden_dim=32, activation="silu", core="pbr")
    terms = ShadingTerms(torch.rand(40, 3), torch.rand(40, 3))
    out = mlp(torch.randn(40, 32), torch.randn(40, 3), terms)
    assert torch.allclose(out[:, :3], terms.radiance, atol=1e-6)
    assert torch.allclose(out[:, 3:], torch.full((40, 2), 0.5))  # the visibility factors start at 1 (stored / 2)
    with pytest.raises(ValueError, match="PBR"):
        mlp(torch.randn(40, 32), torch.randn(40, 3))
    with pytest.raises(ValueError, match="core"):
        ShadingMLP(core="magic")


def test_gradients_stay_finite_at_the_poles_and_at_full_roughness():
    """Normals and views straight up or down (where atan2 and acos have no slope) and roughness 1 (where the
    dominant-direction lean has an infinite one) must not give NaN gradients: one NaN poisons a whole training run."""
    light = IBLLight.for_frame(prefilter(_sky(16)))
    normals = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, -1.0], [0.0, 0.0, 1.0]], requires_grad=True)
    views = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, -1.0], [0.6, 0.0, 0.8]], requires_grad=True)
    roughness = torch.tensor([[1.0], [0.0], [0.5]], requires_grad=True)
    base, _, metallic, level = _materials(3, 0.5, 0.5, 0.5, 0.5)
    shade(base, roughness, metallic, level, normals, views, light).radiance.sum().backward()
    for tensor in (normals, views, roughness):
        assert torch.isfinite(tensor.grad).all(), tensor.grad
