"""Tile maps and token permutation against brute force on the boolean masks."""
import math

import numpy as np
import pytest
import torch

from kernels.patterns import Halo, Neighborhood
from kernels.tiles import GridLayout, choose_tile_shapes, grid_tile_map

CASES = [
    (Neighborhood((13,), 5), (4,), (8,)),
    (Neighborhood((7, 9), (3, 4), stride=(1, 2), dilation=(2, 1)), (2, 4), (4, 2)),
    (Neighborhood((5, 6, 7), (3, 3, 5), inward=False), (2, 2, 4), (1, 4, 4)),
    (Neighborhood((5, 6, 7), (5, 3, 5), causal_axes=(0,)), (2, 2, 4), (1, 4, 4)),
    (Neighborhood((4, 6, 5), (4, 3, 2), dilation=(1, 1, 2)), (4, 2, 2), (2, 2, 4)),
    (Halo((4, 6), block=2, halo=1), (2, 2), (2, 4)),
]


@pytest.mark.parametrize("grid,tile", [((5,), (4,)), ((6, 7), (2, 4)), ((3, 5, 6), (1, 2, 4)), ((4, 8), (2, 8)),
                                       ((3, 4, 5), (4, 4, 8))])
def test_layout_roundtrip_and_coords(grid, tile):
    layout = GridLayout(grid, tile)
    x = torch.randn(2, 3, layout.num_tokens, 5)
    y = layout.permute(x)
    assert y.shape == (2, 3, layout.num_padded, 5)
    assert torch.equal(layout.unpermute(y), x)
    coords = layout.coords()
    rowmajor = torch.tensor(np.indices(grid).reshape(len(grid), -1).T, dtype=torch.float32)
    permuted = layout.permute(rowmajor[None, None])[0, 0].numpy().T
    valid = coords[0] >= 0
    assert np.array_equal(permuted[:, valid], coords[:, valid])
    assert (~valid).sum() == layout.num_padded - layout.num_tokens


@pytest.mark.parametrize("pattern,q_tile,k_tile", CASES, ids=lambda c: str(c)[:40])
def test_tile_map_matches_mask(pattern, q_tile, k_tile):
    tm = grid_tile_map(pattern, q_tile, k_tile)
    nq, nk = math.prod(pattern.grid), math.prod(getattr(pattern, "key_grid", pattern.grid))
    m = pattern.mask(nq, nk).float()[None, None]
    mp = tm.q_layout.permute(tm.k_layout.permute(m.transpose(-1, -2)).transpose(-1, -2))[0, 0]
    q_valid = torch.from_numpy(np.all(tm.q_layout.coords() >= 0, 0))
    k_valid = torch.from_numpy(np.all(tm.k_layout.coords() >= 0, 0))
    bm, bn = tm.q_layout.tile_size, tm.k_layout.tile_size
    fp, fi, pp, pi = [t.numpy() for t in tm.fwd]
    bfp, bfi, bpp, bpi = [t.numpy() for t in tm.bwd]
    for i in range(mp.shape[0] // bm):
        full, part = set(fi[fp[i]:fp[i + 1]]), set(pi[pp[i]:pp[i + 1]])
        for j in range(mp.shape[1] // bn):
            blk = mp[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn][q_valid[i * bm:(i + 1) * bm]]
            if blk.sum() == 0:
                expect = "empty"
            elif bool((blk == 1).all()) and bool(k_valid[j * bn:(j + 1) * bn].all()):
                expect = "full"
            else:
                expect = "partial"
            got = "full" if j in full else "partial" if j in part else "empty"
            assert got == expect, (i, j)
            got_t = "full" if i in set(bfi[bfp[j]:bfp[j + 1]]) else "partial" if i in set(bpi[bpp[j]:bpp[j + 1]]) \
                else "empty"
            assert got_t == expect, ("transposed", i, j)
    # element mask rebuilt from the tables, on the axes the map says can be partial plus full-pair checks
    vis = torch.ones(mp.shape, dtype=torch.bool)
    for a, d in enumerate(tm.dilation):
        ck, lo, hi = tm.kc[a].long()[None], tm.qlo[a].long()[:, None], tm.qhi[a].long()[:, None]
        vis &= (ck >= lo) & (ck <= hi) & ((ck - lo) % d == 0)
    assert torch.equal(vis[q_valid], mp.bool()[q_valid])


def test_tile_choice_prefers_grid_tiles():
    # FreeSwim's 3-d case: 2-d/3-d tiles must visit far fewer pairs than runs of 128 row-major tokens
    p = Neighborhood((21, 60, 104), (21, 30, 52))
    qt, kt = choose_tile_shapes(p, 128, 64)
    assert math.prod(qt) == 128 and math.prod(kt) == 64
    tm_best = grid_tile_map(p, qt, kt)
    tm_rows = grid_tile_map(p, (1, 1, 128), (1, 1, 64))
    work = lambda tm: (tm.pairs_full + tm.pairs_partial) * 128 * 64  # noqa: E731
    assert work(tm_best) < 0.7 * work(tm_rows)
    # with no padding along time, the time axis (window = whole axis) is never partial: its mask is skipped
    assert grid_tile_map(p, (1, 8, 16), (1, 8, 8)).mask_axes == 0b110
    assert tm_best.mask_axes == 0b111  # (time padded to a multiple of 8: padded keys need the mask)
