"""Skinny Triton kernels for dense attention: few keys (Nk <= 256) or few queries (H/Hkv · Nq <= 256), and
HaloNet's relative-position bias computed inside the kernel for the blocked layout.

Why: with 64 keys the general kernel runs one key block per program, so every program pays one q-tile load
latency with nothing to overlap (0.86 TB/s on an H200 where SDPA reaches 1.58). Here:

* `_keys_fwd` / `_keys_bwd` (few keys): all keys of one (b, h) fit one tile of BLOCK_N = next_pow2(Nk) rows.
  RESIDENT mode keeps K/V (loaded once) in the program and loops over a chunk of query blocks of that (b, h)
  (persistent style: the loop lets Triton prefetch the next q tile while this one computes); FLAT mode walks a
  range of (b, h, query block) items and reloads K/V per item (for many small (b, h) problems, e.g. the blocked
  HaloNet layout, where each (b, h) has one query block). One key tile: one softmax pass. The backward is one
  fused kernel: delta = rowsum(dO·O) (and the gate terms) in-kernel, dQ stored per query block, dK/dV
  accumulated over the program's query blocks (fp32 partials per program summed in torch), dS stored for a
  dense bias.
* `_queries_fwd` / `_queries_bwd` (few queries): the query rows of one KV head (GQA groups folded into the rows:
  row r = g · Nq + m) form one or two tiles; the keys are split over a program axis, each program looping over
  a chunk of key blocks; forward partials merged by `combine_splits`, dQ partials summed; dK/dV of a key chunk
  belong to one program (no atomics).
* Relative positions (`HAS_REL`, keys path): HaloNet's blocked layout (queries a qb x qb block, keys the
  win x win window, both row-major) with the general kernels' factors (`triton_kernels._rel_query_factor`: the
  table logits `q · RTᵀ` shifted per query row to the key classes; `_rel_key_factor`: a one-hot from iota),
  their dot chained into q·kᵀ (`LR_CHAIN`). Backward: the query factor as the forward saved it (else rebuilt),
  dU over the key chunks, dT by the inverse shift, dq += dT · RT, dRT += dTᵀ · q per program (partials in torch).

Dispatch lives in `triton_attention` (`_skinny_kind`, ATTNZOO_SKINNY, ATTNZOO_RELPOS; the general kernels also
compute the rel-pos term, and the two are tuned against each other). Launches are counted in
`triton_attention.CALLS`, per kernel and mode (tests assert which path ran).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from . import triton_attention as ta
from .triton_attention import CALLS
from .triton_kernels import (LOG2E, _logits_lr, _rel_key_factor, _rel_query_factor, _rel_rows, _rel_table_logit_grad,
                             _rel_tables, _scaled_logits, gate_backward, gated_output, online_softmax_update)

_FORCE = {}  # interpreter tests: {"keys_mode": "flat" | "res", "block_m": int, "key_chunk": int, "block_n": int}


# ----------------------------------------------------------------------------------------------------------
# helpers


@triton.jit
def _ld(base, offs_r, stride_r, offs_c, NR, NC: tl.constexpr, BLOCK_C: tl.constexpr):
    ptrs = base + offs_r[:, None] * stride_r + offs_c[None, :]
    if BLOCK_C == NC:
        x = tl.load(ptrs, mask=(offs_r < NR)[:, None], other=0.0)
    else:
        x = tl.load(ptrs, mask=(offs_r < NR)[:, None] & (offs_c < NC)[None, :], other=0.0)
    return x


@triton.jit
def _factor_ptrs(QF, b, h, offs_m, stride_qfb, stride_qfh, stride_qfn, BLOCK_W: tl.constexpr):
    """Pointers to the rel-pos query factor's (rows offs_m, 2 BLOCK_W) tile of (b, h): `_keys_fwd` stores it,
    `_keys_bwd` loads it."""
    return QF + b * stride_qfb + h * stride_qfh + offs_m[:, None] * stride_qfn + tl.arange(0, 2 * BLOCK_W)[None, :]


@triton.jit
def _keys_logits(q, k, uq, uk, qk_scale, b_base, offs_m, offs_n, rows, col_ok, stride_bm, stride_bn,
                 HAS_REL: tl.constexpr, HAS_BIAS: tl.constexpr, LR_CHAIN: tl.constexpr, DOT_PREC: tl.constexpr):
    """(s, scale): base-2 logits `s · scale` of one query block against one chunk of keys: q·kᵀ, the in-kernel
    rel-pos term (the general kernels' factors: `_rel_query_factor`, `_rel_key_factor`), the bias (shared by the
    forward and the backward of the few-keys kernel). The scale is left to the exponent, as `_tile_logits` does."""
    if HAS_REL:
        s, scale = _logits_lr(q, k, uq, uk, qk_scale, LR_CHAIN, DOT_PREC)
    else:
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        scale = qk_scale
    if HAS_BIAS:
        b_ptrs = b_base + offs_m[:, None] * stride_bm + offs_n[None, :] * stride_bn
        s = _scaled_logits(s, scale, tl.load(b_ptrs, mask=rows[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
                           * 1.4426950408889634)
        scale = 1.0
    return s, scale


@triton.jit
def _key_chunk(c, q, k_res, v_res, uq, qk_scale, K, V, b_base, b, hk, offs_n, offs_d, offs_dv, offs_m, rows,
               stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, stride_bm, stride_bn, NK,
               WIN: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_DV: tl.constexpr, BLOCK_W: tl.constexpr, RESIDENT: tl.constexpr, HAS_REL: tl.constexpr,
               HAS_BIAS: tl.constexpr, LR_CHAIN: tl.constexpr, DOT_PREC: tl.constexpr):
    """Key chunk `c` of one query block (shared by the forward and the backward): its keys' positions and
    validity, K and V (the resident tile, or loaded), the rel-pos key factor and the base-2 logits `s · scale`."""
    offs_nc = c * BLOCK_N + offs_n
    col_ok = offs_nc < NK
    if RESIDENT:
        k = k_res
        v = v_res
    else:
        k = _ld(K + b * stride_kb + hk * stride_kh, offs_nc, stride_kn, offs_d, NK, D, BLOCK_D)
        v = _ld(V + b * stride_vb + hk * stride_vh, offs_nc, stride_vn, offs_dv, NK, DV, BLOCK_DV)
    uk = 0.0
    if HAS_REL:
        uk = _rel_key_factor(offs_nc, NK, WIN, q.dtype, BLOCK_W)
    s, scale = _keys_logits(q, k, uq, uk, qk_scale, b_base, offs_m, offs_nc, rows, col_ok, stride_bm, stride_bn,
                            HAS_REL, HAS_BIAS, LR_CHAIN, DOT_PREC)
    return offs_nc, col_ok, k, v, uk, s, scale


@triton.jit
def _one_pass(s, scale, v, col_ok, KEYS_FULL: tl.constexpr, MAY_BE_INF: tl.constexpr, DOT_PREC: tl.constexpr):
    """(unnormalised output, base-2 row max, row sum) of a query block's logits `s · scale` over all its keys in
    one tile: one softmax pass (no running max to rescale), the scale applied in the exponent's multiply-add. The
    resident item loop at Nk 128 (d64, (64, 4, 3), no bias): 975 -> 678 SASS instructions, 162 -> 127 registers.
    KEYS_FULL: no padding keys to mask. MAY_BE_INF: a bias may hide all of a row's keys."""
    if not KEYS_FULL:
        s = tl.where(col_ok[None, :], s, float("-inf"))
    m = tl.max(s, 1) * scale  # scale > 0: the max of the scaled logits
    m_use = m
    if MAY_BE_INF:
        m_use = tl.where(m == float("-inf"), 0.0, m)
    p = tl.math.exp2(s * scale - m_use[:, None])
    return tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC), m, tl.sum(p, 1)


