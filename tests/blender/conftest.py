"""Fixtures for the add-on tests: a clean Blender with near_blender registered, test weights and test assets.

The weights are `random_weights("near-tiny")`: seeded, UNTRAINED networks saved in our folder format. They render
noise and are used only to check that the engine computes what the pipeline computes on the same inputs.
"""

from __future__ import annotations

from pathlib import Path

import bpy
import numpy as np
import pytest
import torch

import near_blender
from near_engine.asset import Asset
from near_engine.configs import random_weights, save_networks

#: Light resolution for test weights (the tokenizer's input planes); small so renders stay fast.
TEST_LIGHT_SIZE = 64


@pytest.fixture(scope="session")
def weights_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("weights") / "near-tiny-random"
    save_networks(folder, random_weights("near-tiny", seed=7), "near-tiny", {"light_size": TEST_LIGHT_SIZE})
    return folder


@pytest.fixture
def clean_blender():
    """An empty factory scene with near_blender registered; unregistered afterwards."""
    bpy.ops.wm.read_factory_settings(use_empty=True)
    near_blender.register()
    yield bpy.context.scene
    near_blender.unregister()


def make_asset(seed: int, voxels: int = 300, channels: int = 8) -> Asset:
    """A blob of voxels around the grid centre with random latents (a test asset, not a real object)."""
    g = torch.Generator().manual_seed(seed)
    coords = torch.unique(torch.randint(22, 42, (voxels * 2, 3), generator=g), dim=0)
    coords = coords[torch.randperm(coords.shape[0], generator=g)[:voxels]]
    feats = torch.randn(coords.shape[0], channels, generator=g)
    return Asset(coords.numpy().astype(np.int32), feats.numpy(), model="near-tiny-random", source=f"test-{seed}")


def multilayer_exr(settings: bpy.types.ImageFormatSettings) -> None:
    """32-bit multilayer EXR output (from Blender 5.0 the format is offered only for the multilayer media type)."""
    if hasattr(settings, "media_type"):
        settings.media_type = "MULTI_LAYER_IMAGE"
    settings.file_format = "OPEN_EXR_MULTILAYER"
    settings.color_depth = "32"


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "blender5: runs part of tests/blender under the bpy 5.x module (Python 3.13); "
                                       "opt-in with -m blender5, after tests/blender/setup_bpy5.sh")


def pytest_collection_modifyitems(config, items) -> None:
    """`blender5` tests run only when asked for (-m blender5): they need their own environment and take minutes."""
    if "blender5" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="opt-in: ./dev.sh test tests/blender -m blender5 "
                                   "(after tests/blender/setup_bpy5.sh)")
    for item in items:
        if "blender5" in item.keywords:
            item.add_marker(skip)
