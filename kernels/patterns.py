"""Attention patterns: which keys each query sees.

A pattern is a small frozen dataclass. It has an exact definition (documented on each class), a boolean-mask
form for the reference path (`pattern.mask(nq, nk)`, True = visible) and, for grid patterns, separable per-axis
masks (`axis_masks()`) that the Triton path turns into cached tile maps.

Token order on a grid is row-major (last axis fastest), as `x.flatten(2)` of a `(B, C, *grid)` map gives.
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Tuple

import torch

__all__ = ["Pattern", "Dense", "Causal", "Window1d", "Neighborhood", "Halo"]


def _as_tuple(value, n: int, name: str) -> Tuple[int, ...]:
    if isinstance(value, int):
        value = (value,) * n
    value = tuple(value)
    if len(value) != n or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise TypeError(f"{name} must be an int or a tuple of {n} ints, got {value!r}")
    return value


class Pattern:
    """Base class. Subclasses define `mask(nq, nk)` and `check(nq, nk)`."""

    def check(self, nq: int, nk: int) -> None:
        """Raise ValueError when the pattern cannot apply to `nq` queries and `nk` keys."""

    def mask(self, nq: int, nk: int, device=None) -> torch.Tensor:
        """Boolean `(nq, nk)` mask, True where query i sees key j."""
        raise NotImplementedError

    def mask_rows(self, rows: torch.Tensor, nq: int, nk: int) -> torch.Tensor:
        """The mask's `rows` (int64 query indices), `(len(rows), nk)`, on `rows`' device; 1-d patterns build
        only those rows (capture of a few rows of a long sequence)."""
        return self.mask(nq, nk, device=rows.device).index_select(0, rows)

    def density(self, nq: int, nk: int) -> float:
        """Fraction of the (nq, nk) score matrix that is visible (cached; a constant under torch.compile)."""
        return _density(pattern_key(self), nq, nk)

    def _density(self, nq: int, nk: int) -> float:
        return self.mask(nq, nk).float().mean().item()


def pattern_key(pattern: Pattern) -> str:
    """A canonical string for `pattern` (class name and field values), e.g. `["Window1d", [4, 2]]`.

    The Triton custom ops take patterns as this string; `pattern_from_key` rebuilds the object. Computed from the
    fields rather than the object so that it stays a constant under torch.compile even for patterns built inside
    the compiled code (dynamo cannot hand such objects to a constant function)."""
    if torch.compiler.is_compiling():
        return _key_of(type(pattern).__name__, tuple(getattr(pattern, f.name) for f in fields(pattern)))
    key = _KEYS.get(pattern)  # eager: built once per pattern (every attention call asks)
    if key is None:
        if len(_KEYS) >= 4096:
            _KEYS.clear()
        key = _KEYS[pattern] = _key_of(type(pattern).__name__, tuple(getattr(pattern, f.name)
                                                                       for f in fields(pattern)))
    return key


_KEYS = {}


@torch.compiler.assume_constant_result
def _key_of(name: str, values: tuple) -> str:
    return json.dumps([name, list(values)])


@lru_cache(maxsize=1024)
def pattern_from_key(key: str) -> Pattern:
    """The pattern named by `pattern_key(pattern)`."""
    name, values = json.loads(key)
    if name not in __all__ or name == "Pattern":
        raise ValueError(f"pattern_from_key: unknown pattern class {name!r} in key {key!r}")
    return globals()[name](*[tuple(v) if isinstance(v, list) else v for v in values])


_DENSITY = {}


@torch.compiler.assume_constant_result
def _density(key: str, nq: int, nk: int) -> float:
    # computed eagerly from the rebuilt pattern: the masks' .item() would break a torch.compile graph
    if (key, nq, nk) not in _DENSITY:
        if len(_DENSITY) >= 4096:
            _DENSITY.clear()
        _DENSITY[key, nq, nk] = pattern_from_key(key)._density(nq, nk)
    return _DENSITY[key, nq, nk]


@dataclass(frozen=True)
class Dense(Pattern):
    """Every query sees every key."""

    def mask(self, nq, nk, device=None):
        return torch.ones(nq, nk, dtype=torch.bool, device=device)

    def _density(self, nq, nk):
        return 1.0


@dataclass(frozen=True)
class Causal(Pattern):
    """Query i sees key j iff j <= i + (nk - nq) (aligned at the bottom right, FlashAttention's rule).

    With nq == nk this is the usual lower-triangular mask; with nq < nk (decoding with a cache) the last query
    sees every key. Rows with no visible key (nq > nk) produce zeros and lse = -inf.
    """

    def mask(self, nq, nk, device=None):
        return self.mask_rows(torch.arange(nq, device=device), nq, nk)

    def mask_rows(self, rows, nq, nk):
        j = torch.arange(nk, device=rows.device)[None, :]
        return j <= rows[:, None] + (nk - nq)


@dataclass(frozen=True)
class Window1d(Pattern):
    """Query i sees key j iff i' - left <= j <= i' + right, with i' = i + (nk - nq).

    `Window1d(w - 1, 0)` is causal sliding-window attention over w keys (FlashAttention's `window_size`).
    """

    left: int
    right: int

    def __post_init__(self):
        for name in ("left", "right"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"Window1d.{name} must be an int >= 0, got {v!r}")

    def mask(self, nq, nk, device=None):
        return self.mask_rows(torch.arange(nq, device=device), nq, nk)

    def mask_rows(self, rows, nq, nk):
        i = rows[:, None] + (nk - nq)
        j = torch.arange(nk, device=rows.device)[None, :]
        return (j >= i - self.left) & (j <= i + self.right)


def neighborhood_axis_window(length: int, window: int, stride: int, dilation: int, inward: bool,
                             causal: bool, device=None):
    """Per-query window along one axis of a `Neighborhood`, in real coordinates: `(lo, hi)` int64 `(length,)`.

    Query i sees key j on this axis iff `lo[i] <= j <= hi[i]` and `(j - lo[i]) % dilation == 0`; see the
    `Neighborhood` docstring for the rule.
    """
    i = torch.arange(length, device=device)
    group_q, pos_q = i % dilation, i // dilation
    group_len = (length - group_q + dilation - 1) // dilation  # tokens in the query's dilation group
    if causal:  # the stride group's leader is its last query; no key after the query itself
        leader = torch.minimum((pos_q // stride) * stride + stride - 1, group_len - 1)
        start, end = leader - window + 1, pos_q
    else:
        leader = torch.minimum((pos_q // stride) * stride + stride // 2, group_len - 1)
        start = leader - window // 2
        if inward:
            start = torch.clamp(torch.minimum(start, group_len - window), min=0)
        end = start + window - 1
    start = torch.clamp(start, min=0)
    end = torch.minimum(end, group_len - 1)
    return start * dilation + group_q, end * dilation + group_q


def neighborhood_axis_mask(length: int, window: int, stride: int, dilation: int, inward: bool,
                           causal: bool, device=None) -> torch.Tensor:
    """`(length, length)` visibility along one axis of a `Neighborhood`; see its docstring for the rule."""
    lo, hi = neighborhood_axis_window(length, window, stride, dilation, inward, causal, device)
    j = torch.arange(length, device=device)[None, :]
    return (j >= lo[:, None]) & (j <= hi[:, None]) & ((j - lo[:, None]) % dilation == 0)


@dataclass(frozen=True)
class Neighborhood(Pattern):
    """N-d neighbourhood (sliding-window) attention over a row-major token grid (NATTEN's rule).

    Visibility is a product over axes: query q sees key k iff on every axis a the key coordinate is in the
    query's window on that axis. Per axis, with length L, window w, stride s, dilation d:

    * dilation: tokens split into d interleaved groups (coordinate mod d); a query sees only keys of its group,
      and the rule below runs in group coordinates p = coordinate // d over the group's length L_g;
    * stride: queries in the same block of s group positions share the window of the block's leader
      p* = min(s * (p // s) + s // 2, L_g - 1) (s = 1: the query itself; NATTEN's stride-group centre);
    * window: keys at p* - w // 2 .. p* - w // 2 + w - 1 (for odd w: centred; even w: one more on the left);
      with `inward=True` the start is clamped to [0, L_g - w] so the window is shifted inside the border and
      every query sees exactly min(w, L_g) keys (NATTEN, FreeSwim); with `inward=False` it is clipped;
    * causal axes (`causal_axes`): keys at p* - w + 1 .. p, clipped at 0 (never shifted forward, so early
      queries see fewer keys), where p* = min(s * (p // s) + s - 1, L_g - 1) is the stride block's last query
      (NATTEN's causal stride-group leader; s = 1: p itself).

    Queries and keys are the same grid: nq == nk == prod(grid).
    """

    grid: Tuple[int, ...]
    window: Tuple[int, ...]
    stride: Tuple[int, ...] = 1
    dilation: Tuple[int, ...] = 1
    inward: bool = True
    causal_axes: Tuple[int, ...] = ()

    def __post_init__(self):
        grid = _as_tuple(self.grid, len(self.grid) if not isinstance(self.grid, int) else 1, "grid")
        n = len(grid)
        if not 1 <= n <= 3:
            raise ValueError(f"Neighborhood.grid must have 1, 2 or 3 axes, got {grid!r}")
        window = _as_tuple(self.window, n, "window")
        stride = _as_tuple(self.stride, n, "stride")
        dilation = _as_tuple(self.dilation, n, "dilation")
        axes = (self.causal_axes,) if isinstance(self.causal_axes, int) else tuple(self.causal_axes)
        causal = tuple(sorted(set(_as_tuple(axes, len(axes), "causal_axes"))))
        for name, values in (("grid", grid), ("window", window), ("stride", stride), ("dilation", dilation)):
            if any(v < 1 for v in values):
                raise ValueError(f"Neighborhood.{name} must be >= 1 on every axis, got {values!r}")
        if any(not 0 <= a < n for a in causal):
            raise ValueError(f"Neighborhood.causal_axes must index the grid's {n} axes, got {causal!r}")
        if any(s > w for s, w in zip(stride, window)):
            raise ValueError(f"Neighborhood.stride must be <= window on every axis, got {stride=} {window=}")
        if not isinstance(self.inward, bool):
            raise TypeError(f"Neighborhood.inward must be a bool, got {self.inward!r}")
        object.__setattr__(self, "grid", grid)
        object.__setattr__(self, "window", window)
        object.__setattr__(self, "stride", stride)
        object.__setattr__(self, "dilation", dilation)
        object.__setattr__(self, "causal_axes", causal)

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid)

    def check(self, nq, nk):
        if nq != self.num_tokens or nk != self.num_tokens:
            raise ValueError(f"Neighborhood(grid={self.grid}) needs nq == nk == {self.num_tokens}, got {nq=} {nk=}")

    def axis_masks(self, device=None):
        """Per-axis `(L_a, L_a)` masks; the full mask is their outer AND in row-major order."""
        return [_axis_mask_cached(L, w, s, d, self.inward, a in self.causal_axes, device)
                for a, (L, w, s, d) in enumerate(zip(self.grid, self.window, self.stride, self.dilation))]

    def axis_windows(self):
        """Per axis `(lo, hi, dilation)`: query coordinate c sees key coordinate j on that axis iff
        `lo[c] <= j <= hi[c]` and `(j - lo[c]) % dilation == 0` (lo/hi int64 CPU tensors); the Triton path
        builds its tile maps and element masks from these."""
        return [(*_axis_window_cached(L, w, s, d, self.inward, a in self.causal_axes), d)
                for a, (L, w, s, d) in enumerate(zip(self.grid, self.window, self.stride, self.dilation))]

    def mask(self, nq, nk, device=None):
        self.check(nq, nk)
        return _outer_and(self.axis_masks(device))

    def _density(self, nq, nk):
        total = 1.0
        for lo, hi, d in self.axis_windows():
            total *= ((hi - lo) // d + 1).clamp(min=0).double().mean().item() / len(lo)
        return total


def outside_inference_mode(fn, *args, **kwargs):
    """`fn(*args, **kwargs)` with inference mode switched off: tensors it builds for a cache can then be saved for
    backward by a later training step (a tensor made under `torch.inference_mode()` cannot). Not checked under
    torch.compile, which cannot trace `torch.is_inference_mode_enabled`."""
    if not torch.compiler.is_compiling() and torch.is_inference_mode_enabled():
        with torch.inference_mode(False):
            return fn(*args, **kwargs)
    return fn(*args, **kwargs)


def tensor_cache(maxsize: int):
    """`functools.lru_cache` for builders of constant tensors (index maps, masks, one-hots). Built
    `outside_inference_mode`: a cache first filled by an inference call would otherwise break every later training
    step that gathers or masks with it. Not cached under `torch.jit.trace`: the trace would record the build and
    its check run a constant, and the two graphs would differ."""
    def decorate(fn):
        @functools.wraps(fn)
        def build(*args, **kwargs):
            return outside_inference_mode(fn, *args, **kwargs)

        cached = lru_cache(maxsize=maxsize)(build)

        @functools.wraps(fn)
        def get(*args, **kwargs):
            if not torch.compiler.is_compiling() and torch.jit.is_tracing():
                return fn(*args, **kwargs)
            return cached(*args, **kwargs)

        get.cache_clear, get.cache_info = cached.cache_clear, cached.cache_info
        return get
    return decorate


@tensor_cache(maxsize=256)
def _axis_mask_cached(length, window, stride, dilation, inward, causal, device):
    return neighborhood_axis_mask(length, window, stride, dilation, inward, causal, device)


@lru_cache(maxsize=256)
def _axis_window_cached(length, window, stride, dilation, inward, causal):
    return neighborhood_axis_window(length, window, stride, dilation, inward, causal)


def _outer_and(masks):
    full = masks[0]
    for m in masks[1:]:
        full = (full[:, None, :, None] & m[None, :, None, :]).reshape(full.shape[0] * m.shape[0],
                                                                    full.shape[1] * m.shape[1])
    return full


@dataclass(frozen=True)
class Halo(Pattern):
    """HaloNet's blocked local attention (Vaswani et al. 2021) on a 2-d (or N-d) grid, timm's layout.

    Queries lie on `grid` (already subsampled by `query_stride`); keys lie on the key grid
    `grid * query_stride + 2 * halo` per axis, i.e. the full-resolution map zero-padded by `halo` on each side
    (the caller pads keys and values, as timm's `HaloAttn` does). The query grid is cut into blocks of
    `block // query_stride`; the queries of block index b see the key window `b * block .. b * block + block +
    2 * halo - 1` (padded coordinates) on every axis: (block + 2 halo) keys per axis, borders included.
    """

    grid: Tuple[int, ...]
    block: int
    halo: int
    query_stride: int = 1

    def __post_init__(self):
        grid = _as_tuple(self.grid, len(self.grid) if not isinstance(self.grid, int) else 1, "grid")
        object.__setattr__(self, "grid", grid)
        for name in ("block", "halo", "query_stride"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise TypeError(f"Halo.{name} must be an int, got {v!r}")
        if self.block < 1 or self.halo < 0 or self.query_stride < 1:
            raise ValueError(f"Halo needs block >= 1, halo >= 0, query_stride >= 1, got "
                             f"{self.block=} {self.halo=} {self.query_stride=}")
        if self.block % self.query_stride:
            raise ValueError(f"Halo.block ({self.block}) must be divisible by query_stride ({self.query_stride})")
        qb = self.block // self.query_stride
        if any(g % qb for g in grid):
            raise ValueError(f"Halo.grid {grid} must be divisible by the query block {qb} on every axis "
                             f"(pad the feature map first)")

    @property
    def query_block(self) -> int:
        return self.block // self.query_stride

    @property
    def key_grid(self) -> Tuple[int, ...]:
        return tuple(g * self.query_stride + 2 * self.halo for g in self.grid)

    @property
    def window(self) -> int:
        return self.block + 2 * self.halo

    def check(self, nq, nk):
        if nq != math.prod(self.grid) or nk != math.prod(self.key_grid):
            raise ValueError(f"Halo(grid={self.grid}, block={self.block}, halo={self.halo}) needs "
                             f"nq == {math.prod(self.grid)} and nk == {math.prod(self.key_grid)} (padded keys), "
                             f"got {nq=} {nk=}")

    def axis_masks(self, device=None):
        masks = []
        for g, kg in zip(self.grid, self.key_grid):
            start = (torch.arange(g, device=device) // self.query_block) * self.block
            j = torch.arange(kg, device=device)
            masks.append((j[None, :] >= start[:, None]) & (j[None, :] < start[:, None] + self.window))
        return masks

    def axis_windows(self):
        """Per axis `(lo, hi, 1)` over query coordinates (key coordinates on the padded key grid)."""
        out = []
        for g in self.grid:
            start = (torch.arange(g) // self.query_block) * self.block
            out.append((start, start + self.window - 1, 1))
        return out

    def mask(self, nq, nk, device=None):
        self.check(nq, nk)
        return _outer_and(self.axis_masks(device))
