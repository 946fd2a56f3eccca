"""Time of `near lift` on a 512^2 photo with near-tiny, by stage, one JSON line per geometry source.

    .venv/bin/python benchmarks/bench_lift.py [--weights near-tiny] [--size 512] [--repeats 3]

The photo is a 512^2 PNG with alpha drawn here (a shaded disc with a stripe texture). Each geometry source that needs
no mesh file and no official weights runs (`own`, `inflate`), `--repeats` times; the best run is kept. As the
reference in the same process, the line also gives one cached 512^2 frame of the lifted asset through `NearPipeline`
(the renderer's own cost), and the ratio of the lift to it. Target (issue 12): the lift <= 10 s on two cores.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from near_engine.camera import Camera
from near_engine.envmap import EnvMap
from near_engine.lift import LiftRequest, lift_image
from near_engine.pipeline import NearPipeline, Scene


def photo(path: Path, size: int) -> Path:
    yy, xx = (np.mgrid[:size, :size] + 0.5) / size - 0.5
    r = np.hypot(yy, xx)
    inside = r < 0.35
    shade = np.sqrt(np.clip(1 - (r / 0.35) ** 2, 0, 1))
    stripes = 0.5 + 0.5 * (np.sin(xx * 60) > 0)
    rgb = np.stack([0.8 * shade * stripes, 0.3 * shade, 0.2 * shade + 0.1], -1)
    rgba = np.concatenate([rgb, inside[..., None]], -1)
    Image.fromarray((np.clip(rgba, 0, 1) * 255).astype(np.uint8), "RGBA").save(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="near-tiny")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        image = photo(Path(tmp) / "photo.png", args.size)
        pipeline = NearPipeline.from_pretrained(args.weights, "cpu")
        camera = Camera.orbit(-90, 20, 2.0, width=args.size, height=args.size)
        env = EnvMap.uniform(1.0)
        for source in ("own", "inflate"):
            best, stages, asset = float("inf"), {}, None
            for _ in range(args.repeats):
                marks: list[tuple[str, float]] = []
                t0 = time.perf_counter()
                asset = lift_image(LiftRequest(image, args.weights, source),
                                   lambda stage, _: marks.append((stage, time.perf_counter())))
                total = time.perf_counter() - t0
                if total < best:
                    best = total
                    stages = {a[0]: round(b[1] - a[1], 3) for a, b in zip(marks, marks[1:])}
            scene = Scene([(asset, np.eye(4))], env, camera, transparent=True)
            pipeline.render(scene)  # fill the caches
            t0 = time.perf_counter()
            pipeline.render(Scene([(asset, np.eye(4))], env, Camera.orbit(-80, 20, 2.0, width=args.size,
                                                                           height=args.size), transparent=True))
            frame = time.perf_counter() - t0
            print(json.dumps({"bench": "lift", "geometry": source, "photo_px": args.size, "voxels": asset.num_voxels,
                              "lift_s": round(best, 3), "stages_s": stages, "cached_frame_s": round(frame, 3),
                              "lift_over_frame": round(best / frame, 2)}))


if __name__ == "__main__":
    main()
