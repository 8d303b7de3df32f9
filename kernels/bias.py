"""Factorized additive biases for `kernels.attention(..., bias=...)`.

A dense tensor bias is the general form; these objects describe biases that the kernels compute on the fly:

* `LowRankBias(q_factor, k_factor)`: `bias = U_q · U_kᵀ` (FlashBias, Wu et al., NeurIPS 2025, arXiv 2505.12044):
  the kernels add it as a second, rank-R dot product next to `q · kᵀ`, with gradients for both factors.
* `RelPosBias(pattern, tables, scale)`: HaloNet's factorized relative-position logits (Vaswani et al., CVPR 2021;
  timm's `HaloAttn` index), `logit(m, n) += scale · Σ_a q_m · tables[a][idx_a(m, n)]` with one `(2 w_a - 1, D)`
  table per grid axis, shared by the heads. Inside a window each key row/column has exactly one position, so the
  term is exactly rank `Σ_a w_a` on the visible pairs (per-axis query logits against one-hot key channels). On
  HaloNet's blocked layout (a 2-d single-block `Halo`: q = one qb x qb block, k = its win x win window) and on a
  2-d `Halo` grid the Triton backend computes the term inside its kernels (`q · R_aᵀ` per query block, shifted to
  the key classes in registers; `kernels.backends.triton_kernels`, `HAS_REL`, and on the blocked layout also the
  few-keys kernels of `kernels.backends.triton_skinny`); elsewhere (`Neighborhood` patterns), or with
  `ATTNZOO_RELPOS=lowrank`, it runs `kernel_factors` through the low-rank path and autograd carries the factors'
  gradients to q and the tables.

Each object has `materialize(q, k) -> (B|1, H|1, Nq, Nk)` (the reference path and the tests' oracle; computed
directly from the definition, not from the factors), `kernel_rank` and `kernel_factors(q, k)` (what the Triton
backend fuses), and `check(q, k, pattern)` (raises ValueError on a mismatch).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import torch

from .patterns import Dense, Halo, Neighborhood, tensor_cache

__all__ = ["LowRankBias", "RelPosBias"]


@dataclass(frozen=True, eq=False)
class LowRankBias:
    """Additive logits `q_factor @ k_factorᵀ` (FlashBias' low-rank form).

    Args:
        q_factor: `(B|1, H|1, Nq, R)`.
        k_factor: `(B|1, H|1, Nk, R)`; the same rank R (the Triton backend fuses R <= 64).
    """

    q_factor: torch.Tensor
    k_factor: torch.Tensor

    def __post_init__(self):
        for name in ("q_factor", "k_factor"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"LowRankBias.{name} must be a tensor, got {type(t).__name__}")
            if t.dim() != 4 or not t.is_floating_point():
                raise ValueError(f"LowRankBias.{name} must be a floating (B|1, H|1, N, R) tensor, got "
                                 f"{name}.shape={tuple(t.shape)} dtype={t.dtype}")
        if self.q_factor.shape[-1] != self.k_factor.shape[-1] or self.q_factor.shape[-1] < 1:
            raise ValueError(f"LowRankBias factors must share a rank R >= 1, got {self.q_factor.shape=} "
                             f"{self.k_factor.shape=}")

    @property
    def kernel_rank(self) -> int:
        return self.q_factor.shape[-1]

    def check(self, q, k, pattern=None) -> None:
        B, H, Nq = q.shape[:3]
        for name, t, n in (("q_factor", self.q_factor, Nq), ("k_factor", self.k_factor, k.shape[2])):
            if t.shape[0] not in (1, B) or t.shape[1] not in (1, H) or t.shape[2] != n:
                raise ValueError(f"LowRankBias.{name} must be (B|1, H|1, {n}, R) with B={B}, H={H}, got "
                                 f"{tuple(t.shape)}")
            if t.device != q.device:
                raise ValueError(f"LowRankBias.{name} must be on {q.device}, got {t.device}")

    def materialize(self, q, k) -> torch.Tensor:
        return torch.matmul(self.q_factor.to(q.dtype), self.k_factor.to(q.dtype).transpose(-1, -2))

    def kernel_factors(self, q, k):
        return self.q_factor, self.k_factor


def _axis_geometry(pattern):
    """Per axis: (window w, dilation d, off (Lq,), lo (Lq,)) with idx(c, j) = (j - off[c]) // d + w - 1 and
    the visible keys of query coordinate c at lo[c] + i d, i < w."""
    out = []
    if isinstance(pattern, Halo):
        w, qb = pattern.window, pattern.query_block
        for g in pattern.grid:
            c = torch.arange(g)
            start = (c // qb) * pattern.block
            out.append((w, 1, start + c % qb, start))
    else:
        for (lo, _, d), w in zip(pattern.axis_windows(), pattern.window):
            out.append((w, d, torch.arange(len(lo)), lo))
    return out


def _coords(grid) -> torch.Tensor:
    """(n_axes, prod(grid)) row-major coordinates."""
    return torch.stack(torch.unravel_index(torch.arange(math.prod(grid)), tuple(grid)))


@tensor_cache(maxsize=64)
def _factor_index(pattern, device: str):
    """Per axis: the (Nq, w) table index of each query's one-hot key class, and the (Nk,) key classes."""
    qc, kc = _coords(pattern.grid), _coords(getattr(pattern, "key_grid", pattern.grid))
    gathers, classes = [], []
    for a, (w, d, off, lo) in enumerate(_axis_geometry(pattern)):
        c = qc[a]
        cls = torch.arange(w)
        key = lo[c][:, None] + ((cls[None, :] - lo[c][:, None] // d) % w) * d  # the key of each class
        idx = (key - off[c][:, None]) // d + w - 1
        gathers.append(idx.clamp(0, 2 * w - 2).to(device))
        classes.append(((kc[a] // d) % w).to(device))
    return gathers, classes


@tensor_cache(maxsize=64)
def _dense_index(pattern, device: str):
    """Per axis: (Nq, Nk) table index from the definition, and where it lies inside the table."""
    qc, kc = _coords(pattern.grid), _coords(getattr(pattern, "key_grid", pattern.grid))
    out = []
    for a, (w, d, off, _) in enumerate(_axis_geometry(pattern)):
        diff = kc[a][None, :] - off[qc[a]][:, None]
        idx = torch.div(diff, d, rounding_mode="floor") + w - 1
        valid = (idx >= 0) & (idx <= 2 * w - 2) & (diff % d == 0)
        out.append((idx.clamp(0, 2 * w - 2).to(device), valid.to(device)))
    return out, pattern.mask(qc.shape[1], kc.shape[1]).to(device)


@dataclass(frozen=True, eq=False)
class RelPosBias:
    """HaloNet's factorized relative-position bias over a grid pattern.

    `logit(m, n) += scale · Σ_a q_m · tables[a][idx_a(m, n)]`, q unscaled (timm's `HaloAttn`; pass
    `scale=dim_head ** -0.5` for its `scale_pos_embed`). The index per axis a:

    * `Halo(grid, block, halo, query_stride)`: `idx = ky - qy + win - 1` (timm), qy the query's position in its
      query block, ky the key's position in the block's window, win = block + 2 halo;
    * `Neighborhood` (stride 1): `idx = (ky - qy) / dilation + w - 1` (the key's offset from the query).

    The bias is defined on the pairs the pattern makes visible (0 elsewhere). With a single-block `Halo` every
    pair is visible, so blocked-dense layouts (HaloNet's `(B * blocks, heads, qb², win²)`) can pass it with
    `pattern=None`.

    On the Triton path a 2-d `Halo` (blocked layout or grid) computes the bias inside the kernels. Under autograd
    the forward also keeps its per-query factor `(B, H, Nq, 2 · max(16, next_pow2(win)))` for the backward to load
    instead of rebuilding it (half of q's size at head dim 64 and windows up to 16).

    Args:
        pattern: the `Halo` or `Neighborhood` pattern that defines the geometry.
        tables: one `(2 w_a - 1, D)` tensor per grid axis (rows first), D = the query head dim.
        scale: multiplier of the logits.
    """

    pattern: object
    tables: Tuple[torch.Tensor, ...]
    scale: float = 1.0

    def __post_init__(self):
        p = self.pattern
        if not isinstance(p, (Halo, Neighborhood)):
            raise TypeError(f"RelPosBias.pattern must be a Halo or Neighborhood pattern, got {type(p).__name__}")
        if isinstance(p, Neighborhood) and any(s != 1 for s in p.stride):
            raise NotImplementedError(f"RelPosBias over a strided Neighborhood is not supported, got {p.stride=}")
        tables = tuple(self.tables)
        object.__setattr__(self, "tables", tables)
        windows = [w for w, _, _, _ in _axis_geometry(p)]
        if len(tables) != len(windows):
            raise ValueError(f"RelPosBias needs one table per grid axis ({len(windows)}), got {len(tables)}")
        for a, (t, w) in enumerate(zip(tables, windows)):
            if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[0] != 2 * w - 1:
                raise ValueError(f"RelPosBias.tables[{a}] must be a (2 * {w} - 1, D) tensor, got "
                                 f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")

    @property
    def kernel_rank(self) -> int:
        return sum(w for w, _, _, _ in _axis_geometry(self.pattern))

    def check(self, q, k, pattern=None) -> None:
        p = self.pattern
        p.check(q.shape[2], k.shape[2])
        if any(t.shape[1] != q.shape[-1] for t in self.tables):
            raise ValueError(f"RelPosBias tables must have the query head dim {q.shape[-1]}, got "
                             f"{[tuple(t.shape) for t in self.tables]}")
        pattern = Dense() if pattern is None else pattern
        # the pattern's own sizes (p.check matched them), plain ints under torch.compile's dynamic shapes too
        sizes = (math.prod(p.grid), math.prod(p.key_grid)) if isinstance(p, Halo) else (p.num_tokens,) * 2
        if pattern != p and not (isinstance(pattern, Dense) and p.density(*sizes) == 1.0):
            raise ValueError(f"RelPosBias is defined on its pattern's visible pairs: attention needs pattern="
                             f"{p} (or Dense when that pattern sees every pair), got {pattern}")

    def _logits(self, q):
        return [torch.matmul(q, t.to(q.dtype).transpose(0, 1)) for t in self.tables]  # (B, H, Nq, 2w - 1)

    def materialize(self, q, k) -> torch.Tensor:
        B, H, Nq = q.shape[:3]
        bias = 0
        axes, visible = _dense_index(self.pattern, str(q.device))
        for t, (idx, valid) in zip(self._logits(q), axes):
            g = torch.gather(t, -1, idx.expand(B, H, Nq, idx.shape[1]))
            bias = bias + torch.where(valid, g, 0.0)
        return torch.where(visible, bias * self.scale, 0.0)

    def kernel_factors(self, q, k):
        B, H, Nq = q.shape[:3]
        gathers, classes = _factor_index(self.pattern, str(q.device))
        uq = torch.cat([torch.gather(t, -1, g.expand(B, H, Nq, g.shape[1]))
                        for t, g in zip(self._logits(q), gathers)], dim=-1)
        uk = torch.cat([torch.nn.functional.one_hot(c, g.shape[1]) for c, g in zip(classes, gathers)], dim=-1)
        return uq * self.scale, uk.to(q.dtype)[None, None]
