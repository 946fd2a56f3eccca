"""The extension zip, built by wheels/build_extension.py and installed the way Blender installs it.

The zip is an `--engine-only` build (only the near_engine wheel: the bpy module in .venv already has torch, numba,
...), validated with Blender's own `blender_ext.py`, then installed with `extensions.package_install_files` in a fresh
Python process whose Blender user folders (`BLENDER_USER_RESOURCES`) are a temporary folder, so the developer's own
Blender configuration is never touched. That process enables the add-on, checks that Blender extracted the bundled
near_engine wheel and imports that copy (not the editable one in .venv), renders a frame with the NEAR engine, then
disables the add-on and checks that it unregistered everything.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
import textwrap
import tomllib
import zipfile
from pathlib import Path

import numpy as np
import OpenEXR
import pytest

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = ROOT / "wheels" / "build_extension.py"
ADDON = "bl_ext.user_default.near"
RENDER_SIZE = (32, 24)

# Runs in a fresh Python (argv: zip, output folder). No weights folder is set: the bundled near-tiny must render. Every check is an assert, so any failure is a
# traceback and a non-zero exit; the facts the test checks again are printed as one JSON line.
INSTALL_SCRIPT = textwrap.dedent("""
    import importlib, json, math, sys
    from pathlib import Path

    import bpy
    import numpy as np

    zip_path, out = sys.argv[1], Path(sys.argv[2])
    addon = "bl_ext.user_default.near"
    site = Path(bpy.utils.user_resource("EXTENSIONS")) / ".local" / "lib" / (
        f"python{sys.version_info[0]}.{sys.version_info[1]}") / "site-packages"
    assert "near_engine" not in sys.modules, "near_engine was imported before the extension was installed"

    result = bpy.ops.extensions.package_install_files(filepath=zip_path, repo="user_default", enable_on_install=True)
    assert result == {"FINISHED"}, result
    assert addon in bpy.context.preferences.addons, "the add-on is not enabled after install"
    engines = {getattr(cls, "bl_idname", None) for cls in bpy.types.RenderEngine.__subclasses__() if cls.is_registered}
    assert "NEAR" in engines, engines

    import near_engine
    installed = sorted(p.name for p in site.iterdir()) if site.is_dir() else []
    objects = importlib.import_module(addon + ".near_blender.objects")
    from near_engine.asset import Asset

    # The scene: one NeAR object at the origin, a camera looking at it, a uniform grey world, transparent film.
    scene = bpy.context.scene
    scene.render.engine = "NEAR"
    scene.render.resolution_x, scene.render.resolution_y = %(size)r
    scene.render.resolution_percentage = 100
    scene.render.film_transparent = True
    scene.render.image_settings.file_format = "OPEN_EXR"
    scene.render.image_settings.color_mode = "RGBA"
    scene.render.image_settings.color_depth = "32"
    scene.render.filepath = str(out / "frame.exr")
    for obj in list(bpy.data.objects):
        bpy.data.objects.remove(obj)
    world = bpy.data.worlds.new("Grey")
    world.use_nodes = True
    world.node_tree.nodes["Background"].inputs["Color"].default_value = (0.8, 0.8, 0.8, 1.0)
    scene.world = world
    camera = bpy.data.objects.new("Camera", bpy.data.cameras.new("Camera"))
    camera.location = (0.0, -2.0, 0.0)
    camera.rotation_euler = (math.pi / 2, 0.0, 0.0)
    scene.collection.objects.link(camera)
    scene.camera = camera
    rng = np.random.default_rng(3)
    coords = np.unique(rng.integers(24, 40, (600, 3)), axis=0).astype(np.int32)
    asset = Asset(coords, rng.standard_normal((len(coords), 8)).astype(np.float32), model="near-tiny-random",
                  source="extension-test")
    objects.asset_to_object(asset, "Blob", scene.collection)

    bpy.ops.render.render(write_still=True)
    assert (out / "frame.exr").is_file(), "the NEAR engine wrote no frame"
    runtime = importlib.import_module(addon + ".near_blender.runtime")
    weights = str(runtime.weights_folder(scene))
    compiled, cache = runtime.kernel_compilations, runtime.kernel_cache
    bpy.ops.wm.save_as_mainfile(filepath=str(out / "scene.blend"))

    bpy.ops.preferences.addon_disable(module=addon)
    assert addon not in bpy.context.preferences.addons
    engine_gone = False
    try:
        scene.render.engine = "NEAR"
    except TypeError:
        engine_gone = True
    assert engine_gone, "the NEAR engine is still registered after disabling the add-on"
    assert not hasattr(bpy.types.Scene, "near"), "Scene.near is still registered after disabling the add-on"

    print("RESULT " + json.dumps({"site_packages": str(site), "installed": installed, "weights": weights,
                                  "near_engine_file": near_engine.__file__,
                                  "after_disable": sorted(p.name for p in site.iterdir()) if site.is_dir() else [],
                                  "compiled": compiled, "kernel_cache": str(cache),
                                  "cached_kernels": len(list(Path(str(cache)).rglob("*.nbi"))) if cache else 0}))
