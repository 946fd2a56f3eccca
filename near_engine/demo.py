"""The main job on embedded defaults, until the NeAR model lands: a procedural Gaussian object, lit by Blender's
bundled HDRIs and rendered as a turntable, written as EXR (scene-linear, RGBA + depth) and PNG plus a contact sheet.

The object is a banded sphere inside a tilted gold torus, built from flat surface-aligned Gaussians. Its shading is
Lambertian: albedo / pi times the irradiance the HDRI sends onto each Gaussian's normal (integrated over a
downsampled map), with no shadows. It exercises every engine piece this stage has: HDRI reading with rotation and
strength, cameras, Gaussian transforms, the rasterizer, background compositing and image output.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from .blender_data import blender_hdri
from .camera import Camera
from .envmap import EnvMap, equirect_solid_angles, rotation_z_matrix, uv_to_direction
from .errors import NearError
from .files import write_bytes_atomically
from .gaussians import Gaussians
from .images import write_exr, write_png
from .raster import rasterize

DEFAULT_HDRIS = ("forest", "sunset", "studio")


def demo_object(n_sphere: int = 24_000, n_torus: int = 16_000, seed: int = 0) -> Gaussians:
    """A banded sphere (radius 0.28) and a tilted gold torus around it, as flat Gaussians with albedo and normals."""
    rng = np.random.default_rng(seed)
    # Sphere: a Fibonacci lattice, coloured in latitude bands.
    i = np.arange(n_sphere) + 0.5
    z = 1 - 2 * i / n_sphere
    phi = i * math.pi * (3 - math.sqrt(5))
    r = np.sqrt(1 - z * z)
    normals_s = np.stack([r * np.cos(phi), r * np.sin(phi), z], -1)
    bands = np.array([[0.8, 0.1, 0.08], [0.9, 0.85, 0.8], [0.1, 0.3, 0.8], [0.9, 0.85, 0.8]])
    albedo_s = bands[((np.arcsin(z) / math.pi + 0.5) * 8).astype(int) % 4]
    means_s = 0.28 * normals_s
    # Torus: major radius 0.4, minor 0.06, tilted 25 degrees about X.
    u, v = rng.uniform(0, 2 * math.pi, (2, n_torus))
    centre = np.stack([np.cos(u), np.sin(u), np.zeros_like(u)], -1)
    normals_t = np.cos(v)[:, None] * centre + np.sin(v)[:, None] * np.array([0.0, 0.0, 1.0])
    means_t = 0.4 * centre + 0.06 * normals_t
    tilt = np.array([[1, 0, 0], [0, math.cos(0.44), -math.sin(0.44)], [0, math.sin(0.44), math.cos(0.44)]])
    means_t, normals_t = means_t @ tilt.T, normals_t @ tilt.T
    albedo_t = np.tile([[0.95, 0.7, 0.25]], (n_torus, 1))

    normals = np.concatenate([normals_s, normals_t])
    # Flat discs: the quaternion turning +Z onto the normal (w = 1 + n.z, axis = z x n), scale 0.1 along the normal.
    quats = np.stack([1 + normals[:, 2] + 1e-6, -normals[:, 1], normals[:, 0], np.zeros(len(normals))], -1)
    disc = np.concatenate([np.full(n_sphere, 0.012), np.full(n_torus, 0.008)])
    scales = np.stack([disc, disc, 0.1 * disc], -1)
    as_t = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    return Gaussians(as_t(np.concatenate([means_s, means_t])), as_t(quats), as_t(scales),
                     torch.full((len(normals),), 0.9), {"albedo": as_t(np.concatenate([albedo_s, albedo_t])),
                                                        "normal": as_t(normals)})


def diffuse_irradiance(env: EnvMap, normals: np.ndarray, height: int = 32) -> np.ndarray:
    """Irradiance [N,3] on surfaces facing `normals` [N,3]: sum of L(w) max(0, n.w) dOmega over a downsampled map."""
    small = env.resized(height)
    uv = np.stack(np.meshgrid((np.arange(small.width) + 0.5) / small.width,
                              1 - (np.arange(small.height) + 0.5) / small.height), -1)  # v from the bottom
    dirs = uv_to_direction(uv.reshape(-1, 2))
    dirs = dirs @ rotation_z_matrix(env.rotation_z)  # sample() turns world directions by Rz into the map: undo it
    radiance = small.pixels.reshape(-1, 3).astype(np.float64) * env.strength
    weights = equirect_solid_angles(small.height, small.width).repeat(small.width)
    cosines = np.clip(normals @ dirs.T, 0.0, None)
    return cosines @ (radiance * weights[:, None])


def render_demo(out_dir: str | Path, size: int = 384, hdris=DEFAULT_HDRIS, azimuths=(0, 90, 180, 270)) -> dict:
    """Render the demo object under each HDRI from each azimuth; returns a summary (also written as summary.json)."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise NearError(f"{out} exists and is not a folder: choose another output folder") from None
    except OSError as exc:
        raise NearError(f"cannot create the output folder {out}: {exc.strerror or exc}") from None
    obj = demo_object()
    normals = obj.channels["normal"].numpy().astype(np.float64)
    rows, summary = [], {"size": size, "gaussians": len(obj), "frames": []}
    for name in hdris:
        env = EnvMap.read(blender_hdri(name), rotation_z=math.radians(30.0))
        colour = obj.channels["albedo"].numpy() / math.pi * diffuse_irradiance(env, normals)
        tiles = []
        for az in azimuths:
            cam = Camera.orbit(az, 20.0, 2.2, width=size, height=size, fov_x_deg=40.0)
            background = torch.as_tensor(env.background(cam))
            t0 = time.perf_counter()
            result = rasterize(obj.means, obj.quats, obj.scales, obj.opacities, torch.as_tensor(colour, dtype=torch.float32),
                               cam, background)
            ms = (time.perf_counter() - t0) * 1e3
            rgb, alpha, depth = (x.numpy() for x in (result.channels, result.alpha[..., 0], result.depth[..., 0]))
            stem = out / f"{name}_az{az:03d}"
            write_exr(stem.with_suffix(".exr"), {"R": rgb[..., 0], "G": rgb[..., 1], "B": rgb[..., 2], "A": alpha,
                                                 "Depth.Z": depth})
            write_png(stem.with_suffix(".png"), rgb)
            tiles.append(rgb)
            summary["frames"].append({"hdri": name, "azimuth": az, "raster_ms": round(ms, 1),
                                      "object_pixels": int((alpha > 0.5).sum())})
        rows.append(np.concatenate(tiles, axis=1))
    write_png(out / "contact_sheet.png", np.concatenate(rows, axis=0))
    summary["contact_sheet"] = str(out / "contact_sheet.png")
    write_bytes_atomically(out / "summary.json", json.dumps(summary, indent=1).encode())
    return summary
