"""Sparse voxel tensors and the attention patterns the decoders run over them.

A `SparseTensor` is a batch of voxel sets on an `R`^3 grid: `coords` int32 [N,4] as (batch, x, y, z), sorted by batch,
and `feats` [N,...] of any float dtype on any device. This is the same layout as TRELLIS's `SparseTensor`
(`trellis/modules/sparse/basic.py`), so official weights and code translate one to one. Convolutions go through spconv
(`to_spconv`, imported lazily because spconv is an optional dependency); attention never needs it.

Attention runs on `torch.nn.functional.scaled_dot_product_attention`, so one code path serves CPU and CUDA:

- `windowed_attention`: TRELLIS "swin" attention. Voxels attend only to voxels of the same batch element in the same
  `window`^3 cell after shifting: the cell of a voxel is `(xyz + shift) // window` (shift added, same on all three
  axes), exactly as `calc_window_partition` in TRELLIS `trellis/modules/sparse/attention/windowed_attn.py`. TRELLIS's
  "swin" mode uses `shift = window // 2 * (block_index % 2)` (`block_attn_config` in
  `trellis/models/structured_latent_vae/base.py`), i.e. window 8 with shift 0 on even blocks and 4 on odd ones.
- `sparse_self_attention`: full attention within each batch element.

The window partition is cached on the tensor's structure (shared by every `replace`d copy), since every block of a
decoder reuses it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence, TypeVar

import torch
import torch.nn.functional as F

from .errors import SparseError

if TYPE_CHECKING:  # pragma: no cover
    import spconv.pytorch as spconv_pt

# Upper bound on the elements of one SDPA score tensor [groups, heads, L, L]; larger buckets are split in chunks so
# memory stays bounded on CPU, where the masked path materializes the scores.
_MAX_SCORE_ELEMENTS = 1 << 24
# How many partitions one tensor structure keeps (distinct (window, shift) pairs; a decoder uses two).
_MAX_CACHED_PARTITIONS = 8

T = TypeVar("T")


class SparseTensor:
    """A batch of sparse voxel sets: `coords` int32 [N,4] (b,x,y,z) sorted by batch, `feats` [N,...], on a grid.

    `layout[b]` is the slice of rows that belongs to batch element `b`. Structure (coords, layout, cached partitions) is
    shared by every tensor made with `replace`, so per-structure work is done once per decoder pass.
    """

    coords: torch.Tensor
    feats: torch.Tensor
    resolution: int
    batch_size: int
    layout: list[slice]

    def __init__(
        self,
        coords: torch.Tensor,
        feats: torch.Tensor,
        resolution: int,
        batch_size: int | None = None,
        *,
        check_duplicates: bool = True,
    ) -> None:
        """Validate and wrap; rows must already be sorted by batch index (use `from_list` to build from parts)."""
        if not isinstance(coords, torch.Tensor) or not isinstance(feats, torch.Tensor):
            raise SparseError("SparseTensor coords and feats must be torch tensors")
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution <= 0:
            raise SparseError(f"SparseTensor resolution must be a positive integer, got {resolution!r}")
        if coords.ndim != 2 or coords.shape[1] != 4:
            raise SparseError(f"SparseTensor coords must have shape [N, 4] (batch, x, y, z), got {tuple(coords.shape)}")
        if coords.dtype.is_floating_point or coords.dtype.is_complex or coords.dtype == torch.bool:
            raise SparseError(f"SparseTensor coords must be integers, got {coords.dtype}")
        if feats.ndim < 2 or feats.shape[0] != coords.shape[0]:
            raise SparseError(
                f"SparseTensor feats must have shape [N, C] with N = {coords.shape[0]} rows like coords, "
                f"got {tuple(feats.shape)}"
            )
        if feats.device != coords.device:
            raise SparseError(f"SparseTensor coords are on {coords.device} but feats on {feats.device}")
        coords = coords.to(torch.int32).contiguous()
        n = coords.shape[0]
        if n > 0:
            xyz = coords[:, 1:]
            if bool((xyz < 0).any()) or bool((xyz >= resolution).any()):
                bad = int(((xyz < 0) | (xyz >= resolution)).any(dim=1).nonzero()[0, 0])
                raise SparseError(
                    f"SparseTensor voxel {bad} at {coords[bad, 1:].tolist()} lies outside the {resolution}^3 grid"
                )
            if bool((coords[:, 0] < 0).any()):
                raise SparseError("SparseTensor batch indices must be >= 0")
            if n > 1 and bool((coords[1:, 0] < coords[:-1, 0]).any()):
                raise SparseError("SparseTensor rows must be sorted by batch index (build with SparseTensor.from_list)")
        max_batch = int(coords[:, 0].max()) + 1 if n > 0 else 0
        if batch_size is None:
            batch_size = max(max_batch, 1)
        if batch_size < max_batch:
            raise SparseError(
                f"SparseTensor batch_size {batch_size} is smaller than the largest batch index + 1 ({max_batch})"
            )
        counts = torch.bincount(coords[:, 0].long(), minlength=batch_size).tolist() if n > 0 else [0] * batch_size
        if check_duplicates and n > 1:
            keys = _linear_key(coords, resolution)
            if torch.unique(keys).numel() != n:
                raise SparseError("SparseTensor has duplicate voxels (same batch and coordinates)")
        layout, start = [], 0
        for c in counts:
            layout.append(slice(start, start + c))
            start += c
        self.coords = coords
        self.feats = feats
        self.resolution = resolution
        self.batch_size = batch_size
        self.layout = layout
        self._cache: OrderedDict[tuple[Any, ...], Any] = OrderedDict()

    @classmethod
    def from_list(
        cls,
        items: Sequence[tuple[torch.Tensor, torch.Tensor]],
        resolution: int,
    ) -> SparseTensor:
        """Batch a list of (coords [Ni,3], feats [Ni,C]) pairs, one per batch element, in that order."""
        if len(items) == 0:
            raise SparseError("SparseTensor.from_list needs at least one (coords, feats) pair")
        all_coords, all_feats = [], []
        for b, (c, f) in enumerate(items):
            if not isinstance(c, torch.Tensor) or c.ndim != 2 or c.shape[1] != 3:
                shape = tuple(c.shape) if isinstance(c, torch.Tensor) else type(c).__name__
                raise SparseError(f"SparseTensor.from_list item {b}: coords must have shape [N, 3], got {shape}")
            if not isinstance(f, torch.Tensor) or f.ndim < 2 or f.shape[0] != c.shape[0]:
                shape = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
                raise SparseError(
                    f"SparseTensor.from_list item {b}: feats must have shape [{c.shape[0]}, C] like its coords, "
                    f"got {shape}"
                )
            if f.shape[1:] != items[0][1].shape[1:]:
                raise SparseError(
                    f"SparseTensor.from_list item {b}: feats have trailing shape {tuple(f.shape[1:])}, "
                    f"item 0 has {tuple(items[0][1].shape[1:])}"
                )
            batch = torch.full((c.shape[0], 1), b, dtype=torch.int32, device=c.device)
            all_coords.append(torch.cat([batch, c.to(torch.int32)], dim=1))
            all_feats.append(f)
        try:
            coords = torch.cat(all_coords, dim=0)
            feats = torch.cat(all_feats, dim=0)
        except RuntimeError as exc:  # devices or dtypes that cannot be concatenated
            raise SparseError(f"SparseTensor.from_list: the items cannot be batched together ({exc})") from exc
        return cls(coords, feats.to(coords.device), resolution, batch_size=len(items))

    # -- structure-preserving operations -------------------------------------------------------------------------

    def replace(self, feats: torch.Tensor) -> SparseTensor:
        """The same voxels with new features (e.g. a layer's output); shares coords, layout and cached partitions."""
        if not isinstance(feats, torch.Tensor) or feats.ndim < 1 or feats.shape[0] != self.coords.shape[0]:
            shape = tuple(feats.shape) if isinstance(feats, torch.Tensor) else type(feats).__name__
            raise SparseError(f"SparseTensor.replace: feats must have {self.coords.shape[0]} rows, got {shape}")
        if feats.device != self.coords.device:
            raise SparseError(f"SparseTensor.replace: feats are on {feats.device}, coords on {self.coords.device}")
        out = object.__new__(SparseTensor)
        out.coords = self.coords
        out.feats = feats
        out.resolution = self.resolution
        out.batch_size = self.batch_size
        out.layout = self.layout
        out._cache = self._cache
        return out

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SparseTensor:
        """Move to a device and/or cast the features; cached partitions survive only if the device is unchanged."""
        feats = self.feats.to(device=device, dtype=dtype)
        if feats.device == self.coords.device:
            return self.replace(feats)
        coords = self.coords.to(feats.device)
        return SparseTensor(coords, feats, self.resolution, self.batch_size, check_duplicates=False)

    @property
    def device(self) -> torch.device:
        return self.coords.device

    @property
    def dtype(self) -> torch.dtype:
        return self.feats.dtype

    def __len__(self) -> int:
        return int(self.coords.shape[0])

    def __repr__(self) -> str:
        sizes = [s.stop - s.start for s in self.layout]
        return (
            f"SparseTensor(voxels={sizes}, feats={tuple(self.feats.shape)}, dtype={self.feats.dtype}, "
            f"resolution={self.resolution}, device={self.device})"
        )

    def cached(self, key: tuple[Any, ...], build: Callable[[], T]) -> T:
        """Per-structure memo (bounded, oldest dropped first): `build()` runs only on the first request for `key`."""
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]  # type: ignore[no-any-return]
        value = build()
        self._cache[key] = value
        while len(self._cache) > _MAX_CACHED_PARTITIONS:
            self._cache.popitem(last=False)
        return value

    # -- spconv bridge -------------------------------------------------------------------------------------------

    def to_spconv(self) -> spconv_pt.SparseConvTensor:
        """The same voxels as a `spconv.pytorch.SparseConvTensor` (indices b,x,y,z; spatial shape R^3), to convolve."""
        spconv_pt = _import_spconv()
        if self.feats.ndim != 2:
            raise SparseError(f"spconv needs 2-D features [N, C], got {tuple(self.feats.shape)}")
        shape = [self.resolution] * 3
        return spconv_pt.SparseConvTensor(self.feats, self.coords, shape, self.batch_size)

    def from_spconv(self, tensor: spconv_pt.SparseConvTensor) -> SparseTensor:
        """Features of a spconv result on this tensor's voxels (submanifold layers keep the voxel order)."""
        if tensor.indices.shape != self.coords.shape or not torch.equal(tensor.indices.to(torch.int32), self.coords):
            raise SparseError("spconv result has different voxels than this SparseTensor (use a submanifold layer)")
        return self.replace(tensor.features)


