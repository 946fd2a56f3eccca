"""Bring any mesh Blender can import into asset space: OBJ (+MTL, textures), glTF/GLB, PLY, objects of a .blend.

The file is checked (`mesh_files`) and imported in a child process (`import_process`); the meshes come back through a
.blend that Blender wrote. They are normalized together by their world bounding box: centre to the origin, largest
side to 1 (Z up, as Blender's importers already convert). A mesh that is already normalized that way keeps its
placement (the transform is then the identity up to rounding). A mesh with no surface (no faces, or only faces
without area) is refused: there is nothing to render or encode. bpy is imported inside functions: this is engine code.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from ..errors import NearError
from .import_process import import_in_child
from .mesh_files import importer_for

#: A mesh whose triangles add up to less area than this (in asset space, where the object is 1 across: a square
#: 1/1000 on a side) has no surface; float32 rounding alone leaves collinear corners about 1e-8 apart.
MIN_SURFACE_AREA = 1e-6


def import_mesh(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Import `path` into a fresh empty scene and normalize it; returns its (vertices, triangles) in asset space.

    The scene keeps the normalized objects (with their materials), ready for `render.render_views`; every material
    also writes its base colour, roughness, metallic and Specular IOR Level to the G-buffer AOVs
    (`materials.add_material_aovs`), so the mesh's own materials become its material latents.
    """
    import bpy
    from mathutils import Matrix

    from .materials import add_material_aovs

    path = Path(path)
    kind = importer_for(path)
    with tempfile.TemporaryDirectory(prefix="near_import_") as folder:
        blend = Path(folder) / "imported.blend"
        import_in_child(path.resolve(), kind, blend)
        bpy.ops.wm.read_factory_settings(use_empty=True)
        with bpy.data.libraries.load(str(blend), link=False) as (source, target):
            target.objects = list(source.objects)
    objects = [obj for obj in target.objects if obj is not None and obj.type == "MESH"]
    if not objects:
        raise NearError(f"{path.name}: the file holds no mesh objects")
    for obj in objects:
        bpy.context.scene.collection.objects.link(obj)
    bpy.context.view_layer.update()
    vertices = np.concatenate([mesh_arrays(obj)[0] for obj in objects])
    if len(vertices) == 0 or not np.isfinite(vertices).all():
        raise NearError(f"{path.name}: the meshes have no vertices, or vertices that are not finite")
    normalize = Matrix(normalizing_transform(vertices, path.name).tolist())
    for obj in objects:
        obj.matrix_world = normalize @ obj.matrix_world
    bpy.context.view_layer.update()
    add_material_aovs(objects)
    parts = [mesh_arrays(obj) for obj in objects]
    offsets = np.cumsum([0] + [len(v) for v, _ in parts[:-1]])
    vertices = np.concatenate([v for v, _ in parts])
    triangles = np.concatenate([t + o for (_, t), o in zip(parts, offsets)]).astype(np.int32)
    check_surface(path.name, vertices, triangles)
    return vertices, triangles


def check_surface(name: str, vertices: np.ndarray, triangles: np.ndarray) -> None:
    """Refuse a mesh (in asset space) without a surface: no triangles, or none with area (collinear corners)."""
    if len(triangles) == 0:
        raise NearError(f"{name}: the mesh has no faces (only points or edges): there is no surface to render or "
                        "encode")
    corners = vertices.astype(np.float64)[triangles]
    areas = 0.5 * np.linalg.norm(np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]), axis=-1)
    if not areas.sum() >= MIN_SURFACE_AREA:
        raise NearError(f"{name}: none of its {len(triangles)} triangle(s) has any area (their corners lie on a "
                        "line): there is no surface to render or encode")


def normalizing_transform(vertices: np.ndarray, name: str = "the mesh") -> np.ndarray:
    """The 4x4 that moves the bounding-box centre to the origin and scales the largest side to 1."""
    lo, hi = vertices.min(axis=0).astype(np.float64), vertices.max(axis=0).astype(np.float64)
    extent = float((hi - lo).max())
    if not extent > 0:
        raise NearError(f"{name}: degenerate: its bounding box has no size (all its vertices are one point)")
    m = np.eye(4)
    m[:3, :3] /= extent
    m[:3, 3] = -(lo + hi) / 2 / extent
    return m


def normalized(vertices: np.ndarray) -> np.ndarray:
    """`vertices` moved by `normalizing_transform` into asset space ([-0.5, 0.5]^3), float32."""
    m = normalizing_transform(vertices)
    return (vertices.astype(np.float64) @ m[:3, :3].T + m[:3, 3]).astype(np.float32)


def mesh_arrays(obj) -> tuple[np.ndarray, np.ndarray]:
    """World-space vertices (float32 [N, 3]) and triangles (int32 [M, 3]) of an object with its modifiers applied."""
    import bpy

    evaluated = obj.evaluated_get(bpy.context.evaluated_depsgraph_get())
    mesh = evaluated.to_mesh()
    try:
        mesh.calc_loop_triangles()
        v = np.empty(len(mesh.vertices) * 3, dtype=np.float32)
        mesh.vertices.foreach_get("co", v)
        t = np.empty(len(mesh.loop_triangles) * 3, dtype=np.int32)
        mesh.loop_triangles.foreach_get("vertices", t)
        m = np.array(evaluated.matrix_world, dtype=np.float64)  # current even after edits
        v = (v.reshape(-1, 3) @ m[:3, :3].T + m[:3, 3]).astype(np.float32)
        return v, t.reshape(-1, 3)
    finally:
        evaluated.to_mesh_clear()
