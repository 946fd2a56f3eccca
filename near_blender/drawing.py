"""Drawing the viewport image: a float RGBA array -> GPU texture -> a quad over the viewport region.

`RenderEngine.bind_display_space_shader` (Blender 4.x) binds the builtin "IMAGE" shader (`GPU_SHADER_3D_IMAGE`,
sampler "image" in slot 0); the viewport's colour buffer is scene-linear and Blender's draw manager applies the view
transform (AgX, Filmic...) afterwards. So the engine's `view_draw` calls `bind_display_space_shader(scene)`,
`draw_rgba(...)`, `unbind_display_space_shader()`, and `draw_rgba` draws with that same builtin shader.
Only call this where the `gpu` module works: inside `view_draw`, or inside `render()` of an engine with
`bl_use_gpu_context = True` in background mode.
"""

from __future__ import annotations

import gpu
import numpy as np
from gpu_extras.batch import batch_for_shader

__all__ = ["draw_rgba", "TextureCache", "TEXTURES"]

# A unit quad as two triangles; the model-view matrix scales it onto the region.
_CORNERS = ((0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0))
_TRIANGLES = ((0, 1, 2), (2, 3, 0))


class TextureCache:
    """One GPU texture for the last image drawn: a redraw of an unchanged image (the same array) uploads nothing.

    Viewport images are never changed in place (the worker publishes a new read-only array per image), so identity
    of the array is identity of the content.
    """

    def __init__(self) -> None:
        self._image: np.ndarray | None = None
        self._texture: gpu.types.GPUTexture | None = None

    def texture_for(self, image: np.ndarray) -> gpu.types.GPUTexture:
        """The texture holding `image` ([H, W, 4] float32, top row first), uploading it only if it is new."""
        if image is not self._image:
            height, width = image.shape[:2]
            # GL textures start at the bottom row: flip while flattening (one copy either way)
            flat = np.ascontiguousarray(image[::-1], dtype=np.float32).reshape(-1)
            data = gpu.types.Buffer("FLOAT", flat.size, flat)
            self._texture = gpu.types.GPUTexture((width, height), format="RGBA32F", data=data)
            self._image = image
        return self._texture

    def clear(self) -> None:
        """Drop the texture (when the engine is freed), so no GPU memory outlives the viewport."""
        self._image = self._texture = None


#: The cache `draw_rgba` uses; Blender draws viewports one at a time on its UI thread.
TEXTURES = TextureCache()


def draw_rgba(image: np.ndarray, width: int, height: int) -> None:
    """Draw `image` ([H, W, 4] float32 scene-linear, premultiplied alpha, top row first) over (0, 0)-(width, height).

    Coordinates are the region's pixels, as Blender sets them up for `view_draw`; the image is stretched to cover
    the region, so a reduced-resolution preview fills it too.
    """
    if image.ndim != 3 or image.shape[2] != 4:
        raise ValueError(f"draw_rgba needs an [H, W, 4] image, got shape {image.shape}")
    texture = TEXTURES.texture_for(image)
    shader = gpu.shader.from_builtin("IMAGE")  # the shader bind_display_space_shader binds
    batch = batch_for_shader(shader, "TRIS", {"pos": _CORNERS, "texCoord": _CORNERS}, indices=_TRIANGLES)
    gpu.state.blend_set("ALPHA_PREMULT")
    with gpu.matrix.push_pop():
        gpu.matrix.scale((width, height))
        shader.uniform_sampler("image", texture)
        batch.draw(shader)
    gpu.state.blend_set("NONE")
