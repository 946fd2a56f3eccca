"""Surface voxelization: closed-form layers, a sphere's voxel count, bad meshes refused."""

from __future__ import annotations

import math

import numpy as np
import pytest

from near_engine.errors import NearError
from near_engine.voxelize import voxelize_mesh


def voxel_centres(coords: np.ndarray, r: int) -> np.ndarray:
    """DESIGN.md's convention, written out independently of the code under test."""
    return (coords + 0.5) / r - 0.5


def _quad(z: float) -> tuple[np.ndarray, np.ndarray]:
    v = np.array([[-0.5, -0.5, z], [0.5, -0.5, z], [0.5, 0.5, z], [-0.5, 0.5, z]])
    return v, np.array([[0, 1, 2], [0, 2, 3]])


def _icosphere(radius: float, subdivisions: int) -> tuple[np.ndarray, np.ndarray]:
    p = (1 + 5 ** 0.5) / 2
    v = [(-1, p, 0), (1, p, 0), (-1, -p, 0), (1, -p, 0), (0, -1, p), (0, 1, p), (0, -1, -p), (0, 1, -p),
         (p, 0, -1), (p, 0, 1), (-p, 0, -1), (-p, 0, 1)]
    f = [(0, 11, 5), (0, 5, 1), (0, 1, 7), (0, 7, 10), (0, 10, 11), (1, 5, 9), (5, 11, 4), (11, 10, 2), (10, 7, 6),
         (7, 1, 8), (3, 9, 4), (3, 4, 2), (3, 2, 6), (3, 6, 8), (3, 8, 9), (4, 9, 5), (2, 4, 11), (6, 2, 10),
         (8, 6, 7), (9, 8, 1)]
    verts = [np.array(x, float) / np.linalg.norm(x) for x in v]
    for _ in range(subdivisions):
        cache, faces = {}, []

        def mid(a: int, b: int) -> int:
            key = (min(a, b), max(a, b))
            if key not in cache:
                m = verts[a] + verts[b]
                verts.append(m / np.linalg.norm(m))
                cache[key] = len(verts) - 1
            return cache[key]

        for a, b, c in f:
            ab, bc, ca = mid(a, b), mid(b, c), mid(c, a)
            faces += [(a, ab, ca), (b, bc, ab), (c, ca, bc), (ab, bc, ca)]
        f = faces
    return np.array(verts) * radius, np.array(f)


def test_a_plane_inside_a_layer_gives_exactly_that_layer():
    r = 16
    coords = voxelize_mesh(*_quad((5 + 0.3) / r - 0.5), resolution=r)
    expected = np.array([(x, y, 5) for x in range(r) for y in range(r)], np.int32)
    np.testing.assert_array_equal(coords, expected)
    np.testing.assert_allclose(voxel_centres(coords, r)[:, 2], (5 + 0.5) / r - 0.5)


def test_a_plane_on_a_voxel_face_marks_both_neighbouring_layers():
    r = 8
    coords = voxelize_mesh(*_quad(0.0), resolution=r)  # z = 0 is the face between layers 3 and 4
    assert sorted(set(coords[:, 2].tolist())) == [3, 4] and len(coords) == 2 * r * r


def test_a_small_triangle_inside_one_voxel_is_found():
    v = np.array([[0.01, 0.01, 0.01], [0.02, 0.01, 0.01], [0.01, 0.02, 0.012]])
    np.testing.assert_array_equal(voxelize_mesh(v, np.array([[0, 1, 2]]), 4), [[2, 2, 2]])


def test_sphere_shell_count_matches_the_mean_width_estimate():
    """A surface of area A meets about 1.5 A / h^2 cubes of side h (the mean width of a cube is 1.5 h)."""
    r, radius = 48, 0.4
    coords = voxelize_mesh(*_icosphere(radius, 4), resolution=r)
    estimate = 1.5 * 4 * math.pi * radius ** 2 * r ** 2
    assert abs(len(coords) - estimate) / estimate < 0.1, (len(coords), estimate)
    dist = np.linalg.norm(voxel_centres(coords, r), axis=1)
    assert np.abs(dist - radius).max() <= math.sqrt(3) / 2 / r + 1e-9  # every voxel touches the sphere
    assert len(np.unique(coords, axis=0)) == len(coords)


def test_bad_meshes_are_refused_with_clear_messages():
    v, t = _quad(0.1)
    with pytest.raises(NearError, match="unit cube"):
        voxelize_mesh(v * 1.2, t)
    with pytest.raises(NearError, match="empty mesh"):
        voxelize_mesh(np.zeros((0, 3)), np.zeros((0, 3), int))
    with pytest.raises(NearError, match="empty mesh"):
        voxelize_mesh(v, np.zeros((0, 3), int))
    with pytest.raises(NearError, match="indices"):
        voxelize_mesh(v, t + 4)


def test_voxel_normals_of_a_sphere_shell_and_a_plane_are_the_surface_normals():
    from near_engine.voxelize import voxel_normals

    res = 64
    grid = np.stack(np.meshgrid(*(np.arange(res),) * 3, indexing="ij"), -1).reshape(-1, 3)
    centres = (grid + 0.5) / res - 0.5
    shell = grid[np.abs(np.linalg.norm(centres, axis=1) - 0.35) < 0.6 / res]
    normals = voxel_normals(shell, res)
    radial = (shell + 0.5) / res - 0.5
    radial /= np.linalg.norm(radial, axis=1, keepdims=True)
    cosines = np.abs((normals * radial).sum(1))
    assert normals.dtype == np.float32 and np.allclose(np.linalg.norm(normals, axis=1), 1, atol=1e-5)
    assert np.percentile(cosines, 5) > 0.99  # sign is the renderer's (towards the camera)
    plane = grid[grid[:, 2] == 20]
    assert np.allclose(np.abs(voxel_normals(plane, res)[:, 2]), 1, atol=1e-6)
    lone = np.array([[5, 5, 5]])  # no neighbours: a fallback direction, still unit
    assert np.allclose(np.linalg.norm(voxel_normals(lone, res), axis=1), 1)
    assert voxel_normals(np.zeros((0, 3), np.int32), res).shape == (0, 3)
