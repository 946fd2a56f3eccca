"""The one table of render passes: what each is, which Gaussian batch makes it, and how Blender and EXR files name it.

The rasterizer (`frame.rasterize_passes`), the pipeline, the `near render` command and the Blender add-on (pass
registration, view-layer switches, the Passes panel) all derive what they need from `PASSES`, so adding a pass is a
row here plus the code that computes its per-Gaussian values.

`source` says where a pass comes from:
* "combined": the lit colour over the background, with alpha (the lit batch's rasterization);
* "lit" / "intrinsic": a per-Gaussian channel of the lit batch (scales ŝ) or the intrinsic batch (scales s);
* "alpha" / "depth": the intrinsic batch's coverage and expected depth.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RenderPass", "PASSES", "PASS_NAMES", "BY_NAME", "BLENDER_PASSES", "exr_channels", "gaussian_channels"]


@dataclass(frozen=True)
class RenderPass:
    """One render pass. `blender_name` is None for passes Blender's render result does not get (alpha is Combined's
    own; the specular level is an engine pass only). `switch` is the view-layer property that enables it: Blender's
    own (`use_pass_z`) or ours on `ViewLayer.near` (`near.use_pass_base_color`); None for Combined (always on) and the engine-only
    passes (alpha, specular)."""

    name: str
    channels: int
    source: str
    description: str
    exr_layer: str  # channel-name prefix in a multilayer EXR, as Blender writes it ("" for Combined)
    exr_letters: str  # one letter per channel
    blender_name: str | None = None
    blender_letters: str = ""  # Blender's channel ids (RenderEngine.register_pass's chan_id)
    blender_type: str = "VALUE"  # "COLOR", "VECTOR" or "VALUE"
    switch: str | None = None

    @property
    def label(self) -> str:
        return self.blender_name or self.name.replace("_", " ").title()

    @property
    def own_switch(self) -> str | None:
        """The attribute on `ViewLayer.near` for passes whose switch is ours, else None."""
        owner, _, attr = (self.switch or "").rpartition(".")
        return attr if owner == "near" else None


PASSES: tuple[RenderPass, ...] = (
    RenderPass("combined", 4, "combined", "HDR RGBA: the relit objects over the world (premultiplied when "
               "transparent)", "", "RGBA", "Combined", "RGBA", "COLOR"),
    RenderPass("depth", 1, "depth", "Distance along the view axis (Blender's Z pass)", "Depth.", "Z", "Depth", "Z",
               "VALUE", "use_pass_z"),
    RenderPass("alpha", 1, "alpha", "Coverage of the NeAR objects", "Alpha.", "V"),
    RenderPass("base_color", 3, "intrinsic", "Albedo of the NeAR objects (scene-linear)", "BaseColor.", "RGB",
               "Base Color", "RGB", "COLOR", "near.use_pass_base_color"),
    RenderPass("roughness", 1, "intrinsic", "Roughness of the NeAR objects", "Roughness.", "V", "Roughness",
               "X", "VALUE", "near.use_pass_roughness"),
    RenderPass("metallic", 1, "intrinsic", "Metallic of the NeAR objects", "Metallic.", "V", "Metallic", "X", "VALUE",
               "near.use_pass_metallic"),
    RenderPass("specular", 1, "intrinsic", "Specular level of the NeAR objects (near-tiny: Principled's Specular "
               "IOR Level)", "Specular.", "V"),
    RenderPass("normal", 3, "intrinsic", "Unit surface normal (world space)", "Normal.", "XYZ", "Normal", "XYZ",
               "VECTOR", "use_pass_normal"),
    RenderPass("shadow", 1, "lit", "Shadow the world light casts on the NeAR objects (1: unshadowed)", "Shadow.",
               "V", "Shadow", "X", "VALUE", "near.use_pass_shadow"),
)

PASS_NAMES: tuple[str, ...] = tuple(p.name for p in PASSES)
BY_NAME: dict[str, RenderPass] = {p.name: p for p in PASSES}
#: The passes beyond Combined that Blender's render result gets, in table order.
BLENDER_PASSES: tuple[RenderPass, ...] = tuple(p for p in PASSES if p.blender_name and p.switch)


def gaussian_channels(source: str) -> tuple[RenderPass, ...]:
    """The per-Gaussian channel passes of one batch ("intrinsic" or "lit"), in the order they are rasterized."""
    return tuple(p for p in PASSES if p.source == source)


def exr_channels(images: dict[str, "object"]) -> dict[str, "object"]:
    """{EXR channel name: [H, W] image} for rendered passes {name: [H, W, k]} (Blender's multilayer EXR names)."""
    channels = {}
    for name, image in images.items():
        render_pass = BY_NAME[name]
        for i, letter in enumerate(render_pass.exr_letters):
            channels[render_pass.exr_layer + letter] = image[..., i]
    return channels
