"""Bring any mesh Blender can import into asset space: OBJ (+MTL, textures), glTF/GLB, PLY, objects of a .blend.

The imported objects are normalized together by their world bounding box: centre to the origin, largest side to 1
(Z up, as Blender's importers already convert). A mesh that is already normalized that way keeps its placement (the
transform is then the identity up to rounding). bpy is imported inside functions: this module is engine code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import NearError
from .objects import mesh_arrays

IMPORTERS = {".obj": "obj", ".gltf": "gltf", ".glb": "gltf", ".ply": "ply", ".blend": "blend"}


def import_mesh(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Import `path` into a fresh empty scene and normalize it; returns its (vertices, triangles) in asset space.

    The scene keeps the normalized objects (with their materials), ready for `render.render_views`; every material
    also writes its base colour, roughness, metallic and Specular IOR Level to the G-buffer AOVs
    (`objects.add_material_aovs`), so the mesh's own materials become its material latents.
    """
    import bpy

    path = Path(path)
    kind = IMPORTERS.get(path.suffix.lower())
    if kind is None:
        raise NearError(f"{path.name}: cannot import '{path.suffix}' meshes; use one of {', '.join(IMPORTERS)}")
    if not path.is_file():
        raise NearError(f"{path}: no such file")
    bpy.ops.wm.read_factory_settings(use_empty=True)
    try:
        _import(bpy, kind, path)
    except RuntimeError as error:  # importers report bad files as operator errors
        raise NearError(f"{path.name}: Blender could not import it ({str(error).strip()})") from None
    objects = [obj for obj in bpy.context.scene.objects if obj.type == "MESH"]
    if not objects:
        raise NearError(f"{path.name}: the file holds no mesh objects")
    parts = [mesh_arrays(obj) for obj in objects]
    vertices = np.concatenate([v for v, _ in parts])
    if len(vertices) == 0 or not np.isfinite(vertices).all():
        raise NearError(f"{path.name}: the meshes have no vertices, or vertices that are not finite")
    transform = normalizing_transform(vertices)
    from mathutils import Matrix

    normalize = Matrix(transform.tolist())
    for obj in objects:  # flatten the hierarchy: each mesh keeps its world placement, then is normalized
        placed = obj.matrix_world.copy()
        obj.parent = None
        obj.matrix_world = normalize @ placed
    bpy.context.view_layer.update()
    from .objects import add_material_aovs

    add_material_aovs(objects)
    parts = [mesh_arrays(obj) for obj in objects]
    offsets = np.cumsum([0] + [len(v) for v, _ in parts[:-1]])
    return (np.concatenate([v for v, _ in parts]),
            np.concatenate([t + o for (_, t), o in zip(parts, offsets)]).astype(np.int32))


def normalizing_transform(vertices: np.ndarray) -> np.ndarray:
    """The 4x4 that moves the bounding-box centre to the origin and scales the largest side to 1."""
    lo, hi = vertices.min(axis=0).astype(np.float64), vertices.max(axis=0).astype(np.float64)
    extent = float((hi - lo).max())
    if not extent > 0:
        raise NearError("the mesh is degenerate: its bounding box has no size")
    m = np.eye(4)
    m[:3, :3] /= extent
    m[:3, 3] = -(lo + hi) / 2 / extent
    return m


def _import(bpy, kind: str, path: Path) -> None:
    if kind == "obj":
        bpy.ops.wm.obj_import(filepath=str(path))
    elif kind == "ply":
        bpy.ops.wm.ply_import(filepath=str(path))
    elif kind == "gltf":
        import addon_utils

        addon_utils.enable("io_scene_gltf2", default_set=False)
        bpy.ops.import_scene.gltf(filepath=str(path))
    else:
        with bpy.data.libraries.load(str(path), link=False) as (source, target):
            target.objects = list(source.objects)
        for obj in target.objects:
            if obj is not None and obj.type == "MESH":
                bpy.context.scene.collection.objects.link(obj)
