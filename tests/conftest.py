"""Shared pytest fixtures."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def blender_hdri_dir() -> Path:
    """The folder of HDRIs bundled with the bpy module (<bpy>/<version>/datafiles/studiolights/world).

    Found without importing bpy (importing it is slow and not needed to read files); skips when bpy is absent.
    """
    spec = importlib.util.find_spec("bpy")
    if spec is None or spec.origin is None:
        pytest.skip("the bpy module is not installed")
    package = Path(spec.origin).parent  # <site-packages>/bpy (holds __init__.so and the <version> folders)
    candidates = sorted(
        (p for p in package.glob("*/datafiles/studiolights/world") if re.fullmatch(r"\d+\.\d+", p.parts[-4])),
        key=lambda p: tuple(int(x) for x in p.parts[-4].split(".")),
    )
    if not candidates or not list(candidates[-1].glob("*.exr")):
        pytest.skip(f"no bundled studio-light HDRIs found under {package}")
    return candidates[-1]
