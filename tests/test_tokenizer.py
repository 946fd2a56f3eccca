"""The illumination tokenizer: official parameter names/shapes (manifest), a cheap forward, gradients, and the input
planes' layout in closed form (where a bright texel lands, unit directions, rotation as a roll)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from manifests import load_manifest

from near_engine.envmap import direction_to_uv
from near_engine.errors import EnvMapError
from near_engine.models.tokenizer import OFFICIAL_GRID, IlluminationTokenizer, tokenizer_input

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}

SMALL = dict(output_dim=32, num_tokens=64, cnn_out_channels=16, n_heads=4, num_transformer_layers=2,
             convnext_dims=(16, 32, 64, 128), convnext_depths=(1, 1, 2, 1))


def _manifest() -> dict:
    return load_manifest("near_hdri_encoder")


def _expected(params: list) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {name: (tuple(shape), DTYPES[dtype]) for name, shape, dtype, *_ in params}


def _apply_alternative(primary: list, alt: dict) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The primary param list with an alternative's added / removed / shape_changed entries applied."""
    expected = _expected(primary)
    for name, *_ in alt.get("removed", []):
        expected.pop(name)
    for name, _old, new, *_ in alt.get("shape_changed", []):
        expected[name] = (tuple(new), expected[name][1])
    n_layers = alt["changes"].get("num_transformer_layers", 0)
    n_primary = sum(1 for k in expected if k.startswith("transformer_encoder.layers.") and k.endswith(".norm1.weight"))
    for name, shape, dtype, *rest in alt.get("added", []):
        if "{i}" in name:  # a template over the extra layer indices ("x2": two more copies)
            assert rest and rest[0] == f"x{n_layers - n_primary}", rest
            for i in range(n_primary, n_layers):
                expected[name.replace("{i}", str(i))] = (tuple(shape), DTYPES[dtype])
        else:
            expected[name] = (tuple(shape), DTYPES[dtype])
    return expected


def _ours(**kwargs) -> tuple[IlluminationTokenizer, dict[str, tuple[tuple[int, ...], torch.dtype]], list[str]]:
    with torch.device("meta"):
        net = IlluminationTokenizer(**kwargs)
    sd = net.state_dict()
    return net, {k: (tuple(v.shape), v.dtype) for k, v in sd.items()}, list(sd)


def _compare(ours: dict, expected: dict) -> None:
    missing = sorted(set(expected) - set(ours))
    extra = sorted(set(ours) - set(expected))
    assert not missing and not extra, f"missing {missing[:10]}, unexpected {extra[:10]}"
    wrong = {k: (ours[k], expected[k]) for k in expected if ours[k] != expected[k]}
    assert not wrong, f"mismatched shapes/dtypes: {dict(list(wrong.items())[:10])}"


# ---------------------------------------------------------------------------------------------------------------------
# the official shapes


def test_full_size_state_dict_equals_manifest() -> None:
    manifest = _manifest()
    args = {k: v for k, v in manifest["args"].items() if k != "pretrained_path"}
    net, ours, order = _ours(**args)
    _compare(ours, _expected(manifest["params"]))
    assert order == [p[0] for p in manifest["params"]], "same names, different order"
    assert len(order) == manifest["num_state_dict_tensors"]
    assert sum(p.numel() for p in net.parameters()) == manifest["total_params"]  # shared layer counted once
    assert sum(math.prod(s) for s, _ in ours.values()) == manifest["state_dict_numel"]
    # the RoPE tables are non-persistent buffers: present on the module, absent from the state dict
    buffers = dict(net.named_buffers(remove_duplicate=False))
    for name, shape, *_ in manifest["buffers"]:
        assert tuple(buffers[name].shape) == tuple(shape) and name not in ours


@pytest.mark.parametrize("index", [0, 1])
def test_alternatives_state_dict_equal_manifest(index: int) -> None:
    manifest = _manifest()
    alt = manifest["alternatives"][index]
    args = {k: v for k, v in manifest["args"].items() if k != "pretrained_path"}
    args.update(alt["changes"])
    net, ours, _ = _ours(**args)
    _compare(ours, _apply_alternative(manifest["params"], alt))
    assert sum(p.numel() for p in net.parameters()) == alt["total_params"]


