import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attention3d.layers.psa import PointwiseSpatialAttention, collect_logits, distribute_logits, offset_index

GRIDS = [(3, 4), (2, 3, 2)]


def _positions(grid):
    """Grid coordinates in C order: position k of a flattened (*G) tensor is _positions(G)[k]."""
    return list(itertools.product(*[range(g) for g in grid]))


def _offset_flat(grid, target, source):
    """Flat index, in the (2G - 1) over-complete map, of the offset (source - target) + (G - 1)."""
    rel = tuple(s - t + g - 1 for s, t, g in zip(source, target, grid))
    return int(np.ravel_multi_index(rel, [2 * g - 1 for g in grid]))


def _attention_loops(m, grid):
    """A_c[i, j] = M_i[(j - i) + c] and A_d[i, j] = M_j[(i - j) + c], entry by entry.

    m: (B, P, *G), the over-complete map M_i stored at the spatial position of i (as a conv outputs it)."""
    pos = _positions(grid)
    n = len(pos)
    a_c = m.new_empty(m.shape[0], n, n)
    a_d = m.new_empty(m.shape[0], n, n)
    for (i, pi), (j, pj) in itertools.product(enumerate(pos), repeat=2):
        a_c[:, i, j] = m[(slice(None), _offset_flat(grid, pi, pj), *pi)]  # predicted at the target i
        a_d[:, i, j] = m[(slice(None), _offset_flat(grid, pj, pi), *pj)]  # predicted at the source j
    return a_c, a_d


@pytest.mark.parametrize("grid", GRIDS)
def test_offset_index_maps_offsets_to_the_over_complete_map(grid):
    idx = offset_index(grid)
    pos = _positions(grid)
    assert idx.shape == (len(pos), len(pos)) and idx.dtype == torch.int64
    centre = int(np.ravel_multi_index([g - 1 for g in grid], [2 * g - 1 for g in grid]))
    assert torch.equal(idx.diagonal(), torch.full((len(pos),), centre))  # offset 0 (i == j) is the centre
    for (i, pi), (j, pj) in itertools.product(enumerate(pos), repeat=2):
        assert idx[i, j] == _offset_flat(grid, pi, pj)


@pytest.mark.parametrize("grid", GRIDS)
def test_gathered_logits_match_the_offset_definitions(grid):
    torch.manual_seed(0)
    p = int(np.prod([2 * g - 1 for g in grid]))
    m = torch.randn(2, p, *grid, dtype=torch.float64)  # (B, P, *G)
    a_c, a_d = _attention_loops(m, grid)
    rows = m.flatten(2).transpose(1, 2)  # (B, N, P)
    idx = offset_index(grid)
    torch.testing.assert_close(collect_logits(rows, idx), a_c, rtol=0, atol=0)
    torch.testing.assert_close(distribute_logits(rows, idx), a_d, rtol=0, atol=0)


@pytest.mark.parametrize("grid", GRIDS)
def test_collect_and_distribute_differ(grid):
    """Fed the same over-complete maps, distribute's logits are collect's transposed (both read M_j at
    offset i - j), yet the two differ, and so do their attention weights: softmax over the sources normalises
    a row of A_d but a column of A_c, so the distribute weights are not the collect weights transposed."""
    torch.manual_seed(0)
    p = int(np.prod([2 * g - 1 for g in grid]))
    rows = torch.randn(2, int(np.prod(grid)), p, dtype=torch.float64)
    idx = offset_index(grid)
    a_c, a_d = collect_logits(rows, idx), distribute_logits(rows, idx)
    torch.testing.assert_close(a_d, a_c.transpose(1, 2), rtol=0, atol=0)
    assert not torch.allclose(a_c, a_d)
    w_c, w_d = torch.softmax(a_c, -1), torch.softmax(a_d, -1)
    assert not torch.allclose(w_d, w_c.transpose(1, 2))
    assert not torch.allclose(w_d, w_c)
    torch.testing.assert_close(w_d.sum(-1), torch.ones_like(w_d.sum(-1)))


