"""`near_engine.exr_layers`: the data set's plain channel names and Cycles' "<layer>.<pass>.<letter>" names."""

from __future__ import annotations

import numpy as np
import pytest

from near_engine.errors import NearError
from near_engine.exr_layers import read_channels, read_render_passes, stack_channels
from near_engine.images import write_exr


def test_render_passes_lose_the_view_layer_name_and_plain_names_stay(tmp_path) -> None:
    ramp = np.arange(12, dtype=np.float32).reshape(3, 4)
    write_exr(tmp_path / "render.exr", {"ViewLayer.Combined.R": ramp, "ViewLayer.Combined.G": ramp + 1,
                                        "ViewLayer.Combined.B": ramp + 2, "ViewLayer.Depth.Z": ramp * 10})
    passes = read_render_passes(tmp_path / "render.exr")
    assert set(passes) == {"Combined.R", "Combined.G", "Combined.B", "Depth.Z"}
    rgb = stack_channels(passes, "Combined.", "RGB")
    assert rgb.shape == (3, 4, 3) and rgb.dtype == np.float32
    np.testing.assert_array_equal(rgb[1, 2], [6, 7, 8])  # row 0 at the top, as written
    write_exr(tmp_path / "plain.exr", {"A": ramp, "depth.Z": ramp})
    assert set(read_render_passes(tmp_path / "plain.exr")) == set(read_channels(tmp_path / "plain.exr")) == \
        {"A", "depth.Z"}


def test_missing_damaged_and_incomplete_files_are_clear_errors(tmp_path) -> None:
    with pytest.raises(NearError, match="missing.exr: no such image file"):
        read_channels(tmp_path / "missing.exr")
    (tmp_path / "damaged.exr").write_bytes(b"v/1\x01" + bytes(40))
    with pytest.raises(NearError, match="damaged.exr: not a readable OpenEXR image"):
        read_channels(tmp_path / "damaged.exr")
    write_exr(tmp_path / "rgb.exr", {c: np.zeros((2, 2), np.float32) for c in "RGB"})
    with pytest.raises(NearError, match="no channel.* A .*it has B, G, R"):
        stack_channels(read_channels(tmp_path / "rgb.exr"), "", "RGBA")