def test_transformer_layers_share_one_object() -> None:
    net = IlluminationTokenizer(**{**SMALL, "num_transformer_layers": 3})
    layers = net.transformer_encoder.layers
    assert layers[0] is layers[1] is layers[2]
    sd = net.state_dict()
    assert sd["transformer_encoder.layers.0.linear1.weight"].data_ptr() == \
        sd["transformer_encoder.layers.2.linear1.weight"].data_ptr()
    # a strict load of a state dict with every index works (the official checkpoint layout)
    net.load_state_dict({k: v.clone() for k, v in sd.items()}, strict=True)


# ---------------------------------------------------------------------------------------------------------------------
# forward


def _small(seed: int = 0) -> IlluminationTokenizer:
    torch.manual_seed(seed)
    return IlluminationTokenizer(**SMALL).eval()


def test_small_forward_shape_deterministic() -> None:
    net = _small()
    torch.manual_seed(1)
    x = torch.randn(2, 9, 64, 64)
    with torch.no_grad():
        a = net(x)
        b = net(x)
        grid = net.grid_tokens(x)
    assert a.shape == (2, 64, 32)
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert grid.shape == (2, 32, 8, 8)
    assert torch.allclose(net.transform(grid), a)
    # same seed, same weights: the construction is deterministic too
    with torch.no_grad():
        assert torch.equal(_small()(x), a)
    # batch items are independent
    with torch.no_grad():
        assert torch.allclose(net(x[1:]), a[1:], atol=1e-5)


def test_gradients_reach_every_parameter() -> None:
    net = _small()
    net.train()  # dropout and stochastic depth on: must still be differentiable
    torch.manual_seed(2)
    x = torch.randn(2, 9, 64, 64)
    net(x).square().mean().backward()
    trainable = {n: p for n, p in net.named_parameters() if p.requires_grad}
    assert set(dict(net.named_parameters())) - set(trainable) == {"dir_encoder.freq_bands"}
    dead = [n for n, p in trainable.items() if p.grad is None or not torch.any(p.grad != 0)]
    assert not dead, dead


def test_rope_and_rmsnorm() -> None:
    net = _small()
    attn = net.transformer_encoder.layers[0].self_attn
    cos, sin = attn.rope(5, torch.float32)
    assert cos.shape == (5, attn.head_dim)
    assert torch.allclose(cos[0], torch.ones(attn.head_dim)) and torch.allclose(sin[0], torch.zeros(attn.head_dim))
    assert torch.allclose(cos[3, 0], torch.tensor(math.cos(3.0)))  # first frequency is 1
    y = net.ln_final(torch.randn(3, 32) * 7)
    assert torch.allclose(y.square().mean(-1), torch.ones(3), atol=1e-4)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="perfect square"):
        IlluminationTokenizer(**{**SMALL, "num_tokens": 60})
    with pytest.raises(ValueError, match="9"):
        _small()(torch.zeros(1, 6, 64, 64))


# ---------------------------------------------------------------------------------------------------------------------
# input planes


GH, GW = OFFICIAL_GRID


def test_planes_shape_and_ranges() -> None:
    rng = np.random.default_rng(0)
    pixels = rng.exponential(2.0, size=(64, 128, 3)).astype(np.float32)
    planes = tokenizer_input(pixels, 0.3, size=64)
    assert planes.shape == (9, 64, 64) and planes.dtype == torch.float32
    assert planes[:3].min() >= -1 and planes[:3].max() <= 1
    assert planes[3:6].min() >= -1
    assert torch.allclose(planes[6:].norm(dim=0), torch.ones(64, 64), atol=1e-5)


def test_uniform_map_values() -> None:
    x = 0.6  # the official "even" environment
    planes = tokenizer_input(np.full((8, 16, 3), x, np.float32), 0.0, size=16)
    reinhard = x * (1 + x / 256) / (1 + x)
    srgb = 1.055 * reinhard ** (1 / 2.4) - 0.055
    assert torch.allclose(planes[:3], torch.full((3, 16, 16), srgb * 2 - 1), atol=1e-6)
    assert torch.allclose(planes[3:6], torch.full((3, 16, 16), math.log1p(10 * x) / math.log1p(1000) - 1), atol=1e-6)
    black = tokenizer_input(np.zeros((8, 16, 3), np.float32), 0.0, size=16)
    assert torch.all(black[:6] == -1)