def _import_spconv() -> Any:
    try:
        import spconv.pytorch as spconv_pt
    except ImportError as exc:  # optional dependency (the `sparse` extra)
        raise SparseError("sparse convolution needs spconv: install the engine with the `sparse` extra") from exc
    return spconv_pt


def _linear_key(coords: torch.Tensor, resolution: int) -> torch.Tensor:
    """One int64 per voxel, unique per (batch, x, y, z)."""
    c = coords.long()
    return ((c[:, 0] * resolution + c[:, 1]) * resolution + c[:, 2]) * resolution + c[:, 3]


# -- partitions ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bucket:
    """Groups of similar length padded into one batch: `index` [G,L] rows into the tensor, `mask` [G,L] (None = full).

    Padding entries repeat the group's last voxel, so gathers stay in range; the mask hides them as keys.
    """

    index: torch.Tensor
    mask: torch.Tensor | None


@dataclass(frozen=True)
class Partition:
    """Voxels split into attention groups: `buckets` of padded groups, `inverse` maps concatenated outputs back to rows.

    `group_batch` is the batch index of every group, in bucket order (for checks and debugging).
    """

    buckets: tuple[Bucket, ...]
    inverse: torch.Tensor
    group_batch: torch.Tensor

    def groups(self) -> list[torch.Tensor]:
        """Every group's row indices (without padding), bucket by bucket."""
        out = []
        for bucket in self.buckets:
            for g in range(bucket.index.shape[0]):
                row = bucket.index[g]
                out.append(row if bucket.mask is None else row[bucket.mask[g]])
        return out


