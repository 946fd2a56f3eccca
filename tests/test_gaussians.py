"""Gaussians: similarity transforms (checked by rendering and by covariance algebra), concatenation, 3DGS PLY export
read back with an independent PLY reader (plyfile)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from plyfile import PlyData

from near_engine.camera import Camera
from near_engine.errors import RasterError
from near_engine.gaussians import SH_C0, Gaussians, quat_multiply, quat_to_rotmat, rotmat_to_quat
from near_engine.raster import rasterize


def make_gaussians(n: int = 64, seed: int = 0) -> Gaussians:
    g = torch.Generator().manual_seed(seed)
    return Gaussians(
        means=torch.rand(n, 3, generator=g, dtype=torch.float64) - 0.5,
        quats=torch.randn(n, 4, generator=g, dtype=torch.float64),
        scales=0.01 + 0.05 * torch.rand(n, 3, generator=g, dtype=torch.float64),
        opacities=0.2 + 0.7 * torch.rand(n, generator=g, dtype=torch.float64),
        channels={"rgb": torch.rand(n, 3, generator=g, dtype=torch.float64),
                  "feature": torch.randn(n, 5, generator=g, dtype=torch.float64)},
    )


def rotation_matrix(axis, angle_deg: float) -> np.ndarray:
    axis = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    a = math.radians(angle_deg)
    return np.eye(3) + math.sin(a) * k + (1 - math.cos(a)) * k @ k


def similarity(axis=(1.0, 2.0, 3.0), angle=40.0, scale=1.7, translation=(0.3, -0.2, 0.5)) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = scale * rotation_matrix(axis, angle)
    m[:3, 3] = translation
    return m


def covariances(g: Gaussians) -> torch.Tensor:
    m = quat_to_rotmat(g.quats) * g.scales[:, None, :]
    return m @ m.transpose(-1, -2)


def test_quaternion_matrix_round_trip():
    for axis, angle in [((1, 0, 0), 30), ((0, 1, 1), 179.9), ((1, -2, 0.5), 90), ((0, 0, 1), 0), ((1, 1, 1), 180)]:
        r = torch.tensor(rotation_matrix(axis, angle))
        torch.testing.assert_close(quat_to_rotmat(rotmat_to_quat(r)), r, atol=1e-9, rtol=0)
    a, b = torch.randn(2, 4, dtype=torch.float64)
    torch.testing.assert_close(quat_to_rotmat(quat_multiply(a, b)), quat_to_rotmat(a) @ quat_to_rotmat(b))


def test_transform_moves_means_and_covariances():
    g = make_gaussians()
    m = similarity()
    t = g.transformed(m)
    lin = torch.tensor(m[:3, :3])
    torch.testing.assert_close(t.means, g.means @ lin.T + torch.tensor(m[:3, 3]))
    torch.testing.assert_close(covariances(t), lin @ covariances(g) @ lin.T)
    torch.testing.assert_close(t.opacities, g.opacities)
    torch.testing.assert_close(t.channels["feature"], g.channels["feature"])


def test_transform_commutes_with_rendering():
    # Moving the object by M and the camera by M gives the same picture.
    g = make_gaussians(200)
    g = Gaussians(*(x.float() for x in (g.means, g.quats, g.scales, g.opacities)), {"rgb": g.channels["rgb"].float()})
    cam = Camera.orbit(25, 15, 2.5, width=48, height=40)
    m = similarity(scale=1.0)
    moved_cam = cam.with_world_to_camera(cam.world_to_camera @ np.linalg.inv(m))
    before = rasterize(g.means, g.quats, g.scales, g.opacities, g.channels["rgb"], cam)
    gt = g.transformed(m)
    after = rasterize(gt.means, gt.quats, gt.scales, gt.opacities, gt.channels["rgb"], moved_cam)
    assert before.alpha.max() > 0.5
    torch.testing.assert_close(after.channels, before.channels, atol=1e-4, rtol=0)
    torch.testing.assert_close(after.depth, before.depth, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bad", [np.diag([1.0, 2.0, 1.0, 1.0]), np.diag([-1.0, 1.0, 1.0, 1.0]),
                                 np.full((4, 4), np.nan), np.eye(3)])
def test_transform_rejects_what_gaussians_cannot_represent(bad):
    with pytest.raises(RasterError):
        make_gaussians().transformed(bad)


def test_concatenate():
    a, b = make_gaussians(10, 1), make_gaussians(7, 2)
    c = Gaussians.concatenate([a, b])
    assert len(c) == 17
    torch.testing.assert_close(c.means[10:], b.means)
    torch.testing.assert_close(c.channels["feature"][:10], a.channels["feature"])
    with pytest.raises(RasterError, match="channel names or widths"):
        Gaussians.concatenate([a, Gaussians(b.means, b.quats, b.scales, b.opacities, {"rgb": b.channels["rgb"]})])
    wider = dict(b.channels, feature=torch.zeros(7, 6, dtype=torch.float64))
    with pytest.raises(RasterError, match="channel names or widths"):
        Gaussians.concatenate([a, Gaussians(b.means, b.quats, b.scales, b.opacities, wider)])
    reordered = {"feature": b.channels["feature"], "rgb": b.channels["rgb"]}
    c2 = Gaussians.concatenate([a, Gaussians(b.means, b.quats, b.scales, b.opacities, reordered)])
    torch.testing.assert_close(c2.channels["rgb"][10:], b.channels["rgb"])
    with pytest.raises(RasterError):
        Gaussians.concatenate([])


def test_shapes_are_checked():
    g = make_gaussians(5)
    with pytest.raises(RasterError, match="quats"):
        Gaussians(g.means, g.quats[:, :3], g.scales, g.opacities)
    with pytest.raises(RasterError, match="rgb"):
        Gaussians(g.means, g.quats, g.scales, g.opacities, {"rgb": torch.zeros(4, 3)})


def test_ply_colour_spaces_against_closed_form(tmp_path):
    """sRGB (default) and linear exports of known colours, HDR values clipped to 1 and negatives to 0."""
    g = make_gaussians(5)
    colours = torch.tensor([[0.0, 0.001, 0.0031308], [0.18, 0.5, 1.0], [2.5, -0.2, 0.04]] + [[0.2] * 3] * 2,
                           dtype=torch.float64)
    g = Gaussians(g.means, g.quats, g.scales, g.opacities, {"rgb": colours})
    want = {"srgb": [[0.0, 0.01292, 0.04045], [0.461356, 0.735357, 1.0], [1.0, 0.0, 0.220916]],
            "linear": [[0.0, 0.001, 0.0031308], [0.18, 0.5, 1.0], [1.0, 0.0, 0.04]]}
    for space, expected in want.items():
        g.write_ply(tmp_path / f"{space}.ply", color_space=space)
        v = PlyData.read(str(tmp_path / f"{space}.ply"))["vertex"]
        shown = 0.5 + SH_C0 * np.stack([v[f"f_dc_{i}"] for i in range(3)], -1)
        np.testing.assert_allclose(shown[:3], expected, atol=2e-5)
    with pytest.raises(RasterError, match="colour space"):
        g.write_ply(tmp_path / "bad.ply", color_space="acescg")


def test_ply_export_reads_back_as_standard_3dgs(tmp_path):
    g = make_gaussians(33)
    path = tmp_path / "splat.ply"
    g.write_ply(path)
    ply = PlyData.read(str(path))
    v = ply["vertex"]
    assert v.count == 33
    names = [p.name for p in v.properties]
    assert names[:3] == ["x", "y", "z"]
    for name in ["f_dc_0", "f_dc_1", "f_dc_2", "opacity", "scale_0", "scale_1", "scale_2",
                 "rot_0", "rot_1", "rot_2", "rot_3"]:
        assert name in names
    assert all(p.val_dtype in ("f4", "float32", "float") for p in v.properties)
    xyz = np.stack([v["x"], v["y"], v["z"]], -1)
    np.testing.assert_allclose(xyz, g.means.numpy(), atol=1e-6)
    np.testing.assert_allclose(np.exp(np.stack([v[f"scale_{i}"] for i in range(3)], -1)), g.scales.numpy(), rtol=1e-5)
    np.testing.assert_allclose(1 / (1 + np.exp(-v["opacity"])), g.opacities.numpy(), atol=1e-6)
    # Viewers display c = 0.5 + SH_C0 * f_dc: by default the sRGB encoding of the clipped scene-linear colour.
    shown = 0.5 + SH_C0 * np.stack([v[f"f_dc_{i}"] for i in range(3)], -1)
    linear = g.channels["rgb"].numpy()
    srgb = np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)
    np.testing.assert_allclose(shown, srgb, atol=1e-6)
    assert (shown > linear + 1e-3)[linear > 0.01].all()  # brighter than the linear values, as a display shows them
    q = np.stack([v[f"rot_{i}"] for i in range(4)], -1)
    np.testing.assert_allclose(np.linalg.norm(q, axis=-1), 1.0, atol=1e-6)
    # The stored quaternion is the same rotation (up to sign).
    torch.testing.assert_close(quat_to_rotmat(torch.tensor(q, dtype=torch.float64)), quat_to_rotmat(g.quats),
                               atol=1e-6, rtol=0)
