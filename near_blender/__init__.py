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
_registered = False


def _modules() -> list:
    return [importlib.import_module(f"{__name__}.{name}") for name in _MODULES]


def register() -> None:
    global _registered
    import bpy

    for module in _modules():
        module.register()
    _registered = True
    if not bpy.app.binary_path:
        # The bpy module (no Blender binary) hangs at exit while Python-defined operators are registered (a deadlock
        # in its static destructors, bpy 4.5.15): unregister first, so farm scripts that import bpy exit cleanly.
        atexit.unregister(_unregister_at_exit)
        atexit.register(_unregister_at_exit)


def unregister() -> None:
    global _registered
    for module in reversed(_modules()):
        module.unregister()
    _registered = False
    from . import runtime

    runtime.release()


def _unregister_at_exit() -> None:
    if _registered:
        unregister()
