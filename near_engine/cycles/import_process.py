"""Run Blender's mesh importer in a child process, so that an importer that crashes on a bad file (Blender's PLY
importer aborts the process on some headers) becomes a `NearError` naming the file instead of killing the caller.

The child (this file run as a script, with the bpy module or a Blender binary) imports the file into an empty scene,
unparents the meshes (keeping their world placement) and writes them with their materials and images to a .blend;
the caller then loads that file, which Blender wrote itself. It costs little: the bundled vase imports in 0.55 s
this way, against 0.6 to 0.75 s in-process before (a loaded 2-core machine).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

#: Seconds an import may take before it is stopped (a large scan takes a minute).
IMPORT_TIMEOUT = 900
#: Exit status of the child for a file Blender refused with a message (printed on stderr after `ERROR_MARK`).
REFUSED = 3
ERROR_MARK = "NEAR-IMPORT-ERROR: "


def child_command(job: dict) -> list[str]:
    """The command that runs this file on `job`: with a Blender binary when the caller runs inside Blender (its
    Python cannot import bpy as a module), else with this Python and the bpy module."""
    script = str(Path(__file__).resolve())
    payload = json.dumps(job)
    import bpy

    binary = bpy.app.binary_path
    if binary and os.path.isfile(binary) and os.path.realpath(binary) != os.path.realpath(sys.executable):
        return [binary, "-b", "--factory-startup", "-noaudio", "--python-exit-code", "1", "--python", script,
                "--", payload]
    return [sys.executable, script, payload]


def import_in_child(path: Path, kind: str, blend: Path, timeout: float = IMPORT_TIMEOUT) -> None:
    """Import `path` with the importer `kind` in a child process and write its mesh objects to `blend`."""
    from ..errors import NearError  # here, not at the top: the child runs this file as a plain script
    from .quiet import verbose

    try:
        done = subprocess.run(child_command({"path": str(path), "kind": kind, "blend": str(blend)}),
                              capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise NearError(f"{path.name}: Blender's importer took longer than {timeout:g} s and was stopped") from None
    except OSError as exc:
        raise NearError(f"{path.name}: could not start Blender to import it ({exc})") from None
    if verbose():
        sys.stderr.write(done.stdout + done.stderr)
    if done.returncode == 0 and blend.is_file():
        return
    refusal = [line[len(ERROR_MARK):] for line in done.stderr.splitlines() if line.startswith(ERROR_MARK)]
    if refusal:
        raise NearError(f"{path.name}: Blender could not import it ({refusal[-1].strip()})")
    if done.returncode < 0:
        try:
            what = signal.Signals(-done.returncode).name
        except ValueError:
            what = f"signal {-done.returncode}"
        raise NearError(f"{path.name}: Blender's {kind} importer crashed on this file ({what}); the file is damaged "
                        "or not what its name says")
    tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
    raise NearError(f"{path.name}: Blender's {kind} importer failed (exit status {done.returncode})"
                    + (f":\n{tail}" if tail else ""))


def _import(bpy, kind: str, path: str) -> None:
    if kind == "obj":
        bpy.ops.wm.obj_import(filepath=path)
    elif kind == "ply":
        bpy.ops.wm.ply_import(filepath=path)
    elif kind == "gltf":
        import addon_utils

        addon_utils.enable("io_scene_gltf2", default_set=False)
        bpy.ops.import_scene.gltf(filepath=path)
    else:
        with bpy.data.libraries.load(path, link=False) as (source, target):
            target.objects = list(source.objects)
        for obj in target.objects:
            if obj is not None and obj.type == "MESH":
                bpy.context.scene.collection.objects.link(obj)


def main(job: dict) -> int:
    """The child: import, unparent, write the meshes to `job["blend"]`; exit status `REFUSED` with a message on
    stderr for a file Blender refuses."""
    import bpy

    bpy.ops.wm.read_factory_settings(use_empty=True)
    try:
        _import(bpy, job["kind"], job["path"])
    except (RuntimeError, OSError, ValueError) as error:  # importers report bad files as operator errors
        print(ERROR_MARK + " ".join(str(error).split()), file=sys.stderr)
        return REFUSED
    meshes = [obj for obj in bpy.context.scene.objects if obj.type == "MESH"]
    bpy.context.view_layer.update()
    for obj in meshes:  # flatten the hierarchy: each mesh keeps its world placement
        placed = obj.matrix_world.copy()
        obj.parent = None
        obj.matrix_world = placed
    bpy.data.libraries.write(job["blend"], set(meshes), path_remap="ABSOLUTE")
    return 0


if __name__ == "__main__":
    status = main(json.loads(sys.argv[-1]))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)  # a bpy script can hang at exit (see DESIGN.md); nothing is left to clean up
