"""Fused Agent Attention forward (inference): pooling, both attention steps and the depthwise conv on V in one
or two Triton launches, writing `(B, N, H·Dv)` tokens ready for the output projection.

Why: at 224 px an agent layer was ~10 small launches (pool, two attention calls, the conv, layout copies, the
residual add), each a few microseconds of GPU and tens to hundreds of host microseconds.

1. `_agent_aggregate`, one program per (b, h): agents = adaptive_avg_pool(Q grid) (a dot of 0/1 bin-membership
   tiles with Q tiles, divided by the bin areas), then V_A = softmax(s·A Kᵀ + B1) V over key tiles (online
   softmax). For long sequences A and V_A go to a small scratch buffer (BLOCK_A x D per (b, h)); for short ones
   (`CONFIG["one_kernel_tokens"]`) the same program goes on with step 2 over all its query rows: one launch.
2. `_agent_broadcast`, one program per (16-row query tile, b, h): softmax(s·Q Aᵀ + B2) V_A (all agents in one
   tile) plus the KS×KS depthwise conv of V around each grid token (zero padding) and its bias, stored at the
   head's columns of the output. Many small programs: one program per (b, h) doing all three passes was
   latency-bound (768 programs at batch 256 x 3 heads; 0.16-0.40 ms vs 0.128 ms now at 197 tokens).
   The conv loads the KS² neighbour rows of the tile (L1/L2 hits); 2-d query tiles with one V halo per tile and
   `tl.gather` for the shifted views measured slower on an H200.

Intermediates are rounded to the input dtype where the unfused composition stores them (agents, V_A), so the two
agree to a few ulps. No backward: `kernels.agent_attention` runs the composition when gradients are needed.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch
from . import triton_attention as ta
from .triton_kernels import LOG2E, online_softmax_update

_LOG2E = tl.constexpr(LOG2E)  # a jit function reads only constexpr globals


@triton.jit
def _agent_aggregate(Q, K, V, B1, AG, AV, B2, DW, DB, O,
                     stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                     stride_vb, stride_vh, stride_vn, stride_1b, stride_1h, stride_1a, stride_1n,
                     stride_2b, stride_2h, stride_2n, stride_2a, stride_ob, stride_on,
                     H, N, P, GH, GW, PH, PW, qk_scale,
                     D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                     BLOCK_A: tl.constexpr, BLOCK_N: tl.constexpr, HAS_B1: tl.constexpr, DOT_PREC: tl.constexpr,
                     BROADCAST: tl.constexpr, BLOCK_M: tl.constexpr, KS: tl.constexpr, HAS_B2: tl.constexpr,
                     HAS_DWC: tl.constexpr, HAS_DWB: tl.constexpr, DWC_SEQ: tl.constexpr,
                     B1_WIDE: tl.constexpr, B2_WIDE: tl.constexpr):
    """One program per (b, h): the pooled agents A and V_A = softmax(s·A Kᵀ + B1) V, stored (BLOCK_A rows) for
    `_agent_broadcast`, or with BROADCAST used in place: this program then also runs the broadcast and the conv
    over all its query rows (one launch; for short sequences, where the second kernel's parallelism is not
    needed)."""
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    q_base = Q + b.to(tl.int64) * stride_qb + h * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + h * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h * stride_vh
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_a = tl.arange(0, BLOCK_A)
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = offs_d < D
    dv_ok = offs_dv < DV
    a_ok = offs_a < PH * PW
    n_grid = GH * GW

    # adaptive average pooling bins (PyTorch's: start = floor(i·G/P), end = ceil((i+1)·G/P)); a dot of 0/1
    # bin-membership tiles with the q tiles sums each bin in fp32
    ai = offs_a // PW
    aj = offs_a % PW
    r0 = (ai * GH) // PH
    r1 = ((ai + 1) * GH + PH - 1) // PH
    c0 = (aj * GW) // PW
    c1 = ((aj + 1) * GW + PW - 1) // PW
    area = tl.where(a_ok, (r1 - r0) * (c1 - c0), 1).to(tl.float32)
    pooled = tl.zeros((BLOCK_A, BLOCK_D), dtype=tl.float32)
    for start in range(0, n_grid, BLOCK_N):
        t = start + offs_n
        ty = t // GW
        tx = t % GW
        q = tl.load(q_base + (P + t)[:, None] * stride_qn + offs_d[None, :],
                    mask=(t < n_grid)[:, None] & d_ok[None, :], other=0.0)
        member = (ty[None, :] >= r0[:, None]) & (ty[None, :] < r1[:, None]) & \
            (tx[None, :] >= c0[:, None]) & (tx[None, :] < c1[:, None]) & a_ok[:, None]
        pooled = tl.dot(member.to(q.dtype), q, acc=pooled, input_precision=DOT_PREC)
    agents = (pooled / area[:, None]).to(Q.dtype.element_ty)

    m_i = tl.full((BLOCK_A,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_A,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_A, BLOCK_DV), dtype=tl.float32)
    b1_base = B1 + b.to(tl.int64) * stride_1b + h * stride_1h
    for start in range(0, N, BLOCK_N):
        kn = start + offs_n
        k_ok = kn < N
        k = tl.load(k_base + kn[:, None] * stride_kn + offs_d[None, :], mask=k_ok[:, None] & d_ok[None, :],
                    other=0.0)
        v = tl.load(v_base + kn[:, None] * stride_vn + offs_dv[None, :], mask=k_ok[:, None] & dv_ok[None, :],
                    other=0.0)
        s = tl.dot(agents, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        if HAS_B1:
            s += _bias_tile(b1_base + offs_a[:, None] * stride_1a + kn[None, :] * stride_1n,
                            a_ok[:, None] & k_ok[None, :], B1_WIDE)
        s = tl.where(k_ok[None, :], s, float("-inf"))
        acc, m_i, l_i = online_softmax_update(acc, m_i, l_i, s, v, HAS_B1, DOT_PREC)
    # an agent whose keys a -inf bias hides entirely gets zeros, as in kernels.attention; padded agent rows hold
    # finite values (zero agents, zero bias): the broadcast masks them
    agent_v = (acc / tl.where(l_i > 0, l_i, 1.0)[:, None]).to(V.dtype.element_ty)
    if BROADCAST:
        b2_base = B2 + b.to(tl.int64) * stride_2b + h * stride_2h
        for start in range(0, N, BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)
            r_ok = rows < N
            q = tl.load(q_base + rows[:, None] * stride_qn + offs_d[None, :], mask=r_ok[:, None] & d_ok[None, :],
                        other=0.0)
            out = _broadcast_tile(q, agents, agent_v, b2_base, rows, r_ok, stride_2n, stride_2a, PH * PW, qk_scale,
                                  offs_a, HAS_B2, DOT_PREC, B2_WIDE)
            if HAS_DWC:
                out = _dwc_add(out, V, DW, DB, b, h, rows, r_ok, stride_vb, stride_vh, stride_vn, P, GH, GW,
                               offs_dv, dv_ok, DV, KS, HAS_DWB, DWC_SEQ)
            tl.store(O + b.to(tl.int64) * stride_ob + h * DV + rows[:, None] * stride_on + offs_dv[None, :],
                     out.to(O.dtype.element_ty), mask=r_ok[:, None] & dv_ok[None, :])
    else:
        ag_base = pid.to(tl.int64) * BLOCK_A
        tl.store(AG + (ag_base + offs_a)[:, None] * BLOCK_D + offs_d[None, :], agents)
        tl.store(AV + (ag_base + offs_a)[:, None] * BLOCK_DV + offs_dv[None, :], agent_v)


@triton.jit
def _bias_tile(ptrs, ok, WIDE: tl.constexpr):
    """A bias tile in base-2 logits, zero where not `ok`. WIDE: the storage covers the whole tile (the host
    checked), so it loads unmasked (16-byte vectors on aligned rows) and selects the valid entries after."""
    if WIDE:
        return tl.where(ok, tl.load(ptrs).to(tl.float32), 0.0) * _LOG2E
    return tl.load(ptrs, mask=ok, other=0.0).to(tl.float32) * _LOG2E


@triton.jit
def _dwc_add(out, V, DW, DB, b, h, rows, r_ok, stride_vb, stride_vh, stride_vn, P, GH, GW, offs_dv, dv_ok,
             DV: tl.constexpr, KS: tl.constexpr, HAS_DWB: tl.constexpr, DWC_SEQ: tl.constexpr):
    """out += the KS×KS depthwise conv of V (zero padding) at token `rows` (grid rows only) and its bias.
    The taps sum in their own accumulator, in the loads' register layout: added to `out` (the MMA layout) one by
    one, every tap cost a layout conversion through shared memory. DWC_SEQ: a barrier after each column of taps,
    so the next column's loads (the same rows shifted by one) are issued after this column's lines reached L1."""
    v_base = V + b.to(tl.int64) * stride_vb + h * stride_vh
    g = rows - P
    gy = g // GW
    gx = g % GW
    on_grid = r_ok & (rows >= P)
    conv = tl.zeros_like(out)
    for kx in tl.static_range(KS):
        nx = gx + (kx - KS // 2)
        for ky in tl.static_range(KS):
            ny = gy + (ky - KS // 2)
            ok = on_grid & (ny >= 0) & (ny < GH) & (nx >= 0) & (nx < GW)
            vn = tl.load(v_base + (P + ny * GW + nx)[:, None] * stride_vn + offs_dv[None, :],
                         mask=ok[:, None] & dv_ok[None, :], other=0.0)
            # the weight rounded to the input dtype, as the conv under autocast uses it
            w = tl.load(DW + (h * DV + offs_dv) * (KS * KS) + ky * KS + kx, mask=dv_ok, other=0.0)
            conv += vn.to(tl.float32) * w.to(V.dtype.element_ty).to(tl.float32)[None, :]
        if DWC_SEQ:
            tl.debug_barrier()
    if HAS_DWB:
        wb = tl.load(DB + h * DV + offs_dv, mask=dv_ok, other=0.0).to(V.dtype.element_ty)
        conv += tl.where(on_grid[:, None], wb.to(tl.float32)[None, :], 0.0)
    return out + conv


@triton.jit
def _agent_broadcast(Q, V, AG, AV, B2, DW, DB, O,
                     stride_qb, stride_qh, stride_qn, stride_vb, stride_vh, stride_vn,
                     stride_2b, stride_2h, stride_2n, stride_2a, stride_ob, stride_on,
                     H, N, P, GH, GW, N_AGENTS, qk_scale,
                     D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                     BLOCK_A: tl.constexpr, BLOCK_M: tl.constexpr, KS: tl.constexpr,
                     HAS_B2: tl.constexpr, HAS_DWC: tl.constexpr, HAS_DWB: tl.constexpr, DOT_PREC: tl.constexpr,
                     DWC_SEQ: tl.constexpr, B2_WIDE: tl.constexpr):
    """One program per (query tile, b, h): softmax(s·Q Aᵀ + B2) V_A (all agents in one tile) plus the
    depthwise conv of V, stored at the head's columns of (B, N, H·Dv)."""
    pid_m = tl.program_id(0)
    pid = tl.program_id(1)
    b = pid // H
    h = pid % H
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_a = tl.arange(0, BLOCK_A)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d_ok = offs_d < D
    dv_ok = offs_dv < DV
    r_ok = rows < N
    ag_base = pid.to(tl.int64) * BLOCK_A
    agents = tl.load(AG + (ag_base + offs_a)[:, None] * BLOCK_D + offs_d[None, :])
    agent_v = tl.load(AV + (ag_base + offs_a)[:, None] * BLOCK_DV + offs_dv[None, :])
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h * stride_qh + rows[:, None] * stride_qn + offs_d[None, :],
                mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    out = _broadcast_tile(q, agents, agent_v, B2 + b.to(tl.int64) * stride_2b + h * stride_2h, rows, r_ok,
                          stride_2n, stride_2a, N_AGENTS, qk_scale, offs_a, HAS_B2, DOT_PREC, B2_WIDE)
    if HAS_DWC:
        out = _dwc_add(out, V, DW, DB, b, h, rows, r_ok, stride_vb, stride_vh, stride_vn, P, GH, GW, offs_dv,
                       dv_ok, DV, KS, HAS_DWB, DWC_SEQ)
    tl.store(O + b.to(tl.int64) * stride_ob + h * DV + rows[:, None] * stride_on + offs_dv[None, :],
             out.to(O.dtype.element_ty), mask=r_ok[:, None] & dv_ok[None, :])