@triton.jit
def _item(it, bh0, NQB, H, GROUP, RESIDENT: tl.constexpr):
    """(b·H + h, query block, b, h, kv head) of item `it`. A RESIDENT program keeps its (b, h) `bh0`: no division
    of the item index, and the rest is loop-invariant (~200 SASS instructions an item fewer, Nk128 forward)."""
    if RESIDENT:
        bh = bh0
        mb = it - bh0 * NQB
    else:
        bh = it // NQB
        mb = it % NQB
    h = (bh % H).to(tl.int64)
    return bh, mb, (bh // H).to(tl.int64), h, h // GROUP


@triton.jit
def _item_range(pid, BH, NQB, ITEMS, CHUNKS, RESIDENT: tl.constexpr):
    """Items (b·H + h) · NQB + query block of one program: RESIDENT keeps one (b, h) per program."""
    if RESIDENT:
        bh0 = pid // CHUNKS
        c0 = (pid % CHUNKS) * ITEMS
        lo = bh0 * NQB + c0
        hi = bh0 * NQB + tl.minimum(NQB, c0 + ITEMS)
    else:
        bh0 = pid * 0
        lo = pid * ITEMS
        hi = tl.minimum(BH * NQB, lo + ITEMS)
    return bh0, lo, hi


# ----------------------------------------------------------------------------------------------------------
# few keys: forward


@triton.jit
def _keys_fwd(Q, K, V, O, LSE, BIAS, GATE, RH, RW,
              stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
              stride_ob, stride_oh, stride_on, stride_bb, stride_bh, stride_bm, stride_bn,
              stride_gb, stride_gh, stride_gn, stride_gd, stride_rt,
              BH, H, GROUP, NQ, NK, NQB, ITEMS, CHUNKS, qk_scale, rel_scale, QB: tl.constexpr, WIN: tl.constexpr,
              D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              KEY_CHUNKS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_T: tl.constexpr,
              BLOCK_W: tl.constexpr, RESIDENT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GATE: tl.constexpr,
              HAS_REL: tl.constexpr, LR_CHAIN: tl.constexpr, DOT_PREC: tl.constexpr, QF=None, stride_qfb=0,
              stride_qfh=0, stride_qfn=0, STORE_QF: tl.constexpr = False, KEYS_FULL: tl.constexpr = False):
    """Few keys: the keys of a (b, h) in KEY_CHUNKS chunks of BLOCK_N (one chunk: K/V kept in registers across a
    RESIDENT program's query blocks; several: a flash loop with an online softmax, for key counts whose
    power-of-two tile would be mostly padding or too large for the registers). STORE_QF (with HAS_REL): also write
    the rel-pos query factor to QF for the backward (`_keys_bwd`'s LOAD_QF). KEYS_FULL: NK fills the key tiles
    (no padding keys to mask)."""
    pid = tl.program_id(0)
    bh0, lo, hi = _item_range(pid, BH, NQB, ITEMS, CHUNKS, RESIDENT)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    cols = offs_dv < DV
    if RESIDENT:  # the host sets RESIDENT only with KEY_CHUNKS == 1
        b0 = (bh0 // H).to(tl.int64)
        h0 = (bh0 % H).to(tl.int64)
        hk0 = h0 // GROUP
        k_res = _ld(K + b0 * stride_kb + hk0 * stride_kh, offs_n, stride_kn, offs_d, NK, D, BLOCK_D)
        v_res = _ld(V + b0 * stride_vb + hk0 * stride_vh, offs_n, stride_vn, offs_dv, NK, DV, BLOCK_DV)
    else:
        k_res = 0.0
        v_res = 0.0
    rt = 0.0
    if HAS_REL:
        rt = _rel_tables(RH, RW, stride_rt, WIN, offs_d, D, BLOCK_D, BLOCK_T)
    inv_scale = 1.4426950408889634 / qk_scale
    for it in range(lo, hi):
        bh, mb, b, h, hk = _item(it, bh0, NQB, H, GROUP, RESIDENT)
        offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        rows = offs_m < NQ
        q = _ld(Q + b * stride_qb + h * stride_qh, offs_m, stride_qn, offs_d, NQ, D, BLOCK_D)
        uq = 0.0
        if HAS_REL:
            uq = _rel_query_factor(q, rt, offs_m, QB, WIN, rel_scale, inv_scale, BLOCK_T, BLOCK_W, LR_CHAIN, DOT_PREC)
            if STORE_QF:
                tl.store(_factor_ptrs(QF, b, h, offs_m, stride_qfb, stride_qfh, stride_qfn, BLOCK_W), uq,
                         mask=rows[:, None])
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        for c in range(0, KEY_CHUNKS):
            offs_nc, col_ok, k, v, uk, s, scale = _key_chunk(
                c, q, k_res, v_res, uq, qk_scale, K, V, BIAS + b * stride_bb + h * stride_bh, b, hk, offs_n, offs_d,
                offs_dv, offs_m, rows, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, stride_bm,
                stride_bn, NK, WIN, D, DV, BLOCK_N, BLOCK_D, BLOCK_DV, BLOCK_W, RESIDENT, HAS_REL, HAS_BIAS,
                LR_CHAIN, DOT_PREC)
            if KEY_CHUNKS == 1:  # all keys in one tile: nothing to rescale
                acc, m_i, l_i = _one_pass(s, scale, v, col_ok, KEYS_FULL, HAS_BIAS, DOT_PREC)
            else:
                s = tl.where(col_ok[None, :], s, float("-inf"))
                acc, m_i, l_i = online_softmax_update(acc, m_i, l_i, s, v, True, DOT_PREC, scale)
        m_use = tl.where(m_i == float("-inf"), 0.0, m_i)
        seen = l_i > 0.0
        den = tl.where(seen, l_i, 1.0)
        lse = tl.where(seen, (m_use + tl.math.log2(den)) * 0.6931471805599453, float("-inf"))
        if HAS_GATE:
            g_ptrs = GATE + b * stride_gb + h * stride_gh + offs_m[:, None] * stride_gn + offs_dv[None, :] * stride_gd
            g = tl.load(g_ptrs, mask=rows[:, None] & cols[None, :], other=0.0).to(tl.float32)
            out = gated_output(acc, den[:, None], g)
        else:
            out = acc / den[:, None]
        o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_dv[None, :]
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=rows[:, None] & cols[None, :])
        tl.store(LSE + bh.to(tl.int64) * NQ + offs_m, lse, mask=rows)


# ----------------------------------------------------------------------------------------------------------
# few keys: backward (one fused kernel)


@triton.jit
def _keys_bwd_chunk(c, offs_n, q, k_res, v_res, uq, doe, lse2, delta, dq, duq, dk, dv, qk_scale, sm_scale, K, V,
                    b_base, db_base, dk_base, dv_base, b, hk, offs_d, offs_dv, offs_m, rows, cols, stride_kb,
                    stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, stride_bm, stride_bn, stride_dbm,
                    stride_dbn, stride_dkn, stride_dvn, NK, WIN: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_W: tl.constexpr,
                    RESIDENT: tl.constexpr, HAS_REL: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_DB: tl.constexpr,
                    LR_CHAIN: tl.constexpr, DOT_PREC: tl.constexpr):
    """One key chunk of `_keys_bwd` (keys c · BLOCK_N + offs_n): dq and the rel-pos factor's gradient duq
    accumulate; dK/dV accumulate (RESIDENT) or are stored; dS stored for a dense bias."""
    offs_nc, col_ok, k, v, uk, s, scale = _key_chunk(
        c, q, k_res, v_res, uq, qk_scale, K, V, b_base, b, hk, offs_n, offs_d, offs_dv, offs_m, rows, stride_kb,
        stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, stride_bm, stride_bn, NK, WIN, D, DV, BLOCK_N,
        BLOCK_D, BLOCK_DV, BLOCK_W, RESIDENT, HAS_REL, HAS_BIAS, LR_CHAIN, DOT_PREC)
    p = tl.math.exp2(s * scale - lse2[:, None])
    p = tl.where(col_ok[None, :], p, 0.0)
    dp = tl.dot(doe, tl.trans(v), input_precision=DOT_PREC)
    ds = p * (dp - delta[:, None])
    ds_lp = ds.to(q.dtype)
    dq += tl.dot(ds_lp, k, input_precision=DOT_PREC)
    if HAS_REL:
        duq += tl.dot(ds_lp, uk, input_precision=DOT_PREC)
    dv_c = tl.dot(tl.trans(p.to(doe.dtype)), doe, input_precision=DOT_PREC)
    dk_c = tl.dot(tl.trans(ds_lp), q, input_precision=DOT_PREC)
    if STORE_DB:
        tl.store(db_base + offs_m[:, None] * stride_dbm + offs_nc[None, :] * stride_dbn, ds,
                 mask=rows[:, None] & col_ok[None, :])
    if RESIDENT:
        dk += dk_c
        dv += dv_c
    else:
        tl.store(dk_base + offs_nc[:, None] * stride_dkn + offs_d[None, :],
                 (dk_c * sm_scale).to(dk_base.dtype.element_ty), mask=col_ok[:, None] & (offs_d < D)[None, :])
        tl.store(dv_base + offs_nc[:, None] * stride_dvn + offs_dv[None, :], dv_c.to(dv_base.dtype.element_ty),
                 mask=col_ok[:, None] & cols[None, :])
    return dq, duq, dk, dv


@triton.jit
def _keys_bwd(Q, K, V, O, DO, LSE, DLSE, BIAS, GATE, RH, RW, DQ, DK, DV_, DB, DG, DRT,
              stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
              stride_ob, stride_oh, stride_on, stride_db, stride_dh, stride_dn,
              stride_dqb, stride_dqh, stride_dqn, stride_bb, stride_bh, stride_bm, stride_bn,
              stride_gb, stride_gh, stride_gn, stride_gd, stride_dgb, stride_dgh, stride_dgn, stride_dgd,
              stride_dbb, stride_dbh, stride_dbm, stride_dbn, stride_dks, stride_dkb, stride_dkh, stride_dkn,
              stride_dvs, stride_dvb, stride_dvh, stride_dvn, stride_rt,
              BH, H, GROUP, NQ, NK, NQB, ITEMS, CHUNKS, qk_scale, sm_scale, rel_scale, QB: tl.constexpr,
              WIN: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              KEY_CHUNKS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_T: tl.constexpr,
              BLOCK_W: tl.constexpr, RESIDENT: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_DB: tl.constexpr,
              HAS_GATE: tl.constexpr, GATE_ELEM: tl.constexpr, HAS_DLSE: tl.constexpr, HAS_REL: tl.constexpr,
              LR_CHAIN: tl.constexpr, DOT_PREC: tl.constexpr, ONE_ITEM: tl.constexpr = False,
              TAIL_N: tl.constexpr = 0, QF=None, stride_qfb=0, stride_qfh=0, stride_qfn=0,
              LOAD_QF: tl.constexpr = False):
    """Few-keys backward, one fused kernel. RESIDENT (one key chunk): dK/dV of a (b, h) accumulate over the
    program's query blocks. Otherwise every (b, h) has one query block (the host's rule), and each key chunk's
    dK/dV are final when written. TAIL_N > 0: the last of KEY_CHUNKS runs on a TAIL_N-key tile (`tail_tile`).
    LOAD_QF (with HAS_REL): the rel-pos query factor comes from QF, as the forward stored it, instead of a dot
    and a gather per query block."""
    pid = tl.program_id(0)
    bh0, lo, hi = _item_range(pid, BH, NQB, ITEMS, CHUNKS, RESIDENT)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    cols = offs_dv < DV
    if RESIDENT:
        b0 = (bh0 // H).to(tl.int64)
        h0 = (bh0 % H).to(tl.int64)
        hk0 = h0 // GROUP
        k_res = _ld(K + b0 * stride_kb + hk0 * stride_kh, offs_n, stride_kn, offs_d, NK, D, BLOCK_D)
        v_res = _ld(V + b0 * stride_vb + hk0 * stride_vh, offs_n, stride_vn, offs_dv, NK, DV, BLOCK_DV)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    else:
        k_res = 0.0
        v_res = 0.0
        dk = 0.0
        dv = 0.0
    rt = 0.0
    if HAS_REL:
        rt = _rel_tables(RH, RW, stride_rt, WIN, offs_d, D, BLOCK_D, BLOCK_T)
        _, t_row, packed = _rel_rows(WIN, BLOCK_T)
        dr_ptrs = DRT + pid.to(tl.int64) * (2 * (2 * WIN - 1)) * D + packed[:, None] * D + offs_d[None, :]
        dr_mask = (t_row < 2 * WIN - 1)[:, None] & (offs_d < D)[None, :]
        if not ONE_ITEM:
            dr = tl.zeros([2 * BLOCK_T, BLOCK_D], tl.float32)  # both tables' gradient, R_h's rows then R_w's
    inv_scale = 1.4426950408889634 / qk_scale
    for it in range(lo, hi):
        bh, mb, b, h, hk = _item(it, bh0, NQB, H, GROUP, RESIDENT)
        offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        rows = offs_m < NQ
        q = _ld(Q + b * stride_qb + h * stride_qh, offs_m, stride_qn, offs_d, NQ, D, BLOCK_D)
        do = _ld(DO + b * stride_db + h * stride_dh, offs_m, stride_dn, offs_dv, NQ, DV, BLOCK_DV)
        o = _ld(O + b * stride_ob + h * stride_oh, offs_m, stride_on, offs_dv, NQ, DV, BLOCK_DV)
        prod = o.to(tl.float32) * do.to(tl.float32)
        delta = tl.sum(prod, 1)
        if HAS_GATE:
            doe = gate_backward(GATE + b * stride_gb + h * stride_gh + offs_m * stride_gn,
                                DG + b * stride_dgb + h * stride_dgh + offs_m * stride_dgn, do, prod, delta, offs_dv,
                                stride_gd, stride_dgd, rows, cols, True, GATE_ELEM).to(do.dtype)
        else:
            doe = do
        if HAS_DLSE:
            delta -= tl.load(DLSE + bh.to(tl.int64) * NQ + offs_m, mask=rows, other=0.0)
        lse = tl.load(LSE + bh.to(tl.int64) * NQ + offs_m, mask=rows, other=float("inf"))
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        uq = 0.0
        duq = 0.0
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        if HAS_REL:
            if LOAD_QF:
                uq = tl.load(_factor_ptrs(QF, b, h, offs_m, stride_qfb, stride_qfh, stride_qfn, BLOCK_W),
                             mask=rows[:, None], other=0.0)
            else:
                uq = _rel_query_factor(q, rt, offs_m, QB, WIN, rel_scale, inv_scale, BLOCK_T, BLOCK_W, LR_CHAIN,
                                       DOT_PREC)
            duq = tl.zeros([BLOCK_M, 2 * BLOCK_W], tl.float32)
        b_base = BIAS + b * stride_bb + h * stride_bh
        db_base = DB + b * stride_dbb + h * stride_dbh
        dk_base = DK + b * stride_dkb + h * stride_dkh
        dv_base = DV_ + b * stride_dvb + h * stride_dvh
        for c in range(0, KEY_CHUNKS - (TAIL_N > 0)):
            dq, duq, dk, dv = _keys_bwd_chunk(
                c, offs_n, q, k_res, v_res, uq, doe, lse2, delta, dq, duq, dk, dv, qk_scale, sm_scale, K, V, b_base,
                db_base, dk_base, dv_base, b, hk, offs_d, offs_dv, offs_m, rows, cols, stride_kb, stride_kh,
                stride_kn, stride_vb, stride_vh, stride_vn, stride_bm, stride_bn, stride_dbm, stride_dbn, stride_dkn,
                stride_dvn, NK, WIN, D, DV, BLOCK_N, BLOCK_D, BLOCK_DV, BLOCK_W, RESIDENT, HAS_REL, HAS_BIAS,
                STORE_DB, LR_CHAIN, DOT_PREC)
        if TAIL_N > 0:  # the last chunk's keys in a narrower tile
            dq, duq, dk, dv = _keys_bwd_chunk(
                KEY_CHUNKS - 1, tl.arange(0, TAIL_N), q, k_res, v_res, uq, doe, lse2, delta, dq, duq, dk, dv,
                qk_scale, sm_scale, K, V, b_base, db_base, dk_base, dv_base, b, hk, offs_d, offs_dv, offs_m, rows,
                cols, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, stride_bm, stride_bn,
                stride_dbm, stride_dbn, stride_dkn, stride_dvn, NK, WIN, D, DV, BLOCK_N, BLOCK_D, BLOCK_DV, BLOCK_W,
                RESIDENT, HAS_REL, HAS_BIAS, STORE_DB, LR_CHAIN, DOT_PREC)
        dq = dq * sm_scale
        if HAS_REL:  # the tables' logit gradient dT: dq += dT · RT, dRT += dTᵀ · q
            dt = _rel_table_logit_grad(duq, offs_m, QB, WIN, rel_scale, BLOCK_T, BLOCK_W).to(q.dtype)
            dq += tl.dot(dt, rt, input_precision=DOT_PREC)
            if ONE_ITEM:  # no accumulator live across the key loop (32 registers per thread, where it spills)
                tl.store(dr_ptrs, tl.dot(tl.trans(dt), q, input_precision=DOT_PREC), mask=dr_mask)
            else:
                dr += tl.dot(tl.trans(dt), q, input_precision=DOT_PREC)
        tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqn + offs_d[None, :],
                 dq.to(DQ.dtype.element_ty), mask=rows[:, None] & (offs_d < D)[None, :])
    if RESIDENT:
        split = (pid % CHUNKS).to(tl.int64)
        col_ok = offs_n < NK
        tl.store(DK + split * stride_dks + b0 * stride_dkb + h0 * stride_dkh + offs_n[:, None] * stride_dkn +
                 offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty),
                 mask=col_ok[:, None] & (offs_d < D)[None, :])
        tl.store(DV_ + split * stride_dvs + b0 * stride_dvb + h0 * stride_dvh + offs_n[:, None] * stride_dvn +
                 offs_dv[None, :], dv.to(DV_.dtype.element_ty), mask=col_ok[:, None] & cols[None, :])
    if HAS_REL and not ONE_ITEM:  # per-program partials of both tables, summed in torch
        tl.store(dr_ptrs, dr, mask=dr_mask)