def _partition_by_key(key: torch.Tensor, batch: torch.Tensor) -> Partition:
    """Group rows with equal `key`; groups are bucketed by length in powers of two to limit padding."""
    n = key.shape[0]
    device = key.device
    order = torch.argsort(key, stable=True)
    _, counts = torch.unique_consecutive(key[order], return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    group_batch_all = batch[order[starts]].long()
    max_len = int(counts.max()) if n > 0 else 0
    bounds = torch.tensor([1 << i for i in range(max(max_len - 1, 1).bit_length() + 1)], device=device)
    bucket_of = torch.bucketize(counts, bounds)  # counts in (2^(i-1), 2^i] -> i
    buckets, valid_rows, group_batch = [], [], []
    for b in torch.unique(bucket_of).tolist():
        sel = (bucket_of == b).nonzero().squeeze(1)
        lens = counts[sel]
        length = int(lens.max())
        pos = torch.arange(length, device=device)
        mask = pos.unsqueeze(0) < lens.unsqueeze(1)
        index = order[starts[sel].unsqueeze(1) + torch.minimum(pos.unsqueeze(0), lens.unsqueeze(1) - 1)]
        valid_rows.append(index[mask])
        buckets.append(Bucket(index=index, mask=None if bool(mask.all()) else mask))
        group_batch.append(group_batch_all[sel])
    perm = torch.cat(valid_rows) if valid_rows else torch.zeros(0, dtype=torch.long, device=device)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(n, device=device)
    gb = torch.cat(group_batch) if group_batch else torch.zeros(0, dtype=torch.long, device=device)
    return Partition(buckets=tuple(buckets), inverse=inverse, group_batch=gb)


def window_partition(tensor: SparseTensor, window: int, shift: int = 0) -> Partition:
    """Swin groups: voxels sharing batch and cell `(xyz + shift) // window` (TRELLIS convention), cached."""
    if window <= 0:
        raise SparseError(f"window size must be positive, got {window}")
    if shift < 0:
        raise SparseError(f"window shift must be >= 0, got {shift}")

    def build() -> Partition:
        cells = (tensor.coords[:, 1:].long() + shift) // window
        per_axis = (tensor.resolution - 1 + shift) // window + 1
        b = tensor.coords[:, 0].long()
        key = ((b * per_axis + cells[:, 0]) * per_axis + cells[:, 1]) * per_axis + cells[:, 2]
        return _partition_by_key(key, b)

    return tensor.cached(("window", int(window), int(shift)), build)


# -- attention -----------------------------------------------------------------------------------------------------


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tensor: SparseTensor) -> None:
    n = len(tensor)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.ndim != 3 or t.shape[0] != n:
            raise SparseError(f"attention {name} must have shape [N={n}, heads, dim], got {tuple(t.shape)}")
    if q.shape[:2] != k.shape[:2] or k.shape[:2] != v.shape[:2] or q.shape[2] != k.shape[2]:
        raise SparseError(
            f"attention q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} disagree on heads or dims"
        )


