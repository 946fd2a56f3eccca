"""What each network class accepts as constructor arguments, checked before anything is built.

A weights folder is data from anywhere: its `<name>.json` args and `pipeline.json` settings reach constructors and
allocations. One table (`NETWORK_ARGS`) gives every argument of every class its accepted type and range, and a few
rules (`NETWORK_RULES`) cover what one argument alone cannot say (channels divisible by heads, group norms that
need channel multiples). `check_network_args` applies both and names the file and the key of the first bad value.

The ranges bound each argument; `MAX_PARAMETERS` (checked by `configs.build_network` on the meta device) bounds the
product of them, so a validated folder cannot ask for more than 8 GiB of float32 weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from torch import nn

from .errors import CheckpointError
from .frame import INPUTS
from .models.encoder import ImageFeatures, LatentEncoder
from .models.iad import IntrinsicAwareDecoder
from .models.lad import LightingAwareDecoder
from .models.shading import ShadingMLP
from .models.slab import SlabNet
from .models.slat_flow import SLatFlowModel
from .models.ss_decoder import SparseStructureDecoder
from .models.ss_flow import SparseStructureFlowModel
from .models.tokenizer import IlluminationTokenizer

#: The most parameters one network may have: 2**31 (8 GiB as float32). The official full-size set is far below.
MAX_PARAMETERS = 2**31


class _Bad(Exception):
    """A value that does not fit its spec; carries the phrase that completes "key ...: "."""


def _kind(value: Any) -> str:
    return "null" if value is None else {bool: "true/false", str: "text", dict: "a table",
                                         list: "a list"}.get(type(value), type(value).__name__)


@dataclass(frozen=True)
class Int:
    """A whole number (not true/false, not 1e3) in [lo, hi], a multiple of `multiple_of`."""

    lo: int
    hi: int
    multiple_of: int = 1

    def check(self, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Bad(f"must be a whole number, got {value!r} ({_kind(value)})")
        if not self.lo <= value <= self.hi:
            raise _Bad(f"must be between {self.lo} and {self.hi}, got {value}")
        if value % self.multiple_of:
            raise _Bad(f"must be a multiple of {self.multiple_of}, got {value}")


@dataclass(frozen=True)
class Real:
    """A finite number in [lo, hi] (or (lo, hi] with `open_lo`, [lo, hi) with `open_hi`)."""

    lo: float
    hi: float
    open_lo: bool = False
    open_hi: bool = False

    def check(self, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise _Bad(f"must be a finite number, got {value!r} ({_kind(value)})")
        if (value < self.lo or value > self.hi or (self.open_lo and value == self.lo)
                or (self.open_hi and value == self.hi)):
            raise _Bad(f"must be in {'(' if self.open_lo else '['}{self.lo}, {self.hi}{')' if self.open_hi else ']'},"
                       f" got {value}")


@dataclass(frozen=True)
class Flag:
    """true or false (not 0/1, not "yes")."""

    def check(self, value: Any) -> None:
        if not isinstance(value, bool):
            raise _Bad(f"must be true or false, got {value!r} ({_kind(value)})")


@dataclass(frozen=True)
class OneOf:
    """One of a few values (texts, or null)."""

    values: tuple[Any, ...]

    def check(self, value: Any) -> None:
        if not any(value is v or (type(value) is type(v) and value == v) for v in self.values):
            raise _Bad(f"must be one of {', '.join(map(_json, self.values))}, got {value!r}")


@dataclass(frozen=True)
class IntList:
    """A list of `length` (up to `max_length`, when given) whole numbers, each fitting `item`."""

    length: int
    item: Int
    max_length: int | None = None

    def check(self, value: Any) -> None:
        longest = self.max_length or self.length
        if not isinstance(value, list) or not self.length <= len(value) <= longest:
            count = str(self.length) if longest == self.length else f"{self.length} to {longest}"
            raise _Bad(f"must be a list of {count} whole numbers, got {value!r}")
        for i, v in enumerate(value):
            try:
                self.item.check(v)
            except _Bad as exc:
                raise _Bad(f"item {i} {exc}") from None


@dataclass(frozen=True)
class Nullable:
    """null, or a value fitting `spec`."""

    spec: Any

    def check(self, value: Any) -> None:
        if value is not None:
            self.spec.check(value)


@dataclass(frozen=True)
class Scalar:
    """Any text, finite number, true/false or null (an entry a class ignores: kept harmless, never a structure)."""

    def check(self, value: Any) -> None:
        if isinstance(value, (dict, list)) or (isinstance(value, float) and not math.isfinite(value)):
            raise _Bad(f"must be a plain value, got {_kind(value)}")


@dataclass(frozen=True)
class Table:
    """A JSON object whose known keys fit their specs; other keys are refused unless `others` gives their spec."""

    fields: Mapping[str, Any]
    others: Any = None

    def check(self, value: Any) -> None:
        if not isinstance(value, dict):
            raise _Bad(f"must be a table {{...}}, got {value!r} ({_kind(value)})")
        for key, item in value.items():
            spec = self.fields.get(key, self.others)
            if spec is None:
                raise _Bad(f"has an unknown entry {key!r} (known: {', '.join(self.fields)})")
            try:
                spec.check(item)
            except _Bad as exc:
                raise _Bad(f"entry {key!r} {exc}") from None


def _json(value: Any) -> str:
    return "null" if value is None else repr(value)


NOTHING = OneOf((None,))  # official arguments that must stay null (paths to load weights from)
CHANNELS = Int(8, 4096, multiple_of=8)
BLOCKS = Int(0, 64)
HEADS = Int(1, 64)
RESOLUTION = Int(1, 1024)  # the largest `.near` grid (`asset.MAX_RESOLUTION`)
RATIO = Real(0.25, 16)
FRACTION = Real(0, 1, open_hi=True)

#: An official `representation_config` (TRELLIS's Gaussian decoder keys; `gaussian_heads.RepresentationConfig`).
REPRESENTATION = Table({
    "lr": Table({}, others=Real(0, 1e3)),
    "perturb_offset": Flag(),
    "voxel_size": Real(0, 16, open_lo=True),
    "num_gaussians": Int(1, 64),
    "2d_filter_kernel_size": Real(0, 16),
    "3d_filter_kernel_size": Real(0, 16),
    "scaling_bias": Real(0, 16, open_lo=True),
    "opacity_bias": Real(0, 1, open_lo=True, open_hi=True),
    "scaling_activation": OneOf(("softplus", "exp")),
}, others=Scalar())  # TRELLIS keys the renderer ignores may appear in the official files

_SLAT_TRANSFORMER = {
    "resolution": RESOLUTION, "model_channels": CHANNELS, "latent_channels": Int(1, 4096),
    "cond_channels": CHANNELS, "num_blocks": BLOCKS, "num_register_tokens": Int(1, 256),
    "pretrained_decoder_path": NOTHING, "num_heads": Nullable(HEADS), "num_head_channels": Nullable(Int(8, 4096)),
    "mlp_ratio": RATIO, "attn_mode": OneOf(("swin", "full")), "window_size": Int(1, 1024),
    "pe_mode": OneOf(("ape", "null")), "use_fp16": Flag(), "use_checkpoint": Flag(), "qk_rms_norm": Flag(),
    "qk_rms_norm_cross": Flag(), "representation_config": Nullable(REPRESENTATION),
}

# The arguments both TRELLIS flow transformers take (the released values are the only modes built: APE, no shared
# modulation, patch size 1 for the structure flow).
_FLOW_TRANSFORMER = {
    "resolution": RESOLUTION, "in_channels": Int(1, 4096), "model_channels": CHANNELS, "cond_channels": CHANNELS,
    "out_channels": Int(1, 4096), "num_blocks": BLOCKS, "num_heads": Nullable(HEADS),
    "num_head_channels": Nullable(Int(8, 4096)), "mlp_ratio": RATIO, "pe_mode": OneOf(("ape",)), "use_fp16": Flag(),
    "use_checkpoint": Flag(), "share_mod": OneOf((False,)), "qk_rms_norm": Flag(), "qk_rms_norm_cross": Flag(),
}

#: class -> {constructor argument: spec}. Every argument a constructor takes is listed; anything else is refused.
NETWORK_ARGS: dict[type[nn.Module], dict[str, Any]] = {
    IntrinsicAwareDecoder: _SLAT_TRANSFORMER,
    LightingAwareDecoder: {**_SLAT_TRANSFORMER, "latent_channels": CHANNELS, "zero_init_heads": Flag(),
                           "normal_head": Flag()},
    IlluminationTokenizer: {
        "output_dim": CHANNELS, "num_tokens": Int(1, 4096), "cnn_out_channels": CHANNELS, "n_heads": HEADS,
        "num_transformer_layers": Int(1, 64), "rope_base": Real(1, 1e9),
        "convnext_dims": IntList(4, CHANNELS), "convnext_depths": IntList(4, Int(0, 64)),
        "num_freq_bands": Int(0, 32), "dim_feedforward": Nullable(Int(1, 32768)), "dropout": FRACTION,
        "stochastic_depth_prob": FRACTION, "layer_scale": Real(0, 1e3)},
    ShadingMLP: {
        "input_dim": Int(1, 4096), "output_dim": Int(3, 64), "hidden_dim": Int(1, 4096), "num_layers": Int(2, 64),
        "num_frequencies": Int(0, 64), "activation": OneOf(("sine", "relu", "silu", "gelu")),
        "w0": Real(0, 1e4, open_lo=True), "dropout_rate": FRACTION, "use_normal": Flag(), "normal_dim": Int(1, 16),
        "use_residual": Flag(), "pretrained_path": NOTHING, "core": OneOf(("none", "pbr"))},
    ImageFeatures: {"out_channels": Int(5, 1024), "hidden_channels": Int(1, 1024)},
    LatentEncoder: {
        "resolution": RESOLUTION, "in_channels": Int(1, 4096), "model_channels": CHANNELS,
        "latent_channels": Int(1, 4096), "num_blocks": BLOCKS, "num_heads": HEADS, "mlp_ratio": RATIO,
        "window_size": Int(1, 1024), "num_register_tokens": Int(1, 256)},
    SlabNet: {"width": Int(1, 1024)},
    SLatFlowModel: {
        **_FLOW_TRANSFORMER, "patch_size": OneOf((1, 2, 4, 8, 16)), "num_io_res_blocks": Int(1, 8),
        "io_block_channels": Nullable(IntList(1, CHANNELS, max_length=4)), "use_skip_connection": OneOf((True,))},
    # The structure flow's resolution bounds its dense token grid (R^3 tokens; the released one is 16).
    SparseStructureFlowModel: {**_FLOW_TRANSFORMER, "resolution": Int(1, 64), "patch_size": OneOf((1,))},
    SparseStructureDecoder: {
        "out_channels": Int(1, 64), "latent_channels": Int(1, 4096), "num_res_blocks": Int(0, 16),
        "channels": IntList(1, CHANNELS, max_length=6), "num_res_blocks_middle": Int(0, 16),
        "norm_type": OneOf(("layer",)), "use_fp16": Flag()},
}


def _heads_divide(channels: str, heads: str) -> Callable[[Mapping[str, Any]], str | None]:
    def rule(args: Mapping[str, Any]) -> str | None:
        c, h = args.get(channels), args.get(heads)
        if isinstance(c, int) and isinstance(h, int) and c % h:
            return f"{channels} ({c}) must be divisible by {heads} ({h})"
        return None
    return rule


def _slat_heads(args: Mapping[str, Any]) -> str | None:
    """num_heads, or model_channels // num_head_channels heads, must split model_channels evenly."""
    channels = args.get("model_channels", 768)
    heads = args.get("num_heads") or channels // (args.get("num_head_channels") or 64)
    if heads < 1 or channels % heads:
        return f"model_channels ({channels}) cannot be split into {heads} attention heads (num_heads/num_head_channels)"
    return None


