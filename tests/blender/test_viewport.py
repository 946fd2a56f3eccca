"""The interactive viewport: the render worker (`near_blender.viewport`) and the drawing (`near_blender.drawing`).

Worker tests use small numpy closures that block on events, so the order of events is forced, never timed.
Drawing tests run headless: in background mode the `gpu` module works only inside `render()` of an engine with
`bl_use_gpu_context = True`, so a test engine draws into an offscreen float buffer there and reads it back.
Finding: `RenderEngine.bind_display_space_shader(scene)` works inside such a `render()`; in Blender 4.x it binds the
builtin "IMAGE" shader (the view transform is applied later by the draw manager), which is what `draw_rgba` uses.
"""

from __future__ import annotations

import threading
from typing import Callable

import bpy
import gpu
import numpy as np
import pytest
import torch
from mathutils import Matrix

from near_blender import drawing
from near_blender.viewport import ViewportImage, ViewportRenderer, view_key
from near_engine.asset import Asset
from near_engine.camera import Camera
from near_engine.configs import random_weights
from near_engine.envmap import EnvMap
from near_engine.pipeline import NearPipeline, Scene

WAIT_S = 60.0


def _scene(tag: str, width: int = 40, height: int = 30) -> Scene:
    """A scene the worker only passes through: the closures read the tag from `envmap` and the camera's size."""
    return Scene([], tag, Camera.orbit(0, 10, 4.0, width=width, height=height))


