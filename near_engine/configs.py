"""Named network configurations, and building, loading and saving the whole set of NeAR networks.

A *configuration* is `{pipeline key: {"name": class name, "args": constructor arguments}}` for the four networks the
relighting stage uses:

    decoder       IAD (`models.iad.IntrinsicAwareDecoder`, official `SLatGaussianDecoder`)
    hdri_encoder  illumination tokenizer (`models.tokenizer.IlluminationTokenizer`, official `Hdri_Encoder`)
    renderer      LAD (`models.lad.LightingAwareDecoder`, official `SLatGaussianRenderer`)
    neural_basis  shading MLP (`models.shading.ShadingMLP`, official `NeuralBasis`)

Named configurations: `near-official` (the full-size shapes of the released checkpoints; `official_config(...)` exposes
the values the reference manifests could not pin down) and `near-tiny` (the same classes, small enough for interactive
CPU rendering; `tiny_config(...)`).

Class names resolve only through `CLASS_REGISTRY` (official and our names); nothing is imported, unpickled or executed
from a file. The official pipelines also list stage-1 networks (`STAGE1_KEYS`: image -> structured latent). They are
registered and build like the others, but they are large and the renderer does not need them, so `load_networks`
opens only the networks asked for (the four renderer networks by default) and records the other listed ones under
`settings["skipped_networks"]`; `lift.official.load_official_stage1` loads stage 1.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .bundled import weights_folder
from .checkpoints import load_weights, read_safetensors, read_weights_folder, save_model
from .errors import CheckpointError
from .files import write_atomically
from .models.encoder import ImageFeatures, LatentEncoder
from .models.slab import SlabNet
from .models.gaussian_heads import MATERIAL_CHANNELS
from .models.iad import IntrinsicAwareDecoder
from .models.lad import LightingAwareDecoder
from .models.shading import ShadingMLP
from .models.slat_flow import SLatFlowModel
from .models.ss_decoder import SparseStructureDecoder
from .models.ss_flow import SparseStructureFlowModel
from .models.tokenizer import IlluminationTokenizer
from .network_args import MAX_PARAMETERS, check_network_args, check_pipeline_settings

# ---------------------------------------------------------------------------------------------------------------------
# registry

#: The pipeline keys of the networks this engine builds, in the order they run.
NETWORK_KEYS: tuple[str, ...] = ("decoder", "hdri_encoder", "renderer", "neural_basis")

#: The official stage-1 networks (image -> structured latent): TRELLIS's sparse-structure flow and decoder (the
#: voxels) and the latent flow of TRELLIS or NeAR (the latent on them).
STAGE1_KEYS: tuple[str, ...] = ("sparse_structure_flow_model", "sparse_structure_decoder", "slat_flow_model")

#: Class names that may appear in a weights folder (official and ours) -> our class. The only way a name becomes code.
CLASS_REGISTRY: dict[str, type[nn.Module]] = {
    "SLatGaussianDecoder": IntrinsicAwareDecoder,
    "IntrinsicAwareDecoder": IntrinsicAwareDecoder,
    "Hdri_Encoder": IlluminationTokenizer,
    "IlluminationTokenizer": IlluminationTokenizer,
    "SLatGaussianRenderer": LightingAwareDecoder,
    "LightingAwareDecoder": LightingAwareDecoder,
    "NeuralBasis": ShadingMLP,
    "ShadingMLP": ShadingMLP,
    "ImageFeatures": ImageFeatures,
    "LatentEncoder": LatentEncoder,
    "SlabNet": SlabNet,
    # TRELLIS names its latent flow SLatFlowModel; NeAR's (and TRELLIS's training configs) ElasticSLatFlowModel, which
    # only adds training-time memory management: the same parameters, the same network.
    "SLatFlowModel": SLatFlowModel,
    "ElasticSLatFlowModel": SLatFlowModel,
    "SparseStructureFlowModel": SparseStructureFlowModel,
    "SparseStructureDecoder": SparseStructureDecoder,
}

#: The training-only networks of near-tiny (mesh views -> LH latent); rendering never loads them.
ENCODER_KEYS: tuple[str, ...] = ("image_features", "encoder")

#: The class each pipeline key must hold.
KEY_CLASSES: dict[str, type[nn.Module]] = {
    "decoder": IntrinsicAwareDecoder,
    "hdri_encoder": IlluminationTokenizer,
    "renderer": LightingAwareDecoder,
    "neural_basis": ShadingMLP,
    "image_features": ImageFeatures,
    "encoder": LatentEncoder,
    "lift_features": ImageFeatures,
    "lift_encoder": LatentEncoder,
    "occupancy": SlabNet,
    "sparse_structure_flow_model": SparseStructureFlowModel,
    "sparse_structure_decoder": SparseStructureDecoder,
    "slat_flow_model": SLatFlowModel,
}

# Official constructor arguments that have no effect on the network and that some of our classes do not accept.
# They are dropped only when they hold their inert value (None); anything else is an error.
_INERT_ARGS = ("pretrained_path", "pretrained_decoder_path")


def resolve_class(class_name: str, key: str | None = None) -> type[nn.Module]:
    """Our class for a (official or our) class name, checked against the pipeline key's role when given."""
    cls = CLASS_REGISTRY.get(class_name)
    if cls is None:
        raise CheckpointError(f"network '{key}': unknown class {class_name!r}; known classes: "
                              + ", ".join(sorted(CLASS_REGISTRY)))
    if key is not None and key in KEY_CLASSES and KEY_CLASSES[key] is not cls:
        raise CheckpointError(f"network '{key}' must be a {KEY_CLASSES[key].__name__}, but its class is {class_name}")
    return cls


