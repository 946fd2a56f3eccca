"""Reading the channels of multi-layer OpenEXR files: the data set's images and Cycles' multilayer renders.

The data set stores plain channel names ("R", "A", "depth.Z", "base_color.G", ...); Cycles names its channels
"<view layer>.<pass>.<letter>". One home for both, so the data set, the Cycles driver, the encoder and the demo read
them the same way, and a damaged file is a `NearError` naming it. (Environment maps have their own reader in
`envmap`.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import OpenEXR

from .errors import NearError

__all__ = ["read_channels", "read_render_passes", "stack_channels"]


def read_channels(path: str | Path) -> dict[str, np.ndarray]:
    """Every channel of an EXR file by its full name, as float32 [H, W] (row 0 at the top)."""
    if not Path(path).is_file():
        raise NearError(f"{path}: no such image file")
    try:
        exr = OpenEXR.File(str(path), separate_channels=True)
        return {name: channel.pixels.astype(np.float32) for name, channel in exr.channels().items()}
    except Exception as exc:  # the bindings raise RuntimeError or ValueError for damaged files
        raise NearError(f"{path}: not a readable OpenEXR image ({type(exc).__name__}: {exc})") from None


def read_render_passes(path: str | Path) -> dict[str, np.ndarray]:
    """The channels of a Cycles multilayer render as "<pass>.<letter>" ("Combined.R", "Depth.Z", "roughness.X"),
    without the view layer's name; channels of a single-layer file keep their names."""
    return {_without_view_layer(name): pixels for name, pixels in read_channels(path).items()}


def stack_channels(channels: dict[str, np.ndarray], prefix: str, letters: str) -> np.ndarray:
    """The channels `prefix + letter` stacked last: [H, W, len(letters)]; a missing one is a `NearError`."""
    missing = [prefix + letter for letter in letters if prefix + letter not in channels]
    if missing:
        raise NearError(f"the image has no channel(s) {', '.join(missing)} (it has {', '.join(sorted(channels))})")
    return np.stack([channels[prefix + letter] for letter in letters], axis=-1)


def _without_view_layer(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[1:]) if len(parts) > 2 else name
