"""Sparse voxel tensors and windowed / full sparse attention, checked against dense attention with explicit masks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from near_engine.errors import NearError
from near_engine.sparse import SparseError, SparseTensor, sparse_self_attention, window_partition, windowed_attention


def random_voxels(gen: torch.Generator, count: int, resolution: int) -> torch.Tensor:
    """`count` distinct random voxels (fewer if the grid is small), in random order."""
    flat = torch.randperm(resolution**3, generator=gen)[:count]
    return torch.stack([flat // resolution**2, (flat // resolution) % resolution, flat % resolution], dim=1)


def random_batch(seed: int, sizes: list[int], resolution: int, channels: int, dtype: torch.dtype) -> SparseTensor:
    gen = torch.Generator().manual_seed(seed)
    items = []
    for n in sizes:
        coords = random_voxels(gen, n, resolution)
        items.append((coords, torch.randn(coords.shape[0], channels, generator=gen, dtype=dtype)))
    return SparseTensor.from_list(items, resolution)


def window_mask(coords: torch.Tensor, window: int, shift: int) -> torch.Tensor:
    """Independent reference: voxel i may attend to j iff same batch and every axis falls in the same shifted cell."""
    c = coords.long()
    same_batch = c[:, None, 0] == c[None, :, 0]
    cell = torch.div(c[:, 1:] + shift, window, rounding_mode="floor")
    same_cell = (cell[:, None, :] == cell[None, :, :]).all(dim=-1)
    return same_batch & same_cell


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Plain softmax attention over all N voxels with a boolean [N,N] mask, written out without SDPA."""
    scores = torch.einsum("nhd,mhd->hnm", q, k) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~mask[None], float("-inf"))
    return torch.einsum("hnm,mhd->nhd", scores.softmax(dim=-1), v)


def qkv(n: int, heads: int, dim: int, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, heads, dim, generator=gen, dtype=dtype).requires_grad_() for _ in range(3)]


TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


# -- SparseTensor ----------------------------------------------------------------------------------------------------


def test_from_list_sorts_by_batch_and_builds_layout() -> None:
    t = random_batch(1, [5, 0, 7], 16, 3, torch.float32)
    assert t.batch_size == 3
    assert t.coords.dtype == torch.int32 and t.coords.shape == (12, 4)
    assert [(s.start, s.stop) for s in t.layout] == [(0, 5), (5, 5), (5, 12)]
    assert t.coords[:5, 0].eq(0).all() and t.coords[5:, 0].eq(2).all()
    r = t.replace(t.feats * 2)
    assert r.coords is t.coords and r.layout is t.layout and torch.equal(r.feats, t.feats * 2)
    assert window_partition(t, 8, 0) is window_partition(r, 8, 0)  # partitions are shared by replaced copies
    h = t.to(dtype=torch.float16)
    assert h.feats.dtype == torch.float16 and h.coords is t.coords


@pytest.mark.parametrize(
    "make",
    [
        lambda: SparseTensor(torch.zeros(3, 3, dtype=torch.int32), torch.zeros(3, 2), 8),  # coords not [N,4]
        lambda: SparseTensor(torch.zeros(3, 4, dtype=torch.int32), torch.zeros(2, 2), 8),  # row count mismatch
        lambda: SparseTensor(torch.tensor([[0, 8, 0, 0]]), torch.zeros(1, 2), 8),  # off the grid (too big)
        lambda: SparseTensor(torch.tensor([[0, 0, -1, 0]]), torch.zeros(1, 2), 8),  # off the grid (negative)
        lambda: SparseTensor(torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]]), torch.zeros(2, 2), 8),  # unsorted batches
        lambda: SparseTensor(torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]]), torch.zeros(2, 2), 8),  # duplicates
        lambda: SparseTensor(torch.zeros(1, 4), torch.zeros(1, 2), 8),  # float coords
        lambda: SparseTensor(torch.tensor([[2, 0, 0, 0]]), torch.zeros(1, 2), 8, batch_size=2),  # batch too small
        lambda: SparseTensor(torch.zeros(1, 4, dtype=torch.int32), torch.zeros(1, 2), 0),  # bad resolution
        lambda: SparseTensor.from_list([(torch.zeros(2, 3), torch.zeros(3, 2))], 8),  # item shape mismatch
        lambda: SparseTensor.from_list(  # feats channels differ between items
            [(torch.zeros(1, 3), torch.zeros(1, 2)), (torch.ones(1, 3), torch.zeros(1, 5))], 8
        ),
        lambda: SparseTensor.from_list([], 8),
        lambda: random_batch(0, [4], 8, 2, torch.float32).replace(torch.zeros(3, 2)),
    ],
)
def test_validation_raises_near_errors(make) -> None:
    with pytest.raises(SparseError) as info:
        make()
    assert isinstance(info.value, NearError) and str(info.value)


