"""The `near` command line. Subcommands grow with the engine: demo, info, bench."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .demo import DEFAULT_HDRIS
from .errors import NearError


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import render_demo

    print(f"rendering the demo object under Blender's HDRIs {', '.join(args.hdri)} into {args.output}/ ...", flush=True)
    summary = render_demo(args.output, size=args.size, hdris=args.hdri)
    for frame in summary["frames"]:
        print(f"  {frame['hdri']:>10} azimuth {frame['azimuth']:3d}: {frame['raster_ms']:7.1f} ms")
    print(f"contact sheet: {summary['contact_sheet']}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if not path.is_file():
        raise NearError(f"{path}: no such file")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise NearError(f"{path}: cannot be read ({exc.strerror})") from exc
    if head[:4] == b"\x76\x2f\x31\x01" or head.startswith(b"#?"):
        from .envmap import describe_image_file

        print(describe_image_file(path))
    else:
        from .asset import describe_asset

        print(describe_asset(path))
    return 0


def _cmd_bench_raster(args: argparse.Namespace) -> int:
    from .bench import bench_first_call, bench_raster

    if args.repeats < 1 or args.gaussians < 0 or args.size < 1:
        raise NearError("--repeats and --size must be at least 1 and --gaussians at least 0")
    result = bench_raster(args.gaussians, args.size, repeats=args.repeats, naive=args.naive)
    if args.first_call:
        result.update(bench_first_call())
    print(json.dumps(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="near", description="NeAR engine: relightable 3D Gaussian objects.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="render the built-in demo object under Blender's HDRIs (turntable + sheet)")
    demo.add_argument("-o", "--output", default="out/demo", help="output folder (default: out/demo)")
    demo.add_argument("--size", type=int, default=384, help="image width and height in pixels (default 384)")
    demo.add_argument("--hdri", nargs="+", default=list(DEFAULT_HDRIS),
                      help=f"names of Blender's bundled HDRIs (default: {' '.join(DEFAULT_HDRIS)})")
    demo.set_defaults(func=_cmd_demo)

    info = sub.add_parser("info", help="describe an EXR/HDR image or a .near asset")
    info.add_argument("file")
    info.set_defaults(func=_cmd_info)

    bench = sub.add_parser("bench", help="speed measurements (print JSON)")
    bench_sub = bench.add_subparsers(dest="target", required=True)
    raster = bench_sub.add_parser("raster", help="rasterizer forward/backward on the fixed benchmark scene")
    raster.add_argument("--gaussians", type=int, default=100_000)
    raster.add_argument("--size", type=int, default=512)
    raster.add_argument("--repeats", type=int, default=5, help="timed runs per figure; the best is kept")
    raster.add_argument("--naive", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the plain NumPy splatter and print the speed-up (default on)")
    raster.add_argument("--first-call", action="store_true",
                        help="also time the first call in fresh processes (cold and warm JIT cache)")
    raster.set_defaults(func=_cmd_bench_raster)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except NearError as exc:
        print(f"near: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