# ---------------------------------------------------------------------------------------------------------------------
# named configurations

_OFFICIAL_REP_DECODER = {
    "lr": {"_xyz": 1.0, "_features_dc": 1.0, "_opacity": 1.0, "_scaling": 1.0, "_rotation": 0.1},
    "perturb_offset": True, "voxel_size": 1.5, "num_gaussians": 32, "2d_filter_kernel_size": 0.1,
    "3d_filter_kernel_size": 0.0009, "scaling_bias": 0.004, "opacity_bias": 0.1, "scaling_activation": "softplus",
}
_RENDERER_LR = {"_xyz": 1.0, "_base_color": 1.0, "_scaling": 1.0, "_rotation": 0.1, "_opacity": 1.0,
                "_roughness": 1.0, "_metallic": 1.0, "_pbr1": 1.0, "_scaling_view": 1.0, "_rgb": 1.0, "_shadow": 1.0,
                "_hdri1": 1.0, "_hdri2": 1.0}


def _renderer_rep(num_gaussians: int) -> dict[str, Any]:
    return {"lr": dict(_RENDERER_LR), "perturb_offset": True, "voxel_size": 1.5, "num_gaussians": num_gaussians,
            "2d_filter_kernel_size": 0.1, "3d_filter_kernel_size": 0.0009, "scaling_bias": 0.004,
            "opacity_bias": 0.1, "scaling_activation": "softplus"}


def official_config(*, lad_blocks: int = 12, latent_channels: int = 8, cnn_out_channels: int = 256,
                    shading_activation: str = "sine", shading_hidden_dim: int = 64, shading_num_layers: int = 3,
                    num_gaussians: int = 32, num_register_tokens: int = 16) -> dict[str, dict[str, Any]]:
    """The full-size configuration, with the official class names and args (reference/checkpoints/near_*.json).

    The defaults are the manifests' primary args. The keywords are the values the manifests mark as unknown or list
    alternatives for: LAD depth (`lad_blocks`, 4/8/12 listed), IAD `latent_channels` (8, or 16/24), tokenizer
    `cnn_out_channels` (256 or 128), shading MLP activation and width/depth, Gaussians per voxel, register tokens.
    """
    return {
        "decoder": {"name": "SLatGaussianDecoder", "args": {
            "resolution": 64, "model_channels": 768, "latent_channels": latent_channels, "cond_channels": 768,
            "num_blocks": 12, "num_register_tokens": num_register_tokens, "num_heads": 12, "mlp_ratio": 4,
            "attn_mode": "swin", "window_size": 8, "pe_mode": "ape", "use_fp16": True, "qk_rms_norm": False,
            "qk_rms_norm_cross": False, "representation_config": copy.deepcopy(_OFFICIAL_REP_DECODER)}},
        "hdri_encoder": {"name": "Hdri_Encoder", "args": {
            "output_dim": 768, "num_tokens": 4096, "cnn_out_channels": cnn_out_channels, "n_heads": 8,
            "num_transformer_layers": 2, "rope_base": 10000.0, "pretrained_path": None}},
        "renderer": {"name": "SLatGaussianRenderer", "args": {
            "resolution": 64, "model_channels": 768, "latent_channels": 768, "cond_channels": 768,
            "num_blocks": lad_blocks, "num_heads": 12, "mlp_ratio": 4, "attn_mode": "swin", "window_size": 8,
            "pe_mode": "null", "use_fp16": True, "qk_rms_norm": False, "qk_rms_norm_cross": False,
            "representation_config": _renderer_rep(num_gaussians)}},
        "neural_basis": {"name": "NeuralBasis", "args": {
            "input_dim": 32, "output_dim": 5, "hidden_dim": shading_hidden_dim, "num_layers": shading_num_layers,
            "num_frequencies": 6, "activation": shading_activation, "w0": 30.0, "dropout_rate": 0.0,
            "use_normal": True, "normal_dim": 3, "use_residual": False, "pretrained_path": None}},
    }


