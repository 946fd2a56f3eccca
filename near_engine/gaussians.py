"""A batch of 3D Gaussians: the representation every NeAR decoder produces and the rasterizer consumes.

Conventions follow gsplat (and the 3DGS PLY format): quaternions are (w, x, y, z) and need not be normalized,
scales are standard deviations in world units (not logs), opacities are in [0, 1] (values <= 1/255 never show).
Any number of named per-Gaussian channels (colour, base colour, roughness, feature vectors...) ride along.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from .errors import RasterError
from .files import write_bytes_atomically
from .images import linear_to_srgb

SH_C0 = 0.28209479177387814  # the degree-0 spherical-harmonic constant used by 3DGS PLY colours


@dataclass(frozen=True)
class Gaussians:
    """N Gaussians: `means` [N,3], `quats` [N,4] (wxyz), `scales` [N,3], `opacities` [N], `channels` name -> [N,C]."""

    means: torch.Tensor
    quats: torch.Tensor
    scales: torch.Tensor
    opacities: torch.Tensor
    channels: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.means.shape[0] if self.means.ndim == 2 else -1
        expected = {"means": (n, 3), "quats": (n, 4), "scales": (n, 3), "opacities": (n,)}
        for name, shape in expected.items():
            if tuple(getattr(self, name).shape) != shape:
                raise RasterError(f"Gaussians.{name} must have shape {shape}, got {tuple(getattr(self, name).shape)}")
        for name, value in self.channels.items():
            if value.ndim != 2 or value.shape[0] != n:
                raise RasterError(f"Gaussian channel {name!r} must have shape [{n}, C], got {tuple(value.shape)}")

    def __len__(self) -> int:
        return self.means.shape[0]

    def transformed(self, matrix: np.ndarray | torch.Tensor) -> "Gaussians":
        """Apply a 4x4 similarity transform (rotation, uniform scale, translation), as an object's matrix_world does.

        Non-uniform scale or shear cannot be represented exactly by per-axis scales of rotated Gaussians; such
        matrices are rejected rather than silently approximated.
        """
        m = torch.as_tensor(matrix.detach().cpu().double() if isinstance(matrix, torch.Tensor)
                            else np.asarray(matrix, dtype=np.float64)).to(self.means)
        if m.shape != (4, 4) or not torch.isfinite(m).all():
            raise RasterError("transform must be a finite 4x4 matrix")
        linear = m[:3, :3].double()
        scale = torch.linalg.det(linear).abs().pow(1.0 / 3.0)
        rotation = linear / scale if scale > 0 else linear
        if scale <= 0 or not torch.allclose(rotation @ rotation.T, torch.eye(3, dtype=rotation.dtype), atol=1e-4):
            raise RasterError("only rotation, uniform scale and translation can transform Gaussians")
        if torch.det(rotation) < 0:
            raise RasterError("mirroring transforms (negative determinant) are not supported for Gaussians")
        rot = rotation.to(self.means)
        means = self.means @ rot.T * scale.to(self.means) + m[:3, 3]
        quats = quat_multiply(rotmat_to_quat(rot).expand_as(self.quats), self.quats)
        return replace(self, means=means, quats=quats, scales=self.scales * scale.to(self.scales))

    @staticmethod
    def concatenate(parts: list["Gaussians"]) -> "Gaussians":
        """Join batches into one; every part must carry the same channel names and widths."""
        if not parts:
            raise RasterError("cannot concatenate an empty list of Gaussians")
        widths = {n: c.shape[1] for n, c in parts[0].channels.items()}
        for p in parts[1:]:
            other = {n: c.shape[1] for n, c in p.channels.items()}
            if other != widths:
                raise RasterError(f"channel names or widths differ: {widths} vs {other}")
        names = list(widths)
        return Gaussians(
            torch.cat([p.means for p in parts]),
            torch.cat([p.quats for p in parts]),
            torch.cat([p.scales for p in parts]),
            torch.cat([p.opacities for p in parts]),
            {n: torch.cat([p.channels[n] for p in parts]) for n in names},
        )

    def write_ply(self, path: str | Path, color_channel: str | None = "rgb", color_space: str = "srgb") -> None:
        """Write the standard 3DGS PLY (binary little-endian) that splat viewers read.

        Viewers expect log scales, logit opacities, normalized wxyz quaternions (`rot_0..3`) and the colour as a
        degree-0 SH coefficient (`f_dc_0..2`): f_dc = (c - 0.5) / SH_C0, with c the colour they display. So by
        default (`color_space="srgb"`) the scene-linear colour is clipped to [0, 1] and sRGB-encoded, as Blender's
        Standard view shows it; `"linear"` writes the clipped scene-linear values instead (for tools that expect
        linear data; viewers show them too dark).
        """
        if color_space not in ("srgb", "linear"):
            raise RasterError(f"PLY colour space must be 'srgb' or 'linear', got {color_space!r}")
        n = len(self)
        means = self.means.detach().cpu().double().numpy()
        quats = torch.nn.functional.normalize(self.quats.detach().double(), dim=-1).cpu().numpy()
        scales = self.scales.detach().cpu().double().numpy()
        opac = self.opacities.detach().cpu().double().clamp(1e-6, 1 - 1e-6).numpy()
        if color_channel is not None and color_channel in self.channels:
            if self.channels[color_channel].shape[1] < 3:
                raise RasterError(f"PLY colour channel {color_channel!r} needs 3 columns, "
                                  f"has {self.channels[color_channel].shape[1]}")
            rgb = self.channels[color_channel].detach().cpu().double().numpy()[:, :3].clip(0.0, 1.0)
            if color_space == "srgb":
                rgb = linear_to_srgb(rgb)
        else:
            rgb = np.full((n, 3), 0.5)
        columns = {
            "x": means[:, 0], "y": means[:, 1], "z": means[:, 2],
            "nx": np.zeros(n), "ny": np.zeros(n), "nz": np.zeros(n),
            "f_dc_0": (rgb[:, 0] - 0.5) / SH_C0, "f_dc_1": (rgb[:, 1] - 0.5) / SH_C0, "f_dc_2": (rgb[:, 2] - 0.5) / SH_C0,
            "opacity": np.log(opac / (1 - opac)),
            "scale_0": np.log(np.maximum(scales[:, 0], 1e-12)),
            "scale_1": np.log(np.maximum(scales[:, 1], 1e-12)),
            "scale_2": np.log(np.maximum(scales[:, 2], 1e-12)),
            "rot_0": quats[:, 0], "rot_1": quats[:, 1], "rot_2": quats[:, 2], "rot_3": quats[:, 3],
        }
        record = np.empty(n, dtype=[(name, "<f4") for name in columns])
        for name, values in columns.items():
            record[name] = values
        header = "ply\nformat binary_little_endian 1.0\nelement vertex %d\n" % n
        header += "".join(f"property float {name}\n" for name in columns) + "end_header\n"
        write_bytes_atomically(path, header.encode("ascii") + record.tobytes(), RasterError)


def quat_to_rotmat_entries(quats: torch.Tensor) -> list[list[torch.Tensor]]:
    """(w, x, y, z) quaternions [..., 4] (any norm) -> rotation matrix entries r[i][j], each [...]."""
    w, x, y, z = torch.unbind(torch.nn.functional.normalize(quats, dim=-1), dim=-1)
    return [
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ]


def quat_to_rotmat(quats: torch.Tensor) -> torch.Tensor:
    """(w, x, y, z) quaternions [..., 4] (any norm) -> rotation matrices [..., 3, 3]."""
    return torch.stack([torch.stack(row, dim=-1) for row in quat_to_rotmat_entries(quats)], dim=-2)


def rotmat_to_quat(r: torch.Tensor) -> torch.Tensor:
    """Proper rotation matrices [..., 3, 3] -> unit (w, x, y, z) quaternions [..., 4], float64 (Shepperd's method:
    of the four diagonal combinations the largest is divided by, so every angle is stable)."""
    r = torch.as_tensor(r).double()
    m = [[r[..., i, j] for j in range(3)] for i in range(3)]
    candidates = torch.stack([  # row k is 4 q_k q: the row with the largest diagonal term has the largest |q_k|
        torch.stack([1 + m[0][0] + m[1][1] + m[2][2], m[2][1] - m[1][2], m[0][2] - m[2][0], m[1][0] - m[0][1]], -1),
        torch.stack([m[2][1] - m[1][2], 1 + m[0][0] - m[1][1] - m[2][2], m[0][1] + m[1][0], m[0][2] + m[2][0]], -1),
        torch.stack([m[0][2] - m[2][0], m[0][1] + m[1][0], 1 - m[0][0] + m[1][1] - m[2][2], m[1][2] + m[2][1]], -1),
        torch.stack([m[1][0] - m[0][1], m[0][2] + m[2][0], m[1][2] + m[2][1], 1 - m[0][0] - m[1][1] + m[2][2]], -1),
    ], -2)
    pick = torch.diagonal(candidates, dim1=-2, dim2=-1).argmax(-1)
    q = torch.gather(candidates, -2, pick[..., None, None].expand(*pick.shape, 1, 4))[..., 0, :]
    return torch.nn.functional.normalize(q, dim=-1)


def quat_multiply(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Hamilton product of (w, x, y, z) quaternions: the rotation b followed by a."""
    a = a.to(b)
    aw, ax, ay, az = torch.unbind(a, dim=-1)
    bw, bx, by, bz = torch.unbind(b, dim=-1)
    return torch.stack(
        [
            aw * bw - ax * bx - ay * by - az * bz,
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
        ],
        dim=-1,
    )
