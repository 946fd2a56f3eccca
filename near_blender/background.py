"""Running a bpy script in a separate, fresh Blender: Cycles bakes and mesh encoding without touching the user's
session (and from inside a render, where a nested render cannot run)."""

from __future__ import annotations

import json
import os
import sys

import bpy


def blender_command(script: str, job: dict) -> list[str]:
    """The command that runs `script` with `job` (JSON, the script's last argument) in a fresh background Blender.

    A real Blender runs it with its own binary (factory settings, no add-ons); the bpy module (no binary) with this
    Python, which imports bpy itself.
    """
    binary = bpy.app.binary_path
    payload = json.dumps(job)
    if binary and os.path.isfile(binary) and os.access(binary, os.X_OK) and \
            os.path.realpath(binary) != os.path.realpath(sys.executable):
        return [binary, "-b", "--factory-startup", "-noaudio", "--python-exit-code", "1",
                "--python-expr", script, "--", payload]
    return [sys.executable, "-c", script, payload]
