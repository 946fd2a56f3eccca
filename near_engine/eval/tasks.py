"""The evaluation: NeAR against Cycles ground truth on held-out objects under held-out HDRIs, with the ablation and
two baselines measured in the same run, written as one table like the paper's (markdown) plus JSON.

For every evaluation object (validation split of the data set), every light of it that is a chosen HDRI (by default
the held-out ones, which never lit a training image) and every view rendered under that light, each method predicts
the Cycles image:

* **NeAR, LH latent**: the latent encoded from the object's uniform-lit views (`encode_views`), relit by `NearPipeline`.
* **Ablation, LH latent (relit views only)** and **Ablation, shaded latent**: both encoded from the same few views, one
  from their uniform-lit images, the other from their images under one of the object's *training* HDRIs (the paper's
  shaded-SLAT input). The data set renders only a few views per relighting, so this pair, not the row above, is the
  fair comparison of the two inputs.
* **Baseline, baked light**: the uniform-lit Cycles image itself, not relit.
* **Baseline, Lambertian**: the base colour, metallic and normal passes NeAR predicts, shaded as a Lambertian
  surface: base colour (1 - metallic) E(n) / pi, with E the HDRI's diffuse irradiance (no shadows, no specular).
* **Baseline, Lambertian from ground truth**: the same with Cycles' own base colour, metallic and normal G-buffers.
* **Oracle, PBR from ground truth**: Cycles' G-buffers (base colour, roughness, metallic, Specular IOR Level, normal)
  shaded per pixel by near-tiny's physically based core (`ibl.shade`, split-sum, no shadows): the ceiling of the
  physics alone, which the networks must beat by learning shadows and occlusion.

The NeAR rows encode the object as `near encode-mesh` does: the LH latent from the uniform-lit views and, for weights
that read them, the material latents lifted from the views' material G-buffers (`lift.encode.lift_materials`). Each
evaluated object is also reported alone with its material class (glossy or rough, metal or dielectric).

**Compositing.** The data set's images have a transparent film. Every prediction and the ground truth are composited
(premultiplied) over the same background, the HDRI as the camera sees it (what Blender shows without a transparent
film). "Full image" metrics use the whole composite; "object" metrics the same composite within the object region,
the union of ground-truth alpha > 0.5 and predicted alpha > 0.5 (so a missing *or* a spurious silhouette counts).
PSNR and SSIM are on the Standard view transform (clip + sRGB), FLIP (if installed) on the linear HDR composites
(see `near_engine.eval.metrics`). Table values are means over all (object, HDRI, view) samples.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..asset import Asset
from ..blender_data import blender_hdri
from ..camera import Camera
from ..configs import ENCODER_KEYS, load_networks
from ..envmap import EnvMap, diffuse_irradiance
from ..errors import NearError
from ..files import write_bytes_atomically
from ..images import linear_to_srgb
from ..pipeline import NearPipeline, Scene
from ..progress import progress
from . import metrics

if TYPE_CHECKING:
    from ..ibl import PrefilteredLight

#: Table rows: key -> label.
METHODS: dict[str, str] = {
    "near_lh": "NeAR, LH latent",
    "ablation_lh_relit_views": "Ablation: LH latent, relit views only",
    "ablation_shaded": "Ablation: shaded latent, relit views only",
    "baked_light": "Baseline: baked light (not relit)",
    "lambertian": "Baseline: Lambertian (predicted base colour x (1 - metallic) x irradiance)",
    "lambertian_gt": "Baseline: Lambertian from ground-truth base colour x (1 - metallic)",
    "oracle_pbr": "Oracle: PBR from ground-truth G-buffers (no shadows)",
}
#: Table columns: key -> header. FLIP columns are present only where `flip_evaluator` is installed.
COLUMNS: dict[str, str] = {"psnr_object": "PSNR object ↑", "ssim_object": "SSIM object ↑",
                           "psnr_full": "PSNR full ↑", "ssim_full": "SSIM full ↑",
                           "flip_object": "HDR-FLIP object ↓", "flip_full": "HDR-FLIP full ↓"}
HELD_OUT = "held-out"
VALIDATION = "val"

@dataclass(frozen=True)
class Model:
    """What the evaluation runs: the relighting pipeline and the mesh encoder's networks of one weights folder."""

    pipeline: NearPipeline
    encoders: Mapping[str, nn.Module]

    @classmethod
    def load(cls, weights: str | Path, device: str = "auto") -> "Model":
        """The model of a weights folder holding the relighting networks and the encoder (`ENCODER_KEYS`)."""
        pipeline = NearPipeline.from_pretrained(weights, device)
        return cls(pipeline, load_networks(weights, pipeline.device, keys=ENCODER_KEYS)[0])

    @property
    def resolution(self) -> int:
        return int(self.pipeline.networks["decoder"].resolution)

    def voxels(self, vertices: np.ndarray, triangles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The voxels [N, 3] the mesh's surface touches on the decoder's grid, and the mesh's surfels in them."""
        from ..surfels import mesh_surfels
        from ..voxelize import voxelize_mesh

        coords = voxelize_mesh(vertices, triangles, resolution=self.resolution)
        return coords, mesh_surfels(vertices, triangles, coords, self.resolution)

    def latent(self, coords: np.ndarray, rgba: np.ndarray, cameras: Sequence[Camera], depth: np.ndarray,
               gbuffers: Mapping[str, np.ndarray] | None = None, alpha: np.ndarray | None = None,
               surfels: np.ndarray | None = None, fit_views: Sequence[int] | None = None) -> Asset:
        """The asset encoded from premultiplied views `rgba` [V, H, W, 4] with their cameras and depth [V, H, W];
        with `gbuffers` (name -> [V, H, W(, k)] of views with `alpha` [V, H, W, 1]) also its material latents, with
        `surfels` (`Model.voxels`) the mesh's surfels, their materials fitted to the G-buffers of the views
        `fit_views` (default: all; `lift.encode.fit_asset_materials`)."""
        from ..surfels import EXTRA_NAME
        from ..lift.encode import encode_views, fit_asset_materials, material_extras

        with torch.no_grad():
            feats = encode_views(self.encoders, coords, torch.from_numpy(np.ascontiguousarray(rgba)), list(cameras),
                                 depth=torch.from_numpy(np.ascontiguousarray(depth)), resolution=self.resolution)
        extras = {}
        if gbuffers is not None:
            gbuffers = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in gbuffers.items()}
            alpha = torch.from_numpy(np.ascontiguousarray(alpha))
            extras = material_extras(gbuffers, alpha, list(cameras), torch.from_numpy(np.ascontiguousarray(depth)),
                                     coords, surfels, self.resolution)
        if surfels is not None:
            extras[EXTRA_NAME] = surfels
        asset = Asset(coords, feats.detach().cpu().numpy(), resolution=self.resolution, latent="eval", extras=extras)
        if gbuffers is None:
            return asset
        views = range(len(cameras)) if fit_views is None else [int(v) for v in fit_views]
        return fit_asset_materials(self.pipeline, asset, {k: g[list(views)] for k, g in gbuffers.items()},
                                   alpha[list(views)], [cameras[v] for v in views])


