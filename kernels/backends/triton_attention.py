"""Triton backend of `kernels.attention`: forward and backward kernels for every pattern, registered as torch
custom ops (`attnzoo::attention_fwd` / `attnzoo::attention_bwd`, with fake implementations and autograd) so
`torch.compile(fullgraph=True)` traces through them.

Runs CUDA tensors; CPU tensors too when `TRITON_INTERPRET=1` (Triton's interpreter, used by the tests).
Grid patterns (`Neighborhood`, `Halo`) run on tokens permuted into N-d tiles (`kernels.tiles`); 1-d patterns
(`Dense`, `Causal`, `Window1d`) run in place. Block sizes, warps and stages are autotuned per problem class on
first use (CUDA events, a few repeats per candidate; `ATTNZOO_AUTOTUNE=0` takes the first candidate), as are the tile shapes of grid patterns (by counting the
visited tile pairs, which is exact and free). The gate is applied after the kernel, in torch (differentiable).
Additive bias is not supported here yet: `can_run_triton` says so and the reference runs.
"""
from __future__ import annotations

import logging
import os
from typing import Dict, List, Optional, Tuple

import torch

from .. import tiles
from ..checks import _fail
from ..patterns import Causal, Dense, Halo, Neighborhood, Pattern, Window1d
from .reference import apply_gate

NAME = "triton"
logger = logging.getLogger("kernels")

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_PATTERNS: Dict[str, Pattern] = {}
_BEST: Dict[tuple, tuple] = {}
_MAX_HEAD_DIM = 256


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
    if bias is not None:
        return _fail("the triton backend does not support bias yet (the reference does)", raise_error,
                     NotImplementedError)
    if pattern is not None and not isinstance(pattern, (Dense, Causal, Window1d, Neighborhood, Halo)):
        return _fail(f"the triton backend has no kernel for pattern {type(pattern).__name__}", raise_error,
                     NotImplementedError)
    return True


# ----------------------------------------------------------------------------------------------------------
# launch helpers


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _block_d(d: int) -> int:
    return max(16, _next_pow2(d))


def _lastdim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


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