@triton.jit
def _broadcast_tile(q, agents, agent_v, b2_base, rows, r_ok, stride_2n, stride_2a, N_AGENTS, qk_scale, offs_a,
                    HAS_B2: tl.constexpr, DOT_PREC: tl.constexpr, B2_WIDE: tl.constexpr):
    """softmax(s·q Aᵀ + B2) V_A for one tile of query rows (fp32)."""
    a_ok = offs_a < N_AGENTS
    s = tl.dot(q, tl.trans(agents), input_precision=DOT_PREC) * qk_scale
    if HAS_B2:
        s += _bias_tile(b2_base + rows[:, None] * stride_2n + offs_a[None, :] * stride_2a,
                        r_ok[:, None] & a_ok[None, :], B2_WIDE)
    s = tl.where(a_ok[None, :], s, float("-inf"))
    m = tl.max(s, 1)
    if HAS_B2:  # a row whose agents a -inf bias hides entirely gets zeros, as in kernels.attention
        m = tl.where(m == float("-inf"), 0.0, m)
    p = tl.math.exp2(s - m[:, None])
    l = tl.sum(p, 1)
    return tl.dot(p.to(agent_v.dtype), agent_v, input_precision=DOT_PREC) / tl.where(l > 0, l, 1.0)[:, None]


