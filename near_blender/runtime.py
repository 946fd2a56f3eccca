"""The loaded NeAR pipeline, shared by final renders and viewports so its caches (IAD, light) survive between renders.

Weights resolve as: the scene's folder, else the add-on preferences' folder, else near-tiny, which ships inside
near_engine. Every problem is a `NearError` whose
message tells the user what to set; the engine reports it instead of raising.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import bpy

from near_engine import bundled
from near_engine.errors import CheckpointError

from .preferences import preferences

_lock = threading.Lock()
_loaded: dict["WeightsKey", object] = {}


@dataclass(frozen=True)
class WeightsKey:
    """Which pipeline a scene needs: read from Blender data on the UI thread, usable on any thread."""

    folder: str
    device: str
    light_size: int


def weights_folder(scene: bpy.types.Scene) -> Path:
    """The weights folder this scene renders with: its own, else the preferences', else near-tiny (ships with the
    engine); a `CheckpointError` names a chosen folder that does not exist."""
    folder = scene.near.weights_folder.strip()
    prefs = preferences()
    if not folder and prefs is not None:
        folder = prefs.weights_folder.strip()
    if not folder:
        return bundled.weights_folder(bundled.DEFAULT_WEIGHTS)
    path = Path(bpy.path.abspath(folder))
    if not path.is_dir():
        raise CheckpointError(f"NeAR weights folder not found: {path}")
    return path


def device_name(scene: bpy.types.Scene) -> str:
    """"auto", "cpu" or "cuda" for this scene (its own choice, else the preferences', else automatic)."""
    choice = scene.near.device
    if choice == "DEFAULT":
        prefs = preferences()
        choice = prefs.device if prefs is not None else "AUTO"
    return choice.lower()


def weights_key(scene: bpy.types.Scene) -> WeightsKey:
    return WeightsKey(str(weights_folder(scene).resolve()), device_name(scene), int(scene.near.light_size))


def pipeline(scene_or_key: bpy.types.Scene | WeightsKey):
    """The `NearPipeline` for these weights and device, loaded once and kept (thread-safe; pass a `WeightsKey` off
    Blender's main thread, where bpy data must not be read)."""
    from near_engine.pipeline import NearPipeline

    key = scene_or_key if isinstance(scene_or_key, WeightsKey) else weights_key(scene_or_key)
    with _lock:
        loaded = _loaded.get(key)
        if loaded is None:
            print(f"NeAR: loading weights from {key.folder} ...", flush=True)
            kwargs = {"light_size": key.light_size} if key.light_size else {}
            loaded = NearPipeline.from_pretrained(Path(key.folder), key.device, **kwargs)
            _loaded.clear()  # one set of weights in memory at a time
            _loaded[key] = loaded
            print("NeAR: weights loaded", flush=True)
        return loaded


def release() -> None:
    """Drop loaded weights and caches (on unregister, or when the user reloads weights)."""
    with _lock:
        _loaded.clear()
