"""The Blender add-on: everything that touches bpy. It describes scenes to near_engine and holds no model math.

Modules (shaped like Blender's Cycles add-on): `properties` and `preferences` (settings), `objects` (NeAR objects <->
.near assets), `world` (World -> environment map), `scene` (depsgraph -> engine scene), `engine` (the render engine),
`viewport` and `drawing` (the interactive viewport), `operators`, `ui`. register()/unregister() are the extension's
entry points and stay symmetric.
"""

from __future__ import annotations

import importlib

_MODULES = ("properties", "preferences", "engine", "operators", "ui")


def _modules() -> list:
    return [importlib.import_module(f"{__name__}.{name}") for name in _MODULES]


def register() -> None:
    for module in _modules():
        module.register()


def unregister() -> None:
    for module in reversed(_modules()):
        module.unregister()
    from . import runtime

    runtime.release()
