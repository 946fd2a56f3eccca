"""The `near` command line. Subcommands grow with the engine: demo, render, info, bench."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Callable

import numpy as np

from .bundled import DEFAULT_WEIGHTS, SAMPLE_MESH
from .demo import DEFAULT_HDRIS
from .errors import NearError
from .passes import PASS_NAMES, exr_channels


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import render_demo

    print(f"encoding {Path(args.mesh).name} with {args.weights} and relighting it under {', '.join(args.hdri)} "
          f"into {args.output}/ ...", flush=True)
    summary = render_demo(args.output, size=args.size, hdris=args.hdri, weights=args.weights, mesh=args.mesh,
                          views=args.views, samples=args.samples)
    for name, scores in summary["cycles"].items():
        print(f"  {name:>10}: NeAR vs Cycles, object PSNR {scores['psnr_object']:.2f} dB, SSIM "
              f"{scores['ssim_object']:.3f}; full image PSNR {scores['psnr_full']:.2f} dB; silhouette IoU "
              f"{scores['silhouette_iou']:.3f}")
    frames = summary["frames"]
    print(f"  {len(frames)} relit frames, {np.mean([f['render_ms'] for f in frames]):.0f} ms each on average")
    print(f"contact sheet: {summary['contact_sheet']}")
    return 0


def _parse_size(text: str) -> tuple[int, int]:
    """WxH, each side in 1..16384, and a render whose estimated memory fits `pipeline.MAX_RENDER_BYTES`."""
    from .pipeline import check_render_size

    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise NearError(f"--size must look like 512x512, got {text!r}") from None
    if not (0 < width <= 16384 and 0 < height <= 16384):
        raise NearError(f"--size must be between 1x1 and 16384x16384, got {text!r}")
    check_render_size(width, height, "--size")
    return width, height


def _number(lo: float, hi: float, *, whole: bool = False, open_lo: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number in [lo, hi] (or (lo, hi]), so `inf`, `nan` and out-of-range values get a
    clear usage error instead of a traceback deep inside the engine."""
    def parse(text: str) -> float:
        try:
            value = int(text) if whole else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {'whole ' if whole else ''}number") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if value > hi or value < lo or (open_lo and value == lo):
            raise argparse.ArgumentTypeError(f"must be {'above' if open_lo else 'at least'} {lo:g} and at most "
                                             f"{hi:g}, got {text}")
        return value
    return parse


def _whole(lo: int, hi: int) -> Callable[[str], float]:
    return _number(lo, hi, whole=True)


ANGLE = _number(-3600, 3600)  # degrees; several turns are fine, but not values that lose all precision
STRENGTH = _number(0, 1e6)
COUNT = _whole(1, 100_000)
SEED = _whole(0, 2**31 - 1)
PIXELS = _whole(1, 16384)


def _cmd_render(args: argparse.Namespace) -> int:
    from .asset import read_asset
    from .camera import Camera
    from .envmap import EnvMap
    from .images import write_exr, write_png
    from .pipeline import PASSES, NearPipeline, Scene

    out = Path(args.output)
    if out.suffix.lower() not in (".exr", ".png"):
        raise NearError(f"{out}: the output must end in .exr (every pass, scene-linear) or .png (tone-mapped)")
    if out.suffix.lower() == ".png" and args.passes:
        raise NearError("--passes needs EXR output: a PNG holds only the tone-mapped combined image")
    passes = list(dict.fromkeys(["combined", *(args.passes or PASSES)]))
    unknown = [p for p in passes if p not in PASSES]
    if unknown:
        raise NearError(f"unknown pass(es) {', '.join(unknown)}; available: {', '.join(PASSES)}")
    width, height = _parse_size(args.size)
    asset = read_asset(args.asset)
    envmap = EnvMap.read(args.hdri, rotation_z=math.radians(args.rotation), strength=args.strength)
    camera = Camera.orbit(args.azimuth, args.elevation, args.distance, width=width, height=height,
                          fov_x_deg=args.fov)
    pipeline = NearPipeline.from_pretrained(args.weights)
    images = pipeline.render(Scene([(asset, np.eye(4))], envmap, camera, args.transparent), passes)
    if out.suffix.lower() == ".png":
        combined = images["combined"]
        write_png(out, combined[..., :3], combined[..., 3] if args.transparent else None)
    else:
        write_exr(out, exr_channels(images))
    print(f"wrote {out} ({width}x{height}; passes: {', '.join(passes)})")
    return 0