# ----------------------------------------------------------------------------------------------------------
# few queries (GQA groups folded into the rows): forward with split keys


@triton.jit
def _q_step(acc, m_i, l_i, q, k_base, v_base, b_rows, rows, start_n, stride_kn, stride_vn, stride_bn, qk_scale, NK,
            offs_d, offs_dv, D: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
            BLOCK_DV: tl.constexpr, MASKED: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PREC: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if MASKED:
        k = _ld(k_base, offs_n, stride_kn, offs_d, NK, D, BLOCK_D)
        v = _ld(v_base, offs_n, stride_vn, offs_dv, NK, DV, BLOCK_DV)
    else:
        k = _ld(k_base, offs_n, stride_kn, offs_d, NK + BLOCK_N, D, BLOCK_D)
        v = _ld(v_base, offs_n, stride_vn, offs_dv, NK + BLOCK_N, DV, BLOCK_DV)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)  # logits s · qk_scale, the scale left to the exponent
    scale = qk_scale
    if HAS_BIAS:
        s = _scaled_logits(s, scale, tl.load(b_rows[:, None] + offs_n[None, :] * stride_bn,
                                             mask=rows[:, None] & (offs_n < NK)[None, :], other=0.0).to(tl.float32)
                           * 1.4426950408889634)
        scale = 1.0
    if MASKED:
        s = tl.where((offs_n < NK)[None, :], s, float("-inf"))
    return online_softmax_update(acc, m_i, l_i, s, v, True, DOT_PREC, scale)


