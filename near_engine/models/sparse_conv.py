"""Submanifold sparse convolution and the 2x down/upsampling of TRELLIS's sparse U-Net blocks, in plain torch.

TRELLIS's SLAT flow convolves with spconv's `SubMConv3d` (through its `SparseConv3d` wrapper, whose child `conv` holds
the parameters). `SubmanifoldConv3d` computes the same thing without spconv, so stage 1 runs wherever torch runs: the
output lives exactly on the input voxels, and voxel i gets `bias + sum_k W[:, k] @ x[neighbour(i, k)]` over the k^3
offsets that are active voxels of the same batch element. The weight has spconv 2.x's layout `[out, kx, ky, kz, in]`;
kernel index (a, b, c) reads the voxel at offset (a - k // 2, b - k // 2, c - k // 2): a cross-correlation, like
`torch.nn.functional.conv3d` on the dense grid read at the active voxels (both are tested).

`downsample` / `upsample` are TRELLIS's `SparseDownsample(2)` / `SparseUpsample(2)`
(`trellis/modules/sparse/spatial.py`): voxels merge into their parent cell `xyz // 2`, and upsampling copies each
parent's features back to its children. TRELLIS pools with `torch.scatter_reduce(zeros, ..., reduce="mean")`, whose
default `include_self=True` counts the zero it starts from: a parent gets `sum(children) / (children + 1)`, not the
plain mean. The released weights were trained with that, so it is reproduced here.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..sparse import SparseTensor

__all__ = ["SubmanifoldConv3d", "downsample", "neighbour_table", "upsample"]


def neighbour_table(tensor: SparseTensor, kernel_size: int) -> torch.Tensor:
    """[k^3, N] int64: row `o` holds, per voxel, the row of its neighbour at kernel offset `o` (kx major, kz fastest),
    or N where that neighbour is not an active voxel of the same batch element. Cached on the tensor's structure."""

    def build() -> torch.Tensor:
        n, res, half = len(tensor), tensor.resolution, kernel_size // 2
        coords = tensor.coords.long()
        key = _key(coords[:, 0], coords[:, 1:], res)
        sorted_key, order = torch.sort(key)
        axis = torch.arange(-half, kernel_size - half, device=coords.device)
        offsets = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 1, 3)
        xyz = (coords[None, :, 1:] + offsets).reshape(-1, 3)  # [k^3 N, 3], offset major
        batch = coords[:, 0].repeat(len(offsets))
        inside = ((xyz >= 0) & (xyz < res)).all(dim=1)
        wanted = _key(batch, xyz, res)
        pos = torch.searchsorted(sorted_key, wanted).clamp_(max=max(n - 1, 0))
        found = inside & (sorted_key.index_select(0, pos) == wanted)
        return torch.where(found, order.index_select(0, pos), n).reshape(len(offsets), n)

    return tensor.cached(("submanifold", int(kernel_size)), build)


def _key(batch: torch.Tensor, xyz: torch.Tensor, res: int) -> torch.Tensor:
    return ((batch * res + xyz[:, 0]) * res + xyz[:, 1]) * res + xyz[:, 2]


class _Kernel(nn.Module):
    """The parameters of one convolution: `weight` [out, k, k, k, in] (spconv 2.x layout) and `bias` [out]."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__()
        k = kernel_size
        self.weight = nn.Parameter(torch.empty(out_channels, k, k, k, in_channels))
        self.bias = nn.Parameter(torch.empty(out_channels))
        if not self.weight.is_meta:  # spconv's initialisation bounds: uniform +-1/sqrt(fan_in)
            bound = 1.0 / math.sqrt(in_channels * k**3)
            nn.init.uniform_(self.weight, -bound, bound)
            nn.init.uniform_(self.bias, -bound, bound)


class SubmanifoldConv3d(nn.Module):
    """spconv `SubMConv3d` in plain torch: SparseTensor [N, in] -> [N, out] on the same voxels.

    The parameters sit in the child `conv` (`conv.weight`, `conv.bias`), where TRELLIS's `SparseConv3d` wrapper keeps
    its spconv layer, so state-dict names match the official checkpoints.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"a submanifold convolution needs an odd kernel size, got {kernel_size}")
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.conv = _Kernel(in_channels, out_channels, kernel_size)

    def forward(self, x: SparseTensor) -> SparseTensor:
        if x.feats.ndim != 2 or x.feats.shape[1] != self.in_channels:
            raise ValueError(f"convolution expects features [N, {self.in_channels}], got {tuple(x.feats.shape)}")
        table = neighbour_table(x, self.kernel_size)
        weight = self.conv.weight.reshape(self.out_channels, -1, self.in_channels)
        feats = x.feats.to(weight.dtype)
        padded = torch.cat([feats, feats.new_zeros(1, self.in_channels)])  # row N: the absent neighbour
        out = self.conv.bias.expand(len(x), -1)
        for o in range(table.shape[0]):  # index_select: plain indexing wakes every thread even for a few rows
            out = torch.addmm(out, padded.index_select(0, table[o]), weight[:, o].t())
        return x.replace(out)


def downsample(tensor: SparseTensor, factor: int = 2) -> tuple[SparseTensor, torch.Tensor]:
    """(parent cells on the `resolution // factor` grid, `index` [N] of each voxel's parent row), pooled as TRELLIS
    pools: `sum(children) / (children + 1)` per parent (see the module docstring). Parents are sorted by
    (batch, x, y, z)."""
    res = -(-tensor.resolution // factor)
    coords = tensor.coords.long()
    parent = coords[:, 1:] // factor
    key = _key(coords[:, 0], parent, res)
    unique, index = torch.unique(key, sorted=True, return_inverse=True)
    feats = tensor.feats
    pooled = torch.zeros(len(unique), *feats.shape[1:], dtype=feats.dtype, device=feats.device)
    pooled = torch.scatter_reduce(pooled, 0, index.view(-1, *[1] * (feats.ndim - 1)).expand_as(feats), feats,
                                  reduce="mean", include_self=True)
    xyz = torch.stack([unique // res**2 % res, unique // res % res, unique % res], dim=1)
    coarse = torch.cat([(unique // res**3)[:, None], xyz], dim=1)
    return SparseTensor(coarse, pooled, res, tensor.batch_size, check_duplicates=False), index


def upsample(coarse: SparseTensor, fine: SparseTensor, index: torch.Tensor) -> SparseTensor:
    """The features of `coarse` copied back onto the voxels of `fine` (nearest), `index` from `downsample(fine)`."""
    return fine.replace(coarse.feats.index_select(0, index))
