"""The official stage 1 (photo -> structured latent): networks at the official names and shapes, their maths on small
inputs, the rectified-flow sampler on flows with known solutions, and loading a user's weights folder.

Weights here are random (untrained): they check shapes, wiring and plumbing, never quality.
"""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import torch.nn.functional as F
from manifests import load_manifest
from safetensors.torch import save_file

from near_engine.configs import build_network, count_parameters
from near_engine.errors import CheckpointError, NearError
from near_engine.lift import LiftCancelled
from near_engine.lift.image import PreparedPhoto
from near_engine.lift.official import (
    encode_photo,
    load_dinov2,
    load_official_stage1,
    photo_to_dinov2_input,
    sample_latent,
    sample_structure,
)
from near_engine.lift.sampler import (
    LatentNormalization,
    SamplerSettings,
    flow_timesteps,
    guided_velocity,
    sample_flow,
)
from near_engine.models.blocks import AbsolutePositionEmbedder
from near_engine.models.dinov2 import DinoV2
from near_engine.models.flow_blocks import ModulatedCrossBlock, TimestepEmbedder
from near_engine.models.slat_flow import SLatFlowModel
from near_engine.models.sparse_conv import SubmanifoldConv3d, downsample, upsample
from near_engine.models.ss_decoder import SparseStructureDecoder, pixel_shuffle_3d
from near_engine.models.ss_flow import SparseStructureFlowModel, grid_coords
from near_engine.sparse import SparseTensor

STAGE1_MANIFESTS = {
    "slat_flow_img_dit_L_64l8p2_fp16": "slat_flow_model",
    "near_slat_flow_model": "slat_flow_model",
    "ss_flow_img_dit_L_16l8_fp16": "sparse_structure_flow_model",
    "ss_dec_conv3d_16l8_fp16": "sparse_structure_decoder",
}
SMALL_DINO = {"img_size": 56, "patch_size": 14, "embed_dim": 32, "depth": 1, "num_heads": 2, "mlp_ratio": 2.0,
              "num_register_tokens": 4}
SMALL_LATENT_FLOW = {"resolution": 64, "in_channels": 8, "out_channels": 8, "model_channels": 32,
                     "cond_channels": 32, "num_blocks": 1, "num_heads": 2, "mlp_ratio": 2, "patch_size": 2,
                     "num_io_res_blocks": 2, "io_block_channels": [16], "pe_mode": "ape", "qk_rms_norm": True,
                     "use_fp16": True}
SMALL_STRUCTURE_FLOW = {"resolution": 8, "in_channels": 8, "out_channels": 8, "model_channels": 32,
                        "cond_channels": 32, "num_blocks": 1, "num_heads": 2, "mlp_ratio": 2, "patch_size": 1,
                        "pe_mode": "ape", "qk_rms_norm": True, "use_fp16": True}
# An 8^3 structure latent (512 tokens, not the official 4096) decoded by three 2x stages: still the 64^3 grid.
SMALL_DECODER = {"out_channels": 1, "latent_channels": 8, "num_res_blocks": 1, "channels": [16, 8, 8, 8],
                 "num_res_blocks_middle": 1, "use_fp16": True}
SAMPLER = {"name": "FlowEulerGuidanceIntervalSampler", "args": {"sigma_min": 1e-5},
           "params": {"steps": 2, "cfg_strength": 3.0, "cfg_interval": [0.5, 1.0], "rescale_t": 3.0}}
NORMALIZATION = {"mean": [0.5, -1.0, 0.0, 0.25, 1.0, -0.5, 2.0, 0.0], "std": [2.0, 1.0, 0.5, 1.5, 1.0, 3.0, 1.0, 0.1]}