def _bright_texel(row: int, col: int) -> np.ndarray:
    pixels = np.zeros((GH, GW, 3), np.float32)
    pixels[row, col] = 100.0
    return pixels


def test_bright_texel_lands_where_the_layout_says() -> None:
    # at rotation 0 the official layout is our map rolled right by a quarter turn: texel (r, c) -> (r, c + W/4)
    row, col = 100, 600
    planes = tokenizer_input(_bright_texel(row, col), 0.0, size=GW)[:, :, :]  # size W: rows doubled, columns exact
    log = planes[3]
    assert int(torch.count_nonzero(log > -1)) == 2  # a nearest 512 -> 1024 resize doubles the row
    rows, cols = torch.nonzero(log > -1, as_tuple=True)
    assert set(cols.tolist()) == {(col + GW // 4) % GW}
    assert set(rows.tolist()) == {2 * row, 2 * row + 1}
    # the DIR plane there is the direction of the bright texel in our convention (Blender/Cycles)
    d = planes[6:, 2 * row, (col + GW // 4) % GW].double().numpy()
    uv = direction_to_uv(d)
    assert uv[0] * GW == pytest.approx(col + 0.5, abs=1e-3)
    assert (1 - uv[1]) * GH == pytest.approx(row + 0.5, abs=1e-3)


def test_closed_form_directions() -> None:
    planes = tokenizer_input(np.zeros((GH, GW, 3), np.float32), 0.0, size=512)  # columns: every other texel
    dirs = planes[6:]
    assert torch.allclose(dirs.norm(dim=0), torch.ones(512, 512), atol=1e-5)
    assert dirs[2, 0, 0] > 0.999 and dirs[2, -1, 0] < -0.999  # top row +Z, bottom row -Z (official: Z up)
    mid = GH // 2 - 1  # just above the horizon
    # official azimuth of column j is 3 pi/2 - 2 pi (j + 0.5) / W: 512-column j0 = texel 2 j0
    for j0, expected in ((0, (0.0, -1.0)), (128, (-1.0, 0.0)), (256, (0.0, 1.0)), (384, (1.0, 0.0))):
        x, y = dirs[0, mid, j0].item(), dirs[1, mid, j0].item()
        assert (x, y) == pytest.approx(expected, abs=0.01), j0


def test_rotation_quarter_turn_is_a_quarter_roll() -> None:
    rng = np.random.default_rng(3)
    pixels = rng.exponential(1.0, size=(GH, GW, 3)).astype(np.float32)
    base = tokenizer_input(pixels, 0.0, size=GW)
    turned = tokenizer_input(pixels, math.pi / 2, size=GW)
    # +90 degrees (hdri_rot -90) moves everything a quarter turn right: column j now shows what column j - W/4 showed
    assert torch.allclose(turned, torch.roll(base, shifts=GW // 4, dims=2), atol=1e-6)
    # and at -90 degrees the layout is our own map unshifted (closed form of the official azimuth)
    turned = tokenizer_input(pixels, -math.pi / 2, size=GW)
    assert torch.allclose(turned[3:6, ::2].permute(1, 2, 0),
                          torch.log1p(10 * torch.from_numpy(pixels)) / math.log1p(1000) - 1, atol=1e-6)
    # a full turn is the identity; a fraction of a texel interpolates (a non-integer roll stays finite and bounded)
    assert torch.allclose(tokenizer_input(pixels, 2 * math.pi, size=GW), base, atol=1e-5)
    half = tokenizer_input(pixels, math.pi / GW, size=GW)  # half a texel
    assert torch.isfinite(half).all()


def test_layout_is_the_world_as_seen_under_the_mapping_rotation() -> None:
    # The map under a Mapping rotation, laid out at rotation 0, equals the raw map laid out with that rotation: each
    # texel position stands for one fixed world direction, as EnvMap.sample defines the World.
    from near_engine.envmap import EnvMap, uv_to_direction

    rng = np.random.default_rng(5)
    pixels = rng.exponential(1.0, size=(GH, GW, 3)).astype(np.float32)
    theta = 2 * math.pi * 16 / GW  # whole texels, so bilinear sampling lands on texel centres
    uv = np.stack(np.meshgrid((np.arange(GW) + 0.5) / GW, 1 - (np.arange(GH) + 0.5) / GH), -1)
    baked = EnvMap.from_array(pixels, rotation_z=theta).sample(uv_to_direction(uv))
    rotated = tokenizer_input(pixels, theta, size=GW)
    reference = tokenizer_input(baked, 0.0, size=GW)
    assert torch.allclose(rotated[:6], reference[:6], atol=1e-5)  # LDR and LOG: the radiance laid out
    assert not torch.allclose(rotated[:6], tokenizer_input(pixels, -theta, size=GW)[:6], atol=1e-3)


def test_resize_to_official_grid_is_nearest() -> None:
    # a 2x-sized map: the official path picks every other texel (cv2 INTER_NEAREST), not an average
    small = np.random.default_rng(4).exponential(1.0, size=(GH, GW, 3)).astype(np.float32)
    big = np.repeat(np.repeat(small, 2, axis=0), 2, axis=1)
    big[1::2] = 1e4  # never picked
    big[:, 1::2] = 1e4
    assert torch.equal(tokenizer_input(big, 0.0, size=64), tokenizer_input(small, 0.0, size=64))


def test_bad_planes_input() -> None:
    with pytest.raises(EnvMapError, match=r"\[H, W, 3\]"):
        tokenizer_input(np.zeros((8, 16), np.float32))
    bad = np.zeros((8, 16, 3), np.float32)
    bad[0, 0, 0] = np.nan
    with pytest.raises(EnvMapError, match="NaN"):
        tokenizer_input(bad)
    with pytest.raises(EnvMapError, match="rotation"):
        tokenizer_input(np.zeros((8, 16, 3), np.float32), float("inf"))
    with pytest.raises(EnvMapError, match="size"):
        tokenizer_input(np.zeros((8, 16, 3), np.float32), 0.0, size=0)


def test_transformer_layer_matches_explicit_formula() -> None:
    # pre-norm layer written out by hand: explicit softmax attention, RoPE as a rotation of (x_i, x_{i + d/2}) pairs
    net = _small()
    layer = net.transformer_encoder.layers[0]
    torch.manual_seed(5)
    x = torch.randn(2, 10, 32)
    heads, hd = 4, 8

    def rms(y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return y / torch.sqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    def rope(y: torch.Tensor) -> torch.Tensor:  # [B, h, T, hd]
        pos = torch.arange(y.shape[2], dtype=torch.float64)[:, None]
        ang = pos * (1e4 ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd))  # [T, hd/2]
        a, b = y[..., : hd // 2].double(), y[..., hd // 2:].double()
        return torch.cat([a * ang.cos() - b * ang.sin(), b * ang.cos() + a * ang.sin()], -1).float()

    att = layer.self_attn
    h = rms(x, layer.norm1.weight)
    q, k, v = (p(h).view(2, 10, heads, hd).transpose(1, 2) for p in (att.q_proj, att.k_proj, att.v_proj))
    w = torch.softmax(rope(q) @ rope(k).transpose(-1, -2) / math.sqrt(hd), -1)
    y = x + att.out_proj((w @ v).transpose(1, 2).reshape(2, 10, 32))
    y = y + layer.linear2(torch.nn.functional.gelu(layer.linear1(rms(y, layer.norm2.weight))))
    with torch.no_grad():
        assert torch.allclose(layer(x), y, atol=1e-5)


def test_fourier_feature_channel_order() -> None:
    enc = _small().dir_encoder
    d = torch.tensor([0.3, -0.5, 0.8]).view(1, 3, 1, 1)
    out = enc(d).flatten()
    assert out.shape == (51,)
    assert torch.allclose(out[:3], d.flatten())
    f = (2.0 ** torch.arange(8)) * math.pi
    for c in range(3):  # per input channel: 8 sines then 8 cosines
        block = out[3 + 16 * c: 3 + 16 * (c + 1)]
        assert torch.allclose(block[:8], torch.sin(d.flatten()[c] * f), atol=1e-5)
        assert torch.allclose(block[8:], torch.cos(d.flatten()[c] * f), atol=1e-5)
