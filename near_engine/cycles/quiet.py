"""Renders without Blender's log wall: Cycles prints a `Fra:` status line (and `Saved:`/`Time:` lines) to the C-level
standard output for every step of every render, thousands per data set, and the bpy module offers no switch for it
(Blender's `--quiet` is a command-line flag only).

So the render runs with file descriptor 1 pointed at a temporary file; afterwards the routine status lines are
dropped and anything else Blender printed (errors, warnings) is passed on to standard error, so failures still
surface. `NEAR_VERBOSE=1` in the environment shows everything as Blender prints it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import tempfile
from typing import Iterator

#: Lines of Blender's own render log that are progress, not news.
ROUTINE_PREFIXES = ("Fra:", "Saved:", "Time:", "Read blend:")


def verbose() -> bool:
    """Whether Blender's own output is wanted (`NEAR_VERBOSE=1`)."""
    return os.environ.get("NEAR_VERBOSE", "").strip().lower() not in ("", "0", "false", "no")


def _flush_c_stdout() -> None:
    """Flush the C library's stdout buffer (Blender prints with printf), where the platform lets us."""
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError, TypeError):  # Windows: no process-wide C library handle; its CRT flushes lines
        pass


@contextlib.contextmanager
def blender_output_filtered() -> Iterator[None]:
    """Run the body with the process's stdout (fd 1) captured; then forward all but `ROUTINE_PREFIXES` lines to
    stderr. Does nothing under `NEAR_VERBOSE=1`."""
    if verbose():
        yield
        return
    sys.stdout.flush()
    _flush_c_stdout()
    saved = os.dup(1)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 1)
        try:
            yield
        finally:
            sys.stdout.flush()
            _flush_c_stdout()
            os.dup2(saved, 1)
            os.close(saved)
            captured.seek(0)
            news = [line for line in captured.read().decode("utf-8", "replace").splitlines()
                    if line.strip() and not line.startswith(ROUTINE_PREFIXES)]
            if news:
                sys.stderr.write("\n".join(news) + "\n")
                sys.stderr.flush()


def render_still(scene, filepath: str) -> None:
    """Render `scene` with its settings and write the image to `filepath`, without the render log."""
    import bpy

    scene.render.filepath = filepath
    with blender_output_filtered():
        bpy.ops.render.render(write_still=True)
