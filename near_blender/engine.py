"""The NeAR render engine: final renders (F12, animation, command line) and the interactive viewport.

Both paths describe the scene with `scene.describe` and render it with the shared `NearPipeline` (`runtime`). Every
user-facing problem is a `NearError`, reported through the engine instead of raised, so the user sees a message and
the .blend is left as it was; any other exception in a final render is reported the same way (with its traceback on
the console), so a failed frame is a failed render, never a saved blank frame. The viewport never blocks Blender's UI
thread on model work: `viewport.ViewportRenderer` renders on its own thread and `view_draw` only draws the latest
finished image; a World that needs a Cycles bake is baked on a thread of its own while the previous light stays
(`ViewState`).
"""

from __future__ import annotations

import functools
import threading
import traceback
import weakref
from typing import Callable

import bpy
import numpy as np

from near_engine.camera import Camera
from near_engine.envmap import EnvMap
from near_engine.errors import NearError
from near_engine.passes import BLENDER_PASSES, BY_NAME
from near_engine.pipeline import LRUCache, Scene

from . import runtime, world
from .scene import AssetCache, WorldLight, border_rect, describe, near_instances, render_camera, world_light
from .world import BakeStarted, PreparedBake

#: One bake cache for procedural worlds, shared by renders and viewports (bakes take seconds).
_bake_cache = LRUCache(4)
#: Each viewport engine's render thread, by id(engine): kept outside the engine so `__del__` and `unregister` can stop
#: it even after Blender has freed the engine's own data.
_viewports: dict = {}


def _stop_viewport(engine_id: int) -> None:
    viewport = _viewports.pop(engine_id, None)
    if viewport is not None:
        viewport.stop()
        if not _viewports and threading.current_thread() is threading.main_thread():  # GPU work: main thread only
            from .drawing import TEXTURES

            TEXTURES.clear()


class RenderCancelled(Exception):
    """The user pressed Esc during a final render."""


def enabled_passes(view_layer: bpy.types.ViewLayer) -> list[str]:
    """The NeAR passes this view layer asks for (`passes.BLENDER_PASSES`, in table order)."""
    owner = lambda p: view_layer.near if p.own_switch else view_layer  # noqa: E731
    return [p.name for p in BLENDER_PASSES if getattr(owner(p), p.own_switch or p.switch)]


def result_rows(pixels: np.ndarray) -> np.ndarray:
    """[H, W, k] top row first -> Blender's pass layout: [H*W, k], bottom row first."""
    return np.ascontiguousarray(pixels[::-1]).reshape(-1, pixels.shape[-1])


