"""near-tiny's lift: the direct regressor against rectified flow matching of the same network, on held-out objects.

    .venv/bin/python benchmarks/lift_flow_vs_regressor.py --data DATA --regressor RUN/weights \\
        --flow FLOW_RUN/lift_checkpoint.pt [--steps 12] [--photos 3]

Both were trained by `near train-lift` on the same data with the same budget (`--objective regression|flow`). For
each validation object of DATA and its first `--photos` relit views, each method predicts the object's even latents
from the one photo; printed per method: the LH latent's squared error divided by the per-channel variance of the
targets (1.0 = predicting each channel's mean), the material latents' mean absolute error, and the seconds per lift
(the flow runs `--steps` Euler steps, one network pass each). The reference in the same process is the regressor.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from near_engine.checkpoints import read_model_entry
from near_engine.configs import ENCODER_KEYS, load_networks
from near_engine.frame import DEFAULT_MATERIAL
from near_engine.lift.regressor import init_from_encoder, predict_latents, sample_flow_latents
from near_engine.train.data import list_objects
from near_engine.train.lift import flow_targets, load_lift_object


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--regressor", required=True, help="weights folder with the lift networks")
    parser.add_argument("--flow", required=True, help="lift_checkpoint.pt of a --objective flow run")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--photos", type=int, default=3)
    parser.add_argument("--cache", default=None, help="folder for the validation objects' targets")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    regressor, _ = load_networks(args.regressor, "cpu", keys=("lift_features", "lift_encoder"))
    encoders, _ = load_networks(args.regressor, "cpu", keys=ENCODER_KEYS)
    encoder_args = read_model_entry("encoder", Path(args.regressor) / "encoder").args
    flow = torch.nn.ModuleDict(init_from_encoder(encoders["image_features"], encoders["encoder"], encoder_args,
                                                 DEFAULT_MATERIAL, flow=True))
    flow.load_state_dict(torch.load(args.flow, map_location="cpu", weights_only=True)["networks"])
    cache = Path(args.cache) if args.cache else Path(args.flow).parent / "val_objects"
    objects = [load_lift_object(f, encoders, cache=cache) for f in list_objects(args.data, "val")]
    scale = torch.cat([o.latent for o in objects]).var(0).clamp_min(1e-4)
    results: dict[str, dict[str, list[float]]] = {"regressor": {}, "flow": {}}
    for obj in objects:
        for photo in range(min(args.photos, obj.lit_count)):
            image, camera = obj.photos[photo]
            t0 = time.perf_counter()
            latent, materials = predict_latents(regressor, obj.coords, image, camera)
            seconds = time.perf_counter() - t0
            predictions = {"regressor": (latent, materials, seconds)}
            _, unit = flow_targets(obj, scale)
            t0 = time.perf_counter()
            sample = sample_flow_latents(flow, obj.coords, image, camera, unit, args.steps, seed=photo)
            predictions["flow"] = (sample[:, :8], sample[:, 8:].clamp(0, 1), time.perf_counter() - t0)
            for name, (lat, mat, sec) in predictions.items():
                row = results[name]
                row.setdefault("latent_error", []).append(float(((lat - obj.latent) ** 2 / scale).mean()))
                row.setdefault("material_l1", []).append(float((mat - obj.materials).abs().mean()))
                row.setdefault("seconds", []).append(sec)
    summary = {name: {k: round(float(np.mean(v)), 4) for k, v in row.items()} for name, row in results.items()}
    summary["flow_over_regressor"] = {k: round(summary["flow"][k] / summary["regressor"][k], 2)
                                      for k in summary["regressor"]}
    print(json.dumps({"bench": "lift_flow_vs_regressor", "objects": len(objects), "steps": args.steps,
                      **summary}))


if __name__ == "__main__":
    main()
