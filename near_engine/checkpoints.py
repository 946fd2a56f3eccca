"""Weights on disk: safetensors files read into modules with every mismatch named, our folder format, and the
official NeAR and TRELLIS folder layouts. Nothing here executes anything from a file: a PyTorch `.pth` (the DINOv2
file TRELLIS's stage 1 needs) is read only with `torch.load(weights_only=True)`, which builds tensors and plain
containers and refuses any other object.

Our format: a folder with `pipeline.json` ({"models": {key: name}, ...}) and `<name>.json` ({"name": class name,
"args": constructor arguments}) + `<name>.safetensors` per network. The official layouts are the same per network
but list them under `args`: NeAR's `pipeline.yaml` (`args.models: {key: path}`, read with `yaml.safe_load`) and
TRELLIS-image-large's `pipeline.json` ({"name": ..., "args": {"models": {key: "ckpts/<name>"}, ...}}).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection

import torch

from .errors import CheckpointError
from .files import write_atomically

MAX_LISTED = 12  # how many mismatched names an error message spells out before summarising
MAX_JSON_DEPTH = 32  # the deepest nesting a weights-folder JSON or YAML file may have (ours and the official need 4)


@dataclass(frozen=True)
class ModelEntry:
    """One network of a weights folder: its pipeline key, class name, constructor args and weights file."""

    key: str
    class_name: str
    args: dict[str, Any]
    weights: Path


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file (on the CPU). A missing or damaged file raises CheckpointError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"weights file {path} is a folder, not a safetensors file")
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"weights file {path} is damaged or not a safetensors file ({exc})") from None


def read_torch_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a PyTorch state-dict file (`.pth`/`.pt`), read with `torch.load(weights_only=True)` on the CPU.

    A missing or damaged file, one holding Python objects other than tensors and plain containers (which loading
    would have to run), or anything but a flat {name: tensor} dict raises CheckpointError naming the file.
    """
    import pickle
    import zipfile

    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"weights file {path} is a folder, not a PyTorch weights file")
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if re.search(r"unsupported (global|class)", str(exc), re.IGNORECASE):  # an object, not garbage
            raise CheckpointError(f"weights file {path} holds Python objects besides tensors, which are never loaded "
                                  "(only a plain state dict of tensors is read)") from None
        raise CheckpointError(f"weights file {path} is damaged or not a PyTorch weights file ({exc})") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError, IndexError) as exc:
        raise CheckpointError(f"weights file {path} is damaged or not a PyTorch weights file ({exc})") from None
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"weights file {path} is not a state dict: expected a flat {{name: tensor}} dict, got "
                              f"{_describe(state)}")
    return state


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        kinds = sorted({type(v).__name__ for v in value.values()})
        return f"a dict of {len(value)} entries ({', '.join(kinds) or 'empty'})"
    return type(value).__name__


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a `.safetensors` file or of a PyTorch `.pth`/`.pt` state dict (chosen by the file's suffix)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return read_safetensors(path)
    if suffix in (".pth", ".pt"):
        return read_torch_weights(path)
    raise CheckpointError(f"weights file {path}: expected a .safetensors, .pth or .pt file")


def load_weights(module: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy `tensors` into `module` strictly: every missing, unexpected or mis-shaped tensor is named in one error.

    Floating-point values are cast to each parameter's precision, so fp16 and fp32 files (or a mix, as the official
    checkpoints are) load alike; a tensor of another kind (bool or integer where the network holds floats) is refused,
    never cast. Entries that share storage in the module (the tokenizer's repeated layer) are simply written twice.
    """
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    misshaped = sorted(f"{k} (file {list(tensors[k].shape)}, model {list(expected[k].shape)})"
                       for k in set(expected) & set(tensors) if tensors[k].shape != expected[k].shape)
    mistyped = sorted(f"{k} (file {str(tensors[k].dtype).removeprefix('torch.')}, model "
                      f"{str(expected[k].dtype).removeprefix('torch.')})"
                      for k in set(expected) & set(tensors) if _kind(tensors[k].dtype) != _kind(expected[k].dtype))
    problems = [(what, names) for what, names in
                (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped),
                 ("of the wrong kind (only floating-point precisions are converted)", mistyped)) if names]
    if problems:
        parts = []
        for what, names in problems:
            shown = ", ".join(names[:MAX_LISTED]) + (f" and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED
                                                     else "")
            parts.append(f"{len(names)} {what}: {shown}")
        raise CheckpointError(f"{source} does not fit {type(module).__name__}: " + "; ".join(parts))
    with torch.no_grad():
        for name, value in expected.items():
            value.copy_(tensors[name].to(value.dtype))


def _kind(dtype: torch.dtype) -> str:
    """'float', 'complex', 'bool' or 'int': what a tensor's values are, whatever their precision."""
    if dtype.is_floating_point:
        return "float"
    if dtype.is_complex:
        return "complex"
    return "bool" if dtype == torch.bool else "int"


def save_model(folder: str | os.PathLike, name: str, module: torch.nn.Module, args: dict[str, Any]) -> None:
    """Write `<name>.json` and `<name>.safetensors` for `module` (built with constructor `args`)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # Shared tensors (one module registered under several names) are stored as separate copies, as safetensors
    # requires; loading writes each copy back into the one shared parameter.
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in module.state_dict().items()}
    write_atomically(folder / f"{name}.safetensors", lambda tmp: save_file(tensors, tmp), CheckpointError)
    config = json.dumps({"name": type(module).__name__, "args": args}, indent=1).encode()
    write_atomically(folder / f"{name}.json", lambda tmp: Path(tmp).write_bytes(config), CheckpointError)


def read_model_entry(key: str, base: Path) -> ModelEntry:
    """The network at `base` (`base.json` + `base.safetensors`)."""
    config_path = base.with_name(base.name + ".json")
    weights = base.with_name(base.name + ".safetensors")
    config = _read_json(config_path)
    if not isinstance(config, dict) or not isinstance(config.get("name"), str) or not isinstance(
            config.get("args", {}), dict):
        raise CheckpointError(f"{config_path} must hold {{\"name\": class name, \"args\": {{...}}}}")
    if not weights.is_file():
        raise CheckpointError(f"{weights} is missing (the weights of '{key}')")
    return ModelEntry(key, config["name"], dict(config.get("args", {})), weights)


def read_weights_folder(folder: str | os.PathLike,
                        keys: Collection[str] | None = None) -> tuple[dict[str, Any], dict[str, ModelEntry]]:
    """(pipeline settings, {key: ModelEntry}) of our folder format or, unchanged, the official NeAR or TRELLIS layout
    (the settings are then the pipeline file's `args`).

    Only the networks in `keys` (all when None) are opened, so a folder whose other networks' files are absent (the
    official stage-1 flow model, say) still serves the ones asked for. The settings keep the full `models` listing.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"{folder} is a file; a weights folder holds pipeline.json (or pipeline.yaml)")
    if not folder.is_dir():
        raise CheckpointError(f"weights folder {folder} does not exist")
    if (folder / "pipeline.json").is_file():
        pipeline = _read_json(folder / "pipeline.json")
        if isinstance(pipeline, dict) and "models" not in pipeline and isinstance(pipeline.get("args"), dict):
            pipeline = pipeline["args"]  # TRELLIS-image-large: {"name": pipeline class, "args": {"models": ...}}
        models = pipeline.get("models") if isinstance(pipeline, dict) else None
    elif (folder / "pipeline.yaml").is_file():
        pipeline = _read_yaml(folder / "pipeline.yaml")
        args = pipeline.get("args") if isinstance(pipeline, dict) else None
        models = args.get("models") if isinstance(args, dict) else None
        pipeline = args
    else:
        raise CheckpointError(f"{folder} is not a weights folder: it has neither pipeline.json nor pipeline.yaml")
    if not isinstance(models, dict) or not models or not all(isinstance(k, str) and isinstance(v, str)
                                                             for k, v in models.items()):
        raise CheckpointError(f"{folder}: the pipeline file must list its networks as models: {{key: path}}")
    entries = {}
    for key, rel in models.items():
        for text in (key, rel):
            if not text or any(ord(c) < 32 or ord(c) == 127 for c in text):
                raise CheckpointError(f"{folder}: the pipeline file's models entry {key!r}: {rel!r} is empty or holds "
                                      "control characters (NUL, escapes); network keys and paths are plain names")
        base = (folder / rel).resolve()
        if folder.resolve() not in base.parents:
            raise CheckpointError(f"{folder}: network '{key}' points outside the weights folder ({rel})")
        if keys is None or key in keys:
            entries[key] = read_model_entry(key, base)
    return pipeline, entries


def _read_json(path: Path) -> Any:
    try:
        return _shallow(json.loads(path.read_text(encoding="utf-8")), path)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path} is a folder, not a JSON file") from None
    except RecursionError:
        raise CheckpointError(f"{path} nests lists or tables more than {MAX_JSON_DEPTH} levels deep") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path} is not readable JSON ({exc})") from None


def _read_yaml(path: Path) -> Any:
    import yaml

    try:
        return _shallow(yaml.safe_load(path.read_text(encoding="utf-8")), path)
    except IsADirectoryError:
        raise CheckpointError(f"{path} is a folder, not a YAML file") from None
    except RecursionError:
        raise CheckpointError(f"{path} nests lists or tables more than {MAX_JSON_DEPTH} levels deep") from None
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
        raise CheckpointError(f"{path} is not readable YAML ({exc})") from None


def _shallow(value: Any, path: Path) -> Any:
    """`value` if its lists and tables nest at most MAX_JSON_DEPTH deep (checked without recursion; a YAML alias is
    walked once, so a "billion laughs" file costs no more than its text)."""
    stack, seen = [(value, 0)], set()
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)) and id(item) not in seen:
            seen.add(id(item))
            if depth >= MAX_JSON_DEPTH:
                raise CheckpointError(f"{path} nests lists or tables more than {MAX_JSON_DEPTH} levels deep")
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return value