# Launch plan, measured on an H200 at batch 256 (BENCHMARKS.md; bench_kernels sweeps it): sequences up to
# `one_kernel_tokens` run the broadcast inside the aggregate program (one launch, the same GPU time as two at
# 197 tokens, ~100 us less host time), longer ones the two kernels.
CONFIG = dict(block_n=32, warps_1=4, stages_1=3, block_m=16, warps_2=1, one_kernel_tokens=256, one_block_m=64,
              dwc_seq=1)


def agent_fused_forward(q, k, v, grid, agent_grid, num_prefix_tokens, bias1, bias2, dwc_weight, dwc_bias,
                        scale: float, plan: bool = False):
    """Launch the kernels; inputs are validated by `kernels.agent_attention`. Returns `(B, N, H·Dv)`, and with
    `plan` also a `FusedPlan` that repeats the launches for other q, k, v of the same layout."""
    B, H, N, D = q.shape
    DV = v.shape[-1]
    (GH, GW), (PH, PW) = grid, agent_grid
    n = PH * PW
    # plain int math: triton.next_power_of_2 / cdiv cost ~4 us of host time a call each
    block_d, block_dv, block_a = (max(16, 1 << (x - 1).bit_length()) for x in (D, DV, n))
    one = N <= CONFIG["one_kernel_tokens"]
    out_shape = (B, N, H * DV)
    scratch = () if one else ((B * H * block_a, block_d), (B * H * block_a, block_dv))
    qk_scale = scale * LOG2E
    prec = ta._dot_prec(q.dtype)
    block_m = CONFIG["one_block_m"] if one else CONFIG["block_m"]
    ks = dwc_weight.shape[-1] if dwc_weight is not None else 1
    b1, b2 = (_bias4(t) for t in (bias1, bias2))
    s1, s2 = ta._bstrides(b1), ta._bstrides(b2)
    # whole-tile bias loads also read the agent tile's padding: worth it when agents fill >= 3/4 of it (H200: 49 of
    # 64 agents 2-5% faster; 9 of 16 (Swin) 6% slower than masked loads)
    full_tile = 4 * n >= 3 * block_a
    block_n = CONFIG["block_n"]
    # absent tensors: a pointer the kernels never read (a plan keeps its arguments: not q, which it would keep alive)
    unused = q.new_empty(0) if plan else q
    dw, db = (t if t is not None else unused for t in (dwc_weight, dwc_bias))
    flags = dict(D=D, DV=DV, BLOCK_D=block_d, BLOCK_DV=block_dv, BLOCK_A=block_a, DOT_PREC=prec, BLOCK_M=block_m,
                 KS=ks, HAS_B2=bias2 is not None, HAS_DWC=dwc_weight is not None, HAS_DWB=dwc_bias is not None,
                 DWC_SEQ=one and bool(CONFIG["dwc_seq"]),
                 B2_WIDE=full_tile and _covers(b2, s2, (B, H, -(-N // block_m) * block_m, block_a)))
    out = ta._new(*out_shape, like=q)
    agents, agent_v = (out, out) if one else (q.new_empty(scratch[0]), q.new_empty(scratch[1]))
    b1_, b2_ = (b1 if b1 is not None else unused), (b2 if b2 is not None else unused)
    # each launch: (kernel, grid, args, the positions of q, k, v, agents, agent_v, out in args (None: absent), meta)
    launches = [(_agent_aggregate, (B * H,),
                 [q, k, v, b1_, agents, agent_v, b2_, dw, db, out, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
                  *s1, *s2, out.stride(0), out.stride(1), H, N, num_prefix_tokens, GH, GW, PH, PW, qk_scale],
                 (0, 1, 2, 4, 5, 9),
                 dict(BLOCK_N=block_n, HAS_B1=bias1 is not None, BROADCAST=one,
                      B1_WIDE=full_tile and _covers(b1, s1, (B, H, block_a, -(-k.shape[2] // block_n) * block_n)),
                      **flags, num_warps=CONFIG["warps_1"], num_stages=CONFIG["stages_1"]))]
    if not one:
        launches.append((_agent_broadcast, ((N + block_m - 1) // block_m, B * H),
                         [q, v, agents, agent_v, b2_, dw, db, out, *q.stride()[:3], *v.stride()[:3], *s2,
                          out.stride(0), out.stride(1), H, N, num_prefix_tokens, GH, GW, n, qk_scale],
                         (0, None, 1, 2, 3, 7), dict(**flags, num_warps=CONFIG["warps_2"], num_stages=1)))
    if not plan:
        for kernel, kgrid, args, _, meta in launches:
            kernel[kgrid](*args, **meta)
        return out
    prepared = []
    for kernel, kgrid, args, where, meta in launches:
        slots = [i for i in where if i is not None]
        prepared.append((launch.prepare(kernel, kgrid, args, slots, **meta),
                         tuple(j for j, i in enumerate(where) if i is not None)))
    return out, FusedPlan(prepared, out_shape, scratch, q.new_empty(0))


class FusedPlan:
    """`agent_fused_forward`'s launches, repeated for q, k, v laid out as the first call's (same shapes, strides
    and dtypes; tensors, or device addresses where `direct`) with that call's biases and conv weights: no argument
    checks and no Triton argument binding (`launch.Launch`)."""

    __slots__ = ("launches", "out_shape", "scratch", "like", "direct")

    def __init__(self, launches, out_shape, scratch, like: torch.Tensor):
        # like: an empty tensor of q's dtype and device, for the buffers
        self.launches, self.out_shape, self.scratch, self.like = launches, out_shape, scratch, like
        self.direct = all(run.direct for run, _ in launches)  # q, k, v may be passed as addresses

    def __call__(self, q, k, v) -> torch.Tensor:
        out = ta._new(*self.out_shape, like=self.like)
        if self.scratch:
            agents, agent_v = (self.like.new_empty(s) for s in self.scratch)
        else:
            agents = agent_v = out
        buffers = (q, k, v, agents, agent_v, out)
        for run, which in self.launches:
            run(*(buffers[j] for j in which))
        return out


def _covers(bias, strides, extents) -> bool:
    """Whether whole-tile loads over `extents` (the 4-d index ranges the kernel reads, broadcast dims included;
    `strides` from `_bstrides`) stay inside `bias`'s storage, with unit stride along the last dim:
    `kernels.agent.padded_bias`'s layout."""
    if bias is None or strides[-1] != 1:
        return False
    last = bias.storage_offset() + sum((e - 1) * st for e, st in zip(extents, strides))
    return (last + 1) * bias.element_size() <= bias.untyped_storage().nbytes()


def _bias4(bias):
    """A bias as a 4-d view (leading broadcast dims added), for `triton_attention._bstrides`."""
    return bias if bias is None or bias.dim() == 4 else bias.view((1,) * (4 - bias.dim()) + tuple(bias.shape))