def _printable(text: str) -> str:
    """`text` with every control character but the line break shown as an escape (`\\x1b`), so metadata read from
    a file cannot move the cursor, recolour or clear the user's terminal."""
    return "".join(c if c == "\n" or c.isprintable() else repr(c)[1:-1] for c in text)


def _cmd_info(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if path.is_dir():
        raise NearError(f"{path}: is a folder; `near info` describes one EXR/HDR image or .near asset file")
    if not path.exists():
        raise NearError(f"{path}: no such file")
    if not path.is_file():
        raise NearError(f"{path}: not a regular file (a device, pipe or socket)")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise NearError(f"{path}: cannot be read ({exc.strerror})") from exc
    if head[:4] == b"\x76\x2f\x31\x01" or head.startswith(b"#?"):
        from .envmap import describe_image_file

        print(_printable(describe_image_file(path)))
    else:
        from .asset import describe_asset

        print(_printable(describe_asset(path)))
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


def _cmd_train(args: argparse.Namespace) -> int:
    from .train.losses import LossWeights
    from .train.loop import TrainConfig, train

    pbr = LossWeights.pbr if args.pbr_weight is None else args.pbr_weight
    exposure = LossWeights.exposure if args.exposure is None else args.exposure
    if not exposure > 0 or not pbr >= 0:
        raise NearError(f"--exposure must be positive and --pbr-weight not negative, got {exposure} and {pbr}")
    config = TrainConfig(steps=args.steps, lr=args.lr, warmup=args.warmup, size=args.size, light_size=args.light_size,
                         seed=args.seed, weights=LossWeights(exposure=exposure, pbr=pbr),
                         images_per_step=args.images_per_step, uniform_images=args.uniform_images, inputs=args.inputs,
                         frozen=tuple(args.freeze))
    result = train(args.data, args.out, config, resume=args.resume, log_every=args.log_every,
                   checkpoint_every=args.checkpoint_every, init_from=args.init_from,
                   log=lambda line: print(line, flush=True))
    print(f"step {result['step']}: mean step {result['step_seconds']:.2f} s; weights in {Path(args.out) / 'weights'}")
    return 0


def _cmd_datagen(args: argparse.Namespace) -> int:
    import time

    from .datagen import DatagenConfig, run_datagen
    from .cycles.settings import RenderSettings

    try:
        shard = tuple(int(v) for v in args.shard.split("/"))
    except ValueError:
        raise NearError(f"--shard must look like 0/4, got {args.shard!r}") from None
    if len(shard) != 2 or min(args.objects, args.views, args.size, args.samples) < 1 or args.hdri_views < 0:
        raise NearError("--shard must be i/n; --objects, --views, --size and --samples must be at least 1")
    config = DatagenConfig(objects=args.objects, views=args.views, hdri_views=args.hdri_views,
                           hdris_per_object=args.hdris_per_object, skies_per_object=args.skies,
                           area_light=args.area_light, seed=args.seed,
                           render=RenderSettings(size=args.size, samples=args.samples))
    start = time.perf_counter()
    result = run_datagen(args.output, config, shard, meshes=args.meshes or ())
    done = len(result["rendered"])
    per_object = f", {(time.perf_counter() - start) / done:.1f} s per object" if done else ""
    print(f"rendered {done}, skipped {len(result['skipped'])} (finished before), failed {len(result['failed'])}"
          f"{per_object}; manifest: {Path(args.output) / 'manifest.json'}")
    return 1 if result["failed"] else 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .eval.tasks import run_eval

    if args.size is not None and args.size < 1:
        raise NearError("--size must be at least 1")
    run_eval(args.data, args.weights, args.output, objects=args.objects,
             hdris="held-out" if args.hdris == ["held-out"] else args.hdris, size=args.size)
    return 0


def _cmd_encode_mesh(args: argparse.Namespace) -> int:
    from .asset import write_asset
    from .lift.mesh import ShadedLight, encode_mesh

    shaded = None if args.shaded is None else ShadedLight(args.shaded, args.rotation, args.strength)
    asset = encode_mesh(args.mesh, args.weights, views=args.views, size=args.size, samples=args.samples,
                        shaded=shaded)
    write_asset(args.output, asset)
    print(f"{args.output}: {asset.num_voxels} voxels, {asset.channels}-channel {asset.latent} latent")
    return 0


def _cmd_lift(args: argparse.Namespace) -> int:
    from .asset import write_asset
    from .lift import LiftRequest, lift_image
    from .progress import Progress

    request = LiftRequest(args.image, args.weights, args.geometry, args.mesh, args.mesh_rotation, args.elevation,
                          args.seed, args.trellis, args.dinov2)
    with Progress(f"lifting {Path(args.image).name}", 100) as bar:
        def report(stage: str, done: float) -> None:
            bar.stage = f"lifting {Path(args.image).name}: {stage}"
            bar.advance(max(0, round(100 * done) - bar.done))
        asset = lift_image(request, report)
    write_asset(args.output, asset)
    print(f"{args.output}: {asset.num_voxels} voxels ({request.source} geometry), LH latent and material latents")
    return 0


def _cmd_train_lift(args: argparse.Namespace) -> int:
    from .train.lift import LiftConfig, train_lift

    config = LiftConfig(steps=args.steps, lr=args.lr, batch=args.batch, seed=args.seed,
                        geometry_steps=args.geometry_steps, objective=args.objective)
    result = train_lift(args.data, args.out, args.weights, config, resume=not args.restart)
    print(f"{args.out}/weights: lift networks after {result['step']} steps")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="near", description="NeAR engine: relightable 3D Gaussian objects.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="encode the bundled sample object, relight it under Blender's HDRIs as a "
                          "turntable next to Cycles references (images + contact sheet)")
    demo.add_argument("-o", "--output", default="out/demo", help="output folder (default: out/demo)")
    demo.add_argument("--size", type=PIXELS, default=384, help="image width and height in pixels (default 384)")
    demo.add_argument("--hdri", nargs="+", default=list(DEFAULT_HDRIS),
                      help=f"names of Blender's bundled HDRIs (default: {' '.join(DEFAULT_HDRIS)})")
    demo.add_argument("--mesh", default=str(SAMPLE_MESH), help="mesh to encode (default: the bundled sample vase)")
    demo.add_argument("--weights", default=DEFAULT_WEIGHTS, help="weights folder or bundled model (default: "
                      "near-tiny)")
    demo.add_argument("--views", type=COUNT, default=12, help="Cycles views the latent is encoded from (default 12)")
    demo.add_argument("--samples", type=COUNT, default=32, help="Cycles samples per image (default 32)")
    demo.set_defaults(func=_cmd_demo)

    render = sub.add_parser("render", help="render a .near asset relit by an HDRI, from an orbiting camera")
    render.add_argument("asset", help="the .near asset")
    render.add_argument("--hdri", required=True, help="equirectangular environment map (.exr or .hdr)")
    render.add_argument("--rotation", type=ANGLE, default=0.0,
                        help="world rotation about Z in degrees, as a Blender Mapping node's Z rotation")
    render.add_argument("--strength", type=STRENGTH, default=1.0, help="world strength (Background strength)")
    render.add_argument("--azimuth", type=ANGLE, default=30.0, help="camera azimuth in degrees, from +X towards +Y")
    render.add_argument("--elevation", type=_number(-90, 90), default=20.0, help="camera elevation in degrees above XY")
    render.add_argument("--distance", type=_number(0.2, 500), default=2.0, help="camera distance from the origin")
    render.add_argument("--fov", type=_number(1, 179), default=40.0, help="horizontal field of view in degrees")
    render.add_argument("--size", default="512x512", help="image size WxH (default 512x512)")
    render.add_argument("--transparent", action="store_true", help="leave the background out (alpha), as "
                        "Blender's transparent film")
    render.add_argument("--passes", nargs="*", default=[], help="passes for EXR output besides combined (default: "
                        f"all of {' '.join(PASS_NAMES[1:])})")
    render.add_argument("--weights", default=DEFAULT_WEIGHTS, help="weights folder (ours or the official NeAR layout) "
                        "or a bundled model (default: near-tiny, which ships with near_engine)")
    render.add_argument("-o", "--output", required=True, help="OUT.exr (all passes, scene-linear) or OUT.png "
                        "(combined, Standard view transform: clipped to [0, 1], sRGB)")
    render.set_defaults(func=_cmd_render)

    info = sub.add_parser("info", help="describe an EXR/HDR image or a .near asset")
    info.add_argument("file")
    info.set_defaults(func=_cmd_info)

    datagen = sub.add_parser("datagen", help="render synthetic training data with Cycles (seeded, sharded, resumable)",
                             description="Procedural objects rendered with Blender Cycles on the CPU: uniform-lit "
                             "views with G-buffers, and relit views under Blender's HDRIs (random rotation and "
                             "strength) and a sun-and-sky world. A rerun skips finished objects; run one process per "
                             "--shard i/n.")
    datagen.add_argument("-o", "--output", required=True, help="output folder (config.json, manifest.json, objects/)")
    datagen.add_argument("--objects", type=COUNT, default=300, help="number of objects (default 300)")
    datagen.add_argument("--views", type=COUNT, default=12, help="uniform-lit views per object (default 12)")
    datagen.add_argument("--hdri-views", type=_whole(0, 100_000), default=6,
                         help="of those, views also rendered under each relighting (default 6)")
    datagen.add_argument("--hdris-per-object", type=_whole(0, 100), default=2,
                         help="training HDRIs per object (default 2)")
    datagen.add_argument("--skies", type=int, default=1, choices=(0, 1),
                         help="sun-and-sky worlds per object, baked to an environment map (default 1)")
    datagen.add_argument("--area-light", action="store_true", help="also one random area light per object (not "
                         "used by training: it has no environment map)")
    datagen.add_argument("--size", type=PIXELS, default=128, help="image width and height in pixels (default 128)")
    datagen.add_argument("--samples", type=COUNT, default=16, help="Cycles samples per pixel, denoised (default 16)")
    datagen.add_argument("--seed", type=SEED, default=0, help="data set seed: object i of a seed is always the same")
    datagen.add_argument("--shard", default="0/1", help="render objects with index %% n == i (default 0/1)")
    datagen.add_argument("--meshes", nargs="+", metavar="MESH", help="render these mesh files (OBJ, glTF/GLB, PLY, "
                         ".blend) instead of procedural objects, all as validation objects: an evaluation set of "
                         "real meshes for `near eval` (--objects is ignored)")
    datagen.set_defaults(func=_cmd_datagen)

    evaluate = sub.add_parser("eval", help="score weights against Cycles ground truth on held-out objects and HDRIs",
                              description="NeAR (LH latent), the shaded-latent ablation and two baselines (baked "
                              "light, Lambertian) against the data set's Cycles images: PSNR and SSIM (Standard view "
                              "transform) on the object region and the full image, HDR-FLIP if flip-evaluator is "
                              "installed. Writes a markdown table and, next to it, a JSON file with every number.")
    evaluate.add_argument("--data", required=True, help="data set folder made by `near datagen`")
    evaluate.add_argument("--weights", default=DEFAULT_WEIGHTS, help="weights folder with the relighting networks and "
                          "encoder, or a bundled model (default: near-tiny)")
    evaluate.add_argument("--objects", default="val", help="'val' (the validation split, default) or "
                          "comma-separated object ids")
    evaluate.add_argument("--hdris", nargs="+", default=["held-out"], help="'held-out' (default: the data set's "
                          "held-out HDRIs) or HDRI names")
    evaluate.add_argument("--size", type=PIXELS, default=None, help="evaluate at this many pixels per side (a divisor "
                          "of the data set's image size; default: full size)")
    evaluate.add_argument("-o", "--output", required=True, help="REPORT.md (REPORT.json is written next to it)")
    evaluate.set_defaults(func=_cmd_eval)

    encode = sub.add_parser("encode-mesh", help="encode a mesh (OBJ, glTF/GLB, PLY, .blend) into a .near asset",
                            description="Imports the mesh with Blender, normalizes it (bounding-box centre to the "
                            "origin, largest side 1, Z up), voxelizes it, renders views with Cycles under uniform "
                            "white light (or an HDRI with --shaded), and encodes them with the weights' encoder.")
    encode.add_argument("mesh", help="mesh file Blender can import")
    encode.add_argument("-o", "--output", required=True, help="ASSET.near to write")
    encode.add_argument("--weights", default=DEFAULT_WEIGHTS, help="weights folder with the image_features and "
                        "encoder networks, or a bundled model (default: near-tiny)")
    encode.add_argument("--views", type=COUNT, default=24, help="views on a Hammersley sphere (default 24)")
    encode.add_argument("--size", type=PIXELS, default=256, help="view width and height in pixels (default 256)")
    encode.add_argument("--samples", type=COUNT, default=32, help="Cycles samples per view (default 32)")
    encode.add_argument("--shaded", metavar="HDRI", help="encode the shaded latent (ablation) from views lit by this "
                        "bundled Blender HDRI (forest, sunset, studio, city, courtyard, interior, night, sunrise)")
    encode.add_argument("--rotation", type=ANGLE, default=0.0, help="with --shaded: the HDRI's Mapping Z rotation")
    encode.add_argument("--strength", type=STRENGTH, default=1.0, help="with --shaded: the HDRI's strength")
    encode.set_defaults(func=_cmd_encode_mesh)

    tr = sub.add_parser("train", help="train near-tiny on a `near datagen` folder (torchrun-compatible, resumable)")
    tr.add_argument("--data", required=True, help="data set folder written by `near datagen`")
    tr.add_argument("--out", required=True, help="output folder: checkpoint.pt and weights/")
    tr.add_argument("--steps", type=_whole(1, 10**9), default=2000, help="total optimizer steps (default 2000)")
    tr.add_argument("--lr", type=_number(0, 1, open_lo=True), default=5e-4,
                    help="peak AdamW learning rate (default 5e-4)")
    tr.add_argument("--warmup", type=_whole(0, 10**9), default=100, help="linear warm-up steps before the cosine decay")
    tr.add_argument("--size", type=PIXELS, default=128, help="training image side; must divide the render size")
    tr.add_argument("--light-size", type=_whole(16, 1024), default=128, help="side of the tokenizer's input planes")
    tr.add_argument("--seed", type=SEED, default=0)
    tr.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt if it exists")
    tr.add_argument("--init-from", metavar="WEIGHTS", help="start the networks from this weights folder (e.g. an "
                    "earlier run's weights/), with a fresh optimizer and schedule")
    tr.add_argument("--exposure", type=_number(0, 1e4, open_lo=True), default=None,
                    help="gain inside the colour L1's log1p (default: "
                    "`LossWeights.exposure`, 4; 1 is the reference's loss; see near_engine/train/losses.py)")
    tr.add_argument("--pbr-weight", type=_number(0, 1e4), default=None,
                    help="weight of the material and normal term against "
                    "the G-buffers (default: `LossWeights.pbr`, 1; the reference's is 0.3)")
    tr.add_argument("--images-per-step", type=_whole(1, 1024), default=8,
                    help="images of one object supervised per step, "
                    "encoding it once (default 8)")
    tr.add_argument("--uniform-images", type=_whole(0, 1024), default=2, help="of those, uniform-lit views (default 2)")
    tr.add_argument("--inputs", default="lh+material", help="what the decoder reads, for the input ablation: "
                    "lh+material (near-tiny, default), lh, shaded or material")
    tr.add_argument("--freeze", nargs="+", default=[], metavar="NETWORK", help="keep these networks as loaded "
                    "(e.g. `--freeze image_features encoder` keeps the LH latent the lift was trained on)")
    tr.add_argument("--log-every", type=COUNT, default=10)
    tr.add_argument("--checkpoint-every", type=COUNT, default=200)
    tr.set_defaults(func=_cmd_train)

    lift = sub.add_parser("lift", help="lift one photo of an object into a relightable .near asset",
                          description="Prepares the photo (its alpha, or a one-colour backdrop cut out; a 1.2x square "
                          "crop matted on black), takes the voxels from a mesh (--mesh), near-tiny's own geometry "
                          "model, the silhouette inflated, or the official TRELLIS structure flow, and regresses the "
                          "illumination-homogenized latent and the material latents from the photo. The photo is "
                          "taken to show the object as Blender's Front view does (from -Y) at --elevation degrees; "
                          "turn a mesh with --mesh-rotation until its front view matches the photo.")
    lift.add_argument("image", help="the photo: PNG (8/16-bit, grey, palette; alpha used), JPEG or EXR")
    lift.add_argument("-o", "--output", required=True, help="ASSET.near to write")
    lift.add_argument("--mesh", help="take the geometry from this mesh file (OBJ, glTF/GLB, PLY, .blend)")
    lift.add_argument("--geometry", choices=("mesh", "own", "inflate", "trellis"), default=None,
                      help="where the voxels come from (default: mesh with --mesh, else own)")
    lift.add_argument("--mesh-rotation", type=ANGLE, default=0.0, help="turn the mesh about Z by this many degrees "
                      "before matching it to the photo")
    lift.add_argument("--elevation", type=_number(-89, 89), default=0.0,
                      help="the photo camera's elevation in degrees (default 0)")
    lift.add_argument("--weights", default=DEFAULT_WEIGHTS, help="weights folder with the lift networks, or a "
                      "bundled model (default: near-tiny)")
    lift.add_argument("--seed", type=SEED, default=0, help="seed of the sampled stages (the official flows)")
    lift.add_argument("--trellis", metavar="FOLDER", help="a TRELLIS-image-large weights folder (pipeline.json, ckpts/)"
                      ": its sparse-structure flow and decoder make the geometry with --geometry trellis")
    lift.add_argument("--dinov2", metavar="FILE", help="DINOv2 ViT-L/14-reg weights (.pth or .safetensors) for the "
                      "official flows (default: looked for in the weights folders)")
    lift.set_defaults(func=_cmd_lift)

    lift_tr = sub.add_parser("train-lift", help="train near-tiny's lift regressor (one lit photo -> the even "
                             "latents) on a `near datagen` folder (resumable)")
    lift_tr.add_argument("--data", required=True, help="data set folder written by `near datagen`")
    lift_tr.add_argument("--out", required=True, help="output folder: lift_checkpoint.pt, objects/ (cached targets) "
                         "and weights/ (WEIGHTS with the lift networks added)")
    lift_tr.add_argument("--weights", default=DEFAULT_WEIGHTS, help="the renderer's weights, whose mesh encoder "
                         "makes the targets and starts the regressor (default: near-tiny)")
    lift_tr.add_argument("--steps", type=_whole(1, 10**9), default=3000, help="total optimizer steps (default 3000)")
    lift_tr.add_argument("--lr", type=_number(0, 1, open_lo=True), default=3e-4, help="peak AdamW learning rate")
    lift_tr.add_argument("--batch", type=_whole(1, 1024), default=4, help="photos per step (default 4)")
    lift_tr.add_argument("--geometry-steps", type=_whole(0, 10**9), default=1500, help="then train near-tiny's own "
                         "geometry model this many steps (default 1500; 0: none)")
    lift_tr.add_argument("--objective", choices=("regression", "flow"), default="regression",
                         help="regression (near-tiny's lift) or flow (rectified flow matching of the same network, "
                         "kept in the checkpoint for benchmarks/lift_flow_vs_regressor.py)")
    lift_tr.add_argument("--seed", type=SEED, default=0)
    lift_tr.add_argument("--restart", action="store_true", help="start over instead of resuming OUT's checkpoint")
    lift_tr.set_defaults(func=_cmd_train_lift)

    bench = sub.add_parser("bench", help="speed measurements (print JSON)")
    bench_sub = bench.add_subparsers(dest="target", required=True)
    raster = bench_sub.add_parser("raster", help="rasterizer forward/backward on the fixed benchmark scene")
    raster.add_argument("--gaussians", type=_whole(0, 10**8), default=100_000)
    raster.add_argument("--size", type=_whole(1, 4096), default=512)
    raster.add_argument("--repeats", type=_whole(1, 1000), default=5, help="timed runs per figure; the best is kept")
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
        print(f"near: error: {_printable(str(exc))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
