"""What the Blender side adds to a frame: F12 through the NeAR engine vs the same `NearPipeline.render` call direct.

Run: `.venv/bin/python benchmarks/bench_blender.py [--size 512] [--voxels 6000] [--repeats 3]`. Prints, for a scene
with two NeAR objects under a bundled HDRI: reading the scene (objects -> assets, World -> EnvMap, camera), the F12
render (writing the result included, no file), and the direct pipeline call on the same inputs, with the ratio.
The weights are seeded UNTRAINED test weights (near-tiny shapes): timings do not depend on trained values.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import bpy
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import near_blender  # noqa: E402
from near_blender.objects import asset_to_object  # noqa: E402
from near_blender.scene import describe, render_camera  # noqa: E402
from near_engine.asset import Asset  # noqa: E402
from near_engine.blender_data import blender_hdri  # noqa: E402
from near_engine.configs import random_weights, save_networks  # noqa: E402
from near_engine.pipeline import NearPipeline  # noqa: E402


def shell_asset(voxels: int, seed: int) -> Asset:
    """About `voxels` voxels on a sphere shell (the shape of a real object's surface voxels), random latents."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(64)] * 3, indexing="ij"), -1).reshape(-1, 3)
    radius = np.linalg.norm(grid + 0.5 - 32, axis=1)
    shell = grid[np.argsort(np.abs(radius - 20))[:voxels]]
    return Asset(shell.astype(np.int32), rng.standard_normal((len(shell), 8)).astype(np.float32))


def best_of(repeats: int, run) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--voxels", type=int, default=6000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    bpy.ops.wm.read_factory_settings(use_empty=True)
    near_blender.register()
    scene = bpy.context.scene
    folder = Path(tempfile.mkdtemp()) / "weights"
    save_networks(folder, random_weights("near-tiny", seed=0), "near-tiny")
    scene.near.weights_folder = str(folder)
    scene.render.engine = "NEAR"
    scene.render.resolution_x = scene.render.resolution_y = args.size
    world = bpy.data.worlds.new("World")
    world.use_nodes = True
    texture = world.node_tree.nodes.new("ShaderNodeTexEnvironment")
    texture.image = bpy.data.images.load(str(blender_hdri("forest")))
    world.node_tree.links.new(texture.outputs["Color"], world.node_tree.nodes["Background"].inputs["Color"])
    scene.world = world
    camera = bpy.data.objects.new("Camera", bpy.data.cameras.new("Camera"))
    scene.collection.objects.link(camera)
    camera.location, camera.rotation_euler = (0.0, -2.6, 0.4), (1.42, 0.0, 0.0)
    scene.camera = camera
    for seed, x in ((0, -0.35), (1, 0.35)):
        asset_to_object(shell_asset(args.voxels, seed), f"Object{seed}", scene.collection).location.x = x
    bpy.context.view_layer.update()

    depsgraph = bpy.context.evaluated_depsgraph_get()
    engine_scene, _ = describe(depsgraph, render_camera(depsgraph))
    pipeline = NearPipeline.from_pretrained(folder, "cpu")
    bpy.ops.render.render()  # warm-up: weights, caches, numba
    pipeline.render(engine_scene)

    read_ms = best_of(args.repeats, lambda: describe(depsgraph, render_camera(depsgraph)))
    f12_ms = best_of(args.repeats, bpy.ops.render.render)
    direct_ms = best_of(args.repeats, lambda: pipeline.render(engine_scene))
    print(f"scene: 2 objects x {args.voxels} voxels, {args.size}x{args.size}, forest HDRI, near-tiny shapes, CPU")
    print(f"read scene (objects, World, camera): {read_ms:8.1f} ms")
    print(f"F12 through the NeAR engine:         {f12_ms:8.1f} ms")
    print(f"direct NearPipeline.render:          {direct_ms:8.1f} ms   (F12 / direct = {f12_ms / direct_ms:.2f}x)")
    near_blender.unregister()


if __name__ == "__main__":
    main()