def _bucket_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bucket: Bucket) -> torch.Tensor:
    """SDPA over one bucket's padded groups; returns the valid rows' outputs in row-major (group, position) order."""
    groups, length = bucket.index.shape
    heads = q.shape[1]
    step = max(1, _MAX_SCORE_ELEMENTS // max(1, heads * length * length))
    outs = []
    for g0 in range(0, groups, step):
        idx = bucket.index[g0 : g0 + step]
        qb, kb, vb = (t[idx].transpose(1, 2) for t in (q, k, v))  # [G, H, L, D]
        mask = None if bucket.mask is None else bucket.mask[g0 : g0 + step]
        attn_mask = None if mask is None else mask[:, None, None, :]
        out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=attn_mask).transpose(1, 2)  # [G, L, H, Dv]
        outs.append(out.reshape(-1, heads, out.shape[-1]) if mask is None else out[mask])
    return torch.cat(outs)


def windowed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tensor: SparseTensor, window: int, shift: int = 0
) -> torch.Tensor:
    """Swin self-attention: q,k,v [N, heads, dim] -> [N, heads, dim_v], attending within (batch, window cell) only.

    A voxel's cell is `(xyz + shift) // window` on each axis (shift added before the floor division, as TRELLIS's
    `calc_window_partition` does); TRELLIS decoders use window 8, shift 0 on even blocks and window // 2 on odd ones.
    Scale is SDPA's default 1/sqrt(dim).
    """
    _check_qkv(q, k, v, tensor)
    if len(tensor) == 0:
        return v.new_zeros(v.shape)
    part = window_partition(tensor, window, shift)
    out = torch.cat([_bucket_attention(q, k, v, bucket) for bucket in part.buckets])
    return out[part.inverse]


def sparse_self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tensor: SparseTensor) -> torch.Tensor:
    """Full self-attention within each batch element: q,k,v [N, heads, dim] -> [N, heads, dim_v].

    Equal-size batch elements go through one batched SDPA call; otherwise each element gets its own call, which needs
    no padding mask (so no padded score rows, and fast kernels stay available) and batch sizes are small.
    """
    _check_qkv(q, k, v, tensor)
    sizes = [s.stop - s.start for s in tensor.layout]
    if len(tensor) == 0:
        return v.new_zeros(v.shape)
    if len(set(sizes)) == 1:
        b, n = len(sizes), sizes[0]
        qb, kb, vb = (t.reshape(b, n, *t.shape[1:]).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(qb, kb, vb).transpose(1, 2)
        return out.reshape(b * n, *out.shape[2:])
    outs = []
    for s in tensor.layout:
        if s.stop == s.start:
            continue
        qb, kb, vb = (t[s].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        outs.append(F.scaled_dot_product_attention(qb, kb, vb)[0].transpose(0, 1))
    return torch.cat(outs)


__all__ = [
    "Bucket",
    "Partition",
    "SparseError",
    "SparseTensor",
    "sparse_self_attention",
    "window_partition",
    "windowed_attention",
]
