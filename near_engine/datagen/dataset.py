"""A sharded, resumable data set on disk with a manifest, and its reader.

Layout of OUT: `config.json` (the run's settings; a resumed run must match it, except that it may change the object
count), `manifest.json` (config, splits, every finished object; rebuilt from the markers after each run),
`errors.log`, and `objects/<id>/` per object (see `render.render_object` for its images) with `meta.json` (recipe,
cameras, lights, split) written first and `done.json` last. An object folder without `done.json` is unfinished: a new
run deletes and re-renders it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..cycles.lights import UNIFORM, Light
from ..cycles.render import image_count
from ..cycles.settings import RenderSettings
from ..cycles.views import FOV_DEG, RADIUS, view_cameras
from ..errors import NearError
from ..exr_layers import read_channels, stack_channels
from ..files import write_bytes_atomically
from ..progress import Progress
from .cameras import camera_record, spread_subset
from .lights import HELD_OUT_HDRIS, TRAIN_HDRIS, is_validation_object, object_lights
from .objects import ObjectRecipe, make_recipe
from .render import render_object


@dataclass(frozen=True)
class DatagenConfig:
    """What a data set is: how many objects, views and lights, and how they are rendered.

    The defaults render in about an hour on 2 CPU cores (measured: see the README / `near datagen --help`).
    """

    objects: int = 300
    views: int = 12  # uniform-lit views (with G-buffers) per object
    hdri_views: int = 6  # of those, how many are also rendered under each relighting
    hdris_per_object: int = 2  # training HDRIs per object (plus the held-out HDRIs if validation)
    skies_per_object: int = 1  # sun-and-sky worlds per object (0 or 1)
    area_light: bool = False  # one random area light per object (no environment map: training skips it)
    seed: int = 0
    render: RenderSettings = field(default_factory=RenderSettings)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "DatagenConfig":
        """A stored config; fields added since take the values that reproduce the older runs (no sky, area light)."""
        return cls(**{"skies_per_object": 0, "area_light": True, **data,
                      "render": RenderSettings(**{"size": 256, "samples": 32, **data["render"]})})


def object_id(index: int) -> str:
    return f"{index:05d}"


def _write_json(path: Path, data: dict) -> None:
    write_bytes_atomically(path, json.dumps(data, indent=1).encode())


def run_datagen(out: str | Path, config: DatagenConfig, shard: tuple[int, int] = (0, 1),
                log: Callable[[str], object] | None = None, meshes: Sequence[str | Path] = ()) -> dict:
    """Render this shard's objects (index % n == i) that are not finished yet; returns the ids rendered/skipped/failed.

    With `meshes`, the objects are those mesh files instead of procedural ones (`config.objects` is ignored), all in
    the validation split: an evaluation set of real meshes for `near eval`. A failing object is logged to
    `errors.log` with its traceback and left without a marker; the run goes on. The manifest is rewritten after
    every finished object. Progress (images rendered, time left) goes through `log`, or is a bar on stderr.
    """
    out = Path(out)
    i, n = shard
    if not 0 <= i < n:
        raise NearError(f"shard must be i/n with 0 <= i < n, got {i}/{n}")
    meshes = [Path(m).resolve() for m in meshes]
    missing = [str(m) for m in meshes if not m.is_file()]
    if missing:
        raise NearError(f"no such mesh file(s): {', '.join(missing)}")
    if meshes:
        config = replace(config, objects=len(meshes))
    settings = {**config.to_json(), **({"meshes": [str(m) for m in meshes]} if meshes else {})}
    (out / "objects").mkdir(parents=True, exist_ok=True)
    config_path = out / "config.json"
    if config_path.is_file():  # objects are independent of each other: only the object count may change
        stored = json.loads(config_path.read_text())
        if {**stored, "objects": config.objects} != settings:
            raise NearError(f"{out} holds a data set made with other settings ({stored}); use another folder")
    _write_json(config_path, settings)
    result: dict[str, list[str]] = {"rendered": [], "skipped": [], "failed": []}
    plans = []
    for index in range(i, config.objects, n):
        folder = out / "objects" / object_id(index)
        if (folder / "done.json").is_file():
            result["skipped"].append(folder.name)
        else:
            plans.append((folder, _plan(config, index, meshes[index] if meshes else None)))
    total = sum(image_count(len(p.cameras), len(p.lights), len(p.lit_views)) for _, p in plans)
    with Progress(f"datagen {i}/{n}: {len(plans)} objects, images", total, log=log) as bar:
        for folder, plan in plans:
            shutil.rmtree(folder, ignore_errors=True)  # half-finished: start it over
            folder.mkdir(parents=True)
            goal = bar.done + image_count(len(plan.cameras), len(plan.lights), len(plan.lit_views))
            try:
                _render_one(folder, plan, bar)
                result["rendered"].append(folder.name)
                write_manifest(out)  # always current: training and evaluation can start on a run still going
            except Exception:  # one bad object must not stop the run: log it, leave no marker
                result["failed"].append(folder.name)
                with open(out / "errors.log", "a") as f:
                    f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} object {folder.name}:\n{traceback.format_exc()}\n")
                bar.say(f"  {folder.name}: FAILED (see {out / 'errors.log'})")
                bar.advance(goal - bar.done)  # its unrendered images no longer count as work left
    write_manifest(out)
    return result


@dataclass(frozen=True)
class _ObjectPlan:
    """What one object will be: its recipe (or mesh file), split, views and lights."""

    index: int
    recipe: ObjectRecipe | Path
    validation: bool
    cameras: list
    lights: list[Light]
    lit_views: list[int]
    settings: RenderSettings


def _plan(config: DatagenConfig, index: int, mesh: Path | None) -> _ObjectPlan:
    """Object `index` (procedural, or the file `mesh`) of `config`, seeded."""
    validation = mesh is not None or is_validation_object(index)
    offset = tuple(float(x) for x in np.random.default_rng([config.seed, index, 2]).random(2))
    return _ObjectPlan(index, make_recipe(config.seed, index) if mesh is None else mesh, validation,
                       view_cameras(config.views, offset, config.render.size),
                       object_lights(config.seed, index, config.hdris_per_object, validation, config.skies_per_object,
                                     config.area_light),
                       spread_subset(config.views, config.hdri_views), config.render)


def _render_one(folder: Path, plan: _ObjectPlan, progress: Progress) -> None:
    """Render `plan` into `folder`: meta.json first, then images, then the done.json marker."""
    start = time.perf_counter()
    mesh = plan.recipe if isinstance(plan.recipe, Path) else None
    source = ({"mesh": mesh.name, "sha256": hashlib.sha256(mesh.read_bytes()).hexdigest()} if mesh is not None
              else plan.recipe.to_json())
    meta = {"id": folder.name, "index": plan.index, "split": "val" if plan.validation else "train", "recipe": source,
            "cameras": [camera_record(c) for c in plan.cameras], "camera_radius": RADIUS, "fov_deg": FOV_DEG,
            "uniform_light": UNIFORM.to_json(), "lights": [l.to_json() for l in plan.lights],
            "lit_views": plan.lit_views}
    _write_json(folder / "meta.json", meta)
    stats = render_object(plan.recipe, plan.cameras, plan.lights, plan.lit_views, folder, plan.settings, progress)
    _write_json(folder / "done.json", {**stats, "seconds_total": time.perf_counter() - start})


def write_manifest(out: str | Path) -> dict:
    """Rebuild `manifest.json` from the finished objects' markers (atomically; any shard may call it any time)."""
    out = Path(out)
    config = json.loads((out / "config.json").read_text())
    objects = []
    for done in sorted((out / "objects").glob("*/done.json")):
        meta = json.loads((done.parent / "meta.json").read_text())
        objects.append({"id": meta["id"], "split": meta["split"], "lights": [Light.from_json(l).name
                                                                             for l in meta["lights"]],
                        **json.loads(done.read_text())})
    manifest = {"format": "near-datagen", "config": config,
                "splits": {"held_out_hdris": list(HELD_OUT_HDRIS), "train_hdris": list(TRAIN_HDRIS),
                           "validation_objects": "index % 10 == 9"},
                "objects": objects}
    _write_json(out / "manifest.json", manifest)
    return manifest