def _fwd_candidates(d: int, dv: int) -> List[tuple]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) tried by the forward autotuner."""
    if _interpret():
        return [(32, 16, 4, 1)]
    if max(_block_d(d), _block_d(dv)) >= 256:
        return [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 3), (128, 32, 8, 2)]
    return [(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3)]


def _bwd_candidates(d: int, dv: int) -> List[tuple]:
    if _interpret():
        return [(16, 32, 4, 1)]
    if max(_block_d(d), _block_d(dv)) >= 256:
        return [(64, 64, 8, 2), (32, 64, 4, 2), (64, 32, 4, 2)]
    return [(64, 128, 8, 2), (64, 64, 4, 2), (128, 128, 8, 2), (64, 128, 4, 3), (128, 64, 8, 2)]


class _Problem:
    """One attention problem laid out for the kernels (grid patterns permuted into tiles)."""

    def __init__(self, pattern, nq: int, nk: int, block_m: int, block_n: int, device, partial_cost: float = 1.25):
        self.pattern, self.device = pattern, device
        self.grid = _is_grid(pattern)
        self.block_m, self.block_n = block_m, block_n
        if self.grid:
            q_tile, k_tile = tiles.choose_tile_shapes(pattern, block_m, block_n, partial_cost)
            self.map = tiles.grid_tile_map(pattern, q_tile, k_tile, str(device))
            self.nq, self.nk = self.map.q_layout.num_padded, self.map.k_layout.num_padded
            self.off = self.left = self.right = 0
            self.dil = tuple(self.map.dilation) + (1,) * (3 - len(self.map.dilation))
            self.mask_axes = self.map.mask_axes
            self.has_dil = any(d > 1 for d in self.map.dilation)
        else:
            self.map = None
            self.nq, self.nk = nq, nk
            self.off, self.left, self.right = _window_params(pattern, nq, nk)
            self.dil, self.mask_axes, self.has_dil = (1, 1, 1), 0, False

    def q_in(self, x):
        return _lastdim_contiguous(self.map.q_layout.permute(x)) if self.grid else _lastdim_contiguous(x)

    def k_in(self, x):
        return _lastdim_contiguous(self.map.k_layout.permute(x)) if self.grid else _lastdim_contiguous(x)

    def q_out(self, x):
        return self.map.q_layout.unpermute(x) if self.grid else x

    def k_out(self, x):
        return self.map.k_layout.unpermute(x) if self.grid else x

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


_DUMMY: Dict[str, torch.Tensor] = {}


def _dummy_int(device) -> torch.Tensor:
    key = str(device)
    if key not in _DUMMY:
        _DUMMY[key] = torch.zeros(4, dtype=torch.int32, device=device)
    return _DUMMY[key]


def _problem(pattern, nq, nk, cfg, device) -> _Problem:
    return _Problem(pattern, nq, nk, cfg[0], cfg[1], device, *cfg[4:])


def _with_tile_costs(pattern, candidates):
    """Grid patterns also tune the tile shapes: chosen with partial tile pairs weighted 1.25 or 2 (masking)."""
    if not _is_grid(pattern) or len(candidates) == 1:
        return candidates
    return [c + (pc,) for c in candidates for pc in (1.25, 2.0)]


def _new(*shape, like, dtype=None):
    """Output buffer; filled with NaN when ATTNZOO_KERNEL_POISON=1 (tests check every element is written)."""
    dtype = like.dtype if dtype is None else dtype
    if os.environ.get("ATTNZOO_KERNEL_POISON", "0") == "1":
        return torch.full(shape, float("nan"), device=like.device, dtype=dtype)
    return torch.empty(shape, device=like.device, dtype=dtype)


def _dot_prec(dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _launch_fwd(qp, kp, vp, prob: _Problem, scale: float, cfg):
    from . import triton_kernels as tk

    B, H, NQ, D = qp.shape
    HKV, DV = kp.shape[1], vp.shape[-1]
    BM, BN, warps, stages = cfg[:4]
    out = _new(B, H, NQ, DV, like=qp)
    lse = _new(B, H, NQ, like=qp, dtype=torch.float32)
    full_ptr, full_idx, part_ptr, part_idx = prob.lists(False)
    qlo, qhi, kc = prob.tables()
    grid = (triton_cdiv(NQ, BM), B * H)
    tk._attn_fwd[grid](
        qp, kp, vp, out, lse,
        qp.stride(0), qp.stride(1), qp.stride(2), kp.stride(0), kp.stride(1), kp.stride(2),
        vp.stride(0), vp.stride(1), vp.stride(2), out.stride(0), out.stride(1), out.stride(2),
        H, H // HKV, NQ, kp.shape[2], scale * tk.LOG2E, prob.off, prob.left, prob.right,
        full_ptr, full_idx, part_ptr, part_idx, qlo, qhi, kc, *prob.dil,
        D=D, DV=DV, BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=_block_d(D), BLOCK_DV=_block_d(DV),
        GRID_MODE=prob.grid, MASK_AXES=prob.mask_axes, HAS_DIL=prob.has_dil,
        REVERSE=isinstance(prob.pattern, Causal), DOT_PREC=_dot_prec(qp.dtype),
        num_warps=warps, num_stages=stages)
    return out, lse


def _launch_bwd(dop, qp, kp, vp, op, lsep, dlsep, prob: _Problem, scale: float, cfg):
    from . import triton_kernels as tk

    B, H, NQ, D = qp.shape
    HKV, NK, DV = kp.shape[1], kp.shape[2], vp.shape[-1]
    BM, BN, warps, stages = cfg[:4]
    delta = _new(B, H, NQ, like=qp, dtype=torch.float32)
    tk._bwd_delta[(triton_cdiv(NQ, 64), B * H)](
        op, dop, dlsep if dlsep is not None else lsep, delta, op.stride(0), op.stride(1), op.stride(2),
        dop.stride(0), dop.stride(1), dop.stride(2), H, NQ, DV=DV, BLOCK_M=64, BLOCK_DV=_block_d(DV),
        HAS_DLSE=dlsep is not None)
    dq = _new(B, H, NQ, D, like=qp)
    dk = _new(B, HKV, NK, D, like=qp)
    dv = _new(B, HKV, NK, DV, like=qp)
    qlo, qhi, kc = prob.tables()
    common = dict(D=D, DV=DV, BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=_block_d(D), BLOCK_DV=_block_d(DV),
                  GRID_MODE=prob.grid, MASK_AXES=prob.mask_axes, HAS_DIL=prob.has_dil, DOT_PREC=_dot_prec(qp.dtype),
                  num_warps=warps, num_stages=stages)
    tk._attn_bwd_dkdv[(triton_cdiv(NK, BN), B * HKV)](
        qp, kp, vp, dop, lsep, delta, dk, dv,
        qp.stride(0), qp.stride(1), qp.stride(2), kp.stride(0), kp.stride(1), kp.stride(2),
        vp.stride(0), vp.stride(1), vp.stride(2), dop.stride(0), dop.stride(1), dop.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        H, HKV, H // HKV, NQ, NK, scale * tk.LOG2E, scale, prob.off, prob.left, prob.right,
        *prob.lists(True), qlo, qhi, kc, *prob.dil, **common)
    tk._attn_bwd_dq[(triton_cdiv(NQ, BM), B * H)](
        qp, kp, vp, dop, lsep, delta, dq,
        qp.stride(0), qp.stride(1), qp.stride(2), kp.stride(0), kp.stride(1), kp.stride(2),
        vp.stride(0), vp.stride(1), vp.stride(2), dop.stride(0), dop.stride(1), dop.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        H, H // HKV, NQ, NK, scale * tk.LOG2E, scale, prob.off, prob.left, prob.right,
        *prob.lists(False), qlo, qhi, kc, *prob.dil, **common)
    return dq, dk, dv


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _tune_key(kind, pattern, q, k, v):
    shape_class = (q.shape[-1], v.shape[-1], q.dtype, q.shape[1] // k.shape[1] > 1)
    if _is_grid(pattern) or isinstance(pattern, Window1d):
        return (kind, pattern) + shape_class
    return (kind, type(pattern).__name__, _next_pow2(q.shape[2]), _next_pow2(k.shape[2])) + shape_class


def _autotune(key, candidates, run) -> tuple:
    """Pick the fastest candidate config for `key` (CUDA events, median of a few runs); cached per process."""
    if key in _BEST:
        return _BEST[key]
    if len(candidates) == 1 or os.environ.get("ATTNZOO_AUTOTUNE", "1") == "0":
        return candidates[0]
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    timings = {}
    for cfg in candidates:
        try:
            run(cfg)
            torch.cuda.synchronize()
            ts = []
            for _ in range(3):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                run(cfg)
                end.record()
                end.synchronize()
                ts.append(start.elapsed_time(end))
            timings[cfg] = sorted(ts)[1]
        except (OutOfResources, CompilationError) as err:
            logger.debug("autotune %s: config %s failed: %s", key, cfg, err)
    if not timings:
        raise RuntimeError(f"no kernel config could run for {key}")
    best = min(timings, key=timings.get)
    logger.debug("autotune %s: %s", key, {c: round(t, 4) for c, t in timings.items()})
    _BEST[key] = best
    return best


# ----------------------------------------------------------------------------------------------------------
# forward / backward on the original (B, H, N, D) layout


def _forward(q, k, v, pattern, scale):
    nq, nk = q.shape[2], k.shape[2]
    cache = {}

    def run(cfg):
        prob = _problem(pattern, nq, nk, cfg, q.device)
        ck = (cfg[:2], cfg[4:]) if prob.grid else None
        ins = cache.get(ck)
        if ins is None:
            ins = (prob.q_in(q), prob.k_in(k), prob.k_in(v))
            cache[ck] = ins
        return prob, _launch_fwd(*ins, prob, scale, cfg)

    cfg = _autotune(_tune_key("fwd", pattern, q, k, v),
                    _with_tile_costs(pattern, _fwd_candidates(q.shape[-1], v.shape[-1])), run)
    prob, (out, lse) = run(cfg)
    return prob.q_out(out), prob.q_out(lse[..., None])[..., 0]


def _backward(do, q, k, v, out, lse, dlse, pattern, scale):
    nq, nk = q.shape[2], k.shape[2]
    cache = {}

    def run(cfg):
        prob = _problem(pattern, nq, nk, cfg, q.device)
        ck = (cfg[:2], cfg[4:]) if prob.grid else None
        ins = cache.get(ck)
        if ins is None:
            ins = (prob.q_in(do), prob.q_in(q), prob.k_in(k), prob.k_in(v), prob.q_in(out),
                   prob.q_in(lse[..., None])[..., 0].contiguous(),
                   None if dlse is None else prob.q_in(dlse.float()[..., None])[..., 0].contiguous())
            cache[ck] = ins
        return prob, _launch_bwd(*ins, prob, scale, cfg)

    cfg = _autotune(_tune_key("bwd", pattern, q, k, v),
                    _with_tile_costs(pattern, _bwd_candidates(q.shape[-1], v.shape[-1])), run)
    prob, (dq, dk, dv) = run(cfg)
    return prob.q_out(dq), prob.k_out(dk), prob.k_out(dv)


# ----------------------------------------------------------------------------------------------------------
# torch custom ops


@torch.library.custom_op("attnzoo::attention_fwd", mutates_args=())
def _attention_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern_key: str,
                      scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    out, lse = _forward(q, k, v, _PATTERNS[pattern_key], scale)
    return out.contiguous(), lse.contiguous()


@_attention_fwd_op.register_fake
def _(q, k, v, pattern_key, scale):
    B, H, NQ, _ = q.shape
    return q.new_empty(B, H, NQ, v.shape[-1]), q.new_empty(B, H, NQ, dtype=torch.float32)


@torch.library.custom_op("attnzoo::attention_bwd", mutates_args=())
def _attention_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                      lse: torch.Tensor, dlse: Optional[torch.Tensor], pattern_key: str,
                      scale: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = _backward(do, q, k, v, out, lse, dlse, _PATTERNS[pattern_key], scale)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@_attention_bwd_op.register_fake
def _(do, q, k, v, out, lse, dlse, pattern_key, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, pattern_key, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.pattern_key, ctx.scale = pattern_key, scale


def _attention_backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = _attention_bwd_op(dout, q, k, v, out, lse, dlse, ctx.pattern_key, ctx.scale)
    return dq, dk, dv, None, None


_attention_fwd_op.register_autograd(_attention_backward, setup_context=_setup_context)


@torch.compiler.assume_constant_result
def _pattern_key(pattern: Pattern) -> str:
    key = repr(pattern)
    _PATTERNS.setdefault(key, pattern)
    return key


def attention_triton(q, k, v, pattern=None, bias=None, gate=None, scale=None, return_lse=False):
    """Triton attention (differentiable); arguments as `kernels.attention` (bias must be None)."""
    if bias is not None:
        raise NotImplementedError("the triton backend does not support bias yet")
    pattern = Dense() if pattern is None else pattern
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    out, lse = _attention_fwd_op(q, k, v, _pattern_key(pattern), scale)
    out = apply_gate(out, gate)
    return (out, lse) if return_lse else out
