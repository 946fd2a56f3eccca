"""Write the main job's sample object, `near_engine/samples/vase.{obj,mtl,png}`: a glazed ceramic vase.

A textured surface of revolution (OBJ with an MTL and a painted PNG texture), so the main job and the evaluation
exercise a real textured mesh file that no training object resembles (the training objects are Blender primitives
with procedural materials). Run once; the files are committed:

    .venv/bin/python tools/make_sample_vase.py
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

OUT = Path(__file__).resolve().parents[1] / "near_engine" / "samples"
SEGMENTS, RINGS = 64, 48
TEXTURE = (512, 256)  # width (around), height (along the profile)


def profile(t: np.ndarray) -> np.ndarray:
    """Radius along the height t in [0, 1]: foot, round belly, narrow neck, flared lip."""
    belly = 0.30 * np.exp(-((t - 0.38) / 0.26) ** 2)
    neck = 0.09 + 0.07 * np.clip((t - 0.78) / 0.22, 0, 1) ** 2
    return np.maximum(np.maximum(belly, neck), 0.14 * (t < 0.06)) + 0.02


def texture() -> np.ndarray:
    """Cream glaze with cobalt bands, a zigzag band and dots: [H, W, 3] uint8 (row 0 is the top of the vase)."""
    w, h = TEXTURE
    u, v = np.meshgrid((np.arange(w) + 0.5) / w, 1 - (np.arange(h) + 0.5) / h)  # v = 0 at the foot
    cream, cobalt, rust = np.array([0.93, 0.88, 0.76]), np.array([0.08, 0.18, 0.55]), np.array([0.65, 0.22, 0.1])
    image = np.broadcast_to(cream, (h, w, 3)).copy()
    for centre, width in ((0.12, 0.03), (0.62, 0.02), (0.9, 0.025)):
        image[np.abs(v - centre) < width] = cobalt
    zigzag = 0.38 + 0.06 * np.abs(((u * 12) % 1.0) * 2 - 1) - 0.03
    image[np.abs(v - zigzag) < 0.018] = rust
    du, dv = (u * 16) % 1.0 - 0.5, (v - 0.75) * 16 * h / w * 2
    image[(du ** 2 + dv ** 2) < 0.06] = cobalt
    return (image * 255).round().astype(np.uint8)


def write() -> None:
    t = np.linspace(0.0, 1.0, RINGS)
    angles = np.linspace(0.0, 2 * math.pi, SEGMENTS + 1)  # the seam repeats its column for the texture's wrap
    r = profile(t)
    x = r[:, None] * np.cos(angles)[None]
    y = r[:, None] * np.sin(angles)[None]
    z = np.broadcast_to((t * 1.0)[:, None], x.shape)
    side = np.stack([x, y, z], -1).reshape(-1, 3)
    uv_side = np.stack(np.meshgrid(angles / (2 * math.pi), t), -1).reshape(-1, 2)
    index = lambda i, j: i * (SEGMENTS + 1) + j + 1  # noqa: E731  (OBJ indices start at 1)
    faces = [((index(i, j), index(i, j)), (index(i, j + 1), index(i, j + 1)), (index(i + 1, j + 1), index(i + 1, j + 1)),
              (index(i + 1, j), index(i + 1, j))) for i in range(RINGS - 1) for j in range(SEGMENTS)]
    vertices, uvs = list(side), list(uv_side)
    for ring, normal_up in ((0, False), (RINGS - 1, True)):  # caps: a fan around a centre vertex, plain glaze colour
        centre = len(vertices) + 1
        vertices.append(np.array([0.0, 0.0, t[ring] - (0.03 if normal_up else 0.0)]))
        uvs.append(np.array([0.5, 0.3]))
        cap_uv = len(uvs)
        for j in range(SEGMENTS):
            a, b = index(ring, j), index(ring, j + 1)
            faces.append(((centre, cap_uv), (b, cap_uv), (a, cap_uv)) if not normal_up
                         else ((centre, cap_uv), (a, cap_uv), (b, cap_uv)))
    lines = ["# NeAR sample object: a glazed vase (tools/make_sample_vase.py)", "mtllib vase.mtl", "o vase"]
    # OBJ is Y-up: Blender's importer turns (x, y, z) into (x, -z, y), so the vase's Z (height) is written as y.
    lines += [f"v {p[0]:.5f} {p[2]:.5f} {0.0 - p[1]:.5f}" for p in vertices]
    lines += [f"vt {q[0]:.5f} {q[1]:.5f}" for q in uvs]
    lines += ["usemtl glaze", "s 1"]
    lines += ["f " + " ".join(f"{v}/{vt}" for v, vt in face) for face in faces]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "vase.obj").write_text("\n".join(lines) + "\n")
    (OUT / "vase.mtl").write_text("newmtl glaze\nKa 0 0 0\nKd 1 1 1\nKs 0.5 0.5 0.5\nNs 500\nillum 2\n"
                                  "map_Kd vase.png\n")
    Image.fromarray(texture()).save(OUT / "vase.png", optimize=True)


if __name__ == "__main__":
    write()
