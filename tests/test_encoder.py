"""near-tiny's mesh encoder pieces in closed form: the image features' input skip and lifting features onto voxels."""

from __future__ import annotations

import numpy as np
import torch

from near_engine.camera import Camera
from near_engine.models.encoder import ImageFeatures, lift_features


def test_image_features_end_with_the_box_averaged_encoded_input():
    torch.manual_seed(0)
    net = ImageFeatures(out_channels=8, hidden_channels=6)
    rgba = torch.rand(2, 6, 6, 4) * 3
    out = net(rgba)
    assert out.shape == (2, 8, 3, 3)
    x = torch.cat([torch.log1p(16 * rgba[..., :3]), rgba[..., 3:]], -1)
    expected = x.reshape(2, 3, 2, 3, 2, 4).mean((2, 4)).permute(0, 3, 1, 2)
    torch.testing.assert_close(out[:, 4:], expected)
    # so swapping red and blue in the input always moves the features (the learned maps may ignore colour)
    swapped = rgba[..., [2, 1, 0, 3]]
    assert (net(swapped)[:, 4:7] - out[:, 4:7]).abs().max() > 0.1


def test_lift_features_averages_the_views_that_see_a_point():
    cameras = [Camera.orbit(az, 0.0, 2.0, width=8, height=8, fov_x_deg=40.0) for az in (0.0, 90.0)]
    maps = torch.stack([torch.full((1, 4, 4), 1.0), torch.full((1, 4, 4), 3.0)])  # view 0 says 1, view 1 says 3
    points = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 5.0]])  # the centre, and a point both cameras miss
    lifted = lift_features(maps, points, cameras)
    torch.testing.assert_close(lifted[:, 0], torch.tensor([2.0, 0.0]))
    # A first hit 0.5 in front of the centre in view 1 hides it there: only view 0 counts.
    depth = torch.stack([torch.full((8, 8), 10.0), torch.full((8, 8), 1.5)])
    torch.testing.assert_close(lift_features(maps, points[:1], cameras, depth, tolerance=0.1)[:, 0],
                               torch.tensor([1.0]))
    np.testing.assert_allclose(cameras[1].project(np.zeros((1, 3)))[1], [2.0])  # the centre is 2 units away


def test_latent_encoder_skip_passes_the_lifted_features_through_linearly():
    from near_engine.models.encoder import LatentEncoder
    from near_engine.sparse import SparseTensor

    torch.manual_seed(0)
    encoder = LatentEncoder(resolution=16, in_channels=6, model_channels=16, latent_channels=4, num_blocks=1,
                            num_heads=2, window_size=4, num_register_tokens=2)
    coords = torch.unique(torch.randint(0, 16, (40, 3)), dim=0).int()
    features = torch.randn(len(coords), 6)
    trunk_only = encoder(SparseTensor.from_list([(coords, features)], 16)).feats
    assert torch.count_nonzero(encoder.skip.weight) == 0  # starts as the plain trunk
    with torch.no_grad():
        encoder.skip.weight.copy_(torch.randn(4, 6))
        encoder.skip.bias.fill_(0.5)
    with_skip = encoder(SparseTensor.from_list([(coords, features)], 16)).feats
    torch.testing.assert_close(with_skip - trunk_only, features @ encoder.skip.weight.T + 0.5)
