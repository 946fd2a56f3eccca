"""Lifting a photo into a NeAR object, as a job that runs beside Blender instead of blocking it.

`near_engine.lift.lift_image` takes seconds to minutes and touches no bpy, so it runs on a Python thread: `LiftJob`
reads everything it needs from Blender data when it is made (on the main thread), `start`s the thread, is polled
(`step`) by the modal operator, which shows the stage in the status bar and cancels it on Esc, and is waited for
(`wait`) by scripts. Nothing in the .blend changes until `finish`, which runs on the main thread again.

A thread still inside torch when Python finalizes aborts Blender's exit, so every running lift is stopped (cancelled
and waited for) when the add-on is unregistered and when Python exits (`stop_all`).
"""

from __future__ import annotations

import atexit
import math
import sys
import threading
import time
import traceback
from pathlib import Path

import bpy
import numpy as np
from mathutils import Matrix, Vector

from near_engine.asset import Asset
from near_engine.errors import NearError
from near_engine.lift import LiftCancelled, LiftRequest, lift_image

from .objects import asset_to_object

#: How long stopping a lift waits for its thread: the stage it is in must end first (seconds on a CPU).
STOP_TIMEOUT = 120.0
_running: set["LiftJob"] = set()


class LiftJob:
    """One lift of `request` into an object called `name`.

    Placed either by `matrix` (asset space -> world, e.g. where the source mesh is) or, when it is None, at `cursor`,
    standing on it. `source_name`: the mesh the voxels came from, hidden when the result takes its place.
    """

    def __init__(self, request: LiftRequest, name: str, *, cursor: Vector, matrix: Matrix | None = None,
                 source_name: str | None = None) -> None:
        request.source  # an unknown geometry source, or a mesh without "mesh", is a `NearError` now, not later
        self.request, self.name = request, name
        self.cursor, self.matrix, self.source_name = cursor.copy(), matrix, source_name
        self.stage, self.fraction = "starting", 0.0
        self._cancel = threading.Event()
        self._asset: Asset | None = None
        self._error: NearError | None = None
        self._thread = threading.Thread(target=self._run, name=f"NeAR lift {name}", daemon=True)
        self.started = 0.0

    @classmethod
    def for_image(cls, context: bpy.types.Context, image: str, weights: str, geometry: str,
                  elevation_deg: float) -> "LiftJob":
        """Lift a photo alone: the geometry comes from `geometry` ("own", "inflate", "trellis"); at the 3D cursor."""
        request = LiftRequest(image, weights, geometry=geometry, elevation=elevation_deg)
        return cls(request, Path(image).stem, cursor=context.scene.cursor.location)

    @classmethod
    def for_mesh(cls, context: bpy.types.Context, source: bpy.types.Object, image: str, weights: str,
                 rotation_deg: float, elevation_deg: float, at_cursor: bool) -> "LiftJob":
        """Lift a photo onto the voxels of `source` as evaluated now (world space, modifiers applied). Unless
        `at_cursor`, the result takes the mesh's place and size."""
        from near_engine.cycles.meshes import mesh_arrays

        vertices, triangles = mesh_arrays(source)
        if len(vertices) == 0:
            raise NearError(f"'{source.name}' has no vertices to lift the image onto")
        request = LiftRequest(image, weights, geometry="mesh", mesh=(vertices, triangles),
                              mesh_rotation=rotation_deg, elevation=elevation_deg)
        matrix = None if at_cursor else mesh_placement(vertices, rotation_deg)
        return cls(request, f"{source.name} NeAR", cursor=context.scene.cursor.location, matrix=matrix,
                   source_name=None if at_cursor else source.name)

    # ---- while it runs -------------------------------------------------------------------------------------------

    def start(self) -> "LiftJob":
        self.started = time.monotonic()
        _running.add(self)
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            self._asset = lift_image(self.request, self._progress, self._cancel.is_set)
        except NearError as error:
            self._error = error
        except Exception as error:  # a bug or an out-of-memory: still a report, with the traceback in the console
            traceback.print_exc(file=sys.stderr)
            self._error = NearError(f"lifting '{Path(self.request.image).name}' failed: {type(error).__name__}: "
                                    f"{error} (the system console has the details)")
        finally:
            _running.discard(self)

    def _progress(self, stage: str, fraction: float) -> None:
        self.stage, self.fraction = stage, fraction  # read by `status` on the main thread

    def step(self) -> bool:
        """True once the lift has succeeded; a failure (a cancel included) is its `NearError`."""
        if self._thread.is_alive():
            return False
        if self._cancel.is_set():
            raise LiftCancelled("the lift was cancelled")
        if self._error is not None:
            raise self._error
        return self._asset is not None

    def wait(self, timeout: float | None = None) -> None:
        """Block until the lift has ended (scripts, tests); its failure is raised as in `step`."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.cancel()
            raise NearError(f"lifting '{Path(self.request.image).name}' took longer than {timeout:g} s and was "
                            "stopped")
        self.step()

    def cancel(self) -> None:
        """Ask the lift to stop; it does at its next stage and its result is dropped. Returns at once, so Esc does
        not freeze Blender while a stage finishes."""
        self._cancel.set()

    def stop(self) -> None:
        """Cancel and wait for the thread to end (Blender ends the operator, quits, or disables the add-on)."""
        self.cancel()
        self._thread.join(STOP_TIMEOUT)

    def status(self) -> str:
        return (f"NeAR: lifting '{Path(self.request.image).name}' ({self.request.source}): {self.stage}, "
                f"{self.fraction:.0%} ({time.monotonic() - self.started:.0f} s) | Esc to cancel")

    # ---- when it is done -----------------------------------------------------------------------------------------

    def finish(self, context: bpy.types.Context) -> tuple[bpy.types.Object, str]:
        """Add the NeAR object, make it the only selected and the active one; (object, what to report)."""
        if not self.step():
            raise NearError("the lift has not finished yet")
        asset = self._asset
        source = bpy.data.objects.get(self.source_name) if self.source_name else None
        if source is not None and source.users_collection:
            collection = source.users_collection[0]
        else:
            collection = context.collection or context.scene.collection
        obj = asset_to_object(asset, self.name, collection)
        if self.matrix is not None:
            obj.matrix_world = self.matrix
        else:
            obj.location = standing_location(asset, self.cursor, obj.scale)
        for other in context.selected_objects:
            other.select_set(False)
        message = f"'{obj.name}': {asset.num_voxels} voxels (geometry: {self.request.source})"
        if source is not None:
            # It would overlap the result in the viewport and in other engines: hidden, not deleted (as Convert does).
            source.hide_render = True
            if source.name in context.view_layer.objects:
                source.hide_set(True)
            message += f"; the mesh '{source.name}' is hidden (show it again in the Outliner)"
        obj.select_set(True)
        context.view_layer.objects.active = obj
        return obj, message


def stop_all() -> None:
    """Stop every running lift (unregister, Python's exit)."""
    for job in list(_running):
        job.stop()


atexit.register(stop_all)


def standing_location(asset: Asset, cursor: Vector, scale: Vector) -> Vector:
    """The object location that puts the asset's origin above `cursor` with its lowest voxel's bottom face (its
    centre minus half a voxel) at the cursor's height."""
    bottom = float(asset.coords[:, 2].min()) / asset.resolution - 0.5  # ((i + 0.5) - 0.5) / R - 0.5
    return Vector((cursor.x, cursor.y, cursor.z - bottom * scale.z))


def mesh_placement(vertices: np.ndarray, rotation_deg: float) -> Matrix:
    """Asset space -> world for voxels made from world-space `vertices` [V, 3] turned `rotation_deg` about Z:
    `lift.geometry.triangles_geometry` turns the mesh, then normalizes it; this undoes both."""
    from near_engine.cycles.meshes import normalizing_transform

    turn = Matrix.Rotation(math.radians(rotation_deg), 3, "Z")
    turned = np.asarray(vertices, dtype=np.float64) @ np.array(turn).T
    normalize = Matrix(normalizing_transform(turned).tolist())
    return turn.transposed().to_4x4() @ normalize.inverted()