def _flow_heads(args: Mapping[str, Any]) -> str | None:
    """The flows' num_heads, or model_channels // num_head_channels (default 64) heads, must split model_channels."""
    channels = args.get("model_channels", 1024)
    heads = args.get("num_heads") or channels // (args.get("num_head_channels") or 64)
    if heads < 1 or channels % heads:
        return f"model_channels ({channels}) cannot be split into {heads} attention heads (num_heads/num_head_channels)"
    return None


def _io_stages(args: Mapping[str, Any]) -> str | None:
    """Each down/up stage of the latent flow halves the grid: patch_size = 2 ** stages, dividing the resolution."""
    stages, patch = args.get("io_block_channels"), args.get("patch_size", 2)
    if stages and 2 ** len(stages) != patch:
        return f"patch_size ({patch}) must be 2 ** len(io_block_channels) ({2 ** len(stages)})"
    if args.get("resolution", 64) % patch:
        return f"resolution ({args.get('resolution', 64)}) must be a multiple of patch_size ({patch})"
    return None


def _rope_head_dim(args: Mapping[str, Any]) -> str | None:
    dim, heads = args.get("output_dim", 768), args.get("n_heads", 8)
    if dim % heads or (dim // heads) % 2:
        return f"output_dim ({dim}) must split into n_heads ({heads}) heads of an even width (rotary embedding)"
    return None


def _fusion_group_norms(args: Mapping[str, Any]) -> str | None:
    """The direction-guided fusion's hidden width max(16, dim / 8) must be a multiple of 4 for its group norm."""
    for dim in args.get("convnext_dims", [96, 192, 384, 768])[1:]:
        if max(16, dim // 8) % 4:
            return f"convnext_dims: {dim} does not fit the fusion's group norm (use a multiple of 32 from 128 up)"
    return None


def _square_tokens(args: Mapping[str, Any]) -> str | None:
    n = args.get("num_tokens", 4096)
    return None if math.isqrt(n) ** 2 == n else f"num_tokens ({n}) must be a perfect square (a token grid)"


NETWORK_RULES: dict[type[nn.Module], tuple[Callable[[Mapping[str, Any]], str | None], ...]] = {
    IntrinsicAwareDecoder: (_slat_heads,),
    LightingAwareDecoder: (_slat_heads,),
    IlluminationTokenizer: (_rope_head_dim, _fusion_group_norms, _square_tokens),
    LatentEncoder: (_heads_divide("model_channels", "num_heads"),),
    SLatFlowModel: (_flow_heads, _io_stages),
    SparseStructureFlowModel: (_flow_heads,),
}

#: `pipeline.json` settings the engine reads: `light_size` sizes the tokenizer's input planes (memory grows with its
#: square: 1024 is 2x the official 512), `inputs` is what the decoder reads (`frame.INPUTS`).
PIPELINE_SETTINGS = {"light_size": Int(16, 1024), "inputs": OneOf(INPUTS)}


def check_network_args(cls: type[nn.Module], args: Mapping[str, Any], where: str) -> None:
    """Refuse constructor `args` for `cls` that are unknown, of the wrong type, out of range or inconsistent.

    `where` names the file or network for the message ("decoder.json", "network 'decoder'").
    """
    schema = NETWORK_ARGS.get(cls)
    if schema is None:  # pragma: no cover - every registered class has a schema (tested)
        raise CheckpointError(f"{where}: no argument table for class {cls.__name__}")
    for key, value in args.items():
        if key not in schema:
            raise CheckpointError(f"{where}: unknown constructor argument {key!r} for {cls.__name__}")
        try:
            schema[key].check(value)
        except _Bad as exc:
            raise CheckpointError(f"{where}: argument {key!r} {exc}") from None
    for rule in NETWORK_RULES.get(cls, ()):
        problem = rule(args)
        if problem:
            raise CheckpointError(f"{where}: {problem}")


def check_pipeline_settings(settings: Mapping[str, Any], where: str) -> None:
    """Refuse `pipeline.json` settings the engine reads (`PIPELINE_SETTINGS`) when they are of the wrong type or
    range; other settings (training records) are kept as data and never reach a constructor."""
    for key, spec in PIPELINE_SETTINGS.items():
        if key in settings:
            try:
                spec.check(settings[key])
            except _Bad as exc:
                raise CheckpointError(f"{where}: setting {key!r} {exc}") from None

