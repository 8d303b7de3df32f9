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
from typing import List, Tuple

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["GridLayout", "TileMap", "grid_tile_map", "axis_tile_status", "tile_shape_candidates",
           "choose_tile_shapes"]

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
        return math.prod(self.padded)

    @property
    def tile_size(self) -> int:
        return math.prod(self.tile)

    @property
    def is_identity(self) -> bool:
        """True when permuting changes nothing: no padding, and every axis after the first one with a tile
        longer than 1 is spanned whole by the tile."""
        if self.padded != self.grid:
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
        return x.permute(*order).reshape(B, H, self.num_padded, C)

    def unpermute(self, y: torch.Tensor) -> torch.Tensor:
        """Inverse of `permute`: `(B, H, N_padded, C)` -> `(B, H, N, C)` (padding dropped)."""
        if self.is_identity:
            return y
        B, H, _, C = y.shape
        n = len(self.grid)
        y = y.reshape(B, H, *self.tiles, *self.tile, C)
        order = [0, 1]
        for a in range(n):
            order += [2 + a, 2 + n + a]
        y = y.permute(*order + [2 + 2 * n]).reshape(B, H, *self.padded, C)
        if self.padded != self.grid:
            y = y[(slice(None), slice(None)) + tuple(slice(0, g) for g in self.grid)]
        return y.reshape(B, H, self.num_tokens, C)

    def coords(self) -> np.ndarray:
        """`(n_axes, N_padded)` int64 grid coordinates of each permuted position; -BIG on padding."""
        pos = np.arange(self.num_padded)
        tile_idx = np.unravel_index(pos // self.tile_size, self.tiles)
        offset = np.unravel_index(pos % self.tile_size, self.tile)
        coords = np.stack([ti * t + o for ti, o, t in zip(tile_idx, offset, self.tile)]).astype(np.int64)
        coords[:, np.any(coords >= np.asarray(self.grid)[:, None], axis=0)] = -BIG
        return coords


def axis_tile_status(lo: np.ndarray, hi: np.ndarray, dilation: int, q_tile: int, k_len: int,
                     k_tile: int) -> np.ndarray:
    """`(num_q_tiles, num_k_tiles)` EMPTY/PARTIAL/FULL along one axis.

    `lo`, `hi`: per query coordinate window bounds (see the module docstring). A pair is FULL when every real
    query of the query tile sees every key of the key tile and the key tile holds no padding.
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
    full = np.all(~real | (count == k_tile), axis=1)
    return np.where(full & nonempty, FULL, np.where(nonempty, PARTIAL, EMPTY)).astype(np.int8)


def _csr(status: np.ndarray, value: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    rows, cols = np.nonzero(status == value)
    ptr = np.zeros(status.shape[0] + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=status.shape[0]), out=ptr[1:])
    return (torch.from_numpy(ptr.astype(np.int32)).to(device), torch.from_numpy(cols.astype(np.int32)).to(device))


@dataclass
class TileMap:
    """Everything the grid-pattern kernels need for one (pattern, query tile, key tile) on one device."""

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

    @property
    def computed_fraction(self) -> float:
        """Fraction of the padded (Nq x Nk) score matrix that the kernels compute."""
        total = (self.q_layout.num_padded // self.q_layout.tile_size) * \
            (self.k_layout.num_padded // self.k_layout.tile_size)
        return (self.pairs_full + self.pairs_partial) / total


def _pattern_windows(pattern):
    wins = pattern.axis_windows()
    q_grid = tuple(pattern.grid)
    k_grid = tuple(getattr(pattern, "key_grid", pattern.grid))
    return wins, q_grid, k_grid


@lru_cache(maxsize=64)
def grid_tile_map(pattern, q_tile: Tuple[int, ...], k_tile: Tuple[int, ...], device: str = "cpu") -> TileMap:
    """Build (and cache) the tile map of a grid pattern for the given tile shapes on `device`."""
    wins, q_grid, k_grid = _pattern_windows(pattern)
    n = len(q_grid)
    statuses = [axis_tile_status(lo.numpy(), hi.numpy(), d, qt, kl, kt)
                for (lo, hi, d), qt, kl, kt in zip(wins, q_tile, k_grid, k_tile)]
    # outer min over axes: EMPTY if any axis is empty, FULL if all are full
    status = statuses[0]
    for s in statuses[1:]:
        status = np.minimum(status[:, None, :, None], s[None, :, None, :]).reshape(
            status.shape[0] * s.shape[0], status.shape[1] * s.shape[1])
    q_layout, k_layout = GridLayout(q_grid, tuple(q_tile)), GridLayout(k_grid, tuple(k_tile))
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

    fwd = (*_csr(status, FULL, device), *_csr(status, PARTIAL, device))
    bwd = (*_csr(status.T, FULL, device), *_csr(status.T, PARTIAL, device))
    mask_axes = sum(1 << a for a, s in enumerate(statuses) if np.any(s == PARTIAL))
    return TileMap(q_layout, k_layout, tuple(d for _, _, d in wins), t32(qlo), t32(qhi), t32(kc), fwd, bwd,
                   int((status == FULL).sum()), int((status == PARTIAL).sum()), mask_axes)


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
def _axis_status_cached(lo_bytes, hi_bytes, d, q_tile, k_len, k_tile):
    lo, hi = np.frombuffer(lo_bytes, dtype=np.int64), np.frombuffer(hi_bytes, dtype=np.int64)
    return axis_tile_status(lo, hi, d, q_tile, k_len, k_tile)
