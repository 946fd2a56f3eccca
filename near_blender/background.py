"""Running a bpy script in a separate, fresh Blender: Cycles bakes and mesh encoding without touching the user's
session (and from inside a render, where a nested render cannot run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import bpy

from near_engine.errors import NearError


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


def run_in_blender(script: str, job: dict, *, timeout: float, what: str,
                   error: type[NearError] = NearError) -> subprocess.CompletedProcess:
    """Run `script` in a fresh Blender and wait; a timeout, a failed start or a non-zero exit is an `error` that
    says what failed (`what`, e.g. "Baking World 'X'") with the last lines Blender printed."""
    try:
        done = subprocess.run(blender_command(script, job), capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise error(f"{what} took longer than {timeout:g} s and was stopped") from None
    except OSError as exc:
        raise error(f"{what} could not start Blender: {exc}") from None
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout or "").strip().splitlines()[-8:])
        raise error(f"{what} failed (exit code {done.returncode}):\n{tail}")
    return done
