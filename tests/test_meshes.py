"""Importing meshes into asset space (OBJ, glTF, PLY, .blend) with real Blender importers."""

from __future__ import annotations

import bpy
import numpy as np
import pytest

from near_engine.cycles.meshes import import_mesh, normalizing_transform
from near_engine.errors import NearError

pytestmark = pytest.mark.timeout(120)


def _write_box_obj(path, lo, hi) -> None:
    """An axis-aligned box as OBJ text, Y up (OBJ's convention; Blender's importer turns it to Z up)."""
    (x0, y0, z0), (x1, y1, z1) = lo, hi
    corners = [(x, y, z) for x in (x0, x1) for y in (y0, y1) for z in (z0, z1)]
    faces = [(1, 2, 4, 3), (5, 7, 8, 6), (1, 5, 6, 2), (3, 4, 8, 7), (1, 3, 7, 5), (2, 6, 8, 4)]
    path.write_text("".join(f"v {x} {y} {z}\n" for x, y, z in corners) +
                    "".join("f " + " ".join(map(str, f)) + "\n" for f in faces))


def _box_extent(vertices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = vertices.min(0), vertices.max(0)
    return (lo + hi) / 2, hi - lo


def test_obj_is_centred_scaled_and_turned_z_up(tmp_path) -> None:
    _write_box_obj(tmp_path / "box.obj", (1.0, 2.0, 3.0), (3.0, 6.0, 4.0))  # 2 x 4 x 1, Y up
    vertices, triangles = import_mesh(tmp_path / "box.obj")
    centre, size = _box_extent(vertices)
    np.testing.assert_allclose(centre, 0.0, atol=1e-6)
    np.testing.assert_allclose(size, [0.5, 0.25, 1.0], atol=1e-6)  # OBJ's Y (the long side) is Blender's Z
    assert triangles.shape == (12, 3) and triangles.max() < len(vertices)


def test_normalized_mesh_keeps_its_placement(tmp_path) -> None:
    _write_box_obj(tmp_path / "unit.obj", (-0.5, -0.25, -0.1), (0.5, 0.25, 0.1))
    vertices, _ = import_mesh(tmp_path / "unit.obj")
    first, _ = import_mesh(tmp_path / "unit.obj")
    centre, size = _box_extent(vertices)
    np.testing.assert_allclose(centre, 0.0, atol=1e-7)
    np.testing.assert_allclose(size, [1.0, 0.2, 0.5], atol=1e-7)
    np.testing.assert_allclose(normalizing_transform(vertices), np.eye(4), atol=1e-6)
    np.testing.assert_array_equal(first, vertices)


@pytest.mark.parametrize("suffix", [".glb", ".ply", ".blend"])
def test_other_formats_import_into_asset_space(tmp_path, suffix) -> None:
    """A monkey with a parent transform, written by Blender's own exporters, comes back normalized."""
    bpy.ops.wm.read_factory_settings(use_empty=True)
    bpy.ops.mesh.primitive_monkey_add(size=3.0, location=(4.0, -2.0, 1.0))
    monkey = bpy.context.active_object
    parent = bpy.data.objects.new("parent", None)
    bpy.context.scene.collection.objects.link(parent)
    parent.location, parent.scale = (1.0, 1.0, 1.0), (2.0, 2.0, 2.0)
    monkey.parent = parent
    bpy.context.view_layer.update()
    path = tmp_path / f"monkey{suffix}"
    if suffix == ".glb":
        import addon_utils

        addon_utils.enable("io_scene_gltf2", default_set=False)
        bpy.ops.export_scene.gltf(filepath=str(path), export_format="GLB")
    elif suffix == ".ply":
        bpy.ops.wm.ply_export(filepath=str(path))
    else:
        bpy.ops.wm.save_as_mainfile(filepath=str(path))
    vertices, triangles = import_mesh(path)
    centre, size = _box_extent(vertices)
    np.testing.assert_allclose(centre, 0.0, atol=1e-5)
    assert size.max() == pytest.approx(1.0, abs=1e-5)
    assert size[0] == pytest.approx(size.max(), abs=1e-5)  # the monkey is widest along X, as it was
    assert len(triangles) >= 900  # Suzanne: 500 faces, mostly quads


def test_bad_mesh_files_are_clear_errors(tmp_path) -> None:
    (tmp_path / "empty.obj").write_text("# nothing\n")
    with pytest.raises(NearError, match="no mesh objects"):
        import_mesh(tmp_path / "empty.obj")
    with pytest.raises(NearError, match="cannot import '.stl'"):
        import_mesh(tmp_path / "model.stl")
    with pytest.raises(NearError, match="no such file"):
        import_mesh(tmp_path / "missing.glb")
    (tmp_path / "broken.glb").write_bytes(b"glTF\x02\x00\x00\x00garbage")
    with pytest.raises(NearError, match="broken.glb"):
        import_mesh(tmp_path / "broken.glb")


def test_a_damaged_blend_file_is_a_clear_error(tmp_path) -> None:
    """62 bytes that start like a .blend: Blender's reader raises OSError ("Missing DNA block")."""
    path = tmp_path / "damaged.blend"
    path.write_bytes(b"BLENDER-v405" + bytes(50))
    with pytest.raises(NearError, match="damaged.blend: Blender could not import it .*DNA"):
        import_mesh(path)
    (tmp_path / "text.blend").write_text("not a blend file at all")
    with pytest.raises(NearError, match="text.blend: not a Blender file"):
        import_mesh(tmp_path / "text.blend")
    with pytest.raises(NearError, match="is a folder"):
        import_mesh(tmp_path)  # a folder named like a mesh is not one either
    (tmp_path / "dir.obj").mkdir()
    with pytest.raises(NearError, match="dir.obj: is a folder"):
        import_mesh(tmp_path / "dir.obj")


def _ply(path, vertices: str, body: str, faces: str = "0", face_property: str = "uchar int") -> None:
    path.write_text(f"ply\nformat ascii 1.0\nelement vertex {vertices}\nproperty float x\nproperty float y\n"
                    f"property float z\nelement face {faces}\nproperty list {face_property} vertex_indices\n"
                    f"end_header\n{body}")


def test_a_ply_declaring_absurd_counts_is_refused_before_importing(tmp_path) -> None:
    _ply(tmp_path / "huge.ply", "99999999999", "0 0 0\n")
    with pytest.raises(NearError, match=r"huge.ply: the header declares 99,999,999,999 vertex elements"):
        import_mesh(tmp_path / "huge.ply")
    _ply(tmp_path / "short.ply", "1000", "0 0 0\n1 0 0\n")
    with pytest.raises(NearError, match=r"short.ply: the header declares 1,000 vertex elements, but the 12 bytes"):
        import_mesh(tmp_path / "short.ply")
    (tmp_path / "noheader.ply").write_bytes(b"ply\nformat ascii 1.0\n" + b"x" * 70000)
    with pytest.raises(NearError, match="noheader.ply: not a PLY file"):
        import_mesh(tmp_path / "noheader.ply")
    _ply(tmp_path / "triangle.ply", "3", "0 0 0\n1 0 0\n0 1 0\n3 0 1 2\n", faces="1")
    vertices, triangles = import_mesh(tmp_path / "triangle.ply")  # a true header passes
    assert vertices.shape == (3, 3) and triangles.shape == (1, 3)


def test_an_importer_crash_is_an_error_naming_the_file(tmp_path) -> None:
    """Past the header check, Blender's PLY importer still aborts on this file (32-bit stoi): in the child process
    that is a NearError, and this process lives on."""
    from near_engine.cycles.import_process import import_in_child

    _ply(tmp_path / "crash.ply", "99999999999", "0 0 0\n")
    with pytest.raises(NearError, match=r"crash.ply: Blender's ply importer crashed on this file \(SIGABRT\)"):
        import_in_child(tmp_path / "crash.ply", "ply", tmp_path / "out.blend")
    assert not (tmp_path / "out.blend").exists()


def test_meshes_without_a_surface_are_refused(tmp_path) -> None:
    (tmp_path / "collinear.obj").write_text("v 0 0 0\nv 1 1 1\nv 2 2 2\nf 1 2 3\n")
    with pytest.raises(NearError, match="collinear.obj: none of its 1 triangle.* has any area"):
        import_mesh(tmp_path / "collinear.obj")
    _ply(tmp_path / "points.ply", "3", "0 0 0\n1 0 0\n0 1 0\n")
    with pytest.raises(NearError, match="points.ply: the mesh has no faces|points.ply: the file holds no mesh"):
        import_mesh(tmp_path / "points.ply")
