"""Weights on disk: strict loading with every mismatch named, our folder format, the official NeAR layout."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from near_engine.checkpoints import load_weights, read_safetensors, read_weights_folder, save_model
from near_engine.errors import CheckpointError


class Tiny(torch.nn.Module):
    def __init__(self, width: int = 4, shared: bool = True):
        super().__init__()
        self.input_layer = torch.nn.Linear(3, width)
        layer = torch.nn.Linear(width, width)
        # Like the official tokenizer: one layer object registered under several names.
        self.layers = torch.nn.ModuleList([layer, layer] if shared else [layer])
        self.register_buffer("offset", torch.arange(3.0))


def test_round_trip_in_our_format(tmp_path):
    torch.manual_seed(0)
    model = Tiny()
    save_model(tmp_path, "tiny", model, {"width": 4})
    (tmp_path / "pipeline.json").write_text(json.dumps({"models": {"decoder": "tiny"}}))
    _, entries = read_weights_folder(tmp_path)
    entry = entries["decoder"]
    assert entry.class_name == "Tiny" and entry.args == {"width": 4}
    fresh = Tiny()
    load_weights(fresh, read_safetensors(entry.weights), "tiny")
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    assert fresh.layers[0].weight is fresh.layers[1].weight  # still one shared layer


def test_official_layout_with_mixed_precision(tmp_path):
    # pipeline.yaml naming <model>.json + <model>.safetensors, block weights stored as fp16 as the official files are.
    torch.manual_seed(1)
    model = Tiny()
    tensors = {k: (v.half() if k.startswith("layers.") else v).clone() for k, v in model.state_dict().items()}
    (tmp_path / "ckpts").mkdir()
    save_file(tensors, str(tmp_path / "ckpts" / "decoder.safetensors"))
    (tmp_path / "ckpts" / "decoder.json").write_text(json.dumps({"name": "Tiny", "args": {"width": 4}}))
    (tmp_path / "pipeline.yaml").write_text("name: NeARImageToRelightable3DPipeline\nargs:\n  models:\n"
                                            "    decoder: ckpts/decoder\n  slat_sampler:\n    name: FlowEuler\n")
    pipeline, entries = read_weights_folder(tmp_path)
    assert pipeline["slat_sampler"]["name"] == "FlowEuler"
    fresh = Tiny()
    load_weights(fresh, read_safetensors(entries["decoder"].weights), "decoder")
    assert fresh.layers[0].weight.dtype == torch.float32
    torch.testing.assert_close(fresh.layers[0].weight, model.layers[0].weight.half().float())
    torch.testing.assert_close(fresh.input_layer.weight, model.input_layer.weight)


def test_every_mismatch_is_named():
    tensors = dict(Tiny(width=4).state_dict())
    del tensors["input_layer.bias"]
    tensors["extra.weight"] = torch.zeros(2)
    tensors["layers.0.weight"] = torch.zeros(5, 5)
    with pytest.raises(CheckpointError) as info:
        load_weights(Tiny(width=4), tensors, "decoder.safetensors")
    message = str(info.value)
    assert "1 missing: input_layer.bias" in message
    assert "1 unexpected: extra.weight" in message
    assert "layers.0.weight (file [5, 5], model [4, 4])" in message


def test_bad_folders_and_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_weights_folder(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="neither pipeline.json nor pipeline.yaml"):
        read_weights_folder(tmp_path)
    (tmp_path / "pipeline.yaml").write_text("args:\n  models:\n    decoder: ../../etc/passwd\n")
    with pytest.raises(CheckpointError, match="outside the weights folder"):
        read_weights_folder(tmp_path)
    (tmp_path / "pipeline.yaml").write_text("!!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(CheckpointError, match="not readable YAML"):
        read_weights_folder(tmp_path)
    (tmp_path / "pipeline.yaml").write_text("args:\n  models:\n    decoder: decoder\n")
    with pytest.raises(CheckpointError, match="decoder.json is missing"):
        read_weights_folder(tmp_path)
    (tmp_path / "decoder.json").write_text(json.dumps({"name": "Tiny", "args": {}}))
    with pytest.raises(CheckpointError, match="decoder.safetensors is missing"):
        read_weights_folder(tmp_path)
    (tmp_path / "decoder.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    _, entries = read_weights_folder(tmp_path)
    with pytest.raises(CheckpointError, match="damaged"):
        read_safetensors(entries["decoder"].weights)


def test_a_yaml_listing_with_a_non_text_key_is_refused(tmp_path):
    (tmp_path / "pipeline.yaml").write_text("args:\n  models:\n    1: ckpts/decoder\n")
    with pytest.raises(CheckpointError, match="must list its networks"):
        read_weights_folder(tmp_path)


def test_a_folder_given_as_a_weights_file_is_named_a_folder(tmp_path):
    with pytest.raises(CheckpointError, match="is a folder, not a safetensors file"):
        read_safetensors(tmp_path)


def test_a_file_given_as_a_weights_folder_is_named_a_file(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="is a file; a weights folder holds pipeline.json"):
        read_weights_folder(tmp_path / "model.safetensors")
