"""One kernel that merges the key splits of a forward: `combine_splits`.

Skinny problems (few query blocks: decoding-like shapes, agent attention's aggregation, probes with a few learned
queries) split their keys over a program axis so the GPU fills; each split writes a float32 partial output and
its natural-log lse. Merging them took seven torch launches (logsumexp, where, sub, exp, mul, sum, cast), several
times the attention kernel itself at these sizes (8 x 8 x 49 queries x 4096 keys, H200: kernels/NOTES.md,
thirteenth session). Here it is one pass: per row m = max_s lse_s, w_s = exp(lse_s - m), o = Σ w_s o_s / Σ w_s,
lse = m + log Σ w_s, times sigmoid(gate) when the gate could not be fused before the merge. Rows no split saw
(lse = -inf everywhere) give zeros and lse = -inf, as the attention kernels do.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .triton_kernels import gated_output

__all__ = ["combine_splits"]


@triton.jit
def _combine_splits(O_PART, LSE_PART, OUT, LSE, GATE, S, M, H, NQ, stride_os, stride_ls,
                    stride_gb, stride_gh, stride_gn, stride_gd,
                    DV: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_GATE: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_DV)
    live = rows < M
    mask = live[:, None] & (cols < DV)[None, :]
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    for s in range(S):
        m = tl.maximum(m, tl.load(LSE_PART + s * stride_ls + rows, mask=live, other=float("-inf")))
    m_use = tl.where(m == float("-inf"), 0.0, m)
    l_sum = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_DV], tl.float32)
    for s in range(S):
        w = tl.exp(tl.load(LSE_PART + s * stride_ls + rows, mask=live, other=float("-inf")) - m_use)
        o = tl.load(O_PART + s * stride_os + rows[:, None] * DV + cols[None, :], mask=mask, other=0.0)
        l_sum += w
        acc += w[:, None] * o
    seen = l_sum > 0.0
    den = tl.where(seen, l_sum, 1.0)
    if HAS_GATE:
        n = rows % NQ
        bh = rows // NQ
        g_ptrs = GATE + (bh // H).to(tl.int64) * stride_gb + (bh % H) * stride_gh + n * stride_gn
        g = tl.load(g_ptrs[:, None] + cols[None, :] * stride_gd, mask=mask, other=0.0).to(tl.float32)
        out = gated_output(acc, den[:, None], g)
    else:
        out = acc / den[:, None]
    tl.store(OUT + rows[:, None] * DV + cols[None, :], out.to(OUT.dtype.element_ty), mask=mask)
    tl.store(LSE + rows, tl.where(seen, m_use + tl.log(den), float("-inf")), mask=live)


def combine_splits(out: torch.Tensor, lse: torch.Tensor, gate: Optional[torch.Tensor] = None,
                   dtype: torch.dtype = torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
    """Merge split partials: `out` (S, B, H, N, Dv) float32 and `lse` (S, B, H, N) float32, both contiguous, into
    ((B, H, N, Dv) in `dtype`, (B, H, N) float32 lse). `gate`: an optional (B, H, N, 1 | Dv) view (broadcast
    strides allowed) applied as `* sigmoid(gate)` after the merge."""
    if out.dim() != 5 or lse.shape != out.shape[:4]:
        raise ValueError(f"combine_splits: out must be (S, B, H, N, Dv) and lse (S, B, H, N), got out "
                         f"{tuple(out.shape)} and lse {tuple(lse.shape)}")
    if out.dtype != torch.float32 or lse.dtype != torch.float32 or not (out.is_contiguous() and lse.is_contiguous()):
        raise ValueError(f"combine_splits: out and lse must be contiguous float32, got {out.dtype} / {lse.dtype}")
    S, B, H, N, DV = out.shape
    if gate is not None and (gate.dim() != 4 or tuple(gate.shape[:3]) != (B, H, N) or gate.shape[3] not in (1, DV)):
        raise ValueError(f"combine_splits: gate must be (B, H, N, 1 | Dv) = ({B}, {H}, {N}, 1 | {DV}), got "
                         f"{tuple(gate.shape)}")
    from .triton_attention import _bstrides, _new

    o = _new(B, H, N, DV, like=out, dtype=dtype)
    lse_all = _new(B, H, N, like=out)
    M = B * H * N
    block_dv = triton.next_power_of_2(DV)
    block_r = max(1, min(64, 4096 // block_dv))
    sg = _bstrides(gate)
    _combine_splits[(triton.cdiv(M, block_r),)](
        out, lse, o, lse_all, gate if gate is not None else lse, S, M, H, N, out.stride(0), lse.stride(0),
        sg[0], sg[1], sg[2], sg[3], DV=DV, BLOCK_R=block_r, BLOCK_DV=block_dv, HAS_GATE=gate is not None,
        num_warps=4)
    return o, lse_all
