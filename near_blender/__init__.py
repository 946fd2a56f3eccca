"""The Blender add-on: everything that touches bpy. It describes scenes to near_engine and holds no model math.

Modules (shaped like Blender's Cycles add-on): `properties` and `preferences` (settings), `objects` (NeAR objects <->
.near assets), `world` (World -> environment map), `scene` (depsgraph -> engine scene), `engine` (the render engine),
`viewport` and `drawing` (the interactive viewport), `operators`, `ui`. register()/unregister() are the extension's
entry points and stay symmetric.
"""

from __future__ import annotations

import atexit
import importlib

_MODULES = ("properties", "preferences", "engine", "operators", "ui")
#: The submodules registered so far, in order: unregister() undoes exactly these, so it is idempotent (Blender and
#: the bpy module's exit may both call it) and cleans up after a register() that failed half-way.
_registered: list = []


def _extension_package() -> str | None:
    """The extension's package (`bl_ext.<repo>.near`) when running as an installed extension, else None."""
    package, _, _ = __name__.rpartition(".")
    return package if package.startswith("bl_ext.") else None


def register() -> None:
    import bpy

    from . import runtime

    if _registered:
        return
    runtime.use_kernel_cache(_extension_package())  # before near_engine's numba kernels are imported
    try:
        for name in _MODULES:
            module = importlib.import_module(f"{__name__}.{name}")
            module.register()
            _registered.append(module)
    except BaseException:
        unregister()
        raise
    if not bpy.app.binary_path:
        # The bpy module (no Blender binary) hangs at exit while Python-defined operators are registered (a deadlock
        # in its static destructors, bpy 4.5.15): unregister first, so farm scripts that import bpy exit cleanly.
        atexit.unregister(unregister)
        atexit.register(unregister)


def unregister() -> None:
    from . import runtime

    while _registered:
        _registered.pop().unregister()
    runtime.release()
    runtime.stop_listening()
