"""Converting a mesh object into a NeAR object, as a job that runs beside Blender instead of blocking it.

The mesh's views are rendered with Cycles and encoded in a fresh background Blender (tens of seconds to minutes).
`ConvertJob` starts that process, is polled (`step`) by the modal operator, which shows its stage in the status bar
and cancels it on Esc, and is waited for (`wait`) by scripts. Nothing in the .blend changes until `finish`.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import bpy
import numpy as np
from mathutils import Matrix

from near_engine.asset import read_asset
from near_engine.errors import NearError

from . import runtime
from .background import BlenderProcess
from .objects import asset_to_object

#: Runs in a fresh Blender (see `background.blender_command`): encode the one mesh object of a .blend to a .near,
#: printing each stage on a line of its own so `ConvertJob.stage` can show it.
_ENCODE_SCRIPT = r"""
import json, sys
job = json.loads(sys.argv[-1])
sys.path[:0] = job["path"]
from near_engine.asset import write_asset
from near_engine.lift.mesh import encode_mesh
def stage(message):  # a warning is a message, not a stage: it goes to the log as it is
    print(("" if str(message).startswith("warning:") else "NEAR_STAGE ") + str(message), flush=True)
stage("started")
asset = encode_mesh(job["blend"], job["weights"], views=job["views"], size=job["size"], samples=job["samples"],
                    log=stage)
write_asset(job["output"], asset)
"""
STAGE_MARK = "NEAR_STAGE "
#: What the user reads, by how many stage lines the encoder has printed so far: none, "started", the voxel count,
#: "encoding the latent", "fitting the materials" (encode_mesh's log messages; its warnings are not stages).
STAGES = ("starting Blender", "voxelizing the mesh", "rendering {views} views with Cycles", "encoding the views",
          "fitting the materials to the views")


class ConvertJob:
    """One conversion of `source` (read from Blender data now, on the main thread); the process starts at once."""

    def __init__(self, scene: bpy.types.Scene, source: bpy.types.Object, *, views: int, size: int, samples: int,
                 timeout: float) -> None:
        import near_engine
        from near_engine.cycles.meshes import mesh_arrays, normalizing_transform

        self.source_name, self.views, self.timeout = source.name, views, timeout
        weights = runtime.weights_folder(scene)
        vertices, _ = mesh_arrays(source)
        if len(vertices) == 0:
            raise NearError(f"'{source.name}' has no vertices to encode")
        self.placement = np.linalg.inv(normalizing_transform(vertices))  # asset space -> where the mesh is
        self.folder = Path(tempfile.mkdtemp(prefix="near_convert_"))
        try:
            blend, self.output = self.folder / "mesh.blend", self.folder / "out.near"
            try:
                _write_mesh_alone(source, blend)
            except (RuntimeError, OSError) as error:  # Blender's library writer: a full disk, no permission
                raise NearError(f"could not prepare '{source.name}' for encoding: {error}") from None
            job = {"blend": str(blend), "weights": str(weights), "output": str(self.output), "views": views,
                   "size": size, "samples": samples, "path": [str(Path(near_engine.__file__).parents[1])]}
            self.process = BlenderProcess(_ENCODE_SCRIPT, job, log=self.folder / "encode.log",
                                          what=f"Encoding '{source.name}'")
        except BaseException:
            shutil.rmtree(self.folder, ignore_errors=True)
            raise
        self.started = time.monotonic()
        self._read = self._marks = 0  # how far the log has been read, and the stage lines found in it

    # ---- while it runs -------------------------------------------------------------------------------------------

    def step(self) -> bool:
        """True once the encoder has finished; a failure or the time limit is a `NearError` (the job is cleaned up)."""
        try:
            if time.monotonic() - self.started > self.timeout:
                raise NearError(f"Encoding '{self.source_name}' took longer than {self.timeout:g} s and was stopped")
            return self.process.poll()
        except BaseException:
            self.cancel()
            raise

    def wait(self) -> None:
        """Block until the encoder has finished (scripts, tests)."""
        try:
            self.process.wait(max(self.timeout - (time.monotonic() - self.started), 0.0))
        except BaseException:
            self.cancel()
            raise

    def stage_index(self) -> int:
        """Which of `STAGES` the encoder is in, from the stage lines in its log (read on from where the last call
        stopped: between the stage lines Cycles prints thousands of its own)."""
        try:
            with open(self.process.log, "rb") as log:
                log.seek(self._read)
                new = log.read()
        except OSError:
            new = b""
        complete = new[:new.rfind(b"\n") + 1]  # a line still being written is read next time
        self._read += len(complete)
        self._marks += sum(line.startswith(STAGE_MARK.encode()) for line in complete.splitlines())
        return min(self._marks, len(STAGES) - 1)

    def status(self) -> str:
        stage = STAGES[self.stage_index()].format(views=self.views)
        return (f"NeAR: converting '{self.source_name}': {stage} ({time.monotonic() - self.started:.0f} s) | "
                "Esc to cancel")

    def cancel(self) -> None:
        """Stop the encoder and delete its files; the .blend was never touched."""
        self.process.cancel()
        shutil.rmtree(self.folder, ignore_errors=True)

    # ---- when it is done -----------------------------------------------------------------------------------------

    def finish(self, context: bpy.types.Context) -> tuple[bpy.types.Object, str]:
        """Add the NeAR object where the mesh is, select it, hide the source mesh; (object, what to report)."""
        try:
            asset = read_asset(self.output)
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)
        source = bpy.data.objects.get(self.source_name)
        collection = (source.users_collection[0] if source is not None and source.users_collection
                      else context.scene.collection)
        obj = asset_to_object(asset, f"{self.source_name} NeAR", collection)
        obj.matrix_world = Matrix(self.placement.tolist())
        message = f"'{obj.name}': {asset.num_voxels} voxels"
        if source is not None:
            # The mesh would overlap the result in the viewport and in other engines: hidden, not deleted.
            source.hide_render = True
            if source.name in context.view_layer.objects:
                source.select_set(False)
                source.hide_set(True)
            message += f"; the source mesh '{source.name}' is hidden (show it again in the Outliner)"
        obj.select_set(True)
        context.view_layer.objects.active = obj
        return obj, message


def _write_mesh_alone(source: bpy.types.Object, path: Path) -> None:
    """Save `source` as it is evaluated (modifiers applied, materials kept) as the only object of a .blend, with no
    parent and no modifier inputs, so the encoder sees this mesh and nothing else."""
    depsgraph = bpy.context.evaluated_depsgraph_get()
    mesh = bpy.data.meshes.new_from_object(source.evaluated_get(depsgraph))
    alone = bpy.data.objects.new(source.name, mesh)
    alone.matrix_world = source.matrix_world
    try:
        bpy.data.libraries.write(str(path), {alone}, path_remap="ABSOLUTE")
    finally:
        bpy.data.objects.remove(alone)
        bpy.data.meshes.remove(mesh)
