"""Render the objects of the current scene with Cycles into plain EXRs: uniform-lit views with G-buffers, then
views under other lights.

Cycles writes a multilayer EXR to a temporary file; it is read back and rewritten with plain channel names (colour as
half, depth as float), so what is stored does not depend on Blender's layer naming.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import numpy as np

from ..camera import Camera
from ..exr_layers import read_channels, read_render_passes, stack_channels
from ..images import write_exr
from ..progress import Progress
from .lights import UNIFORM, Light, apply_light, bake_sky
from .quiet import render_still
from .settings import RenderSettings, configure_cycles
from .views import add_camera, blender_camera_matrix

# Our channel prefix -> (Blender's multilayer pass, its channel letters, ours), for the uniform-lit G-buffer file.
GBUFFER_CHANNELS = {"": ("Combined", "RGBA", "RGBA"), "depth.": ("Depth", "Z", "Z"),
                    "normal.": ("Normal", "XYZ", "XYZ"), "base_color.": ("base_color", "RGB", "RGB"),
                    "roughness.": ("roughness", "X", "V"), "metallic.": ("metallic", "X", "V"),
                    "specular.": ("specular", "X", "V")}
LIT_CHANNELS = {"": ("Combined", "RGBA", "RGBA")}


def read_uniform_views(out_dir: Path, count: int) -> dict[str, np.ndarray]:
    """What `render_views` wrote into `out_dir` for its first `count` cameras under the uniform light, stacked:
    "rgba" [V, H, W, 4], "alpha" [V, H, W, 1], "depth" [V, H, W] and the material G-buffers, premultiplied as Cycles
    filters them: "base_color" [V, H, W, 3], "roughness", "metallic", "specular" [V, H, W]."""
    views = [read_channels(Path(out_dir) / "uniform" / f"view_{v:03d}.exr") for v in range(count)]
    out = {"rgba": np.stack([stack_channels(v, "", "RGBA") for v in views]),
           "depth": np.stack([v["depth.Z"] for v in views]),
           "base_color": np.stack([stack_channels(v, "base_color.", "RGB") for v in views])}
    out.update({name: np.stack([v[f"{name}.V"] for v in views]) for name in ("roughness", "metallic", "specular")})
    out["alpha"] = out["rgba"][..., 3:]
    return out


def image_count(cameras: int, lights: int, lit_views: int) -> int:
    """How many images `render_views` renders: every camera uniform-lit, `lit_views` under each light."""
    return cameras + lights * lit_views


def render_views(cameras: list[Camera], lights: list[Light], lit_views: list[int], out_dir: Path,
                 settings: RenderSettings, progress: Progress | None = None) -> list[float]:
    """Render what is in the current scene (objects in asset space) into `out_dir`; returns the seconds each image
    took.

    Files: `uniform/view_XXX.exr` (RGBA, depth, normal, base_color, roughness, metallic, specular) for every camera;
    `<light.name>/view_XXX.exr` (RGBA) for each light and each view in `lit_views`; `sky.exr`, the baked map a sky
    light's views are rendered under. `progress` advances by one per image (default: a bar of its own).
    """
    import bpy

    scene = bpy.context.scene
    configure_cycles(scene, settings)
    camera_obj = add_camera(scene, fov_deg=math.degrees(2 * math.atan(0.5 * cameras[0].width / cameras[0].fx)))
    times = []
    jobs = [(UNIFORM, i, GBUFFER_CHANNELS) for i in range(len(cameras))]
    jobs += [(light, i, LIT_CHANNELS) for light in lights for i in lit_views]
    bar = progress or Progress("rendering views with Cycles", len(jobs))
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
            camera_obj.matrix_world = blender_camera_matrix(cameras[view])
            start = time.perf_counter()
            render_still(scene, str(Path(tmp) / "render.exr"))
            times.append(time.perf_counter() - start)
            folder = out_dir / light.name
            folder.mkdir(exist_ok=True)
            _rewrite_exr(Path(scene.render.filepath), folder / f"view_{view:03d}.exr", channels)
            bar.advance()
    if progress is None:
        bar.close()
    return times


def _rewrite_exr(source: Path, target: Path, channels: dict[str, tuple[str, str, str]]) -> None:
    """Copy the wanted passes of Blender's multilayer EXR into a plain EXR: half colour, float depth."""
    found = read_render_passes(source)
    write_exr(target, {prefix + ours: found[f"{blender_pass}.{theirs}"].astype(
                           np.float32 if blender_pass == "Depth" else np.float16)
                       for prefix, (blender_pass, letters, our_letters) in channels.items()
                       for theirs, ours in zip(letters, our_letters)})