def _psa_reference(module, x):
    """The module, with its attention step written as explicit loops over (i, j)."""
    grid = module.grid
    feats = module.reduce(module.shrink(x))  # (B, d, *G)
    a_c, a_d = _attention_loops(module.collect(feats), grid)[0], _attention_loops(module.distribute(feats), grid)[1]
    pos = _positions(grid)
    outs = []
    for a in (a_c, a_d):
        w = torch.softmax(a, dim=-1)  # over the sources j
        out = torch.zeros_like(feats)
        for (i, pi), (j, pj) in itertools.product(enumerate(pos), repeat=2):
            out[(slice(None), slice(None), *pi)] += w[:, i, j, None] * feats[(slice(None), slice(None), *pj)]
        outs.append(out)
    psa = module.proj(torch.cat(outs, dim=1))
    mode = "bilinear" if x.ndim == 4 else "trilinear"
    psa = F.interpolate(psa, size=x.shape[2:], mode=mode, align_corners=False)
    return module.fuse(torch.cat([x, psa], dim=1))


@pytest.mark.parametrize(
    ("grid", "size"),
    [((3, 4), (3, 4)), ((3, 4), (7, 9)), ((2, 3, 2), (2, 3, 2)), ((2, 3, 2), (4, 2, 5))],
)
def test_matches_loop_transcription(grid, size):
    torch.manual_seed(0)
    module = PointwiseSpatialAttention(len(grid), 6, inter_channels=4, grid=grid).double()
    x = torch.randn(2, 6, *size, dtype=torch.float64)
    out = module(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, _psa_reference(module, x))


def test_shrink_pools_larger_axes_and_interpolates_smaller_ones():
    torch.manual_seed(0)
    module = PointwiseSpatialAttention(3, 4, grid=(2, 3, 4))
    x = torch.randn(1, 4, 2, 3, 4)
    assert torch.equal(module.shrink(x), x)
    larger = torch.randn(1, 4, 4, 6, 8)  # exactly twice the grid: adaptive pooling is the mean of 2x2x2 blocks
    blocks = larger.reshape(1, 4, 2, 2, 3, 2, 4, 2).mean(dim=(3, 5, 7))
    torch.testing.assert_close(module.shrink(larger), blocks)
    smaller = torch.randn(1, 4, 1, 2, 3)
    expected = F.interpolate(smaller, size=(2, 3, 4), mode="trilinear", align_corners=False)
    torch.testing.assert_close(module.shrink(smaller), expected)
    mixed = torch.randn(1, 4, 4, 2, 4)  # depth pooled 4 -> 2, height interpolated 2 -> 3, width kept
    expected = F.interpolate(mixed.reshape(1, 4, 2, 2, 2, 4).mean(3), size=(2, 3, 4), mode="trilinear")
    torch.testing.assert_close(module.shrink(mixed), expected)


@pytest.mark.parametrize(
    ("spatial_dims", "grid", "size"),
    [
        (2, 4, (9, 6)),  # larger than the grid
        (2, 4, (2, 3)),  # smaller
        (2, (3, 5), (7, 2)),  # mixed, non-square grid
        (3, (2, 3, 4), (5, 2, 7)),  # mixed, non-cubic
        (3, 3, (1, 2, 3)),  # smaller, with an axis of size 1
        (3, 2, (6, 6, 6)),
    ],
)
def test_output_shape_is_the_input_shape(spatial_dims, grid, size):
    torch.manual_seed(0)
    module = PointwiseSpatialAttention(spatial_dims, 5, grid=grid)
    x = torch.randn(2, 5, *size)
    assert module(x).shape == x.shape


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    module = PointwiseSpatialAttention(3, 6, grid=(2, 3, 2))
    x = torch.randn(2, 6, 5, 4, 3, requires_grad=True)
    module(x).sin().sum().backward()
    assert x.grad.abs().sum() > 0
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_offset_index_is_a_non_persistent_buffer():
    module = PointwiseSpatialAttention(3, 4, grid=(2, 3, 2))
    assert "offset_index" in dict(module.named_buffers())
    assert "offset_index" not in module.state_dict()
    assert module.double().offset_index.dtype == torch.int64
    assert module.collect[-1].out_channels == 3 * 5 * 3  # P = prod(2 G - 1)


@pytest.mark.parametrize("grid", [0, (4, 4), (4, 4, -1), 2.5])
def test_bad_grid_raises(grid):
    with pytest.raises(ValueError, match="grid"):
        PointwiseSpatialAttention(3, 4, grid=grid)