def default_specular(view: dict[str, np.ndarray], channel: str) -> np.ndarray:
    """Data sets from before the Specular IOR Level AOV: Blender's default level 0.5, premultiplied by alpha."""
    if channel != "specular.V":
        raise KeyError(channel)
    return 0.5 * view["A"]


def inside(folder: Path, name: str) -> Path:
    """`folder / name` for a name read from a data file (a light's folder): one plain path component that stays in
    `folder` once resolved, so a meta.json cannot point the reader at files elsewhere ('../' * 11 + 'tmp/x')."""
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
            or any(ord(c) < 32 for c in name)):
        raise NearError(f"{folder}: {name!r} is not a folder name (a data file may name folders, not paths)")
    path = folder / name
    if path.resolve().parent != folder.resolve():
        raise NearError(f"{folder}: {name!r} resolves outside the object's folder")
    return path


def load_object(path: str | Path) -> dict:
    """One finished object for training: float32 arrays plus its metadata.

    Keys: `meta` (meta.json), `vertices` [N,3], `triangles` [M,3], `world_to_camera` [V,4,4], `intrinsics` [V,4]
    (fx, fy, cx, cy), uniform-lit `rgba` [V,H,W,4] (premultiplied), `depth` [V,H,W] (Cycles' Depth pass),
    `normal` [V,H,W,3] (world), `base_color` [V,H,W,3], `roughness`/`metallic`/`specular` [V,H,W]; `lit_views` [K] and
    `lit_rgba` [L,K,H,W,4] for `meta["lights"]` in order.
    """
    folder = Path(path)
    if not (folder / "done.json").is_file():
        raise NearError(f"{folder}: not a finished data-set object (no done.json)")
    meta = json.loads((folder / "meta.json").read_text())
    mesh = np.load(folder / "mesh.npz")
    views = [read_channels(folder / "uniform" / f"view_{v:03d}.exr") for v in range(len(meta["cameras"]))]
    data = {"meta": meta, "vertices": mesh["vertices"], "triangles": mesh["triangles"],
            "world_to_camera": np.array([c["world_to_camera"] for c in meta["cameras"]], dtype=np.float32),
            "intrinsics": np.array([[c[k] for k in ("fx", "fy", "cx", "cy")] for c in meta["cameras"]],
                                   dtype=np.float32),
            "lit_views": np.array(meta["lit_views"], dtype=np.int64)}
    for key, prefix, letters in (("rgba", "", "RGBA"), ("normal", "normal.", "XYZ"),
                                 ("base_color", "base_color.", "RGB")):
        data[key] = np.stack([stack_channels(v, prefix, letters) for v in views])
    for key, channel in (("depth", "depth.Z"), ("roughness", "roughness.V"), ("metallic", "metallic.V"),
                         ("specular", "specular.V")):
        data[key] = np.stack([v[channel] if channel in v else default_specular(v, channel) for v in views])
    data["lit_rgba"] = np.stack([np.stack([stack_channels(read_channels(inside(folder, Light.from_json(l).name) /
                                                                        f"view_{v:03d}.exr"), "", "RGBA")
                                           for v in meta["lit_views"]])
                                 for l in meta["lights"]])
    return data
