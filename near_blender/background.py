"""Running a bpy script in a separate, fresh Blender: Cycles bakes and mesh encoding without touching the user's
session (and from inside a render, where a nested render cannot run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

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


class BlenderProcess:
    """`script` running in a fresh background Blender, polled instead of waited for (a modal operator keeps Blender's
    UI responsive meanwhile). Its output goes to a log file, not a pipe: Cycles prints thousands of lines, and a full
    pipe would stall it."""

    def __init__(self, script: str, job: dict, *, log: Path, what: str, error: type[NearError] = NearError) -> None:
        self.what, self.error, self.log = what, error, Path(log)
        self._log_file = open(self.log, "w", encoding="utf-8", errors="replace")
        try:
            self._process = subprocess.Popen(blender_command(script, job), stdout=self._log_file,
                                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)
        except OSError as exc:
            self._log_file.close()
            raise error(f"{what} could not start Blender: {exc}") from None

    def poll(self) -> bool:
        """True once the process has ended successfully; a non-zero exit is an `error` with Blender's last lines."""
        code = self._process.poll()
        if code is None:
            return False
        self._log_file.close()
        if code != 0:
            raise self.error(f"{self.what} failed (exit code {code}):\n{self.tail(8)}")
        return True

    def wait(self, timeout: float) -> None:
        """Block until the process ends (scripts and tests); past `timeout` seconds it is stopped and an `error`."""
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.cancel()
            raise self.error(f"{self.what} took longer than {timeout:g} s and was stopped") from None
        self.poll()

    def cancel(self) -> None:
        """Stop the process (Esc, a time limit, unregister) and wait for it, so nothing is left running."""
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        self._log_file.close()

    def tail(self, lines: int) -> str:
        try:
            text = self.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])


def run_in_blender(script: str, job: dict, *, timeout: float, what: str, error: type[NearError] = NearError) -> None:
    """Run `script` in a fresh Blender and wait; a timeout, a failed start or a non-zero exit is an `error` that
    says what failed (`what`, e.g. "Baking World 'X'") with the last lines Blender printed."""
    with tempfile.TemporaryDirectory(prefix="near_blender_") as folder:
        BlenderProcess(script, job, log=Path(folder) / "blender.log", what=what, error=error).wait(timeout)
