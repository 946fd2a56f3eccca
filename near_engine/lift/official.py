"""The official stage 1, photo -> structured latent, on a user's TRELLIS-image-large or NeAR weights.

The stages of TRELLIS's `TrellisImageTo3DPipeline` (`trellis/pipelines/trellis_image_to_3d.py`, commit 6b0d647) and
NeAR's `NeARImageToRelightable3DPipeline.sample_slat` (same code, commit 163c214):

1. `encode_photo`: the prepared photo (`lift.image.prepare_photo(path, 518)`, premultiplied linear RGBA) -> the sRGB
   colour matted on black that TRELLIS's `preprocess_image` makes (straight colour sRGB-encoded, then multiplied by
   alpha) -> DINOv2 condition tokens [1, 1374, 1024]. The negative (unconditional) condition is all zeros.
2. `sample_structure`: noise [1, 8, 16^3] -> Euler sampler on the sparse-structure flow -> decoder -> the voxels of
   the 64^3 grid whose occupancy logit is > 0.
3. `sample_latent`: noise [N, 8] on given voxels -> Euler sampler on the latent flow -> de-normalised with
   `slat_normalization` -> the latent [N, 8] the decoders read. NeAR's latent flow gives the illumination-homogenized
   LH-SLAT; TRELLIS's gives its shaded SLAT.

The flows are fed 1000 t. Noise is drawn on the CPU from a seeded `torch.Generator`, so a seed gives the same noise on
every device. Both samplers report `progress(done, total)` and stop with `lift.LiftCancelled` when `cancel()` says
so, checked before the first step and between steps.

Weights come only from the user's disk, never from a network: the folder's pipeline file (`pipeline.json` with
`args.models` -> `ckpts/<name>.json` + `.safetensors` for TRELLIS-image-large; `pipeline.yaml` for NeAR) and the
DINOv2 weights (`dinov2_vitl14_reg4_pretrain.pth` as torch.hub stores it, or a `.safetensors` of the same state
dict), found in the folder or given by path. NeAR's folder has no sparse-structure networks (NeAR takes its voxels
from a mesh); a TRELLIS-image-large folder given as `structure_folder` supplies them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, cast

import numpy as np
import torch

from ..checkpoints import ModelEntry, load_weights, read_safetensors, read_weights, read_weights_folder
from ..configs import build_network
from ..errors import CheckpointError, NearError
from . import LiftCancelled
from ..images import linear_to_srgb
from ..models.dinov2 import DINOV2_VITL14_REG, DinoV2
from ..models.slat_flow import SLatFlowModel
from ..models.ss_decoder import SparseStructureDecoder
from ..models.ss_flow import SparseStructureFlowModel
from ..sparse import SparseTensor
from .image import ImageError, PreparedPhoto
from .sampler import LatentNormalization, SamplerSettings, sample_flow

__all__ = [
    "DINOV2_FILES",
    "OfficialStage1",
    "encode_photo",
    "has_latent_flow",
    "load_dinov2",
    "load_official_stage1",
    "photo_to_dinov2_input",
    "sample_latent",
    "sample_structure",
]

#: The image encoder TRELLIS and NeAR name (`image_cond_model`), the only one built here.
DINOV2_NAME = "dinov2_vitl14_reg"
#: Where a folder's DINOv2 weights are looked for (in the folder and its `ckpts/`), first match wins.
DINOV2_FILES = ("dinov2_vitl14_reg4_pretrain.pth", "dinov2_vitl14_reg4_pretrain.safetensors",
                "dinov2_vitl14_reg.safetensors", "dinov2_vitl14_reg.pth")
_STRUCTURE_KEYS = ("sparse_structure_flow_model", "sparse_structure_decoder")
_LATENT_KEY = "slat_flow_model"

Progress = Callable[[int, int], object]
Cancel = Callable[[], bool]


@dataclass
class OfficialStage1:
    """The loaded stage-1 networks and settings. The structure fields are None when no folder had them."""

    image_encoder: DinoV2
    latent_flow: SLatFlowModel
    latent_sampler: SamplerSettings
    normalization: LatentNormalization
    structure_flow: SparseStructureFlowModel | None
    structure_decoder: SparseStructureDecoder | None
    structure_sampler: SamplerSettings | None
    device: torch.device


# -- loading -------------------------------------------------------------------------------------------------------


def load_dinov2(path: str | os.PathLike, args: Mapping[str, Any] | None = None) -> DinoV2:
    """DINOv2 (default `dinov2_vitl14_reg`; `args` for another size) with the weights of the `.pth`/`.safetensors` at
    `path`, loaded strictly: a missing, damaged or mismatched file is a CheckpointError that names it."""
    tensors = read_weights(path)
    model = DinoV2(**(args or DINOV2_VITL14_REG)).eval()
    try:
        load_weights(model, tensors, f"DINOv2 weights {path}")
    except CheckpointError as exc:
        raise CheckpointError(f"{exc} (expected the {DINOV2_NAME} state dict of facebookresearch/dinov2, e.g. "
                              f"dinov2_vitl14_reg4_pretrain.pth)") from None
    return model


def load_official_stage1(
    folder: str | os.PathLike,
    *,
    dinov2: str | os.PathLike | None = None,
    structure_folder: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    dinov2_args: Mapping[str, Any] | None = None,
) -> OfficialStage1:
    """The stage-1 networks of a TRELLIS-image-large or NeAR weights folder, on `device`.

    `folder` gives the latent flow (`slat_flow_model`), its sampler (`slat_sampler`) and `slat_normalization`, and,
    for TRELLIS, the sparse-structure flow and decoder with `sparse_structure_sampler`; `structure_folder` (a
    TRELLIS-image-large folder) supplies them instead (NeAR's folder has none). `dinov2` is the DINOv2 weights file;
    when None it is looked for (`DINOV2_FILES`) in the folders. `dinov2_args` builds another DINOv2 size (tests).
    Every problem (missing file, damaged or mis-shaped weights, networks that do not fit together) is a
    CheckpointError naming the file.
    """
    folder = Path(folder)
    settings, entries = _read(folder)
    where = _pipeline_file(folder)
    if _LATENT_KEY not in entries:
        raise CheckpointError(f"{where} lists no {_LATENT_KEY} (stage 1's latent flow); its networks: "
                              f"{', '.join(settings.get('models', {}))}")
    s_folder, s_settings, s_entries = folder, settings, entries
    if structure_folder is not None:
        s_folder = Path(structure_folder)
        s_settings, s_entries = _read(s_folder)
        if not any(k in s_entries for k in _STRUCTURE_KEYS):
            raise CheckpointError(f"{_pipeline_file(s_folder)} lists no sparse-structure networks "
                                  f"({', '.join(_STRUCTURE_KEYS)}); give a TRELLIS-image-large folder")
    present = [k for k in _STRUCTURE_KEYS if k in s_entries]
    if len(present) == 1:
        raise CheckpointError(f"{_pipeline_file(s_folder)} lists {present[0]} without "
                              f"{[k for k in _STRUCTURE_KEYS if k not in present][0]}; the structure needs both")
    cond_model = settings.get("image_cond_model", DINOV2_NAME)
    name = cond_model.get("name") if isinstance(cond_model, Mapping) else cond_model
    if name != DINOV2_NAME:
        raise CheckpointError(f"{where}: image_cond_model is {name!r}; only {DINOV2_NAME} is supported")

    flow = cast(SLatFlowModel, _load_network(entries[_LATENT_KEY]))  # the key's class (configs.KEY_CLASSES)
    if flow.in_channels != flow.out_channels:
        raise CheckpointError(f"{entries[_LATENT_KEY].weights}: the latent flow maps {flow.in_channels} channels to "
                              f"{flow.out_channels}; a flow's velocity must have its input's channels")
    latent_sampler = SamplerSettings.from_official(settings.get("slat_sampler"), f"{where}: slat_sampler")
    normalization = LatentNormalization.from_official(settings.get("slat_normalization"), flow.out_channels,
                                                      f"{where}: slat_normalization")
    encoder = load_dinov2(_dinov2_file(dinov2, [folder, s_folder]), dinov2_args)
    if flow.cond_channels != encoder.embed_dim:
        raise CheckpointError(f"{entries[_LATENT_KEY].weights}: the latent flow reads {flow.cond_channels}-channel "
                              f"image tokens, the DINOv2 weights make {encoder.embed_dim}")
    structure_flow = structure_decoder = structure_sampler = None
    if present:
        structure_flow = cast(SparseStructureFlowModel, _load_network(s_entries["sparse_structure_flow_model"]))
        structure_decoder = cast(SparseStructureDecoder, _load_network(s_entries["sparse_structure_decoder"]))
        _check_structure(structure_flow, structure_decoder, flow, encoder, s_entries)
        structure_sampler = SamplerSettings.from_official(
            s_settings.get("sparse_structure_sampler"), f"{_pipeline_file(s_folder)}: sparse_structure_sampler")
    device = torch.device(device)
    for module in (encoder, flow, structure_flow, structure_decoder):
        if module is not None:
            module.to(device)
    return OfficialStage1(encoder, flow, latent_sampler, normalization, structure_flow, structure_decoder,
                          structure_sampler, device)


def has_latent_flow(folder: str | os.PathLike) -> bool:
    """Whether a weights folder is an official one with stage 1's latent flow (NeAR's or TRELLIS's)."""
    folder = Path(folder)
    if not ((folder / "pipeline.json").is_file() or (folder / "pipeline.yaml").is_file()):
        return False
    try:
        return _LATENT_KEY in _read(folder)[1]
    except CheckpointError:
        return False


def _read(folder: Path) -> tuple[dict[str, Any], dict[str, ModelEntry]]:
    settings, entries = read_weights_folder(folder, (_LATENT_KEY, *_STRUCTURE_KEYS))
    return (settings if isinstance(settings, dict) else {}), entries


def _pipeline_file(folder: Path) -> Path:
    return folder / ("pipeline.json" if (folder / "pipeline.json").is_file() else "pipeline.yaml")


def _load_network(entry: ModelEntry) -> torch.nn.Module:
    module = build_network(entry.key, entry.class_name, entry.args, "cpu",
                           source=str(entry.weights.with_suffix(".json")))
    load_weights(module, read_safetensors(entry.weights), f"network '{entry.key}' ({entry.weights})")
    return module.eval()


def _dinov2_file(given: str | os.PathLike | None, folders: list[Path]) -> Path:
    if given is not None:
        return Path(given)
    for folder in dict.fromkeys(folders):
        for place in (folder, folder / "ckpts"):
            for name in DINOV2_FILES:
                if (place / name).is_file():
                    return place / name
    raise CheckpointError(
        f"no DINOv2 weights: stage 1 needs the image encoder {DINOV2_NAME}. Put dinov2_vitl14_reg4_pretrain.pth "
        f"(facebookresearch/dinov2; torch.hub keeps it in ~/.cache/torch/hub/checkpoints/) in "
        f"{' or '.join(str(f) for f in dict.fromkeys(folders))}, or give its path")


def _check_structure(flow: SparseStructureFlowModel, decoder: SparseStructureDecoder, latent_flow: SLatFlowModel,
                     encoder: DinoV2, entries: Mapping[str, ModelEntry]) -> None:
    """The structure networks must fit each other, the image tokens and the latent flow's grid."""
    weights = entries["sparse_structure_flow_model"].weights
    problems = []
    if not flow.in_channels == flow.out_channels == decoder.latent_channels:
        problems.append(f"the structure flow maps {flow.in_channels} -> {flow.out_channels} channels and the decoder "
                        f"reads {decoder.latent_channels}")
    if flow.cond_channels != encoder.embed_dim:
        problems.append(f"the structure flow reads {flow.cond_channels}-channel image tokens, DINOv2 makes "
                        f"{encoder.embed_dim}")
    if decoder.out_channels != 1 or flow.resolution * decoder.upsampling != latent_flow.resolution:
        problems.append(f"the decoder makes {decoder.out_channels}-channel logits on a "
                        f"{flow.resolution * decoder.upsampling}^3 grid; the latent flow needs one on "
                        f"{latent_flow.resolution}^3")
    if problems:
        raise CheckpointError(f"{weights} and {entries['sparse_structure_decoder'].weights} do not fit: "
                              + "; ".join(problems))


# -- running -------------------------------------------------------------------------------------------------------


def photo_to_dinov2_input(photo: np.ndarray) -> torch.Tensor:
    """A prepared photo [H, W, 4] (premultiplied linear RGBA) -> [1, 3, H, W] float32: the straight colour encoded
    with the sRGB OETF, then multiplied by alpha, as TRELLIS mattes its sRGB image on black (it also rounds to 8 bits,
    which is not reproduced)."""
    photo = np.asarray(photo, dtype=np.float32)
    if photo.ndim != 3 or photo.shape[2] != 4 or not np.isfinite(photo).all():
        raise ImageError(f"the prepared photo must be finite RGBA [H, W, 4], got shape {photo.shape}")
    alpha = np.clip(photo[..., 3:], 0.0, 1.0)
    straight = np.where(alpha > 0, photo[..., :3] / np.maximum(alpha, 1e-12), 0.0)
    rgb = (linear_to_srgb(straight) * alpha).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))[None]


