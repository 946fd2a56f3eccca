"""Rasterizer speed on the fixed benchmark scene (see near_engine/bench.py), one JSON line per configuration.

    .venv/bin/python benchmarks/bench_raster.py            # the full grid: 10k/100k/640k Gaussians x 256/512/1024 px
    .venv/bin/python benchmarks/bench_raster.py --quick    # 100k at 512 only

The plain NumPy splatter is timed in the same run where it finishes in reasonable time (up to 100k Gaussians), and
`speedup_vs_naive` is the ratio of its time to the compiled kernel's forward time. The first-call line times a fresh
process with an empty numba cache (JIT compilation) and again with the cache filled.
"""

from __future__ import annotations

import argparse
import json

from near_engine.bench import bench_first_call, bench_raster


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only 100k Gaussians at 512 px")
    args = parser.parse_args()
    grid = [(100_000, 512)] if args.quick else [(n, s) for n in (10_000, 100_000, 640_000) for s in (256, 512, 1024)]
    for n, size in grid:
        print(json.dumps(bench_raster(n, size, naive=n <= 100_000 and size <= 512)), flush=True)
    print(json.dumps(bench_first_call()), flush=True)


if __name__ == "__main__":
    main()
