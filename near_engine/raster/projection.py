"""Project 3D Gaussians to 2D screen-space Gaussians, differentiably, with gsplat's conventions.

Pure torch, so autograd gives the backward pass for free; the CPU rasterizer consumes the result. Conventions match
gsplat's `fully_fused_projection`: EWA projection with the Jacobian evaluated at a mean clamped to the view frustum
widened by 30% of the half field of view on each side, the low-pass `eps2d * I` added to the 2D covariance with the
opacity compensation `sqrt(det(S) / det(S + eps2d I))` in antialiased mode, depth = camera-space z, near/far culling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..camera import Camera
from ..gaussians import quat_multiply, quat_to_rotmat_entries, rotmat_to_quat

ALPHA_MIN = 1.0 / 255.0  # contributions below this are skipped, as in gsplat
ALPHA_MAX = 0.999  # alpha is clamped here, so a pixel never becomes fully opaque from one Gaussian
T_MIN = 1e-4  # a pixel stops compositing before its transmittance would fall to this


@dataclass
class Projected:
    """Screen-space Gaussians: pixel means [N,2], conics (inverse covariance a, b, c) [N,3], opacities after the
    antialiasing compensation [N], camera-space depths [N], and integer box radii [N,2] (0 = culled)."""

    means2d: torch.Tensor
    conics: torch.Tensor
    opacities: torch.Tensor
    depths: torch.Tensor
    radii: torch.Tensor


def project_gaussians(
    means: torch.Tensor,
    quats: torch.Tensor,
    scales: torch.Tensor,
    opacities: torch.Tensor,
    camera: Camera,
    eps2d: float = 0.3,
    antialiased: bool = True,
) -> Projected:
    """Project world-space Gaussians into `camera`'s image.

    Only Gaussians between the clipping planes are projected (others get zeros and radius 0), so nothing behind or
    at the camera can put an infinity, and through it a NaN gradient, into the graph.
    """
    w2c = torch.as_tensor(camera.world_to_camera, dtype=means.dtype, device=means.device)
    rot, trans = w2c[:3, :3], w2c[:3, 3]
    depths = (means * rot[2]).sum(-1) + trans[2]
    keep = ((depths > camera.near) & (depths < camera.far)).detach()
    if bool(keep.all()):
        means2d, conics, opac, radii = _project_in_range(means, quats, scales, opacities, camera, rot, trans, eps2d,
                                                         antialiased)
        return Projected(means2d, conics, opac, depths, radii)
    idx = keep.nonzero()[:, 0]
    sub = _project_in_range(means[idx], quats[idx], scales[idx], opacities[idx], camera, rot, trans, eps2d,
                            antialiased)
    n = means.shape[0]
    means2d, conics, opac, radii = (
        torch.zeros((n,) + x.shape[1:], dtype=x.dtype, device=x.device).index_copy(0, idx, x) for x in sub)
    return Projected(means2d, conics, opac, depths, radii)


def _project_in_range(means, quats, scales, opacities, camera, rot, trans, eps2d, antialiased):
    """(means2d, conics, opacities, radii) for Gaussians that all lie between the clipping planes."""
    means_c = (means[:, None, :] * rot).sum(-1) + trans
    tx, ty, tz = means_c.unbind(-1)
    fx, fy, cx, cy = camera.fx, camera.fy, camera.cx, camera.cy
    if camera.orthographic:
        zeros = torch.zeros_like(tz)
        j00, j02, j11, j12 = torch.full_like(tz, fx), zeros, torch.full_like(tz, fy), zeros
        means2d = torch.stack([fx * tx + cx, fy * ty + cy], -1)
    else:
        means2d = torch.stack([fx * tx / tz + cx, fy * ty / tz + cy], -1)
        # Evaluate the Jacobian at a mean clamped to a slightly widened frustum, so Gaussians far outside the view
        # do not blow up (gsplat's rule).
        tan_x, tan_y = 0.5 * camera.width / fx, 0.5 * camera.height / fy
        lim_x_pos, lim_x_neg = (camera.width - cx) / fx + 0.3 * tan_x, cx / fx + 0.3 * tan_x
        lim_y_pos, lim_y_neg = (camera.height - cy) / fy + 0.3 * tan_y, cy / fy + 0.3 * tan_y
        jx = tz * torch.clamp(tx / tz, -lim_x_neg, lim_x_pos)
        jy = tz * torch.clamp(ty / tz, -lim_y_neg, lim_y_pos)
        j00, j02, j11, j12 = fx / tz, -fx * jx / tz**2, fy / tz, -fy * jy / tz**2

    # cov2d = J Sigma_cam J^T = T T^T with T = J R_cam S, where R_cam = W R is the rotation of the quaternion
    # composed with the camera's. Written out per entry on [N] vectors: far faster on a CPU than batched 3x3 matmuls.
    r = quat_to_rotmat_entries(quat_multiply(rotmat_to_quat(rot.detach().cpu()).to(quats), quats))
    s = scales.unbind(-1)
    t0 = [(j00 * r[0][k] + j02 * r[2][k]) * s[k] for k in range(3)]
    t1 = [(j11 * r[1][k] + j12 * r[2][k]) * s[k] for k in range(3)]
    cov_xx = t0[0] * t0[0] + t0[1] * t0[1] + t0[2] * t0[2]
    cov_xy = t0[0] * t1[0] + t0[1] * t1[1] + t0[2] * t1[2]
    cov_yy = t1[0] * t1[0] + t1[1] * t1[1] + t1[2] * t1[2]

    a = cov_xx + eps2d
    c = cov_yy + eps2d
    det = (a * c - cov_xy * cov_xy).clamp_min(1e-10)
    conics = torch.stack([c / det, -cov_xy / det, a / det], -1)
    if antialiased:
        # Clamped away from 0: sqrt has an infinite slope there, which would turn a zero gradient into NaN.
        det_orig = cov_xx * cov_yy - cov_xy * cov_xy
        opacities = opacities * torch.sqrt(torch.clamp(det_orig / det, min=1e-12))

    radii = _box_radii(a.detach(), c.detach(), opacities.detach())
    m2 = means2d.detach()
    inside = (
        (m2[:, 0] + radii[:, 0] > 0) & (m2[:, 0] - radii[:, 0] < camera.width)
        & (m2[:, 1] + radii[:, 1] > 0) & (m2[:, 1] - radii[:, 1] < camera.height)
    )
    visible = inside & (opacities.detach() > ALPHA_MIN) & torch.isfinite(m2).all(-1) & torch.isfinite(conics).all(-1)
    radii = torch.where(visible[:, None], radii, torch.zeros_like(radii))
    return means2d, conics, opacities, radii


def _box_radii(var_x: torch.Tensor, var_y: torch.Tensor, opacities: torch.Tensor) -> torch.Tensor:
    """Half-extents in pixels beyond which the Gaussian's alpha is always below 1/255.

    The ellipse {sigma <= k^2 / 2} has half-widths k * sqrt(var); alpha = o * exp(-sigma) < 1/255 outside
    k = sqrt(2 ln(255 o)). For o <= 1 this is at most gsplat's 3.33 sigma, and it makes the image independent of the
    tile size: every pixel sees exactly the Gaussians whose alpha reaches the threshold there.
    """
    k = torch.sqrt(2.0 * torch.log(torch.clamp(opacities / ALPHA_MIN, min=1.0)))
    radii = torch.stack([torch.ceil(k * torch.sqrt(var_x)), torch.ceil(k * torch.sqrt(var_y))], -1)
    return torch.nan_to_num(radii, nan=0.0, posinf=0.0).clamp(max=2.0**30).to(torch.int32)
