"""Triton backend of `kernels.attention`: forward and backward kernels for every pattern, registered as torch
custom ops (`attnzoo::attention_fwd` / `attnzoo::attention_bwd`, with fake implementations and autograd) so
`torch.compile(fullgraph=True)` traces through them.

Runs CUDA tensors; CPU tensors too when `TRITON_INTERPRET=1` (Triton's interpreter, used by the tests).
Grid patterns (`Neighborhood`, `Halo`) run on tokens permuted into N-d tiles (`kernels.tiles`); 1-d patterns
(`Dense`, `Causal`, `Window1d`) run in place. Block sizes, warps, stages and, at head dims <= 64, a register
cap are autotuned per problem class on first use (CUDA events, minimum of a few repeats per candidate, a
second round for long kernels; `ATTNZOO_AUTOTUNE=0` takes the first candidate), as are the tile shapes of grid
patterns (by counting the visited tile pairs, which is exact and free) and their mask mode
(`ATTNZOO_GRID_VARIANTS`: the first grid path and the pair-mask path, see `_grid_variants`).

Fused terms: a dense additive bias (read through its strides, broadcast dims at stride 0; its gradient dS is
written per (b, h) by the dK/dV kernel, read back by the dQ kernel, and summed over broadcast dims: leading ones
by `sum_over_leading`, others in torch), low-rank logits `U_q · U_kᵀ`
(`kernels.LowRankBias`, and `kernels.RelPosBias` lowered to such factors in torch where it is not computed
in-kernel, see below), and the sigmoid output gate
(forward epilogue; the backward's delta kernel produces dO·sigmoid(g) and dg). Skinny 1-d problems (few query
blocks, or few key blocks) split the long axis over a third program axis; `triton_combine.combine_splits` merges
the forward's parts and `sum_over_leading` sums the backward's.
Dense skinny problems (Nk <= 256, or H/Hkv · Nq <= 256) also have the kernels of `triton_skinny` (autotune
candidates, `ATTNZOO_SKINNY`). HaloNet's relative-position bias on its blocked layout or a 2-d Halo grid is
computed in-kernel (`attnzoo::relpos_fwd/bwd`, `ATTNZOO_RELPOS`): by the general kernels (`HAS_REL`: factors built
from q and the tables) and, on the blocked layout, the few-keys kernels, tuned against each other. Under autograd
the forward also stores the query factor, which the backward loads (else it writes it once, `_rel_factor_bwd`).
"""
from __future__ import annotations

import collections
import logging
import math
import os
from typing import Dict, List, Optional, Tuple

import torch

from .. import tiles
from ..bias import RelPosBias
from ..checks import _fail
from ..patterns import (Causal, Dense, Halo, Neighborhood, Pattern, Window1d, pattern_from_key, pattern_key,
                        tensor_cache)

NAME = "triton"
logger = logging.getLogger("kernels")

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_BEST: Dict[tuple, tuple] = {}
_MAX_HEAD_DIM = 256
_MAX_RANK = 64
# launches per kernel path, so tests and the GPU checks can assert which kernels ran: the skinny kernels'
# ("keys_fwd_flat", "keys_bwd_flat_chunked_rel", "queries_fwd", ...: `triton_skinny`) and the general kernels'
# in-kernel rel-pos launches ("general_fwd_rel", "general_bwd_rel"); other general launches are not counted
CALLS: collections.Counter = collections.Counter()
GATE_PREFETCH = True  # `_attn_fwd` hints an element-wise gate's tile into L2 (probes turn it off for A/B runs)
# a forward config's flag, after its block shape (and cap): q as a register operand (`_attn_fwd`'s Q_IN_REGS)
QREG = "qreg"


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def can_run_triton(q, k, v, pattern=None, bias=None, gate=None, return_lse=False, raise_error=False) -> bool:
    """True when the Triton kernels can run these inputs; with `raise_error` the reason is raised instead."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return _fail("the triton backend needs the triton package", raise_error, NotImplementedError)
    if not (q.is_cuda or (_interpret() and q.device.type == "cpu")):
        return _fail(f"the triton backend needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got "
                     f"{q.device=}", raise_error)
    if q.dtype not in _DTYPES:
        return _fail(f"the triton backend supports float16, bfloat16 and float32, got {q.dtype=}", raise_error,
                     TypeError)
    if max(q.shape[-1], v.shape[-1]) > _MAX_HEAD_DIM:
        return _fail(f"the triton backend supports head dims up to {_MAX_HEAD_DIM}, got {q.shape=} {v.shape=}",
                     raise_error, NotImplementedError)
    if pattern is not None and not isinstance(pattern, (Dense, Causal, Window1d, Neighborhood, Halo)):
        return _fail(f"the triton backend has no kernel for pattern {type(pattern).__name__}", raise_error,
                     NotImplementedError)
    if bias is not None and not isinstance(bias, torch.Tensor):
        rank = getattr(bias, "kernel_rank", None)
        if rank is None:
            return _fail(f"the triton backend cannot lower a {type(bias).__name__} bias (no kernel_rank/"
                         f"kernel_factors); the reference can run it", raise_error, NotImplementedError)
        if rank > _MAX_RANK:
            return _fail(f"the triton backend fuses factorized biases up to rank {_MAX_RANK}, got rank {rank} "
                         f"({type(bias).__name__}); pass bias.materialize(q, k) as a dense bias instead",
                         raise_error, NotImplementedError)
    return True


# ----------------------------------------------------------------------------------------------------------
# launch helpers


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _block_d(d: int) -> int:
    return max(16, _next_pow2(d))


_ROW_OFFSET_LIMIT = 2 ** 31  # the kernels index rows in int32 (row x row stride + column; (b, h) bases are int64)


def _rows_fit_int32(x: torch.Tensor) -> bool:
    """Every row offset of a (..., N, C) tensor within one (b, h) slice fits the kernels' int32 row arithmetic."""
    return (x.shape[-2] - 1) * x.stride(-2) + x.shape[-1] <= _ROW_OFFSET_LIMIT


def _lastdim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """A row-indexed kernel input: columns contiguous, and rows in int32 reach (a strided view of a large tensor,
    e.g. a packed qkv projection with N x 3HD >= 2^31, is copied)."""
    return x if x.stride(-1) == 1 and _rows_fit_int32(x) else x.contiguous()


def _bias_lastdim(bias4: torch.Tensor) -> torch.Tensor:
    """A dense bias as the kernels read it: keys contiguous unless broadcast over them."""
    return bias4 if bias4.stride(-1) == 1 or bias4.shape[-1] == 1 else bias4.contiguous()


def _bstrides(t: Optional[torch.Tensor], n: int = 4) -> Tuple[int, ...]:
    """Strides of a 4-d (or `n`-d) tensor with 0 on size-1 (broadcast) dims; zeros for an absent tensor."""
    if t is None:
        return (0,) * n
    return tuple(0 if s == 1 else st for s, st in zip(t.shape, t.stride()))


def _window_params(pattern, nq: int, nk: int) -> Tuple[int, int, int]:
    """(OFF, LEFT, RIGHT) of a 1-d pattern: query i sees key j iff i + OFF - LEFT <= j <= i + OFF + RIGHT."""
    big = nq + nk + 1
    if isinstance(pattern, Dense):
        return 0, big, big
    if isinstance(pattern, Causal):
        return nk - nq, big, 0
    return nk - nq, min(pattern.left, big), min(pattern.right, big)


def _is_grid(pattern) -> bool:
    return isinstance(pattern, (Neighborhood, Halo))


def _fast_tune() -> bool:
    """ATTNZOO_AUTOTUNE=fast: three candidates per kernel (benchmarks that must bound compile time)."""
    return os.environ.get("ATTNZOO_AUTOTUNE", "1") == "fast"