def encode_photo(stage1: OfficialStage1, photo: PreparedPhoto | np.ndarray) -> torch.Tensor:
    """The DINOv2 condition [1, tokens, C] of a prepared photo (`lift.image.prepare_photo(path, 518)`, or its
    `rgba` [518, 518, 4])."""
    rgba = photo.rgba if isinstance(photo, PreparedPhoto) else photo
    with torch.no_grad():
        return stage1.image_encoder.encode(photo_to_dinov2_input(rgba).to(stage1.device))


def sample_structure(
    stage1: OfficialStage1,
    cond: torch.Tensor,
    *,
    seed: int = 0,
    sampler: Mapping[str, Any] | None = None,
    progress: Progress | None = None,
    cancel: Cancel | None = None,
) -> torch.Tensor:
    """The object's voxels: int32 [N, 3] indices on the latent flow's grid (64^3), x-major order.

    `cond` [1, L, C] from `encode_photo`; `sampler` overrides the folder's sampler params (steps, cfg_strength,
    cfg_interval, rescale_t). `progress(done, total)` counts the sampler steps and the decoding (total = steps + 1).
    """
    flow, decoder, settings = stage1.structure_flow, stage1.structure_decoder, stage1.structure_sampler
    if flow is None or decoder is None or settings is None:
        raise CheckpointError("these weights have no sparse-structure networks (NeAR's take their voxels from a mesh):"
                              " load them with structure_folder=<a TRELLIS-image-large folder>, or give the voxels")
    settings = settings.updated(sampler)
    total = settings.steps + 1
    res = flow.resolution
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, flow.in_channels, res, res, res, generator=generator).to(stage1.device)
    with torch.no_grad():
        _stop_if_cancelled(cancel)
        kv = flow.project_condition(cond)
        neg_kv = flow.project_condition(torch.zeros_like(cond)) if settings.cfg_strength else None

        def velocity(x: torch.Tensor, t: float, c: Any) -> torch.Tensor:
            return flow(x, _times(t, x.shape[0], x.device), cond_kv=c)

        latent = sample_flow(velocity, noise, kv, neg_kv, settings, _reporter(progress, cancel, total))
        coords = torch.argwhere(decoder(latent)[0, 0] > 0).to(torch.int32).cpu()
    if progress is not None:
        progress(total, total)
    if len(coords) == 0:
        raise NearError("the sparse-structure model found no occupied voxel for this photo; try another seed or a "
                        "photo where the object fills more of the frame")
    return coords


