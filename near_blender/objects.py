"""NeAR objects <-> .near assets.

A NeAR object is a mesh object with one vertex per voxel, at the voxel centre in asset space, and one FLOAT point
attribute per latent channel (`near_latent_00`, ...; extra latents as `near_x.<name>.<k>`), plus the `Object.near`
settings (grid resolution, latent kind, model, source). It is saved inside the .blend, undoable, movable and
instanceable like any mesh, and a render farm needs no side files.
"""

from __future__ import annotations

import bpy
import numpy as np

from near_engine.asset import Asset
from near_engine.errors import AssetError

LATENT_PREFIX = "near_latent_"
EXTRA_PREFIX = "near_x."
#: How far (in voxels) a vertex may sit from its voxel centre before the object is called off-grid.
GRID_TOLERANCE = 0.05


def latent_attribute(channel: int) -> str:
    return f"{LATENT_PREFIX}{channel:02d}"


def extra_attribute(name: str, column: int) -> str:
    return f"{EXTRA_PREFIX}{name}.{column}"


def is_near_object(obj: bpy.types.Object | None) -> bool:
    return obj is not None and obj.type == "MESH" and obj.near.is_near


def asset_to_mesh(asset: Asset, name: str) -> bpy.types.Mesh:
    """A new mesh holding `asset`: vertices at the voxel centres, the latent (and extras) as point attributes."""
    columns = [(latent_attribute(c), asset.feats[:, c]) for c in range(asset.channels)]
    for key, table in asset.extras.items():
        table = table.reshape(asset.num_voxels, -1)
        columns += [(extra_attribute(key, k), table[:, k]) for k in range(table.shape[1])]
    too_long = [attr for attr, _ in columns if len(attr.encode()) > 63]
    if too_long:
        raise AssetError(f"the asset's extra latent name is too long for a Blender attribute: {too_long[0]!r}")

    mesh = bpy.data.meshes.new(name)
    mesh.vertices.add(asset.num_voxels)
    mesh.vertices.foreach_set("co", asset.voxel_centers().astype(np.float32).ravel())
    for attr, values in columns:
        mesh.attributes.new(attr, "FLOAT", "POINT").data.foreach_set("value", np.ascontiguousarray(values, np.float32))
    mesh.update()
    return mesh


def asset_to_object(asset: Asset, name: str, collection: bpy.types.Collection) -> bpy.types.Object:
    """A new NeAR object for `asset`, linked into `collection` (drawn as its bounds box outside the NeAR engine)."""
    obj = bpy.data.objects.new(name, asset_to_mesh(asset, name))
    settings = obj.near
    settings.is_near = True
    settings.resolution = asset.resolution
    settings.latent = asset.latent
    settings.model = asset.model
    settings.source = asset.source
    obj.display_type = "BOUNDS"
    collection.objects.link(obj)
    return obj


def object_to_asset(obj: bpy.types.Object) -> Asset:
    """The asset held by a NeAR object (evaluated or original): every problem is an `AssetError` naming the object."""
    if not is_near_object(obj):
        raise AssetError(f"'{obj.name}' is not a NeAR object")
    mesh = obj.data
    n = len(mesh.vertices)
    settings = obj.near
    resolution = int(settings.resolution)
    if n == 0:
        raise AssetError(f"NeAR object '{obj.name}' has no voxels (its mesh has no vertices)")

    names = {attr.name: attr for attr in mesh.attributes}
    channels = 0
    while latent_attribute(channels) in names:
        channels += 1
    if channels == 0:
        raise AssetError(f"NeAR object '{obj.name}' has lost its latent: no '{latent_attribute(0)}' attribute on its "
                         "mesh (was it edited or replaced?). Import the asset again")
    extras = _extra_columns(obj.name, [attr for attr in names if attr.startswith(EXTRA_PREFIX)])

    def column(attr_name: str) -> np.ndarray:
        attr = names[attr_name]
        if attr.domain != "POINT" or attr.data_type != "FLOAT":
            raise AssetError(f"NeAR object '{obj.name}': attribute '{attr_name}' is not a float point attribute")
        values = np.empty(n, np.float32)
        attr.data.foreach_get("value", values)
        return values

    positions = np.empty(n * 3, np.float32)
    mesh.vertices.foreach_get("co", positions)
    grid = (positions.reshape(n, 3).astype(np.float64) + 0.5) * resolution - 0.5
    coords = np.rint(grid)
    if not np.isfinite(grid).all() or np.abs(grid - coords).max() > GRID_TOLERANCE:
        raise AssetError(f"NeAR object '{obj.name}': its vertices are no longer on the {resolution}^3 voxel grid "
                         "(were they moved in Edit Mode or by a modifier?). Undo the edit or import the asset again")
    feats = np.stack([column(latent_attribute(c)) for c in range(channels)], axis=1)
    extra_tables = {key: np.stack([column(a) for a in cols], axis=1) for key, cols in extras.items()}
    try:
        return Asset(coords.astype(np.int64), feats, extra_tables, resolution=resolution, latent=settings.latent,
                     model=settings.model, source=settings.source)
    except AssetError as error:
        raise AssetError(f"NeAR object '{obj.name}': {error}") from None


def _extra_columns(object_name: str, attributes: list[str]) -> dict[str, list[str]]:
    """Extra-latent attributes (`near_x.<name>.<k>`) grouped by name, in column order 0..k-1; a renamed or missing
    column is an `AssetError` naming the attribute (the mesh was edited: a render must not guess)."""
    columns: dict[str, dict[int, str]] = {}
    for attr in attributes:
        key, _, column = attr[len(EXTRA_PREFIX):].rpartition(".")
        if not key or not column.isdecimal() or not column.isascii():
            raise AssetError(f"NeAR object '{object_name}': attribute '{attr}' is not an extra latent column "
                             f"('{EXTRA_PREFIX}<name>.<column>'); rename or delete it, or import the asset again")
        columns.setdefault(key, {})[int(column)] = attr
    grouped = {}
    for key, by_index in columns.items():
        missing = sorted(set(range(max(by_index) + 1)) - set(by_index))
        if missing:
            raise AssetError(f"NeAR object '{object_name}': extra latent '{key}' has lost its column {missing[0]} "
                             f"(no attribute '{extra_attribute(key, missing[0])}'); import the asset again")
        grouped[key] = [by_index[i] for i in range(len(by_index))]
    return grouped
