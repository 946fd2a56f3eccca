"""Find data files that ship with Blender (the bpy module or a Blender install) without importing bpy.

Blender bundles eight CC0 studio-light HDRIs (`datafiles/studiolights/world/*.exr`); the engine uses them as default
lighting and test data.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from .errors import NearError


def blender_hdri_dir() -> Path:
    """The folder of Blender's bundled world HDRIs, found next to the installed bpy module."""
    spec = importlib.util.find_spec("bpy")
    roots = list(spec.submodule_search_locations or []) if spec else []
    folders = [f for root in roots for f in Path(root).glob("*/datafiles/studiolights/world") if any(f.glob("*.exr"))]
    if folders:  # the newest Blender version folder (e.g. "4.5") wins
        return max(folders, key=lambda f: tuple(int(x) for x in re.findall(r"\d+", f.parts[-4])))
    raise NearError("Blender's bundled HDRIs were not found: install the 'bpy' module (pip install bpy) "
                    "or pass an HDRI file explicitly")


def blender_hdri(name: str) -> Path:
    """One bundled HDRI by name (e.g. 'forest', 'sunset', 'studio')."""
    path = blender_hdri_dir() / f"{name}.exr"
    if not path.is_file():
        names = sorted(p.stem for p in blender_hdri_dir().glob("*.exr"))
        raise NearError(f"no bundled HDRI named {name!r}; available: {', '.join(names)}")
    return path