class Recorder:
    """A render closure and an on_ready callback that log what happened; `gate(tag)` makes that job's renders wait."""

    def __init__(self, fail: Callable[[Scene], None] | None = None) -> None:
        self.calls: list[tuple[str, int, int]] = []
        self.published: list[ViewportImage | None] = []
        self.renderer: ViewportRenderer | None = None
        self.fail = fail
        self.started = threading.Event()
        self.release = threading.Event()
        self.release.set()
        self.ready = threading.Event()

    def gate(self) -> None:
        """Make the next render block (after signalling `started`) until `release` is set."""
        self.started.clear()
        self.release.clear()

    def render(self, scene: Scene) -> np.ndarray:
        cam = scene.camera
        self.calls.append((scene.envmap, cam.width, cam.height))
        self.started.set()
        assert self.release.wait(WAIT_S)
        if self.fail is not None:
            self.fail(scene)
        value = float(len(self.calls))
        return np.full((cam.height, cam.width, 4), value, np.float32)

    def on_ready(self) -> None:
        self.published.append(self.renderer.result())
        self.ready.set()

    def make(self, preview_scale: float = 0.5) -> ViewportRenderer:
        self.renderer = ViewportRenderer(self.render, self.on_ready, preview_scale)
        return self.renderer

    def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Wait until `predicate()` holds, re-checking after every on_ready."""
        for _ in range(50):
            if predicate():
                return
            assert self.ready.wait(WAIT_S), "the worker published nothing"
            self.ready.clear()
        raise AssertionError("condition never reached")


def _worker_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "near-viewport"]


# ---------------------------------------------------------------------------------------------------------------------
# the worker


@pytest.mark.timeout(120)
def test_preview_then_full_resolution():
    rec = Recorder()
    worker = rec.make(preview_scale=0.5)
    assert worker.result() is None and not _worker_threads()  # the thread starts lazily
    worker.submit(_scene("a", 40, 30))
    rec.wait_for(lambda: len(rec.published) == 2)
    worker.stop()
    assert rec.calls == [("a", 20, 15), ("a", 40, 30)]
    preview, full = rec.published
    assert (preview.width, preview.height, preview.full_resolution) == (20, 15, False)
    assert (full.width, full.height, full.full_resolution) == (40, 30, True)
    assert preview.rgba.shape == (15, 20, 4) and full.rgba.shape == (30, 40, 4)
    assert preview.rgba.dtype == np.float32 and not full.rgba.flags.writeable
    assert preview.job == full.job
    assert worker.result() is full and worker.error is None


@pytest.mark.timeout(120)
def test_preview_scale_one_renders_once():
    rec = Recorder()
    worker = rec.make(preview_scale=1.0)
    worker.submit(_scene("a", 16, 8))
    rec.wait_for(lambda: len(rec.published) == 1)
    worker.stop()
    assert rec.calls == [("a", 16, 8)] and rec.published[0].full_resolution


@pytest.mark.timeout(120)
def test_latest_job_wins_and_stale_preview_is_shown_until_better():
    rec = Recorder()
    worker = rec.make(preview_scale=0.5)
    rec.gate()
    worker.submit(_scene("old"))
    assert rec.started.wait(WAIT_S)  # "old" is rendering its preview
    for tag in ("dropped-1", "dropped-2", "new"):
        worker.submit(_scene(tag))
    rec.release.set()
    rec.wait_for(lambda: rec.published and rec.published[-1].full_resolution)
    worker.stop()
    # The stale preview was published (nothing better existed), its full-resolution pass skipped; the jobs that
    # were superseded while waiting never ran.
    assert rec.calls == [("old", 20, 15), ("new", 20, 15), ("new", 40, 30)]
    jobs = [(image.job, image.full_resolution) for image in rec.published]
    assert jobs == [(1, False), (4, False), (4, True)]


@pytest.mark.timeout(120)
def test_errors_are_reported_and_the_worker_survives():
    from near_engine.errors import EnvMapError

    def fail(scene: Scene) -> None:
        if scene.envmap == "bad-world":
            raise EnvMapError("the world has no environment image")
        if scene.envmap == "bug":
            raise ZeroDivisionError("division by zero")

    rec = Recorder(fail)
    worker = rec.make(preview_scale=1.0)
    worker.submit(_scene("good"))
    rec.wait_for(lambda: len(rec.published) == 1)
    good = worker.result()
    thread = _worker_threads()[0]
    worker.submit(_scene("bad-world"))
    rec.wait_for(lambda: len(rec.published) == 2)
    assert worker.error == "the world has no environment image"
    assert worker.result() is good  # the last good image stays on screen
    worker.submit(_scene("bug"))
    rec.wait_for(lambda: len(rec.published) == 3)
    assert worker.error == "ZeroDivisionError: division by zero"
    assert thread.is_alive() and _worker_threads() == [thread]
    worker.submit(_scene("good"))
    rec.wait_for(lambda: len(rec.published) == 4)
    assert worker.error is None and worker.result().job == 4
    worker.stop()


@pytest.mark.timeout(120)
def test_failed_preview_skips_the_full_resolution_pass():
    def fail(scene: Scene) -> None:
        if scene.envmap == "broken":
            raise ValueError("bad input")

    rec = Recorder(fail)
    worker = rec.make(preview_scale=0.5)
    worker.submit(_scene("broken"))
    rec.wait_for(lambda: len(rec.published) == 1)
    assert worker.error == "ValueError: bad input" and worker.result() is None
    worker.submit(_scene("fine"))
    rec.wait_for(lambda: rec.published[-1] is not None and rec.published[-1].full_resolution)
    worker.stop()
    assert [tag for tag, *_ in rec.calls] == ["broken", "fine", "fine"]


@pytest.mark.parametrize("scale", [0.0, -0.5, 1.5])
def test_preview_scale_must_be_a_fraction(scale):
    with pytest.raises(ValueError):
        ViewportRenderer(lambda scene: np.zeros((1, 1, 4)), lambda: None, preview_scale=scale)


@pytest.mark.timeout(120)
def test_wrong_image_shape_is_an_error():
    done = threading.Event()
    worker = ViewportRenderer(lambda scene: np.zeros((3, 3, 4), np.float32), done.set, preview_scale=1.0)
    worker.submit(_scene("a", 16, 8))
    assert done.wait(WAIT_S)
    worker.stop()
    assert worker.result() is None
    assert "shape (3, 3, 4), expected (8, 16, 4)" in worker.error


@pytest.mark.timeout(120)
def test_stop_with_pending_work_joins_and_leaves_no_thread():
    rec = Recorder()
    worker = rec.make(preview_scale=0.5)
    worker.stop()  # before any thread exists: nothing to do
    rec.gate()
    worker.submit(_scene("running"))
    assert rec.started.wait(WAIT_S)
    worker.submit(_scene("pending"))
    stopper = threading.Thread(target=worker.stop)
    stopper.start()
    stopper.join(0.2)
    assert stopper.is_alive()  # stop waits for the render in flight...
    rec.release.set()
    stopper.join(WAIT_S)
    assert not stopper.is_alive() and not _worker_threads()  # ...and then the thread is gone
    assert [tag for tag, *_ in rec.calls] == ["running"]  # pending work was dropped, no full-resolution pass
    worker.stop()  # idempotent
    # A later submit starts a fresh thread.
    worker.submit(_scene("again"))
    rec.wait_for(lambda: rec.published[-1].full_resolution)
    worker.stop()
    assert [tag for tag, *_ in rec.calls][-1] == "again" and not _worker_threads()


def test_view_key_changes_exactly_with_the_view():
    cam = Camera.orbit(30, 20, 5.0, width=64, height=48)
    assert view_key(cam) == view_key(Camera.orbit(30, 20, 5.0, width=64, height=48))
    assert view_key(cam) != view_key(Camera.orbit(30.001, 20, 5.0, width=64, height=48))  # moved
    assert view_key(cam) != view_key(cam.scaled(0.5))  # resized
    assert view_key(cam) != view_key(Camera.orbit(30, 20, 5.0, width=64, height=48, fov_x_deg=41))  # zoomed
    hash(view_key(cam))


@pytest.mark.timeout(300)
def test_worker_with_the_real_pipeline_renders_what_the_pipeline_renders():
    """UNTRAINED test weights: this checks plumbing (same pixels, right sizes), not image quality."""
    pipeline = NearPipeline(random_weights("near-tiny", seed=1), "test", "cpu", light_size=64)
    g = torch.Generator().manual_seed(3)
    coords = torch.unique(torch.randint(25, 39, (420, 3), generator=g), dim=0)[:300]
    asset = Asset(coords.numpy(), torch.randn(coords.shape[0], 8, generator=g).numpy())
    rng = np.random.default_rng(0)
    envmap = EnvMap.from_array((rng.random((16, 32, 3)) * 2).astype(np.float32))
    camera = Camera.look_at(np.array([1.6, -1.4, 0.8]), np.zeros(3), width=40, height=32, fov_x_deg=50.0)
    scene = Scene([(asset, np.eye(4))], envmap, camera)

    published: list[ViewportImage] = []
    done = threading.Event()

    def on_ready() -> None:
        published.append(worker.result())
        if published[-1] is not None and published[-1].full_resolution:
            done.set()

    worker = ViewportRenderer(lambda s: pipeline.render(s, ("combined",))["combined"], on_ready, preview_scale=0.35)
    worker.submit(scene)
    assert done.wait(240), worker.error
    worker.stop()
    assert worker.error is None
    preview, full = published
    assert (preview.width, preview.height) == (14, 11) and preview.rgba.shape == (11, 14, 4)
    expected = pipeline.render(scene)["combined"]
    assert full.rgba.shape == (32, 40, 4)
    np.testing.assert_allclose(full.rgba, expected, rtol=1e-5, atol=1e-6)
    assert not _worker_threads()


# ---------------------------------------------------------------------------------------------------------------------
# drawing (inside a GPU-context render engine)

RESULTS: dict[str, object] = {}
DRAW_JOB: list[Callable[["DrawTestEngine", bpy.types.Scene], None]] = []


class DrawTestEngine(bpy.types.RenderEngine):
    """Runs the queued drawing job where the gpu module works in background mode."""

    bl_idname = "NEAR_TEST_DRAW"
    bl_label = "NeAR drawing test"
    bl_use_gpu_context = True

    def render(self, depsgraph) -> None:
        try:
            DRAW_JOB[0](self, depsgraph.scene)
        except Exception as exc:  # surfaced by the test: an exception here would only be printed by Blender
            RESULTS["error"] = exc


def _pixel_projection(width: int, height: int) -> Matrix:
    """Orthographic projection of pixel space (0, 0)-(width, height) onto clip space, as view_draw sets it up."""
    m = Matrix.Identity(4)
    m[0][0], m[1][1], m[0][3], m[1][3] = 2 / width, 2 / height, -1.0, -1.0
    return m


def _draw_and_read(engine: bpy.types.RenderEngine, scene: bpy.types.Scene, image: np.ndarray, width: int,
                   height: int) -> np.ndarray:
    """Draw `image` over a (width x height) float offscreen through the display-space shader; read it, top row first."""
    offscreen = gpu.types.GPUOffScreen(width, height, format="RGBA32F")
    try:
        with offscreen.bind():
            framebuffer = gpu.state.active_framebuffer_get()
            framebuffer.clear(color=(0.0, 0.0, 0.0, 0.0))
            with gpu.matrix.push_pop(), gpu.matrix.push_pop_projection():
                gpu.matrix.load_identity()
                gpu.matrix.load_projection_matrix(_pixel_projection(width, height))
                engine.bind_display_space_shader(scene)
                drawing.draw_rgba(image, width, height)
                engine.unbind_display_space_shader()
            buffer = framebuffer.read_color(0, 0, width, height, 4, 0, "FLOAT")
            buffer.dimensions = width * height * 4
            pixels = np.array(buffer.to_list(), np.float32).reshape(height, width, 4)
    finally:
        offscreen.free()
    return pixels[::-1]  # GL rows start at the bottom


def _run_in_gpu_context(job: Callable[[bpy.types.RenderEngine, bpy.types.Scene], None]) -> None:
    bpy.ops.wm.read_factory_settings(use_empty=True)
    bpy.utils.register_class(DrawTestEngine)
    try:
        scene = bpy.context.scene
        scene.camera = bpy.data.objects.new("cam", bpy.data.cameras.new("cam"))
        scene.collection.objects.link(scene.camera)
        scene.render.engine = DrawTestEngine.bl_idname
        scene.render.resolution_x = scene.render.resolution_y = 4
        RESULTS.clear()
        DRAW_JOB[:] = [job]
        bpy.ops.render.render()
    finally:
        bpy.utils.unregister_class(DrawTestEngine)
        drawing.TEXTURES.clear()
    if "error" in RESULTS:
        raise RESULTS["error"]


def _gradient(width: int, height: int) -> np.ndarray:
    """Distinct HDR values per pixel (alpha < 1 too), with a pure marker in the top-left pixel."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack([x / width * 3.0, y / height, (x + y * width) / (width * height), 0.5 + 0.5 * x / width], -1)
    image[..., :3] *= image[..., 3:]  # premultiplied, as the engine's combined pass is
    image[0, 0] = (5.0, 0.0, 0.0, 1.0)
    return image.astype(np.float32)