def _tiny_rep(num_gaussians: int) -> dict[str, Any]:
    """near-tiny's Gaussians: 4 per voxel instead of the official 32, each starting as one of its voxel's surfels
    (`surfels`: flat, on the surface, as wide as its quarter of the voxel's piece of surface), so the opacity starts
    at 0.99 (a single layer of surfels is a surface: at 0.9 a face-on plane let 7 % of the background through) and
    the scales are the surfels'. The 3D filter (minimum scale) is 0.001, a sixteenth of a voxel of the
    64^3 grid: surfels tile the surface without gaps by their own width, and a larger filter would thicken every
    surface and widen every silhouette by as much (at 0.005, before surfels, it made up for the gaps between
    Gaussians spread over whole voxels). The 2D filter is 0.2 px^2: Cycles renders with a 1-pixel box filter, and
    overlapping opaque surfels under gsplat's 0.3 drew outline pixels 0.15 too opaque on average (0.05 at 0.2, and
    0.2 scored best of 0.15-0.3 on training objects under their own lights; both with the weights before it)."""
    rep = _renderer_rep(num_gaussians)
    rep.update({"scaling_bias": 0.004, "opacity_bias": 0.99, "voxel_size": 1.0, "3d_filter_kernel_size": 0.001,
                "2d_filter_kernel_size": 0.2})
    return rep


def tiny_config(*, width: int = 64, heads: int = 2, iad_blocks: int = 2, lad_blocks: int = 2,
                num_gaussians: int = 4, num_tokens: int = 256) -> dict[str, dict[str, Any]]:
    """The small configuration: the same classes and wiring, sized for interactive CPU rendering, with the physically
    based shading core (`ibl`; `ShadingMLP(core="pbr")`).

    `width` is the IAD/LAD channel count and the light-token width; the IAD reads the 8-channel LH latent plus the
    6 channels of the material latents (`frame.MATERIAL_LATENTS`); the tokenizer has a 4-stage ConvNeXt of widths
    (16, 32, 64, 128) and depths (1, 1, 2, 1) and `num_tokens` (a square) light tokens; the LAD's geometry and
    material heads start at zero (Gaussians at their surfels, materials at the material latents), and so does its
    normal residual on the surfel normals (`normal_head`); the shading MLP
    (32 features + normal -> 2 factors and an additive term on the PBR radiance) has 32 SiLU hidden units. Its
    last layer starts at zero, so untrained, near-tiny renders as a PBR shader of its material latents.
    """
    if width % heads:
        raise ValueError(f"width {width} is not divisible by {heads} heads")
    return {
        "decoder": {"name": "IntrinsicAwareDecoder", "args": {
            "resolution": 64, "model_channels": width, "latent_channels": 8 + MATERIAL_CHANNELS,
            "cond_channels": width, "num_blocks": iad_blocks, "num_register_tokens": 4, "num_heads": heads,
            "mlp_ratio": 4, "attn_mode": "swin", "window_size": 8, "pe_mode": "ape", "qk_rms_norm": False,
            "qk_rms_norm_cross": False}},
        "hdri_encoder": {"name": "IlluminationTokenizer", "args": {
            "output_dim": width, "num_tokens": num_tokens, "cnn_out_channels": 32, "n_heads": heads,
            "num_transformer_layers": 2, "rope_base": 10000.0, "convnext_dims": [16, 32, 64, 128],
            "convnext_depths": [1, 1, 2, 1], "num_freq_bands": 8, "dim_feedforward": 2 * width}},
        "renderer": {"name": "LightingAwareDecoder", "args": {
            "resolution": 64, "model_channels": width, "latent_channels": width, "cond_channels": width,
            "num_blocks": lad_blocks, "num_heads": heads, "mlp_ratio": 4, "pe_mode": "null",
            "qk_rms_norm_cross": False, "representation_config": _tiny_rep(num_gaussians),
            "zero_init_heads": True, "normal_head": True}},
        "neural_basis": {"name": "ShadingMLP", "args": {
            "input_dim": 32, "output_dim": 5, "hidden_dim": 32, "num_layers": 3, "activation": "silu", "w0": 30.0,
            "use_normal": True, "normal_dim": 3, "use_residual": False, "core": "pbr"}},
    }


