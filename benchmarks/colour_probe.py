"""Does a trained near-tiny carry object colour from the views into its decoded Gaussians? Two measurements per
weights folder, on training objects of a `near datagen` data set:

* **swap test**: encode an object from its uniform views, then from the same views with red and blue swapped (and
  scaled 2x / 0.3x); print the decoded mean base colour of both. A model that reads colour changes hue; one that
  does not prints the same colour twice.
* **linear probe**: least-squares fit from the 8-channel latent (and from the IAD's output) to the voxels' lifted
  input colour, over several objects; print R^2 per channel (1 = the colour is linearly in there, 0 = absent).

Run: `.venv/bin/python benchmarks/colour_probe.py --data out/data [--weights near-tiny] [--objects 00000,00003,00005]`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from near_engine.datagen.dataset import load_object  # noqa: E402
from near_engine.envmap import EnvMap  # noqa: E402
from near_engine.eval.tasks import Model, _camera  # noqa: E402
from near_engine.models.encoder import ImageFeatures, lift_features  # noqa: E402
from near_engine.models.gaussian_heads import voxel_centres  # noqa: E402
from near_engine.pipeline import Scene  # noqa: E402
from near_engine.sparse import SparseTensor  # noqa: E402


def r_squared(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-column R^2 of the least-squares affine fit y ~ x."""
    design = np.concatenate([x, np.ones((len(x), 1))], 1)
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    return 1 - (y - design @ coef).var(0) / y.var(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--weights", default="near-tiny")
    parser.add_argument("--objects", default="00000,00003,00005,00010,00012")
    args = parser.parse_args()
    model = Model.load(args.weights, "cpu")
    latents, decoded, colours = [], [], []
    for oid in args.objects.split(","):
        data = load_object(Path(args.data) / "objects" / oid)
        cameras = [_camera(c) for c in data["meta"]["cameras"]]
        coords, _ = model.voxels(data["vertices"], data["triangles"])
        swapped = data["rgba"].copy()
        swapped[..., :3] = data["rgba"][..., [2, 1, 0]] * np.array([2.0, 1.0, 0.3])
        camera = cameras[0]
        covered = data["rgba"][0, ..., 3] > 0.5
        line = f"{oid}: Cycles base colour {np.round(data['base_color'][0][covered].mean(0), 3)}"
        for name, views in (("decoded", data["rgba"]), ("swapped views", swapped)):
            asset = model.latent(coords, views, cameras, data["depth"])
            out = model.pipeline.render(Scene([(asset, np.eye(4))], EnvMap.uniform(1.0), camera, transparent=True),
                                        ("base_color", "alpha"))
            line += f"; {name} {np.round(out['base_color'][out['alpha'][..., 0] > 0.5].mean(0), 3)}"
        print(line, flush=True)
        c = torch.as_tensor(coords)
        with torch.no_grad():
            maps = model.encoders["image_features"](torch.from_numpy(data["rgba"]))
            lifted = lift_features(maps, voxel_centres(c, 64).float(), cameras, torch.from_numpy(data["depth"]),
                                   tolerance=2 / 64)
            latent = model.encoders["encoder"](SparseTensor.from_list([(c, lifted)], 64)).feats
            h, _ = model.pipeline.networks["decoder"](SparseTensor.from_list([(c, latent)], 64))
        skip = slice(-ImageFeatures.INPUT_CHANNELS, -1)  # the lifted log-encoded RGB
        latents.append(latent.numpy()), decoded.append(h.feats.numpy()), colours.append(lifted[:, skip].numpy())
    colours = np.concatenate(colours)
    print(f"R^2 latent -> voxel colour (R, G, B): {np.round(r_squared(np.concatenate(latents), colours), 3)}")
    print(f"R^2 IAD output -> voxel colour (R, G, B): {np.round(r_squared(np.concatenate(decoded), colours), 3)}")


if __name__ == "__main__":
    main()
