"""Cycles render settings: CPU, few bounces, adaptive sampling and OIDN denoising, scene-linear multilayer EXR."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .materials import AOVS


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
    """Cycles on the CPU, transparent film, box filter of one pixel (as TRELLIS), scene-linear multilayer EXR out,
    with the depth and normal passes and the material AOVs (`materials.AOVS`)."""
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
    if hasattr(render.image_settings, "media_type"):  # Blender 5: a multilayer EXR is a media type of its own
        render.image_settings.media_type = "MULTI_LAYER_IMAGE"
    render.image_settings.file_format = "OPEN_EXR_MULTILAYER"
    render.image_settings.color_depth = "32"
    scene.view_settings.view_transform = "Standard"
    layer = scene.view_layers[0]
    layer.use_pass_z = layer.use_pass_normal = True
    for name, kind in AOVS.items():
        aov = layer.aovs.add()
        aov.name, aov.type = name, kind
