"""The viewport's render worker: model work on one background thread, so Blender's UI thread never waits on it.

`view_update` / `view_draw` run on the UI thread. They describe the scene, `submit` it (returns at once), and draw
whatever `result()` holds. The worker renders each job twice: first a cheap preview (`preview_scale` of the
resolution, same framing), then, unless a newer job arrived meanwhile, at full resolution. Only the latest submitted
job waits: older pending jobs are dropped (latest wins).

Every finished image is published, even a preview of a job that was superseded while it rendered: jobs run one at
a time in submission order, preview before full resolution, so nothing newer can have finished yet and this image is
the closest to the current view there is (while the user keeps orbiting, the viewport keeps moving instead of
freezing until they stop). Its full-resolution pass is skipped, though, when a newer job is waiting.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from typing import Callable

import numpy as np

from near_engine.camera import Camera
from near_engine.errors import NearError
from near_engine.pipeline import Scene

__all__ = ["ViewportImage", "ViewportRenderer", "view_key"]


@dataclass(frozen=True)
class ViewportImage:
    """A finished viewport image: `rgba` float32 [H, W, 4] (read-only), top row first, at `width` x `height`."""

    rgba: np.ndarray
    width: int
    height: int
    full_resolution: bool
    job: int


def view_key(camera: Camera) -> tuple:
    """A hashable key that changes exactly when the camera's image would: size, intrinsics, clipping and pose.

    `view_draw` compares it with the last submitted key to decide whether the view moved (a new job) or not.
    """
    return (camera.width, camera.height, camera.fx, camera.fy, camera.cx, camera.cy, camera.near, camera.far,
            camera.orthographic, camera.world_to_camera.tobytes())


class ViewportRenderer:
    """Renders submitted scenes on one daemon thread: a preview, then full resolution; the latest job wins.

    `render(scene)` returns an [H, W, 4] image of `scene.camera`'s size; `on_ready()` is called from the worker
    thread after each published image and after each error (the engine passes `tag_redraw`, which only sets a flag).
    Errors never kill the thread: a `NearError` message becomes `error` as is, anything else is prefixed with its
    type name; the next successful image clears it.
    """

    def __init__(self, render: Callable[[Scene], np.ndarray], on_ready: Callable[[], None],
                 preview_scale: float = 0.35) -> None:
        if not 0 < preview_scale <= 1:
            raise ValueError(f"preview_scale must be in (0, 1], got {preview_scale}")
        self._render = render
        self._on_ready = on_ready
        self.preview_scale = preview_scale
        self.error: str | None = None
        self._wake = threading.Condition()
        self._pending: tuple[int, Scene] | None = None
        self._jobs = 0
        self._result: ViewportImage | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None

    def submit(self, scene: Scene) -> None:
        """Queue `scene` as the newest job (dropping any job still waiting) and return at once."""
        with self._wake:
            self._jobs += 1
            self._pending = (self._jobs, scene)
            if self._thread is None:
                self._stopping = False
                self._thread = threading.Thread(target=self._run, name="near-viewport", daemon=True)
                self._thread.start()
            self._wake.notify()

    def result(self) -> ViewportImage | None:
        """The latest finished image, or None before the first one."""
        with self._wake:
            return self._result

    def stop(self) -> None:
        """Drop waiting work and wait for the thread to end (after the render in flight, if any). Idempotent.

        The engine calls this when it is freed: no thread may outlive it (it calls back into the engine), and
        Blender must be able to exit. A later `submit` starts a new thread.
        """
        with self._wake:
            thread, self._thread = self._thread, None
            self._pending = None
            self._stopping = True
            self._wake.notify()
        if thread is not None and thread is not threading.current_thread():  # the worker itself just exits
            thread.join()

    # ---- worker thread -------------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while self._pending is None and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    return
                job, scene = self._pending
                self._pending = None
            if self.preview_scale < 1:
                preview = dataclasses.replace(scene, camera=scene.camera.scaled(self.preview_scale))
                if not self._render_one(job, preview, full_resolution=False):
                    continue  # the same error would come again, only slower
                with self._wake:
                    if self._pending is not None or self._stopping:
                        continue  # superseded (or stopping): its full-resolution image is not worth the time
            self._render_one(job, scene, full_resolution=True)

    def _render_one(self, job: int, scene: Scene, full_resolution: bool) -> bool:
        """Render, publish and tell the engine; errors become `error` (the last good image stays shown).

        Returns whether an image was published.
        """
        try:
            rgba = np.array(self._render(scene), dtype=np.float32)  # own copy: it is made read-only below
            height, width = scene.camera.height, scene.camera.width
            if rgba.shape != (height, width, 4):
                raise NearError(f"the viewport render returned shape {rgba.shape}, expected ({height}, {width}, 4)")
        except NearError as exc:
            self.error = str(exc)
            published = False
        except Exception as exc:  # a bug must not kill the worker: show it in the viewport instead
            self.error = f"{type(exc).__name__}: {exc}"
            published = False
        else:
            rgba.flags.writeable = False
            with self._wake:
                self._result = ViewportImage(rgba, width, height, full_resolution, job)
                self.error = None
            published = True
        self._on_ready()
        return published