def _randomize(module: torch.nn.Module, seed: int, scale: float = 0.2) -> torch.nn.Module:
    """Seeded random values in every parameter (norm gains around 1), so no layer is a no-op."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            noise = scale * torch.randn(p.shape, generator=g)
            p.copy_(1 + noise if name.endswith(("norm1.weight", "norm2.weight", "gamma")) else noise)
    return module.eval()


def _voxels(n: int, res: int, seed: int, batch: int = 1, channels: int = 8, clustered: bool = True) -> SparseTensor:
    """`n` distinct voxels per batch element (in a 12^3 block when `clustered`, so convolutions see neighbours)."""
    g = torch.Generator().manual_seed(seed)
    span = 12 if clustered else res
    items = []
    for _ in range(batch):
        cells = torch.randperm(span**3, generator=g)[:n]
        xyz = torch.stack([cells // span**2, cells // span % span, cells % span], 1) + (res - span) // 2
        items.append((xyz, torch.randn(n, channels, generator=g)))
    return SparseTensor.from_list(items, resolution=res)


# -- (a) every network at the official names and shapes -------------------------------------------------------------


@pytest.mark.parametrize("manifest_name", sorted(STAGE1_MANIFESTS))
def test_stage1_networks_on_meta_match_the_manifests_exactly(manifest_name):
    manifest = load_manifest(manifest_name)
    module = build_network(STAGE1_MANIFESTS[manifest_name], manifest["class"], manifest["args"], "meta")
    expected = {p[0]: p[1] for p in manifest["params"]}
    expected.update({b[0]: b[1] for b in manifest["buffers"] if b[-1].get("persistent", True)})
    got = {name: list(t.shape) for name, t in module.state_dict().items()}
    assert got == expected
    assert count_parameters(module) == manifest["total_params"]
    assert len(got) == manifest["num_state_dict_tensors"]


def test_dinov2_on_meta_has_the_hub_models_names_and_shapes():
    with torch.device("meta"):
        model = DinoV2()
    c = 1024
    expected = {"cls_token": [1, 1, c], "pos_embed": [1, 1 + 37 * 37, c], "register_tokens": [1, 4, c],
                "mask_token": [1, c], "patch_embed.proj.weight": [c, 3, 14, 14], "patch_embed.proj.bias": [c],
                "norm.weight": [c], "norm.bias": [c]}
    for i in range(24):
        expected.update({f"blocks.{i}.{k}": v for k, v in {
            "norm1.weight": [c], "norm1.bias": [c], "attn.qkv.weight": [3 * c, c], "attn.qkv.bias": [3 * c],
            "attn.proj.weight": [c, c], "attn.proj.bias": [c], "ls1.gamma": [c], "norm2.weight": [c],
            "norm2.bias": [c], "mlp.fc1.weight": [4 * c, c], "mlp.fc1.bias": [4 * c], "mlp.fc2.weight": [c, 4 * c],
            "mlp.fc2.bias": [c], "ls2.gamma": [c]}.items()})
    assert {n: list(t.shape) for n, t in model.state_dict().items()} == expected
    assert count_parameters(model) == sum(math.prod(s) for s in expected.values())


# -- (b) the networks' maths ----------------------------------------------------------------------------------------


def test_submanifold_conv_is_spconvs_cross_correlation_at_the_active_voxels():
    torch.manual_seed(0)
    x = _voxels(40, 8, seed=1, batch=2, channels=3, clustered=False)
    conv = _randomize(SubmanifoldConv3d(3, 5, 3), seed=2)
    with torch.no_grad():
        out = conv(x)
        dense = torch.zeros(2, 3, 8, 8, 8)
        c = x.coords.long()
        dense[c[:, 0], :, c[:, 1], c[:, 2], c[:, 3]] = x.feats
        ref = F.conv3d(dense, conv.conv.weight.permute(0, 4, 1, 2, 3), conv.conv.bias, padding=1)
    assert out.coords is x.coords
    torch.testing.assert_close(out.feats, ref[c[:, 0], :, c[:, 1], c[:, 2], c[:, 3]], atol=1e-5, rtol=1e-5)
    spconv = pytest.importorskip("spconv.pytorch")
    layer = spconv.SubMConv3d(3, 5, 3, bias=True)
    assert tuple(layer.weight.shape) == tuple(conv.conv.weight.shape)  # the official layout [out, k, k, k, in]
    with torch.no_grad():
        layer.weight.copy_(conv.conv.weight)
        layer.bias.copy_(conv.conv.bias)
        torch.testing.assert_close(x.from_spconv(layer(x.to_spconv())).feats, out.feats, atol=1e-5, rtol=1e-5)


def test_downsample_pools_as_trellis_and_upsample_copies_back():
    coords = torch.tensor([[0, 0, 0], [1, 1, 1], [5, 2, 3], [4, 3, 2], [6, 6, 6]])
    feats = torch.tensor([[3.0], [6.0], [2.0], [4.0], [5.0]])
    fine = SparseTensor.from_list([(coords, feats)], resolution=8)
    coarse, index = downsample(fine)
    assert coarse.resolution == 4
    assert coarse.coords[:, 1:].tolist() == [[0, 0, 0], [2, 1, 1], [3, 3, 3]]  # sorted parents
    # TRELLIS's scatter_reduce(mean) counts the zero it starts from: sum / (children + 1)
    assert coarse.feats[:, 0].tolist() == pytest.approx([9 / 3, 6 / 3, 5 / 2])
    back = upsample(coarse.replace(torch.tensor([[1.0], [2.0], [3.0]])), fine, index)
    assert back.coords is fine.coords and back.feats[:, 0].tolist() == [1.0, 1.0, 2.0, 2.0, 3.0]


def test_timestep_embedder_sinusoid_is_cos_then_sin_of_geometric_frequencies():
    t = torch.tensor([0.0, 250.0, 1000.0])
    emb = TimestepEmbedder.sinusoid(t, 256)
    freqs = np.exp(-np.log(10000.0) * np.arange(128) / 128)
    want = np.concatenate([np.cos(t.numpy()[:, None] * freqs), np.sin(t.numpy()[:, None] * freqs)], axis=1)
    np.testing.assert_allclose(emb.numpy(), want, atol=2e-4)
    embedder = _randomize(TimestepEmbedder(1024), seed=3)
    out = embedder(t)
    assert out.shape == (3, 1024)
    torch.testing.assert_close(out, embedder.mlp[2](F.silu(embedder.mlp[0](emb))))
    assert not torch.allclose(out[0], out[1])


def _reference_block(block: ModulatedCrossBlock, x: torch.Tensor, t_emb: torch.Tensor, ctx: torch.Tensor,
                     heads: int) -> torch.Tensor:
    """TRELLIS's ModulatedTransformerCrossBlock written out for one batch element: x [L, C], t_emb [C], ctx [M, Cc]."""
    def attend(q, k, v):  # [L, H, D] each
        w = torch.softmax(torch.einsum("lhd,mhd->hlm", q, k) / math.sqrt(q.shape[-1]), dim=-1)
        return torch.einsum("hlm,mhd->lhd", w, v).reshape(q.shape[0], -1)

    def rms(z, gamma):
        return F.normalize(z, dim=-1) * gamma * math.sqrt(z.shape[-1])

    shift1, scale1, gate1, shift2, scale2, gate2 = block.adaLN_modulation(t_emb[None])[0].chunk(6)
    h = F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale1) + shift1
    q, k, v = block.self_attn.to_qkv(h).reshape(len(x), 3, heads, -1).unbind(1)
    q, k = rms(q, block.self_attn.q_rms_norm.gamma), rms(k, block.self_attn.k_rms_norm.gamma)
    x = x + gate1 * block.self_attn.to_out(attend(q, k, v))
    h = block.norm2(x)
    q = block.cross_attn.to_q(h).reshape(len(x), heads, -1)
    k, v = block.cross_attn.to_kv(ctx).reshape(len(ctx), 2, heads, -1).unbind(1)
    x = x + block.cross_attn.to_out(attend(q, k, v))
    h = F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale2) + shift2
    return x + gate2 * block.mlp.mlp[2](F.gelu(block.mlp.mlp[0](h), approximate="tanh"))