def sample_latent(
    stage1: OfficialStage1,
    cond: torch.Tensor,
    coords: torch.Tensor,
    *,
    seed: int = 0,
    sampler: Mapping[str, Any] | None = None,
    progress: Progress | None = None,
    cancel: Cancel | None = None,
) -> torch.Tensor:
    """The de-normalised latent, float32 [N, C] in the order of `coords` (int [N, 3] on the flow's grid, no
    duplicates; from `sample_structure` or a voxelised mesh). `progress(done, total)` counts sampler steps."""
    flow = stage1.latent_flow
    coords = torch.as_tensor(coords)
    if coords.ndim != 2 or coords.shape[1] != 3 or coords.shape[0] == 0:
        raise NearError(f"the voxels must be a non-empty [N, 3] array of indices, got shape {tuple(coords.shape)}")
    settings = stage1.latent_sampler.updated(sampler)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(coords.shape[0], flow.in_channels, generator=generator)
    voxels = SparseTensor.from_list([(coords, noise)], resolution=flow.resolution).to(stage1.device)
    with torch.no_grad():
        _stop_if_cancelled(cancel)
        kv = flow.project_condition(cond)
        neg_kv = flow.project_condition(torch.zeros_like(cond)) if settings.cfg_strength else None

        def velocity(feats: torch.Tensor, t: float, c: Any) -> torch.Tensor:
            return flow(voxels.replace(feats), _times(t, 1, feats.device), cond_kv=c).feats

        sample = sample_flow(velocity, voxels.feats, kv, neg_kv, settings, _reporter(progress, cancel, settings.steps))
    return stage1.normalization.denormalize(sample).float().cpu()


def _times(t: float, batch: int, device: torch.device) -> torch.Tensor:
    """What the official flows are fed for flow time t: 1000 t per batch element, float32."""
    return torch.full((batch,), 1000 * t, dtype=torch.float32, device=device)


def _stop_if_cancelled(cancel: Cancel | None) -> None:
    if cancel is not None and cancel():
        raise LiftCancelled("the lift was cancelled")


def _reporter(progress: Progress | None, cancel: Cancel | None, total: int) -> Callable[[int, int], None]:
    """The sampler's per-step hook: report `done` of `total`, then stop if cancelled while work remains."""

    def on_step(done: int, _steps: int) -> None:
        if progress is not None:
            progress(done, total)
        if done < total:
            _stop_if_cancelled(cancel)

    return on_step
