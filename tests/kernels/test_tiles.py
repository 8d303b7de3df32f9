"""Tile maps and token permutation against brute force on the boolean masks."""
import math

import numpy as np
import pytest
import torch

from kernels.patterns import Halo, Neighborhood
from kernels.tiles import (GridLayout, choose_tile_shapes, choose_tile_shapes_pair, grid_tile_map,
                           slot_tile_candidates, tile_work)

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
@pytest.mark.parametrize("slot", [0, 1], ids=["exact", "dead-slots"])
def test_layout_roundtrip_and_coords(grid, tile, slot):
    if slot:  # blocks of the next power of two above the tile (twice the tile when it is a power of two)
        size = math.prod(tile)
        slot = 1 << size.bit_length() if size & (size - 1) == 0 else 1 << (size - 1).bit_length()
    layout = GridLayout(grid, tile, slot)
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
    assert layout.num_padded == math.prod(layout.tiles) * layout.slot_size
    if slot:  # dead slots are the last positions of every block, and permute writes zeros there
        dead = (np.arange(layout.num_padded) % layout.slot_size) >= layout.tile_size
        assert np.all(coords[:, dead] < 0)
        assert torch.equal(y[:, :, torch.from_numpy(dead)], torch.zeros_like(y[:, :, torch.from_numpy(dead)]))


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


PAIR_CASES = [  # (pattern, q_tile, k_tile, q_slot, k_slot)
    (Neighborhood((13,), 5), (4,), (8,), 4, 8),
    (Neighborhood((7, 9), (3, 4), stride=(1, 2), dilation=(2, 1)), (2, 4), (4, 2), 8, 8),
    (Neighborhood((5, 6, 7), (3, 3, 5), inward=False), (2, 2, 4), (1, 4, 4), 16, 16),
    (Neighborhood((5, 6, 7), (5, 3, 5), causal_axes=(0,)), (5, 2, 3), (5, 1, 3), 32, 16),
    (Neighborhood((7, 6, 8), (7, 3, 3)), (7, 2, 2), (7, 1, 2), 32, 16),
    (Neighborhood((8, 16), (5, 9)), (4, 8), (2, 8), 32, 16),
    (Neighborhood((4, 6, 5), (4, 3, 2), dilation=(1, 1, 2)), (4, 2, 2), (2, 2, 4), 16, 16),
    (Halo((4, 6), block=2, halo=1), (2, 2), (2, 3), 4, 8),
]


def _permuted_mask(pattern, tm):
    nq, nk = math.prod(pattern.grid), math.prod(getattr(pattern, "key_grid", pattern.grid))
    m = pattern.mask(nq, nk).float()[None, None]
    return tm.q_layout.permute(tm.k_layout.permute(m.transpose(-1, -2)).transpose(-1, -2))[0, 0].bool()