def _fwd_candidates(d: int, dv: int) -> List[tuple]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages[, maxnreg][, QREG]) tried by the forward autotuner. At head dim 128 a
    128x64 block on 4 warps spills (ptxas: 255 registers + 632 B of spill stores, Triton 3.6, sm_90a); 8 warps do
    not. At head dims <= 64 the 64x64 block is also tried capped at 128 registers (`maxnreg`): four programs per
    SM instead of three (H200: the blocked HaloNet layout 0.079 -> 0.071 ms, dense B2 H16 N4096 0.345 -> 0.322 ms,
    rel-pos on the Halo grid 0.154 -> 0.145 ms; at head dim 128 the cap spills and runs slower), and capped with 2
    stages: with rel-pos or low-rank operands next to them, three stages of k and v take more than a quarter of
    the SM's 228 KB of shared memory (rel-pos on the Halo grid 0.151 -> 0.138 ms, blocked 0.119 -> 0.106 ms).
    `QREG` twins hold q in registers, which frees its shared memory for another program per SM where the
    low-rank factors' stages had taken it (H200, rank 16, B1 d128 on (64, 64, 4, 3): 102 KB instead of 120, 0.421
    -> 0.305 ms; B2 d64 capped at 128: 54 KB instead of 64, 0.382 -> 0.356 ms; a dense bias at d64 runs slower)."""
    if _interpret():
        return [(32, 16, 4, 1)]
    bd = max(_block_d(d), _block_d(dv))
    if bd >= 256:
        return [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 3), (128, 32, 8, 2)]
    if bd == 128:
        if _fast_tune():
            return [(64, 64, 4, 3), (64, 64, 4, 3, QREG), (128, 64, 8, 3), (128, 128, 8, 3)]
        return [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (64, 64, 4, 3, QREG), (128, 128, 8, 2),
                (128, 64, 4, 3), (64, 64, 4, 2), (64, 32, 4, 3)]
    if _fast_tune():
        return [(64, 64, 4, 3), (64, 64, 4, 3, 128), (64, 64, 4, 3, 128, QREG), (128, 64, 4, 3), (128, 128, 8, 3),
                (64, 64, 4, 2, 128)]
    return [(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3),
            (64, 64, 4, 3, 128), (64, 64, 4, 3, 128, QREG), (64, 64, 4, 2, 128)]


def _bwd_candidates(d: int, dv: int) -> List[tuple]:
    """As `_fwd_candidates`, for the dK/dV and dQ kernels (one config for both). At head dims <= 64 the 64x64
    block is also tried capped at 168 registers: three dK/dV programs per SM instead of two (H200: dense B2 H16
    N4096 1.074 -> 0.988 ms, the Halo grid 0.359 -> 0.335 ms; with low-rank factors the spills made it slower),
    and so capped with one stage, for the few tiles a grid pattern's programs loop over (Halo grid 0.342 ->
    0.300 ms, with rel-pos 0.553 -> 0.505 ms; slower on dense problems)."""
    if _interpret():
        return [(16, 32, 4, 1)]
    bd = max(_block_d(d), _block_d(dv))
    capped = [(64, 64, 4, 2, 168), (64, 64, 4, 1, 168)] if bd <= 64 else []
    if _fast_tune() and bd < 256:
        return [(64, 64, 4, 2)] + capped + [(64, 128, 8, 2), (128, 128, 8, 2)]
    if bd >= 256:
        return [(64, 64, 8, 2), (32, 64, 4, 2), (64, 32, 4, 2)]
    # dK/dV at head dim 128 spills in every config (ptxas: 436 B at 64x128/8 warps, 5-9 KB at 128-row blocks);
    # 32-row query blocks under 128 keys spill 40 B
    return [(64, 128, 8, 2), (64, 64, 4, 2), (128, 128, 8, 2), (64, 128, 4, 3), (128, 64, 8, 2), (32, 128, 8, 2)] + \
        capped


def _short_loop_candidates(cands: List[tuple], pattern, d: int, dv: int, nk: int, rel: bool = False) -> List[tuple]:
    """Forward programs that visit a few key tiles (a `Halo` pattern's windows, <= 256 keys) at head dims <= 64:
    add 32- and 16-key tiles, which pad less of each window (H200, d64: the Halo grid (64, 64) b8 h2 0.093 ->
    0.066 ms, with rel-pos 0.133 -> 0.115; HaloNet's blocked layout (64 queries x 144 keys) 0.073 -> 0.062, with
    rel-pos 0.102 -> 0.096; slower on long dense rows). Register caps (`maxnreg`) let more of these short programs
    share an SM: 72 is the no-bias kernel's own count (blocked 0.063 -> 0.061 ms). The rel-pos forward's
    query-factor prologue lifts it to 94 (16-key tiles) and 119 (32-key tiles) registers; capped at 80 and 96
    without spills, six and five programs fit instead of five and four (Halo grid 0.100 -> 0.094 ms, blocked
    0.095 -> 0.091)."""
    if _interpret() or max(_block_d(d), _block_d(dv)) > 64 or not (isinstance(pattern, Halo) or nk <= 256):
        return cands
    extra = [(64, 32, 4, 3), (64, 32, 4, 2, 128), (64, 16, 4, 3), (64, 16, 4, 3, 72)]
    if rel:
        extra += [(64, 16, 4, 2, 80), (64, 16, 4, 3, 80), (64, 32, 4, 3, 96)]
    return list(dict.fromkeys(cands + extra))


def _skinny_candidates(cands: List[tuple], nk: int) -> List[tuple]:
    """Few keys: add key blocks that cover them without padding, and 64-row query blocks."""
    if _interpret() or nk > 256:
        return cands
    bn = max(16, _next_pow2(nk))
    extra = [(128, min(bn, 128), 4, 3), (64, min(bn, 128), 4, 3), (128, min(bn, 64), 4, 2)]
    if not _fast_tune():
        extra.append((256, 64, 8, 3))
    return list(dict.fromkeys(cands + extra))


_SMS: Dict[str, int] = {}


def _num_sms(device) -> int:
    """Multiprocessors to fill (the interpreter pretends 4, so small test problems take the split paths)."""
    if device.type != "cuda":
        return 4
    key = str(device)
    if key not in _SMS:
        _SMS[key] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SMS[key]


def _splits(programs: int, blocks: int, device, min_blocks: int = 2) -> Tuple[int, int]:
    """(number of splits, blocks per split) so that `programs` x splits fills about two waves of the GPU, each
    split keeping at least `min_blocks` of the `blocks` to loop over. (1, blocks) when no split helps."""
    want = -(-2 * _num_sms(device) // max(programs, 1))
    s = max(1, min(want, blocks // min_blocks))
    if s <= 1:
        return 1, max(blocks, 1)
    per = -(-blocks // s)
    return -(-blocks // per), per


class _Problem:
    """One attention problem laid out for the kernels (grid patterns permuted into tiles)."""

    def __init__(self, pattern, nq: int, nk: int, block_m: int, block_n: int, device, partial_cost=1.25,
                 in_place: bool = False):
        self.pattern, self.device = pattern, device
        self.grid = _is_grid(pattern)
        self.block_m, self.block_n = block_m, block_n
        self.pair_mask = False
        if self.grid:
            # partial_cost: a float = the first grid path (power-of-two tiles, one mask for all partial pairs;
            # the float weights partial pairs when choosing tiles); "pair" / "pairp2" = per-pair mask bits and a
            # key bias for padding, tiles of any shape that fits the block ("pair") or powers of two ("pairp2")
            if isinstance(partial_cost, str):
                q_tile, k_tile = tiles.choose_tile_shapes_pair(pattern, block_m, block_n,
                                                               pow2_only=partial_cost == "pairp2")
                self.map = tiles.grid_tile_map(pattern, q_tile, k_tile, str(device), block_m, block_n, True)
                self.pair_mask = True
            else:
                q_tile, k_tile = tiles.choose_tile_shapes(pattern, block_m, block_n, partial_cost)
                self.map = tiles.grid_tile_map(pattern, q_tile, k_tile, str(device))
            self.nq, self.nk = self.map.q_layout.num_padded, self.map.k_layout.num_padded
            # in_place: the kernels read their inputs and write their outputs (o/lse, or the gradients) in token
            # order through the tiles' row tables instead of permuted copies (`_grid_input_modes`)
            self.gather = in_place and not (self.map.q_layout.is_identity and self.map.k_layout.is_identity)
            self.off = self.left = self.right = 0
            self.dil = tuple(self.map.dilation) + (1,) * (3 - len(self.map.dilation))
            self.mask_axes = self.map.mask_axes
            self.has_dil = any(d > 1 for d in self.map.dilation)
        else:
            self.map = None
            self.gather = False
            self.nq, self.nk = nq, nk
            self.off, self.left, self.right = _window_params(pattern, nq, nk)
            self.dil, self.mask_axes, self.has_dil = (1, 1, 1), 0, False

    @property
    def permuted(self) -> bool:
        """The kernels take copies in tile order (grid patterns, unless the config reads tokens in place)."""
        return self.grid and not self.gather

    def q_in(self, x):
        return _lastdim_contiguous(self.map.q_layout.permute(x) if self.permuted else x)

    def k_in(self, x):
        return _lastdim_contiguous(self.map.k_layout.permute(x) if self.permuted else x)

    def q_out(self, x):
        return self.map.q_layout.unpermute(x) if self.permuted else x

    def k_out(self, x):
        return self.map.k_layout.unpermute(x) if self.permuted else x

    def bias_in(self, bias4, nq, nk):
        """Dense bias (b, h, Nq, Nk) (b, h may be 1) in kernel order: permuted grid problems permute both axes."""
        if not self.permuted:
            return _bias_lastdim(bias4)
        x = bias4.expand(bias4.shape[0], bias4.shape[1], nq, nk)
        x = self.map.q_layout.permute(x).transpose(-1, -2)
        return self.map.k_layout.permute(x).transpose(-1, -2).contiguous()

    def bias_out(self, db):
        if not self.permuted:
            return db
        x = self.map.q_layout.unpermute(db).transpose(-1, -2)
        return self.map.k_layout.unpermute(x).transpose(-1, -2)

    def lists(self, backward: bool):
        if not self.grid:
            dummy = _dummy_int(self.device)
            return (dummy,) * 4
        return self.map.bwd if backward else self.map.fwd

    def tables(self):
        if not self.grid:
            dummy = _dummy_int(self.device)
            return dummy, dummy, dummy
        return self.map.qlo, self.map.qhi, self.map.kc

    def gather_args(self, nq: int) -> dict:
        """Kernel arguments that read unpermuted inputs (`nq` query rows) through the row tables under GATHER; grid
        problems pass the tables either way (the in-kernel rel-pos term takes each slot's grid coordinates from
        them)."""
        if not self.grid:
            return dict(GATHER=False)
        return dict(QROW=self.map.q_rows, KROW=self.map.k_rows, NQO=nq, GATHER=self.gather)

    def pair_args(self, backward: bool) -> dict:
        """Kernel arguments of the pair mode (per-pair bits in partial-list order, key bias)."""
        if not self.pair_mask:
            return dict(PART_BITS=_dummy_int(self.device), KB=_dummy_int(self.device), PAIR_MASK=False)
        return dict(PART_BITS=self.map.bwd_bits if backward else self.map.fwd_bits, KB=self.map.kbias,
                    PAIR_MASK=True)


_DUMMY: Dict[str, torch.Tensor] = {}


def _dummy_int(device) -> torch.Tensor:
    key = str(device)
    if key not in _DUMMY:
        _DUMMY[key] = torch.zeros(4, dtype=torch.int32, device=device)
    return _DUMMY[key]


def _problem(pattern, nq, nk, cfg, device) -> _Problem:
    return _Problem(pattern, nq, nk, cfg[0], cfg[1], device, *(cfg[4:6] if _is_grid(pattern) else ()))


def _config_options(cfg, grid: bool) -> Tuple[Optional[int], bool]:
    """(register cap or None, QREG flag) of a general-kernel config: (BLOCK_M, BLOCK_N, num_warps, num_stages), then
    a grid pattern's (variant, input mode) (`_with_tile_costs`), then an optional cap and an optional `QREG`."""
    tail = cfg[6 if grid else 4:]
    caps = [t for t in tail if t != QREG]
    return (caps[0] if caps else None), QREG in tail


def _launch_opts(cfg, prob: _Problem) -> dict:
    """A general-kernel config's launch options: num_warps, num_stages and the register cap (`maxnreg`) if any."""
    cap = _config_options(cfg, prob.grid)[0]
    return dict(num_warps=cfg[2], num_stages=cfg[3], **({"maxnreg": cap} if cap else {}))


def _grid_variants() -> Tuple[str, ...]:
    """Grid-pattern kernel variants to tune over (env ATTNZOO_GRID_VARIANTS, comma-separated; default "pair,old":
    on the H200 the pair path ran the 3-d FreeSwim window 1.7x faster than "old", the 2-d 33x33 window 7% slower,
    so both are tuned, pair first for untuned runs; benchmarks/kernels_grid.json):
    "old" = the first grid path (power-of-two tiles, partial pairs mask every partial axis; tile choice weights
    partial pairs 1.25 and 2.0, or 2.0 only under ATTNZOO_AUTOTUNE=fast), "pair" = per-pair mask bits + key bias
    + tiles of any shape fitting the block (e.g. 21 frames), "pairp2" = the same with power-of-two tiles only."""
    names = tuple(v.strip() for v in os.environ.get("ATTNZOO_GRID_VARIANTS", "pair,old").split(",") if v.strip())
    bad = [v for v in names if v not in ("old", "pair", "pairp2")]
    if bad or not names:
        raise ValueError(f"ATTNZOO_GRID_VARIANTS must list old, pair, pairp2; got {names!r}")
    return names


def _grid_input_modes() -> Tuple[bool, ...]:
    """How the grid kernels read q/k/v (and bias, factors, gate, and in the backward o, dO, lse) and write their
    outputs (o/lse, or dq/dk/dv and the extras' gradients) (env ATTNZOO_GRID_INPUTS): "auto" (default) tunes
    both, "in-place" = in token order through the tiles' row tables, "permuted" = from copies permuted into tile
    order. On the H200 in place ran the 2-d 128x128 / 33x33 forward at 0.53 ms vs 0.77 with the copies, and the
    3-d FreeSwim window at 93 ms vs 82 (its gathered key rows are slower to stream than the copies are to make);
    benchmarks/logs/device_r10_probe_na2d.log, kernels/NOTES.md. The backward's copies (five inputs in, three
    gradients out) took 0.63 of its 0.93 ms on a Halo grid (64 x 64, B8 H8 d64); in place it ran in 0.36 ms, and
    the 2-d 128x128 / 33x33 backward in 1.61 ms vs 1.86 (benchmarks/logs/probe_r38_grid_in_place_tuned.log). In
    place is the untuned default."""
    modes = {"auto": (True, False), "in-place": (True,), "permuted": (False,)}
    name = os.environ.get("ATTNZOO_GRID_INPUTS", "auto")
    if name not in modes:
        raise ValueError(f"ATTNZOO_GRID_INPUTS must be one of {sorted(modes)}; got {name!r}")
    return modes[name]


def _with_tile_costs(pattern, candidates):
    """Grid patterns also tune the tile shapes / mask mode: each block config with each variant of
    `_grid_variants()` (the old path's variants are its partial-pair weights 1.25 and 2) and each input mode of
    `_grid_input_modes()`."""
    if not _is_grid(pattern):
        return candidates
    extra = []
    for v in _grid_variants():
        if v == "old":
            extra += [2.0] if (_fast_tune() or len(candidates) == 1) else [1.25, 2.0]
        else:
            extra.append(v)
    return [c[:4] + (pc, in_place) + c[4:] for c in candidates for pc in extra for in_place in _grid_input_modes()]


def _poison() -> bool:
    return os.environ.get("ATTNZOO_KERNEL_POISON", "0") == "1"


def _new(*shape, like, dtype=None):
    """Output buffer; filled with NaN when ATTNZOO_KERNEL_POISON=1 (tests check every element is written)."""
    dtype = like.dtype if dtype is None else dtype
    if _poison():
        return torch.full(shape, float("nan"), device=like.device, dtype=dtype)
    return torch.empty(shape, device=like.device, dtype=dtype)


def _dot_prec(dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _gate4(gate: torch.Tensor) -> torch.Tensor:
    """Gate (B, N, H) or (B, N, H, Dv) as a (B, H, N, 1 | Dv) view."""
    return gate.permute(0, 2, 1)[..., None] if gate.dim() == 3 else gate.permute(0, 2, 1, 3)


def _gate_grad_buffer(gate4: torch.Tensor) -> torch.Tensor:
    """An empty (B, H, N, 1 | Dv) gate gradient laid out as the gate is, (B, N, H[, Dv]): the kernels write it
    through its strides and `_gate_grad` hands it back without a copy (H200: transposing the element-wise gate's
    gradient took 0.047 ms of a 1.80 ms backward)."""
    B, H, N, W = gate4.shape
    return _new(B, N, H, W, like=gate4).permute(0, 2, 1, 3)


class Rel:
    """HaloNet's rel-pos tables for the in-kernel term: tables (2 win - 1, D) in q's dtype, the geometry and the
    kernels' block sizes. On the blocked layout (queries one qb x qb block, keys its win x win window) `grid` is
    None; on a 2-d `Halo` grid pattern it is (query grid width, key grid width, block)."""

    def __init__(self, rh, rw, qb: int, win: int, scale: float, grid: Optional[Tuple[int, int, int]] = None):
        self.rh, self.rw, self.qb, self.win, self.scale = rh.contiguous(), rw.contiguous(), qb, win, scale
        self.grid = grid
        self.nt = 2 * win - 1
        self.block_t, self.block_w = _block_d(self.nt), _block_d(win)

    @property
    def keys_loaded(self) -> bool:
        """Whether the general kernels load the key one-hots (`key_onehots`, REL_KF) instead of building them in
        registers: on the grid (its key classes are coordinates mod win). On the blocked layout loading them ran
        as fast as building them (H200, general kernels: forward 0.1148 vs 0.1145-0.1151 ms, backward 0.489 vs
        0.500 ms; benchmarks/logs/device_r39_grid_relpos_final.log), so they stay built there."""
        return self.grid is not None

    def key_onehots(self, nk: int, dtype, device) -> torch.Tensor:
        """(1, 1, nk, 2 block_w) one-hots of each key's row class, then its column class (the rank-2 block_w key
        factor): on the blocked layout the key's window row and column, on the grid its key-grid coordinates
        mod win."""
        kw = self.grid[1] if self.grid is not None else self.win
        return _rel_key_onehots(nk, kw, self.win, self.block_w, dtype, str(device))

    def kernel_args(self) -> dict:
        """The general kernels' extra rel-pos arguments: the grid geometry (`triton_kernels._rel_query_place`;
        constexpr, so its divisions compile to shifts and multiplies: one compile per grid width) and REL_KF."""
        qw, _, block = self.grid or (1, 1, 0)
        return dict(rel_qw=qw, rel_block=block, REL_KF=self.keys_loaded)


@tensor_cache(maxsize=32)
def _rel_key_onehots(nk: int, kw: int, win: int, block_w: int, dtype, device: str) -> torch.Tensor:
    n = torch.arange(nk, device=device)
    rows, cols = (n // kw) % win, (n % kw) % win
    out = torch.zeros(nk, 2 * block_w, dtype=dtype, device=device)
    out[n, rows] = 1
    out[n, block_w + cols] = 1
    return out[None, None]


def rel_args(rel: Optional[Rel], dummy) -> dict:
    """The rel-pos tables' kernel arguments (placeholders without `rel`), as the general and the few-keys kernels
    take them."""
    if rel is None:
        return dict(RH=dummy, RW=dummy, stride_rt=0, QB=1, WIN=1, rel_scale=0.0, BLOCK_T=16, BLOCK_W=16)
    return dict(RH=rel.rh, RW=rel.rw, stride_rt=rel.rh.stride(0), QB=rel.qb, WIN=rel.win, rel_scale=float(rel.scale),
                BLOCK_T=rel.block_t, BLOCK_W=rel.block_w)


def lr_chain(q: torch.Tensor, factors: Optional[str], scale: Optional[float] = None) -> int:
    """The kernels' LR_CHAIN for a low-rank term whose factors are "loaded" (U_q, U_k from memory) or "rel" (built
    in-kernel from the rel-pos tables, both kernel families); None: no low-rank term. 0: two dots and a sum. Else
    the low-rank dot accumulates into q·kᵀ, with 1: one factor pre-scaled by 1 / scale, or 2: q·kᵀ scaled in
    float32 before the low-rank dot (one multiply per logit more than 1, exact at any scale and dtype).

    1 where the pre-scaled factor is exact and cannot overflow: not float16; the rel-pos factors (computed in
    float32, scaled before their one rounding; the in-kernel rel-pos forward 1.68x -> 1.45x the no-bias time,
    H200); loaded factors in float32, and in 16-bit when 1 / `scale` is a power of two. Elsewhere a pre-scaled
    16-bit factor is rounded again: at 1 / scale = sqrt(32) or sqrt(128) the gradients' error against float64 went
    from ~3e-3 to ~1.5e-2 (r108), so those take 2 (errors as 0; d128 backward 1.144x -> 1.126x the no-bias time,
    forward 1.09x either way; r110). Loaded factors chain at head dims <= 128 (rank 16, form 1: d64 forward
    1.22x -> 1.11x, backward 1.37x -> 1.26x, where 2 gives 1.14x / 1.25x; r106, r110)."""
    if factors is None:
        return 0
    if factors not in ("loaded", "rel"):
        raise ValueError(f"lr_chain: factors must be 'loaded', 'rel' or None, got {factors!r}")
    if factors == "loaded":
        if scale is None:
            raise ValueError("lr_chain: loaded factors need the softmax scale")
        if _block_d(q.shape[-1]) > 128:
            return 0
    if q.dtype == torch.float16:
        return 2
    if factors == "rel" or q.dtype == torch.float32 or math.log2(1.0 / scale).is_integer():
        return 1
    return 2


class _Extras:
    """Optional kernel inputs (bias, low-rank factors, gate, in-kernel rel-pos tables `rel` with, on the grid,
    their key one-hots) in kernel order, with pointer/stride arguments."""

    def __init__(self, prob: _Problem, qp, bias, qf, kf, gate, nq, nk, rel=None):
        self.bias = None if bias is None else prob.bias_in(bias, nq, nk)
        self.qf = None if qf is None else prob.q_in(qf)
        if rel is not None and rel.keys_loaded:
            kf = rel.key_onehots(nk, qp.dtype, qp.device)
        self.kf = None if kf is None else prob.k_in(kf)
        self.gate = None if gate is None else prob.q_in(_gate4(gate))
        self.rel = rel
        # the factors' width: under `rel` the in-kernel factors' (2 BLOCK_W); the dQ kernel then writes dT, the
        # tables' logit gradient, instead of dU_q (`_launch_bwd`)
        self.rank = 2 * rel.block_w if rel is not None else (0 if qf is None else qf.shape[-1])
        self.dummy = qp

    def ptr(self, name):
        t = getattr(self, name)
        return self.dummy if t is None else t

    def kw(self, scale: float):
        r = self.rank
        sb, sqf, skf, sg = _bstrides(self.bias), _bstrides(self.qf), _bstrides(self.kf), _bstrides(self.gate)
        return dict(stride_qfb=sqf[0], stride_qfh=sqf[1], stride_qfn=sqf[2],
                    stride_kfb=skf[0], stride_kfh=skf[1], stride_kfn=skf[2],
                    stride_bb=sb[0], stride_bh=sb[1], stride_bm=sb[2], stride_bn=sb[3],
                    R=max(r, 1), BLOCK_R=_block_d(max(r, 1)), HAS_BIAS=self.bias is not None, HAS_LR=r > 0,
                    LR_CHAIN=lr_chain(self.dummy, "rel" if self.rel is not None else ("loaded" if r else None), scale),
                    HAS_REL=self.rel is not None, **rel_args(self.rel, self.dummy),
                    **(self.rel.kernel_args() if self.rel is not None else {})), sg


def _launch_fwd(qp, kp, vp, ex: _Extras, prob: _Problem, scale: float, cfg, factor=None):
    """(out, lse) in kernel order; `factor` (with `ex.rel`): a (B, H, rows of q, 2 block_w) buffer the kernel
    fills with the rel-pos query factor."""
    from . import triton_kernels as tk

    B, H, NQO, D = qp.shape  # NQO: rows of q and o/lse (tokens in place, else the positions the kernel walks)
    HKV, DV = kp.shape[1], vp.shape[-1]
    NQ, NK = prob.nq, prob.nk  # positions the kernel walks (permuted, padded for grid patterns)
    BM, BN = cfg[:2]
    nqb, nkb = triton_cdiv(NQ, BM), triton_cdiv(NK, BN)
    S, per = (1, max(nkb, 1)) if prob.grid else _splits(nqb * B * H, nkb, qp.device)
    if S == 1:
        out = _new(B, H, NQO, DV, like=qp)
        lse = _new(B, H, NQO, like=qp, dtype=torch.float32)
        so, sl = 0, 0
    else:  # partial results per split, combined below
        out = _new(S, B, H, NQ, DV, like=qp, dtype=torch.float32)
        lse = _new(S, B, H, NQ, like=qp, dtype=torch.float32)
        so, sl = out.stride(0), lse.stride(0)
    o_view = out if S == 1 else out[0]
    full_ptr, full_idx, part_ptr, part_idx = prob.lists(False)
    qlo, qhi, kc = prob.tables()
    kw, sg = ex.kw(scale)
    kw.update(factor_args(factor) if factor is not None else dict(QF=ex.ptr("qf")), STORE_QF=factor is not None)
    fuse_gate = ex.gate is not None and S == 1
    gate_elem = not fuse_gate or ex.gate.shape[-1] > 1
    tk._attn_fwd[(nqb, B * H, S)](
        Q=qp, K=kp, V=vp, O=o_view, LSE=lse, KF=ex.ptr("kf"), BIAS=ex.ptr("bias"),
        GATE=ex.ptr("gate"),
        stride_qb=qp.stride(0), stride_qh=qp.stride(1), stride_qn=qp.stride(2),
        stride_kb=kp.stride(0), stride_kh=kp.stride(1), stride_kn=kp.stride(2),
        stride_vb=vp.stride(0), stride_vh=vp.stride(1), stride_vn=vp.stride(2),
        stride_ob=o_view.stride(0), stride_oh=o_view.stride(1), stride_on=o_view.stride(2),
        stride_gb=sg[0], stride_gh=sg[1], stride_gn=sg[2], stride_gd=sg[3],
        stride_os=so, stride_ls=sl, SPLIT_BLOCKS=per,
        H=H, GROUP=H // HKV, NQ=NQ, NK=NK, qk_scale=scale * tk.LOG2E, OFF=prob.off, LEFT=prob.left,
        RIGHT=prob.right, FULL_PTR=full_ptr, FULL_IDX=full_idx, PART_PTR=part_ptr, PART_IDX=part_idx,
        QLO=qlo, QHI=qhi, KC=kc, DIL0=prob.dil[0], DIL1=prob.dil[1], DIL2=prob.dil[2],
        D=D, DV=DV, BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=_block_d(D), BLOCK_DV=_block_d(DV),
        GRID_MODE=prob.grid, MASK_AXES=prob.mask_axes, HAS_DIL=prob.has_dil,
        REVERSE=isinstance(prob.pattern, Causal), HAS_GATE=fuse_gate, DOT_PREC=_dot_prec(qp.dtype),
        GATE_ELEM=gate_elem,
        GATE_PREFETCH=GATE_PREFETCH and fuse_gate and gate_elem and sg[3] == 1 and not _interpret(),
        Q_IN_REGS=_config_options(cfg, prob.grid)[1] and qp.dtype != torch.float32,
        **_launch_opts(cfg, prob), **prob.pair_args(False), **prob.gather_args(NQO), **kw)
    if S == 1:
        return out, lse
    from .triton_combine import combine_splits

    return combine_splits(out, lse, ex.gate, qp.dtype)  # rows without any key: zeros, lse = -inf


def _launch_bwd(dop, qp, kp, vp, op, lsep, dlsep, ex: _Extras, prob: _Problem, scale: float, cfg,
                need_db: bool, need_lr: bool, rel_factor=None):
    """The gradients in kernel order; `rel_factor`: the rel-pos query factor the forward stored (kernel order),
    else the backward writes it first (`_rel_query_factors`)."""
    from . import triton_kernels as tk

    B, H, NQO, D = qp.shape  # NQO / NKO: rows of q / k and their gradients (tokens in place, else positions walked)
    HKV, NKO, DV = kp.shape[1], kp.shape[2], vp.shape[-1]
    NQ, NK = prob.nq, prob.nk
    BM, BN = cfg[:2]
    f32 = torch.float32
    delta = _new(B, H, NQO, like=qp, dtype=f32)
    gate = ex.gate
    doe, dg = dop, None
    if gate is not None:
        doe = _new(B, H, NQO, DV, like=qp)
        dg = _gate_grad_buffer(gate)
    sg, se, sdg = _bstrides(gate), _bstrides(doe if gate is not None else None), _bstrides(dg)
    tk._bwd_delta[(triton_cdiv(NQO, 64), B * H)](
        O=op, DO=dop, DLSE=dlsep if dlsep is not None else lsep, DELTA=delta, GATE=ex.ptr("gate"), DOE=doe,
        DG=dg if dg is not None else delta,
        stride_ob=op.stride(0), stride_oh=op.stride(1), stride_on=op.stride(2),
        stride_db=dop.stride(0), stride_dh=dop.stride(1), stride_dn=dop.stride(2),
        stride_gb=sg[0], stride_gh=sg[1], stride_gn=sg[2], stride_gd=sg[3],
        stride_eb=se[0], stride_eh=se[1], stride_en=se[2],
        stride_dgb=sdg[0], stride_dgh=sdg[1], stride_dgn=sdg[2], stride_dgd=sdg[3],
        H=H, NQ=NQO, DV=DV, BLOCK_M=64, BLOCK_DV=_block_d(DV), HAS_DLSE=dlsep is not None,
        HAS_GATE=gate is not None, GATE_ELEM=gate is not None and gate.shape[-1] > 1)

    kw, _ = ex.kw(scale)
    r = ex.rank
    nqb, nkb = triton_cdiv(NQ, BM), triton_cdiv(NK, BN)
    qlo, qhi, kc = prob.tables()
    common = dict(H=H, NQ=NQ, NK=NK, qk_scale=scale * tk.LOG2E, sm_scale=scale, OFF=prob.off, LEFT=prob.left,
                  RIGHT=prob.right, QLO=qlo, QHI=qhi, KC=kc, DIL0=prob.dil[0], DIL1=prob.dil[1], DIL2=prob.dil[2],
                  D=D, DV=DV, BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=_block_d(D), BLOCK_DV=_block_d(DV),
                  GRID_MODE=prob.grid, MASK_AXES=prob.mask_axes, HAS_DIL=prob.has_dil, DOT_PREC=_dot_prec(qp.dtype),
                  **_launch_opts(cfg, prob), **{"NQO": NQO, **prob.gather_args(NQO)}, **kw)
    qkv = dict(Q=qp, K=kp, V=vp, DO=doe, LSE=lsep, DELTA=delta, QF=ex.ptr("qf"), KF=ex.ptr("kf"),
               BIAS=ex.ptr("bias"),
               stride_qb=qp.stride(0), stride_qh=qp.stride(1), stride_qn=qp.stride(2),
               stride_kb=kp.stride(0), stride_kh=kp.stride(1), stride_kn=kp.stride(2),
               stride_vb=vp.stride(0), stride_vh=vp.stride(1), stride_vn=vp.stride(2),
               stride_db=doe.stride(0), stride_dh=doe.stride(1), stride_dn=doe.stride(2))

    # dK/dV (+ dS for the bias, + dU_k): one program per key block, query blocks split when keys are few
    store_db = need_db and ex.bias is not None
    db = None
    if store_db:
        db = _bias_grad_buffer(prob, (B, H, NQO, NKO), qp, ds_dtype(ex.bias, (B, H, NQO, NKO)))
    S, per = (1, max(nqb, 1)) if prob.grid else _splits(nkb * B * HKV, nqb, qp.device, min_blocks=4)
    r_k = 0 if ex.rel is not None else r  # the rel-pos key factor is a constant: no dU_k
    if S == 1:
        dk, dv = _new(B, HKV, NKO, D, like=qp), _new(B, HKV, NKO, DV, like=qp)
        duk = _new(B, H, NKO, r_k, like=qp, dtype=f32) if r_k else None
    else:
        dk, dv = _new(S, B, HKV, NK, D, like=qp, dtype=f32), _new(S, B, HKV, NK, DV, like=qp, dtype=f32)
        duk = _new(S, B, H, NK, r_k, like=qp, dtype=f32) if r_k else None
    dk0, dv0 = (dk, dv) if S == 1 else (dk[0], dv[0])
    duk0 = None if duk is None else (duk if S == 1 else duk[0])
    sdb, sduk = _bstrides(db), _bstrides(duk0)
    # the rel-pos query factor, once per query block, which the dK/dV and dQ kernels load
    if ex.rel is None:
        rel_qf = {}
    elif rel_factor is not None:
        CALLS["general_bwd_rel_factor_loaded"] += 1
        rel_qf = factor_args(rel_factor)
    else:
        rel_qf = _rel_query_factors(qp, ex.rel, prob, NQ, scale, kw["LR_CHAIN"])
    dkdv_args = {**qkv, **common, **rel_qf}
    tk._attn_bwd_dkdv[(nkb, B * HKV, S)](
        DK=dk0, DV_=dv0, DB=db if db is not None else delta, DUK=duk0 if duk0 is not None else delta,
        stride_dkb=dk0.stride(0), stride_dkh=dk0.stride(1), stride_dkn=dk0.stride(2),
        stride_dvb=dv0.stride(0), stride_dvh=dv0.stride(1), stride_dvn=dv0.stride(2),
        stride_dbb=sdb[0], stride_dbh=sdb[1], stride_dbm=sdb[2], stride_dbn=sdb[3],
        stride_dukb=sduk[0], stride_dukh=sduk[1], stride_dukn=sduk[2],
        stride_dks=dk.stride(0) if S > 1 else 0, stride_dvs=dv.stride(0) if S > 1 else 0,
        stride_duks=duk.stride(0) if (S > 1 and duk is not None) else 0, SPLIT_BLOCKS=per,
        HKV=HKV, GROUP=H // HKV, FULL_PTR=prob.lists(True)[0], FULL_IDX=prob.lists(True)[1],
        PART_PTR=prob.lists(True)[2], PART_IDX=prob.lists(True)[3], STORE_DB=store_db,
        BATCH_MINOR=B > 1 and ex.bias is not None and _bstrides(ex.bias)[0] == 0, **prob.pair_args(True),
        **dkdv_args)
    if S > 1:
        dk, dv = sum_over_leading(dk, qp.dtype), sum_over_leading(dv, qp.dtype)
        duk = None if duk is None else sum_over_leading(duk)

    if pair_sum(db, ex.bias, prob, qp.dtype, ex.rel is not None or r > 0):
        dq, dbias = _dq_pair(qkv, db, ex.bias.dtype, prob, cfg, common, nqb, nkb)
        return dq, dk, dv, dbias, None, None, dg

    # dQ (+ dU_q, or the rel-pos tables' logit gradient dT, (2 win - 1) columns per table): one program per
    # query block, key blocks split when queries are few
    S, per = (1, max(nkb, 1)) if prob.grid else _splits(nqb * B * H, nkb, qp.device, min_blocks=4)
    r_q, dt_q = (2 * ex.rel.nt, qp.dtype) if ex.rel is not None else (r, f32)
    if S == 1:
        dq = _new(B, H, NQO, D, like=qp)
        duq = _new(B, H, NQO, r_q, like=qp, dtype=dt_q) if r else None
    else:
        dq = _new(S, B, H, NQ, D, like=qp, dtype=f32)
        duq = _new(S, B, H, NQ, r_q, like=qp, dtype=f32) if r else None
    dq0 = dq if S == 1 else dq[0]
    duq0 = None if duq is None else (duq if S == 1 else duq[0])
    sduq = _bstrides(duq0)
    dq_args = {**qkv, **common, **rel_qf}
    if ds_stored(db, qp.dtype, ex.rel is not None or r > 0):  # dQ = dS · K from the stored dS: no recompute
        dq_args.update(BIAS=db, stride_bb=sdb[0], stride_bh=sdb[1], stride_bm=sdb[2], stride_bn=sdb[3],
                       DS_STORED=True)
        CALLS["general_dq_ds_stored"] += 1
    tk._attn_bwd_dq[(nqb, B * H, S)](
        DQ=dq0, DUQ=duq0 if duq0 is not None else delta,
        stride_dqb=dq0.stride(0), stride_dqh=dq0.stride(1), stride_dqn=dq0.stride(2),
        stride_duqb=sduq[0], stride_duqh=sduq[1], stride_duqn=sduq[2],
        stride_dqs=dq.stride(0) if S > 1 else 0, stride_duqs=duq.stride(0) if (S > 1 and duq is not None) else 0,
        SPLIT_BLOCKS=per, GROUP=H // HKV, FULL_PTR=prob.lists(False)[0], FULL_IDX=prob.lists(False)[1],
        PART_PTR=prob.lists(False)[2], PART_IDX=prob.lists(False)[3], **prob.pair_args(False), **dq_args)
    if S > 1:
        dq = sum_over_leading(dq, qp.dtype)
        duq = None if duq is None else sum_over_leading(duq)
    return dq, dk, dv, db, duq, duk, dg


def _bias_grad_buffer(prob: _Problem, shape: Tuple[int, ...], like: torch.Tensor, dtype: torch.dtype):
    """A buffer the kernels write a bias gradient (or dS) into: uninitialised under a dense pattern, whose tiles
    are all written; zeros otherwise, since tiles no query sees are never visited."""
    if isinstance(prob.pattern, Dense):
        return _new(*shape, like=like, dtype=dtype)
    return torch.zeros(shape, device=like.device, dtype=dtype)


def pair_sum(db: Optional[torch.Tensor], bias4: Optional[torch.Tensor], prob: _Problem, q_dtype: torch.dtype,
             factors: bool) -> bool:
    """Whether the dQ kernel of a batch of two also writes the gradient of a bias the pair shares per head
    (`triton_kernels._attn_bwd_dq_pair`): dS stored (`ds_stored`), a 1-d pattern, the bias (1, H, Nq, Nk)."""
    return (ds_stored(db, q_dtype, factors) and not prob.grid and db.shape[0] == 2 and bias4.shape[0] == 1
            and bias4.shape[1] == db.shape[1])


def _dq_pair(qkv: dict, db: torch.Tensor, bias_dtype: torch.dtype, prob: _Problem, cfg, common: dict, nqb: int,
             nkb: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(dq, the pair's bias gradient (1, H, Nq, Nk)) from the stored dS `db` of a batch of two (`pair_sum`)."""
    from . import triton_kernels as tk

    kp, qp = qkv["K"], qkv["Q"]
    _, H, NQ, NK = db.shape
    D = qp.shape[-1]
    S, per = _splits(nqb * H, nkb, qp.device, min_blocks=4)
    dq = _new(2, H, NQ, D, like=qp) if S == 1 else _new(S, 2, H, NQ, D, like=qp, dtype=torch.float32)
    dq0 = dq if S == 1 else dq[0]
    dbias = _bias_grad_buffer(prob, (1, H, NQ, NK), qp, bias_dtype)
    tk._attn_bwd_dq_pair[(nqb, H, S)](
        DS=db, K=kp, DQ=dq0, DB=dbias, stride_sb=db.stride(0), stride_sh=db.stride(1), stride_sm=db.stride(2),
        stride_sn=db.stride(3), stride_kb=kp.stride(0), stride_kh=kp.stride(1), stride_kn=kp.stride(2),
        stride_dqb=dq0.stride(0), stride_dqh=dq0.stride(1), stride_dqn=dq0.stride(2),
        stride_dqs=dq.stride(0) if S > 1 else 0, stride_dbh=dbias.stride(1), stride_dbm=dbias.stride(2),
        stride_dbn=dbias.stride(3), SPLIT_BLOCKS=per, GROUP=H // kp.shape[1], NQ=NQ, NK=NK,
        sm_scale=common["sm_scale"], OFF=prob.off, LEFT=prob.left, RIGHT=prob.right, D=D,
        BLOCK_M=common["BLOCK_M"], BLOCK_N=common["BLOCK_N"], BLOCK_D=common["BLOCK_D"],
        DOT_PREC=common["DOT_PREC"], **_launch_opts(cfg, prob))
    CALLS["general_dq_pair_sum"] += 1
    if S > 1:
        dq = sum_over_leading(dq, qp.dtype)
    return dq, dbias


REL_FACTOR_LAUNCH = (128, 4)  # `_rel_factor_bwd`'s (BLOCK_M, num_warps): H200, Halo grid 0.040 -> 0.031 ms vs (64, 4)


def factor_args(factor: Optional[torch.Tensor], dummy: Optional[torch.Tensor] = None) -> dict:
    """The kernels' QF argument and strides for a (B, H, rows, R) query factor; without one, `dummy` and zero
    strides."""
    if factor is None:
        return dict(QF=dummy, stride_qfb=0, stride_qfh=0, stride_qfn=0)
    return dict(QF=factor, stride_qfb=factor.stride(0), stride_qfh=factor.stride(1), stride_qfn=factor.stride(2))


def _rel_query_factors(qp, rel: Rel, prob: _Problem, nq: int, scale: float, lr_chain_: int) -> dict:
    """The rel-pos query factor of every query row (`triton_kernels._rel_factor_bwd`: (B, H, rows, 2 block_w) in
    q's dtype, pre-scaled as the logits take it), as the dK/dV and dQ kernels' QF arguments. The dK/dV kernel visits
    each query block once per key block that sees it, and rebuilding the factor there (a dot against the tables
    and a gather per visit) doubled its time on the Halo grid; the dQ kernel's rebuild was ~650 SASS instructions
    per warp of index arithmetic and gather (`scripts/sass_lines.py`)."""
    from . import triton_kernels as tk

    B, H, rows, D = qp.shape
    uq = _new(B, H, rows, 2 * rel.block_w, like=qp)
    geometry = rel.kernel_args()
    block_m, warps = REL_FACTOR_LAUNCH
    tk._rel_factor_bwd[(triton_cdiv(nq, block_m), B * H)](
        Q=qp, RH=rel.rh, RW=rel.rw, UQ=uq, QROW=prob.map.q_rows if prob.grid else _dummy_int(qp.device),
        stride_qb=qp.stride(0), stride_qh=qp.stride(1), stride_qn=qp.stride(2),
        stride_ub=uq.stride(0), stride_uh=uq.stride(1), stride_un=uq.stride(2), stride_rt=rel.rh.stride(0),
        H=H, NQ=nq, rel_scale=float(rel.scale), inv_scale=1.0 / scale, rel_qw=geometry["rel_qw"],
        rel_block=geometry["rel_block"],
        D=D, BLOCK_M=block_m, BLOCK_D=_block_d(D), QB=rel.qb, WIN=rel.win, BLOCK_T=rel.block_t,
        BLOCK_W=rel.block_w, LR_CHAIN=lr_chain_, DOT_PREC=_dot_prec(qp.dtype), GRID_MODE=prob.grid,
        GATHER=prob.gather, num_warps=warps)
    return factor_args(uq)


def ds_dtype(bias4: torch.Tensor, full: Tuple[int, int, int, int]) -> torch.dtype:
    """dtype of the kernels' dS buffer for a dense bias `bias4` of a `full` (B, H, Nq, Nk) problem: the bias's own
    (a float32 buffer and its cast pass were the largest costs of a bias backward; a sum over broadcast dims,
    `_reduce_to`, accumulates in float32; the dQ kernel may read the buffer back, `ds_stored`), except float16
    summed over broadcast dims: its per-element values would leave float16's range (subnormals below 6e-5) before
    the sum; float32 then."""
    if bias4.dtype == torch.float16 and tuple(bias4.shape) != tuple(full):
        return torch.float32
    return bias4.dtype


def ds_stored(db: Optional[torch.Tensor], q_dtype: torch.dtype, factors: bool) -> bool:
    """Whether the dQ kernel takes dS from the dK/dV kernel's bias-gradient buffer `db` (one load and one dot per
    tile) instead of recomputing it. It rounds dS to q's dtype either way, so the result is the same when `db`
    holds q's dtype or float32; a float16 buffer under bfloat16 q (or the reverse) would round twice (a review
    probe: 10x dq's error). Not with low-rank or rel-pos `factors` next to the bias (not reachable through
    `kernels.attention`, which takes one bias): their dU_q would need the factor loads back."""
    return db is not None and not factors and db.dtype in (q_dtype, torch.float32)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _tune_key(kind, pattern, q, k, v, feats=()):
    shape_class = (q.shape[-1], v.shape[-1], q.dtype, q.shape[1] // k.shape[1] > 1) + tuple(feats)
    if _is_grid(pattern):
        return (kind, pattern, _grid_variants(), _grid_input_modes()) + shape_class
    if isinstance(pattern, Window1d):
        return (kind, pattern) + shape_class
    return (kind, type(pattern).__name__, _next_pow2(q.shape[2]), _next_pow2(k.shape[2])) + shape_class


_HOST_COVER_CYCLES = 2_000_000  # ~1 ms of GPU clock: longer than the host needs to queue one call


def _time_cfg(run, cfg, repeats: int) -> List[float]:
    """GPU milliseconds of `run(cfg)`, `repeats` times. Each call is queued behind a ~1 ms GPU sleep, so the
    events bracket the kernels only: without it a call shorter than its host-side launch (~0.1-0.5 ms on the
    device's CPU) is timed as the launch, and configs of small problems are ranked by noise."""
    ts = []
    sleep = getattr(torch.cuda, "_sleep", None)
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if sleep is not None:
            sleep(_HOST_COVER_CYCLES)
        start.record()
        run(cfg)
        end.record()
        end.synchronize()
        ts.append(start.elapsed_time(end))
    return ts


def _warm_shard() -> Optional[Tuple[int, int]]:
    """ATTNZOO_WARM="i/n": this process only compiles the autotune candidates whose index is i mod n and takes
    one of them untimed, so n processes fill a shared TRITON_CACHE_DIR in parallel before a timed run."""
    spec = os.environ.get("ATTNZOO_WARM")
    if not spec:
        return None
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise ValueError(f"ATTNZOO_WARM must be 'i/n' with 0 <= i < n; got {spec!r}") from None
    if not 0 <= i < n:
        raise ValueError(f"ATTNZOO_WARM must be 'i/n' with 0 <= i < n; got {spec!r}")
    return i, n


_LONG_MS = 2.0  # kernels at least this long get a second, longer round for the best few configs


def _autotune(key, candidates, run) -> tuple:
    """Pick the fastest candidate config for `key`; cached per process. `candidates`: a list, or a function
    returning one (built only on the first call of a key: repeat calls cost a dict lookup).

    CUDA events; each candidate is run once (compile, warm-up) and timed 5 times, scored by its minimum (noise on
    a GPU only ever adds time). When the best takes >= `_LONG_MS` (the 3-d neighbourhood: ~100 ms a call, where
    run-to-run spread of several percent picked a worse config on a median of 3), the best 3 are timed again
    in 3 interleaved rounds of 3 (drift hits all alike) and the minimum over all their runs decides."""
    if key in _BEST:
        return _BEST[key]
    if callable(candidates):
        candidates = candidates()
    on_gpu = torch.cuda.is_available() and not _interpret()
    if not on_gpu:
        return candidates[0]
    if len(candidates) == 1:
        _BEST[key] = candidates[0]
        return candidates[0]
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    shard = _warm_shard()
    if shard is not None:  # compile this shard's configs, time nothing (scripts/warm_triton_cache.py)
        picked = None
        for j, cfg in enumerate(candidates):
            if j % shard[1] != shard[0]:
                continue
            try:
                run(cfg)
            except (OutOfResources, CompilationError) as err:
                logger.debug("warm %s: config %s failed: %s", key, cfg, err)
                continue
            picked = picked or cfg
        _BEST[key] = picked or candidates[0]
        return _BEST[key]
    if os.environ.get("ATTNZOO_AUTOTUNE", "1") == "0":  # no timing: the first config that fits this GPU
        for cfg in candidates:
            try:
                run(cfg)
            except (OutOfResources, CompilationError) as err:
                logger.debug("autotune %s: config %s failed: %s", key, cfg, err)
                continue
            _BEST[key] = cfg
            return cfg
        raise RuntimeError(f"no kernel config could run for {key}")

    timings: Dict[tuple, List[float]] = {}
    for cfg in candidates:
        try:
            run(cfg)
            torch.cuda.synchronize()
            timings[cfg] = _time_cfg(run, cfg, 5)
        except (OutOfResources, CompilationError) as err:
            logger.debug("autotune %s: config %s failed: %s", key, cfg, err)
    if not timings:
        raise RuntimeError(f"no kernel config could run for {key}")
    ranked = sorted(timings, key=lambda c: min(timings[c]))
    if min(timings[ranked[0]]) >= _LONG_MS and len(ranked) > 1:
        for _ in range(3):
            for cfg in ranked[:3]:
                timings[cfg] += _time_cfg(run, cfg, 3)
    best = min(timings, key=lambda c: min(timings[c]))
    logger.debug("autotune %s: %s", key, {c: round(min(t), 4) for c, t in timings.items()})
    _BEST[key] = best
    _TIMINGS[key] = {c: min(t) for c, t in timings.items()}
    return best


_TIMINGS: Dict[tuple, Dict[tuple, float]] = {}  # per tune key: best time (ms) of every config tried


def _feats(bias, qf, gate, q, rel=None):
    """Tune-key features of the optional terms. A dense bias's: its dtype (which decides whether the dQ kernel
    reads the stored dS back, `ds_stored`) and whether the batch shares it (the dK/dV kernel's batch-minor order).
    The in-kernel rel-pos term's: its geometry and the (b, h) count (the few-keys kernels it is tuned against walk
    (b, h) items)."""
    bias_feat = "" if bias is None else f"bias:{str(bias.dtype)[6:]}:{'shared' if bias.shape[0] < q.shape[0] else 'b'}"
    return (bias_feat, _block_d(qf.shape[-1]) if qf is not None else 0, "gate" if gate is not None else "") + \
        (() if rel is None else ("rel", rel.qb, rel.win, _next_pow2(q.shape[0] * q.shape[1])))


# ----------------------------------------------------------------------------------------------------------
# skinny dense problems (kernels.backends.triton_skinny)


def _skinny_mode() -> str:
    """ATTNZOO_SKINNY: "auto" (default: the skinny kernels and the general ones are autotune candidates of one key,
    skinny first), "old" (general kernels only; also "0"), "new" (skinny kernels only; also "1")."""
    mode = os.environ.get("ATTNZOO_SKINNY", "auto")
    return "old" if mode == "0" else ("new" if mode == "1" else mode)


def _skinny_kind(pattern, q, k, v, qf, rel=None) -> Optional[str]:
    """"keys" (Nk fits one tile: Nk <= 256 at head dims <= 64, <= 64 at <= 128), "queries" (H/Hkv · Nq <= 256
    rows and more keys than that; not with the in-kernel rel-pos term `rel`), or None (general kernels). Dense
    pattern, dense bias or none, no low-rank factors."""
    if _skinny_mode() == "old" or qf is not None or not isinstance(pattern, Dense):
        return None
    bd = max(_block_d(q.shape[-1]), _block_d(v.shape[-1]))
    max_keys = 256 if bd <= 64 else (64 if bd <= 128 else 0)
    nk, rows = k.shape[2], q.shape[1] // k.shape[1] * q.shape[2]
    if nk <= max_keys:
        return "keys"
    if bd <= 128 and rows <= 256 and rel is None:
        return "queries"
    return None


def _skinny_feat(pattern, q, k, v, qf, rel=None) -> tuple:
    """The tune-key feature of the skinny kernels: (kind, mode), or () when they do not apply."""
    kind = _skinny_kind(pattern, q, k, v, qf, rel)
    return () if kind is None else (kind, _skinny_mode())


def _with_skinny(cands, backward: bool, sk_feat: tuple, q, k, v):
    """Candidates with the skinny kernels' configs ("skinny", kind, cfg) in front (per `sk_feat`)."""
    if not sk_feat:
        return cands
    from . import triton_skinny as sk

    kind, mode = sk_feat
    if kind == "keys":
        sc = sk.keys_candidates(q.shape[2], k.shape[2], q.shape[-1], v.shape[-1], backward)
    else:
        sc = sk.queries_candidates(q.shape[1] // k.shape[1] * q.shape[2], max(q.shape[-1], v.shape[-1]), backward)
    sc = [("skinny", kind, c) for c in sc]
    return sc if mode == "new" else sc + list(cands)


def _skinny_run(cfg, backward, q, k, v, bias, gate, scale, do=None, out=None, lse=None, dlse=None, need_db=False,
                rel=None, save_factor=False, rel_factor=None):
    """Run a skinny config; returns (identity problem, results in the form of `_forward`'s / `_backward`'s runs)."""
    from . import triton_skinny as sk

    prob = _Problem(Dense(), q.shape[2], k.shape[2], 64, 64, q.device)
    kind, c = cfg[1], cfg[2]
    if not backward:
        if kind == "keys":
            return prob, sk.keys_forward(q, k, v, bias, gate, scale, c, rel, save_factor)
        return prob, (*sk.queries_forward(q, k, v, bias, gate, scale, c), None)
    if kind == "keys":
        dq, dk, dv, db, dg, drel = sk.keys_backward(do, q, k, v, out, lse, dlse, bias, gate, scale, c, need_db, rel,
                                                    rel_factor)
    else:  # never with `rel` (`_skinny_kind`)
        dq, dk, dv, db, dg = sk.queries_backward(do, q, k, v, out, lse, dlse, bias, gate, scale, c, need_db)
        drel = None
    return prob, (dq, dk, dv, db, *(drel or (None, None)), dg)


# ----------------------------------------------------------------------------------------------------------
# forward / backward on the original (B, H, N, D) layout


def _forward(q, k, v, bias, qf, kf, gate, pattern, scale, rel: Optional[Rel] = None, save_factor: bool = False):
    """(out, lse, rel-pos query factor | None); `rel`: HaloNet's rel-pos tables for the in-kernel term (Dense
    pattern on the blocked layout, or a 2-d Halo grid; no bias or factors). `save_factor` (with `rel`): also return
    the query factor, (B, H, Nq, 2 block_w) in token order, for the backward to load (`_backward`'s `rel_factor`):
    the kernels compute it anyway, and the backward otherwise rebuilds it (a dot and a gather per query block)."""
    nq, nk = q.shape[2], k.shape[2]
    save_factor = save_factor and rel is not None

    def run(cfg):
        """(out, lse, factor | None) in token order; a grid config's permuted copies are part of its call (and of
        its time when tuned: in-place and permuted inputs compete)."""
        if cfg[0] == "skinny":  # kernels.backends.triton_skinny: few keys / few queries
            return _skinny_run(cfg, False, q, k, v, bias, gate, scale, rel=rel, save_factor=save_factor)[1]
        if rel is not None:
            CALLS["general_fwd_rel"] += 1
        prob = _problem(pattern, nq, nk, cfg, q.device)
        ins = (prob.q_in(q), prob.k_in(k), prob.k_in(v))
        factor = _new(*ins[0].shape[:3], 2 * rel.block_w, like=ins[0]) if save_factor else None
        out, lse = _launch_fwd(*ins, _Extras(prob, ins[0], bias, qf, kf, gate, nq, nk, rel), prob, scale, cfg,
                               factor)
        return prob.q_out(out), prob.q_out(lse[..., None])[..., 0], None if factor is None else prob.q_out(factor)

    sk_feat = _skinny_feat(pattern, q, k, v, qf, rel)
    cfg = _autotune(_tune_key("fwd", pattern, q, k, v, _feats(bias, qf, gate, q, rel) + sk_feat +
                              (("save_factor",) if save_factor else ())),
                    lambda: _with_tile_costs(pattern, _with_skinny(_short_loop_candidates(
                        _skinny_candidates(_fwd_candidates(q.shape[-1], v.shape[-1]), nk), pattern, q.shape[-1],
                        v.shape[-1], nk, rel is not None), False, sk_feat, q, k, v)),
                    run)
    return run(cfg)


def sum_over_leading(x: torch.Tensor, dtype: Optional[torch.dtype] = None, lead: int = 1) -> torch.Tensor:
    """`x.sum(dims < lead).to(dtype)` of a contiguous tensor (per-split partials, a gradient summed over the batch)
    in one streaming pass (`triton_kernels.sum_leading`: float32 sums, one rounding), shaped `x.shape[lead:]`.
    Torch took two launches (sum, cast) per tensor, and its leading-dim reduction ran at 1.6 TB/s on an H200."""
    from . import triton_kernels as tk

    if not x.is_contiguous() or not 1 <= lead <= x.dim():
        raise ValueError(f"sum_over_leading: x must be contiguous with 1 <= lead <= {x.dim()}, got "
                         f"contiguous={x.is_contiguous()} lead={lead}")
    out = _new(*x.shape[lead:], like=x, dtype=dtype or x.dtype)
    tk.sum_leading[(max(1, triton_cdiv(out.numel(), 4096)),)](x, out, math.prod(x.shape[:lead]), out.numel(),
                                                              BLOCK=4096, num_warps=8)
    return out


def _reduce_to(g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Sum a full-size gradient over the dims where `like` broadcasts (size 1), in `like`'s dtype. Leading dims of
    a contiguous gradient (a bias shared by the batch, or by batch and heads) go through one streaming kernel
    (`sum_over_leading`), the rest through torch."""
    dims = [i for i, (a, b) in enumerate(zip(like.shape, g.shape)) if a == 1 and b != 1]
    if not dims:
        return g.to(like.dtype)
    lead = dims[-1] + 1  # summed dims (and size-1 ones) before every kept dim: a (rows, rest) view
    if (all(i in dims or g.shape[i] == 1 for i in range(lead)) and g.is_contiguous()
            and (g.is_cuda or _interpret()) and g.numel() >= 2 ** 16):
        CALLS["bias_grad_sum_leading"] += 1
        return sum_over_leading(g, like.dtype, lead).view((1,) * lead + tuple(g.shape[lead:]))
    return g.sum(dim=dims, keepdim=True).to(like.dtype)


def _backward(do, q, k, v, out, lse, dlse, bias, qf, kf, gate, pattern, scale, need_db, need_lr,
              rel: Optional[Rel] = None, rel_factor: Optional[torch.Tensor] = None):
    """(dq, dk, dv, dbias, dqf, dkf, dgate); under `rel` (as `_forward`, with `need_lr`) the tables' gradients
    d R_h and d R_w take dqf's and dkf's places. `rel_factor`: the query factor `_forward` saved (token order), or
    None to rebuild it."""
    nq, nk = q.shape[2], k.shape[2]
    rel_factor = rel_factor if rel is not None else None

    def run(cfg):
        """The gradients in token order and the inputs' layouts: a permuted config's copies, in and out, are part
        of its call, and of its time when tuned."""
        if cfg[0] == "skinny":  # kernels.backends.triton_skinny: few keys / few queries
            return _grads_out(*_skinny_run(cfg, True, q, k, v, bias, gate, scale, do, out, lse, dlse, need_db, rel,
                                           rel_factor=rel_factor))
        if rel is not None:
            CALLS["general_bwd_rel"] += 1
        prob = _problem(pattern, nq, nk, cfg, q.device)
        qp = prob.q_in(q)
        ins = (prob.q_in(do), qp, prob.k_in(k), prob.k_in(v), prob.q_in(out),
               prob.q_in(lse[..., None])[..., 0].contiguous(),
               None if dlse is None else prob.q_in(dlse.float()[..., None])[..., 0].contiguous(),
               _Extras(prob, qp, bias, qf, kf, gate, nq, nk, rel))
        dq, dk, dv, db, duq, duk, dg = _launch_bwd(*ins, prob, scale, cfg, need_db, need_lr,
                                                   None if rel_factor is None else prob.q_in(rel_factor))
        if rel is not None:  # the dQ kernel stored dT: the tables' gradient is one GEMM (R_h's rows, then R_w's)
            dr = torch.einsum("bhnt,bhnd->td", prob.q_out(duq).to(q.dtype), q)
            duq, duk = dr[:rel.nt].clone(), dr[rel.nt:].clone()  # a custom op's outputs must not alias
        return _grads_out(prob, (dq, dk, dv, db, duq, duk, dg))

    def _grads_out(prob, grads):
        """(dq, dk, dv, db, dU_q | d R_h, dU_k | d R_w, dg) in kernel order -> the returned gradients."""
        dq, dk, dv, db, duq, duk, dg = grads
        dq, dk, dv = prob.q_out(dq), prob.k_out(dk), prob.k_out(dv)
        dbias = dqf = dkf = dgate = None
        if db is not None:
            dbias = _reduce_to(prob.bias_out(db), bias)
        if rel is not None:
            dqf, dkf = duq.to(rel.rh.dtype), duk.to(rel.rw.dtype)
        elif qf is not None and need_lr:
            dqf = _reduce_to(prob.q_out(duq), qf)
            dkf = _reduce_to(prob.k_out(duk), kf)
        if dg is not None:
            dgate = _gate_grad(prob.q_out(dg), gate)
        return dq, dk, dv, dbias, dqf, dkf, dgate

    sk_feat = _skinny_feat(pattern, q, k, v, qf, rel)
    feats = _feats(bias, qf, gate, q, rel) + (need_db,) + sk_feat + (("rel_factor",) if rel_factor is not None else ())
    cfg = _autotune(_tune_key("bwd", pattern, q, k, v, feats),
                    lambda: _with_tile_costs(pattern, _with_skinny(
                        _skinny_candidates(_bwd_candidates(q.shape[-1], v.shape[-1]), nk), True, sk_feat, q, k, v)),
                    run)
    return run(cfg)


def _gate_grad(dg: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """The kernels' gate gradient (B, H, N, 1 | Dv) in the gate's layout (B, N, H[, Dv]) and dtype."""
    return (dg[..., 0].permute(0, 2, 1) if gate.dim() == 3 else dg.permute(0, 2, 1, 3)).to(gate.dtype)


# ----------------------------------------------------------------------------------------------------------
# torch custom ops


def _attention_fwd_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],
                      q_factor: Optional[torch.Tensor], k_factor: Optional[torch.Tensor],
                      gate: Optional[torch.Tensor], pattern_key: str,
                      scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    out, lse, _ = _forward(q, k, v, bias, q_factor, k_factor, gate, pattern_from_key(pattern_key), scale)
    return out.contiguous(), lse.contiguous()


_attention_fwd_op = torch.library.custom_op("attnzoo::attention_fwd", mutates_args=())(_attention_fwd_impl)


@_attention_fwd_op.register_fake
def _(q, k, v, bias, q_factor, k_factor, gate, pattern_key, scale):
    B, H, NQ, _ = q.shape
    return q.new_empty(B, H, NQ, v.shape[-1]), q.new_empty(B, H, NQ, dtype=torch.float32)


def _grad_like(x: Optional[torch.Tensor]) -> torch.Tensor:
    return torch.empty(0, device="meta") if x is None else torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _attention_bwd_impl(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                      lse: torch.Tensor, dlse: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                      q_factor: Optional[torch.Tensor], k_factor: Optional[torch.Tensor],
                      gate: Optional[torch.Tensor], pattern_key: str, scale: float, need_bias_grad: bool,
                      need_factor_grad: bool) -> List[torch.Tensor]:
    grads = _backward(do, q, k, v, out, lse, dlse, bias, q_factor, k_factor, gate, pattern_from_key(pattern_key), scale,
                      need_bias_grad, need_factor_grad)
    return [g.contiguous() if g is not None else q.new_empty(0) for g in grads]


_attention_bwd_op = torch.library.custom_op("attnzoo::attention_bwd", mutates_args=())(_attention_bwd_impl)


@_attention_bwd_op.register_fake
def _(do, q, k, v, out, lse, dlse, bias, q_factor, k_factor, gate, pattern_key, scale, need_bias_grad,
      need_factor_grad):
    def like(x, needed):
        return torch.empty_like(x, memory_format=torch.contiguous_format) if (x is not None and needed) \
            else q.new_empty(0)

    return [like(q, True), like(k, True), like(v, True), like(bias, need_bias_grad),
            like(q_factor, need_factor_grad), like(k_factor, need_factor_grad), like(gate, True)]


def _setup_context(ctx, inputs, output):
    q, k, v, bias, qf, kf, gate, pattern_key, scale = inputs
    out, lse = output
    ctx.set_materialize_grads(False)  # an unused lse gets no zero-filled gradient (the kernels skip HAS_DLSE)
    ctx.save_for_backward(q, k, v, out, lse, bias, qf, kf, gate)
    ctx.pattern_key, ctx.scale = pattern_key, scale


def _attention_backward(ctx, dout, dlse, bwd=_attention_bwd_op):
    q, k, v, out, lse, bias, qf, kf, gate = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    need = ctx.needs_input_grad
    need_db = bias is not None and need[3]
    need_lr = qf is not None and (need[4] or need[5])
    dq, dk, dv, dbias, dqf, dkf, dgate = bwd(dout, q, k, v, out, lse, dlse, bias, qf, kf, gate, ctx.pattern_key,
                                             ctx.scale, need_db, need_lr)
    return (dq, dk, dv, dbias if need_db else None, dqf if need_lr else None, dkf if need_lr else None,
            dgate if gate is not None else None, None, None)


_attention_fwd_op.register_autograd(_attention_backward, setup_context=_setup_context)


def _eager_twin(name, fwd_impl, setup_context, backward, bwd_impl):
    """An autograd.Function with a custom op's forward, context and backward, calling the implementations
    directly. Eager calls take it: the dispatcher's custom-op layer costs ~0.1 ms of CPU per call, which made
    small attention calls (agent tokens, HaloNet blocks) CPU-bound; torch.compile traces the custom op."""

    def fwd(ctx, *args):  # the ctx-taking form: a separate setup_context binds defaults via inspect per call
        output = fwd_impl(*args)
        setup_context(ctx, args, output)
        return output

    def bwd(ctx, *grads):
        return backward(ctx, *grads, bwd=bwd_impl)

    return type(name, (torch.autograd.Function,), dict(forward=staticmethod(fwd), backward=staticmethod(bwd)))


_AttentionFunction = _eager_twin("_AttentionFunction", _attention_fwd_impl, _setup_context, _attention_backward,
                                 _attention_bwd_impl)


# HaloNet's relative-position bias computed inside the kernels: on the blocked layout by the general ones (`HAS_REL`)
# and, for few keys, the few-keys kernels of `triton_skinny` (autotune candidates of one key, as `ATTNZOO_SKINNY`
# says; `_forward`/`_backward` with `rel` dispatch both); on a 2-d Halo grid by the general ones (`grid_key`: the
# pattern's key; "" on the blocked layout). ATTNZOO_RELPOS=lowrank keeps the torch lowering to low-rank factors


def _rel_problem(rh, rw, qb: int, win: int, rel_scale: float, grid_key: str):
    """(pattern, Rel) of a relpos op call."""
    if not grid_key:
        return Dense(), Rel(rh, rw, qb, win, rel_scale)
    p = pattern_from_key(grid_key)
    return p, Rel(rh, rw, qb, win, rel_scale, (p.grid[1], p.key_grid[1], p.block))


def _relpos_fwd_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rh: torch.Tensor, rw: torch.Tensor,
                   gate: Optional[torch.Tensor], qb: int, win: int, rel_scale: float, scale: float,
                   grid_key: str, save_factor: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, lse, the query factor for the backward (`_forward`'s `save_factor`) or an empty tensor)."""
    pattern, rel = _rel_problem(rh, rw, qb, win, rel_scale, grid_key)
    out, lse, factor = _forward(q, k, v, None, None, None, gate, pattern, scale, rel, save_factor)
    return out.contiguous(), lse.contiguous(), q.new_empty(0) if factor is None else factor.contiguous()


_relpos_fwd_op = torch.library.custom_op("attnzoo::relpos_fwd", mutates_args=())(_relpos_fwd_impl)


@_relpos_fwd_op.register_fake
def _(q, k, v, rh, rw, gate, qb, win, rel_scale, scale, grid_key, save_factor):
    B, H, NQ, _ = q.shape
    factor = q.new_empty(B, H, NQ, 2 * _block_d(win)) if save_factor else q.new_empty(0)
    return q.new_empty(B, H, NQ, v.shape[-1]), q.new_empty(B, H, NQ, dtype=torch.float32), factor


def _relpos_bwd_impl(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, dlse: Optional[torch.Tensor], factor: Optional[torch.Tensor], rh: torch.Tensor,
                   rw: torch.Tensor, gate: Optional[torch.Tensor], qb: int, win: int, rel_scale: float, scale: float,
                   grid_key: str) -> List[torch.Tensor]:
    """`factor`: the forward's saved query factor, or None (the backward rebuilds it)."""
    pattern, rel = _rel_problem(rh, rw, qb, win, rel_scale, grid_key)
    dq, dk, dv, _, drh, drw, dg = _backward(do, q, k, v, out, lse, dlse, None, None, None, gate, pattern, scale, False,
                                            True, rel, factor)
    return [g.contiguous() if g is not None else q.new_empty(0) for g in (dq, dk, dv, drh, drw, dg)]


_relpos_bwd_op = torch.library.custom_op("attnzoo::relpos_bwd", mutates_args=())(_relpos_bwd_impl)


@_relpos_bwd_op.register_fake
def _(do, q, k, v, out, lse, dlse, factor, rh, rw, gate, qb, win, rel_scale, scale, grid_key):
    return [torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v, rh, rw)] + \
        [torch.empty_like(gate, memory_format=torch.contiguous_format) if gate is not None else q.new_empty(0)]


def _relpos_setup_context(ctx, inputs, output):
    q, k, v, rh, rw, gate, qb, win, rel_scale, scale, grid_key, ctx.factor_saved = inputs
    out, lse, factor = output
    ctx.mark_non_differentiable(factor)
    ctx.set_materialize_grads(False)  # no zero-filled gradients of an unused lse and of the factor
    ctx.save_for_backward(q, k, v, out, lse, rh, rw, gate, factor)
    ctx.geom = (qb, win, rel_scale, scale, grid_key)


def _relpos_backward(ctx, dout, dlse, dfactor, bwd=_relpos_bwd_op):
    q, k, v, out, lse, rh, rw, gate, factor = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv, drh, drw, dgate = bwd(dout, q, k, v, out, lse, dlse, factor if ctx.factor_saved else None, rh, rw,
                                      gate, *ctx.geom)
    return dq, dk, dv, drh, drw, (dgate if gate is not None else None), None, None, None, None, None, None


_relpos_fwd_op.register_autograd(_relpos_backward, setup_context=_relpos_setup_context)
_RelPosFunction = _eager_twin("_RelPosFunction", _relpos_fwd_impl, _relpos_setup_context, _relpos_backward,
                              _relpos_bwd_impl)


@torch.compiler.assume_constant_result
def _relpos_in_kernel_enabled() -> bool:
    # default "kernel" (H200, few-keys kernel: forward 1.9x faster than the low-rank lowering, backward 1.2x
    # slower, a step 13% faster; benchmarks/logs/kernels_ii_r2_cut.log; the general kernels' HAS_REL path is tuned
    # against it); "lowrank" keeps the torch lowering to low-rank factors
    return os.environ.get("ATTNZOO_RELPOS", "kernel") == "kernel"


def _relpos_args(bias, pattern, q, k, v):
    """(qb, win, grid_key) when `bias` is a RelPosBias the kernels compute in-kernel, win <= 32 (the factors' rank
    2 next_pow2(win) <= 64): HaloNet's blocked layout (a 2-d single-block Halo, q = the qb x qb block, k = the
    win x win window, every pair visible; grid_key "") or the 2-d Halo grid itself (pattern == the bias's
    pattern; grid_key its key); else None (Neighborhood patterns: the torch lowering)."""
    if not isinstance(bias, RelPosBias) or not _relpos_in_kernel_enabled():
        return None
    p = bias.pattern
    if not isinstance(p, Halo) or len(p.grid) != 2 or 2 * _block_d(p.window) > _MAX_RANK:
        return None
    qb, win = p.query_block, p.window
    if all(g == qb for g in p.grid) and (isinstance(pattern, Dense) or pattern == p):  # one block: every pair visible
        return (qb, win, "") if q.shape[2] == qb * qb and k.shape[2] == win * win else None
    return (qb, win, pattern_key(p)) if pattern == p else None


def _as4d(x: torch.Tensor) -> torch.Tensor:
    return x.reshape((1,) * (4 - x.dim()) + tuple(x.shape))


def attention_triton(q, k, v, pattern=None, bias=None, gate=None, scale=None, return_lse=False):
    """Triton attention (differentiable); arguments as `kernels.attention`.

    A tensor bias is fused as a dense bias. HaloNet's `RelPosBias` on its blocked layout or a 2-d Halo grid is
    computed in-kernel (`attnzoo::relpos_*`); other factorized biases (`LowRankBias`, `RelPosBias` elsewhere) are
    lowered by their `kernel_factors(q, k)` to low-rank factors (differentiable torch ops) that the kernels add as a
    second dot.
    """
    pattern = Dense() if pattern is None else pattern
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    dense = qf = kf = None
    if isinstance(bias, torch.Tensor):
        dense = _as4d(bias)
    elif bias is not None:
        rel = _relpos_args(bias, pattern, q, k, v)
        if rel is not None:  # in-kernel relative logits (blocked HaloNet layout, or the 2-d Halo grid)
            rh, rw = (t.to(q.dtype) for t in bias.tables)
            fn = _relpos_fwd_op if torch.compiler.is_compiling() else _RelPosFunction.apply
            # under autograd the forward also returns the query factor the backward loads
            save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, rh, rw, gate))
            out, lse, _ = fn(q, k, v, rh, rw, gate, rel[0], rel[1], float(bias.scale), scale, rel[2], save)
            return (out, lse) if return_lse else out
        qf, kf = bias.kernel_factors(q, k)
        qf, kf = qf.to(q.dtype), kf.to(q.dtype)
    fn = _attention_fwd_op if torch.compiler.is_compiling() else _AttentionFunction.apply
    out, lse = fn(q, k, v, dense, qf, kf, gate, pattern_key(pattern), scale)
    return (out, lse) if return_lse else out
