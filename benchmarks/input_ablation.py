"""The paper's input ablation at equal budget: one decoder trained on each input (LH, shaded, material latents only,
LH + material), each scored on the held-out objects under the held-out HDRIs against Cycles.

    .venv/bin/python benchmarks/input_ablation.py --data ~/.cache/near/data [--out ~/.cache/near/ablation]
        [--objects 40] [--steps 150] [--encoder near_engine/weights/near-tiny]

The protocol is NeAR's: the latents' encoder is fixed and a decoder is trained per input.
- The image features and the mesh encoder start from `--encoder` and stay frozen. The LH and the shaded latents are
  the same encoder's output on uniform-lit and on lit views.
- The renderer networks (decoder, light tokenizer, LAD and heads) start fresh from the same seed for each input. Each
  trains the same steps on the same images of the first `--objects` training objects (sampling is a pure function of
  seed and step).
- Each decoder is scored on the input it was trained on, as `near eval` builds it: LH and LH + material from the 12
  uniform-lit views (as `near encode-mesh`), material from the material latents alone, shaded from the 6 views the
  data set lights with one training HDRI. The LH decoder is also scored on the LH latent of those same 6 views (the
  like-for-like comparison with shaded).

Each input's run checkpoints in OUT/INPUT/ and resumes there; a finished run is not trained again. Prints the table
with each row's difference to the shaded row, and writes OUT/ablation.json.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from near_engine.eval.tasks import Model, evaluate_object, object_folders
from near_engine.frame import INPUTS
from near_engine.train.data import list_objects
from near_engine.train.loop import CHECKPOINT, TrainConfig, Trainer, fit, load_objects

ENCODER = ("image_features", "encoder")
#: Table rows: (label, the input the decoder was trained on, the `near eval` method that builds its latent).
ROWS = (("LH + material latents (near-tiny)", "lh+material", "near_lh"),
        ("LH latent", "lh", "near_lh"),
        ("LH latent, 6 views", "lh", "ablation_lh_relit_views"),
        ("Shaded latent, 6 views", "shaded", "ablation_shaded"),
        ("Material latents only", "material", "near_lh"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a `near datagen` folder")
    parser.add_argument("--out", default=str(Path.home() / ".cache/near/ablation"))
    parser.add_argument("--objects", type=int, default=40, help="the first N training objects")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--encoder", default="near_engine/weights/near-tiny", help="weights with the fixed encoder")
    args = parser.parse_args()
    out = Path(args.out)
    base = TrainConfig(steps=args.steps, lr=args.lr, warmup=min(20, args.steps // 10), frozen=ENCODER)
    objects = load_objects(list_objects(args.data, "train")[:args.objects], base)
    for inputs in INPUTS:
        folder = out / inputs.replace("+", "-")
        if (folder / "weights" / "pipeline.json").is_file() and _trained_steps(folder) >= args.steps:
            continue
        print(f"training on {inputs}")
        fit(Trainer(replace(base, inputs=inputs), objects), folder, resume=True, init_from=args.encoder,
            init_keys=ENCODER, log_every=25, checkpoint_every=25)
    data = Path(args.data)
    hdris = json.loads((data / "manifest.json").read_text())["splits"]["held_out_hdris"]
    folders = object_folders(data, "val")
    table = {}
    for inputs in INPUTS:
        model = Model.load(out / inputs.replace("+", "-") / "weights", "cpu")
        methods = [method for _, trained, method in ROWS if trained == inputs]
        records = [r for f in folders for r in evaluate_object(model, f, hdris, methods=methods)]
        for label, trained, method in ROWS:
            if trained == inputs:
                table[label] = {column: float(np.mean([r["scores"][method][column] for r in records]))
                                for column in ("psnr_object", "ssim_object")}
    shaded = table["Shaded latent, 6 views"]["psnr_object"]
    print(f"Input ablation: {args.steps} steps on {len(objects)} training objects, {len(folders)} held-out objects "
          f"under {', '.join(hdris)}\n\n| decoder trained and scored on | object PSNR | object SSIM | vs shaded |\n"
          "|---|---:|---:|---:|")
    for label, row in table.items():
        print(f"| {label} | {row['psnr_object']:.2f} | {row['ssim_object']:.3f} | "
              f"{row['psnr_object'] - shaded:+.2f} dB |")
    (out / "ablation.json").write_text(json.dumps({"steps": args.steps, "objects": [o.id for o in objects],
                                                   "held_out": [f.name for f in folders], "hdris": hdris,
                                                   "table": table}, indent=1))


def _trained_steps(folder: Path) -> int:
    """The steps the run in `folder` has finished (0 without a checkpoint)."""
    if not (folder / CHECKPOINT).is_file():
        return 0
    return int(json.loads((folder / "weights" / "pipeline.json").read_text())["training"]["steps"])


if __name__ == "__main__":
    main()
