"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from near_engine.blender_data import blender_hdri_dir as find_blender_hdri_dir


@pytest.fixture(scope="session")
def blender_hdri_dir() -> Path:
    """The folder of HDRIs bundled with the bpy module (a test dependency, so it is always there)."""
    return find_blender_hdri_dir()
