"""Cost and worth of fitting the surfels' materials to the views (`lift.encode.fit_asset_materials`), on the
bundled vase, one JSON line.

    .venv/bin/python benchmarks/bench_material_fit.py [--views 12] [--size 256] [--samples 16]

Cycles renders the vase's uniformly lit views and one more view (a view none of them is); the asset is encoded from
the views as `near encode-mesh` encodes it. Timed in the same process: sampling the materials at the surfels
(`material_extras`, the reference) and the fit, with their ratio. Worth: the mean error of near-tiny's base-colour
pass of the extra view against Cycles' own, sampled and fitted (solid pixels).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from near_engine.asset import Asset
from near_engine.bundled import SAMPLE_MESH
from near_engine.configs import ENCODER_KEYS, load_networks
from near_engine.cycles.meshes import import_mesh
from near_engine.cycles.render import read_uniform_views, render_views
from near_engine.cycles.settings import RenderSettings
from near_engine.cycles.views import view_cameras
from near_engine.envmap import EnvMap
from near_engine.lift.encode import MATERIAL_GBUFFERS, encode_views, fit_asset_materials, material_extras
from near_engine.pipeline import NearPipeline, Scene
from near_engine.surfels import EXTRA_NAME, mesh_surfels
from near_engine.voxelize import voxelize_mesh


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--views", type=int, default=12)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--samples", type=int, default=16)
    args = parser.parse_args()
    vertices, triangles = import_mesh(SAMPLE_MESH)
    cameras = view_cameras(args.views + 1, (0.5, 0.5), args.size)
    with tempfile.TemporaryDirectory() as tmp:
        render_views(cameras, [], [], Path(tmp), RenderSettings(args.size, args.samples))
        uniform = {k: torch.from_numpy(v) for k, v in read_uniform_views(Path(tmp), len(cameras)).items()}
    rgba, depth, alpha = uniform["rgba"], uniform["depth"], uniform["alpha"]
    gbuffers = {n: uniform[n] for n in MATERIAL_GBUFFERS}
    coords = voxelize_mesh(vertices, triangles, 64)
    surfels = mesh_surfels(vertices, triangles, coords, 64)
    seen, extra = slice(0, args.views), args.views
    part = {k: g[seen] for k, g in gbuffers.items()}
    encoders, _ = load_networks("near-tiny", "cpu", keys=ENCODER_KEYS)
    with torch.no_grad():
        latent = encode_views(encoders, coords, rgba[seen], cameras[seen], depth[seen])
    pipeline = NearPipeline.from_pretrained("near-tiny", "cpu")
    start = time.perf_counter()
    extras = material_extras(part, alpha[seen], cameras[seen], depth[seen], coords, surfels)
    sample_s = time.perf_counter() - start
    sampled = Asset(coords, latent.numpy(), extras={**extras, EXTRA_NAME: surfels})
    start = time.perf_counter()
    fitted = fit_asset_materials(pipeline, sampled, part, alpha[seen], cameras[seen])
    fit_s = time.perf_counter() - start
    truth = gbuffers["base_color"][extra].numpy() / np.clip(alpha[extra].numpy(), 1e-6, None)
    errors = {}
    for name, asset in (("sampled", sampled), ("fitted", fitted)):
        out = pipeline.render(Scene([(asset, np.eye(4))], EnvMap.uniform(1.0), cameras[extra], transparent=True),
                              ("base_color", "alpha"))
        solid = (out["alpha"][..., 0] > 0.99) & (alpha[extra].numpy()[..., 0] > 0.99)
        errors[name] = float(np.abs(out["base_color"][solid] / out["alpha"][solid] - truth[solid]).mean())
    print(json.dumps({"views": args.views, "size": args.size, "surfels": int(4 * len(coords)),
                      "sample_s": round(sample_s, 2), "fit_s": round(fit_s, 2),
                      "fit_over_sample": round(fit_s / sample_s, 1),
                      "base_color_error_sampled": round(errors["sampled"], 4),
                      "base_color_error_fitted": round(errors["fitted"], 4)}))


if __name__ == "__main__":
    main()