def test_attention_rejects_mismatched_qkv() -> None:
    t = random_batch(0, [6], 8, 2, torch.float32)
    q, k, v = qkv(6, 2, 4, torch.float32)
    with pytest.raises(SparseError):
        windowed_attention(q[:5], k, v, t, 8, 0)
    with pytest.raises(SparseError):
        sparse_self_attention(q, k[:, :1], v, t)
    with pytest.raises(SparseError):
        window_partition(t, 0, 0)


# -- partitions ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("resolution,shift", [(64, 0), (64, 4), (16, 4), (16, 0)])
def test_partition_covers_every_voxel_once_and_never_mixes_batches(resolution: int, shift: int) -> None:
    t = random_batch(resolution + shift, [300, 40, 1, 500], resolution, 2, torch.float32)
    part = window_partition(t, 8, shift)
    groups = part.groups()
    rows = torch.cat(groups)
    assert torch.equal(rows.sort().values, torch.arange(len(t)))  # each voxel exactly once
    reference = window_mask(t.coords, 8, shift)
    for g, rows_g in enumerate(groups):
        batches = t.coords[rows_g, 0]
        assert batches.eq(batches[0]).all() and int(batches[0]) == int(part.group_batch[g])
        # a group is exactly one equivalence class of the reference relation
        assert torch.equal(reference[rows_g[0]].nonzero().squeeze(1), rows_g.sort().values)
    for bucket in part.buckets:  # padding stays under a factor of two of the shortest group in the bucket
        lens = bucket.index.shape[1] if bucket.mask is None else bucket.mask.sum(1)
        assert torch.as_tensor(lens).min() * 2 >= bucket.index.shape[1]


def test_shift_moves_window_boundaries_as_trellis_does() -> None:
    # (xyz + shift) // window: with shift 4, x = 3 and x = 4 share cell 0 or 1?  3+4=7 -> 0, 4+4=8 -> 1; 11+4=15 -> 1.
    coords = torch.tensor([[3, 0, 0], [4, 0, 0], [11, 0, 0], [12, 0, 0]])
    t = SparseTensor.from_list([(coords, torch.zeros(4, 1))], 16)
    grouped = sorted(sorted(g.tolist()) for g in window_partition(t, 8, 4).groups())
    assert grouped == [[0], [1, 2], [3]]
    grouped = sorted(sorted(g.tolist()) for g in window_partition(t, 8, 0).groups())
    assert grouped == [[0, 1], [2, 3]]
    # Shift 4 cannot tell +shift from -shift (2 * 4 = 8); shift 2 can: (5+2)//8 = 0 but (6+2)//8 = 1.
    coords = torch.tensor([[5, 1, 1], [6, 1, 1], [13, 1, 1], [14, 1, 1]])
    t = SparseTensor.from_list([(coords, torch.zeros(4, 1))], 16)
    grouped = sorted(sorted(g.tolist()) for g in window_partition(t, 8, 2).groups())
    assert grouped == [[0], [1, 2], [3]]


# -- attention against dense masked attention ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("resolution,shift", [(64, 0), (64, 4), (16, 0), (16, 4), (16, 2)])
def test_windowed_attention_equals_dense_masked_attention(resolution: int, shift: int, dtype: torch.dtype) -> None:
    t = random_batch(7 + shift, [400, 90, 1, 250], resolution, 2, dtype)
    n = len(t)
    q, k, v = qkv(n, 3, 8, dtype, seed=resolution + shift)
    out = windowed_attention(q, k, v, t, 8, shift)
    expected = dense_attention(q, k, v, window_mask(t.coords, 8, shift))
    assert out.shape == (n, 3, 8) and out.dtype == dtype
    torch.testing.assert_close(out, expected, atol=TOL[dtype], rtol=0)

    weights = torch.randn(out.shape, dtype=dtype, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    expected_grads = torch.autograd.grad((expected * weights).sum(), (q, k, v))
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, atol=TOL[dtype] * 10, rtol=0)


