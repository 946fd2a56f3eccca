"""The Intrinsic-Aware and Lighting-Aware decoders: official state-dict layout, maths of the shared layers,
information flow, gradients and weight round trips. All weights here are seeded random (no trained weights yet)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from manifests import load_manifest

from near_engine.checkpoints import load_weights, read_safetensors, save_model
from near_engine.models.blocks import AbsolutePositionEmbedder, CrossAttention, NeRFEncoding, SelfAttention, layer_norm
from near_engine.models.iad import IntrinsicAwareDecoder
from near_engine.models.lad import HEAD_LAYOUT, LightingAwareDecoder, camera_positions, split_heads
from near_engine.sparse import SparseTensor

CLASSES = {"near_decoder": IntrinsicAwareDecoder, "near_renderer": LightingAwareDecoder}

TINY_IAD = dict(resolution=64, model_channels=32, latent_channels=8, cond_channels=32, num_blocks=2, num_heads=2,
                num_register_tokens=4)
TINY_REP = {"num_gaussians": 4, "voxel_size": 1.5}
TINY_LAD = dict(resolution=64, model_channels=32, latent_channels=32, cond_channels=32, num_blocks=2, num_heads=2,
                representation_config=TINY_REP)


def _manifest(name: str) -> dict:
    return load_manifest(name)


def _expand(pattern: str, count: str, indices: range) -> list[str]:
    if "{i}" not in pattern:
        return [pattern]
    names = [pattern.replace("{i}", str(i)) for i in indices]
    assert count == f"x{len(names)}", (pattern, count, len(names))
    return names


def _alternative_cases() -> list[tuple[str, int | None]]:
    cases: list[tuple[str, int | None]] = []
    for name in CLASSES:
        alts = load_manifest(name)["alternatives"]
        cases += [(name, None)] + [(name, i) for i in range(len(alts))]
    return cases


@pytest.mark.parametrize("name,alt", _alternative_cases())
def test_state_dict_matches_official_manifest(name: str, alt: int | None) -> None:
    """Built on the meta device, names and shapes equal the manifest exactly (primary config and every alternative)."""
    manifest = _manifest(name)
    args = dict(manifest["args"])
    expected = {p[0]: list(p[1]) for p in manifest["params"]}
    buffers = {b[0]: list(b[1]) for b in manifest["buffers"]}
    total = manifest["total_params"]
    if alt is not None:
        change = manifest["alternatives"][alt]
        args.update(change["changes"])
        blocks = args["num_blocks"]
        old_blocks = manifest["args"]["num_blocks"]
        for pattern, count in change["removed"]:
            for key in _expand(pattern, count, range(blocks, old_blocks)):
                del expected[key]
        for pattern, shape, _dtype, *count in change["added"]:
            for key in _expand(pattern, count[0] if count else "x1", range(blocks)):
                expected[key] = list(shape)
        for key, _old, new, *_ in change["shape_changed"]:
            (buffers if key in buffers else expected)[key] = list(new)
        total = change["total_params"]
    with torch.device("meta"):
        model = CLASSES[name](**args)
    params = {k: list(v.shape) for k, v in model.named_parameters()}
    state = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert params == expected
    assert state == {**expected, **buffers}
    assert sum(math.prod(s) for s in params.values()) == total


def _slat(channels: int, seed: int = 0, sizes: tuple[int, ...] = (100, 90), spread: int = 16) -> SparseTensor:
    """Random voxels clustered in a `spread`^3 corner of a 64^3 grid (so windows hold several voxels)."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for n in sizes:
        cells = torch.randperm(spread**3, generator=g)[:n]
        coords = torch.stack([cells // spread**2, (cells // spread) % spread, cells % spread], 1) + 20
        items.append((coords.int(), torch.randn(n, channels, generator=g)))
    return SparseTensor.from_list(items, resolution=64)


def _tiny(seed: int = 0) -> tuple[IntrinsicAwareDecoder, LightingAwareDecoder]:
    torch.manual_seed(seed)
    iad, lad = IntrinsicAwareDecoder(**TINY_IAD), LightingAwareDecoder(**TINY_LAD)
    with torch.no_grad():  # RMSNorm weights and biases start at 1 / 0: randomise so every path is exercised
        for p in list(iad.parameters()) + list(lad.parameters()):
            p.add_(0.05 * torch.randn_like(p))
    return iad.eval(), lad.eval()


def _run(iad, lad, slat, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    light = torch.randn(slat.batch_size, 20, 32, generator=g)
    cam = torch.randn(slat.batch_size, 3, generator=g) * 2
    h, reg = iad(slat)
    return h, reg, lad(h, reg, light, cam)


def test_tiny_forward_shapes_and_dtypes() -> None:
    """Shapes and dtypes only: speed is measured by benchmarks/bench_frame.py, never asserted."""
    iad, lad = _tiny()
    slat = _slat(8)
    with torch.no_grad():
        h, reg, out = _run(iad, lad, slat)
    n = len(slat)
    assert h.feats.shape == (n, 32) and h.feats.dtype == torch.float32 and torch.equal(h.coords, slat.coords)
    assert reg.shape == (2, 4, 32) and torch.equal(reg[0], reg[1]) and torch.equal(reg[0], iad.reg_tokens[0])
    g = TINY_REP["num_gaussians"]
    assert {k: tuple(v.shape) for k, v in out.items()} == {"gs": (n, 14 * g), "pbr": (n, 3 * g), "scale": (n, 3 * g),
                                                          "rgb": (n, 35 * g)}
    assert all(torch.isfinite(v).all() for v in out.values())


def _window_cells(coords: torch.Tensor, window: int, shift: int) -> torch.Tensor:
    cells = (coords[:, 1:].long() + shift) // window
    return torch.cat([coords[:, :1].long(), cells], 1)


def _same_cell(coords: torch.Tensor, rows: torch.Tensor, window: int, shift: int) -> torch.Tensor:
    cells = _window_cells(coords, window, shift)
    return (cells[:, None, :] == cells[rows][None, :, :]).all(-1).any(-1)


@pytest.mark.parametrize("num_blocks", [1, 2])
def test_windowed_attention_restricts_information_flow(num_blocks: int) -> None:
    """Perturbing one voxel changes exactly the voxels reachable through block 0's cells (shift 0), then block 1's
    (shift 4): the IAD's only cross-voxel path is the swin self-attention."""
    torch.manual_seed(0)
    iad = IntrinsicAwareDecoder(**{**TINY_IAD, "num_blocks": num_blocks}).eval()
    slat = _slat(8, sizes=(150, 150))
    coords = slat.coords
    with torch.no_grad():
        base, _ = iad(slat)
        for victim in (0, 7, 180):
            feats = slat.feats.clone()
            feats[victim] += 3.0
            moved, _ = iad(slat.replace(feats))
            changed = (moved.feats - base.feats).abs().amax(1) > 1e-5
            reach = torch.zeros(len(slat), dtype=torch.bool)
            reach[victim] = True
            for i in range(num_blocks):
                reach = _same_cell(coords, reach.nonzero().squeeze(1), 8, 4 * (i % 2))
            assert torch.equal(changed, reach), (victim, int(changed.sum()), int(reach.sum()))
            assert int(reach.sum()) > 1  # the test is meaningful: the window holds other voxels
            outside = ~reach
            assert torch.allclose(moved.feats[outside], base.feats[outside], atol=1e-6, rtol=0)
    # The second block's windows differ from the first's, so two blocks reach further than one.
    if num_blocks == 2:
        one = _same_cell(coords, torch.tensor([0]), 8, 0)
        assert int(reach.sum()) >= int(one.sum())


def test_lad_keeps_voxels_independent() -> None:
    """The LAD has no self-attention: one voxel's features influence only that voxel's outputs."""
    iad, lad = _tiny()
    slat = _slat(8)
    with torch.no_grad():
        h, reg = iad(slat)
        light = torch.randn(2, 20, 32)
        cam = torch.tensor([[2.0, 0.5, 0.5], [0.5, -2.0, 0.5]])
        base = lad(h, reg, light, cam)
        feats = h.feats.clone()
        feats[5] += torch.randn(32)  # not a constant: layer_norm(h) would cancel that
        moved = lad(h.replace(feats), reg, light, cam)
    for key in base:
        diff = (moved[key] - base[key]).abs().amax(1)
        assert diff[5] > 1e-4 and float(diff[torch.arange(len(h)) != 5].max()) == 0.0


def test_cross_attention_matches_explicit_softmax() -> None:
    """Each voxel of element b attends over all tokens of context[b] (a batch-1 context is shared)."""
    torch.manual_seed(0)
    attn = CrossAttention(12, 6, num_heads=3, qk_rms_norm=True)
    with torch.no_grad():
        attn.q_rms_norm.gamma.uniform_(0.5, 1.5)
        attn.k_rms_norm.gamma.uniform_(0.5, 1.5)
    slat = _slat(12, sizes=(7, 5))
    for context in (torch.randn(2, 9, 6), torch.randn(1, 9, 6)):
        out = attn(slat.feats, slat, context)
        q = attn.to_q(slat.feats).reshape(-1, 3, 4)
        kv = attn.to_kv(context).reshape(context.shape[0], 9, 2, 3, 4)
        q = F.normalize(q, dim=-1) * attn.q_rms_norm.gamma * 2.0
        k = F.normalize(kv[:, :, 0], dim=-1) * attn.k_rms_norm.gamma * 2.0
        v = kv[:, :, 1]
        rows = []
        for i in range(len(slat)):
            b = int(slat.coords[i, 0]) if context.shape[0] > 1 else 0
            w = torch.softmax(torch.einsum("hd,lhd->hl", q[i], k[b]) / 2.0, dim=-1)
            rows.append(torch.einsum("hl,lhd->hd", w, v[b]).reshape(-1))
        assert torch.allclose(out, attn.to_out(torch.stack(rows)), atol=1e-5)


def test_self_attention_qkv_layout_matches_explicit_softmax() -> None:
    """to_qkv output is [3, heads, head_dim]; full mode attends within each batch element only."""
    torch.manual_seed(0)
    attn = SelfAttention(8, num_heads=2, window=None)
    slat = _slat(8, sizes=(6, 4))
    out = attn(slat.feats, slat)
    qkv = attn.to_qkv(slat.feats).reshape(-1, 3, 2, 4)
    rows = []
    for i in range(len(slat)):
        same = slat.coords[:, 0] == slat.coords[i, 0]
        w = torch.softmax(torch.einsum("hd,nhd->hn", qkv[i, 0], qkv[same, 1]) / 2.0, dim=-1)
        rows.append(torch.einsum("hn,nhd->hd", w, qkv[same, 2]).reshape(-1))
    assert torch.allclose(out, attn.to_out(torch.stack(rows)), atol=1e-5)


def test_layer_norm_has_no_affine_and_trellis_eps() -> None:
    x = torch.randn(5, 16, dtype=torch.float64)
    assert torch.allclose(layer_norm(x), F.layer_norm(x, (16,), eps=1e-6))
    assert layer_norm(x.half()).dtype == torch.float16


def test_absolute_position_embedding_layout() -> None:
    """TRELLIS APE: per axis [sin(c f_k), cos(c f_k)], f_k = 10000^(-k/F), F = C // 6; zero padding to C."""
    ape = AbsolutePositionEmbedder(20)  # F = 3, 18 channels + 2 zeros
    coords = torch.tensor([[1, 2, 3], [0, 5, 63]], dtype=torch.int32)
    emb = ape(coords)
    f = 1.0 / 10000 ** (torch.arange(3) / 3)
    for axis in range(3):
        c = coords[:, axis : axis + 1].float()
        assert torch.allclose(emb[:, axis * 6 : axis * 6 + 3], torch.sin(c * f))
        assert torch.allclose(emb[:, axis * 6 + 3 : axis * 6 + 6], torch.cos(c * f))
    assert torch.equal(emb[:, 18:], torch.zeros(2, 2))
    assert AbsolutePositionEmbedder(768).freq_dim == 128


def test_nerf_encoding_layout() -> None:
    enc = NeRFEncoding(3, 12, include_input=True)
    assert enc.out_dim == 75 and NeRFEncoding(1, 12, include_input=True).out_dim == 25
    x = torch.tensor([[0.3, -0.2, 0.9]])
    out = enc(x)
    assert out.shape == (1, 75) and torch.equal(out[:, :3], x)
    f = 2.0 ** torch.arange(12)
    scaled = (x[0][:, None] * f).reshape(-1)  # input dim major, then frequency
    assert torch.allclose(out[0, 3:39], torch.sin(scaled), atol=1e-5)
    assert torch.allclose(out[0, 39:], torch.cos(scaled), atol=1e-5)


def test_offset_perturbation_is_atanh_of_hammersley() -> None:
    lad = LightingAwareDecoder(**TINY_LAD)
    p = lad.offset_perturbation
    assert p.shape == (4, 3) and p.dtype == torch.float32
    # i = 0..3 of 4: (i/4, radical inverse base 2, base 3)
    points = torch.tensor([[0, 0, 0], [0.25, 0.5, 1 / 3], [0.5, 0.25, 2 / 3], [0.75, 0.75, 1 / 9]])
    assert torch.allclose(p, torch.atanh((points * 2 - 1) / 1.5), atol=1e-6)
    assert "offset_perturbation" in lad.state_dict()


def test_split_heads_layout() -> None:
    g, n = 4, 3
    heads = {head: torch.arange(n * g * sum(k for _, k in fields), dtype=torch.float32).reshape(n, -1)
             for head, fields in HEAD_LAYOUT.items()}
    parts = split_heads(heads, g)
    assert parts["_xyz"].shape == (n, g, 3) and torch.equal(parts["_xyz"][0, 1], torch.tensor([3.0, 4.0, 5.0]))
    assert torch.equal(parts["_base_color"][0, 0], torch.tensor([12.0, 13.0, 14.0]))  # after 3G xyz values
    assert parts["_opacity"].shape == (n, g, 1) and float(parts["_opacity"][0, 0, 0]) == 13 * g
    assert parts["_rgb"].shape == (n, g, 32) and float(parts["_shadow"][0, 0, 0]) == 32 * g
    assert float(parts["_hdri2"][0, -1, 0]) == 35 * g - 1
    with pytest.raises(ValueError):
        split_heads({**heads, "pbr": heads["pbr"][:, :-1]}, g)


def test_view_embedding_uses_official_voxel_frame_and_broadcasts() -> None:
    _, lad = _tiny()
    slat = _slat(32, sizes=(10, 10))
    cam = torch.tensor([[1.5, 0.2, 0.7]])
    both = lad.view_embedding(slat, cam.expand(2, 3))
    assert torch.allclose(lad.view_embedding(slat, cam), both)
    assert torch.allclose(lad.view_embedding(slat, cam[0]), both)
    # explicit: xyz = (i + 0.5) / 64, direction and distance from the camera
    xyz = (slat.coords[:, 1:].float() + 0.5) / 64
    ob = xyz - cam
    dist = ob.norm(dim=-1, keepdim=True)
    e = lad.ob_views_norm(lad.ob_views_encoder(lad.ob_views_pe(ob / dist)))
    e = e + lad.ob_dists_norm(lad.ob_dists_encoder(lad.ob_dists_pe(dist)))
    assert torch.allclose(both, e, atol=1e-6)
    extr = torch.eye(4).repeat(2, 1, 1)
    extr[:, :3, 3] = torch.tensor([-1.0, 0.0, 2.0])  # world-to-camera translation, no rotation
    assert torch.allclose(camera_positions(extr), torch.tensor([[1.0, 0.0, -2.0]] * 2))


def test_gradients_reach_every_parameter() -> None:
    iad, lad = _tiny()
    iad.train(), lad.train()
    h, reg, out = _run(iad, lad, _slat(8))
    loss = sum((v * torch.randn_like(v)).sum() for v in out.values()) + (h.feats * torch.randn_like(h.feats)).sum()
    loss.backward()
    for model in (iad, lad):
        for name, p in model.named_parameters():
            assert p.grad is not None and float(p.grad.abs().sum()) > 0, f"{type(model).__name__}.{name} gets no grad"


def test_save_and_load_roundtrip(tmp_path: Path) -> None:
    iad, lad = _tiny(seed=0)
    slat = _slat(8)
    with torch.no_grad():
        h, reg, out = _run(iad, lad, slat)
    save_model(tmp_path, "decoder", iad, TINY_IAD)
    save_model(tmp_path, "renderer", lad, TINY_LAD)
    args = json.loads((tmp_path / "renderer.json").read_text())["args"]
    iad2, lad2 = _tiny(seed=5)
    lad2 = LightingAwareDecoder(**args)
    load_weights(iad2, read_safetensors(tmp_path / "decoder.safetensors"), "decoder")
    load_weights(lad2, read_safetensors(tmp_path / "renderer.safetensors"), "renderer")
    with torch.no_grad():
        h2, reg2, out2 = _run(iad2.eval(), lad2.eval(), slat)
    assert torch.equal(h.feats, h2.feats) and torch.equal(reg, reg2)
    assert all(torch.equal(out[k], out2[k]) for k in out)


def test_fp16_weights_load_into_fp32_modules() -> None:
    iad, _ = _tiny()
    half = {k: v.half() for k, v in iad.state_dict().items()}
    other = copy.deepcopy(iad)
    load_weights(other, half, "fp16 file")
    assert all(p.dtype == torch.float32 for p in other.parameters())
    assert torch.equal(other.blocks[0].attn.to_qkv.weight, half["blocks.0.attn.to_qkv.weight"].float())


def test_bad_configurations_and_inputs_are_rejected() -> None:
    with pytest.raises(ValueError):
        IntrinsicAwareDecoder(**{**TINY_IAD, "cond_channels": 16})
    with pytest.raises(ValueError):
        IntrinsicAwareDecoder(**{**TINY_IAD, "attn_mode": "shift_window"})
    with pytest.raises(ValueError):
        LightingAwareDecoder(**{**TINY_LAD, "latent_channels": 8})
    iad, lad = _tiny()
    with pytest.raises(ValueError):
        iad(_slat(16))
    h, reg = iad(_slat(8))
    with pytest.raises(ValueError):
        lad(h, reg, torch.randn(3, 5, 32), torch.zeros(2, 3))


def test_projected_context_gives_identical_outputs() -> None:
    """Keys/values of registers and light tokens computed once (per asset and light) reproduce the plain forward,
    and a batch-1 light-token tensor is shared by every batch element."""
    iad, lad = _tiny()
    slat = _slat(8)
    light = torch.randn(1, 20, 32)
    cam = torch.tensor([[2.0, 0.5, 0.5], [0.5, -2.0, 0.5]])
    with torch.no_grad():
        h, reg = iad(slat)
        plain = lad(h, reg, light, cam)
        context = lad.project_context(reg, light)
        cached = lad(h, None, None, cam, context=context)
        expanded = lad(h, reg, light.expand(2, -1, -1), cam)
    for key in plain:
        assert torch.equal(plain[key], cached[key])
        assert torch.allclose(plain[key], expanded[key], atol=1e-6)
    with pytest.raises(ValueError):
        lad(h, None, None, cam)
    with pytest.raises(ValueError):
        lad(h, None, None, cam, context=context[:1])
