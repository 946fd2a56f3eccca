"""The main job on embedded defaults: encode the bundled sample object with the bundled near-tiny weights, relight it
under several of Blender's HDRIs as a turntable, and set it next to Cycles so a person can judge it.

Steps (all offline, on the CPU):
1. `encode_mesh`: import the sample (a textured OBJ no training object resembles), render uniformly lit views with
   Cycles and encode its LH latent; saved as `sample.near`.
2. For each HDRI (rotated 30 degrees, as a Mapping node would): a Cycles path-traced reference of the mesh from the
   first turntable view, then `NearPipeline.render` from every turntable azimuth over the HDRI background.
3. The photo row: a Cycles render of the mesh from the photo convention's front view under `PHOTO_HDRI` stands in for
   a user's photo (`photo.png`, with alpha, exposed and white-balanced as a camera does it: `lift.image.metered`);
   `lift_image` lifts it with near-tiny (geometry from the mesh) and the lifted object is relit under each HDRI in the
   photo's own view and from the first turntable view (a novel view), each scored against Cycles.
4. Files: `HDRI_azNNN.exr` (scene-linear RGBA + `Depth.Z`) and `.png` (Standard view transform),
   `HDRI_cycles.png`, `contact_sheet.png` (one row per HDRI: Cycles, then NeAR's turntable; then the photo row:
   the photo, the lift relit in its view under each HDRI, then in the novel view) and `summary.json`
   (timings; PSNR/SSIM of NeAR against Cycles on the object and on the full image, and the silhouettes' IoU).
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .asset import write_asset
from .blender_data import blender_hdri
from .bundled import DEFAULT_WEIGHTS, SAMPLE_MESH
from .camera import Camera
from .envmap import EnvMap
from .errors import NearError
from .files import write_bytes_atomically
from .images import write_exr, write_png
from .progress import Progress

DEFAULT_HDRIS = ("forest", "sunset", "city")
#: The light of the stand-in photo the demo lifts: an HDRI it never relights with.
PHOTO_HDRI = "courtyard"
DEFAULT_AZIMUTHS = (0, 60, 120, 180, 240, 300)
ELEVATION_DEG, DISTANCE, FOV_DEG = 20.0, 2.0, 40.0
WORLD_ROTATION_DEG = 30.0


def turntable_camera(azimuth: float, size: int) -> Camera:
    """The demo's orbiting camera: 20 degrees above the horizon, 2 units from the object, 40 degrees wide."""
    return Camera.orbit(azimuth, ELEVATION_DEG, DISTANCE, width=size, height=size, fov_x_deg=FOV_DEG)


def silhouette_iou(alpha_a: np.ndarray, alpha_b: np.ndarray) -> float:
    """Intersection over union of two silhouettes (alpha > 0.5)."""
    a, b = alpha_a > 0.5, alpha_b > 0.5
    return float((a & b).sum() / max(1, (a | b).sum()))


def cycles_references(mesh: Path, hdris: Sequence[str], camera: Camera, samples: int) -> dict[str, np.ndarray]:
    """Premultiplied linear RGBA [H, W, 4] Cycles renders of the normalized mesh under each HDRI (transparent film)."""
    from .cycles.lights import Light
    from .cycles.meshes import import_mesh
    from .cycles.render import image_count, render_views
    from .cycles.settings import RenderSettings
    from .exr_layers import read_channels, stack_channels

    import_mesh(mesh)
    lights = [Light("hdri", name, math.radians(WORLD_ROTATION_DEG), 1.0) for name in hdris]
    with tempfile.TemporaryDirectory() as tmp, \
            Progress("Cycles references", image_count(1, len(lights), 1)) as bar:
        render_views([camera], lights, [0], Path(tmp), RenderSettings(camera.width, samples), bar)
        return {light.hdri: stack_channels(read_channels(Path(tmp) / light.name / "view_000.exr"), "", "RGBA")
                for light in lights}