class NearRenderEngine(bpy.types.RenderEngine):
    bl_idname = "NEAR"
    bl_label = "NeAR"
    bl_use_preview = False
    bl_use_shading_nodes_custom = False  # keep the World's nodes: users light NeAR objects with an Environment Texture
    bl_use_postprocess = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._view = None  # what view_update read: ViewState
        self._submitted = None  # view_key of the last submitted view

    def __del__(self) -> None:
        # Blender may free the engine's RNA data before Python collects it, so no attribute of `self` is touched here.
        _stop_viewport(id(self))

    @property
    def _viewport(self):
        return _viewports.get(id(self))

    # ---- final render --------------------------------------------------------------------------------------------

    def update_render_passes(self, scene: bpy.types.Scene | None = None,
                             renderlayer: bpy.types.ViewLayer | None = None) -> None:
        self.register_pass(scene, renderlayer, "Combined", 4, "RGBA", "COLOR")
        for name in enabled_passes(renderlayer):
            p = BY_NAME[name]
            self.register_pass(scene, renderlayer, p.blender_name, len(p.blender_letters), p.blender_letters,
                               p.blender_type)

    def render(self, depsgraph: bpy.types.Depsgraph) -> None:
        """A final render. Any failure ends as an engine error, never as an exception: Blender then sets its break
        flag (an ERROR report does), so no frame is written, `-a` stops, and background Blender exits with 1."""
        try:
            self._render(depsgraph)
        except RenderCancelled:
            pass
        except NearError as error:
            self._fail(str(error))
        except Exception as error:  # a defect: fail the render loudly instead of saving an empty frame
            traceback.print_exc()
            self._fail(f"the render failed ({type(error).__name__}: {error}); the console has the details")

    def _say(self, status: str) -> None:
        """A status line that also reaches the console: Blender 5 no longer prints status lines in background."""
        self.update_stats("", status)
        print(status.replace(" | ", ": ", 1), flush=True)

    def _fail(self, message: str) -> None:
        self.error_set(f"NeAR: {message}")  # shown over the Render Result
        self.report({"ERROR"}, f"NeAR: {message}")

    def _render(self, depsgraph: bpy.types.Depsgraph) -> None:
        scene, view_layer = depsgraph.scene, depsgraph.view_layer
        passes = enabled_passes(view_layer)
        pipeline = runtime.pipeline(scene, on_load=lambda: self.update_stats("", "NeAR | Loading weights"))
        self.update_stats("", "NeAR | Reading the scene")
        light = world_light(depsgraph, _bake_cache)
        engine_scene, warnings = describe(depsgraph, render_camera(depsgraph), world=light)
        for message in warnings:
            self.report({"WARNING"}, message)
        rendering = f"NeAR | Rendering {len(engine_scene.objects)} object(s)"
        self.update_stats("", rendering)
        with runtime.announce_compilation(functools.partial(self._say, f"{rendering}: compiling CPU kernels, once "
                                                                         "(this takes a while)")):
            images = pipeline.render(engine_scene, ("combined", *passes), progress=self._progress)
        if self.test_break():
            return

        rect = border_rect(scene.render)
        for name in passes:
            p = BY_NAME[name]
            if p.own_switch:  # Blender adds the passes of its own switches (Z, Normal) itself
                self.add_pass(p.blender_name, len(p.blender_letters), p.blender_letters, layer=view_layer.name)
        # begin_result counts from the render border's corner, not the frame's
        result = self.begin_result(0, 0, rect.width, rect.height, layer=view_layer.name)
        try:
            if (result.resolution_x, result.resolution_y) != (rect.width, rect.height):  # never a wrong-sized rect
                raise NearError(f"Blender expected a {result.resolution_x}x{result.resolution_y} result, "
                                f"NeAR rendered {rect.width}x{rect.height}")
            layer = result.layers[0]
            layer.passes["Combined"].rect = result_rows(images["combined"])
            for name in passes:
                layer.passes[BY_NAME[name].blender_name].rect = result_rows(images[name])
        except BaseException:
            self.end_result(result, cancel=True)
            raise
        self.end_result(result)
        self.update_progress(1.0)

    def _progress(self, fraction: float) -> None:
        self.update_progress(fraction)
        if self.test_break():
            raise RenderCancelled


    # ---- viewport ------------------------------------------------------------------------------------------------

    def view_update(self, context: bpy.types.Context, depsgraph: bpy.types.Depsgraph) -> None:
        """On Blender's UI thread: read what changed (objects, world, weights) into plain data; no model work."""
        from .viewport import ViewportRenderer

        scene = depsgraph.scene
        if self._viewport is None:
            # The thread holds no reference to the engine (so Blender can free it, and __del__ stop the thread): it
            # renders from the ViewState object and redraws through a weak reference.
            redraw = functools.partial(_redraw, weakref.ref(self))
            self._view = ViewState(redraw)
            _viewports[id(self)] = ViewportRenderer(functools.partial(_render_view, self._view), redraw,
                                                    preview_scale=scene.near.viewport_scale)
        self._view = ViewState.read(depsgraph, self._view)
        self._viewport.preview_scale = scene.near.viewport_scale
        self._submitted = None  # the scene changed: render again even if the view did not

    def view_draw(self, context: bpy.types.Context, depsgraph: bpy.types.Depsgraph) -> None:
        """Submit the current view if it changed, then draw the latest finished image through the display transform."""
        from .drawing import draw_rgba
        from .viewport import view_key

        if self._view is None or self._viewport is None:
            return
        if self._view.apply_bakes(depsgraph):  # a World bake finished on its thread: light with it now
            self._submitted = None
        region, region_3d = context.region, context.region_data
        camera = Camera.from_projection(np.array(region_3d.window_matrix), np.array(region_3d.view_matrix),
                                        region.width, region.height)
        key = view_key(camera)
        if key != self._submitted:
            self._viewport.submit(Scene(self._view.objects, self._view.world.envmap, camera, self._view.transparent))
            self._submitted = key
        image = self._viewport.result()
        if image is not None:
            self.bind_display_space_shader(depsgraph.scene)
            draw_rgba(image.rgba, region.width, region.height)
            self.unbind_display_space_shader()
        baking = "Baking the World with Cycles..." if self._view.baking else ""
        message = self._view.error or self._viewport.error or baking or "; ".join(self._view.world.warnings)
        self.update_stats("", f"NeAR: {message}" if message else "")


def _render_view(view: "ViewState", scene: Scene) -> np.ndarray:
    """Runs on the viewport thread: only plain data from `ViewState` is used here, never bpy data."""
    if view.weights_error is not None:
        raise NearError(view.weights_error)  # a new exception each time: re-raising one would grow its traceback
    return runtime.pipeline(view.weights).render(scene, ("combined",))["combined"]


def _redraw(engine: "weakref.ref[NearRenderEngine]") -> None:
    """Ask Blender to call view_draw (tag_redraw only sets a flag), unless the engine is gone."""
    alive = engine()
    if alive is not None:
        try:
            alive.tag_redraw()
        except ReferenceError:  # Blender freed the engine's data first
            pass


