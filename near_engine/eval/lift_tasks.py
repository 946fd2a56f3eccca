"""The paper's single-image tasks: lift one photo of a held-out object under a held-out HDRI, then render it.

For every evaluation object, each held-out HDRI A in turn lights the *photo*: the relit view nearest a photographer's
eye level (`PHOTO_ELEVATION`; the data set's views run from far below the object to far above it, and its first view,
the photo until stop 22, looks up at the object's underside from 58-87 degrees below) under A, exposed and
white-balanced as a camera does it (`lift.image.metered`) and prepared as a user's photo is
(`lift.image.crop_object`), with its camera fitted from the voxels as for a photo (`lift.views.fit_crop_camera`: only
the view's pose is known, as the photo convention gives it). Geometry from the object's mesh. Then:

* **random illumination reconstruction**: the same view under A;
* **novel-view relighting**: the object's 5 other relit views under another held-out HDRI B.

Rows, all rendered by the same `NearPipeline` and scored as `tasks.score` scores:

* **Lift**: near-tiny's regressor (`lift.regressor`), the LH latent and the material latents from the photo, the
  surfels coloured from the photo with its light taken out (`lift.delight`, when the weights carry a light prior);
* **Ablation: no homogenization**: the latent taken from the lit photo as it is: the mesh encoder run on the photo
  (with the same visibility), and the photo's own colours as the base colour (default roughness and metallic);
* **Baseline: photo projected, not relit**: the photo's colours, as the camera exposed them, painted on the voxels
  and shown as they are (the base-colour pass of that asset), whatever the light.

The geometry IoU (of the solids, `lift.geometry.voxel_iou`) against the voxelized mesh is reported per source that
can run here, each given the photo's true camera (its pose and lens): the mesh itself, near-tiny's own model when
the weights have one, and silhouette inflation.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from ..asset import Asset
from ..envmap import EnvMap
from ..blender_data import blender_hdri
from ..pipeline import Scene

__all__ = ["LIFT_METHODS", "LIFT_TASKS", "evaluate_lift_object"]

LIFT_METHODS: dict[str, str] = {
    "lift": "Lift: near-tiny regressor (LH + material latents from the photo, its light taken out)",
    "lift_no_homogenization": "Ablation: no homogenization (latents taken from the lit photo as it is)",
    "lift_projected": "Baseline: photo projected on the geometry, not relit",
}
LIFT_TASKS: dict[str, str] = {"reconstruction": "random illumination reconstruction (same view, same light)",
                              "relighting": "novel-view relighting (other views, another held-out HDRI)"}


#: The photo's view: the relit view whose camera is nearest this elevation (degrees above the object's centre), a
#: photographer's eye a little above the object, as a user shoots a photo to lift.
PHOTO_ELEVATION = 15.0


def photo_index(cameras: Sequence) -> int:
    """The index of the camera among `cameras` nearest `PHOTO_ELEVATION` (the object at the origin)."""
    elevations = [math.degrees(math.asin(float(c.position[2]) / max(float(np.linalg.norm(c.position)), 1e-9)))
                  for c in cameras]
    return int(np.argmin([abs(e - PHOTO_ELEVATION) for e in elevations]))


def lift_assets(networks: Mapping, encoders: Mapping, coords: np.ndarray, photo: np.ndarray, camera,
                resolution: int, surfels: np.ndarray | None = None) -> dict[str, Asset]:
    """The three rows' assets from one prepared photo [S, S, 4] and its camera (with the mesh's `surfels`, as a
    lift onto a mesh has them)."""
    from ..surfels import EXTRA_NAME
    from ..frame import DEFAULT_MATERIAL
    from ..lift import sample_latent
    from ..lift.regressor import lift_inputs, projected_colours
    from ..sparse import SparseTensor

    latent, extras = sample_latent(networks, coords, photo, camera, resolution, surfels)
    lifted = {"lift": Asset(coords, latent, resolution=resolution, latent="lift", extras=extras)}
    with torch.no_grad():  # the mesh encoder on the lit photo: features without the direction channels
        inputs = lift_inputs(encoders["image_features"], coords, torch.from_numpy(photo), camera, resolution)[:, :-3]
        coords_t = torch.as_tensor(coords, dtype=torch.int32)
        shaded = encoders["encoder"](SparseTensor.from_list([(coords_t, inputs)], resolution)).feats.numpy()
    colours = projected_colours(torch.from_numpy(photo), coords, camera, resolution).clamp(0, 1).numpy()
    default = np.broadcast_to(np.asarray(DEFAULT_MATERIAL[3:], np.float32), (len(coords), 3))
    photo_extras = {"base_color": colours, "material": default}
    lifted["lift_no_homogenization"] = Asset(coords, shaded, resolution=resolution, latent="shaded",
                                             extras=photo_extras)
    lifted["lift_projected"] = Asset(coords, shaded, resolution=resolution, latent="projected", extras=photo_extras)
    if surfels is None:
        return lifted
    return {k: dataclasses.replace(a, extras={**a.extras, EXTRA_NAME: surfels}) for k, a in lifted.items()}


def evaluate_lift_object(model, networks: Mapping, data: dict, coords: np.ndarray, cameras: Sequence,
                         hdris: Sequence[str], factor: int, with_flip: bool, surfels: np.ndarray | None = None
                         ) -> tuple[list[dict], dict[str, float]]:
    """(records {"object", "task", "photo_hdri", "hdri", "view", "scores"}, geometry IoU per source) of one object.
    `data` is `datagen.dataset.load_object`'s dict; `cameras` its views' cameras at full size; `surfels` the
    mesh's (the geometry is the mesh's)."""
    from ..lift import LIFT_SIZE
    from ..lift.geometry import inflate_silhouette, voxel_iou
    from ..lift.image import crop_object, metered
    from ..lift.views import fit_crop_camera
    from .tasks import _downscale, score

    meta, resolution = data["meta"], model.resolution
    lights = meta["lights"]
    held = {l["hdri"]: i for i, l in enumerate(lights) if l["kind"] == "hdri" and l["hdri"] in hdris}
    views = [int(v) for v in data["lit_views"]]
    records, ious = [], {}
    photo = photo_index([cameras[v] for v in views])
    for photo_hdri, photo_light in held.items():
        photo_view = views[photo]
        light = lights[photo_light]
        white = EnvMap.read(blender_hdri(photo_hdri), rotation_z=light["rotation_z"],
                            strength=light["strength"]).mean_radiance()
        prepared = crop_object(metered(data["lit_rgba"][photo_light, photo], white), LIFT_SIZE)
        camera = fit_crop_camera(cameras[photo_view], coords, resolution, LIFT_SIZE)
        assets = lift_assets(networks, model.encoders, coords, prepared.rgba, camera, resolution, surfels)
        if not ious:  # geometry from the first photo, given its true camera
            true_camera = prepared.crop_camera(cameras[photo_view])
            ious["mesh"] = voxel_iou(coords, coords, resolution)
            ious["inflate"] = voxel_iou(inflate_silhouette(prepared.rgba[..., 3], true_camera, resolution), coords,
                                        resolution)
            if "occupancy" in networks:
                from ..lift.occupancy import predict_geometry

                ious["own"] = voxel_iou(predict_geometry(networks["occupancy"], prepared.rgba, true_camera,
                                                         resolution), coords, resolution)
        targets = [("reconstruction", photo_hdri, photo)]
        others = [h for h in held if h != photo_hdri]
        targets += [("relighting", h, k) for h in others for k in range(len(views)) if k != photo]
        for task, hdri, k in targets:
            light = lights[held[hdri]]
            envmap = EnvMap.read(blender_hdri(hdri), rotation_z=light["rotation_z"], strength=light["strength"])
            view_camera = cameras[views[k]].scaled(1 / factor)
            truth = _downscale(data["lit_rgba"][held[hdri], k], factor)
            background = envmap.background(view_camera)
            predictions = {}
            for method, asset in assets.items():
                scene = Scene([(asset, np.eye(4))], envmap, view_camera, transparent=True)
                if method == "lift_projected":
                    out = model.pipeline.render(scene, ("base_color", "alpha"))
                    predictions[method] = np.concatenate([out["base_color"], out["alpha"]], -1)
                else:
                    predictions[method] = model.pipeline.render(scene, ("combined",))["combined"]
            records.append({"object": meta["id"], "task": task, "photo_hdri": photo_hdri, "hdri": hdri,
                            "view": views[k], "scores": {m: score(truth, predictions[m], background, with_flip)
                                                         for m in LIFT_METHODS}})
    return records, ious


def lift_table(records: Sequence[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """{task: {method: {column: mean}}}."""
    out = {}
    for task in LIFT_TASKS:
        mine = [r for r in records if r["task"] == task]
        if mine:
            columns = list(mine[0]["scores"]["lift"])
            out[task] = {m: {c: float(np.mean([r["scores"][m][c] for r in mine])) for c in columns}
                         for m in LIFT_METHODS}
    return out


def lift_markdown(table: Mapping, ious: Mapping[str, Sequence[float]]) -> str:
    """The lift section of the report: one table per task, then the geometry IoU per source."""
    from .tasks import COLUMNS

    parts = []
    for task, rows in table.items():
        columns = list(next(iter(rows.values())))
        lines = [f"**{LIFT_TASKS[task]}**", "", "| method | " + " | ".join(COLUMNS[c] for c in columns) + " |",
                 "| --- |" + " ---: |" * len(columns)]
        for method, values in rows.items():
            cells = [f"{values[c]:.2f}" if c.startswith("psnr") else f"{values[c]:.4f}" for c in columns]
            lines.append(f"| {LIFT_METHODS[method]} | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    iou_lines = ["| geometry source | IoU (solid, 64^3) ↑ | objects |", "| --- | ---: | ---: |"]
    for source, values in ious.items():
        iou_lines.append(f"| {source} | {np.mean(values):.3f} | {len(values)} |")
    parts.append("**Geometry from the photo** (each source given the photo's camera)\n\n" + "\n".join(iou_lines))
    return "\n\n".join(parts)
