"""Render one object with Cycles on the CPU: uniform-lit views with G-buffers, then the relit views.

Each object gets a fresh empty scene. Cycles writes a multilayer EXR to a temporary file; it is read back and
rewritten with plain channel names (colour as half, depth as float), so the data set does not depend on Blender's
layer naming. Settings are chosen for speed on a few CPU cores (see `RenderSettings`).
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import OpenEXR

from ..camera import BLENDER_TO_OPENCV, Camera
from ..images import write_exr
from .lights import UNIFORM, Light, apply_light, bake_sky
from .objects import AOVS, ObjectRecipe, build_object, mesh_arrays

# Our channel prefix -> (Blender's multilayer pass, its channel letters, ours), for the uniform-lit G-buffer file.
GBUFFER_CHANNELS = {"": ("Combined", "RGBA", "RGBA"), "depth.": ("Depth", "Z", "Z"),
                    "normal.": ("Normal", "XYZ", "XYZ"), "base_color.": ("base_color", "RGB", "RGB"),
                    "roughness.": ("roughness", "X", "V"), "metallic.": ("metallic", "X", "V"),
                    "specular.": ("specular", "X", "V")}
LIT_CHANNELS = {"": ("Combined", "RGBA", "RGBA")}


@dataclass(frozen=True)
class RenderSettings:
    """Cycles settings. Small bounce counts and adaptive sampling + OIDN denoising keep an image near a second."""

    size: int = 128
    samples: int = 16
    denoise: bool = True
    diffuse_bounces: int = 2
    glossy_bounces: int = 2

    def to_json(self) -> dict:
        return asdict(self)


def configure_cycles(scene, settings: RenderSettings) -> None:
    """Cycles on the CPU, transparent film, box filter of one pixel (as TRELLIS), scene-linear multilayer EXR out."""
    import _cycles

    scene.render.engine = "CYCLES"
    cycles = scene.cycles
    cycles.device = "CPU"
    cycles.samples = settings.samples
    cycles.use_adaptive_sampling = True
    cycles.use_denoising = settings.denoise and bool(_cycles.with_openimagedenoise)
    cycles.denoiser = "OPENIMAGEDENOISE"
    cycles.max_bounces = settings.diffuse_bounces + settings.glossy_bounces
    cycles.diffuse_bounces, cycles.glossy_bounces = settings.diffuse_bounces, settings.glossy_bounces
    cycles.transmission_bounces = cycles.transparent_max_bounces = 3
    cycles.volume_bounces = 0
    cycles.caustics_reflective = cycles.caustics_refractive = False
    cycles.pixel_filter_type, cycles.filter_width = "BOX", 1.0
    render = scene.render
    render.resolution_x = render.resolution_y = settings.size
    render.resolution_percentage = 100
    render.film_transparent = True
    render.use_persistent_data = True  # keep the BVH between the views of one object
    render.image_settings.file_format = "OPEN_EXR_MULTILAYER"
    render.image_settings.color_depth = "32"
    scene.view_settings.view_transform = "Standard"
    layer = scene.view_layers[0]
    layer.use_pass_z = layer.use_pass_normal = True
    for name, kind in AOVS.items():
        aov = layer.aovs.add()
        aov.name, aov.type = name, kind


def add_camera(scene, fov_deg: float):
    """A square-image pinhole camera with the horizontal field of view `fov_deg`, made the scene's camera."""
    import bpy

    data = bpy.data.cameras.new("camera")
    data.sensor_fit, data.angle = "HORIZONTAL", math.radians(fov_deg)
    data.clip_start, data.clip_end = 0.1, 100.0
    obj = bpy.data.objects.new("camera", data)
    scene.collection.objects.link(obj)
    scene.camera = obj
    return obj


