"""Find data files that ship with Blender (the bpy module or a Blender install) without importing bpy.

Blender bundles eight CC0 studio-light HDRIs (`datafiles/studiolights/world/*.exr`); the engine uses them as default
lighting and test data.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from .errors import NearError

_HDRI_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")  # no separators, no leading '.', hence no '..'


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
    """One bundled HDRI by name (e.g. 'forest', 'sunset', 'studio').

    Names come from data files (a data set's meta.json), so a name is a name, never a path: one that holds a
    separator, a control character or '..', or that resolves outside the HDRI folder, is refused.
    """
    if not isinstance(name, str) or not _HDRI_NAME.fullmatch(name):
        raise NearError(f"{name!r} is not an HDRI name (letters, digits, '_', '-' and '.', not a path)")
    folder = blender_hdri_dir()
    path = folder / f"{name}.exr"
    if path.resolve().parent != folder.resolve():  # a symlink inside the folder pointing elsewhere
        raise NearError(f"the bundled HDRI {name!r} resolves outside {folder}")
    if not path.is_file():
        names = sorted(p.stem for p in blender_hdri_dir().glob("*.exr"))
        raise NearError(f"no bundled HDRI named {name!r}; available: {', '.join(names)}")
    return path
