"""near_engine never imports bpy at module level: importing every engine module leaves bpy unloaded.

(datagen imports bpy inside the functions that drive Blender, which is the rule; a text search for "import bpy"
cannot tell those apart, so this checks what actually gets imported.)
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest


@pytest.mark.timeout(300)
def test_importing_every_engine_module_does_not_import_bpy() -> None:
    script = textwrap.dedent("""
        import importlib, pkgutil, sys
        import near_engine
        names = [m.name for m in pkgutil.walk_packages(near_engine.__path__, "near_engine.")]
        for name in names:
            importlib.import_module(name)
        print(len(names), "bpy" in sys.modules, "mathutils" in sys.modules)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-2000:]
    count, bpy_loaded, mathutils_loaded = done.stdout.split()
    assert int(count) > 30 and bpy_loaded == "False" and mathutils_loaded == "False"