def render_object(recipe: ObjectRecipe | Path, cameras: list[Camera], lights: list[Light], lit_views: list[int],
                  out_dir: Path, settings: RenderSettings, log: Callable[[str], object] = print) -> dict:
    """Build the object (a procedural recipe, or a mesh file imported and normalized by `meshes.import_mesh`) in a
    fresh scene and write its mesh and images into `out_dir`; returns timings.

    Files: `mesh.npz`; `uniform/view_XXX.exr` (RGBA, depth, normal, base_color, roughness, metallic) for every camera;
    `<light.name>/view_XXX.exr` (RGBA) for each light and each view in `lit_views`; `sky.exr`, the baked map a sky
    light's views are rendered under. An imported mesh's own materials do not write the base_color, roughness,
    metallic and specular AOVs, so those passes are zero for it.
    """
    import bpy

    from .meshes import import_mesh

    if isinstance(recipe, Path):
        vertices, triangles = import_mesh(recipe)
    else:
        bpy.ops.wm.read_factory_settings(use_empty=True)
        vertices, triangles = mesh_arrays(build_object(recipe))
    np.savez(out_dir / "mesh.npz", vertices=vertices, triangles=triangles)
    times = render_views(cameras, lights, lit_views, out_dir, settings)
    name = recipe.name if isinstance(recipe, Path) else recipe.index
    log(f"  {name}: {len(times)} images, {np.mean(times):.2f} s per image")
    return {"images": len(times), "seconds_per_image": float(np.mean(times)), "seconds_rendering": float(sum(times))}


def render_views(cameras: list[Camera], lights: list[Light], lit_views: list[int], out_dir: Path,
                 settings: RenderSettings) -> list[float]:
    """Render what is in the current scene (objects in asset space) into `out_dir`, as `render_object` describes;
    returns the seconds each image took. Uniform-lit views always; `lit_views` under each of `lights`."""
    import bpy

    scene = bpy.context.scene
    configure_cycles(scene, settings)
    camera_obj = add_camera(scene, fov_deg=math.degrees(2 * math.atan(0.5 * cameras[0].width / cameras[0].fx)))
    times = []
    jobs = [(UNIFORM, i, GBUFFER_CHANNELS) for i in range(len(cameras))]
    jobs += [(light, i, LIT_CHANNELS) for light in lights for i in lit_views]
    current = None
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        for light, view, channels in jobs:
            if light != current:
                envmap_file = None
                if light.kind == "sky":
                    envmap_file = str(out_dir / "sky.exr")
                    bake_sky(scene, light, envmap_file)
                apply_light(scene, light, envmap_file)
                current = light
            camera_obj.matrix_world = _blender_matrix(cameras[view])
            start = time.perf_counter()
            scene.render.filepath = os.path.join(tmp, "render.exr")
            bpy.ops.render.render(write_still=True)
            times.append(time.perf_counter() - start)
            folder = out_dir / light.name
            folder.mkdir(exist_ok=True)
            _rewrite_exr(Path(scene.render.filepath), folder / f"view_{view:03d}.exr", channels)
    return times


def _blender_matrix(camera: Camera):
    """The Blender camera object matrix (looks down -Z, +Y up) of an OpenCV-axes camera."""
    from mathutils import Matrix

    return Matrix((camera.camera_to_world @ BLENDER_TO_OPENCV).tolist())


def _rewrite_exr(source: Path, target: Path, channels: dict[str, tuple[str, str, str]]) -> None:
    """Copy the wanted passes of Blender's multilayer EXR into a plain EXR: half colour, float depth."""
    exr = OpenEXR.File(str(source), separate_channels=True)
    found = {name.split(".", 1)[1]: c.pixels for name, c in exr.channels().items()}  # drop the view layer's name
    write_exr(target, {prefix + ours: found[f"{blender_pass}.{theirs}"].astype(
                           np.float32 if blender_pass == "Depth" else np.float16)
                       for prefix, (blender_pass, letters, our_letters) in channels.items()
                       for theirs, ours in zip(letters, our_letters)})