def test_one_latent_flow_block_at_full_width_matches_the_trellis_block_written_out():
    torch.manual_seed(0)
    block = _randomize(ModulatedCrossBlock(1024, 1024, 16, qk_rms_norm=True), seed=4, scale=0.03)
    x = _voxels(24, 32, seed=5, batch=2, channels=1024)
    t_emb, ctx = torch.randn(2, 1024), torch.randn(2, 20, 1024)
    with torch.no_grad():
        out = block(x.feats, x, t_emb, ctx)
        for b, rows in enumerate(x.layout):  # each element sees only its own modulation, voxels and context
            want = _reference_block(block, x.feats[rows], t_emb[b], ctx[b], 16)
            torch.testing.assert_close(out[rows], want, atol=2e-4, rtol=2e-4)
        kv = block.cross_attn.project_context(ctx)
        torch.testing.assert_close(block(x.feats, x, t_emb, kv=kv), out)


def test_dinov2_tokens_are_cls_registers_patches_and_a_block_is_pre_norm_with_layer_scale():
    model = _randomize(DinoV2(**{**SMALL_DINO, "depth": 0}), seed=6)
    image = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        tokens = model(image)
        patches = model.patch_embed.proj(image).flatten(2).transpose(1, 2)
    assert tokens.shape == (1, 1 + 4 + 16, 32)
    torch.testing.assert_close(tokens[:, 0], model.cls_token[:, 0] + model.pos_embed[:, 0])
    torch.testing.assert_close(tokens[:, 1:5], model.register_tokens)  # registers get no position
    torch.testing.assert_close(tokens[:, 5:], patches + model.pos_embed[:, 1:])
    # A full-width block: x + ls1 attn(norm1 x) + ls2 mlp(norm2 .); with zero layer scales it is the identity.
    block = _randomize(DinoV2(embed_dim=1024, depth=1, num_heads=16, img_size=14).blocks[0], seed=7, scale=0.02)
    x = torch.randn(1, 30, 1024)
    with torch.no_grad():
        h = x + block.ls1.gamma * block.attn(block.norm1(x))
        torch.testing.assert_close(block(x), h + block.ls2.gamma * block.mlp.fc2(F.gelu(block.mlp.fc1(block.norm2(h)))))
        block.ls1.gamma.zero_()
        block.ls2.gamma.zero_()
        torch.testing.assert_close(block(x), x)


