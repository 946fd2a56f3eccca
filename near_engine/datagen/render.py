"""One object of the data set: build it (a procedural recipe, or a mesh file), store its mesh, render its views."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..camera import Camera
from ..cycles.lights import Light
from ..cycles.meshes import import_mesh, mesh_arrays
from ..cycles.render import render_views
from ..cycles.settings import RenderSettings
from ..progress import Progress
from .objects import ObjectRecipe, build_object


def render_object(recipe: ObjectRecipe | Path, cameras: list[Camera], lights: list[Light], lit_views: list[int],
                  out_dir: Path, settings: RenderSettings, progress: Progress | None = None) -> dict:
    """Build the object (a procedural recipe, or a mesh file imported and normalized by `cycles.meshes.import_mesh`)
    in a fresh scene and write its mesh and images into `out_dir`; returns timings.

    Files: `mesh.npz` (vertices, triangles in asset space) and the views of `cycles.render.render_views`. An imported
    mesh's materials write the base_color, roughness, metallic and specular AOVs from their Principled BSDF.
    """
    import bpy

    if isinstance(recipe, Path):
        vertices, triangles = import_mesh(recipe)
    else:
        bpy.ops.wm.read_factory_settings(use_empty=True)
        vertices, triangles = mesh_arrays(build_object(recipe))
    np.savez(out_dir / "mesh.npz", vertices=vertices, triangles=triangles)
    times = render_views(cameras, lights, lit_views, out_dir, settings, progress)
    return {"images": len(times), "seconds_per_image": float(np.mean(times)), "seconds_rendering": float(sum(times))}
