"""Named configurations and whole-pipeline weights: build, save, load (ours and the official layout), errors.

Weights here are seeded random (`configs.random_weights`): untrained, used only to check plumbing.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from manifests import load_manifest
from safetensors.torch import save_file

from near_engine.ibl import ShadingTerms
from near_engine.configs import (
    CLASS_REGISTRY,
    NETWORK_KEYS,
    build_networks,
    count_parameters,
    get_config,
    load_networks,
    official_config,
    random_weights,
    save_networks,
    tiny_config,
)
from near_engine.errors import CheckpointError
from near_engine.sparse import SparseTensor

# A small configuration written with the OFFICIAL class names (for the official-layout test).
SMALL_OFFICIAL = {
    "decoder": {"name": "SLatGaussianDecoder", "args": {
        "resolution": 64, "model_channels": 32, "latent_channels": 8, "cond_channels": 32, "num_blocks": 2,
        "num_register_tokens": 4, "num_heads": 2, "mlp_ratio": 4, "attn_mode": "swin", "window_size": 8,
        "pe_mode": "ape", "use_fp16": True, "qk_rms_norm": False, "qk_rms_norm_cross": False}},
    "hdri_encoder": {"name": "Hdri_Encoder", "args": {
        "output_dim": 32, "num_tokens": 16, "cnn_out_channels": 16, "n_heads": 2, "num_transformer_layers": 2,
        "rope_base": 10000.0, "pretrained_path": None, "convnext_dims": [8, 16, 32, 64],
        "convnext_depths": [1, 1, 1, 1]}},
    "renderer": {"name": "SLatGaussianRenderer", "args": {
        "resolution": 64, "model_channels": 32, "latent_channels": 32, "cond_channels": 32, "num_blocks": 2,
        "num_heads": 2, "use_fp16": True, "representation_config": {"num_gaussians": 4, "voxel_size": 1.5}}},
    "neural_basis": {"name": "NeuralBasis", "args": {
        "input_dim": 32, "output_dim": 5, "hidden_dim": 16, "num_layers": 3, "activation": "sine",
        "pretrained_path": None}},
}


def _manifest(key: str) -> dict:
    return load_manifest(f"near_{key}")


def _slat(n: int = 60, seed: int = 0, channels: int = 8) -> SparseTensor:
    g = torch.Generator().manual_seed(seed)
    cells = torch.randperm(12**3, generator=g)[:n]
    xyz = torch.stack([cells // 144, (cells // 12) % 12, cells % 12], 1) + 20
    return SparseTensor.from_list([(xyz.int(), torch.randn(n, channels, generator=g))], resolution=64)


def _outputs(nets: dict) -> dict[str, torch.Tensor]:
    """One small forward through every network (deterministic inputs)."""
    g = torch.Generator().manual_seed(7)
    tok = nets["hdri_encoder"]
    side = 4 * 32  # the tokenizer's stride-32 backbone needs at least 32 pixels; 128 keeps every stage non-trivial
    planes = torch.randn(1, 9, side, side, generator=g)
    with torch.no_grad():
        light = tok(planes)
        h, reg = nets["decoder"](_slat(channels=nets["decoder"].latent_channels))
        heads = nets["renderer"](h, reg, light, torch.tensor([[1.5, -0.5, 0.8]]))
        terms = None
        if nets["neural_basis"].core == "pbr":  # near-tiny: the MLP corrects given PBR terms
            terms = ShadingTerms(torch.rand(50, 3, generator=g), torch.rand(50, 3, generator=g))
        shade = nets["neural_basis"](torch.randn(50, 32, generator=g), torch.randn(50, 3, generator=g), terms)
    return {"light": light, "h": h.feats, "reg": reg, **heads, "shade": shade}


def _write_official(folder: Path, nets: dict, config: dict, fp16_blocks: bool = True) -> None:
    """The official NeAR layout: pipeline.yaml + ckpts/<model>.json + .safetensors (fp16 `blocks.*`, fp32 others)."""
    ckpts = folder / "ckpts"
    ckpts.mkdir(parents=True)
    for key, module in nets.items():
        tensors = {k: (v.half() if fp16_blocks and k.startswith("blocks.") else v).detach().clone().contiguous()
                   for k, v in module.state_dict().items()}
        save_file(tensors, str(ckpts / f"{key}.safetensors"))
        (ckpts / f"{key}.json").write_text(json.dumps({"name": config[key]["name"], "args": config[key]["args"]}))
    # stage 1 is listed too, as in the real pipeline.yaml; loading the renderer networks never opens it
    save_file({"out_layer.weight": torch.zeros(8, 4)}, str(ckpts / "slat_flow_model.safetensors"))
    (ckpts / "slat_flow_model.json").write_text(json.dumps({"name": "ElasticSLatFlowModel", "args": {}}))
    models = "".join(f"    {k}: ckpts/{k}\n" for k in [*nets, "slat_flow_model"])
    (folder / "pipeline.yaml").write_text(
        "name: NeARImageToRelightable3DPipeline\nargs:\n  models:\n" + models
        + "  slat_sampler:\n    name: FlowEulerGuidanceIntervalSampler\n    params:\n      steps: 25\n"
        + "  slat_normalization:\n    mean: [0, 0, 0, 0, 0, 0, 0, 0]\n    std: [1, 1, 1, 1, 1, 1, 1, 1]\n")


def test_official_config_on_meta_matches_the_manifests_exactly():
    nets = build_networks("near-official", device="meta")
    assert set(nets) == set(NETWORK_KEYS)
    for key, module in nets.items():
        manifest = _manifest(key)
        assert get_config("near-official")[key]["name"] == manifest["class"]
        assert get_config("near-official")[key]["args"] == manifest["args"], key
        expected = {p[0]: p[1] for p in manifest["params"]}
        expected.update({b[0]: b[1] for b in manifest["buffers"] if b[-1].get("persistent", True)})
        got = {n: list(t.shape) for n, t in module.state_dict().items()}
        assert got == expected, key
        assert count_parameters(module) == manifest["total_params"], key


@pytest.mark.parametrize("key", NETWORK_KEYS)
def test_every_manifest_alternative_builds_with_its_listed_shapes(key):
    manifest = _manifest(key)
    for alt in manifest["alternatives"]:
        cfg = {key: {"name": manifest["class"], "args": {**copy.deepcopy(manifest["args"]), **alt["changes"]}}}
        module = build_networks(cfg, device="meta")[key]
        assert count_parameters(module) == alt["total_params"], alt["changes"]
        state = {n: list(t.shape) for n, t in module.state_dict().items()}
        for name, _old, new, *_ in alt["shape_changed"]:
            names = [name.replace("{i}", str(i)) for i in range(64)] if "{i}" in name else [name]
            assert any(state.get(n) == new for n in names), (alt["changes"], name)
        for name, shape, *_ in alt["added"]:
            assert state.get(name.replace("{i}", "0")) == shape, (alt["changes"], name)


def test_official_config_options_are_the_manifest_unknowns():
    cfg = official_config(lad_blocks=6, latent_channels=24, cnn_out_channels=128, shading_activation="relu",
                          shading_hidden_dim=128)
    nets = build_networks(cfg, device="meta")
    assert len(nets["renderer"].blocks) == 6
    assert list(nets["decoder"].input_layer.weight.shape) == [768, 24]
    assert list(nets["hdri_encoder"].projection_conv.weight.shape) == [768, 384, 1, 1]
    assert list(nets["neural_basis"].mlp[0].weight.shape) == [128, 71]


def test_near_tiny_builds_on_cpu_and_is_small():
    nets = build_networks("near-tiny")
    counts = {k: count_parameters(m) for k, m in nets.items()}
    print("near-tiny parameters:", counts)
    assert all(p.device.type == "cpu" for m in nets.values() for p in m.parameters())
    assert sum(counts.values()) < 1_000_000
    # the wiring the pipeline relies on: light-token width = LAD context width; shading input = LAD colour feature
    assert nets["hdri_encoder"].output_dim == nets["renderer"].model_channels == nets["decoder"].model_channels
    out = _outputs(random_weights("near-tiny", seed=0))
    assert out["light"].shape == (1, 256, 64) and out["shade"].shape == (50, 5)
    assert all(torch.isfinite(v).all() for v in out.values())


def test_random_weights_are_seeded():
    a, b, c = (random_weights(tiny_config(width=32), seed=s) for s in (3, 3, 4))
    for key in NETWORK_KEYS:
        sa, sb, sc = a[key].state_dict(), b[key].state_dict(), c[key].state_dict()
        assert all(torch.equal(sa[n], sb[n]) for n in sa), key
        assert any(not torch.equal(sa[n], sc[n]) for n in sa), key


def test_save_load_round_trip_in_our_format(tmp_path):
    nets = random_weights("near-tiny", seed=1)
    save_networks(tmp_path, nets, "near-tiny", settings={"note": "seeded random weights, untrained"})
    assert json.loads((tmp_path / "pipeline.json").read_text())["models"] == {k: k for k in NETWORK_KEYS}
    loaded, settings = load_networks(tmp_path)
    assert settings["note"] == "seeded random weights, untrained" and settings["skipped_networks"] == {}
    assert set(loaded) == set(NETWORK_KEYS)
    expected, got = _outputs(nets), _outputs(loaded)
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_official_layout_loads_unchanged(tmp_path):
    nets = random_weights(SMALL_OFFICIAL, seed=2)
    _write_official(tmp_path, nets, SMALL_OFFICIAL)
    loaded, settings = load_networks(tmp_path)
    assert set(loaded) == set(NETWORK_KEYS)
    assert "slat_flow_model" in settings["skipped_networks"]
    assert settings["slat_sampler"]["params"]["steps"] == 25
    for key in NETWORK_KEYS:
        assert type(loaded[key]) is CLASS_REGISTRY[SMALL_OFFICIAL[key]["name"]]
        src, dst = nets[key].state_dict(), loaded[key].state_dict()
        for name, value in src.items():
            assert dst[name].dtype == value.dtype  # fp16 in the file, fp32 in the module
            want = value.half().float() if name.startswith("blocks.") else value
            assert torch.equal(dst[name], want), (key, name)
    # Stage 1 builds like the other networks now (lift.official loads it), from its official args.
    flow = load_manifest("near_slat_flow_model")
    stage1 = build_networks({"slat_flow_model": {"name": flow["class"], "args": flow["args"]}}, "meta")
    assert count_parameters(stage1["slat_flow_model"]) == flow["total_params"]
    # A folder without the stage-1 files still serves the renderer networks: they are never opened.
    (tmp_path / "ckpts" / "slat_flow_model.safetensors").unlink()
    (tmp_path / "ckpts" / "slat_flow_model.json").unlink()
    assert set(load_networks(tmp_path)[0]) == set(NETWORK_KEYS)


def test_bad_tensors_are_named(tmp_path):
    nets = random_weights(SMALL_OFFICIAL, seed=3)
    _write_official(tmp_path, nets, SMALL_OFFICIAL, fp16_blocks=False)
    path = tmp_path / "ckpts" / "renderer.safetensors"
    tensors = dict(nets["renderer"].state_dict())
    del tensors["ob_views_norm.weight"]
    tensors["blocks.9.cross_attn.to_q.weight"] = torch.zeros(2, 2)
    tensors["rgb_out_layer.weight"] = torch.zeros(3, 32)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    with pytest.raises(CheckpointError) as err:
        load_networks(tmp_path)
    msg = str(err.value)
    for part in ("renderer", "ob_views_norm.weight", "blocks.9.cross_attn.to_q.weight", "rgb_out_layer.weight",
                 "missing", "unexpected", "mis-shaped"):
        assert part in msg, part


def test_unknown_class_and_bad_configs_are_named(tmp_path):
    nets = random_weights(SMALL_OFFICIAL, seed=4)
    _write_official(tmp_path, nets, SMALL_OFFICIAL)
    config = tmp_path / "ckpts" / "neural_basis.json"
    config.write_text(json.dumps({"name": "os.system", "args": {}}))
    with pytest.raises(CheckpointError, match=r"neural_basis.*unknown class 'os.system'"):
        load_networks(tmp_path)
    config.write_text(json.dumps({"name": "Hdri_Encoder", "args": {}}))  # a real class in the wrong role
    with pytest.raises(CheckpointError, match="neural_basis.*ShadingMLP"):
        load_networks(tmp_path)
    config.write_text(json.dumps({"name": "NeuralBasis", "args": {"input_dim": 32, "bogus_width": 3}}))
    with pytest.raises(CheckpointError, match="neural_basis.*bogus_width"):
        load_networks(tmp_path)
    with pytest.raises(CheckpointError, match="near-huge"):
        build_networks("near-huge")


def test_missing_network_is_named(tmp_path):
    nets = random_weights("near-tiny", seed=5)
    del nets["neural_basis"]
    save_networks(tmp_path, nets, "near-tiny")
    with pytest.raises(CheckpointError, match="neural_basis"):
        load_networks(tmp_path)


def test_tiny_decodes_a_5000_voxel_object():
    """near-tiny (seeded random weights, untrained) runs IAD + LAD on a ~5,000-voxel shell; its speed is measured in
    benchmarks, not here."""
    nets = random_weights("near-tiny", seed=0)
    grid = torch.stack(torch.meshgrid(*[torch.arange(64)] * 3, indexing="ij"), -1).reshape(-1, 3)
    r = (grid.float() + 0.5 - 32).norm(dim=-1)
    shell = grid[(r > 17.5) & (r < 18.8)]  # a hollow sphere, like a surface-only structured latent
    assert 4500 < len(shell) < 6000
    slat = SparseTensor.from_list([(shell.int(), torch.randn(len(shell), nets["decoder"].latent_channels))],
                                  resolution=64)
    light = torch.randn(1, 256, 64)
    with torch.no_grad():
        h, reg = nets["decoder"](slat)
        heads = nets["renderer"](h, reg, light, torch.tensor([[2.0, 0.5, 1.0]]))
    g = nets["renderer"].num_gaussians
    assert heads["gs"].shape == (len(shell), 14 * g) and heads["rgb"].shape == (len(shell), 35 * g)
    assert all(torch.isfinite(v).all() for v in heads.values())


# ---- a weights folder is data from anywhere: every value is checked before anything is built (issue 11, item 2)

@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """near-tiny with its encoder, seeded random weights (untrained), written once; tests copy it."""
    folder = tmp_path_factory.mktemp("tiny")
    save_networks(folder, random_weights("near-tiny-train", seed=6), "near-tiny-train", settings={"light_size": 64})
    return folder


def _edited(src: Path, dst: Path, name: str, edit) -> Path:
    import shutil

    shutil.copytree(src, dst, dirs_exist_ok=True)
    data = json.loads((dst / name).read_text())
    edit(data)
    (dst / name).write_text(json.dumps(data))
    return dst


def _set_arg(key: str, value):
    def edit(data):
        data["args"][key] = value
    return edit


@pytest.mark.parametrize("value", ["big", None, True, 1e9, 4096, 64.0, -1])
def test_light_size_is_checked_naming_the_file(tiny_folder, tmp_path, value):
    from near_engine.pipeline import NearPipeline

    folder = _edited(tiny_folder, tmp_path, "pipeline.json", lambda d: d.update(light_size=value))
    with pytest.raises(CheckpointError, match=r"pipeline\.json: setting 'light_size'"):
        NearPipeline.from_pretrained(folder, device="cpu")


@pytest.mark.parametrize("name, key, value", [
    ("hdri_encoder.json", "cnn_out_channels", 3),  # was a ZeroDivisionError in a GroupNorm
    ("hdri_encoder.json", "num_transformer_layers", 10**12),  # was building layers until memory ran out
    ("hdri_encoder.json", "num_tokens", 17),
    ("hdri_encoder.json", "convnext_dims", [16, 32, "64", 128]),
    ("renderer.json", "representation_config", "bogus"),  # was an AttributeError
    ("renderer.json", "representation_config", {"num_gaussians": 10**9}),
    ("renderer.json", "representation_config", {"num_gaussians": 2, "ignored": {"but": "not a structure"}}),
    ("neural_basis.json", "num_layers", 1e12),
    ("neural_basis.json", "num_layers", 10**12),
    ("neural_basis.json", "activation", None),
    ("neural_basis.json", "use_normal", 1),
    ("decoder.json", "model_channels", 63),
    ("decoder.json", "num_heads", 0),
    ("image_features.json", "hidden_channels", 1e6),
    ("image_features.json", "hidden_channels", 10**6),
])
def test_constructor_arguments_are_checked_before_building(tiny_folder, tmp_path, name, key, value):
    folder = _edited(tiny_folder, tmp_path, name, _set_arg(key, value))
    with pytest.raises(CheckpointError) as err:
        load_networks(folder, keys=tuple(json.loads((folder / "pipeline.json").read_text())["models"]))
    assert name in str(err.value) and key in str(err.value), str(err.value)


def test_a_network_too_large_for_memory_is_refused_on_the_meta_device(tiny_folder, tmp_path):
    def huge(data):
        data["args"].update(model_channels=4096, cond_channels=4096, num_blocks=64)
    folder = _edited(tiny_folder, tmp_path, "decoder.json", huge)
    with pytest.raises(CheckpointError, match=r"decoder\.json.*parameters, more than"):
        load_networks(folder)


def test_control_characters_in_network_names_are_refused(tiny_folder, tmp_path):
    folder = _edited(tiny_folder, tmp_path, "pipeline.json", lambda d: d["models"].update(decoder="dec\0oder"))
    with pytest.raises(CheckpointError, match="control characters"):  # was "ValueError: embedded null byte"
        load_networks(folder)


def test_deeply_nested_pipeline_json_is_refused(tiny_folder, tmp_path):
    import shutil

    shutil.copytree(tiny_folder, tmp_path, dirs_exist_ok=True)
    text = (tmp_path / "pipeline.json").read_text()
    (tmp_path / "pipeline.json").write_text(text[:-1] + ', "deep": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(CheckpointError, match=r"pipeline\.json nests"):  # was a RecursionError
        load_networks(tmp_path)
    (tmp_path / "pipeline.json").write_text(text[:-1] + ', "deep": ' + "[" * 40 + "]" * 40 + "}")
    with pytest.raises(CheckpointError, match=r"more than 32 levels"):
        load_networks(tmp_path)


@pytest.mark.parametrize("dtype", [torch.bool, torch.int64, torch.uint8])
def test_weights_stored_as_bool_or_int_are_refused_not_cast(tiny_folder, tmp_path, dtype):
    import shutil

    from safetensors.torch import load_file

    shutil.copytree(tiny_folder, tmp_path, dirs_exist_ok=True)
    path = tmp_path / "neural_basis.safetensors"
    tensors = load_file(str(path))
    tensors["mlp.0.weight"] = torch.ones_like(tensors["mlp.0.weight"], dtype=dtype)
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match=r"mlp\.0\.weight \(file (bool|int64|uint8), model float32\)"):
        load_networks(tmp_path)


def test_every_registered_class_has_an_argument_table_covering_its_constructor():
    import inspect

    from near_engine.network_args import NETWORK_ARGS

    for cls in set(CLASS_REGISTRY.values()):
        accepted = {n for n in inspect.signature(cls.__init__).parameters if n != "self"}
        assert set(NETWORK_ARGS[cls]) == accepted, cls.__name__



def test_the_named_configurations_pass_their_own_checks():
    for name in ("near-official", "near-tiny", "near-tiny-train"):
        assert build_networks(name, "meta")  # every network through `network_args` and the parameter bound
