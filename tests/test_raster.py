"""The rasterizer against independent references: gsplat's own torch projection, a slow per-pixel compositor written
here, closed-form single-Gaussian cases, and finite differences for every gradient."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from gsplat.cuda._torch_impl import _fully_fused_projection, _quat_scale_to_covar_preci

from near_engine.camera import Camera
from near_engine.errors import RasterError
from near_engine.raster import rasterize
from near_engine.raster.projection import project_gaussians


def random_scene(n: int, seed: int, dtype=torch.float32, spread: float = 0.5, scale=(0.02, 0.08), channels: int = 3):
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(n, 3, generator=g, dtype=torch.float64) - 0.5) * 2 * spread
    quats = torch.randn(n, 4, generator=g, dtype=torch.float64)
    scales = scale[0] + torch.rand(n, 3, generator=g, dtype=torch.float64) * (scale[1] - scale[0])
    opacities = 0.1 + 0.85 * torch.rand(n, generator=g, dtype=torch.float64)
    colors = torch.rand(n, channels, generator=g, dtype=torch.float64) * 4.0  # HDR values above 1
    return [x.to(dtype) for x in (means, quats, scales, opacities, colors)]


def orbit_camera(size=(40, 30), azimuth=30.0, elevation=20.0, ortho=False) -> Camera:
    cam = Camera.orbit(azimuth, elevation, 2.5, width=size[0], height=size[1], fov_x_deg=40.0)
    if ortho:
        cam = Camera(cam.width, cam.height, cam.width / 1.6, cam.width / 1.6, cam.cx, cam.cy, cam.world_to_camera,
                     orthographic=True)
    return cam


def reference_composite(means2d, conics, opacities, depths, colors, width, height, near=0.1, far=1e3):
    """One pixel at a time, every Gaussian in depth order, gsplat's compositing rules written out plainly."""
    order = np.argsort(depths, kind="stable")
    out = np.zeros((height, width, colors.shape[1]))
    alpha_img = np.zeros((height, width))
    depth_img = np.zeros((height, width))
    stopped = 0
    for y in range(height):
        for x in range(width):
            trans, acc, dacc = 1.0, np.zeros(colors.shape[1]), 0.0
            for g in order:
                if not near < depths[g] < far:
                    continue
                dx, dy = x + 0.5 - means2d[g, 0], y + 0.5 - means2d[g, 1]
                a, b, c = conics[g]
                sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
                if sigma < 0:
                    continue
                alpha = min(0.999, opacities[g] * math.exp(-sigma))
                if alpha < 1 / 255:
                    continue
                if trans * (1 - alpha) <= 1e-4:
                    stopped += 1
                    break
                acc += alpha * trans * colors[g]
                dacc += alpha * trans * depths[g]
                trans *= 1 - alpha
            out[y, x], alpha_img[y, x] = acc, 1 - trans
            depth_img[y, x] = dacc / (1 - trans) if trans < 1 else 0.0
    return out, alpha_img, depth_img, stopped


def gsplat_projection(means, quats, scales, opacities, cam: Camera, eps2d=0.3, antialiased=True):
    """gsplat's own torch projection; `comp` is the opacity factor (1 when not antialiased)."""
    covars, _ = _quat_scale_to_covar_preci(quats, scales, compute_covar=True, compute_preci=False, triu=False)
    viewmat = torch.as_tensor(cam.world_to_camera, dtype=means.dtype)[None]
    K = torch.as_tensor(cam.K, dtype=means.dtype)[None]
    radii, means2d, depths, conics, comp = _fully_fused_projection(
        means, covars, viewmat, K, cam.width, cam.height, eps2d=eps2d, near_plane=cam.near, far_plane=cam.far,
        calc_compensations=antialiased, camera_model="ortho" if cam.orthographic else "pinhole")
    comp = comp[0] if antialiased else torch.ones_like(depths[0])
    return means2d[0], conics[0], depths[0], comp, radii[0]