def render_demo(out_dir: str | Path, size: int = 384, hdris: Sequence[str] = DEFAULT_HDRIS,
                azimuths: Sequence[float] = DEFAULT_AZIMUTHS, *, weights: str | Path = DEFAULT_WEIGHTS,
                mesh: str | Path = SAMPLE_MESH, views: int = 12, samples: int = 32,
                log: Callable[[str], object] = print) -> dict:
    """Run the main job into `out_dir`; returns the summary (also written as summary.json)."""
    from .lift.mesh import encode_mesh
    from .eval.tasks import score
    from .pipeline import NearPipeline, Scene

    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise NearError(f"{out} exists and is not a folder: choose another output folder") from None
    except OSError as exc:
        raise NearError(f"cannot create the output folder {out}: {exc.strerror or exc}") from None
    if size < 16 or not azimuths or not hdris:
        raise NearError(f"the demo needs at least 16 px, one azimuth and one HDRI (got {size}, {list(azimuths)}, "
                        f"{list(hdris)})")
    mesh = Path(mesh)
    start = time.perf_counter()
    asset = encode_mesh(mesh, weights, views=views, size=256, samples=samples, log=log)
    write_asset(out / "sample.near", asset)
    summary: dict = {"mesh": mesh.name, "weights": str(weights), "size": size, "voxels": len(asset.coords),
                     "encode_seconds": round(time.perf_counter() - start, 1), "frames": [], "cycles": {}}
    log(f"encoded {mesh.name}: {len(asset.coords)} voxels in {summary['encode_seconds']} s; rendering Cycles "
        "references ...")
    start = time.perf_counter()
    references = cycles_references(mesh, hdris, turntable_camera(azimuths[0], size), samples)
    summary["cycles_seconds"] = round(time.perf_counter() - start, 1)
    pipeline = NearPipeline.from_pretrained(weights, "cpu")
    rows = []
    bar = Progress("NeAR turntable", len(hdris) * len(azimuths))
    for name in hdris:
        env = EnvMap.read(blender_hdri(name), rotation_z=math.radians(WORLD_ROTATION_DEG))
        reference_camera = turntable_camera(azimuths[0], size)
        reference = references[name][..., :3] + (1 - references[name][..., 3:]) * env.background(reference_camera)
        write_png(out / f"{name}_cycles.png", reference)
        tiles = [reference]
        for k, azimuth in enumerate(azimuths):
            camera = turntable_camera(azimuth, size)
            t0 = time.perf_counter()
            result = pipeline.render(Scene([(asset, np.eye(4))], env, camera, transparent=True),
                                     ("combined", "depth"))
            ms = (time.perf_counter() - t0) * 1e3
            rgba, depth = result["combined"], result["depth"][..., 0]
            background = env.background(camera)
            rgb = rgba[..., :3] + (1 - rgba[..., 3:]) * background
            stem = out / f"{name}_az{int(azimuth):03d}"
            write_exr(stem.with_suffix(".exr"), {"R": rgb[..., 0], "G": rgb[..., 1], "B": rgb[..., 2],
                                                 "A": rgba[..., 3], "Depth.Z": depth})
            write_png(stem.with_suffix(".png"), rgb)
            tiles.append(rgb)
            bar.advance()
            summary["frames"].append({"hdri": name, "azimuth": azimuth, "render_ms": round(ms, 1),
                                      "object_pixels": int((rgba[..., 3] > 0.5).sum())})
            if k == 0:
                scores = score(references[name], rgba, background, with_flip=False)
                scores["silhouette_iou"] = silhouette_iou(references[name][..., 3], rgba[..., 3])
                summary["cycles"][name] = {key: round(value, 4) for key, value in scores.items()}
        rows.append(np.concatenate(tiles, axis=1))
    bar.close()
    lift_row = _photo_row(out, mesh, weights, hdris, size, samples, references, pipeline, summary, log)
    if lift_row is not None:
        rows.append(lift_row)
    width = max(row.shape[1] for row in rows)  # rows of different lengths are padded with black
    rows = [np.concatenate([row, np.zeros((size, width - row.shape[1], 3))], axis=1) for row in rows]
    write_png(out / "contact_sheet.png", np.concatenate(rows, axis=0))
    summary["contact_sheet"] = str(out / "contact_sheet.png")
    write_bytes_atomically(out / "summary.json", json.dumps(summary, indent=1).encode())
    return summary


