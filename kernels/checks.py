"""Input checks shared by the public op (raise_error=True) and the backends' `can_run_*` predicates."""
from __future__ import annotations

import logging
import math

import torch

from .patterns import Pattern

logger = logging.getLogger("kernels")

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _fail(msg: str, raise_error: bool, exc=ValueError) -> bool:
    if raise_error:
        raise exc(msg)
    logger.debug(msg)
    return False


def check_attention_args(q, k, v, pattern, bias, gate, scale, raise_error: bool = True) -> bool:
    """Validate `kernels.attention` arguments; see its docstring for the layouts."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            return _fail(f"{name} must be a torch.Tensor, got {type(t).__name__}", raise_error, TypeError)
        if t.dim() != 4:
            return _fail(f"{name} must have layout (B, H, N, D), got {name}.shape={tuple(t.shape)}", raise_error)
        if t.dtype not in _FLOAT_DTYPES:
            return _fail(f"{name} must be a floating tensor, got {name}.dtype={t.dtype}", raise_error, TypeError)
    if not (q.dtype == k.dtype == v.dtype):
        return _fail(f"q, k, v must share a dtype, got {q.dtype=} {k.dtype=} {v.dtype=}", raise_error, TypeError)
    if not (q.device == k.device == v.device):
        return _fail(f"q, k, v must share a device, got {q.device=} {k.device=} {v.device=}", raise_error)
    B, Hq, Nq, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        return _fail(f"batch sizes differ: {q.shape=} {k.shape=} {v.shape=}", raise_error)
    if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        return _fail(f"k and v must have the same heads and length, got {k.shape=} {v.shape=}", raise_error)
    if k.shape[3] != D:
        return _fail(f"q and k must have the same head dim, got {q.shape=} {k.shape=}", raise_error)
    if k.shape[1] < 1 or Hq % k.shape[1]:
        return _fail(f"query heads must be a multiple of key/value heads (GQA), got {q.shape=} {k.shape=}",
                     raise_error)
    if min(Nq, k.shape[2], D, v.shape[3]) < 1:
        return _fail(f"empty dimension in {q.shape=} {k.shape=} {v.shape=}", raise_error)
    if pattern is not None:
        if not isinstance(pattern, Pattern):
            return _fail(f"pattern must be a kernels pattern (Dense, Causal, Window1d, Neighborhood, Halo) or None, "
                         f"got {type(pattern).__name__}", raise_error, TypeError)
        try:
            pattern.check(Nq, k.shape[2])
        except ValueError:
            if raise_error:
                raise
            return False
    if bias is not None:
        if isinstance(bias, torch.Tensor):
            target = (B, Hq, Nq, k.shape[2])
            if bias.dim() > 4 or any(b not in (1, t) for b, t in zip(bias.shape[::-1], target[::-1])):
                return _fail(f"bias must broadcast to (B, H, Nq, Nk)={target}, got {tuple(bias.shape)}", raise_error)
            if bias.device != q.device:
                return _fail(f"bias must be on {q.device}, got {bias.device}", raise_error)
            if not bias.is_floating_point():
                return _fail(f"bias must be a floating-point tensor of additive logits, got {bias.dtype} (for a "
                             f"boolean mask pass torch.where(mask, 0.0, float('-inf')) or a pattern)", raise_error,
                             TypeError)
        elif not hasattr(bias, "materialize"):
            return _fail(f"bias must be a tensor or a factorized bias, got {type(bias).__name__}", raise_error,
                         TypeError)
        elif hasattr(bias, "check"):  # factorized bias (kernels.bias): its shapes against q, k and the pattern
            try:
                bias.check(q, k, pattern)
            except ValueError:
                if raise_error:
                    raise
                return False
    if gate is not None:
        if not isinstance(gate, torch.Tensor):
            return _fail(f"gate must be a tensor, got {type(gate).__name__}", raise_error, TypeError)
        ok = gate.shape in ((B, Nq, Hq), (B, Nq, Hq, 1), (B, Nq, Hq, v.shape[3]))
        if not ok:
            return _fail(f"gate must have shape (B, N, H)={(B, Nq, Hq)}, (B, N, H, 1) or "
                         f"(B, N, H, Dv)={(B, Nq, Hq, v.shape[3])}, got {tuple(gate.shape)}", raise_error)
        if not gate.is_floating_point():
            return _fail(f"gate must be a floating-point tensor (pre-sigmoid logits), got {gate.dtype}", raise_error,
                         TypeError)
        if gate.device != q.device:
            return _fail(f"gate must be on {q.device}, got {gate.device}", raise_error)
    if scale is not None and (not isinstance(scale, (int, float)) or isinstance(scale, bool) or
                              not math.isfinite(scale) or scale <= 0):
        return _fail(f"scale must be a positive finite float or None, got {scale!r}", raise_error, TypeError
                     if not isinstance(scale, (int, float)) or isinstance(scale, bool) else ValueError)
    return True
