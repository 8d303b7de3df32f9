"""The public attention op."""
from __future__ import annotations

from typing import Optional, Union

import torch

from .backends import choose_backend
from .backends.reference import AUTOCAST_FROM, autocast_dtype
from .capture import active_frame, captured_attention
from .checks import check_attention_args
from .patterns import Dense, Pattern


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Optional[Pattern] = None,
    bias=None,
    gate: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
    backend: Optional[str] = None,
):
    """Softmax attention `softmax(q kᵀ · scale + bias)|pattern · v`, optionally gated.

    Args:
        q: queries `(B, H, Nq, D)`.
        k: keys `(B, Hkv, Nk, D)`; `H % Hkv == 0` (grouped-query attention).
        v: values `(B, Hkv, Nk, Dv)`.
        pattern: which keys each query sees (`Dense`, `Causal`, `Window1d`, `Neighborhood`, `Halo`);
            None means `Dense()`. A query that sees no key gets a zero output and lse = -inf.
        bias: additive logits, a floating-point tensor broadcastable to `(B, H, Nq, Nk)` (differentiable; -inf
            hides a key), or a factorized bias object with a `materialize(q, k)` method.
        gate: sigmoid gate logits on the output, head-wise `(B, Nq, H)` / `(B, Nq, H, 1)` or element-wise
            `(B, Nq, H, Dv)` (Gated Attention, position G1): `out *= sigmoid(gate)`.
        scale: logit scale; None means `D ** -0.5`.
        return_lse: also return the natural-log sum of exp of the logits per row, `(B, H, Nq)`, float32
            (float64 for float64 inputs).

    Other Parameters:
        backend: "triton" or "reference"; None picks the first that can run (Triton on CUDA).

    Returns:
        `out (B, H, Nq, Dv)` in q's dtype, and `lse` when `return_lse`.

    Under `torch.autocast`, q, k and v are cast to the autocast dtype first, as torch's
    `scaled_dot_product_attention` is (float64 stays float64); biases and gates keep their dtype.
    """
    q, k, v = _autocast_inputs(q, k, v)
    check_attention_args(q, k, v, pattern, bias, gate, scale, raise_error=True)
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {return_lse!r}")
    if pattern is None:
        pattern = Dense()
    if active_frame() is not None:  # inside a module selected by kernels.capture: the analysis path
        return captured_attention(q, k, v, pattern, bias, gate, scale, return_lse, backend)
    fn = choose_backend(q, k, v, pattern, bias, gate, return_lse, backend)
    return fn(q, k, v, pattern=pattern, bias=bias, gate=gate, scale=scale, return_lse=return_lse)


def _autocast_inputs(q, k, v):
    dtype = autocast_dtype(q) if isinstance(q, torch.Tensor) else None
    if dtype is None:
        return q, k, v
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in AUTOCAST_FROM else t for t in (q, k, v))
