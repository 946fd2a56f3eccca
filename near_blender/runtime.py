"""The loaded NeAR pipeline, shared by final renders and viewports so its caches (IAD, light) survive between renders,
and the compiled CPU kernels it renders with.

Weights resolve as: the scene's folder, else the add-on preferences' folder, else near-tiny, which ships inside
near_engine. Every problem is a `NearError` whose message tells the user what to set; the engine reports it instead
of raising.

numba compiles the CPU rasterizer the first time it runs (seconds to tens of seconds) and caches the result. Its
default cache sits next to near_engine's source, which for the extension is the wheel Blender extracts and deletes
again when the add-on is disabled; `use_kernel_cache` moves it into the extension's user folder, which stays.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

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


def pipeline(scene_or_key: bpy.types.Scene | WeightsKey, on_load: Callable[[], object] = lambda: None):
    """The `NearPipeline` for these weights and device, loaded once and kept (thread-safe; pass a `WeightsKey` off
    Blender's main thread, where bpy data must not be read). `on_load` is called only when weights really load."""
    from near_engine.pipeline import NearPipeline

    key = scene_or_key if isinstance(scene_or_key, WeightsKey) else weights_key(scene_or_key)
    with _lock:
        loaded = _loaded.get(key)
        if loaded is None:
            on_load()
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


#: Where the kernel cache went (None: numba's default) and how many near_engine kernels numba compiled (not loaded
#: from its cache) in this process: what the status line and the tests look at.
kernel_cache: Path | None = None
kernel_compilations = 0
#: thread id -> what to call there when numba starts compiling (numba compiles on the thread that calls a kernel).
_announcers: dict[int, Callable[[], object]] = {}
_listener = None


def use_kernel_cache(extension_package: str | None) -> None:
    """Keep numba's kernel cache in the extension's user folder (kept when the add-on is disabled or updated).

    Called from register(), before near_engine's kernels are imported. Outside an extension (a development checkout,
    a farm's own install) numba's default, next to the source, is kept; so is a NUMBA_CACHE_DIR the user set.
    """
    global kernel_cache
    if not extension_package or os.environ.get("NUMBA_CACHE_DIR"):
        return
    try:
        folder = Path(bpy.utils.extension_path_user(extension_package, path="numba-cache", create=True))
    except (ValueError, OSError) as error:  # not an installed extension, or the folder cannot be made
        print(f"NeAR: numba's kernel cache stays in its default place ({error})", file=sys.stderr)
        return
    os.environ["NUMBA_CACHE_DIR"] = str(folder)
    if "numba" in sys.modules:  # imported already (by another add-on): make numba read its environment again
        import numba.core.config

        numba.core.config.reload_config()
    kernel_cache = folder


@contextlib.contextmanager
def announce_compilation(announce: Callable[[], object]) -> Iterator[None]:
    """Call `announce` (once) when numba starts compiling one of near_engine's kernels on this thread inside this
    block, so the status line can say why the first render takes long; cache loads are not compilations."""
    global _listener
    from numba.core import event

    if _listener is None:
        _listener = _compile_listener()
        event.register("numba:compile", _listener)
    said = []

    def once() -> None:
        if not said:
            said.append(True)
            announce()

    thread = threading.get_ident()
    _announcers[thread] = once
    try:
        yield
    finally:
        _announcers.pop(thread, None)


def _compile_listener():
    """A numba event listener counting compilations of near_engine's kernels and telling this thread's announcer."""
    from numba.core import event

    class CompileListener(event.Listener):
        def on_start(self, evt) -> None:
            global kernel_compilations
            dispatcher = (evt.data or {}).get("dispatcher")
            module = getattr(getattr(dispatcher, "py_func", None), "__module__", "") or ""
            if module.split(".")[0] == "near_engine":
                kernel_compilations += 1
                _announcers.get(threading.get_ident(), lambda: None)()

        def on_end(self, evt) -> None:
            pass

    return CompileListener()


def stop_listening() -> None:
    """Unregister the compile listener (on unregister: a re-enabled add-on may be a fresh copy of this module)."""
    global _listener
    if _listener is not None:
        from numba.core import event

        event.unregister("numba:compile", _listener)
        _listener = None