def test_windowed_attention_differs_between_shifts() -> None:
    t = random_batch(3, [400], 32, 2, torch.float64)
    q, k, v = qkv(len(t), 2, 4, torch.float64)
    assert not torch.allclose(windowed_attention(q, k, v, t, 8, 0), windowed_attention(q, k, v, t, 8, 4))


def test_windowed_attention_value_dim_and_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    import near_engine.sparse as sparse

    monkeypatch.setattr(sparse, "_MAX_SCORE_ELEMENTS", 1)  # one group per SDPA call
    t = random_batch(5, [200, 60], 16, 2, torch.float64)
    q, k, _ = qkv(len(t), 2, 4, torch.float64)
    v = torch.randn(len(t), 2, 6, dtype=torch.float64)
    out = windowed_attention(q, k, v, t, 8, 4)
    torch.testing.assert_close(out, dense_attention(q, k, v, window_mask(t.coords, 8, 4)), atol=1e-10, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sizes", [[120, 7, 0, 300], [50, 50], [1]])
def test_full_self_attention_equals_dense_masked_attention(sizes: list[int], dtype: torch.dtype) -> None:
    t = random_batch(11, sizes, 16, 2, dtype)
    q, k, v = qkv(len(t), 2, 8, dtype, seed=1)
    out = sparse_self_attention(q, k, v, t)
    same_batch = t.coords[:, None, 0] == t.coords[None, :, 0]
    expected = dense_attention(q, k, v, same_batch)
    torch.testing.assert_close(out, expected, atol=TOL[dtype], rtol=0)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    expected_grads = torch.autograd.grad(expected.square().sum(), (q, k, v))
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, atol=TOL[dtype] * 10, rtol=0)


# -- spconv ------------------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Using a non-tuple sequence:UserWarning")  # inside spconv's dense()
def test_spconv_round_trip_and_submanifold_conv_matches_dense_conv() -> None:
    spconv = pytest.importorskip("spconv.pytorch")
    res = 8
    coords = torch.tensor([[4, 4, 4], [5, 4, 4], [4, 3, 4], [1, 1, 1]])
    single = torch.tensor([[4, 4, 4]])
    gen = torch.Generator().manual_seed(0)
    t = SparseTensor.from_list(
        [(coords, torch.randn(4, 2, generator=gen)), (single, torch.ones(1, 2))], res
    )
    sp = t.to_spconv()
    assert torch.equal(sp.indices, t.coords) and torch.equal(sp.features, t.feats)
    assert list(sp.spatial_shape) == [res] * 3 and sp.batch_size == 2
    dense = sp.dense()  # [B, C, X, Y, Z]
    assert torch.equal(dense[0, :, 5, 4, 4], t.feats[1]) and dense.abs().sum() > 0

    conv = spconv.SubMConv3d(2, 3, 3, bias=False, indice_key="t")
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen))
    assert tuple(conv.weight.shape) == (3, 3, 3, 3, 2)  # spconv 2.x KRSC layout [out, kx, ky, kz, in]
    with torch.no_grad():
        out = t.from_spconv(conv(sp))
        # A lone voxel sees only the kernel centre.
        torch.testing.assert_close(out.feats[4], conv.weight[:, 1, 1, 1, :] @ t.feats[4])
        # Every voxel equals a dense cross-correlation (PyTorch conv3d) of the dense grid, read at active sites.
        ref = F.conv3d(dense, conv.weight.permute(0, 4, 1, 2, 3), padding=1)
        c = t.coords.long()
        torch.testing.assert_close(out.feats, ref[c[:, 0], :, c[:, 1], c[:, 2], c[:, 3]], atol=1e-5, rtol=1e-5)
    assert out.coords is t.coords