def tiny_encoder_config(*, width: int = 64, heads: int = 2, blocks: int = 2, feature_channels: int = 16,
                        resolution: int = 64) -> dict[str, dict[str, Any]]:
    """near-tiny's mesh encoder (`models.encoder`): image features and the sparse encoder to the 8-channel latent."""
    return {
        "image_features": {"name": "ImageFeatures", "args": {"out_channels": feature_channels,
                                                             "hidden_channels": 32}},
        "encoder": {"name": "LatentEncoder", "args": {
            "resolution": resolution, "in_channels": feature_channels, "model_channels": width, "latent_channels": 8,
            "num_blocks": blocks, "num_heads": heads, "mlp_ratio": 4, "window_size": 8, "num_register_tokens": 4}},
    }


def tiny_train_config() -> dict[str, dict[str, Any]]:
    """near-tiny with its encoder: the six networks `near train` optimizes together."""
    return {**tiny_config(), **tiny_encoder_config()}


CONFIGS = {"near-official": official_config, "near-tiny": tiny_config, "near-tiny-train": tiny_train_config}


def get_config(name_or_dict: str | Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """A configuration by name (`near-official`, `near-tiny`), or a given one (also `{"models": {...}}`), copied."""
    if isinstance(name_or_dict, str):
        if name_or_dict not in CONFIGS:
            raise CheckpointError(f"unknown configuration {name_or_dict!r}; known: {', '.join(CONFIGS)}")
        return CONFIGS[name_or_dict]()
    config = name_or_dict.get("models", name_or_dict) if isinstance(name_or_dict, Mapping) else None
    if not isinstance(config, Mapping) or not all(
            isinstance(v, Mapping) and isinstance(v.get("name"), str) and isinstance(v.get("args", {}), Mapping)
            for v in config.values()):
        raise CheckpointError("a configuration must map pipeline keys to {\"name\": class name, \"args\": {...}}")
    return {k: {"name": v["name"], "args": copy.deepcopy(dict(v.get("args", {})))} for k, v in config.items()}


# ---------------------------------------------------------------------------------------------------------------------
# building


def build_network(key: str, class_name: str, args: Mapping[str, Any], device: str | torch.device = "cpu", *,
                  source: str | None = None) -> nn.Module:
    """One network from its class name and constructor args, in eval mode, on `device` ("meta": shapes only).

    The args are checked against the class's table in `network_args` (types, ranges, consistency) before anything
    is built, and the network's size is checked on the meta device against `MAX_PARAMETERS` before any memory is
    allocated. Messages name `source` (the file the args came from) and the key. Official no-op arguments left at
    None are dropped.
    """
    where = f"{source or 'configuration'}: network '{key}' ({class_name})"
    cls = resolve_class(class_name, key)
    params = inspect.signature(cls.__init__).parameters
    kwargs = dict(args)
    for name in _INERT_ARGS:
        if name in kwargs and name not in params:
            if kwargs[name] is not None:
                raise CheckpointError(f"{where}: {name}={kwargs[name]!r} is not supported (weights are loaded from "
                                      "the folder, never from a path inside a config)")
            del kwargs[name]
    check_network_args(cls, kwargs, where)
    try:
        with torch.device("meta"):
            size = count_parameters(cls(**kwargs))
        if size > MAX_PARAMETERS:
            raise CheckpointError(f"{where}: these arguments make {size:,} parameters, more than the "
                                  f"{MAX_PARAMETERS:,} (8 GiB as float32) a network may have")
        with torch.device(device):
            module = cls(**kwargs)
    except (TypeError, ValueError, ArithmeticError) as exc:
        raise CheckpointError(f"{where} cannot be built from its args: {exc}") from None
    return module.eval()


def build_networks(config: str | Mapping[str, Any], device: str | torch.device = "cpu",
                   keys: tuple[str, ...] | None = None) -> dict[str, nn.Module]:
    """{key: freshly initialised network} for a named or given configuration (`keys`: a subset, default all).

    The weights are the constructors' initialisation (untrained): load real ones with `load_networks`.
    """
    cfg = get_config(config)
    keys = tuple(cfg) if keys is None else keys
    missing = [k for k in keys if k not in cfg]
    if missing:
        raise CheckpointError(f"the configuration has no network {', '.join(repr(k) for k in missing)}")
    return {k: build_network(k, cfg[k]["name"], cfg[k]["args"], device) for k in keys}


def random_weights(config: str | Mapping[str, Any], seed: int = 0, scale: float = 0.05) -> dict[str, nn.Module]:
    """FOR TESTS ONLY: networks with seeded, UNTRAINED random weights. They are not a model and render noise.

    The constructors' initialisation under `torch.manual_seed(seed)`, then every trainable parameter is nudged by
    `scale * N(0, 1)` so that zero biases and unit norm weights are exercised too. Deterministic for a given seed.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        networks = build_networks(config, "cpu")
        with torch.no_grad():
            for key in sorted(networks):
                for _, p in sorted(networks[key].named_parameters()):
                    if p.requires_grad:
                        p.add_(scale * torch.randn_like(p))
    return networks


def count_parameters(module: nn.Module) -> int:
    """Unique parameters (a parameter shared under several names counts once)."""
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------------------------------
# loading and saving


def load_networks(folder: str | os.PathLike, device: str | torch.device = "cpu",
                  keys: tuple[str, ...] = NETWORK_KEYS) -> tuple[dict[str, nn.Module], dict[str, Any]]:
    """(networks, pipeline settings) from our folder format or, unchanged, the official NeAR layout; `folder` may
    also name a bundled model ("near-tiny").

    Every network in `keys` must be in the folder; it is built from its entry's class and args and its weights are
    loaded strictly (every missing, unexpected or mis-shaped tensor is named). Stage-1 networks listed but not in
    `keys` are not opened; `settings["skipped_networks"]` says which and why. Other unknown keys are an error.
    """
    folder = weights_folder(folder)
    settings, entries = read_weights_folder(folder, keys)
    settings = dict(settings) if isinstance(settings, dict) else {}
    check_pipeline_settings(settings, str(folder / ("pipeline.json" if (folder / "pipeline.json").is_file()
                                                    else "pipeline.yaml")))
    listed = list(settings.get("models", {}))
    unknown = [k for k in listed if k not in KEY_CLASSES]
    if unknown:
        raise CheckpointError(f"{folder}: unknown network key(s) {', '.join(unknown)}; the keys NeAR uses are "
                              f"{', '.join(NETWORK_KEYS + STAGE1_KEYS)}")
    absent = [k for k in keys if k not in entries]
    if absent:
        raise CheckpointError(f"{folder} lacks the network(s) {', '.join(absent)} (it has {', '.join(listed)})")
    why = "stage 1 (image -> structured latent), not needed to render: lift.official.load_official_stage1 loads it"
    skipped = {k: why for k in listed if k in STAGE1_KEYS and k not in keys}
    networks: dict[str, nn.Module] = {}
    for key, entry in entries.items():
        module = build_network(key, entry.class_name, entry.args, "cpu",
                               source=str(entry.weights.with_suffix(".json")))
        load_weights(module, read_safetensors(entry.weights), f"network '{key}' ({entry.weights})")
        networks[key] = module.to(device)
    settings["skipped_networks"] = skipped
    return networks, settings


def save_networks(folder: str | os.PathLike, networks: Mapping[str, nn.Module], config: str | Mapping[str, Any],
                  settings: Mapping[str, Any] | None = None) -> None:
    """Write our format: `pipeline.json` ({"models": {key: key}, **settings}) and `<key>.json` + `<key>.safetensors`.

    `config` (name or dict) supplies each network's constructor args; the class written is the module's own.
    """
    cfg = get_config(config)
    folder = Path(folder)
    for key, module in networks.items():
        if key not in cfg:
            raise CheckpointError(f"no configuration for network '{key}'")
        cls = resolve_class(cfg[key]["name"], key)
        if not isinstance(module, cls):
            raise CheckpointError(f"network '{key}' is a {type(module).__name__}, its configuration says "
                                  f"{cfg[key]['name']}")
        args = json.loads(json.dumps(cfg[key]["args"]))  # plain JSON values (tuples -> lists); fails loudly otherwise
        save_model(folder, key, module, args)
    extra = {k: v for k, v in (settings or {}).items() if k not in ("models", "skipped_networks")}
    text = json.dumps({"models": {k: k for k in networks}, **extra}, indent=1).encode()
    write_atomically(folder / "pipeline.json", lambda tmp: Path(tmp).write_bytes(text), CheckpointError)