def lambertian_radiance(envmap: EnvMap, base_color: np.ndarray, normals: np.ndarray,
                        chunk: int = 4096) -> np.ndarray:
    """Radiance [..., 3] of a Lambertian surface: base_color * E(normal) / pi, E the map's diffuse irradiance.

    Zero normals (pixels no surface covers) get no light. Pixels go through in chunks: the cosine table of a chunk
    against the downsampled map is chunk x 2048 values.
    """
    n = np.asarray(normals, dtype=np.float64).reshape(-1, 3)
    irradiance = np.concatenate([diffuse_irradiance(envmap, n[i:i + chunk]) for i in range(0, len(n), chunk)])
    return (np.asarray(base_color, dtype=np.float64).reshape(-1, 3) * irradiance / math.pi).reshape(
        np.shape(base_color)).astype(np.float32)


def oracle_pbr(envmap: EnvMap, prefiltered: "PrefilteredLight", camera: Camera, gbuffers: Mapping[str, np.ndarray],
               alpha: np.ndarray) -> np.ndarray:
    """Premultiplied RGBA [H, W, 4]: the G-buffers (premultiplied by `alpha` [H, W, 1], as Cycles filters them)
    divided by alpha and shaded per pixel by the PBR core (`ibl.shade`) under `envmap` (whose split-sum terms are
    `prefiltered`) seen from `camera`."""
    from ..ibl import IBLLight, shade

    a = np.clip(alpha, 1e-6, None)
    covered = alpha[..., 0] > 1e-3
    values = {name: (g if g.ndim == 3 else g[..., None])[covered] / a[covered] for name, g in gbuffers.items()}
    normals = values["normal"] / np.maximum(np.linalg.norm(values["normal"], axis=-1, keepdims=True), 1e-9)
    ys, xs = np.nonzero(covered)
    rays = np.stack([(xs + 0.5 - camera.cx) / camera.fx, (ys + 0.5 - camera.cy) / camera.fy, np.ones_like(xs,
                                                                                                          float)], -1)
    directions = rays @ camera.camera_to_world[:3, :3].T  # world directions from the camera into the scene
    view = -directions / np.linalg.norm(directions, axis=-1, keepdims=True)
    normals = np.where((normals * view).sum(-1, keepdims=True) < 0, -normals, normals)  # as a Gaussian's flip
    light = IBLLight.for_frame(prefiltered, envmap.rotation_z, strength=envmap.strength)
    t = lambda x: torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))  # noqa: E731
    with torch.no_grad():
        radiance = shade(t(values["base_color"]).clamp(0, 1), t(values["roughness"]).clamp(0, 1),
                         t(values["metallic"]).clamp(0, 1), t(values["specular"]).clamp(0, 1), t(normals), t(view),
                         light).radiance.numpy()
    out = np.zeros(alpha.shape[:2] + (4,), np.float32)
    out[covered, :3] = radiance * alpha[covered]
    out[..., 3] = alpha[..., 0]
    return out