@triton.jit
def _queries_fwd(Q, K, V, O, LSE, BIAS, GATE,
                 stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                 stride_os, stride_ob, stride_oh, stride_on, stride_ls, stride_bb, stride_bh, stride_bm, stride_bn,
                 stride_gb, stride_gh, stride_gn, stride_gd,
                 H, HKV, GROUP, NQ, NK, R, PER, NKB, NKB_FULL, qk_scale,
                 D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GATE: tl.constexpr,
                 DOT_PREC: tl.constexpr):
    pid_s = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = (pid_bh // HKV).to(tl.int64)
    hk = (pid_bh % HKV).to(tl.int64)
    offs_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = offs_r < R
    h = hk * GROUP + (offs_r // NQ).to(tl.int64)  # per row: query head
    m = offs_r % NQ
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + b * stride_qb + h[:, None] * stride_qh + m[:, None] * stride_qn + offs_d[None, :],
                mask=rows[:, None] & (offs_d < D)[None, :], other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    b_rows = BIAS + b * stride_bb + h * stride_bh + m * stride_bm
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    nb_lo = pid_s * PER
    nb_hi = tl.minimum(NKB, nb_lo + PER)
    full_hi = tl.minimum(nb_hi, NKB_FULL)
    for nb in range(nb_lo, full_hi):
        acc, m_i, l_i = _q_step(acc, m_i, l_i, q, k_base, v_base, b_rows, rows, nb * BLOCK_N, stride_kn, stride_vn,
                                stride_bn, qk_scale, NK, offs_d, offs_dv, D, DV, BLOCK_N, BLOCK_D, BLOCK_DV, False,
                                HAS_BIAS, DOT_PREC)
    for nb in range(tl.maximum(nb_lo, full_hi), nb_hi):
        acc, m_i, l_i = _q_step(acc, m_i, l_i, q, k_base, v_base, b_rows, rows, nb * BLOCK_N, stride_kn, stride_vn,
                                stride_bn, qk_scale, NK, offs_d, offs_dv, D, DV, BLOCK_N, BLOCK_D, BLOCK_DV, True,
                                HAS_BIAS, DOT_PREC)
    seen = l_i > 0.0
    den = tl.where(seen, l_i, 1.0)
    m_use = tl.where(m_i == float("-inf"), 0.0, m_i)
    lse = tl.where(seen, (m_use + tl.math.log2(den)) * 0.6931471805599453, float("-inf"))
    cols = offs_dv < DV
    if HAS_GATE:
        g_rows = GATE + b * stride_gb + h * stride_gh + m * stride_gn
        g = tl.load(g_rows[:, None] + offs_dv[None, :] * stride_gd, mask=rows[:, None] & cols[None, :],
                    other=0.0).to(tl.float32)
        out = gated_output(acc, den[:, None], g)
    else:
        out = acc / den[:, None]
    o_ptrs = O + pid_s.to(tl.int64) * stride_os + b * stride_ob + h[:, None] * stride_oh + m[:, None] * stride_on + \
        offs_dv[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=rows[:, None] & cols[None, :])
    tl.store(LSE + pid_s.to(tl.int64) * stride_ls + (b * H + h) * NQ + m, lse, mask=rows)


# ----------------------------------------------------------------------------------------------------------
# few queries: backward (one fused kernel per key chunk)


@triton.jit
def _queries_bwd(Q, K, V, O, DO, LSE, DLSE, BIAS, GATE, DQ, DK, DV_, DB, DG,
                 stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                 stride_ob, stride_oh, stride_on, stride_db, stride_dh, stride_dn,
                 stride_dqs, stride_dqb, stride_dqh, stride_dqn, stride_bb, stride_bh, stride_bm, stride_bn,
                 stride_gb, stride_gh, stride_gn, stride_gd, stride_dgb, stride_dgh, stride_dgn, stride_dgd,
                 stride_dbb, stride_dbh, stride_dbm, stride_dbn, stride_dkb, stride_dkh, stride_dkn,
                 stride_dvb, stride_dvh, stride_dvn,
                 H, HKV, GROUP, NQ, NK, R, NRB, PER, NKB, qk_scale, sm_scale,
                 D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, ACCUM: tl.constexpr, HAS_BIAS: tl.constexpr,
                 STORE_DB: tl.constexpr, HAS_GATE: tl.constexpr, GATE_ELEM: tl.constexpr, HAS_DLSE: tl.constexpr,
                 DOT_PREC: tl.constexpr):
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)
    hk = (pid_bh % HKV).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    cols = offs_dv < DV
    nb_lo = pid_s * PER
    nb_hi = tl.minimum(NKB, nb_lo + PER)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    for mb in range(NRB):
        if ACCUM:
            tl.debug_barrier()  # dK/dV of the previous row block were stored by other threads of this program
        offs_r = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        rows = offs_r < R
        h = hk * GROUP + (offs_r // NQ).to(tl.int64)
        m = offs_r % NQ
        rmask = rows[:, None] & (offs_d < D)[None, :]
        vmask = rows[:, None] & cols[None, :]
        q = tl.load(Q + b * stride_qb + h[:, None] * stride_qh + m[:, None] * stride_qn + offs_d[None, :],
                    mask=rmask, other=0.0)
        do = tl.load(DO + b * stride_db + h[:, None] * stride_dh + m[:, None] * stride_dn + offs_dv[None, :],
                     mask=vmask, other=0.0)
        o = tl.load(O + b * stride_ob + h[:, None] * stride_oh + m[:, None] * stride_on + offs_dv[None, :],
                    mask=vmask, other=0.0)
        prod = o.to(tl.float32) * do.to(tl.float32)
        delta = tl.sum(prod, 1)
        if HAS_GATE:  # one split writes dg
            doe = gate_backward(GATE + b * stride_gb + h * stride_gh + m * stride_gn,
                                DG + b * stride_dgb + h * stride_dgh + m * stride_dgn, do, prod, delta, offs_dv,
                                stride_gd, stride_dgd, rows, cols, pid_s == 0, GATE_ELEM).to(do.dtype)
        else:
            doe = do
        lrow = (b * H + h) * NQ + m
        if HAS_DLSE:
            delta -= tl.load(DLSE + lrow, mask=rows, other=0.0)
        lse = tl.load(LSE + lrow, mask=rows, other=float("inf"))
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        b_rows = BIAS + b * stride_bb + h * stride_bh + m * stride_bm
        db_rows = DB + b * stride_dbb + h * stride_dbh + m * stride_dbm
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for nb in range(nb_lo, nb_hi):
            offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
            kmask = offs_n < NK
            k = _ld(k_base, offs_n, stride_kn, offs_d, NK, D, BLOCK_D)
            v = _ld(v_base, offs_n, stride_vn, offs_dv, NK, DV, BLOCK_DV)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
            if HAS_BIAS:
                s += tl.load(b_rows[:, None] + offs_n[None, :] * stride_bn, mask=rows[:, None] & kmask[None, :],
                             other=0.0).to(tl.float32) * 1.4426950408889634
            p = tl.math.exp2(s - lse2[:, None])
            p = tl.where(kmask[None, :], p, 0.0)
            dp = tl.dot(doe, tl.trans(v), input_precision=DOT_PREC)
            ds = p * (dp - delta[:, None])
            ds_lp = ds.to(q.dtype)
            dq += tl.dot(ds_lp, k, input_precision=DOT_PREC)
            dk_b = tl.dot(tl.trans(ds_lp), q, input_precision=DOT_PREC) * sm_scale
            dv_b = tl.dot(tl.trans(p.to(doe.dtype)), doe, input_precision=DOT_PREC)
            dk_ptrs = DK + b * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :]
            dv_ptrs = DV_ + b * stride_dvb + hk * stride_dvh + offs_n[:, None] * stride_dvn + offs_dv[None, :]
            kd_mask = kmask[:, None] & (offs_d < D)[None, :]
            kv_mask = kmask[:, None] & cols[None, :]
            if ACCUM:  # several row blocks: fp32 buffers, accumulated by this program only
                dk_b += tl.load(dk_ptrs, mask=kd_mask & (mb > 0), other=0.0)
                dv_b += tl.load(dv_ptrs, mask=kv_mask & (mb > 0), other=0.0)
            tl.store(dk_ptrs, dk_b.to(DK.dtype.element_ty), mask=kd_mask)
            tl.store(dv_ptrs, dv_b.to(DV_.dtype.element_ty), mask=kv_mask)
            if STORE_DB:
                tl.store(db_rows[:, None] + offs_n[None, :] * stride_dbn, ds, mask=rows[:, None] & kmask[None, :])
        tl.store(DQ + pid_s.to(tl.int64) * stride_dqs + b * stride_dqb + h[:, None] * stride_dqh +
                 m[:, None] * stride_dqn + offs_d[None, :], dq * sm_scale, mask=rmask)


# ----------------------------------------------------------------------------------------------------------
# host side


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _key_tiles(nk: int, cfg: tuple) -> Tuple[int, int]:
    """(BLOCK_N, KEY_CHUNKS) of a few-keys config: its 6th field is the key chunk (0 or absent: all keys in one
    power-of-two tile)."""
    full = max(16, _next_pow2(nk))
    bn = cfg[5] if len(cfg) > 5 and cfg[5] else full
    bn = min(bn, full)
    return bn, _cdiv(nk, bn)


def tail_tile(nk: int, bn: int, key_chunks: int, rel: bool = False) -> int:
    """The backward's key tile for the last of `key_chunks` chunks of `bn` keys, where a narrower power of two
    covers its keys; 0: the full chunk. Not with the rel-pos term, whose kernel then spills more (ptxas at
    (64, 4, 1, flat, 64, 64): 92 -> 168 B). H200, HaloNet's blocked layout (144 keys in 64-key chunks, a 16-key
    tail): no bias 0.170 -> 0.160 ms, rel-pos 0.280 -> 0.285 ms (`probe_bias_kernels.py --keys-tail`)."""
    if key_chunks < 2 or rel:
        return 0
    tail = max(16, _next_pow2(nk - (key_chunks - 1) * bn))
    return tail if tail < bn else 0


def key_plan(nq: int, nk: int, cfg: tuple, backward: bool) -> Tuple[str, int, int]:
    """(mode, BLOCK_N, KEY_CHUNKS) a few-keys config runs with. K/V stay in registers across query blocks
    ("res") only as one key tile, so a chunked config runs "flat"; the backward with several query blocks per
    (b, h) accumulates dK/dV over them in one program, so it takes one key tile and "res"."""
    mode = cfg[3]
    bn, key_chunks = _key_tiles(nk, cfg)
    if backward and _cdiv(nq, cfg[0]) > 1:
        return "res", *_key_tiles(nk, ())
    return ("flat" if key_chunks > 1 else mode), bn, key_chunks


def max_keys(d: int, dv: int) -> int:
    """Largest Nk the few-keys kernels keep in one tile (K/V tiles and, backward, fp32 dK/dV of BLOCK_N x head dim
    per program): 256 at head dims <= 64, 64 at <= 128."""
    bd = max(ta._block_d(d), ta._block_d(dv))
    return 256 if bd <= 64 else (64 if bd <= 128 else 0)



def keys_candidates(nq: int, nk: int, d: int, dv: int, backward: bool = False) -> List[tuple]:
    """(BLOCK_M, warps, stages, mode, waves[, key chunk]) for the few-keys kernels; mode "res" | "flat"; a key
    chunk of 64 loops over the keys in 64-key tiles (online softmax) instead of one power-of-two tile."""
    bm_cap = _next_pow2(max(nq, 16))
    if ta._interpret():
        bm = _FORCE.get("block_m", 16)
        mode = _FORCE.get("keys_mode", "res" if nq > bm else "flat")
        return [(bm, 4, 1, mode, 4, _FORCE.get("key_chunk", 0))]
    fast = ta._fast_tune()
    chunked = _next_pow2(nk) >= 128  # a 64-key loop beats one (BM, 128 | 256) tile: padding, registers
    wide = _next_pow2(nk) >= 256  # 256-key tiles: smaller query blocks / more warps for the (BM, 256) logits
    if nq <= 128:  # one query block per (b, h): many small problems (blocked layouts, agents)
        bm = max(16, bm_cap)
        # K/V of the next item are prefetched through shared memory: 3 stages of a (256, 64) K/V pair with the
        # in-kernel rel-pos operands exceed the 227 KB of an H200 block (scripts/aot_compile_kernels.py)
        if backward:
            one = [(bm, 4, 2, "flat", 4), (bm, 4, 1, "flat", 4), (bm, 8, 1, "flat", 8)]
        else:
            one = [(bm, 4, 2, "flat", 4), (bm, 8, 2, "flat", 4), (bm, 4, 1, "flat", 8)]
        loop = [(bm, 4, 2, "flat", 4, 64), (bm, 4, 2, "flat", 64, 64), (bm, 8, 2, "flat", 4, 64),
                (bm, 4, 2, "flat", 4, 32), (bm, 4, 3, "flat", 4, 64), (bm, 4, 2, "flat", 16, 64),
                (bm, 8, 2, "flat", 16, 128)]
        if not chunked:
            return one[:2] if fast else one
        if backward:  # an unpipelined 64-key loop at 64 waves: the blocked HaloNet layout (64 x 144) 0.178 ->
            # 0.170 ms, with rel-pos 0.345 -> 0.334 (benchmarks/logs/probe_r58_blocked_keys_grid.log)
            return [(bm, 4, 1, "flat", 64, 64)] + (loop[:2] + one[:1] if fast else loop + one)
        return loop[:2] + one[:1] if fast else loop + one
    if backward:  # several query blocks per (b, h): one key tile (dK/dV accumulate in registers)
        if wide:
            cands = [(64, 8, 2, "res", 4), (32, 4, 2, "res", 4), (64, 4, 2, "res", 4)]
        else:  # 2 waves: fewer programs summing fewer dK/dV partials (Nk64 0.277 -> 0.264 ms, Nk128 0.464 -> 0.444;
            # benchmarks/logs/probe_r51_keys_bwd_waves.log)
            cands = [(64, 4, 2, "res", 2), (128, 8, 2, "res", 2), (64, 8, 2, "res", 4), (64, 4, 2, "res", 4)]
        return cands[:2] if fast else cands
    # The one-pass forward (`_one_pass`, twenty-third session; ptxas, Triton 3.6, d64, (64, 4, 3)) takes 99 / 127 /
    # 207 registers at 64 / 128 / 256 keys (the online-softmax step took 162 at 128). Measured on forced configs
    # (H200, d64, Nq 16384, interleaved CUDA graphs, benchmarks/logs/device_r112_skinny_configs.log): 64 keys
    # (64, 4, 3, res, 8) 0.077 ms, (128, 8, 3, res, 4) 0.079; 128 keys (64, 4, 3, res, 8) 0.103, (64, 4, 4, res, 8)
    # 0.105, (128, 4, 3, res, 4) 0.169 (it led the list before); 256 keys (64, 4, 4, res, 8) 0.178, (64, 4, 3,
    # res, 4) 0.179. The 64-key-chunk loops ran 10-25% behind the one-tile configs here (fourth session; they win on
    # the small blocked layouts).
    if chunked:
        one = [(64, 4, 4, "res", 8), (64, 4, 3, "res", 4), (128, 8, 3, "res", 4), (64, 8, 3, "res", 4),
               (32, 4, 3, "res", 4)] if wide \
            else [(64, 4, 3, "res", 8), (64, 4, 4, "res", 8), (64, 4, 2, "res", 4), (128, 4, 3, "res", 4),
                  (64, 4, 2, "flat", 64), (32, 4, 3, "res", 4), (64, 4, 3, "res", 4)]
        loop = [(64, 4, 3, "flat", 64, 64), (128, 4, 3, "flat", 64, 64), (128, 8, 3, "flat", 64, 64),
                (128, 8, 3, "flat", 64, 128), (128, 4, 2, "flat", 8, 64)]
        return one[:2] + loop[:1] if fast else one + loop
    # "flat" with 64 waves = one query block per program (as flash kernels launch): nothing to pipeline, but no
    # serial loop either; the third session measured the looping "res" configs at 1.0 TB/s vs SDPA's 2.0
    cands = [(64, 4, 3, "res", 8), (128, 8, 3, "res", 4), (64, 4, 3, "res", 4), (128, 4, 3, "res", 4),
             (64, 4, 2, "flat", 64), (32, 4, 3, "res", 4), (64, 8, 3, "res", 8), (128, 8, 3, "res", 8),
             (128, 4, 3, "flat", 4), (128, 4, 2, "flat", 64), (32, 4, 2, "flat", 64), (256, 8, 3, "res", 4),
             (128, 8, 4, "res", 4), (128, 4, 4, "res", 2), (64, 4, 4, "res", 8), (128, 4, 3, "res", 2)]
    return cands[:2] if fast else cands


def queries_candidates(rows: int, d: int = 64, backward: bool = False) -> List[tuple]:
    """(BLOCK_M, BLOCK_N, warps, stages, waves) for the few-queries kernels. The backward keeps q, dO, o and the
    fp32 dq of a row block resident next to the K/V pipeline: at head dim 128 it takes 64-row blocks and two
    stages (128 rows x 128 keys x 3 stages needs 336 KB of shared memory; the H200 has 227 KB per block)."""
    bm = min(128, max(16, _next_pow2(rows)))
    if ta._interpret():
        return [(_FORCE.get("block_m", 16), _FORCE.get("block_n", 16), 4, 1, 2)]
    keep = 2 if ta._fast_tune() else None
    wide = ta._block_d(d) > 64
    if backward:  # more waves than the forward: each program loops over fewer key blocks (H200, d64, 8 x 8 heads: Nq49
        # Nk4096 0.081 -> 0.066 ms at 4 waves, Nq64 Nk16384 0.291 -> 0.222 ms at 8; benchmarks/logs/probe_r47_*)
        bmb = min(bm, 64) if wide else bm
        return [(bmb, 64, 4, 2, 4), (bmb, 64, 4, 2, 8), (bmb, 64, 4, 2, 2), (bmb, 32, 4, 2, 2), (bmb, 64, 8, 1, 4),
                (bmb, 64, 4, 2, 16)][:keep]
    if wide:
        return [(bm, 64, 4, 3, 2), (bm, 128, 8, 2, 2), (min(bm, 64), 128, 4, 2, 4)][:keep]
    return [(bm, 128, 4, 3, 2), (bm, 64, 4, 3, 2), (bm, 128, 8, 3, 4)][:keep]


def _keys_grid(BH: int, nqb: int, device, mode: str, waves: int, backward: bool):
    """(programs, items per program, chunks per (b, h)); RESIDENT programs stay inside one (b, h)."""
    target = waves * ta._num_sms(device)
    if mode == "res":
        chunks = max(1, min(nqb, target // max(BH, 1)))
        items = _cdiv(nqb, chunks)
        chunks = _cdiv(nqb, items)
        return BH * chunks, items, chunks
    total = BH * nqb
    items = max(1, total // target)
    return _cdiv(total, items), items, 1


def _gate_views(gate):
    """Gate (B, N, H[, Dv]) as the (B, H, N, 1 | Dv) view, with broadcast strides."""
    if gate is None:
        return None, (0, 0, 0, 0)
    g4 = ta._gate4(gate)
    return g4, ta._bstrides(g4)


def keys_forward(q, k, v, bias, gate, scale, cfg, rel: Optional[ta.Rel] = None, save_factor: bool = False):
    """Few-keys forward; returns (out (B, H, NQ, DV), lse (B, H, NQ) fp32, the rel-pos query factor
    (B, H, NQ, 2 block_w) when `save_factor` (with `rel`), else None)."""
    q, k, v = ta._lastdim_contiguous(q), ta._lastdim_contiguous(k), ta._lastdim_contiguous(v)
    B, H, NQ, D = q.shape
    HKV, NK, DV = k.shape[1], k.shape[2], v.shape[-1]
    BM, warps, stages, _, waves = cfg[:5]
    mode, BN, key_chunks = key_plan(NQ, NK, cfg, False)
    nqb = _cdiv(NQ, BM)
    nprog, items, chunks = _keys_grid(B * H, nqb, q.device, mode, waves, False)
    out = ta._new(B, H, NQ, DV, like=q)
    lse = ta._new(B, H, NQ, like=q, dtype=torch.float32)
    g4, sg = _gate_views(gate)
    bias = None if bias is None else ta._Problem(ta.Dense(), NQ, NK, BM, 16, q.device).bias_in(bias, NQ, NK)
    sb = ta._bstrides(bias)
    factor = ta._new(B, H, NQ, 2 * rel.block_w, like=q) if save_factor else None
    CALLS["keys_fwd_" + mode + ("_chunked" if key_chunks > 1 else "") + ("_rel" if rel is not None else "")] += 1
    _keys_fwd[(nprog,)](
        q, k, v, out, lse, bias if bias is not None else q, g4 if g4 is not None else q,
        stride_qb=q.stride(0), stride_qh=q.stride(1), stride_qn=q.stride(2),
        stride_kb=k.stride(0), stride_kh=k.stride(1), stride_kn=k.stride(2),
        stride_vb=v.stride(0), stride_vh=v.stride(1), stride_vn=v.stride(2),
        stride_ob=out.stride(0), stride_oh=out.stride(1), stride_on=out.stride(2),
        stride_bb=sb[0], stride_bh=sb[1], stride_bm=sb[2], stride_bn=sb[3],
        stride_gb=sg[0], stride_gh=sg[1], stride_gn=sg[2], stride_gd=sg[3],
        BH=B * H, H=H, GROUP=H // HKV, NQ=NQ, NK=NK, NQB=nqb, ITEMS=items, CHUNKS=chunks,
        qk_scale=scale * LOG2E, D=D, DV=DV, BLOCK_M=BM, BLOCK_N=BN, KEY_CHUNKS=key_chunks,
        BLOCK_D=ta._block_d(D), BLOCK_DV=ta._block_d(DV), RESIDENT=mode == "res", HAS_BIAS=bias is not None,
        HAS_GATE=gate is not None, DOT_PREC=ta._dot_prec(q.dtype), num_warps=warps, num_stages=stages,
        HAS_REL=rel is not None, LR_CHAIN=ta.lr_chain(q, None if rel is None else "rel"), **ta.rel_args(rel, q),
        **ta.factor_args(factor, q), STORE_QF=factor is not None, KEYS_FULL=key_chunks == 1 and NK == BN)
    return out, lse, factor


def keys_backward(do, q, k, v, out, lse, dlse, bias, gate, scale, cfg, need_db, rel: Optional[ta.Rel] = None,
                  rel_factor: Optional[torch.Tensor] = None):
    """Few-keys backward; returns (dq, dk, dv, db (B, H, NQ, NK) in `ta.ds_dtype` | None, dg (B, H, N, 1 | DV) |
    None, (drh, drw) | None). `rel_factor` (only with `rel`): the rel-pos query factor `keys_forward` (or the
    general forward) saved, loaded instead of rebuilt."""
    q, k, v = ta._lastdim_contiguous(q), ta._lastdim_contiguous(k), ta._lastdim_contiguous(v)
    do, out = ta._lastdim_contiguous(do), ta._lastdim_contiguous(out)
    B, H, NQ, D = q.shape
    HKV, NK, DV = k.shape[1], k.shape[2], v.shape[-1]
    GROUP = H // HKV
    BM, warps, stages, _, waves = cfg[:5]
    mode, BN, key_chunks = key_plan(NQ, NK, cfg, True)
    nqb = _cdiv(NQ, BM)
    nprog, items, chunks = _keys_grid(B * H, nqb, q.device, mode, waves, True)
    f32 = torch.float32
    lse = lse.contiguous()
    dlse = None if dlse is None else dlse.float().contiguous()
    dq = ta._new(B, H, NQ, D, like=q)
    direct = mode == "flat" and GROUP == 1  # each program writes finished dK/dV of its (b, h)
    S = 1 if mode == "flat" else chunks
    dk = ta._new(S, B, H, NK, D, like=q, dtype=q.dtype if direct else f32)
    dv = ta._new(S, B, H, NK, DV, like=q, dtype=q.dtype if direct else f32)
    g4, sg = _gate_views(gate)
    dg = None if gate is None else ta._gate_grad_buffer(g4)
    sdg = ta._bstrides(dg)
    bias_k = None if bias is None else ta._Problem(ta.Dense(), NQ, NK, BM, 16, q.device).bias_in(bias, NQ, NK)
    sb = ta._bstrides(bias_k)
    store_db = need_db and bias is not None
    db = ta._new(B, H, NQ, NK, like=q, dtype=ta.ds_dtype(bias_k, (B, H, NQ, NK))) if store_db else None
    sdb = ta._bstrides(db)
    # the tables' gradient: per-program partials of both, R_h's rows then R_w's (as the general dQ kernel's dT)
    drt = None if rel is None else torch.empty(nprog, 2 * rel.nt, D, device=q.device, dtype=f32)
    CALLS["keys_bwd_" + mode + ("_chunked" if key_chunks > 1 else "") + ("_rel" if rel is not None else "") +
          ("_items" if rel is not None and items > 1 else "")] += 1  # several items: dRT partials accumulated
    tail_n = tail_tile(NK, BN, key_chunks, rel is not None)
    CALLS["keys_bwd_tail"] += tail_n > 0
    CALLS["keys_bwd_rel_factor_loaded"] += rel_factor is not None
    _keys_bwd[(nprog,)](
        q, k, v, out, do, lse, dlse if dlse is not None else lse, bias_k if bias_k is not None else q,
        g4 if g4 is not None else q, DQ=dq, DK=dk, DV_=dv, DB=db if db is not None else lse,
        DG=dg if dg is not None else lse, DRT=drt if drt is not None else lse,
        stride_qb=q.stride(0), stride_qh=q.stride(1), stride_qn=q.stride(2),
        stride_kb=k.stride(0), stride_kh=k.stride(1), stride_kn=k.stride(2),
        stride_vb=v.stride(0), stride_vh=v.stride(1), stride_vn=v.stride(2),
        stride_ob=out.stride(0), stride_oh=out.stride(1), stride_on=out.stride(2),
        stride_db=do.stride(0), stride_dh=do.stride(1), stride_dn=do.stride(2),
        stride_dqb=dq.stride(0), stride_dqh=dq.stride(1), stride_dqn=dq.stride(2),
        stride_bb=sb[0], stride_bh=sb[1], stride_bm=sb[2], stride_bn=sb[3],
        stride_gb=sg[0], stride_gh=sg[1], stride_gn=sg[2], stride_gd=sg[3],
        stride_dgb=sdg[0], stride_dgh=sdg[1], stride_dgn=sdg[2], stride_dgd=sdg[3],
        stride_dbb=sdb[0], stride_dbh=sdb[1], stride_dbm=sdb[2], stride_dbn=sdb[3],
        stride_dks=dk.stride(0), stride_dkb=dk.stride(1), stride_dkh=dk.stride(2), stride_dkn=dk.stride(3),
        stride_dvs=dv.stride(0), stride_dvb=dv.stride(1), stride_dvh=dv.stride(2), stride_dvn=dv.stride(3),
        BH=B * H, H=H, GROUP=GROUP, NQ=NQ, NK=NK, NQB=nqb, ITEMS=items, CHUNKS=chunks,
        qk_scale=scale * LOG2E, sm_scale=scale, D=D, DV=DV, BLOCK_M=BM,
        BLOCK_N=BN, KEY_CHUNKS=key_chunks, TAIL_N=tail_n, BLOCK_D=ta._block_d(D), BLOCK_DV=ta._block_d(DV),
        RESIDENT=mode == "res", HAS_BIAS=bias_k is not None, STORE_DB=store_db, HAS_GATE=gate is not None,
        GATE_ELEM=gate is not None and g4.shape[-1] > 1, HAS_DLSE=dlse is not None,
        DOT_PREC=ta._dot_prec(q.dtype), num_warps=warps, num_stages=stages, HAS_REL=rel is not None,
        LR_CHAIN=ta.lr_chain(q, None if rel is None else "rel"), ONE_ITEM=rel is not None and items == 1,
        **ta.rel_args(rel, q), **ta.factor_args(rel_factor, q), LOAD_QF=rel_factor is not None)
    if direct:
        dk, dv = dk[0], dv[0]
    else:  # sum the per-program partials (one pass, cast included without GQA), then the GQA group
        dk, dv = (ta.sum_over_leading(t, q.dtype if GROUP == 1 else None) for t in (dk, dv))
        if GROUP > 1:
            dk = dk.reshape(B, HKV, GROUP, NK, D).sum(2).to(q.dtype)
            dv = dv.reshape(B, HKV, GROUP, NK, DV).sum(2).to(q.dtype)
    drel = None
    if drt is not None:  # the contiguous partials summed in two levels, then separate outputs (a custom op's
        # outputs must not alias). H200, 4,096 partials of 46 x 64: one sum over the leading dim 0.021 ms, first
        # over groups of 16 programs' partials as one wide row 0.014 ms (`probe_bias_kernels.py --reduce-partials`)
        group = next(g for g in (16, 8, 4, 2, 1) if nprog % g == 0)
        dr = drt.view(nprog // group, -1).sum(0).view(group, *drt.shape[1:]).sum(0)
        drel = dr[:rel.nt].clone(), dr[rel.nt:].clone()
    return dq, dk, dv, db, dg, drel


def _query_splits(programs: int, nkb: int, device, waves: int) -> tuple:
    """(splits, key blocks per split): about `waves` waves, at least 2 key blocks per split."""
    want = _cdiv(waves * ta._num_sms(device), max(programs, 1))
    s = max(1, min(want, nkb // 2))
    per = _cdiv(nkb, s)
    return _cdiv(nkb, per), per


def queries_forward(q, k, v, bias, gate, scale, cfg):
    q, k, v = ta._lastdim_contiguous(q), ta._lastdim_contiguous(k), ta._lastdim_contiguous(v)
    B, H, NQ, D = q.shape
    HKV, NK, DV = k.shape[1], k.shape[2], v.shape[-1]
    GROUP = H // HKV
    R = GROUP * NQ
    BM, BN, warps, stages, waves = cfg
    nrb, nkb = _cdiv(R, BM), _cdiv(NK, BN)
    S, per = _query_splits(nrb * B * HKV, nkb, q.device, waves)
    if S == 1:
        out = ta._new(1, B, H, NQ, DV, like=q)
        lse = ta._new(1, B, H, NQ, like=q, dtype=torch.float32)
    else:
        out = ta._new(S, B, H, NQ, DV, like=q, dtype=torch.float32)
        lse = ta._new(S, B, H, NQ, like=q, dtype=torch.float32)
    g4, sg = _gate_views(gate if S == 1 else None)
    bias = None if bias is None else ta._Problem(ta.Dense(), NQ, NK, BM, BN, q.device).bias_in(bias, NQ, NK)
    sb = ta._bstrides(bias)
    CALLS["queries_fwd"] += 1
    _queries_fwd[(S, nrb, B * HKV)](
        q, k, v, out, lse, bias if bias is not None else q, g4 if g4 is not None else q,
        stride_qb=q.stride(0), stride_qh=q.stride(1), stride_qn=q.stride(2),
        stride_kb=k.stride(0), stride_kh=k.stride(1), stride_kn=k.stride(2),
        stride_vb=v.stride(0), stride_vh=v.stride(1), stride_vn=v.stride(2),
        stride_os=out.stride(0), stride_ob=out.stride(1), stride_oh=out.stride(2), stride_on=out.stride(3),
        stride_ls=lse.stride(0), stride_bb=sb[0], stride_bh=sb[1], stride_bm=sb[2], stride_bn=sb[3],
        stride_gb=sg[0], stride_gh=sg[1], stride_gn=sg[2], stride_gd=sg[3],
        H=H, HKV=HKV, GROUP=GROUP, NQ=NQ, NK=NK, R=R, PER=per, NKB=nkb, NKB_FULL=NK // BN,
        qk_scale=scale * LOG2E, D=D, DV=DV, BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=ta._block_d(D),
        BLOCK_DV=ta._block_d(DV), HAS_BIAS=bias is not None, HAS_GATE=g4 is not None,
        DOT_PREC=ta._dot_prec(q.dtype), num_warps=warps, num_stages=stages)
    if S == 1:
        return out[0], lse[0]
    from .triton_combine import combine_splits  # here: an import line on top shifts the kernels' cache keys

    return combine_splits(out, lse, None if gate is None else ta._gate4(gate), q.dtype)


def queries_backward(do, q, k, v, out, lse, dlse, bias, gate, scale, cfg, need_db):
    q, k, v = ta._lastdim_contiguous(q), ta._lastdim_contiguous(k), ta._lastdim_contiguous(v)
    do, out = ta._lastdim_contiguous(do), ta._lastdim_contiguous(out)
    B, H, NQ, D = q.shape
    HKV, NK, DV = k.shape[1], k.shape[2], v.shape[-1]
    GROUP = H // HKV
    R = GROUP * NQ
    BM, BN, warps, stages, waves = cfg
    nrb, nkb = _cdiv(R, BM), _cdiv(NK, BN)
    S, per = _query_splits(B * HKV, nkb, q.device, waves)
    f32 = torch.float32
    accum = nrb > 1
    lse = lse.contiguous()
    dlse = None if dlse is None else dlse.float().contiguous()
    dq = ta._new(S, B, H, NQ, D, like=q, dtype=f32)
    dk = ta._new(B, HKV, NK, D, like=q, dtype=f32 if accum else q.dtype)
    dv = ta._new(B, HKV, NK, DV, like=q, dtype=f32 if accum else q.dtype)
    g4, sg = _gate_views(gate)
    dg = None if gate is None else ta._gate_grad_buffer(g4)
    sdg = ta._bstrides(dg)
    bias_k = None if bias is None else ta._Problem(ta.Dense(), NQ, NK, BM, BN, q.device).bias_in(bias, NQ, NK)
    sb = ta._bstrides(bias_k)
    store_db = need_db and bias is not None
    db = ta._new(B, H, NQ, NK, like=q, dtype=ta.ds_dtype(bias_k, (B, H, NQ, NK))) if store_db else None
    sdb = ta._bstrides(db)
    CALLS["queries_bwd"] += 1
    _queries_bwd[(S, B * HKV)](
        q, k, v, out, do, lse, dlse if dlse is not None else lse, bias_k if bias_k is not None else q,
        g4 if g4 is not None else q, dq, dk, dv, db if db is not None else lse, dg if dg is not None else lse,
        stride_qb=q.stride(0), stride_qh=q.stride(1), stride_qn=q.stride(2),
        stride_kb=k.stride(0), stride_kh=k.stride(1), stride_kn=k.stride(2),
        stride_vb=v.stride(0), stride_vh=v.stride(1), stride_vn=v.stride(2),
        stride_ob=out.stride(0), stride_oh=out.stride(1), stride_on=out.stride(2),
        stride_db=do.stride(0), stride_dh=do.stride(1), stride_dn=do.stride(2),
        stride_dqs=dq.stride(0), stride_dqb=dq.stride(1), stride_dqh=dq.stride(2), stride_dqn=dq.stride(3),
        stride_bb=sb[0], stride_bh=sb[1], stride_bm=sb[2], stride_bn=sb[3],
        stride_gb=sg[0], stride_gh=sg[1], stride_gn=sg[2], stride_gd=sg[3],
        stride_dgb=sdg[0], stride_dgh=sdg[1], stride_dgn=sdg[2], stride_dgd=sdg[3],
        stride_dbb=sdb[0], stride_dbh=sdb[1], stride_dbm=sdb[2], stride_dbn=sdb[3],
        stride_dkb=dk.stride(0), stride_dkh=dk.stride(1), stride_dkn=dk.stride(2),
        stride_dvb=dv.stride(0), stride_dvh=dv.stride(1), stride_dvn=dv.stride(2),
        H=H, HKV=HKV, GROUP=GROUP, NQ=NQ, NK=NK, R=R, NRB=nrb, PER=per, NKB=nkb,
        qk_scale=scale * LOG2E, sm_scale=scale, D=D, DV=DV, BLOCK_M=BM, BLOCK_N=BN,
        BLOCK_D=ta._block_d(D), BLOCK_DV=ta._block_d(DV), ACCUM=accum, HAS_BIAS=bias_k is not None,
        STORE_DB=store_db, HAS_GATE=gate is not None, GATE_ELEM=gate is not None and g4.shape[-1] > 1,
        HAS_DLSE=dlse is not None, DOT_PREC=ta._dot_prec(q.dtype), num_warps=warps, num_stages=stages)
    return ta.sum_over_leading(dq, q.dtype), dk.to(q.dtype), dv.to(q.dtype), db, dg
