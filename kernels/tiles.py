"""Tile maps: which key tiles each query tile must visit, for grid patterns (`Neighborhood`, `Halo`).

A grid pattern is separable: query q sees key k iff, on every axis a, `lo_a[q_a] <= k_a <= hi_a[q_a]` and
`(k_a - lo_a[q_a]) % dilation_a == 0` (`pattern.axis_windows()`). The Triton path permutes tokens so that each
block of `BLOCK_M` queries (`BLOCK_N` keys) is an N-d tile of the grid (`GridLayout`; grids that the tile does
not divide are zero-padded per axis), then visits for each query tile only the key tiles that intersect its
queries' windows. Because the mask is an outer AND over axes, a tile pair is empty iff one axis is empty and
full iff every axis is full; per-axis statuses are computed analytically from the windows (no N x N mask), and
the result is cached per (pattern, tile shapes, device).

Padding: padded keys get coordinate `-BIG` (never visible) and padded queries an empty window; a key tile that
holds padding is never "full", so padding only ever meets the element mask.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .patterns import tensor_cache

__all__ = ["GridLayout", "TileMap", "grid_tile_map", "axis_tile_status", "tile_shape_candidates",
           "choose_tile_shapes", "slot_tile_candidates", "tile_work", "pair_cost", "choose_tile_shapes_pair"]

BIG = 1 << 30
EMPTY, PARTIAL, FULL = 0, 1, 2


@dataclass(frozen=True)
class GridLayout:
    """Row-major grid `grid` cut into tiles of shape `tile` (zero-padded up to a multiple of it per axis).

    Token order after `permute`: tile after tile (tiles in row-major order over the tile grid), and inside a
    tile row-major over the tile's own axes.
    """

    grid: Tuple[int, ...]
    tile: Tuple[int, ...]
    slot: int = 0  # positions per tile in the permuted order (>= the tile's token count; 0: exactly that)

    def __post_init__(self):
        if self.slot and self.slot < math.prod(self.tile):
            raise ValueError(f"GridLayout.slot ({self.slot}) must hold the tile's {math.prod(self.tile)} tokens")

    @property
    def tiles(self) -> Tuple[int, ...]:
        return tuple(-(-g // t) for g, t in zip(self.grid, self.tile))

    @property
    def padded(self) -> Tuple[int, ...]:
        return tuple(n * t for n, t in zip(self.tiles, self.tile))

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def num_padded(self) -> int:
        """Positions in the permuted order: tiles x slot size (grid padding and dead slots included)."""
        return math.prod(self.tiles) * self.slot_size

    @property
    def tile_size(self) -> int:
        return math.prod(self.tile)

    @property
    def slot_size(self) -> int:
        """Positions one tile occupies (a block of the kernel): the tile's tokens, then dead slots."""
        return self.slot or self.tile_size

    @property
    def is_identity(self) -> bool:
        """True when permuting changes nothing: no padding, and every axis after the first one with a tile
        longer than 1 is spanned whole by the tile."""
        if self.padded != self.grid or self.slot_size != self.tile_size:
            return False
        split = [a for a, t in enumerate(self.tile) if t != 1]
        return not split or all(self.tile[a] == self.grid[a] for a in range(split[0] + 1, len(self.grid)))

    def permute(self, x: torch.Tensor) -> torch.Tensor:
        """`(B, H, N, C)` row-major tokens -> `(B, H, N_padded, C)` tile-major tokens (contiguous)."""
        if self.is_identity:
            return x
        B, H, _, C = x.shape
        n = len(self.grid)
        x = x.reshape(B, H, *self.grid, C)
        if self.padded != self.grid:
            pad = [0, 0]
            for g, p in zip(reversed(self.grid), reversed(self.padded)):
                pad += [0, p - g]
            x = F.pad(x, pad)
        split = [B, H]
        for T, t in zip(self.tiles, self.tile):
            split += [T, t]
        x = x.reshape(*split, C)
        order = [0, 1] + [2 + 2 * a for a in range(n)] + [3 + 2 * a for a in range(n)] + [2 + 2 * n]
        x = x.permute(*order)
        if self.slot_size != self.tile_size:  # dead slots (zeros) after each tile's tokens
            x = F.pad(x.reshape(B, H, -1, self.tile_size, C), (0, 0, 0, self.slot_size - self.tile_size))
        return x.reshape(B, H, self.num_padded, C)

    def unpermute(self, y: torch.Tensor) -> torch.Tensor:
        """Inverse of `permute`: `(B, H, N_padded, C)` -> `(B, H, N, C)` (padding dropped)."""
        if self.is_identity:
            return y
        B, H, _, C = y.shape
        n = len(self.grid)
        if self.slot_size != self.tile_size:
            y = y.reshape(B, H, -1, self.slot_size, C)[:, :, :, :self.tile_size]
        y = y.reshape(B, H, *self.tiles, *self.tile, C)
        order = [0, 1]
        for a in range(n):
            order += [2 + a, 2 + n + a]
        y = y.permute(*order + [2 + 2 * n]).reshape(B, H, *self.padded, C)
        if self.padded != self.grid:
            y = y[(slice(None), slice(None)) + tuple(slice(0, g) for g in self.grid)]
        return y.reshape(B, H, self.num_tokens, C)

    def coords(self) -> np.ndarray:
        """`(n_axes, N_padded)` int64 grid coordinates of each permuted position; -BIG on padding and dead
        slots."""
        pos = np.arange(self.num_padded)
        within = pos % self.slot_size
        dead = within >= self.tile_size
        tile_idx = np.unravel_index(pos // self.slot_size, self.tiles)
        offset = np.unravel_index(np.minimum(within, self.tile_size - 1), self.tile)
        coords = np.stack([ti * t + o for ti, o, t in zip(tile_idx, offset, self.tile)]).astype(np.int64)
        coords[:, np.any(coords >= np.asarray(self.grid)[:, None], axis=0) | dead] = -BIG
        return coords

    def rows(self) -> np.ndarray:
        """`(N_padded,)` int64 row-major token index of each permuted position; -1 on padding and dead slots:
        what `permute` gathers, for kernels that read the unpermuted tensor through it."""
        coords = self.coords()
        valid = np.all(coords >= 0, axis=0)
        out = np.full(coords.shape[1], -1, dtype=np.int64)
        out[valid] = np.ravel_multi_index(tuple(coords[:, valid]), self.grid)
        return out


def axis_tile_status(lo: np.ndarray, hi: np.ndarray, dilation: int, q_tile: int, k_len: int,
                     k_tile: int, real_full: bool = False) -> np.ndarray:
    """`(num_q_tiles, num_k_tiles)` EMPTY/PARTIAL/FULL along one axis.

    `lo`, `hi`: per query coordinate window bounds (see the module docstring). A pair is FULL when every real
    query of the query tile sees every key of the key tile and the key tile holds no padding; with `real_full`
    padding does not count (FULL when every real query sees every real key: the kernels then mask padded keys
    by a per-key additive -inf instead, see `grid_tile_map(pair_mask=True)`).
    """
    lq = len(lo)
    nqt, nkt = -(-lq // q_tile), -(-k_len // k_tile)
    k0 = np.arange(nkt) * k_tile
    k1 = np.minimum(k0 + k_tile, k_len) - 1
    lo_, hi_ = lo[:, None], hi[:, None]
    a, b = np.maximum(lo_, k0[None, :]), np.minimum(hi_, k1[None, :])
    first = lo_ + (-((lo_ - a) // dilation)) * dilation  # first key >= a on the query's dilation lattice
    count = np.where(first <= b, (b - first) // dilation + 1, 0)  # (lq, nkt) visible keys per query
    pad_q = nqt * q_tile - lq
    if pad_q:  # padded queries: neither make a tile non-empty nor stop it being full
        count = np.concatenate([count, np.full((pad_q, nkt), -1)], axis=0)
    count = count.reshape(nqt, q_tile, nkt)
    real = count >= 0
    nonempty = np.any(count > 0, axis=1)
    need = (k1 - k0 + 1) if real_full else np.full(nkt, k_tile)
    full = np.all(~real | (count == need[None, None, :]), axis=1)
    return np.where(full & nonempty, FULL, np.where(nonempty, PARTIAL, EMPTY)).astype(np.int8)


def _csr(status: np.ndarray, value: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    rows, cols = np.nonzero(status == value)
    ptr = np.zeros(status.shape[0] + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=status.shape[0]), out=ptr[1:])
    return (torch.from_numpy(ptr.astype(np.int32)).to(device), torch.from_numpy(cols.astype(np.int32)).to(device))


@dataclass
class TileMap:
    """Everything the grid-pattern kernels need for one (pattern, query tile, key tile) on one device.

    Two mask modes. Default (`pair_mask=False`): a pair is FULL only when its key tile holds no padding, and
    every partial pair tests the axes in `mask_axes` (the same for all pairs). Pair mode (`pair_mask=True`):
    padding and dead slots are masked by `kbias` (0 or -inf per key position, one add per partial pair), and
    each partial pair carries its own bits (`fwd_bits`/`bwd_bits`, aligned with the partial index lists):
    bit a (a < 3) = axis a partial for this pair, bit 3 = the key tile holds padding; the kernels test only
    those axes. `mask_axes` is then the OR of all pairs' bits (a compile-time bound).
    """

    q_layout: GridLayout
    k_layout: GridLayout
    dilation: Tuple[int, ...]
    qlo: torch.Tensor  # (n_axes, Nq_padded) int32 window start per permuted query position
    qhi: torch.Tensor  # (n_axes, Nq_padded) int32 window end (inclusive)
    kc: torch.Tensor  # (n_axes, Nk_padded) int32 coordinate per permuted key position
    fwd: Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # full_ptr, full_idx, part_ptr, part_idx
    bwd: Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # same, per key tile (query tiles)
    pairs_full: int
    pairs_partial: int
    mask_axes: int  # bitmask of the axes that can be partial (the only ones the element mask must test)
    pair_mask: bool = False
    fwd_bits: Optional[torch.Tensor] = None  # (n_partial,) int32 per-pair bits, order of fwd's part_idx
    bwd_bits: Optional[torch.Tensor] = None  # same, order of bwd's part_idx
    kbias: Optional[torch.Tensor] = None  # (Nk_padded,) float32: 0 on real keys, -inf on padding/dead slots
    partial_axes_hist: Tuple[int, ...] = ()  # partial pairs by number of masked axes (pair mode)
    q_rows: Optional[torch.Tensor] = None  # (Nq_padded,) int32 token per permuted query position, -1 on padding
    k_rows: Optional[torch.Tensor] = None  # (Nk_padded,) int32 token per permuted key position, -1 on padding

    @property
    def computed_fraction(self) -> float:
        """Fraction of the padded (Nq x Nk) score matrix that the kernels compute."""
        total = (self.q_layout.num_padded // self.q_layout.slot_size) * \
            (self.k_layout.num_padded // self.k_layout.slot_size)
        return (self.pairs_full + self.pairs_partial) / total

    @property
    def work_fraction(self) -> float:
        """Score entries computed (pairs x block x block) over the unpadded Nq x Nk: the cost-model number that
        compares tile shapes, padding and dead slots included."""
        return (self.pairs_full + self.pairs_partial) * self.q_layout.slot_size * self.k_layout.slot_size / \
            (self.q_layout.num_tokens * self.k_layout.num_tokens)


def _pattern_windows(pattern):
    wins = pattern.axis_windows()
    q_grid = tuple(pattern.grid)
    k_grid = tuple(getattr(pattern, "key_grid", pattern.grid))
    return wins, q_grid, k_grid


def _outer(arrs, op):
    out = arrs[0]
    for s in arrs[1:]:
        out = op(out[:, None, :, None], s[None, :, None, :]).reshape(out.shape[0] * s.shape[0],
                                                                     out.shape[1] * s.shape[1])
    return out


def _short_tiles(k_len: int, k_tile: int) -> np.ndarray:
    """Per key tile along one axis: True when it holds padding (the axis is not a multiple of the tile)."""
    nkt = -(-k_len // k_tile)
    k0 = np.arange(nkt) * k_tile
    return np.minimum(k0 + k_tile, k_len) - k0 < k_tile


@tensor_cache(maxsize=64)
def grid_tile_map(pattern, q_tile: Tuple[int, ...], k_tile: Tuple[int, ...], device: str = "cpu",
                  q_slot: int = 0, k_slot: int = 0, pair_mask: bool = False) -> TileMap:
    """Build (and cache) the tile map of a grid pattern for the given tile shapes on `device`.

    `q_slot`/`k_slot`: kernel block sizes when a tile holds fewer tokens (tiles that are not a power of two, e.g.
    7 or 21 frames; the rest of the block is dead slots). `pair_mask`: per-pair mask bits and a key bias (see
    `TileMap`)."""
    wins, q_grid, k_grid = _pattern_windows(pattern)
    statuses = [axis_tile_status(lo.numpy(), hi.numpy(), d, qt, kl, kt, real_full=pair_mask)
                for (lo, hi, d), qt, kl, kt in zip(wins, q_tile, k_grid, k_tile)]
    # outer min over axes: EMPTY if any axis is empty, FULL if all are full
    status = _outer(statuses, np.minimum)
    q_layout, k_layout = GridLayout(q_grid, tuple(q_tile), q_slot), GridLayout(k_grid, tuple(k_tile), k_slot)
    if not pair_mask and k_layout.slot_size != k_layout.tile_size:
        status = np.minimum(status, PARTIAL)  # dead key slots need the element mask
    qc = q_layout.coords()
    qlo = np.full(qc.shape, BIG, dtype=np.int64)
    qhi = np.full(qc.shape, -BIG, dtype=np.int64)
    for a, (lo, hi, _) in enumerate(wins):
        valid = qc[a] >= 0
        qlo[a, valid] = lo.numpy()[qc[a, valid]]
        qhi[a, valid] = hi.numpy()[qc[a, valid]]
    padded_q = np.any(qc < 0, axis=0)
    qlo[:, padded_q], qhi[:, padded_q] = BIG, -BIG
    kc = k_layout.coords()

    def t32(x):
        return torch.from_numpy(np.ascontiguousarray(x.astype(np.int32))).to(device)

    extra = {}
    if pair_mask:
        bits = _outer([(s == PARTIAL).astype(np.int32) << a for a, s in enumerate(statuses)], np.bitwise_or)
        short = _outer([_short_tiles(kl, kt)[None, :] for kl, kt in zip(k_grid, k_tile)], np.logical_or)[0]
        short |= k_layout.slot_size != k_layout.tile_size
        bits = bits | (short.astype(np.int32) << 3)[None, :]
        nonempty = status != EMPTY
        status = np.where(nonempty, np.where(bits == 0, FULL, PARTIAL), EMPTY).astype(np.int8)
        part = status == PARTIAL
        mask_axes = int(np.bitwise_or.reduce(bits[part])) if part.any() else 0
        r, c = np.nonzero(part)
        rt, ct = np.nonzero(part.T)
        naxes = np.zeros(bits.shape, dtype=np.int64)
        for a in range(len(q_grid)):
            naxes += (bits >> a) & 1
        extra = dict(pair_mask=True, fwd_bits=t32(bits[r, c]), bwd_bits=t32(bits.T[rt, ct]),
                     kbias=torch.from_numpy(np.where(np.any(kc < 0, axis=0), -np.inf, 0.0).astype(np.float32)).to(
                         device),
                     partial_axes_hist=tuple(int(((naxes == i) & part).sum()) for i in range(len(q_grid) + 1)))
    else:
        mask_axes = sum(1 << a for a, s in enumerate(statuses) if np.any(s == PARTIAL))
        if k_layout.num_padded != k_layout.num_tokens:  # padded keys only ever meet the element mask
            mask_axes = mask_axes or 1
    fwd = (*_csr(status, FULL, device), *_csr(status, PARTIAL, device))
    bwd = (*_csr(status.T, FULL, device), *_csr(status.T, PARTIAL, device))
    return TileMap(q_layout, k_layout, tuple(d for _, _, d in wins), t32(qlo), t32(qhi), t32(kc), fwd, bwd,
                   int((status == FULL).sum()), int((status == PARTIAL).sum()), mask_axes,
                   q_rows=t32(q_layout.rows()), k_rows=t32(k_layout.rows()), **extra)


def _pow2_splits(total: int, n: int) -> List[Tuple[int, ...]]:
    if n == 1:
        return [(total,)]
    out = []
    t = 1
    while t <= total:
        out += [(t,) + rest for rest in _pow2_splits(total // t, n - 1)]
        t *= 2
    return out


def tile_shape_candidates(grid: Tuple[int, ...], size: int) -> List[Tuple[int, ...]]:
    """N-d power-of-two tile shapes of `size` tokens that fit the grid's padded extent."""
    caps = [1 << max(0, (g - 1).bit_length()) for g in grid]
    fits = [s for s in _pow2_splits(size, len(grid)) if all(t <= c for t, c in zip(s, caps))]
    if fits:
        return fits
    # the whole grid holds fewer tokens than one tile: every axis at its cap, the first axis padded further
    return [(size // math.prod(caps[1:]),) + tuple(caps[1:])] if size >= math.prod(caps[1:]) else \
        [s for s in _pow2_splits(size, len(grid)) if all(t >= c for t, c in zip(s[1:], caps[1:]))][:1]


@lru_cache(maxsize=256)
def choose_tile_shapes(pattern, block_m: int, block_n: int, partial_cost: float = 1.25):
    """Tile shapes (query, key) minimising the work the kernel does: pairs visited, partial pairs weighted by
    `partial_cost` (the element mask). Per-axis statuses multiply, so each candidate costs microseconds."""
    wins, q_grid, k_grid = _pattern_windows(pattern)
    best = None
    for qt in tile_shape_candidates(q_grid, block_m):
        for kt in tile_shape_candidates(k_grid, block_n):
            nonempty, full = 1, 1
            for (lo, hi, d), a_qt, kl, a_kt in zip(wins, qt, k_grid, kt):
                s = _axis_status_cached(lo.numpy().tobytes(), hi.numpy().tobytes(), d, a_qt, kl, a_kt)
                nonempty *= int((s != EMPTY).sum())
                full *= int((s == FULL).sum())
            cost = full + partial_cost * (nonempty - full)
            if best is None or cost < best[0]:
                best = (cost, qt, kt)
    return best[1], best[2]


@lru_cache(maxsize=4096)
def _axis_status_cached(lo_bytes, hi_bytes, d, q_tile, k_len, k_tile, real_full=False):
    lo, hi = np.frombuffer(lo_bytes, dtype=np.int64), np.frombuffer(hi_bytes, dtype=np.int64)
    return axis_tile_status(lo, hi, d, q_tile, k_len, k_tile, real_full)


# ----------------------------------------------------------------------------------------------------------
# pair-mode cost model: per-pair mask bits, key bias for padding, tiles that need not be powers of two


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@lru_cache(maxsize=256)
def slot_tile_candidates(grid: Tuple[int, ...], slot: int, min_fill: float = 0.75) -> List[Tuple[int, ...]]:
    """Tile shapes for a block of `slot` positions: the power-of-two shapes of `tile_shape_candidates`, plus shapes
    whose axes divide the grid (no padding: e.g. 21 = 3 x 7 frames) or are powers of two, holding between
    `min_fill * slot` and `slot` tokens (the rest of the block is dead slots, masked like padding)."""
    out = list(tile_shape_candidates(grid, slot))
    options = [sorted(set(_divisors(g)) | {1 << i for i in range(g.bit_length()) if (1 << i) <= g}) for g in grid]
    lo = math.ceil(min_fill * slot)

    def rec(a, prod, prefix):
        if a == len(grid):
            if lo <= prod <= slot:
                out.append(prefix)
            return
        for t in options[a]:
            if prod * t <= slot:
                rec(a + 1, prod * t, prefix + (t,))

    rec(0, 1, ())
    return list(dict.fromkeys(out))


@lru_cache(maxsize=8192)
def _axis_counts(lo_bytes, hi_bytes, d, q_tile, k_len, k_tile, real_full):
    """Per axis: (FULL pairs, PARTIAL pairs) over all key tiles and over key tiles without padding."""
    s = _axis_status_cached(lo_bytes, hi_bytes, d, q_tile, k_len, k_tile, real_full)
    complete = ~_short_tiles(k_len, k_tile)
    return (int((s == FULL).sum()), int((s == PARTIAL).sum()), int((s[:, complete] == FULL).sum()),
            int((s[:, complete] == PARTIAL).sum()))


def tile_work(pattern, q_tile: Tuple[int, ...], k_tile: Tuple[int, ...], q_slot: int = 0, k_slot: int = 0,
              pair_mask: bool = False) -> Dict[str, float]:
    """Analytic work of one tiling (no tile map built): visited pairs, full/partial pairs, partial pairs by
    number of masked axes (`by_axes[i]`, all visited pairs, pair mode), pairs that add the key bias (`kb_pairs`), and `work`: score
    entries computed (pairs x block x block) over the unpadded Nq x Nk (compare with `density`)."""
    wins, q_grid, k_grid = _pattern_windows(pattern)
    q_slot = q_slot or math.prod(q_tile)
    k_slot = k_slot or math.prod(k_tile)
    dead_k = k_slot != math.prod(k_tile)
    counts = [_axis_counts(lo.numpy().tobytes(), hi.numpy().tobytes(), d, qt, kl, kt, pair_mask)
              for (lo, hi, d), qt, kl, kt in zip(wins, q_tile, k_grid, k_tile)]
    n = len(counts)
    pairs = math.prod(f + p for f, p, _, _ in counts)
    by_axes = [0] * (n + 1)
    kb_pairs = 0
    clean_full = 0
    for subset in range(1 << n):
        sel = [(subset >> a) & 1 for a in range(n)]
        every = math.prod(c[1] if s else c[0] for c, s in zip(counts, sel))
        complete = 0 if dead_k else math.prod(c[3] if s else c[2] for c, s in zip(counts, sel))
        by_axes[sum(sel)] += every
        kb_pairs += every - complete
        if subset == 0:
            clean_full = complete
    if pair_mask:
        full = clean_full
    else:
        full = 0 if dead_k else by_axes[0]
        by_axes = [0] * (n + 1)
    nq, nk = math.prod(q_grid), math.prod(k_grid)
    return dict(pairs=pairs, full=full, partial=pairs - full, by_axes=tuple(by_axes), kb_pairs=kb_pairs,
                work=pairs * q_slot * k_slot / (nq * nk), density=pattern.density(nq, nk))


def pair_cost(w: Dict[str, float], axis_cost: float = 0.4, kb_cost: float = 0.13) -> float:
    """Cost of a pair-mode tiling in units of one unmasked tile pair: each masked axis of a partial pair adds
    `axis_cost` (compares + select per element), the key bias `kb_cost` (one add per element). Defaults from
    issue 3's H200 runs: a 3-axis partial pair cost ~2.2x a full one (kernels/NOTES.md), i.e. ~0.4 per axis."""
    return w["pairs"] + axis_cost * sum(i * c for i, c in enumerate(w["by_axes"])) + kb_cost * w["kb_pairs"]


@lru_cache(maxsize=256)
def choose_tile_shapes_pair(pattern, block_m: int, block_n: int, pow2_only: bool = False,
                            axis_cost: float = 0.4, kb_cost: float = 0.13):
    """Tile shapes (query, key) for the pair-mask kernels, minimising `pair_cost` over `slot_tile_candidates`
    (or the power-of-two shapes only). Returns (q_tile, k_tile)."""
    _, q_grid, k_grid = _pattern_windows(pattern)
    cands_q = tile_shape_candidates(q_grid, block_m) if pow2_only else slot_tile_candidates(q_grid, block_m)
    cands_k = tile_shape_candidates(k_grid, block_n) if pow2_only else slot_tile_candidates(k_grid, block_n)
    best = None
    for qt in cands_q:
        for kt in cands_k:
            cost = pair_cost(tile_work(pattern, qt, kt, block_m, block_n, True), axis_cost, kb_cost)
            if best is None or cost < best[0]:
                best = (cost, qt, kt)
    return best[1], best[2]