@pytest.mark.timeout(120)
def test_draw_rgba_draws_the_image_the_right_way_up():
    image = _gradient(24, 16)

    def job(engine, scene):
        RESULTS["drawn"] = _draw_and_read(engine, scene, image, 24, 16)

    _run_in_gpu_context(job)
    drawn = RESULTS["drawn"]
    np.testing.assert_allclose(drawn[0, 0], (5.0, 0.0, 0.0, 1.0), atol=1e-5)  # the marker stays top-left
    np.testing.assert_allclose(drawn, image, atol=1e-5)


@pytest.mark.timeout(120)
def test_draw_rgba_stretches_a_preview_over_the_region():
    quadrants = np.zeros((2, 2, 4), np.float32)
    quadrants[0, 0], quadrants[0, 1] = (1.0, 0.0, 0.0, 1.0), (0.0, 1.0, 0.0, 1.0)  # top: red, green
    quadrants[1, 0], quadrants[1, 1] = (0.0, 0.0, 1.0, 1.0), (1.0, 1.0, 1.0, 1.0)  # bottom: blue, white

    def job(engine, scene):
        RESULTS["drawn"] = _draw_and_read(engine, scene, quadrants, 32, 24)

    _run_in_gpu_context(job)
    drawn = RESULTS["drawn"]
    assert drawn.shape == (24, 32, 4)
    for row, col, expected in ((0, 0, quadrants[0, 0]), (0, -1, quadrants[0, 1]), (-1, 0, quadrants[1, 0]),
                               (-1, -1, quadrants[1, 1])):
        np.testing.assert_allclose(drawn[row, col], expected, atol=1e-3)  # each corner keeps its own colour
    np.testing.assert_allclose(drawn[..., 3], 1.0, atol=1e-5)  # the whole region is covered


@pytest.mark.timeout(120)
def test_unchanged_image_is_not_uploaded_again():
    first, second = _gradient(8, 6), _gradient(8, 6)

    def job(engine, scene):
        cache = drawing.TEXTURES
        a = cache.texture_for(first)
        RESULTS["same"] = cache.texture_for(first) is a
        b = cache.texture_for(second)
        RESULTS["new"] = b is not a and (b.width, b.height) == (8, 6)
        RESULTS["back"] = cache.texture_for(first) is not b

    _run_in_gpu_context(job)
    assert RESULTS["same"] and RESULTS["new"] and RESULTS["back"]