def _photo_row(out: Path, mesh: Path, weights, hdris: Sequence[str], size: int, samples: int,
               references: dict[str, np.ndarray], pipeline, summary: dict,
               log: Callable[[str], object]) -> np.ndarray | None:
    """The lift's row: the stand-in photo, then the lifted object under each HDRI in the photo's own view and in the
    first turntable view (a novel view from the side: half of what it shows, the photo did not), each scored against
    Cycles; None (said why) when the weights cannot lift."""
    from .eval.tasks import score
    from .lift import LiftRequest, lift_image, load_lift_networks
    from .lift.image import metered
    from .lift.views import front_camera
    from .pipeline import Scene

    try:
        load_lift_networks(weights, "mesh")
    except NearError as exc:
        log(f"no photo row: {exc}")
        return None
    photo_camera = front_camera(ELEVATION_DEG, size)
    photo = cycles_references(mesh, [PHOTO_HDRI], photo_camera, samples)[PHOTO_HDRI]
    env = EnvMap.read(blender_hdri(PHOTO_HDRI), rotation_z=math.radians(WORLD_ROTATION_DEG))
    exposed = metered(photo, env.mean_radiance())  # as a camera would have exposed and white-balanced it
    write_png(out / "photo.png", exposed[..., :3], exposed[..., 3])
    start = time.perf_counter()
    asset = lift_image(LiftRequest(out / "photo.png", weights, mesh=mesh, elevation=ELEVATION_DEG))
    write_asset(out / "photo.near", asset)
    summary["lift"] = {"photo": "photo.png", "photo_hdri": PHOTO_HDRI, "voxels": len(asset.coords),
                       "lift_seconds": round(time.perf_counter() - start, 1), "cycles": {}}
    tiles = [photo[..., :3] + (1 - photo[..., 3:]) * env.background(photo_camera)]
    photo_view = cycles_references(mesh, hdris, photo_camera, samples)  # the photo's own view, relit
    views = {"photo view": (photo_camera, photo_view, "lifted_photo_view"),
             "novel view": (turntable_camera(DEFAULT_AZIMUTHS[0], size), references, "lifted")}
    for view, (camera, truth, suffix) in views.items():
        summary["lift"]["cycles"][view] = {}
        for name in hdris:
            env = EnvMap.read(blender_hdri(name), rotation_z=math.radians(WORLD_ROTATION_DEG))
            rgba = pipeline.render(Scene([(asset, np.eye(4))], env, camera, transparent=True), ("combined",))[
                "combined"]
            background = env.background(camera)
            rgb = rgba[..., :3] + (1 - rgba[..., 3:]) * background
            write_png(out / f"{name}_{suffix}.png", rgb)
            if view == "photo view":  # its Cycles reference, for a side-by-side look
                write_png(out / f"{name}_cycles_photo_view.png", truth[name][..., :3]
                          + (1 - truth[name][..., 3:]) * background)
            tiles.append(rgb)
            scores = score(truth[name], rgba, background, with_flip=False)
            summary["lift"]["cycles"][view][name] = {key: round(value, 4) for key, value in scores.items()}
        log(f"lifted photo.png, {view}: " + ", ".join(f"{name} {v['psnr_object']:.2f} dB" for name, v in
                                                     summary["lift"]["cycles"][view].items())
            + " object PSNR against Cycles")
    return np.concatenate(tiles, axis=1)
