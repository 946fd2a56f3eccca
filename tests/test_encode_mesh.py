"""`encode_mesh`: a mesh file -> a .near asset that the same weights render (real Cycles, real importers).

The weights are seeded UNTRAINED test weights of near-tiny with its encoder: the latent values mean nothing; the
tests check the plumbing: voxels from the mesh, a latent per voxel, HDRI-lit views giving another (shaded) latent.
"""

from __future__ import annotations

import numpy as np
import pytest

from near_engine.camera import Camera
from near_engine.configs import random_weights, save_networks
from near_engine.cycles.meshes import import_mesh
from near_engine.lift.mesh import ShadedLight, encode_mesh, thin_shape_warning
from near_engine.envmap import EnvMap
from near_engine.errors import NearError
from near_engine.pipeline import NearPipeline, Scene
from near_engine.voxelize import voxelize_mesh

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights") / "near-tiny-train-random"
    save_networks(folder, random_weights("near-tiny-train", seed=11), "near-tiny-train", {"light_size": 64})
    return folder


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    """A box with a cylinder-ish bump, as OBJ text."""
    path = tmp_path_factory.mktemp("mesh") / "box.obj"
    corners = [(x, y, z) for x in (0.0, 2.0) for y in (0.0, 1.0) for z in (0.0, 1.5)]
    faces = [(1, 2, 4, 3), (5, 7, 8, 6), (1, 5, 6, 2), (3, 4, 8, 7), (1, 3, 7, 5), (2, 6, 8, 4)]
    path.write_text("".join(f"v {x} {y} {z}\n" for x, y, z in corners) +
                    "".join("f " + " ".join(map(str, f)) + "\n" for f in faces))
    return path


def test_mesh_encodes_to_an_asset_the_weights_render(weights, mesh) -> None:
    asset = encode_mesh(mesh, weights, views=4, size=32, samples=2, log=lambda _: None)
    vertices, triangles = import_mesh(mesh)
    np.testing.assert_array_equal(asset.coords, voxelize_mesh(vertices, triangles, 64))
    assert asset.feats.shape == (asset.num_voxels, 8) and np.isfinite(asset.feats).all()
    assert asset.feats.std() > 0 and asset.latent == "lh-slat" and asset.source.startswith("mesh:box.obj:sha256:")
    camera = Camera.look_at(np.array([1.6, -1.5, 0.9]), np.zeros(3), width=32, height=24, fov_x_deg=45.0)
    out = NearPipeline.from_pretrained(weights, "cpu").render(Scene([(asset, np.eye(4))], EnvMap.uniform(0.5),
                                                                    camera, transparent=True))
    assert out["combined"][..., 3].max() > 0.5  # the encoded object covers pixels where the mesh is

    shaded = encode_mesh(mesh, weights, views=4, size=32, samples=2, shaded=ShadedLight("sunset", 1.0, 1.2),
                         log=lambda _: None)
    np.testing.assert_array_equal(shaded.coords, asset.coords)
    assert shaded.latent == "shaded-slat:sunset" and np.abs(shaded.feats - asset.feats).max() > 1e-4


def test_weights_without_an_encoder_are_a_clear_error(tmp_path, mesh) -> None:
    folder = tmp_path / "render-only"
    save_networks(folder, random_weights("near-tiny", seed=1), "near-tiny")
    with pytest.raises(NearError, match="image_features|encoder"):
        encode_mesh(mesh, folder, views=2, size=16, samples=1, log=lambda _: None)


def test_encode_mesh_command_writes_an_asset(weights, mesh, tmp_path, capfd) -> None:
    """...and shows its progress, not Cycles' log: no `Fra:` status lines, a progress line with the time left."""
    from near_engine.asset import read_asset
    from near_engine.cli import main

    assert main(["encode-mesh", str(mesh), "-o", str(tmp_path / "box.near"), "--weights", str(weights),
                 "--views", "2", "--size", "16", "--samples", "1"]) == 0
    out, err = capfd.readouterr()
    assert "Fra:" not in out + err and "Saved:" not in out + err
    assert "box.obj: rendering views with Cycles: 2/2 (100%), " in err and " left" in err
    asset = read_asset(tmp_path / "box.near")
    vertices, triangles = import_mesh(mesh)
    np.testing.assert_array_equal(asset.coords, voxelize_mesh(vertices, triangles, 64))


def test_the_mesh_materials_become_its_material_latents(weights, mesh, tmp_path) -> None:
    """A red rough metal from an MTL file, and a mesh without materials (Blender's default grey dielectric)."""
    red = tmp_path / "red.obj"
    (tmp_path / "red.mtl").write_text("newmtl red\nKd 0.8 0.1 0.1\nPr 0.3\nPm 1.0\n")
    red.write_text("mtllib red.mtl\nusemtl red\n" + mesh.read_text())
    asset = encode_mesh(red, weights, views=4, size=32, samples=2, log=lambda _: None)
    base, material = asset.extras["base_color"], asset.extras["material"]
    assert base.shape == (asset.num_voxels, 3) and material.shape == (asset.num_voxels, 3)
    np.testing.assert_allclose(np.median(base, 0), [0.8, 0.1, 0.1], atol=0.03)
    np.testing.assert_allclose(np.median(material, 0)[:2], [0.3, 1.0], atol=0.03)
    plain = encode_mesh(mesh, weights, views=4, size=32, samples=2, log=lambda _: None)
    np.testing.assert_allclose(np.median(plain.extras["base_color"], 0), [0.8, 0.8, 0.8], atol=0.03)
    np.testing.assert_allclose(np.median(plain.extras["material"], 0), [0.5, 0.0, 0.5], atol=0.03)


def test_a_line_of_voxels_is_flagged() -> None:
    line = np.stack([np.arange(256), np.full(256, 5), np.full(256, 5)], axis=1)  # 256 voxels along X
    assert "its 256 voxels form a line" in thin_shape_warning(line)
    steps = np.cumsum(np.eye(3, dtype=int)[np.arange(189) % 3], axis=0)  # a staircase along the diagonal
    assert "form a line" in thin_shape_warning(steps)
    plane = np.stack(np.meshgrid(np.arange(16), np.arange(16), [0], indexing="ij"), -1).reshape(-1, 3)
    assert thin_shape_warning(plane) is None  # a flat card has area: no warning
    assert "1 voxel" in thin_shape_warning(np.zeros((1, 3), dtype=np.int32))


def test_a_sliver_mesh_encodes_with_a_warning(weights, tmp_path) -> None:
    """A triangle 1 long and 1/1000 wide has area, so it encodes, but the asset is a line: the log says so."""
    (tmp_path / "sliver.obj").write_text("v 0 0 0\nv 1 1 1\nv 0.001 0 0\nf 1 2 3\n")
    lines: list[str] = []
    asset = encode_mesh(tmp_path / "sliver.obj", weights, views=1, size=16, samples=1, log=lines.append)
    assert asset.num_voxels > 0
    assert any(line.startswith("warning: sliver.obj: its ") and "form a line" in line for line in lines), lines