""") % {"size": RENDER_SIZE}


# Runs in a second fresh Python with the same Blender user folders (argv: output folder): enabling the add-on again
# extracts the wheel again; the frame renders from numba's cache in the extension's user folder, compiling nothing.
# It exits with the add-on enabled, as farm scripts do.
REENABLE_SCRIPT = textwrap.dedent("""
    import importlib, json, sys
    from pathlib import Path

    import bpy

    out = Path(sys.argv[1])
    addon = "bl_ext.user_default.near"
    bpy.ops.preferences.addon_enable(module=addon)
    bpy.ops.wm.open_mainfile(filepath=str(out / "scene.blend"))
    scene = bpy.context.scene
    scene.render.filepath = str(out / "again.exr")
    bpy.ops.render.render(write_still=True)
    runtime = importlib.import_module(addon + ".near_blender.runtime")
    print("RESULT " + json.dumps({"compiled": runtime.kernel_compilations, "kernel_cache": str(runtime.kernel_cache),
                                  "frame": (out / "again.exr").is_file()}))
""")


def blender_ext() -> Path:
    """blender_ext.py, found as the build script finds it (the imported `bpy` here is Blender's own scripts module)."""
    spec = importlib.util.spec_from_file_location("build_extension", BUILD_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.find_blender_ext()


def build(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(BUILD_SCRIPT), "--platform", "linux-x64", "--output",
                           str(tmp_path / "dist"), "--cache", str(tmp_path / "cache"), *args],
                          capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def engine_only_zip(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("extension")
    done = build(tmp, "--engine-only", "--offline")
    assert done.returncode == 0, done.stdout + done.stderr
    (zip_path,) = (tmp / "dist").glob("*.zip")
    return zip_path


def test_engine_only_zip_contents_and_validation(engine_only_zip: Path):
    with zipfile.ZipFile(engine_only_zip) as archive:
        names = set(archive.namelist())
        manifest = tomllib.loads(archive.read("blender_manifest.toml").decode())
    (engine_wheel,) = [n for n in names if n.startswith("wheels/")]
    assert engine_wheel.startswith("wheels/near_engine-") and engine_wheel.endswith("-py3-none-any.whl")
    assert {"__init__.py", "near_blender/__init__.py", "near_blender/engine.py"} <= names
    assert not any(n.startswith(("near_engine/", "tests/")) or "__pycache__" in n for n in names)
    assert manifest["wheels"] == [f"./{engine_wheel}"]
    with zipfile.ZipFile(io.BytesIO(zipfile.ZipFile(engine_only_zip).read(engine_wheel))) as wheel:
        shipped = set(wheel.namelist())
    assert {f"near_engine/weights/near-tiny/{key}.safetensors" for key in
            ("decoder", "hdri_encoder", "renderer", "neural_basis", "image_features", "encoder")} <= shipped
    assert {"near_engine/weights/near-tiny/pipeline.json", "near_engine/samples/vase.obj",
            "near_engine/samples/vase.mtl", "near_engine/samples/vase.png"} <= shipped
    assert manifest["platforms"] == ["linux-x64"]
    assert manifest["id"] == "near" and manifest["schema_version"] == "1.0.0"

    done = subprocess.run([sys.executable, str(blender_ext()), "validate", str(engine_only_zip)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Success" in done.stdout


def test_offline_build_names_missing_wheels(tmp_path: Path):
    done = build(tmp_path, "--offline", "--python", "3.11")
    assert done.returncode != 0
    for missing in ("torch", "numba", "openexr", "safetensors", "pillow", "pyyaml"):
        assert missing in done.stderr.lower(), done.stderr
    assert "numpy" not in done.stderr.lower(), "numpy must never be bundled: Blender ships it"
    assert not list((tmp_path / "dist").glob("*.zip"))


def test_install_enable_render_disable(engine_only_zip: Path, tmp_path: Path):
    user = tmp_path / "blender-user"
    out = tmp_path / "out"
    out.mkdir()
    script = tmp_path / "install_and_render.py"
    script.write_text(INSTALL_SCRIPT)
    env = {**os.environ, "BLENDER_USER_RESOURCES": str(user)}
    # cwd is the tmp folder, so the repo's own near_engine/ is not importable through the current directory.
    done = subprocess.run([sys.executable, str(script), str(engine_only_zip), str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    facts = json.loads(line.removeprefix("RESULT "))

    # While enabled, Blender had extracted the bundled wheel into the extensions' site-packages (inside the
    # temporary user folder) and the add-on imported that copy, not the editable install in .venv...
    site = Path(facts["site_packages"])
    assert site.is_relative_to(user)
    assert "near_engine" in facts["installed"], facts["installed"]
    assert any(name.startswith("near_engine-") and name.endswith(".dist-info") for name in facts["installed"])
    assert Path(facts["near_engine_file"]) == site / "near_engine" / "__init__.py"
    # With no weights folder set, it rendered with the near-tiny weights inside the installed wheel.
    assert Path(facts["weights"]) == site / "near_engine" / "weights" / "near-tiny"
    # ...and disabling the add-on removed it again.
    assert "near_engine" not in facts["after_disable"], facts["after_disable"]

    # numba compiled the CPU kernels once, into the extension's user folder, which disabling the add-on keeps...
    cache = Path(facts["kernel_cache"])
    assert cache.is_relative_to(user) and not cache.is_relative_to(site) and facts["compiled"] > 0
    assert facts["cached_kernels"] > 0 and len(list(cache.rglob("*.nbi"))) == facts["cached_kernels"]
    assert "NeAR: Rendering 1 object(s): compiling CPU kernels, once" in done.stdout  # why the first frame took long
    # ...so after enabling it again (a fresh wheel, in a new session) the first render compiles nothing. That
    # session exits with the add-on enabled, without an "Exception in module unregister()" on the way out.
    again = subprocess.run([sys.executable, "-c", REENABLE_SCRIPT, str(out)], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    (line,) = [line for line in again.stdout.splitlines() if line.startswith("RESULT ")]
    second = json.loads(line.removeprefix("RESULT "))
    assert second == {"compiled": 0, "kernel_cache": str(cache), "frame": True}, second
    assert "unregister" not in again.stderr and "bl_rna" not in again.stderr, again.stderr[-4000:]
    assert "compiling CPU kernels" not in again.stdout and again.stdout.count("NeAR: loading weights from") == 1

    # The combined pass: the right size, finite, the object opaque-ish in the middle, the film transparent around.
    with OpenEXR.File(str(out / "frame.exr")) as exr:
        channels = exr.channels()
        rgba = channels["RGBA"].pixels if "RGBA" in channels else None
    assert rgba is not None, f"no RGBA in the frame, channels: {sorted(channels)}"
    assert rgba.shape == (RENDER_SIZE[1], RENDER_SIZE[0], 4)
    assert np.isfinite(rgba).all()
    alpha = rgba[..., 3]
    assert ((alpha >= 0) & (alpha <= 1.0001)).all()
    assert alpha.max() > 0.5, "the object is not visible"
    assert alpha[0, 0] < 0.01 and alpha[-1, -1] < 0.01, "the film is not transparent around the object"