class ViewState:
    """What the viewport renders, read on the UI thread in `view_update`: objects, world light, weights, settings.

    A World that needs a Cycles bake is baked on a thread of its own (one at a time; the newest request wins) while
    the previous light stays; `apply_bakes`, called from view_draw on the main thread, takes the result.
    """

    def __init__(self, redraw: Callable[[], None] = lambda: None) -> None:
        self.assets = AssetCache()
        self.objects: list = []
        self.world: WorldLight | None = None
        self.transparent = False
        self.weights: runtime.WeightsKey | None = None
        self.weights_error: str | None = None
        self.world_error: str | None = None  # the World could not be read (a missing image, a failed bake)
        self.error: str | None = None  # what to show: a bad NeAR object, else the World's problem
        self._redraw = redraw
        self._bakes = threading.Condition()
        self._bake_request: tuple[str, PreparedBake] | None = None
        self._bake_results: list[tuple[str, EnvMap | str]] = []
        self._bake_thread: threading.Thread | None = None

    @classmethod
    def read(cls, depsgraph: bpy.types.Depsgraph, previous: "ViewState | None") -> "ViewState":
        """Update `previous` (or a new state) from the depsgraph, re-reading only what the updates touched."""
        state = previous if previous is not None else cls()
        world_changed = state.world is None or state.world_error is not None  # retry a World that failed
        for update in depsgraph.updates:
            data = update.id
            if isinstance(data, (bpy.types.World, bpy.types.Image, bpy.types.ShaderNodeTree, bpy.types.Scene)):
                world_changed = True
            elif isinstance(data, bpy.types.Mesh):
                state.assets.invalidate({data.original.name_full})
            elif isinstance(data, bpy.types.Object) and update.is_updated_geometry and data.type == "MESH":
                state.assets.invalidate({data.data.original.name_full})
        scene = depsgraph.scene
        state.transparent = bool(scene.render.film_transparent)
        state.error = None
        try:
            state.weights, state.weights_error = runtime.weights_key(scene), None
        except NearError as error:
            state.weights, state.weights_error = None, str(error)
        if world_changed:
            state.refresh_world(depsgraph)
        try:
            state.objects = near_instances(depsgraph, state.assets)
        except NearError as error:
            state.error, state.objects = str(error), []
        state.error = state.error or state.world_error
        return state

    @property
    def baking(self) -> bool:
        return self._bake_thread is not None

    def refresh_world(self, depsgraph: bpy.types.Depsgraph) -> None:
        """Read the World (main thread). Until a bake it needs is done, the previous light stays (black at first)."""
        try:
            self.world, self.world_error = world_light(depsgraph, _bake_cache, self._bake_in_background), None
        except BakeStarted:
            self.world_error = None
        except NearError as error:
            self.world_error = str(error)
        self.world = self.world or WorldLight(EnvMap.uniform(0.0), [])

    def apply_bakes(self, depsgraph: bpy.types.Depsgraph) -> bool:
        """Main thread: store finished bakes in the bake cache and re-read the World; True if anything finished."""
        with self._bakes:
            results, self._bake_results = self._bake_results, []
        for key, result in results:
            if isinstance(result, str):
                self.world_error = result
            else:
                _bake_cache.put(key, result)
        if results and not any(isinstance(result, str) for _, result in results):
            self.refresh_world(depsgraph)  # a cache hit now, unless the World changed again meanwhile
        return bool(results)

    def _bake_in_background(self, key: str, bake: PreparedBake) -> None:
        with self._bakes:
            if self._bake_request is not None:
                self._bake_request[1].discard()  # superseded before it started
            self._bake_request = (key, bake)
            if self._bake_thread is None:
                self._bake_thread = threading.Thread(target=self._run_bakes, name="near-world-bake", daemon=True)
                self._bake_thread.start()

    def _run_bakes(self) -> None:
        while True:
            with self._bakes:
                if self._bake_request is None:
                    self._bake_thread = None
                    return
                (key, bake), self._bake_request = self._bake_request, None
            try:
                result: EnvMap | str = bake.run()
            except NearError as error:
                result = str(error)
            with self._bakes:
                self._bake_results.append((key, result))
            self._redraw()

    def wait_for_bakes(self, timeout: float) -> None:
        """Block until no bake runs (tests, unregister)."""
        thread = self._bake_thread
        if thread is not None:
            thread.join(timeout)


_classes = (NearRenderEngine,)


def register() -> None:
    for cls in _classes:
        bpy.utils.register_class(cls)


def unregister() -> None:
    for engine_id in list(_viewports):
        _stop_viewport(engine_id)
    for cls in reversed(_classes):
        bpy.utils.unregister_class(cls)
    _bake_cache.clear()
    world.clear_caches()