def material_class(roughness: float, metallic: float) -> str:
    """'glossy' or 'rough' (roughness below 0.4 or not), 'metal' or 'dielectric' (metallic above 0.5 or not)."""
    return f"{'glossy' if roughness < 0.4 else 'rough'} {'metal' if metallic > 0.5 else 'dielectric'}"


def _over(rgba: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Premultiplied RGBA [H, W, 4] over an RGB background [H, W, 3]."""
    return rgba[..., :3] + (1.0 - rgba[..., 3:4]) * background


def _downscale(image: np.ndarray, factor: int) -> np.ndarray:
    """Box-average [H, W, ...] by an integer factor (exact area averaging of premultiplied pixels)."""
    if factor == 1:
        return image
    h, w = image.shape[:2]
    return image.reshape(h // factor, factor, w // factor, factor, *image.shape[2:]).mean(axis=(1, 3))


def score(truth: np.ndarray, prediction: np.ndarray, background: np.ndarray, with_flip: bool) -> dict[str, float]:
    """The table's columns for one sample: premultiplied linear RGBA truth and prediction over `background`."""
    gt, pred = _over(truth, background), _over(prediction, background)
    region = (truth[..., 3] > 0.5) | (prediction[..., 3] > 0.5)
    gt_ldr, pred_ldr = linear_to_srgb(gt), linear_to_srgb(pred)
    ssim_map = metrics.ssim_map(gt_ldr, pred_ldr)
    out = {"psnr_object": metrics.psnr(gt_ldr, pred_ldr, region), "ssim_object": float(ssim_map[region].mean()),
           "psnr_full": metrics.psnr(gt_ldr, pred_ldr), "ssim_full": float(ssim_map.mean())}
    if with_flip:
        out.update(flip_object=metrics.flip(gt, pred, region), flip_full=metrics.flip(gt, pred))
    return out


def _camera(record: Mapping) -> Camera:
    return Camera(record["width"], record["height"], record["fx"], record["fy"], record["cx"], record["cy"],
                  np.array(record["world_to_camera"], dtype=np.float64))


def object_folders(data: Path, objects: str) -> list[Path]:
    """The finished objects of the manifest: the validation split (`objects` = "val") or comma-separated ids."""
    manifest = data / "manifest.json"
    if not manifest.is_file():
        raise NearError(f"{data} is not a data set (no manifest.json): make one with `near datagen`")
    listed = json.loads(manifest.read_text())["objects"]
    wanted = {o["id"] for o in listed if o["split"] == VALIDATION} if objects == VALIDATION else set(objects.split(","))
    unknown = wanted - {o["id"] for o in listed}
    if unknown:
        raise NearError(f"{data}: no finished object(s) {', '.join(sorted(unknown))}")
    if not wanted:
        raise NearError(f"{data}: no finished validation objects yet (every tenth object, index % 10 == 9)")
    return [data / "objects" / i for i in sorted(wanted)]


def evaluate_object(model: Model, folder: Path, hdris: Sequence[str], size: int | None = None,
                    with_flip: bool = False, methods: Sequence[str] = tuple(METHODS)) -> list[dict]:
    """Score `methods` (default: every row of `METHODS`) on one data-set object under its lights that are HDRIs in
    `hdris`; one record per (HDRI, view): {"object", "hdri", "view", "scores": {method: {column: value}}}.

    `size`: evaluate at this many pixels per side (a divisor of the data set's size; default: the data set's size).
    """
    from ..datagen.dataset import load_object
    from ..datagen.lights import TRAIN_HDRIS

    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        raise NearError(f"methods must be among {', '.join(METHODS)}, got {', '.join(unknown) or 'none'}")
    if "lambertian" in methods and "near_lh" not in methods:
        raise NearError("the 'lambertian' row shades the passes of 'near_lh': evaluate both")
    data = load_object(folder)
    meta = data["meta"]
    lights = meta["lights"]
    evaluated = [i for i, l in enumerate(lights) if l["kind"] == "hdri" and l["hdri"] in hdris]
    shading = next((i for i, l in enumerate(lights) if l["kind"] == "hdri" and l["hdri"] in TRAIN_HDRIS), None)
    if not evaluated or shading is None:
        raise NearError(f"{folder}: the object needs a light among the HDRIs {', '.join(hdris)} and one under a "
                        f"training HDRI (it has {', '.join(l['hdri'] or l['kind'] for l in lights)})")
    cameras = [_camera(c) for c in meta["cameras"]]
    full = cameras[0].height
    factor = 1 if size is None else full // size
    if size is not None and (size < 1 or full % size):
        raise NearError(f"--size must divide the data set's image size {full}, got {size}")
    views = data["lit_views"]
    coords, surfels = model.voxels(data["vertices"], data["triangles"])
    few = [cameras[v] for v in views]
    gbuffers = {name: data[name] for name in ("base_color", "roughness", "metallic", "specular")}
    alpha = data["rgba"][..., 3:]
    few_gbuffers = {name: g[views] for name, g in gbuffers.items()}
    # The surfels' materials are fitted to the G-buffers of the views that are not scored (all the ablations' views
    # are scored: theirs are sampled only), so no row is scored on a view its materials were fitted to.
    unscored = [v for v in range(len(cameras)) if v not in set(int(v) for v in views)]
    encodings = {"near_lh": lambda: model.latent(coords, data["rgba"], cameras, data["depth"], gbuffers, alpha,
                                                 surfels, unscored),
                 "ablation_lh_relit_views": lambda: model.latent(coords, data["rgba"][views], few, data["depth"][views],
                                                                 few_gbuffers, alpha[views], surfels, ()),
                 "ablation_shaded": lambda: model.latent(coords, data["lit_rgba"][shading], few,
                                                         data["depth"][views], few_gbuffers, alpha[views], surfels, ())}
    assets = {method: encode() for method, encode in encodings.items() if method in methods}
    recipe = meta.get("recipe", {}).get("material")
    kind = material_class(recipe["roughness"], recipe["metallic"]) if recipe else "real mesh"
    records = []
    for light_index in evaluated:
        light = lights[light_index]
        envmap = EnvMap.read(blender_hdri(light["hdri"]), rotation_z=light["rotation_z"], strength=light["strength"])
        for k, view in enumerate(views):
            camera = cameras[view].scaled(1 / factor)
            truth = _downscale(data["lit_rgba"][light_index, k], factor)
            background = envmap.background(camera)
            predictions = {"baked_light": _downscale(data["rgba"][view], factor)}
            for method, asset in assets.items():
                passes = (("combined", "base_color", "metallic", "normal", "alpha") if method == "near_lh"
                          else ("combined",))
                out = model.pipeline.render(Scene([(asset, np.eye(4))], envmap, camera, transparent=True), passes)
                predictions[method] = out["combined"]
                if method == "near_lh" and "lambertian" in methods:
                    albedo = out["base_color"] * (1 - np.clip(out["metallic"], 0, 1))
                    predictions["lambertian"] = np.concatenate(
                        [lambertian_radiance(envmap, albedo, out["normal"]), out["alpha"]], axis=-1)
            view_alpha = _downscale(alpha[view], factor)
            view_gbuffers = {name: _downscale(g[view], factor) for name, g in gbuffers.items()}
            view_gbuffers["normal"] = _downscale(data["normal"][view], factor)
            if "lambertian_gt" in methods:
                covered = np.clip(view_alpha, 1e-6, None)
                gt_albedo = view_gbuffers["base_color"] / covered * (1 - np.clip(
                    view_gbuffers["metallic"][..., None] / covered, 0, 1))
                gt_normals = view_gbuffers["normal"] / np.maximum(
                    np.linalg.norm(view_gbuffers["normal"], axis=-1, keepdims=True), 1e-9)
                predictions["lambertian_gt"] = np.concatenate(
                    [lambertian_radiance(envmap, gt_albedo, gt_normals) * view_alpha, view_alpha], axis=-1)
            if "oracle_pbr" in methods:
                predictions["oracle_pbr"] = oracle_pbr(envmap, model.pipeline.prefiltered_light(envmap), camera,
                                                       view_gbuffers, view_alpha)
            records.append({"object": meta["id"], "class": kind, "hdri": light["hdri"], "view": int(view),
                            "scores": {m: score(truth, predictions[m], background, with_flip)
                                       for m in METHODS if m in methods}})
    return records


def summarize(records: Sequence[dict]) -> dict[str, dict[str, float]]:
    """{method: {column: mean over the samples}} in table order, for the methods the records score."""
    scored = records[0]["scores"]
    columns = [c for c in COLUMNS if c in next(iter(scored.values()))]
    return {m: {c: float(np.mean([r["scores"][m][c] for r in records])) for c in columns}
            for m in METHODS if m in scored}


def markdown_table(table: Mapping[str, Mapping[str, float]]) -> str:
    """The paper-style table: one row per method, one column per metric (PSNR in dB to 2 decimals, others to 4)."""
    columns = list(next(iter(table.values())))
    lines = ["| method | " + " | ".join(COLUMNS[c] for c in columns) + " |",
             "| --- |" + " ---: |" * len(columns)]
    for method, values in table.items():
        cells = [f"{values[c]:.2f}" if c.startswith("psnr") else f"{values[c]:.4f}" for c in columns]
        lines.append(f"| {METHODS[method]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_object_table(records: Sequence[dict]) -> str:
    """One row per evaluated object: its material class and the object PSNR of NeAR, the oracle and the baselines."""
    shown = ("near_lh", "oracle_pbr", "lambertian_gt", "baked_light")
    lines = ["| object | material | " + " | ".join(METHODS[m] for m in shown) + " |",
             "| --- | --- |" + " ---: |" * len(shown)]
    for obj in sorted({r["object"] for r in records}):
        mine = [r for r in records if r["object"] == obj]
        cells = [f"{np.mean([r['scores'][m]['psnr_object'] for r in mine]):.2f}" for m in shown]
        lines.append(f"| {obj} | {mine[0].get('class', '')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _lift_networks(weights: str | Path) -> dict | None:
    """The lift networks of the weights (with near-tiny's own geometry model if present), or None without them."""
    from ..lift import load_lift_networks

    try:
        return load_lift_networks(weights, "own")
    except NearError:
        return None


def _evaluate_lift(model: Model, networks: Mapping, folder: Path, hdris: Sequence[str], size: int | None,
                   with_flip: bool) -> tuple[list[dict], dict[str, float]]:
    """`lift_tasks.evaluate_lift_object` on one data-set object."""
    from ..datagen.dataset import load_object
    from .lift_tasks import evaluate_lift_object

    data = load_object(folder)
    cameras = [_camera(c) for c in data["meta"]["cameras"]]
    factor = 1 if size is None else cameras[0].height // size
    coords, surfels = model.voxels(data["vertices"], data["triangles"])
    return evaluate_lift_object(model, networks, data, coords, cameras, hdris, factor, with_flip, surfels)


def run_eval(data: str | Path, weights: str | Path, output: str | Path, *, objects: str = VALIDATION,
             hdris: str | Sequence[str] = HELD_OUT, size: int | None = None, device: str = "auto",
             log: Callable[[str], object] = print) -> dict:
    """Evaluate the weights on the data set; write `output` (markdown) and the same stem with `.json` (every number);
    the report's folder is made first, so a missing folder costs no evaluation.

    `hdris`: "held-out" (the data set's held-out HDRIs) or names. Returns the JSON report.
    """
    data, output = Path(data), Path(output)
    if output.is_dir():
        raise NearError(f"{output} is a folder: give the report's file name (REPORT.md)")
    try:  # before the evaluation's minutes, not after them
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise NearError(f"cannot create the report's folder {output.parent}: {exc.strerror or exc}") from None
    manifest = data / "manifest.json"
    folders = object_folders(data, objects)
    if hdris == HELD_OUT:
        hdris = json.loads(manifest.read_text())["splits"]["held_out_hdris"]
    model = Model.load(weights, device)
    lift_networks = _lift_networks(weights)
    with_flip = metrics.flip_available()
    records, lift_records, ious = [], [], {}
    for folder in progress(folders, "evaluating held-out objects", log if log is not print else None):
        records += evaluate_object(model, folder, list(hdris), size, with_flip)
        if lift_networks is not None:
            mine, object_ious = _evaluate_lift(model, lift_networks, folder, list(hdris), size, with_flip)
            lift_records += mine
            for source, value in object_ious.items():
                ious.setdefault(source, []).append(value)
    table = summarize(records)
    report = {"data": str(data), "weights": str(weights), "objects": [f.name for f in folders],
              "hdris": list(hdris), "size": size, "samples": len(records),
              "flip": "HDR-FLIP (flip_evaluator)" if with_flip else "not installed",
              "table": table, "records": records}
    lift_text = ""
    if lift_records:
        from .lift_tasks import PHOTO_ELEVATION, lift_markdown, lift_table

        report["lift"] = {"table": lift_table(lift_records), "geometry_iou": ious, "records": lift_records}
        lift_text = ("## Single-image lift\n\nOne photo per held-out HDRI (the relit view nearest "
                     f"{PHOTO_ELEVATION:g} degrees above the object), lifted with the mesh's geometry and relit."
                     "\n\n" + lift_markdown(report["lift"]["table"], ious) + "\n\n")
    flip_note = "" if with_flip else " HDR-FLIP: not installed (pip install flip-evaluator to add it)."
    text = (f"# NeAR evaluation\n\nWeights `{weights}` on `{data}`: {len(folders)} object(s) "
            f"({', '.join(report['objects'])}), HDRIs {', '.join(hdris)}, {len(records)} images"
            f"{f', evaluated at {size} px' if size else ''}.\n\n{markdown_table(table)}\n\n"
            f"Object PSNR per object:\n\n{per_object_table(records)}\n\n{lift_text}"
            "Cycles ground truth. Predictions and ground truth composited over the HDRI background; object = union of "
            "ground-truth and predicted alpha > 0.5. PSNR/SSIM on Blender's Standard view transform (clip + sRGB)."
            f"{flip_note}\n")
    write_bytes_atomically(output, text.encode())
    write_bytes_atomically(output.with_suffix(".json"), json.dumps(report, indent=1).encode())
    log(text)
    return report
