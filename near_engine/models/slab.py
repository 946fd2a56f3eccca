"""near-tiny's own geometry network (`lift.occupancy`): a small convolutional U-Net that predicts, per pixel of
the prepared photo, the front and back depth of the object along the pixel's ray."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SlabNet"]


class SlabNet(nn.Module):
    """Prepared photo features [B, 6, 64, 64] (log colour, alpha, inflation half-thickness) -> [B, 2, 64, 64]:
    front and back depth offsets (photo pixels) added to the inflation's -/+ half-thickness."""

    IN_CHANNELS = 6

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.width = c = width
        self.down1 = nn.Sequential(nn.Conv2d(self.IN_CHANNELS, c, 3, padding=1), nn.GELU(),
                                   nn.Conv2d(c, c, 3, padding=1), nn.GELU())
        self.down2 = nn.Sequential(nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.GELU(),
                                   nn.Conv2d(2 * c, 2 * c, 3, padding=1), nn.GELU())
        self.down3 = nn.Sequential(nn.Conv2d(2 * c, 4 * c, 3, stride=2, padding=1), nn.GELU(),
                                   nn.Conv2d(4 * c, 4 * c, 3, padding=1), nn.GELU())
        self.up2 = nn.Sequential(nn.Conv2d(6 * c, 2 * c, 3, padding=1), nn.GELU())
        self.up1 = nn.Sequential(nn.Conv2d(3 * c, c, 3, padding=1), nn.GELU())
        self.out = nn.Conv2d(c, 2, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.down1(x)
        b = self.down2(a)
        c = self.down3(b)
        b = self.up2(torch.cat([b, F.interpolate(c, size=b.shape[-2:], mode="bilinear", align_corners=False)], 1))
        a = self.up1(torch.cat([a, F.interpolate(b, size=a.shape[-2:], mode="bilinear", align_corners=False)], 1))
        half = x[:, -1:] * 64.0  # the inflation's half-thickness, in photo pixels at the map's resolution
        return torch.cat([-half, half], 1) + self.out(a) * 8.0