@pytest.mark.parametrize("pattern,q_tile,k_tile,q_slot,k_slot", PAIR_CASES, ids=lambda c: str(c)[:40])
def test_pair_mask_map_matches_brute_force(pattern, q_tile, k_tile, q_slot, k_slot):
    """Pair mode: FULL iff every real query sees every key of the key tile (no padding, no dead slot); every
    partial pair's bits name the axes to test, and testing only those (plus the key bias when bit 3 is set)
    rebuilds the exact mask on real queries; axes not named are all-visible within the pair."""
    tm = grid_tile_map(pattern, q_tile, k_tile, "cpu", q_slot, k_slot, True)
    mp = _permuted_mask(pattern, tm)
    qc, kc = tm.q_layout.coords(), tm.k_layout.coords()
    q_valid, k_valid = np.all(qc >= 0, 0), np.all(kc >= 0, 0)
    assert torch.equal(torch.isinf(tm.kbias), torch.from_numpy(~k_valid))
    bm, bn = tm.q_layout.slot_size, tm.k_layout.slot_size
    fp, fi, pp, pi = [t.numpy() for t in tm.fwd]
    bfp, bfi, bpp, bpi = [t.numpy() for t in tm.bwd]
    fbits, bbits = tm.fwd_bits.numpy(), tm.bwd_bits.numpy()
    axis_vis = []
    for a, d in enumerate(tm.dilation):
        ck, lo, hi = tm.kc[a].long()[None], tm.qlo[a].long()[:, None], tm.qhi[a].long()[:, None]
        axis_vis.append((ck >= lo) & (ck <= hi) & ((ck - lo) % d == 0))
    seen = {"full": 0, "partial": 0, "kb-only": 0}
    or_bits = 0
    for i in range(mp.shape[0] // bm):
        rows = slice(i * bm, (i + 1) * bm)
        qv = torch.from_numpy(q_valid[rows])
        full = set(fi[fp[i]:fp[i + 1]])
        part = dict(zip(pi[pp[i]:pp[i + 1]], fbits[pp[i]:pp[i + 1]]))
        for j in range(mp.shape[1] // bn):
            cols = slice(j * bn, (j + 1) * bn)
            kv = torch.from_numpy(k_valid[cols])
            blk = mp[rows, cols][qv]
            if not blk.any():
                assert j not in full and j not in part, (i, j)
                continue
            if bool(blk[:, kv].all()) and bool(kv.all()):
                assert j in full and j not in part, (i, j)
                seen["full"] += 1
                continue
            assert j in part and j not in full, (i, j)
            bits = int(part[j])
            or_bits |= bits
            seen["partial"] += 1
            seen["kb-only"] += bits == 8
            assert bool(bits & 8) == (not bool(kv.all())), (i, j, bits)
            vis = torch.ones(bm, bn, dtype=torch.bool)
            for a in range(len(tm.dilation)):
                va = axis_vis[a][rows, cols]
                if bits >> a & 1:
                    vis &= va
                    assert not bool(va[qv][:, kv].all()), ("axis flagged but full", i, j, a)
                else:
                    assert bool(va[qv][:, kv].all()), ("axis not flagged but partial", i, j, a)
            if bits & 8:
                vis &= kv[None, :]
            assert torch.equal(vis[qv], mp[rows, cols][qv]), (i, j)
            # the transposed lists carry the same pair with the same bits
            tpart = dict(zip(bpi[bpp[j]:bpp[j + 1]], bbits[bpp[j]:bpp[j + 1]]))
            assert int(tpart[i]) == bits
    assert or_bits == tm.mask_axes
    assert seen["full"] == tm.pairs_full and seen["partial"] == tm.pairs_partial
    # the analytic work count agrees with the map
    w = tile_work(pattern, q_tile, k_tile, q_slot, k_slot, True)
    assert (w["full"], w["partial"]) == (tm.pairs_full, tm.pairs_partial)
    assert w["kb_pairs"] == sum(1 for b in fbits if b & 8)
    assert tuple(w["by_axes"])[1:] == tm.partial_axes_hist[1:]


@pytest.mark.parametrize("pattern,q_tile,k_tile", CASES, ids=lambda c: str(c)[:40])
def test_tile_work_matches_old_map(pattern, q_tile, k_tile):
    tm = grid_tile_map(pattern, q_tile, k_tile)
    w = tile_work(pattern, q_tile, k_tile)
    assert (w["full"], w["partial"]) == (tm.pairs_full, tm.pairs_partial)
    assert w["work"] == pytest.approx(tm.work_fraction)


def test_slot_candidates_fit_the_block():
    for grid, slot in [((21, 60, 104), 128), ((21, 60, 104), 64), ((7, 9), 16), ((128, 128), 64)]:
        cands = slot_tile_candidates(grid, slot)
        assert cands and len(set(cands)) == len(cands)
        for t in cands:
            size = math.prod(t)
            pow2 = size == slot
            assert size <= slot and (pow2 or size >= 0.75 * slot)
            assert all(g % a == 0 or (a & (a - 1)) == 0 for g, a in zip(grid, t))
    assert (21, 3, 2) in slot_tile_candidates((21, 60, 104), 128)


def test_benchmark_case_predictions():
    """The numbers kernels/NOTES.md records for the next GPU run (cost model, no GPU)."""
    p3 = Neighborhood((21, 60, 104), (21, 30, 52))
    old = tile_work(p3, (8, 4, 4), (8, 2, 4))
    assert old["work"] == pytest.approx(0.375, abs=1e-3) and old["partial"] == old["full"]
    qt, kt = choose_tile_shapes_pair(p3, 128, 64)
    assert qt[0] == 21 and kt[0] == 21  # whole time axis per tile: no padding, time never masked
    new = tile_work(p3, qt, kt, 128, 64, True)
    assert new["work"] < 0.28 and new["by_axes"][3] == 0
    p2 = Neighborhood((128, 128), (33, 33))
    qt2, kt2 = choose_tile_shapes_pair(p2, 128, 64, pow2_only=True)
    w2 = tile_work(p2, qt2, kt2, 128, 64, True)
    masked_axes_old = 2 * w2["partial"]
    masked_axes_new = sum(i * c for i, c in enumerate(w2["by_axes"]))
    assert masked_axes_new < 0.7 * masked_axes_old


@pytest.mark.parametrize("grid,tile,slot", [((5, 7), (2, 4), 10), ((21, 6, 5), (21, 3, 1), 64), ((9,), (4,), 0),
                                            ((4, 6), (4, 6), 0)])
def test_layout_rows_are_what_permute_gathers(grid, tile, slot):
    """`rows()` (the in-place kernels' slot -> token table) names, for every permuted position, the token that
    `permute` puts there, and -1 exactly where `permute` pads (grid padding, dead slots)."""
    layout = GridLayout(grid, tile, slot)
    n = math.prod(grid)
    tokens = torch.arange(1, n + 1, dtype=torch.float64).reshape(1, 1, n, 1)  # 0 marks padding after permute
    permuted = layout.permute(tokens)[0, 0, :, 0].numpy()
    rows = layout.rows()
    assert rows.shape == (layout.num_padded,)
    np.testing.assert_array_equal(np.where(rows >= 0, rows + 1, 0), permuted)
