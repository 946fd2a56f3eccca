"""`near_engine.datagen` with real bpy and real Cycles, at toy sizes (24-48 px, 4-32 samples, 1-2 views)."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("bpy")

from near_engine.camera import Camera  # noqa: E402
from near_engine.cycles.lights import UNIFORM_STRENGTH  # noqa: E402
from near_engine.cycles.settings import RenderSettings  # noqa: E402
from near_engine.cycles.views import hammersley_sphere, view_cameras  # noqa: E402
from near_engine.datagen import dataset  # noqa: E402
from near_engine.datagen.dataset import DatagenConfig, load_object, run_datagen  # noqa: E402
from near_engine.datagen.lights import HELD_OUT_HDRIS, HDRIS, is_validation_object, object_lights  # noqa: E402
from near_engine.datagen.objects import MaterialRecipe, ObjectRecipe, Part, make_recipe  # noqa: E402
from near_engine.datagen.render import render_object  # noqa: E402
from near_engine.exr_layers import read_channels  # noqa: E402
from near_engine.errors import NearError  # noqa: E402

pytestmark = [pytest.mark.cycles, pytest.mark.timeout(300)]

TINY = RenderSettings(size=24, samples=4)
CONFIG = DatagenConfig(objects=2, views=2, hdri_views=1, hdris_per_object=1, seed=7,
                       render=RenderSettings(size=48, samples=4))  # 48 px: enough pixels to compare silhouettes


def _mesh(recipe: ObjectRecipe) -> tuple[np.ndarray, np.ndarray]:
    import bpy

    from near_engine.cycles.meshes import mesh_arrays
    from near_engine.datagen.objects import build_object

    bpy.ops.wm.read_factory_settings(use_empty=True)
    return mesh_arrays(build_object(recipe))


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("datagen")
    result = run_datagen(out, CONFIG, log=lambda *_: None)
    assert result == {"rendered": ["00000", "00001"], "skipped": [], "failed": []}
    return out


def test_recipes_and_meshes_are_seeded():
    assert make_recipe(3, 5) == make_recipe(3, 5)
    assert make_recipe(3, 5) != make_recipe(4, 5) and make_recipe(3, 5) != make_recipe(3, 6)
    assert ObjectRecipe.from_json(json.loads(json.dumps(make_recipe(3, 5).to_json()))) == make_recipe(3, 5)
    v1, t1 = _mesh(make_recipe(3, 5))
    v2, t2 = _mesh(make_recipe(3, 5))
    np.testing.assert_array_equal(v1, v2)
    np.testing.assert_array_equal(t1, t2)
    v3, _ = _mesh(make_recipe(4, 5))
    assert v3.shape != v1.shape or not np.array_equal(v3, v1)


@pytest.mark.parametrize("index", [0, 1, 2])
def test_meshes_are_normalized_to_the_unit_cube(index):
    vertices, triangles = _mesh(make_recipe(11, index))
    lo, hi = vertices.min(axis=0), vertices.max(axis=0)
    np.testing.assert_allclose((lo + hi) / 2, 0.0, atol=1e-5)
    assert abs((hi - lo).max() - 1.0) < 1e-5 and lo.min() >= -0.5 - 1e-5 and hi.max() <= 0.5 + 1e-5
    assert triangles.min() >= 0 and triangles.max() < len(vertices)


def test_hammersley_views_cover_the_sphere_and_look_at_the_origin():
    d = hammersley_sphere(256, (0.3, 0.7))
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1.0, atol=1e-12)
    assert np.abs(d.mean(axis=0)).max() < 0.05  # evenly spread: no side of the sphere favoured
    for camera in view_cameras(4, (0.3, 0.7), 32):
        uv, depth = camera.project(np.zeros((1, 3)))
        np.testing.assert_allclose(uv[0], [16, 16], atol=1e-9)
        assert abs(depth[0] - 2.0) < 1e-9


def test_held_out_hdris_never_light_training_objects():
    for index in range(100):
        names = {light.hdri for light in object_lights(0, index, 3) if light.kind == "hdri"}
        if is_validation_object(index):
            assert set(HELD_OUT_HDRIS) <= names
        else:
            assert len(names) == 3 and not names & set(HELD_OUT_HDRIS) and names <= set(HDRIS)
    assert sum(is_validation_object(i) for i in range(100)) == 10
    assert object_lights(0, 4, 2) == object_lights(0, 4, 2) != object_lights(1, 4, 2)


def test_a_rendered_object_has_every_file_and_loads(dataset_dir):
    folder = dataset_dir / "objects" / "00000"
    meta = json.loads((folder / "meta.json").read_text())
    names = [light["kind"] if light["kind"] != "hdri" else f"hdri_{light['hdri']}" for light in meta["lights"]]
    expected = ["meta.json", "done.json", "mesh.npz", "uniform/view_000.exr", "uniform/view_001.exr"]
    expected += [f"{name}/view_000.exr" for name in names]
    assert all((folder / f).is_file() for f in expected), sorted(str(p) for p in folder.rglob("*"))
    data = load_object(folder)
    assert data["rgba"].shape == (2, 48, 48, 4) and data["normal"].shape == (2, 48, 48, 3)
    assert data["specular"].shape == (2, 48, 48)  # the Specular IOR Level AOV
    recipe = meta["recipe"]["material"]
    inside = data["rgba"][..., 3] > 0.999
    assert np.allclose(data["specular"][inside], recipe["specular"], atol=2e-3)
    if "sky" in names:  # the sun-and-sky world, baked to the map its lit views were rendered under
        from near_engine.cycles.lights import SKY_HEIGHT, SKY_MEAN
        from near_engine.envmap import EnvMap

        sky = EnvMap.read(folder / "sky.exr")
        assert sky.pixels.shape == (SKY_HEIGHT, 2 * SKY_HEIGHT, 3)
        assert np.allclose(sky.mean_radiance().mean(), SKY_MEAN, rtol=0.05)
        brightest = np.unravel_index(sky.pixels.sum(-1).argmax(), sky.pixels.shape[:2])
        assert brightest[0] < SKY_HEIGHT // 2  # the sun is above the horizon
        assert sky.pixels.max() > 50 * np.median(sky.pixels)  # and far brighter than the sky
    assert data["depth"].shape == data["roughness"].shape == data["metallic"].shape == (2, 48, 48)
    assert data["lit_rgba"].shape == (len(names), 1, 48, 48, 4)
    manifest = json.loads((dataset_dir / "manifest.json").read_text())
    assert [o["id"] for o in manifest["objects"]] == ["00000", "00001"]
    assert manifest["config"] == CONFIG.to_json() and manifest["splits"]["held_out_hdris"] == list(HELD_OUT_HDRIS)


def _surface_points(vertices: np.ndarray, triangles: np.ndarray, n: int = 20000) -> np.ndarray:
    """Points spread uniformly over the mesh surface (vertices alone leave flat faces empty)."""
    rng = np.random.default_rng(0)
    tri = vertices[triangles].astype(np.float64)
    area = np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    k = rng.choice(len(tri), n, p=area / area.sum())
    a, b = rng.random((2, n))
    folded = a + b > 1
    a[folded], b[folded] = 1 - a[folded], 1 - b[folded]
    return tri[k, 0] + a[:, None] * (tri[k, 1] - tri[k, 0]) + b[:, None] * (tri[k, 2] - tri[k, 0])


def test_alpha_and_depth_match_the_projected_mesh(dataset_dir):
    """The saved mesh, projected through the saved cameras, covers the alpha pass (a flipped image scores < 0.8)."""
    data = load_object(dataset_dir / "objects" / "00000")
    points = _surface_points(data["vertices"], data["triangles"])
    for view, record in enumerate(data["meta"]["cameras"]):
        camera = Camera(record["width"], record["height"], record["fx"], record["fy"], record["cx"], record["cy"],
                        np.array(record["world_to_camera"]))
        uv, z = camera.project(points)
        px = np.floor(uv).astype(int)
        hit = np.zeros(data["rgba"].shape[1:3], dtype=bool)
        hit[px[:, 1], px[:, 0]] = True
        covered = data["rgba"][view, ..., 3] > 0.5
        assert covered[px[:, 1], px[:, 0]].mean() > 0.88
        assert (covered & hit).sum() / (covered | hit).sum() > 0.82, f"view {view}: silhouette IoU too low"
        # the depth pass sees the nearest surface: never behind a point that projects into the pixel
        assert np.mean(data["depth"][view][px[:, 1], px[:, 0]] <= z + 0.05) > 0.9


def _sphere(material: MaterialRecipe) -> ObjectRecipe:
    return ObjectRecipe(0, 0, (Part("uv_sphere", (0.0, 0.0, 0.0), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0),
                                    subdivision=1),), material)


def _render_sphere(tmp_path: Path, material: MaterialRecipe, settings: RenderSettings = TINY) -> dict:
    cameras = view_cameras(1, (0.2, 0.4), settings.size)
    render_object(_sphere(material), cameras, [], [], tmp_path, settings)
    return read_channels(tmp_path / "uniform" / "view_000.exr")


def test_gbuffers_hold_the_material_values(tmp_path):
    channels = _render_sphere(tmp_path, MaterialRecipe((0.2, 0.5, 0.1), roughness=0.35, metallic=1.0))
    covered = channels["A"] > 0.999
    assert covered.sum() > 100
    np.testing.assert_allclose(channels["roughness.V"][covered], 0.35, atol=2e-3)
    np.testing.assert_allclose(channels["metallic.V"][covered], 1.0, atol=2e-3)
    base = np.stack([channels[f"base_color.{c}"] for c in "RGB"], axis=-1)[covered]
    np.testing.assert_allclose(base, np.broadcast_to([0.2, 0.5, 0.1], base.shape), atol=2e-3)
    normal = np.stack([channels[f"normal.{c}"] for c in "XYZ"], axis=-1)[covered]
    np.testing.assert_allclose(np.linalg.norm(normal, axis=-1), 1.0, atol=0.02)
    assert channels["roughness.V"][channels["A"] < 0.001].max(initial=0.0) == 0.0


def test_uniform_light_on_a_white_diffuse_sphere_is_albedo_times_the_world(tmp_path):
    """A convex Lambertian surface under a constant environment L reflects exactly albedo * L, whatever its normal."""
    albedo = 0.8
    settings = RenderSettings(size=24, samples=32)
    channels = _render_sphere(tmp_path, MaterialRecipe((albedo,) * 3, roughness=1.0, metallic=0.0, specular=0.0),
                              settings)
    covered = channels["A"] > 0.999
    rgb = np.stack([channels[c] for c in "RGB"], axis=-1)[covered]
    np.testing.assert_allclose(np.median(rgb, axis=0), albedo * UNIFORM_STRENGTH, rtol=0.05)
    assert np.abs(rgb - albedo * UNIFORM_STRENGTH).max() < 0.1


def test_resume_rerenders_only_unfinished_objects(dataset_dir):
    untouched = dataset_dir / "objects" / "00000" / "uniform" / "view_000.exr"
    before = os.stat(untouched).st_mtime_ns
    (dataset_dir / "objects" / "00001" / "done.json").unlink()
    (dataset_dir / "manifest.json").unlink()
    result = run_datagen(dataset_dir, CONFIG, log=lambda *_: None)
    assert result == {"rendered": ["00001"], "skipped": ["00000"], "failed": []}
    assert os.stat(untouched).st_mtime_ns == before
    assert len(json.loads((dataset_dir / "manifest.json").read_text())["objects"]) == 2
    with pytest.raises(NearError, match="other settings"):
        run_datagen(dataset_dir, replace(CONFIG, views=3))


def test_a_failing_object_is_logged_and_the_run_goes_on(tmp_path, monkeypatch):
    def recipe(seed: int, index: int) -> ObjectRecipe:
        good = make_recipe(seed, index)
        return ObjectRecipe(seed, index, (Part("pyramid", (0, 0, 0), (0, 0, 0), (1, 1, 1)),), good.material) \
            if index == 0 else good

    monkeypatch.setattr(dataset, "make_recipe", recipe)
    config = DatagenConfig(objects=2, views=1, hdri_views=0, hdris_per_object=0, render=TINY)
    result = run_datagen(tmp_path, config, shard=(0, 1), log=lambda *_: None)
    assert result == {"rendered": ["00001"], "skipped": [], "failed": ["00000"]}
    assert "pyramid" in (tmp_path / "errors.log").read_text()
    assert not (tmp_path / "objects" / "00000" / "done.json").exists()
    assert [o["id"] for o in json.loads((tmp_path / "manifest.json").read_text())["objects"]] == ["00001"]


def test_a_mesh_set_renders_real_meshes_as_validation_objects(tmp_path):
    """`near datagen --meshes`: the bundled vase (OBJ + MTL + texture) as an evaluation object under the held-out
    HDRIs; its saved mesh is the normalized import and its silhouette matches the projected mesh."""
    from near_engine.bundled import SAMPLE_MESH

    config = replace(CONFIG, objects=99)
    result = run_datagen(tmp_path, config, log=lambda *_: None, meshes=[SAMPLE_MESH])
    assert result == {"rendered": ["00000"], "skipped": [], "failed": []}
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["config"]["objects"] == 1 and manifest["config"]["meshes"] == [str(SAMPLE_MESH)]
    (entry,) = manifest["objects"]
    assert entry["split"] == "val" and {f"hdri_{h}" for h in HELD_OUT_HDRIS} <= set(entry["lights"])
    data = load_object(tmp_path / "objects" / "00000")
    assert data["meta"]["recipe"]["mesh"] == "vase.obj"
    lo, hi = data["vertices"].min(axis=0), data["vertices"].max(axis=0)
    assert abs((hi - lo).max() - 1.0) < 1e-5 and hi[2] - lo[2] > 0.99  # normalized, standing up (Z is its height)
    rgb = data["rgba"][..., :3][data["rgba"][..., 3] > 0.5]
    assert rgb[:, 0].max() > 2 * rgb[:, 0].min()  # the painted texture shows (cream glaze, cobalt bands)
    with pytest.raises(NearError, match="no such mesh"):
        run_datagen(tmp_path / "other", config, meshes=[tmp_path / "missing.obj"])
    with pytest.raises(NearError, match="other settings"):  # a mesh set is not resumed as a procedural set
        run_datagen(tmp_path, config, log=lambda *_: None)


def test_datagen_shows_progress_not_the_cycles_log(tmp_path, capfd):
    config = DatagenConfig(objects=1, views=2, hdri_views=1, hdris_per_object=1, skies_per_object=0, render=TINY)
    assert run_datagen(tmp_path, config)["rendered"] == ["00000"]
    out, err = capfd.readouterr()
    assert "Fra:" not in out + err and "Saved:" not in out + err
    assert "datagen 0/1: 1 objects, images: 3/3 (100%), " in err and " left" in err  # 2 uniform views + 1 lit
