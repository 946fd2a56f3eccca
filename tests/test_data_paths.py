"""Names read from data files stay names: HDRI names and light folders of a data set cannot reach other files
(issue 11, item 5)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from near_engine.blender_data import blender_hdri
from near_engine.datagen.dataset import load_object
from near_engine.errors import NearError
from near_engine.images import write_exr

ESCAPES = ["../" * 11 + "tmp/x", "../studio", "/etc/passwd", "..", "fo\0rest", "forest/../../x", "a\\..\\b", ""]


@pytest.mark.parametrize("name", ESCAPES)
def test_a_bundled_hdri_is_named_never_pathed(name):
    with pytest.raises(NearError, match="is not an HDRI name"):
        blender_hdri(name)


def test_bundled_hdris_still_resolve_by_name(blender_hdri_dir):
    assert blender_hdri("forest") == blender_hdri_dir / "forest.exr"
    with pytest.raises(NearError, match="no bundled HDRI named 'nowhere'"):
        blender_hdri("nowhere")


def _view(path, **extra):
    plane = np.full((2, 2), 0.5, np.float32)
    channels = {c: plane for c in "RGBA"}
    channels.update({f"normal.{c}": plane for c in "XYZ"})
    channels.update({f"base_color.{c}": plane for c in "RGB"})
    channels.update({"depth.Z": plane, "roughness.V": plane, "metallic.V": plane, **extra})
    path.parent.mkdir(parents=True, exist_ok=True)
    write_exr(path, channels)


def test_a_data_sets_light_names_cannot_leave_the_object_folder(tmp_path):
    """A meta.json whose HDRI name climbs out of the object's folder: before, the reader opened the file it named."""
    folder = tmp_path / "data" / "objects" / "00000"
    _view(folder / "uniform" / "view_000.exr")
    _view(tmp_path / "data" / "victim" / "view_000.exr")  # a file outside the object, where the name points
    (folder / "hdri_..").mkdir()  # what makes the escape resolve on disk
    np.savez(folder / "mesh.npz", vertices=np.zeros((3, 3), np.float32), triangles=np.zeros((1, 3), np.int32))
    camera = {"world_to_camera": np.eye(4).tolist(), "fx": 1.0, "fy": 1.0, "cx": 1.0, "cy": 1.0}
    meta = {"cameras": [camera], "lit_views": [0], "lights": [{"kind": "hdri", "hdri": "../" * 3 + "victim"}]}
    (folder / "meta.json").write_text(json.dumps(meta))
    (folder / "done.json").write_text("{}")
    with pytest.raises(NearError, match="is not a folder name"):
        load_object(folder)
    meta["lights"] = [{"kind": "hdri", "hdri": "forest"}]
    (folder / "meta.json").write_text(json.dumps(meta))
    _view(folder / "hdri_forest" / "view_000.exr")
    assert load_object(folder)["lit_rgba"].shape == (1, 1, 2, 2, 4)
