"""The add-on on Blender 5.x (Python 3.13, the PyPI bpy 5 module), opt-in: `./dev.sh test tests/blender -m blender5`.

The environment comes from `tests/blender/setup_bpy5.sh` (~/.cache/near/bpy5-venv, or $NEAR_BPY5_VENV). This test
runs a part of this folder's tests there: registering and unregistering, final renders and how they fail (exit
status, no frame written), and installing the engine-only extension zip, enabling it, rendering a frame from the
kernel cache after a re-enable, and exiting cleanly.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("NEAR_BPY5_VENV", Path.home() / ".cache" / "near" / "bpy5-venv"))
#: What runs under bpy 5.x. Not (yet) the tests that read passes back from a multilayer EXR: bpy 5.3 writes only
#: the Combined pass into one (Cycles too), and mesh conversion, whose Cycles driver asks for the 4.x EXR format.
BLENDER5_TESTS = (
    "tests/blender/test_engine.py::test_register_unregister_register_cleanly",
    "tests/blender/test_render_failures.py",
    "tests/blender/test_convert.py::test_cancel_stops_the_encoder_and_changes_nothing",
    "tests/blender/test_extension_package.py::test_install_enable_render_disable",
)


@pytest.mark.blender5
@pytest.mark.timeout(1200)
def test_the_add_on_on_blender_5() -> None:
    python = VENV / "bin" / "python"
    if not python.exists():
        pytest.fail(f"no Blender 5 environment at {VENV}: run tests/blender/setup_bpy5.sh first")
    version = subprocess.run([str(python), "-c", "import bpy, sys; print(*bpy.app.version, *sys.version_info[:2])"],
                             capture_output=True, text=True, timeout=120)
    major, minor, _, py_major, py_minor = map(int, version.stdout.split())
    assert (major, minor) >= (5, 1) and (py_major, py_minor) == (3, 13), version.stdout + version.stderr
    done = subprocess.run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", *BLENDER5_TESTS],
                          cwd=ROOT, capture_output=True, text=True, timeout=1100)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "failed" not in done.stdout.splitlines()[-1]