@pytest.mark.parametrize("ortho", [False, True])
def test_projection_matches_gsplat_reference(ortho):
    # Some Gaussians far outside the view exercise gsplat's clamped Jacobian.
    means, quats, scales, opacities, _ = random_scene(300, seed=1, dtype=torch.float64, spread=1.5)
    cam = orbit_camera((64, 48), ortho=ortho)
    ours = project_gaussians(means, quats, scales, opacities, cam)
    m2, con, dep, comp, radii = gsplat_projection(means, quats, scales, opacities, cam)
    in_front = dep > cam.near
    assert in_front.sum() > 100
    torch.testing.assert_close(ours.means2d[in_front], m2[in_front], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ours.conics[in_front], con[in_front], rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(ours.depths, dep)
    torch.testing.assert_close(ours.opacities[in_front], (opacities * comp)[in_front], rtol=1e-7, atol=1e-12)
    # Our boxes are opacity-aware, never larger than gsplat's 3.33-sigma boxes, so we keep a subset of its Gaussians
    # (the image tests show that the ones we drop never reach alpha 1/255 inside the frame).
    assert torch.all(ours.radii <= radii)
    assert torch.all((radii[:, 0] > 0) | (ours.radii[:, 0] == 0))
    assert (ours.radii[:, 0] > 0).sum() > 0.9 * (radii[:, 0] > 0).sum()


@pytest.mark.parametrize("ortho, eps2d, antialiased", [(False, 0.3, True), (True, 0.3, True), (False, 0.8, False)])
def test_colours_alpha_depth_match_slow_reference(ortho, eps2d, antialiased):
    means, quats, scales, opacities, colors = random_scene(150, seed=2)
    cam = orbit_camera((37, 29), ortho=ortho)  # sizes that are not multiples of the tile size
    out = rasterize(means, quats, scales, opacities, colors, cam, eps2d=eps2d, antialiased=antialiased)
    # The reference composites gsplat's own projection, so no part of our pipeline is shared.
    m2, con, dep, comp, _ = gsplat_projection(*(x.double() for x in (means, quats, scales, opacities)), cam,
                                              eps2d=eps2d, antialiased=antialiased)
    ref_c, ref_a, ref_d, _ = reference_composite(m2.numpy(), con.numpy(), (opacities.double() * comp).numpy(),
                                              dep.numpy(), colors.double().numpy(), cam.width, cam.height)
    assert ref_a.max() > 0.9 and (ref_a == 0).any()  # the scene covers part of the frame, and opaquely
    np.testing.assert_allclose(out.channels.numpy(), ref_c, atol=2e-4)
    np.testing.assert_allclose(out.alpha[..., 0].numpy(), ref_a, atol=2e-5)
    hit = ref_a > 1e-3
    np.testing.assert_allclose(out.depth[..., 0].numpy()[hit], ref_d[hit], rtol=1e-4)
    assert np.all(out.depth[..., 0].numpy()[ref_a == 0] == 0)


def test_early_termination_matches_reference():
    # Many opaque layers: most pixels stop early, which must leave the same image as the plain loop.
    means, quats, scales, opacities, colors = random_scene(400, seed=3, spread=0.2, scale=(0.08, 0.15))
    opacities = torch.full_like(opacities, 0.995)
    cam = orbit_camera((24, 20))
    out = rasterize(means, quats, scales, opacities, colors, cam)
    m2, con, dep, comp, _ = gsplat_projection(*(x.double() for x in (means, quats, scales, opacities)), cam)
    ref_c, ref_a, ref_d, stopped = reference_composite(m2.numpy(), con.numpy(),
                                                       (opacities.double() * comp).numpy(), dep.numpy(),
                                                       colors.double().numpy(), cam.width, cam.height)
    assert stopped > 50  # of the 480 pixels, about a fifth (the object's core) stop early
    np.testing.assert_allclose(out.channels.numpy(), ref_c, atol=2e-4)
    np.testing.assert_allclose(out.alpha[..., 0].numpy(), ref_a, atol=2e-5)
    hit = ref_a > 1e-3
    np.testing.assert_allclose(out.depth[..., 0].numpy()[hit], ref_d[hit], rtol=1e-4)


def test_extreme_sizes_and_positions_match_reference():
    # Scales from a ten-thousandth of a pixel to larger than the view, Gaussians right in front of the camera and far
    # outside the frustum: the image must stay finite and still equal the plain per-pixel loop. In float64 exactly;
    # in float32 the 2D covariance of a needle-thin Gaussian 4 cm from the lens loses digits to cancellation (as in
    # gsplat's float32 kernels), so a few pixels differ by up to 1e-2 on values up to 4.
    g = torch.Generator().manual_seed(11)
    n = 80
    means, quats, _, opacities, colors = random_scene(n, seed=11, spread=1.2, dtype=torch.float64)
    scales = 10.0 ** (torch.rand(n, 3, generator=g, dtype=torch.float64) * 5 - 5) * 5  # 5e-5 .. 5 units
    cam = orbit_camera((19, 14))
    means[:5] = torch.tensor(cam.position) * (1 - torch.rand(5, 1, generator=g, dtype=torch.float64) * 0.1)
    m2, con, dep, comp, _ = gsplat_projection(means, quats, scales, opacities, cam)
    ref_c, ref_a, _, _ = reference_composite(m2.numpy(), con.numpy(), (opacities * comp).numpy(), dep.numpy(),
                                             colors.numpy(), cam.width, cam.height)
    assert ref_a.max() > 0.5 and dep.min() < 0.05
    for dtype, atol in ((torch.float64, 1e-9), (torch.float32, 1e-2)):
        out = rasterize(*(x.to(dtype) for x in (means, quats, scales, opacities, colors)), cam)
        assert torch.isfinite(out.channels).all() and torch.isfinite(out.depth).all()
        assert out.alpha.min() >= 0 and out.alpha.max() <= 1
        np.testing.assert_allclose(out.channels.double().numpy(), ref_c, atol=atol)
        np.testing.assert_allclose(out.alpha[..., 0].double().numpy(), ref_a, atol=atol)


def test_single_gaussian_closed_form():
    # An isotropic Gaussian facing an orthographic camera: the image is o' * exp(-d^2 / (2 (s^2 + eps))) with
    # o' = o * s^2 / (s^2 + eps), eps = 0.3 px^2: the antialiasing filter keeps the integrated opacity.
    ppm, s_world, o = 20.0, 0.1, 0.8
    cam = Camera(33, 33, ppm, ppm, 16.5, 16.5, np.eye(4), orthographic=True)
    out = rasterize(torch.tensor([[0.0, 0.0, 5.0]]), torch.tensor([[1.0, 0, 0, 0]]),
                    torch.full((1, 3), s_world), torch.tensor([o]), torch.tensor([[2.0, 1.0, 0.5]]), cam)
    var = (s_world * ppm) ** 2 + 0.3
    yy, xx = np.mgrid[0:33, 0:33] + 0.5
    expected = o * (var - 0.3) / var * np.exp(-((xx - 16.5) ** 2 + (yy - 16.5) ** 2) / (2 * var))
    expected[expected < 1 / 255] = 0
    np.testing.assert_allclose(out.alpha[..., 0].numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(out.channels[..., 1].numpy(), expected, atol=1e-6)
    assert np.allclose(out.depth[..., 0].numpy()[expected > 0], 5.0)


def test_background_and_empty_view():
    means, quats, scales, opacities, colors = random_scene(50, seed=4)
    cam = orbit_camera((20, 16))
    bg = torch.tensor([0.25, 0.5, 4.0])
    plain = rasterize(means, quats, scales, opacities, colors, cam)
    over = rasterize(means, quats, scales, opacities, colors, cam, background=bg)
    torch.testing.assert_close(over.channels, plain.channels + (1 - plain.alpha) * bg)
    # Everything behind the camera: the background alone, zero alpha and depth.
    behind = rasterize(means + torch.tensor(cam.position, dtype=torch.float32) * 3, quats, scales, opacities, colors,
                       cam, background=bg)
    assert torch.all(behind.alpha == 0) and torch.all(behind.depth == 0)
    assert torch.equal(behind.channels, bg.expand(16, 20, 3))
    image_bg = torch.rand(16, 20, 3)
    torch.testing.assert_close(rasterize(means, quats, scales, opacities, colors, cam, image_bg).channels,
                               plain.channels + (1 - plain.alpha) * image_bg)


def test_image_does_not_depend_on_tile_size():
    means, quats, scales, opacities, colors = random_scene(500, seed=5, channels=7)
    cam = orbit_camera((70, 45))
    outs = [rasterize(means, quats, scales, opacities, colors, cam, tile_size=t) for t in (8, 16, 32)]
    for other in outs[1:]:
        torch.testing.assert_close(other.channels, outs[0].channels, atol=1e-5, rtol=0)  # float32 rounding, HDR up to 4
        torch.testing.assert_close(other.alpha, outs[0].alpha, atol=1e-6, rtol=0)


@pytest.mark.parametrize("ortho, tile_size", [(False, 16), (True, 16), (False, 4)])
def test_gradients_match_finite_differences(ortho, tile_size):
    # tile_size 4 spreads each Gaussian over several tiles, so per-tile gradient slots must be summed correctly.
    means, quats, scales, opacities, colors = random_scene(12, seed=6, dtype=torch.float64, spread=0.3,
                                                           scale=(0.06, 0.15))
    opacities = opacities.clamp(max=0.9)  # away from the 0.999 clamp, where alpha is not differentiable
    cam = orbit_camera((14, 12), ortho=ortho)
    background = torch.tensor([0.3, 0.2, 0.1], dtype=torch.float64)
    weights = torch.randn(cam.height, cam.width, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def loss(*params):
        out = rasterize(*params, cam, background, tile_size=tile_size)
        return (torch.cat([out.channels, out.alpha, out.depth], -1) * weights).sum()

    params = [x.clone().requires_grad_() for x in (means, quats, scales, opacities, colors)]
    assert rasterize(*params, cam).alpha.max() > 0.5
    assert torch.autograd.gradcheck(loss, params, eps=1e-6, atol=1e-5, rtol=1e-3)


def test_float32_gradients_agree_with_float64():
    # The training path runs in float32: its gradients must agree with the float64 ones checked above.
    scene = random_scene(300, seed=7, dtype=torch.float64)
    cam = orbit_camera((48, 36))
    grads = []
    for dtype in (torch.float64, torch.float32):
        params = [x.detach().to(dtype).requires_grad_() for x in scene]
        out = rasterize(*params, cam)
        (out.channels.sum() + out.alpha.sum()).backward()
        grads.append([p.grad.double() for p in params])
    for g64, g32 in zip(*grads):
        assert torch.linalg.norm(g64 - g32) <= 2e-3 * torch.linalg.norm(g64)


def test_gradients_stay_finite_for_degenerate_gaussians():
    # Needles, zero scales, Gaussians at and behind the camera: culled or invisible, but their gradients must be
    # finite (zero), or one optimizer step would turn the parameters into NaN.
    means, quats, scales, opacities, colors = random_scene(300, seed=12)
    cam = orbit_camera((40, 30))
    scales[:100] = torch.tensor([0.05, 1e-6, 1e-6])
    scales[100:110] = 0.0
    means[110:115] = torch.tensor(cam.position, dtype=torch.float32)
    means[115:120] = torch.tensor(cam.position, dtype=torch.float32) * 1.5
    params = [x.clone().requires_grad_() for x in (means, quats, scales, opacities, colors)]
    out = rasterize(*params, cam, background=torch.ones(3))
    (out.channels.sum() + out.alpha.sum() + out.depth.sum()).backward()
    assert out.alpha.max() > 0.5
    for p in params:
        assert torch.isfinite(p.grad).all()
    assert params[0].grad[110:120].abs().max() == 0  # at or behind the camera: no influence


def test_naive_baseline_matches_kernel():
    # The benchmark's speed-up is only meaningful if the baseline computes the same image.
    from near_engine.raster.naive import splat_naive
    from near_engine.raster.projection import project_gaussians

    means, quats, scales, opacities, colors = random_scene(400, seed=13)
    cam = orbit_camera((50, 40))
    out = rasterize(means, quats, scales, opacities, colors, cam)
    p = project_gaussians(means, quats, scales, opacities, cam)
    feats = torch.cat([colors, p.depths[:, None]], -1).numpy()
    naive, alpha = splat_naive(*(x.numpy() for x in (p.means2d, p.conics, p.opacities, p.radii, p.depths)), feats,
                               cam.width, cam.height)
    assert alpha.max() > 0.9
    np.testing.assert_allclose(naive[..., :3], out.channels.numpy(), atol=2e-4)
    np.testing.assert_allclose(alpha, out.alpha[..., 0].numpy(), atol=2e-5)


def test_bad_inputs_raise_raster_error():
    means, quats, scales, opacities, colors = random_scene(10, seed=8)
    cam = orbit_camera((10, 10))
    with pytest.raises(RasterError, match="quats"):
        rasterize(means, quats[:5], scales, opacities, colors, cam)
    with pytest.raises(RasterError, match="channels"):
        rasterize(means, quats, scales, opacities, colors[:3], cam)
    with pytest.raises(RasterError, match="NaN"):
        rasterize(means.clone().fill_(float("nan")), quats, scales, opacities, colors, cam)
    with pytest.raises(RasterError, match="background"):
        rasterize(means, quats, scales, opacities, colors, cam, background=torch.zeros(4))
    with pytest.raises(RasterError, match="eps2d"):
        rasterize(means, quats, scales, opacities, colors, cam, eps2d=0.0)
    with pytest.raises(RasterError, match="backend"):
        rasterize(means, quats, scales, opacities, colors, cam, backend="metal")
    for bad in (0, -16, 1000):
        with pytest.raises(RasterError, match="tile_size"):
            rasterize(means, quats, scales, opacities, colors, cam, tile_size=bad)
    if not torch.cuda.is_available():
        with pytest.raises(RasterError, match="CUDA"):
            rasterize(means, quats, scales, opacities, colors, cam, backend="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the gsplat backend needs a CUDA device; none here")
def test_cuda_backend_matches_cpu():
    means, quats, scales, opacities, colors = random_scene(2000, seed=9)
    cam = orbit_camera((96, 64))
    cpu = rasterize(means, quats, scales, opacities, colors, cam, background=torch.ones(3))
    gpu = rasterize(*(x.cuda() for x in (means, quats, scales, opacities, colors)), cam,
                    background=torch.ones(3).cuda())
    assert (cpu.channels - gpu.channels.cpu()).abs().max() < 1e-2
    assert (cpu.alpha - gpu.alpha.cpu()).abs().max() < 1e-2