def test_dinov2_position_embedding_is_resized_for_other_image_sizes_and_encode_is_layer_normed():
    model = _randomize(DinoV2(**SMALL_DINO), seed=8)
    assert model.position_embedding(4, 4) is model.pos_embed  # the stored 4x4 grid at 56^2
    with torch.no_grad():
        model.pos_embed[:, 1:] = 0.7  # a constant grid stays constant when resized
        resized = model.position_embedding(6, 3)
    assert resized.shape == (1, 1 + 18, 32)
    torch.testing.assert_close(resized[:, 1:], torch.full((1, 18, 32), 0.7))
    torch.testing.assert_close(resized[:, 0], model.pos_embed[:, 0])
    with torch.no_grad():
        cond = model.encode(torch.rand(2, 3, 84, 42))
    assert cond.shape == (2, 1 + 4 + 6 * 3, 32)
    torch.testing.assert_close(cond.mean(-1), torch.zeros(2, 23), atol=1e-5, rtol=0)
    torch.testing.assert_close(cond.var(-1, unbiased=False), torch.ones(2, 23), atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(torch.zeros(1, 3, 50, 56))


def test_pixel_shuffle_and_structure_decoder_turn_16_cubed_into_64_cubed_logits():
    x = torch.arange(2 * 8 * 2 * 3 * 1, dtype=torch.float32).reshape(1, 16, 2, 3, 1)
    out = pixel_shuffle_3d(x, 2)
    assert out.shape == (1, 2, 4, 6, 2)
    for c, i, j, k, d, h, w in [(0, 0, 0, 0, 0, 0, 0), (1, 1, 0, 1, 1, 2, 0), (0, 0, 1, 1, 0, 1, 0)]:
        assert out[0, c, 2 * d + i, 2 * h + j, 2 * w + k] == x[0, c * 8 + i * 4 + j * 2 + k, d, h, w]
    decoder = _randomize(SparseStructureDecoder(**{**SMALL_DECODER, "channels": [16, 8, 8]}), seed=9)
    with torch.no_grad():
        logits = decoder(torch.randn(1, 8, 16, 16, 16))
    assert logits.shape == (1, 1, 64, 64, 64) and torch.isfinite(logits).all()
    assert 0 < int((logits > 0).sum()) < 64**3  # random weights: some occupied, some empty


def test_latent_flow_with_reduced_depth_keeps_the_voxels_and_batch_elements_apart():
    flow = _randomize(SLatFlowModel(**{**SMALL_LATENT_FLOW, "num_blocks": 2}), seed=10)
    x = _voxels(150, 64, seed=11, batch=2)
    t, cond = torch.tensor([700.0, 200.0]), torch.randn(2, 9, 32)
    with torch.no_grad():
        v = flow(x, t, cond)
        alone = flow(SparseTensor.from_list([(x.coords[x.layout[1], 1:], x.feats[x.layout[1]])], 64), t[1:],
                     cond[1:])
        assert v.feats.shape == (300, 8) and v.coords is x.coords
        torch.testing.assert_close(v.feats[x.layout[1]], alone.feats, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(flow(x, t, cond_kv=flow.project_condition(cond)).feats, v.feats)
        assert not torch.allclose(flow(x, t, torch.zeros_like(cond)).feats, v.feats)
    with pytest.raises(ValueError, match="64"):
        flow(_voxels(5, 32, seed=1), t[:1], cond[:1])


def test_structure_flow_pos_emb_is_the_ape_of_the_grid_and_batch_elements_stay_apart():
    flow = _randomize(SparseStructureFlowModel(**{**SMALL_STRUCTURE_FLOW, "resolution": 16}), seed=12)
    coords = grid_coords(16)
    assert coords[1].tolist() == [0, 0, 1] and coords[16].tolist() == [0, 1, 0]  # z fastest
    torch.testing.assert_close(flow.pos_emb, AbsolutePositionEmbedder(32)(coords))
    x, t, cond = torch.randn(2, 8, 16, 16, 16), torch.tensor([900.0, 100.0]), torch.randn(2, 7, 32)
    with torch.no_grad():
        v = flow(x, t, cond)
        assert v.shape == (2, 8, 16, 16, 16)
        torch.testing.assert_close(flow(x[1:], t[1:], cond[1:]), v[1:], atol=1e-5, rtol=1e-5)


# -- (c) the sampler ------------------------------------------------------------------------------------------------


def test_rescale_t_warps_the_linspace_grid_by_the_formula():
    for steps, r in [(4, 3.0), (25, 3.0), (5, 1.0), (3, 0.5)]:
        times = flow_timesteps(steps, r)
        base = np.linspace(1, 0, steps + 1)
        assert times == pytest.approx((r * base / (1 + (r - 1) * base)).tolist(), abs=1e-15)
        assert times[0] == 1.0 and times[-1] == 0.0 and all(a > b for a, b in zip(times, times[1:]))
    assert flow_timesteps(2, 3.0)[1] == pytest.approx(0.75)  # 3 * 0.5 / (1 + 2 * 0.5)


def test_euler_recovers_x0_exactly_on_a_linear_flow():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(50, 8, generator=g), torch.randn(50, 8, generator=g)
    # x_t = t noise + (1 - t) x0 has the constant velocity dx/dt = noise - x0
    for steps, r in [(1, 1.0), (7, 3.0)]:
        out = sample_flow(lambda x, t, c: noise - x0, noise, None, None, SamplerSettings(steps, rescale_t=r))
        torch.testing.assert_close(out, x0, atol=1e-6, rtol=0)


def test_euler_error_on_a_curved_flow_shrinks_with_the_steps():
    # dx/dt = x from t = 1 to 0: x(0) = x(1) / e exactly; explicit Euler is first order.
    noise = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    errors = [float((sample_flow(lambda x, t, c: x, noise, None, None, SamplerSettings(s)) - noise / math.e)
                    .abs().max()) for s in (4, 16, 64)]
    assert errors[0] > 3 * errors[1] > 9 * errors[2] > 0


def test_guidance_strength_zero_is_the_conditional_flow_and_never_evaluates_the_negative():
    calls = []

    def velocity(x, t, cond):
        calls.append(cond)
        return x * (1.0 if cond == "c" else 5.0) + t

    noise = torch.linspace(-1, 1, 6)
    guided = sample_flow(velocity, noise, "c", "u", SamplerSettings(5, cfg_strength=0.0, rescale_t=3.0))
    assert calls == ["c"] * 5
    plain = sample_flow(velocity, noise, "c", None, SamplerSettings(5, rescale_t=3.0))
    torch.testing.assert_close(guided, plain)


def test_guidance_applies_exactly_inside_the_interval_ends_included():
    seen = []

    def velocity(x, t, cond):
        seen.append((round(t, 12), cond))
        return torch.ones_like(x) if cond == "c" else torch.zeros_like(x)

    settings = SamplerSettings(10, cfg_strength=2.0, cfg_interval=(0.5, 1.0), rescale_t=3.0)
    out = sample_flow(velocity, torch.zeros(3), "c", "u", settings)
    times = flow_timesteps(10, 3.0)
    guided = [t for t in times[:-1] if 0.5 <= t <= 1.0]
    assert sorted({t for t, c in seen if c == "u"}) == sorted(round(t, 12) for t in guided)
    assert 0 < len(guided) < 10
    # v = (1 + w) * 1 - w * 0 = 3 inside, 1 outside; x0 = 0 - sum(dt * v)
    want = -sum((a - b) * (3.0 if 0.5 <= a <= 1.0 else 1.0) for a, b in zip(times, times[1:]))
    torch.testing.assert_close(out, torch.full((3,), want))
    # Both ends count: with t = 1 and 0.5 the only step times, [0.5, 0.5] guides the second step only.
    x = torch.zeros(1)
    assert guided_velocity(velocity, x, 0.5, "c", "u", 2.0, (0.5, 0.5)).item() == 3.0
    assert guided_velocity(velocity, x, 1.0, "c", "u", 2.0, (0.5, 0.5)).item() == 1.0
    assert guided_velocity(velocity, x, 1.0, "c", "u", 2.0, (0.5, 1.0)).item() == 3.0


def test_official_sampler_entries_are_read_and_checked():
    s = SamplerSettings.from_official(SAMPLER, "pipeline.json: slat_sampler")
    assert s == SamplerSettings(2, 3.0, (0.5, 1.0), 3.0)
    cfg = SamplerSettings.from_official({"name": "FlowEulerCfgSampler", "params": {"steps": 12, "cfg_strength": 7.5}},
                                        "p")
    assert cfg == SamplerSettings(12, 7.5, (0.0, 1.0), 1.0)
    # what a file leaves out takes the defaults of TRELLIS's sample()
    assert SamplerSettings.from_official({"name": "FlowEulerGuidanceIntervalSampler"}, "p") == SamplerSettings(50, 3.0)
    assert SamplerSettings.from_official({"name": "FlowEulerSampler", "params": {"steps": 9}}, "p") == \
        SamplerSettings(9, 0.0)
    assert s.updated({"steps": 12, "cfg_strength": 7.5}) == SamplerSettings(12, 7.5, (0.5, 1.0), 3.0)
    for bad, message in [({"name": "DDIMSampler"}, "must be one of"),
                         ({"params": {"steps": 0}}, "steps must be"),
                         ({"params": {"steps": 4, "cfg_interval": [1.0, 0.5]}}, "cfg_interval"),
                         ({"params": {"steps": 4, "guidance": 1}}, "unknown sampler parameter"),
                         ({"args": {"sigma_min": 2}}, "sigma_min"),
                         ({"name": "FlowEulerSampler"}, "takes no cfg_interval or cfg_strength"),
                         ({"params": [25]}, "must be a table")]:
        with pytest.raises(CheckpointError, match=message) as info:
            SamplerSettings.from_official({**SAMPLER, **bad}, "pipeline.json: slat_sampler")
        assert "pipeline.json: slat_sampler" in str(info.value)
    with pytest.raises(ValueError, match="rescale_t"):
        s.updated({"rescale_t": -1})


def test_latent_normalization_is_undone_per_channel():
    norm = LatentNormalization.from_official(NORMALIZATION, 8, "p")
    sample = torch.randn(5, 8)
    torch.testing.assert_close(norm.denormalize(sample), sample * torch.tensor(NORMALIZATION["std"])
                               + torch.tensor(NORMALIZATION["mean"]))
    with pytest.raises(CheckpointError, match="list of 8 numbers"):
        LatentNormalization.from_official({**NORMALIZATION, "mean": [0.0] * 7}, 8, "p")
    with pytest.raises(CheckpointError, match="positive"):
        LatentNormalization.from_official({**NORMALIZATION, "std": [0.0] * 8}, 8, "p")


# -- (d) loading a user's weights -----------------------------------------------------------------------------------


def _small_dino_file(path: Path, seed: int = 13) -> dict[str, torch.Tensor]:
    state = {k: v.clone() for k, v in _randomize(DinoV2(**SMALL_DINO), seed).state_dict().items()}
    if path.suffix == ".pth":
        torch.save(state, path)
    else:
        save_file(state, str(path))
    return state


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_dinov2_loads_from_a_pth_or_safetensors_file(tmp_path, suffix):
    path = tmp_path / f"dino{suffix}"
    state = _small_dino_file(path)
    model = load_dinov2(path, SMALL_DINO)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_bad_dinov2_files_are_checkpoint_errors_naming_the_file(tmp_path):
    good = tmp_path / "dino.pth"
    state = _small_dino_file(good)
    wrong = tmp_path / "wrong.safetensors"
    save_file({**state, "pos_embed": torch.zeros(1, 10, 32)}, str(wrong))
    with pytest.raises(CheckpointError, match=r"wrong\.safetensors.*pos_embed \(file \[1, 10, 32\]"):
        load_dinov2(wrong, SMALL_DINO)
    for name, data in [("cut.pth", good.read_bytes()[:2000]), ("cut.safetensors", wrong.read_bytes()[:300])]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError, match=rf"{name}.*damaged"):
            load_dinov2(tmp_path / name, SMALL_DINO)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_dinov2(tmp_path / "absent.pth", SMALL_DINO)
    (tmp_path / "dino.bin").write_bytes(good.read_bytes())
    with pytest.raises(CheckpointError, match=r"dino\.bin: expected a \.safetensors, \.pth or \.pt file"):
        load_dinov2(tmp_path / "dino.bin", SMALL_DINO)
    torch.save({"model": state, "epoch": 3}, tmp_path / "nested.pth")
    with pytest.raises(CheckpointError, match=r"nested\.pth is not a state dict"):
        load_dinov2(tmp_path / "nested.pth", SMALL_DINO)


class _Payload:
    """Unpickling this would create `marker`: what a malicious .pth does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickled_object_in_a_pth_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "ran"
    payload = {"cls_token": _Payload(marker)}
    torch.save(payload, tmp_path / "evil.pth")  # torch's zip format
    (tmp_path / "evil_legacy.pth").write_bytes(pickle.dumps(payload, protocol=2))  # a bare pickle
    for name in ("evil.pth", "evil_legacy.pth"):
        with pytest.raises(CheckpointError, match=rf"{name} holds Python objects besides tensors"):
            load_dinov2(tmp_path / name, SMALL_DINO)
    # Newer pickle protocols trip the restricted unpickler even earlier: refused as not a weights file.
    (tmp_path / "evil4.pth").write_bytes(pickle.dumps(payload, protocol=4))
    with pytest.warns(UserWarning, match="pickle protocol"), pytest.raises(CheckpointError, match="evil4.pth"):
        load_dinov2(tmp_path / "evil4.pth", SMALL_DINO)
    assert not marker.exists()


def _save_network(folder: Path, rel: str, module: torch.nn.Module, name: str, args: dict) -> dict:
    """`<rel>.json` + `<rel>.safetensors` as TRELLIS releases them: torso (`blocks`, io blocks) fp16, the rest fp32."""
    torso = ("blocks.", "input_blocks.", "out_blocks.", "middle_block.")
    tensors = {k: (v.half() if k.startswith(torso) and "norm" not in k else v).detach().clone().contiguous()
               for k, v in module.state_dict().items()}
    (folder / rel).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / f"{rel}.safetensors"))
    (folder / f"{rel}.json").write_text(json.dumps({"name": name, "args": args}, indent=4))
    return tensors


def _trellis_folder(folder: Path) -> dict[str, dict]:
    """A small TRELLIS-image-large layout: pipeline.json (args.models -> ckpts/...), the three stage-1 networks and a
    DINOv2 file; the decoders are listed but absent, as stage 1 never opens them."""
    nets = {"sparse_structure_flow_model": ("SparseStructureFlowModel", SMALL_STRUCTURE_FLOW, 20),
            "sparse_structure_decoder": ("SparseStructureDecoder", SMALL_DECODER, 21),
            "slat_flow_model": ("SLatFlowModel", SMALL_LATENT_FLOW, 22)}
    saved = {}
    for key, (name, args, seed) in nets.items():
        module = _randomize(build_network(key, name, args), seed)
        saved[key] = _save_network(folder, f"ckpts/{key}_small", module, name, args)
    models = {k: f"ckpts/{k}_small" for k in nets} | {"slat_decoder_gs": "ckpts/slat_dec_gs_swin8_B_64l8gs32_fp16"}
    (folder / "pipeline.json").write_text(json.dumps({"name": "TrellisImageTo3DPipeline", "args": {
        "models": models, "sparse_structure_sampler": SAMPLER, "slat_sampler": SAMPLER,
        "slat_normalization": NORMALIZATION, "image_cond_model": "dinov2_vitl14_reg"}}, indent=4))
    _small_dino_file(folder / "dinov2_vitl14_reg4_pretrain.pth")
    return saved


def test_a_trellis_folder_loads_with_fp16_tensors_cast_and_its_settings_read(tmp_path):
    saved = _trellis_folder(tmp_path)
    stage1 = load_official_stage1(tmp_path, dinov2_args=SMALL_DINO)
    for key, module in [("slat_flow_model", stage1.latent_flow), ("sparse_structure_flow_model",
                                                                   stage1.structure_flow),
                        ("sparse_structure_decoder", stage1.structure_decoder)]:
        state = module.state_dict()
        assert set(state) == set(saved[key])
        assert all(state[k].dtype == torch.float32 and torch.equal(state[k], v.float())
                   for k, v in saved[key].items()), key
    assert any(v.dtype == torch.float16 for v in saved["slat_flow_model"].values())
    assert stage1.latent_sampler == stage1.structure_sampler == SamplerSettings(2, 3.0, (0.5, 1.0), 3.0)
    assert stage1.normalization.std.tolist() == pytest.approx(NORMALIZATION["std"])


def test_a_near_folder_takes_its_structure_from_a_trellis_folder(tmp_path):
    trellis, near = tmp_path / "trellis", tmp_path / "near"
    _trellis_folder(trellis)
    flow = _randomize(SLatFlowModel(**SMALL_LATENT_FLOW), seed=30)
    _save_network(near, "slat_flow", flow, "ElasticSLatFlowModel", SMALL_LATENT_FLOW)
    (near / "pipeline.yaml").write_text(yaml.safe_dump({"name": "NeARImageToRelightable3DPipeline", "args": {
        "models": {"slat_flow_model": "slat_flow", "decoder": "ckpts/decoder"}, "slat_sampler": SAMPLER,
        "slat_normalization": NORMALIZATION, "image_cond_model": "dinov2_vitl14_reg"}}))
    alone = load_official_stage1(near, dinov2=trellis / "dinov2_vitl14_reg4_pretrain.pth", dinov2_args=SMALL_DINO)
    assert alone.structure_flow is None and alone.structure_sampler is None
    with pytest.raises(CheckpointError, match="structure_folder"):
        sample_structure(alone, torch.zeros(1, 21, 32))
    both = load_official_stage1(near, structure_folder=trellis, dinov2_args=SMALL_DINO)
    assert torch.equal(both.latent_flow.out_layer.weight, flow.out_layer.weight)
    assert isinstance(both.structure_decoder, SparseStructureDecoder)
    with pytest.raises(CheckpointError, match=r"no DINOv2 weights.*dinov2_vitl14_reg4_pretrain\.pth"):
        load_official_stage1(near, dinov2_args=SMALL_DINO)


def test_mis_shaped_or_truncated_network_files_are_named(tmp_path):
    saved = _trellis_folder(tmp_path)
    path = tmp_path / "ckpts" / "slat_flow_model_small.safetensors"
    save_file({**saved["slat_flow_model"], "input_blocks.0.conv1.conv.weight": torch.zeros(16, 3, 3, 3, 8)},
              str(path))
    with pytest.raises(CheckpointError, match=r"slat_flow_model_small\.safetensors.*input_blocks\.0\.conv1\.conv"
                                              r"\.weight \(file \[16, 3, 3, 3, 8\], model \[16, 3, 3, 3, 16\]\)"):
        load_official_stage1(tmp_path, dinov2_args=SMALL_DINO)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"slat_flow_model_small\.safetensors is damaged"):
        load_official_stage1(tmp_path, dinov2_args=SMALL_DINO)


def test_photo_is_matted_in_srgb_as_trellis_feeds_dinov2():
    photo = np.zeros((2, 2, 4), np.float32)
    photo[0, 0] = [0.2140, 0.2140, 1.0, 1.0]  # opaque: linear 0.214 is sRGB 0.5
    photo[0, 1] = [0.1070, 0.0, 0.5, 0.5]  # half covered, premultiplied: straight (0.214, 0, 1)
    rgb = photo_to_dinov2_input(photo)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(rgb[0, 0], [0.5, 0.5, 1.0], atol=1e-3)
    np.testing.assert_allclose(rgb[0, 1], [0.25, 0.0, 0.5], atol=1e-3)  # sRGB then times alpha
    assert (rgb[1] == 0).all()  # transparent -> black
    with pytest.raises(NearError, match="RGBA"):
        photo_to_dinov2_input(np.zeros((4, 4, 3), np.float32))


def test_stage1_samples_are_seeded_report_progress_and_can_be_cancelled(tmp_path):
    _trellis_folder(tmp_path)
    stage1 = load_official_stage1(tmp_path, dinov2_args=SMALL_DINO)
    photo = np.random.default_rng(0).random((56, 56, 4)).astype(np.float32)
    cond = encode_photo(stage1, photo)
    assert cond.shape == (1, 1 + 4 + 16, 32)
    prepared = PreparedPhoto(photo, centre=np.array([28.0, 28.0]), side=56.0)  # what prepare_photo returns
    torch.testing.assert_close(encode_photo(stage1, prepared), cond)
    calls = []
    coords = sample_structure(stage1, cond, seed=5, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(1, 3), (2, 3), (3, 3)]  # 2 sampler steps, then decoding
    assert coords.dtype == torch.int32 and coords.shape[1] == 3 and len(coords) > 0
    assert int(coords.min()) >= 0 and int(coords.max()) < 64
    assert torch.equal(sample_structure(stage1, cond, seed=5, sampler={"steps": 2}), coords)
    assert not torch.equal(sample_structure(stage1, cond, seed=6, sampler={"steps": 1}), coords)

    voxels = _voxels(120, 64, seed=40).coords[:, 1:]
    calls.clear()
    latent = sample_latent(stage1, cond, voxels, seed=3, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(1, 2), (2, 2)] and latent.shape == (120, 8) and latent.dtype == torch.float32
    torch.testing.assert_close(sample_latent(stage1, cond, voxels, seed=3), latent)
    # With a zero output layer the velocity is 0: the sample is the seeded noise, de-normalised.
    with torch.no_grad():
        stage1.latent_flow.out_layer.weight.zero_()
        stage1.latent_flow.out_layer.bias.zero_()
    still = sample_latent(stage1, cond, voxels, seed=3)
    noise = torch.randn(120, 8, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(still, stage1.normalization.denormalize(noise))

    steps = []
    with pytest.raises(LiftCancelled):
        sample_latent(stage1, cond, voxels, progress=lambda d, t: steps.append(d), cancel=lambda: len(steps) >= 1)
    assert steps == [1]  # stopped between the two steps
    with pytest.raises(LiftCancelled):
        sample_structure(stage1, cond, cancel=lambda: True)
    with pytest.raises(NearError, match="duplicate"):
        sample_latent(stage1, cond, torch.tensor([[1, 2, 3], [1, 2, 3]]))
