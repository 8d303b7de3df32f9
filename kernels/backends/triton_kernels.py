"""Triton kernels for `kernels.attention`: a FlashAttention-2 style forward, and a backward split into a dK/dV
kernel (one program per key block, looping over the query blocks that see it, GQA groups summed in-program)
and a dQ kernel (one program per query block), so no atomics are needed.

Two ways to enumerate blocks (constexpr `GRID_MODE`):

* 1-d patterns (Dense, Causal, Window1d): query i sees key j iff `i + OFF - LEFT <= j <= i + OFF + RIGHT` and
  `j < NK`. Block ranges, and which blocks are full, follow analytically from (OFF, LEFT, RIGHT).
* grid patterns (Neighborhood, Halo) on tile-permuted tokens (`kernels.tiles`): per query tile a CSR list of
  full key tiles and one of partial key tiles (and the transposed lists for dK/dV). The element mask of a
  partial tile is rebuilt from per-axis tables: query window bounds `QLO/QHI` and key coordinates `KC`.
  Pair mode (constexpr `PAIR_MASK`, `kernels.tiles.grid_tile_map(pair_mask=True)`): each partial pair has its
  own bits (`PART_BITS`): only the axes partial for that pair are tested, and padding / dead slots (tiles that
  are not a power of two, e.g. 21 frames in a 128-row block) are masked by adding a per-key bias `KB` (0/-inf).

Full blocks run without any mask; only partial blocks pay for the element mask. Logits are kept in base 2
(`qk_scale = scale * log2(e)`); the stored lse is natural-log. Rows that see no key give zeros and lse=-inf.

Optional terms (constexpr flags, absent ones cost nothing):

* `HAS_BIAS`: a dense additive bias read tile by tile through its strides (stride 0 on broadcast dims);
  `STORE_DB` writes dS (the logit gradient, natural units) per (b, h) from the dK/dV kernel (`_attn_bwd_dq_pair`).
* `HAS_LR`: low-rank logits `U_q · U_kᵀ` (FlashBias), a second small dot per tile; gradients dU_k (dK/dV kernel,
  per query head) and dU_q (dQ kernel).
* `HAS_REL` (with `HAS_LR`): HaloNet's relative-position logits as exact low-rank factors, on the blocked layout
  (queries one QB x QB block, keys its WIN x WIN window, both row-major) or a 2-d Halo grid: the query factor from
  `q · RTᵀ` (one small dot against both per-axis tables) shifted per row to the key classes (`tl.gather`; on the
  grid the shift follows each slot's token coordinates, read from QROW), the key factor a one-hot built from iota
  (blocked) or loaded (REL_KF, always on the grid: a (Nk, 2 BLOCK_W) constant, as low-rank key factors are).
  Backward: the dK/dV and dQ kernels load the query factor the forward stored (STORE_QF) or `_rel_factor_bwd` wrote;
  the dQ kernel shifts dU back to dT (the tables' logit gradient), adds dT · RT to dq and writes dT per row (the
  tables' gradient dTᵀ · q is one GEMM in torch).
* `HAS_GATE`: `out *= sigmoid(g)` in the forward epilogue (`gated_output`; g per element, its tile prefetched into
  L2, or with GATE_ELEM=False one per row, loaded before the key loop so its latency hides behind it); the
  backward's delta kernel turns dO into dO·sigmoid(g) and writes dg.
* `GATHER` (grid patterns, forward and backward): inputs and outputs in token order, rows read and written through
  the slot -> token tables QROW / KROW (-1 on padding: a padding slot reads row 0 and is neither weighted nor
  stored), instead of copies permuted into tile order.
* splits (1-d patterns only): a third program axis cuts the key blocks (forward, dQ) or query blocks (dK/dV)
  into chunks, so skinny problems (few query or few key blocks) still fill the GPU; partial results go to a
  float32 buffer with a per-split stride and are merged by `triton_combine.combine_splits`.
"""
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _axis_vis(lo, hi, c, d, HAS_DIL: tl.constexpr, TRANS: tl.constexpr):
    # lo/hi: per-query window bounds, c: per-key coordinates; result (M, N), or (N, M) when TRANS
    if TRANS:
        vis = (c[:, None] >= lo[None, :]) & (c[:, None] <= hi[None, :])
        if HAS_DIL:
            vis = vis & (((c[:, None] - lo[None, :]) % d) == 0)
    else:
        vis = (c[None, :] >= lo[:, None]) & (c[None, :] <= hi[:, None])
        if HAS_DIL:
            vis = vis & (((c[None, :] - lo[:, None]) % d) == 0)
    return vis


@triton.jit
def _visible(offs_m, offs_n, NQ, NK, OFF, LEFT, RIGHT, QLO, QHI, KC, NQP, NKP, DIL0, DIL1, DIL2,
             GRID_MODE: tl.constexpr, MASK_AXES: tl.constexpr, HAS_DIL: tl.constexpr, TRANS: tl.constexpr):
    """Element mask of one (query block, key block) pair; (BM, BN), or (BN, BM) when TRANS.

    Grid mode: only the axes in the bitmask MASK_AXES are tested (an axis whose tile pairs are never partial
    cannot hide a key of a partial pair; the tile map says which)."""
    if GRID_MODE:
        if TRANS:
            vis = (offs_n[:, None] >= 0) & (offs_m[None, :] >= 0)
        else:
            vis = (offs_m[:, None] >= 0) & (offs_n[None, :] >= 0)
        if MASK_AXES & 1:
            vis = vis & _axis_vis(tl.load(QLO + offs_m), tl.load(QHI + offs_m), tl.load(KC + offs_n), DIL0,
                                  HAS_DIL, TRANS)
        if MASK_AXES & 2:
            vis = vis & _axis_vis(tl.load(QLO + NQP + offs_m), tl.load(QHI + NQP + offs_m),
                                  tl.load(KC + NKP + offs_n), DIL1, HAS_DIL, TRANS)
        if MASK_AXES & 4:
            vis = vis & _axis_vis(tl.load(QLO + 2 * NQP + offs_m), tl.load(QHI + 2 * NQP + offs_m),
                                  tl.load(KC + 2 * NKP + offs_n), DIL2, HAS_DIL, TRANS)
    else:
        lo = offs_m + OFF - LEFT
        hi = offs_m + OFF + RIGHT
        if TRANS:
            vis = (offs_n[:, None] >= lo[None, :]) & (offs_n[:, None] <= hi[None, :]) & (offs_n[:, None] < NK)
        else:
            vis = (offs_n[None, :] >= lo[:, None]) & (offs_n[None, :] <= hi[:, None]) & (offs_n[None, :] < NK)
    return vis


@triton.jit
def _pair_mask(s, bits, offs_m, offs_n, QLO, QHI, KC, KB, NQP, NKP, DIL0, DIL1, DIL2, MASK_AXES: tl.constexpr,
               HAS_DIL: tl.constexpr, TRANS: tl.constexpr):
    """Pair mode (grid patterns): logits `s` (BM, BN), or (BN, BM) when TRANS, set to -inf where invisible, testing
    only what this pair's `bits` name (runtime, uniform per program): bit 3 adds the key bias KB (0 / -inf per
    key: padding and dead slots), bit a < 3 tests axis a. MASK_AXES bounds the bits at compile time."""
    if MASK_AXES & 8:
        if (bits & 8) != 0:
            kb = tl.load(KB + offs_n)
            if TRANS:
                s = s + kb[:, None]
            else:
                s = s + kb[None, :]
    if MASK_AXES & 1:
        if (bits & 1) != 0:
            s = tl.where(_axis_vis(tl.load(QLO + offs_m), tl.load(QHI + offs_m), tl.load(KC + offs_n), DIL0,
                                   HAS_DIL, TRANS), s, float("-inf"))
    if MASK_AXES & 2:
        if (bits & 2) != 0:
            s = tl.where(_axis_vis(tl.load(QLO + NQP + offs_m), tl.load(QHI + NQP + offs_m),
                                   tl.load(KC + NKP + offs_n), DIL1, HAS_DIL, TRANS), s, float("-inf"))
    if MASK_AXES & 4:
        if (bits & 4) != 0:
            s = tl.where(_axis_vis(tl.load(QLO + 2 * NQP + offs_m), tl.load(QHI + 2 * NQP + offs_m),
                                   tl.load(KC + 2 * NKP + offs_n), DIL2, HAS_DIL, TRANS), s, float("-inf"))
    return s


@triton.jit
def _load_rows(base, offs_r, stride_r, offs_c, NR, NC: tl.constexpr, BLOCK_C: tl.constexpr, CHECK_R: tl.constexpr,
               other=0.0):
    ptrs = base + offs_r[:, None] * stride_r + offs_c[None, :]
    if CHECK_R:
        if BLOCK_C == NC:
            x = tl.load(ptrs, mask=(offs_r < NR)[:, None], other=other)
        else:
            x = tl.load(ptrs, mask=(offs_r < NR)[:, None] & (offs_c < NC)[None, :], other=other)
    else:
        if BLOCK_C == NC:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=(offs_c < NC)[None, :], other=other)
    return x


@triton.jit
def _load_tile(base, offs_m, offs_n, stride_m, stride_n, NQ, NK, GRID_MODE: tl.constexpr, TRANS: tl.constexpr):
    """A (BM, BN) tile of a (Nq, Nk) matrix (the dense bias, or the stored dS), (BN, BM) when TRANS. 1-d mode
    masks rows/columns past the end; grid mode runs on padded buffers. Row offsets are int64: Nq * Nk reaches
    2^31 at N = 46341. (A first version clamped the indices with tl.minimum: 3.9-4.9x the no-bias forward on an
    H200; this masked form measured 1.34-1.42x, fourth session.)"""
    if TRANS:
        ptrs = base + offs_n[:, None] * stride_n + offs_m[None, :].to(tl.int64) * stride_m
        if GRID_MODE:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=(offs_n < NK)[:, None] & (offs_m < NQ)[None, :], other=0.0)
    else:
        ptrs = base + offs_m[:, None].to(tl.int64) * stride_m + offs_n[None, :] * stride_n
        if GRID_MODE:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=(offs_m < NQ)[:, None] & (offs_n < NK)[None, :], other=0.0)
    return x


@triton.jit
def _bias_tile(b_base, offs_m, offs_n, stride_bm, stride_bn, NQ, NK, GRID_MODE: tl.constexpr, TRANS: tl.constexpr):
    """Dense bias tile in base-2 logits (`_load_tile`)."""
    return _load_tile(b_base, offs_m, offs_n, stride_bm, stride_bn, NQ, NK, GRID_MODE, TRANS).to(tl.float32) * \
        1.4426950408889634


@triton.jit
def _chunk(lo, hi, pid_s, SPLIT_BLOCKS):
    """Intersect the block range [lo, hi) with split pid_s's chunk of SPLIT_BLOCKS blocks."""
    c0 = pid_s * SPLIT_BLOCKS
    return tl.maximum(lo, c0), tl.minimum(hi, c0 + SPLIT_BLOCKS)


@triton.jit
def _ranges_q(pid_m, NQ, NK, OFF, LEFT, RIGHT, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """1-d patterns, one query block: key blocks [nb_lo, nb_hi), of which [f_lo, f_hi) are full."""
    m0 = pid_m * BLOCK_M
    m1 = tl.minimum(m0 + BLOCK_M, NQ)
    first = tl.maximum(m0 + OFF - LEFT, 0)
    last = tl.minimum(m1 - 1 + OFF + RIGHT, NK - 1)
    nb_lo = first // BLOCK_N
    nb_hi = tl.where(last >= first, last // BLOCK_N + 1, nb_lo)
    f_lo = (tl.maximum(m1 - 1 + OFF - LEFT, 0) + BLOCK_N - 1) // BLOCK_N
    f_hi = tl.maximum(tl.minimum(m0 + OFF + RIGHT, NK - 1) + 1, 0) // BLOCK_N
    f_lo = tl.minimum(tl.maximum(f_lo, nb_lo), nb_hi)
    f_hi = tl.minimum(tl.maximum(f_hi, f_lo), nb_hi)
    return nb_lo, nb_hi, f_lo, f_hi


@triton.jit
def _rel_rows(WIN: tl.constexpr, BLOCK_T: tl.constexpr):
    """HAS_REL: the 2 BLOCK_T rows of a table tile (R_h on rows [0, BLOCK_T), R_w on [BLOCK_T, 2 BLOCK_T)), as
    (second: an R_w row, t: its row in that table (padding where t >= 2 WIN - 1), packed: its row in both tables
    stacked, R_h's 2 WIN - 1 rows then R_w's: the layout of dT and of the tables' gradient)."""
    r = tl.arange(0, 2 * BLOCK_T)
    second = r >= BLOCK_T
    t = tl.where(second, r - BLOCK_T, r)
    return second, t, t + tl.where(second, 2 * WIN - 1, 0)


@triton.jit
def _rel_tables(RH, RW, stride_rt, WIN: tl.constexpr, offs_d, D: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_T: tl.constexpr):
    """HAS_REL: the (2 BLOCK_T, BLOCK_D) tile RT of both (2 WIN - 1, D) tables (rows as `_rel_rows`),
    zero-padded."""
    second, t, _ = _rel_rows(WIN, BLOCK_T)
    offs = t[:, None] * stride_rt + offs_d[None, :]
    ptrs = tl.where(second[:, None], RW + offs, RH + offs)
    return tl.load(ptrs, mask=(t < 2 * WIN - 1)[:, None] & (offs_d < D)[None, :], other=0.0)


@triton.jit
def _rel_query_place(q_tok, QB: tl.constexpr, WIN: tl.constexpr, REL_GRID: tl.constexpr, rel_qw: tl.constexpr,
                     rel_block: tl.constexpr):
    """HAS_REL: per query (1-d), its row and column in its QB x QB block, then its window's row and column shifts:
    the window-local index of key class c is (c - shift) mod WIN. Blocked layout (q_tok = the row in the block;
    rows past the block, padding, stay inside it): no shift. Halo grid (REL_GRID; q_tok = the token on a grid
    rel_qw wide): block i's window starts at key coordinate i · rel_block, key class = key coordinate mod WIN, so
    the shift is that start mod WIN."""
    tok = tl.maximum(q_tok, 0).to(tl.uint32)  # unsigned: divisions by constants without sign fix-ups
    if REL_GRID:
        qy, qx = tok // rel_qw, tok % rel_qw
        pos_y, pos_x = (qy % QB).to(tl.int32), (qx % QB).to(tl.int32)
        shift_y = ((qy // QB) * rel_block % WIN).to(tl.int32)
        shift_x = ((qx // QB) * rel_block % WIN).to(tl.int32)
    else:
        pos_y, pos_x = tl.minimum(tok // QB, QB - 1).to(tl.int32), (tok % QB).to(tl.int32)
        shift_y = 0
        shift_x = 0
    return pos_y, pos_x, shift_y, shift_x


@triton.jit
def _rel_query_factor(q, rt, q_tok, QB: tl.constexpr, WIN: tl.constexpr, rel_scale, inv_scale,
                      BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr, LR_CHAIN: tl.constexpr, DOT_PREC: tl.constexpr,
                      REL_GRID: tl.constexpr = False, rel_qw: tl.constexpr = 1, rel_block: tl.constexpr = 0):
    """HAS_REL: (BM, 2 BLOCK_W) query factor in q's dtype, u[m, c] = rel_scale · q_m · R_h[j - qy(m) + WIN - 1]
    for the row classes c < BLOCK_W (j: class c's window-local index, `_rel_query_place`), then the same with R_w
    and qx(m) for the column classes (qy, qx: the query's position in its QB x QB block). Classes >= WIN hold
    finite values the key factor never selects. Under LR_CHAIN 1 also times `inv_scale` (1 / scale), as
    `_logits_lr` takes it (`_lr_chain_factor` for loaded factors). The gather runs per table, on (BM, 2, .) views:
    half the shuffles of one over both tables' columns."""
    if LR_CHAIN == 1:
        rel_scale = rel_scale * inv_scale
    t = tl.dot(q, tl.trans(rt), input_precision=DOT_PREC)  # (BM, 2 BLOCK_T) fp32
    bm: tl.constexpr = t.shape[0]
    pos_y, pos_x, shift_y, shift_x = _rel_query_place(q_tok, QB, WIN, REL_GRID, rel_qw, rel_block)
    is_col = (tl.arange(0, 2) == 1)[None, :, None]
    pos = tl.where(is_col, pos_x[:, None, None], pos_y[:, None, None])
    j = tl.arange(0, BLOCK_W)[None, None, :]
    if REL_GRID:
        shift = tl.where(is_col, shift_x[:, None, None], shift_y[:, None, None])
        j = tl.where(j < shift, j - shift + WIN, j - shift)  # (j - shift) mod WIN: no integer division
    idx = j + WIN - 1 - pos  # in [WIN - QB, BLOCK_W + WIN - 2]: clamped where that leaves the table
    if WIN < QB:
        idx = tl.maximum(idx, 0)
    if BLOCK_W + WIN - 2 >= BLOCK_T:
        idx = tl.minimum(idx, BLOCK_T - 1)
    u = tl.gather(tl.reshape(t, (bm, 2, BLOCK_T)), idx, 2)
    return (tl.reshape(u, (bm, 2 * BLOCK_W)) * rel_scale).to(q.dtype)


@triton.jit
def _rel_key_factor(offs_n, NK, WIN: tl.constexpr, dtype: tl.constexpr, BLOCK_W: tl.constexpr):
    """HAS_REL: (BN, 2 BLOCK_W) one-hots of key n's window row n // WIN, then of its column n % WIN; zero past NK.
    Built in registers on the blocked layout; with REL_KF the kernels load such one-hots from memory instead
    (`triton_attention.Rel.key_onehots`, any layout: on a grid each key coordinate mod WIN)."""
    c = tl.arange(0, 2 * BLOCK_W)[None, :]
    n = offs_n.to(tl.uint32)  # unsigned: division by WIN without sign fix-ups
    cls = tl.where(c >= BLOCK_W, (n % WIN).to(tl.int32)[:, None] + BLOCK_W, (n // WIN).to(tl.int32)[:, None])
    return ((cls == c) & (offs_n < NK)[:, None]).to(dtype)


@triton.jit
def _rel_table_logit_grad(duq, q_tok, QB: tl.constexpr, WIN: tl.constexpr, rel_scale, BLOCK_T: tl.constexpr,
                          BLOCK_W: tl.constexpr, REL_GRID: tl.constexpr = False, rel_qw: tl.constexpr = 1,
                          rel_block: tl.constexpr = 0):
    """HAS_REL: dT (BM, 2 BLOCK_T) fp32, the gradient of the table logits `q · RTᵀ` from the query factor's gradient
    `duq` (BM, 2 BLOCK_W): the inverse of `_rel_query_factor`'s shift (only classes < WIN carry a gradient). One
    gather over both tables: the forward's per-table gather made the few-keys backward spill more here."""
    t = tl.arange(0, 2 * BLOCK_T)[None, :]
    col = t >= BLOCK_T
    pos_y, pos_x, shift_y, shift_x = _rel_query_place(q_tok, QB, WIN, REL_GRID, rel_qw, rel_block)
    j = tl.where(col, t - BLOCK_T, t) - (WIN - 1) + tl.where(col, pos_x[:, None], pos_y[:, None])  # window index
    c = j
    if REL_GRID:
        shift = tl.where(col, shift_x[:, None], shift_y[:, None])
        c = tl.where(j + shift >= WIN, j + shift - WIN, j + shift)  # mod WIN for the j in [0, WIN) kept
    idx = tl.minimum(tl.maximum(c, 0), BLOCK_W - 1) + tl.where(col, BLOCK_W, 0)
    return tl.where((j >= 0) & (j < WIN), tl.gather(duq, idx, 1), 0.0) * rel_scale


@triton.jit
def _rel_factor_bwd(Q, RH, RW, UQ, QROW, stride_qb, stride_qh, stride_qn, stride_ub, stride_uh, stride_un, stride_rt,
                    H, NQ, rel_scale, inv_scale, rel_qw: tl.constexpr, rel_block: tl.constexpr, D: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, QB: tl.constexpr, WIN: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr, LR_CHAIN: tl.constexpr, DOT_PREC: tl.constexpr,
                    GRID_MODE: tl.constexpr, GATHER: tl.constexpr):
    """HAS_REL backward: the query factor `_rel_query_factor` of every query block, written once (B, H, rows,
    2 BLOCK_W) for the dK/dV and dQ kernels: dK/dV would otherwise rebuild it (a dot and a gather) for each of the
    many key blocks that visit the query block. Rows and token coordinates as the kernels take them (GATHER: token
    order through QROW; grid: coordinates from QROW either way)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows = offs_m < NQ
    q_rows = offs_m
    r_tok = offs_m
    if GRID_MODE:
        r_tok = tl.load(QROW + offs_m, mask=rows, other=0)
        if GATHER:
            rows = rows & (r_tok >= 0)
            q_rows = tl.maximum(r_tok, 0)
    q = _load_rows(Q + b * stride_qb + h * stride_qh, q_rows, stride_qn, offs_d, NQ, D, BLOCK_D, True)
    uq = _rel_query_factor(q, _rel_tables(RH, RW, stride_rt, WIN, offs_d, D, BLOCK_D, BLOCK_T), r_tok, QB, WIN,
                           rel_scale, inv_scale, BLOCK_T, BLOCK_W, LR_CHAIN, DOT_PREC, GRID_MODE, rel_qw, rel_block)
    offs_c = tl.arange(0, 2 * BLOCK_W)
    tl.store(UQ + b * stride_ub + h * stride_uh + q_rows[:, None] * stride_un + offs_c[None, :], uq,
             mask=rows[:, None])


@triton.jit
def _logits_lr(a, b, ua, ub, qk_scale, LR_CHAIN: tl.constexpr, DOT_PREC: tl.constexpr):
    """(s, scale): base-2 logits `s · scale` of `a · bᵀ` plus low-rank `ua · ubᵀ`; the caller applies the scale
    (in the exponent's multiply-add, `_scaled_logits`). LR_CHAIN: the second dot accumulates into the first (one
    accumulator; two separate dots and a sum cost the blocked HaloNet forward +55% for +25% MMA work, H200). 1: one
    of ua, ub comes pre-scaled by 1 / scale and one scale follows; 2: the factors as given, `a · bᵀ` scaled before
    the second dot, log2 e after it (float32 throughout, exact at any scale); 0: scaled here, scale 1."""
    if LR_CHAIN == 2:
        scaled = tl.dot(a, tl.trans(b), input_precision=DOT_PREC) * (qk_scale * 0.6931471805599453)
        s = tl.dot(ua, tl.trans(ub), acc=scaled, input_precision=DOT_PREC)
        scale = 1.4426950408889634
    elif LR_CHAIN:
        s = tl.dot(ua, tl.trans(ub), acc=tl.dot(a, tl.trans(b), input_precision=DOT_PREC), input_precision=DOT_PREC)
        scale = qk_scale
    else:
        s = tl.dot(a, tl.trans(b), input_precision=DOT_PREC) * qk_scale
        s += tl.dot(ua, tl.trans(ub), input_precision=DOT_PREC) * 1.4426950408889634
        scale = 1.0
    return s, scale


@triton.jit
def _scaled_logits(s, scale, bias):
    """`s · scale + bias` (one multiply-add a logit), for a bias added to logits whose scale `_logits_lr` or
    `_tile_logits` left to the exponent."""
    return s * scale + bias


@triton.jit
def _tile_logits(q, k, uq, kf_base, k_rows, offs_n, offs_r, stride_kfn, qk_scale, NK, check, WIN: tl.constexpr,
                 R: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr, HAS_LR: tl.constexpr,
                 HAS_REL: tl.constexpr, LR_CHAIN: tl.constexpr, DOT_PREC: tl.constexpr, REL_KF: tl.constexpr = False):
    """Base-2 logits of a (query block, key tile) pair, forward and dQ: q·kᵀ, plus the low-rank term with the key
    factor loaded (rows `k_rows`; the rel-pos one-hots too under REL_KF) or, under HAS_REL, the rel-pos one-hots
    of keys `offs_n` built in registers. Returns (s, key factor, scale): the logits are `s · scale`, the scale left
    to the exponent's multiply-add (one op a logit less; dense d64 forward 0.334 -> 0.324 ms, H200, r114)."""
    uk = k
    if HAS_LR:
        if HAS_REL and not REL_KF:
            uk = _rel_key_factor(offs_n, NK, WIN, k.dtype, BLOCK_W)
        else:
            uk = _load_rows(kf_base, k_rows, stride_kfn, offs_r, NK, R, BLOCK_R, check)
        s, scale = _logits_lr(q, k, uq, uk, qk_scale, LR_CHAIN, DOT_PREC)
    else:
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        scale = qk_scale
    return s, uk, scale


@triton.jit
def _lr_chain_factor(u, inv_scale, LR_CHAIN: tl.constexpr):
    """A loaded factor as `_logits_lr` takes it: times 1 / scale under LR_CHAIN 1."""
    if LR_CHAIN == 1:
        u = (u.to(tl.float32) * inv_scale).to(u.dtype)
    return u


# ----------------------------------------------------------------------------------------------------------
# forward


@triton.jit
def _fwd_step(acc, m_i, l_i, q, uq, k_base, v_base, kf_base, b_base, stride_kn, stride_vn, stride_kfn, stride_bm,
              stride_bn, start_n, offs_m, offs_d, offs_dv, offs_r, qk_scale, NQ, NK, OFF, LEFT, RIGHT, QLO, QHI, KC,
              NQP, NKP, DIL0, DIL1, DIL2,
              D: tl.constexpr, DV: tl.constexpr, R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_DV: tl.constexpr, BLOCK_R: tl.constexpr, MASKED: tl.constexpr, GRID_MODE: tl.constexpr,
              MASK_AXES: tl.constexpr, HAS_DIL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LR: tl.constexpr,
              DOT_PREC: tl.constexpr, bits=0, KB=None, PAIR_MASK: tl.constexpr = False, KROW=None,
              GATHER: tl.constexpr = False, q_rows=None, WIN: tl.constexpr = 1, BLOCK_W: tl.constexpr = 16,
              HAS_REL: tl.constexpr = False, LR_CHAIN: tl.constexpr = False, REL_KF: tl.constexpr = False):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    check = MASKED and not GRID_MODE  # 1-d partial blocks may run past NK
    if GATHER:  # inputs unpermuted: this tile's rows through the slot -> token table (padding reads row 0, masked)
        k_rows = tl.maximum(tl.load(KROW + offs_n), 0)
        bias_rows = q_rows
    else:
        k_rows = offs_n
        bias_rows = offs_m
    k = _load_rows(k_base, k_rows, stride_kn, offs_d, NK, D, BLOCK_D, check)
    v = _load_rows(v_base, k_rows, stride_vn, offs_dv, NK, DV, BLOCK_DV, check)
    s, _, scale = _tile_logits(q, k, uq, kf_base, k_rows, offs_n, offs_r, stride_kfn, qk_scale, NK, check, WIN, R,
                               BLOCK_R, BLOCK_W, HAS_LR, HAS_REL, LR_CHAIN, DOT_PREC, REL_KF)
    if HAS_BIAS:
        s = _scaled_logits(s, scale, _bias_tile(b_base, bias_rows, k_rows, stride_bm, stride_bn, NQ, NK, GRID_MODE,
                                               False))
        scale = 1.0
    if MASKED and PAIR_MASK:
        s = _pair_mask(s, bits, offs_m, offs_n, QLO, QHI, KC, KB, NQP, NKP, DIL0, DIL1, DIL2, MASK_AXES, HAS_DIL,
                       False)
    elif MASKED:
        vis = _visible(offs_m, offs_n, NQ, NK, OFF, LEFT, RIGHT, QLO, QHI, KC, NQP, NKP, DIL0, DIL1, DIL2,
                       GRID_MODE, MASK_AXES, HAS_DIL, False)
        s = tl.where(vis, s, float("-inf"))
    return online_softmax_update(acc, m_i, l_i, s, v, MASKED or HAS_BIAS, DOT_PREC, scale)


@triton.jit
def gated_output(acc, den, g):
    """acc * sigmoid(g) / den (den >= 1) with one MUFU op an element: 1 / (1 + 2^(-g log2 e)) by Newton steps on
    the FMA pipe from a bit-trick seed. The epilogue's MUFU ops compete with the co-resident program's softmax
    exponentials: EX2 + RSQ an element cost the element-wise gate forward ~1% more than this (H200, d128, r101).
    The clamp keeps 1 + e a normal float (the seed's domain); g = -inf gives ~2^-125 / den, g = NaN gives NaN."""
    y = 1.0 + tl.math.exp2(tl.minimum(g * -1.4426950408889634, 125.0, propagate_nan=tl.PropagateNan.ALL))
    x = (0x7EF311C3 - y.to(tl.int32, bitcast=True)).to(tl.float32, bitcast=True)  # 1 / y within 5.1%
    for _ in tl.static_range(3):  # relative error 5.1e-2 -> 2.6e-3 -> 6.7e-6 -> float32 rounding
        x = x + x * (1.0 - y * x)
    return acc * (x * (1.0 / den))


@triton.jit
def _prefetch_l2(row_ptrs, N: tl.constexpr, ELEM_BYTES: tl.constexpr):
    """Hint the rows at `row_ptrs` (N contiguous elements each) into L2, one `prefetch.global.L2` per 128-byte
    line: a tile only the epilogue reads then comes from L2 when every program of a wave asks for its tile at
    once, instead of from HBM (`::evict_last` measured the same). Inline PTX: GPU only, never interpreted."""
    LINE: tl.constexpr = 128 // ELEM_BYTES
    LINES: tl.constexpr = (N + LINE - 1) // LINE  # <= 8: head dims <= 256, 2- or 4-byte elements
    LINES_P2: tl.constexpr = 1 if LINES == 1 else (2 if LINES == 2 else (4 if LINES <= 4 else 8))
    lines = tl.arange(0, LINES_P2)
    ptrs = row_ptrs[:, None] + tl.where(lines < LINES, lines * LINE, 0)[None, :]
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def gate_backward(g_rows, dg_rows, do, prod, delta, offs_dv, stride_gd, stride_dgd, rows, cols, store,
                  GATE_ELEM: tl.constexpr):
    """Backward of a sigmoid gate on the output (O is the gated output): returns dO_eff = dO * sigmoid(g) in
    float32 (what the attention saw) and stores dg = dO * O * (1 - sigmoid(g)) where `store` (per element, or
    per row from `delta` = rowsum(dO * O) when head-wise). `g_rows` / `dg_rows`: per-row pointers; `prod` =
    dO * O in float32."""
    vmask = rows[:, None] & cols[None, :]
    sg = tl.sigmoid(tl.load(g_rows[:, None] + offs_dv[None, :] * stride_gd, mask=vmask, other=0.0).to(tl.float32))
    if GATE_ELEM:
        tl.store(dg_rows[:, None] + offs_dv[None, :] * stride_dgd, (prod * (1.0 - sg)).to(dg_rows.dtype.element_ty),
                 mask=vmask & store)
    else:
        sg_row = tl.sigmoid(tl.load(g_rows, mask=rows, other=0.0).to(tl.float32))
        tl.store(dg_rows, (delta * (1.0 - sg_row)).to(dg_rows.dtype.element_ty), mask=rows & store)
    return do.to(tl.float32) * sg


@triton.jit
def online_softmax_update(acc, m_i, l_i, s, v, MAY_BE_INF: tl.constexpr, DOT_PREC: tl.constexpr, scale=1.0):
    """One flash-attention step on base-2 logits `s · scale` (scale > 0, applied with the max in one multiply-add
    a logit): new running max, rescaled sum and accumulator. MAY_BE_INF: a row may have seen only -inf so far
    (masks, biases), so the max is guarded."""
    m_new = tl.maximum(m_i, tl.max(s, 1) * scale)
    if MAY_BE_INF:
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    alpha = tl.math.exp2(m_i - m_use)
    p = tl.math.exp2(s * scale - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, m_new, l_i


@triton.jit
def _in_registers(x):
    """`x` in the wgmma accumulator layout, through a dot of zeros that accumulates into it (one small wgmma per
    program). Triton (3.6, sm_90) gives a dot a register A operand only when that operand comes from such a layout
    (its MMAV3UseRegOperand rewrite); a loaded tile otherwise keeps a copy in shared memory for the whole loop."""
    za = tl.zeros([x.shape[0], 16], x.dtype)
    zb = tl.zeros([16, x.shape[1]], x.dtype)
    return tl.dot(za, zb, acc=x.to(tl.float32)).to(x.dtype)


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, QF, KF, BIAS, GATE,
              stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
              stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
              stride_qfb, stride_qfh, stride_qfn, stride_kfb, stride_kfh, stride_kfn,
              stride_bb, stride_bh, stride_bm, stride_bn, stride_gb, stride_gh, stride_gn, stride_gd,
              stride_os, stride_ls, SPLIT_BLOCKS,
              H, GROUP, NQ, NK, qk_scale, OFF, LEFT, RIGHT,
              FULL_PTR, FULL_IDX, PART_PTR, PART_IDX, QLO, QHI, KC, DIL0, DIL1, DIL2,
              D: tl.constexpr, DV: tl.constexpr, R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_R: tl.constexpr, GRID_MODE: tl.constexpr,
              MASK_AXES: tl.constexpr, HAS_DIL: tl.constexpr, REVERSE: tl.constexpr, HAS_BIAS: tl.constexpr,
              HAS_LR: tl.constexpr, HAS_GATE: tl.constexpr, DOT_PREC: tl.constexpr, GATE_ELEM: tl.constexpr = True,
              PART_BITS=None, KB=None,
              PAIR_MASK: tl.constexpr = False, QROW=None, KROW=None, NQO=0, GATHER: tl.constexpr = False,
              RH=None, RW=None, stride_rt=0, QB: tl.constexpr = 1, WIN: tl.constexpr = 1, rel_scale=0.0,
              BLOCK_T: tl.constexpr = 16, BLOCK_W: tl.constexpr = 16, HAS_REL: tl.constexpr = False,
              LR_CHAIN: tl.constexpr = False, rel_qw: tl.constexpr = 1, rel_block: tl.constexpr = 0,
              REL_KF: tl.constexpr = False, STORE_QF: tl.constexpr = False, GATE_PREFETCH: tl.constexpr = False,
              Q_IN_REGS: tl.constexpr = False):
    """STORE_QF (with HAS_REL): also write the rel-pos query factor to QF, rows as q's, for the backward to load
    (`triton_attention._forward`'s `save_factor`). GATE_PREFETCH (element-wise gate, rows contiguous, GPU only):
    `_prefetch_l2` the gate tile the epilogue reads. Q_IN_REGS (16-bit inputs): q (and a loaded low-rank query
    factor) as register operands of the logits dots (`_in_registers`)."""
    tl.static_assert(not (HAS_REL and GRID_MODE and not REL_KF), "grid rel-pos loads its key one-hots (REL_KF)")
    pid_m = tl.program_id(0)
    if REVERSE:  # heavy (late, causal) query blocks first
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hk = h // GROUP
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    o_base = O + pid_s.to(tl.int64) * stride_os + b * stride_ob + h * stride_oh
    kf_base = KF + b * stride_kfb + h * stride_kfh
    b_base = BIAS + b * stride_bb + h * stride_bh
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_r = tl.arange(0, BLOCK_R)
    if GATHER:  # grid patterns on unpermuted inputs and o/lse: slot -> token tables (-1: padding, not stored)
        q_tok = tl.load(QROW + offs_m)
        q_rows = tl.maximum(q_tok, 0)
    else:
        q_tok = offs_m
        q_rows = offs_m
    q = _load_rows(q_base, q_rows, stride_qn, offs_d, NQ, D, BLOCK_D, not GRID_MODE)
    uq = q
    inv_scale = 1.4426950408889634 / qk_scale
    if HAS_REL:
        r_tok = q_tok
        if GRID_MODE and not GATHER:
            r_tok = tl.load(QROW + offs_m)
        uq = _rel_query_factor(q, _rel_tables(RH, RW, stride_rt, WIN, offs_d, D, BLOCK_D, BLOCK_T), r_tok, QB, WIN,
                               rel_scale, inv_scale, BLOCK_T, BLOCK_W, LR_CHAIN, DOT_PREC, GRID_MODE, rel_qw, rel_block)
        if STORE_QF:  # once per query block: split programs (pid_s > 0) hold the same factor
            tl.store(QF + b * stride_qfb + h * stride_qfh + q_rows[:, None] * stride_qfn + offs_r[None, :], uq,
                     mask=((q_tok >= 0) & (offs_m < NQ) & (pid_s == 0))[:, None])
    elif HAS_LR:
        uq = _lr_chain_factor(_load_rows(QF + b * stride_qfb + h * stride_qfh, q_rows, stride_qfn, offs_r, NQ, R,
                                         BLOCK_R, not GRID_MODE), inv_scale, LR_CHAIN)

    if Q_IN_REGS:  # the shared memory of q (and of a loaded query factor) goes to the pipeline's stages
        q = _in_registers(q)
        if HAS_LR and not HAS_REL:  # the rel-pos factor is a dot's result: already in the accumulator layout
            uq = _in_registers(uq)
    if HAS_GATE and GATE_ELEM and GATE_PREFETCH:
        _prefetch_l2(GATE + b * stride_gb + h * stride_gh + tl.where(offs_m < NQ, q_rows, 0) * stride_gn, DV,
                     GATE.dtype.element_ty.primitive_bitwidth // 8)
    if HAS_GATE and not GATE_ELEM:  # a head-wise gate is one value a row: load it now, its latency hidden
        g_row = tl.load(GATE + b * stride_gb + h * stride_gh + q_rows * stride_gn, mask=offs_m < NQ,
                        other=0.0).to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    if GRID_MODE:
        for it in range(tl.load(FULL_PTR + pid_m), tl.load(FULL_PTR + pid_m + 1)):
            start_n = tl.load(FULL_IDX + it) * BLOCK_N
            acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, uq, k_base, v_base, kf_base, b_base, stride_kn, stride_vn,
                                      stride_kfn, stride_bm, stride_bn, start_n, offs_m, offs_d, offs_dv, offs_r,
                                      qk_scale, NQ, NK, OFF, LEFT, RIGHT, QLO, QHI, KC, NQ, NK, DIL0, DIL1, DIL2,
                                      D, DV, R, BLOCK_N, BLOCK_D, BLOCK_DV, BLOCK_R, False, GRID_MODE, MASK_AXES,
                                      HAS_DIL, HAS_BIAS, HAS_LR, DOT_PREC, 0, KB, False, KROW, GATHER, q_rows,
                                      WIN=WIN, BLOCK_W=BLOCK_W, HAS_REL=HAS_REL, LR_CHAIN=LR_CHAIN, REL_KF=REL_KF)
        for it in range(tl.load(PART_PTR + pid_m), tl.load(PART_PTR + pid_m + 1)):
            start_n = tl.load(PART_IDX + it) * BLOCK_N
            bits = 0
            if PAIR_MASK:
                bits = tl.load(PART_BITS + it)
            acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, uq, k_base, v_base, kf_base, b_base, stride_kn, stride_vn,
                                      stride_kfn, stride_bm, stride_bn, start_n, offs_m, offs_d, offs_dv, offs_r,
                                      qk_scale, NQ, NK, OFF, LEFT, RIGHT, QLO, QHI, KC, NQ, NK, DIL0, DIL1, DIL2,
                                      D, DV, R, BLOCK_N, BLOCK_D, BLOCK_DV, BLOCK_R, True, GRID_MODE, MASK_AXES,
                                      HAS_DIL, HAS_BIAS, HAS_LR, DOT_PREC, bits, KB, PAIR_MASK, KROW, GATHER,
                                      q_rows, WIN=WIN, BLOCK_W=BLOCK_W, HAS_REL=HAS_REL, LR_CHAIN=LR_CHAIN,
                                      REL_KF=REL_KF)
    else:
        nb_lo, nb_hi, f_lo, f_hi = _ranges_q(pid_m, NQ, NK, OFF, LEFT, RIGHT, BLOCK_M, BLOCK_N)
        a, e = _chunk(f_lo, f_hi, pid_s, SPLIT_BLOCKS)
        for nb in range(a, e):
            acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, uq, k_base, v_base, kf_base, b_base, stride_kn, stride_vn,
                                      stride_kfn, stride_bm, stride_bn, nb * BLOCK_N, offs_m, offs_d, offs_dv, offs_r,
                                      qk_scale, NQ, NK, OFF, LEFT, RIGHT, QLO, QHI, KC, NQ, NK, DIL0, DIL1, DIL2,
                                      D, DV, R, BLOCK_N, BLOCK_D, BLOCK_DV, BLOCK_R, False, GRID_MODE, MASK_AXES,
                                      HAS_DIL, HAS_BIAS, HAS_LR, DOT_PREC, WIN=WIN, BLOCK_W=BLOCK_W, HAS_REL=HAS_REL,
                                      LR_CHAIN=LR_CHAIN)
        a, e = _chunk(nb_lo, f_lo, pid_s, SPLIT_BLOCKS)
        for nb in range(a, e):
            acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, uq, k_base, v_base, kf_base, b_base, stride_kn, stride_vn,
                                      stride_kfn, stride_bm, stride_bn, nb * BLOCK_N, offs_m, offs_d, offs_dv, offs_r,
                                      qk_scale, NQ, NK, OFF, LEFT, RIGHT, QLO, QHI, KC, NQ, NK, DIL0, DIL1, DIL2,
                                      D, DV, R, BLOCK_N, BLOCK_D, BLOCK_DV, BLOCK_R, True, GRID_MODE, MASK_AXES,
                                      HAS_DIL, HAS_BIAS, HAS_LR, DOT_PREC, WIN=WIN, BLOCK_W=BLOCK_W, HAS_REL=HAS_REL,
                                      LR_CHAIN=LR_CHAIN)
        a, e = _chunk(f_hi, nb_hi, pid_s, SPLIT_BLOCKS)
        for nb in range(a, e):
            acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, uq, k_base, v_base, kf_base, b_base, stride_kn, stride_vn,
                                      stride_kfn, stride_bm, stride_bn, nb * BLOCK_N, offs_m, offs_d, offs_dv, offs_r,
                                      qk_scale, NQ, NK, OFF, LEFT, RIGHT, QLO, QHI, KC, NQ, NK, DIL0, DIL1, DIL2,
                                      D, DV, R, BLOCK_N, BLOCK_D, BLOCK_DV, BLOCK_R, True, GRID_MODE, MASK_AXES,
                                      HAS_DIL, HAS_BIAS, HAS_LR, DOT_PREC, WIN=WIN, BLOCK_W=BLOCK_W, HAS_REL=HAS_REL,
                                      LR_CHAIN=LR_CHAIN)

    seen = l_i > 0.0
    den = tl.where(seen, l_i, 1.0)
    lse = tl.where(seen, (m_i + tl.math.log2(den)) * 0.6931471805599453, float("-inf"))
    rows = offs_m < NQ
    cols = offs_dv < DV
    if HAS_GATE:
        if GATE_ELEM:
            g_ptrs = GATE + b * stride_gb + h * stride_gh + q_rows[:, None] * stride_gn + offs_dv[None, :] * stride_gd
            g = tl.load(g_ptrs, mask=rows[:, None] & cols[None, :], other=0.0).to(tl.float32)
            out = gated_output(acc, den[:, None], g)
        else:
            out = gated_output(acc, den[:, None], g_row[:, None])
    else:
        out = acc / den[:, None]
    if GATHER:
        rows = q_tok >= 0
        lse_base = LSE + pid_bh.to(tl.int64) * NQO
    else:
        lse_base = LSE + pid_s.to(tl.int64) * stride_ls + pid_bh.to(tl.int64) * NQ
    o_ptrs = o_base + q_rows[:, None] * stride_on + offs_dv[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=rows[:, None] & cols[None, :])
    tl.store(lse_base + q_rows, lse, mask=rows)


# ----------------------------------------------------------------------------------------------------------
# backward


@triton.jit
def _bwd_delta(O, DO, DLSE, DELTA, GATE, DOE, DG,
               stride_ob, stride_oh, stride_on, stride_db, stride_dh, stride_dn,
               stride_gb, stride_gh, stride_gn, stride_gd, stride_eb, stride_eh, stride_en,
               stride_dgb, stride_dgh, stride_dgn, stride_dgd,
               H, NQ, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_DLSE: tl.constexpr,
               HAS_GATE: tl.constexpr, GATE_ELEM: tl.constexpr):
    """delta = rowsum(dO * O) - dlse, float32 (B, H, NQ). With a gate (O is the gated output): also
    dO_eff = dO * sigmoid(g) (what the attention saw) and dg = dO * O * (1 - sigmoid(g)) (summed per row when
    head-wise)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows = offs_m < NQ
    cols = offs_dv < DV
    o = _load_rows(O + b * stride_ob + h * stride_oh, offs_m, stride_on, offs_dv, NQ, DV, BLOCK_DV, True)
    do = _load_rows(DO + b * stride_db + h * stride_dh, offs_m, stride_dn, offs_dv, NQ, DV, BLOCK_DV, True)
    prod = o.to(tl.float32) * do.to(tl.float32)
    delta = tl.sum(prod, 1)
    if HAS_GATE:
        doe = gate_backward(GATE + b * stride_gb + h * stride_gh + offs_m * stride_gn,
                            DG + b * stride_dgb + h * stride_dgh + offs_m * stride_dgn, do, prod, delta, offs_dv,
                            stride_gd, stride_dgd, rows, cols, True, GATE_ELEM)
        e_ptrs = DOE + b * stride_eb + h * stride_eh + offs_m[:, None] * stride_en + offs_dv[None, :]
        tl.store(e_ptrs, doe.to(DOE.dtype.element_ty), mask=rows[:, None] & cols[None, :])
    if HAS_DLSE:
        delta -= tl.load(DLSE + pid_bh.to(tl.int64) * NQ + offs_m, mask=rows, other=0.0)
    tl.store(DELTA + pid_bh.to(tl.int64) * NQ + offs_m, delta, mask=rows)


@triton.jit
def _dkdv_step(dk, dv, duk, k, v, uk, q_base, do_base, qf_base, lse_base, delta_base, b_base, db_base, stride_qn,
               stride_dn, stride_qfn, stride_bm, stride_bn, stride_dbm, stride_dbn, start_m, offs_n, offs_d, offs_dv,
               offs_r, qk_scale, NQ, NK, OFF, LEFT, RIGHT, QLO, QHI, KC, DIL0, DIL1, DIL2,
               D: tl.constexpr, DV: tl.constexpr, R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_DV: tl.constexpr, BLOCK_R: tl.constexpr, MASKED: tl.constexpr, GRID_MODE: tl.constexpr,
               MASK_AXES: tl.constexpr, HAS_DIL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LR: tl.constexpr,
               STORE_DB: tl.constexpr, DOT_PREC: tl.constexpr, bits=0, KB=None, PAIR_MASK: tl.constexpr = False,
               HAS_REL: tl.constexpr = False, LR_CHAIN: tl.constexpr = False, GATHER: tl.constexpr = False, QROW=None,
               k_rows=None, k_ok=None):
    offs_m = start_m + tl.arange(0, BLOCK_M)
    check = MASKED and not GRID_MODE
    q_rows = offs_m
    if GATHER:  # token-order inputs through the slot -> token table; a padding slot reads row 0 with lse = +inf
        q_tok = tl.load(QROW + offs_m)
        q_ok = q_tok >= 0
        q_rows = tl.maximum(q_tok, 0)
    else:
        k_rows = offs_n
    q = _load_rows(q_base, q_rows, stride_qn, offs_d, NQ, D, BLOCK_D, check)
    do = _load_rows(do_base, q_rows, stride_dn, offs_dv, NQ, DV, BLOCK_DV, check)
    if GATHER:
        lse2 = tl.load(lse_base + q_rows, mask=q_ok, other=float("inf"))
        delta = tl.load(delta_base + q_rows, mask=q_ok, other=0.0)
    elif check:
        lse2 = tl.load(lse_base + offs_m, mask=offs_m < NQ, other=float("inf"))
        delta = tl.load(delta_base + offs_m, mask=offs_m < NQ, other=0.0)
    else:
        lse2 = tl.load(lse_base + offs_m)
        delta = tl.load(delta_base + offs_m)
    lse2 = tl.where(lse2 == float("-inf"), float("inf"), lse2 * 1.4426950408889634)
    uq = q
    if HAS_LR:
        # LR_CHAIN 1's 1 / scale sits on the factor loaded once per program: the rel-pos query factor (pre-scaled
        # where it was made), or the loaded key factor (`_attn_bwd_dkdv`). Scaling this tile's uq here instead put a
        # register-to-shared-memory copy of it in every step (TTGIR: a local_alloc in the loop)
        uq = _load_rows(qf_base, q_rows, stride_qfn, offs_r, NQ, R, BLOCK_R, check)
        s_t, scale = _logits_lr(k, q, uk, uq, qk_scale, LR_CHAIN, DOT_PREC)  # (BN, BM)
    else:
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC)  # (BN, BM), logits s_t · qk_scale
        scale = qk_scale
    if HAS_BIAS:
        s_t = _scaled_logits(s_t, scale, _bias_tile(b_base, q_rows, k_rows, stride_bm, stride_bn, NQ, NK, GRID_MODE,
                                                   True))
        scale = 1.0
    if MASKED and PAIR_MASK:
        s_t = _pair_mask(s_t, bits, offs_m, offs_n, QLO, QHI, KC, KB, NQ, NK, DIL0, DIL1, DIL2, MASK_AXES, HAS_DIL,
                         True)
    p_t = tl.math.exp2(s_t * scale - lse2[None, :])
    if MASKED and not PAIR_MASK:
        vis = _visible(offs_m, offs_n, NQ, NK, OFF, LEFT, RIGHT, QLO, QHI, KC, NQ, NK, DIL0, DIL1, DIL2,
                       GRID_MODE, MASK_AXES, HAS_DIL, True)
        p_t = tl.where(vis, p_t, 0.0)
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PREC)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PREC)
    if HAS_LR and not HAS_REL:  # the rel-pos key factor is a constant one-hot
        duk += tl.dot(ds_t.to(uq.dtype), uq, input_precision=DOT_PREC)
    if STORE_DB:
        db_ptrs = db_base + k_rows[:, None] * stride_dbn + q_rows[None, :].to(tl.int64) * stride_dbm
        if GATHER:
            tl.store(db_ptrs, ds_t, mask=k_ok[:, None] & q_ok[None, :])
        elif GRID_MODE:
            tl.store(db_ptrs, ds_t)
        else:
            tl.store(db_ptrs, ds_t, mask=(offs_n < NK)[:, None] & (offs_m < NQ)[None, :])
    return dk, dv, duk


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV_, QF, KF, BIAS, DB, DUK,
                   stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                   stride_vb, stride_vh, stride_vn, stride_db, stride_dh, stride_dn,
                   stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
                   stride_qfb, stride_qfh, stride_qfn, stride_kfb, stride_kfh, stride_kfn,
                   stride_bb, stride_bh, stride_bm, stride_bn, stride_dbb, stride_dbh, stride_dbm, stride_dbn,
                   stride_dukb, stride_dukh, stride_dukn, stride_dks, stride_dvs, stride_duks, SPLIT_BLOCKS,
                   H, HKV, GROUP, NQ, NK, qk_scale, sm_scale, OFF, LEFT, RIGHT,
                   FULL_PTR, FULL_IDX, PART_PTR, PART_IDX, QLO, QHI, KC, DIL0, DIL1, DIL2,
                   D: tl.constexpr, DV: tl.constexpr, R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_R: tl.constexpr, GRID_MODE: tl.constexpr,
                   MASK_AXES: tl.constexpr, HAS_DIL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LR: tl.constexpr,
                   STORE_DB: tl.constexpr, DOT_PREC: tl.constexpr, PART_BITS=None, KB=None,
                   PAIR_MASK: tl.constexpr = False, RH=None, RW=None, stride_rt=0, QB: tl.constexpr = 1,
                   WIN: tl.constexpr = 1, rel_scale=0.0, BLOCK_T: tl.constexpr = 16, BLOCK_W: tl.constexpr = 16,
                   HAS_REL: tl.constexpr = False, LR_CHAIN: tl.constexpr = False, BATCH_MINOR: tl.constexpr = False,
                   NQO=0, QROW=None, KROW=None, GATHER: tl.constexpr = False, rel_qw: tl.constexpr = 1,
                   rel_block: tl.constexpr = 0, REL_KF: tl.constexpr = False):
    """dK/dV (+ dS for the bias gradient, dU_k) per key block. BATCH_MINOR (a bias broadcast over the batch): the
    batch index varies fastest over the programs, so a head's batch elements run side by side and read each bias
    tile once from memory (the others hit L2) instead of once per batch element. GATHER (grid patterns): every
    input and output in token order (NQO query rows; lse, delta too), rows through the slot -> token tables
    QROW / KROW as in the forward, padding slots neither weighted nor stored."""
    tl.static_assert(not (HAS_REL and GRID_MODE and not REL_KF), "grid rel-pos loads its key one-hots (REL_KF)")
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    if BATCH_MINOR:
        n_batch = tl.num_programs(1) // HKV
        b = (pid_bh % n_batch).to(tl.int64)
        hk = (pid_bh // n_batch).to(tl.int64)
    else:
        b = (pid_bh // HKV).to(tl.int64)
        hk = (pid_bh % HKV).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_r = tl.arange(0, BLOCK_R)
    if GATHER:
        k_tok = tl.load(KROW + offs_n)
        rows = k_tok >= 0
        k_rows = tl.maximum(k_tok, 0)
    else:
        rows = offs_n < NK
        k_rows = offs_n
    k = _load_rows(K + b * stride_kb + hk * stride_kh, k_rows, stride_kn, offs_d, NK, D, BLOCK_D, not GRID_MODE)
    v = _load_rows(V + b * stride_vb + hk * stride_vh, k_rows, stride_vn, offs_dv, NK, DV, BLOCK_DV,
                   not GRID_MODE)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)

    if GRID_MODE:
        f_s, f_e = tl.load(FULL_PTR + pid_n), tl.load(FULL_PTR + pid_n + 1)
        p_s, p_e = tl.load(PART_PTR + pid_n), tl.load(PART_PTR + pid_n + 1)
    else:
        n0 = pid_n * BLOCK_N
        n1 = tl.minimum(n0 + BLOCK_N, NK)
        first = tl.maximum(n0 - OFF - RIGHT, 0)
        last = tl.minimum(n1 - 1 - OFF + LEFT, NQ - 1)
        mb_lo = first // BLOCK_M
        mb_hi = tl.where(last >= first, last // BLOCK_M + 1, mb_lo)
        f_lo = (tl.maximum(n1 - 1 - OFF - RIGHT, 0) + BLOCK_M - 1) // BLOCK_M
        f_hi = tl.maximum(n0 + 1 - OFF + LEFT, 0) // BLOCK_M
        f_hi = tl.minimum(f_hi, NQ // BLOCK_M)
        f_hi = tl.where(n0 + BLOCK_N <= NK, f_hi, 0)
        f_lo = tl.minimum(tl.maximum(f_lo, mb_lo), mb_hi)
        f_hi = tl.minimum(tl.maximum(f_hi, f_lo), mb_hi)
        fa, fe = _chunk(f_lo, f_hi, pid_s, SPLIT_BLOCKS)
        pa, pe = _chunk(mb_lo, f_lo, pid_s, SPLIT_BLOCKS)
        qa, qe = _chunk(f_hi, mb_hi, pid_s, SPLIT_BLOCKS)

    for g in range(GROUP):
        h = hk * GROUP + g
        bh = b * H + h
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_db + h * stride_dh
        qf_base = QF + b * stride_qfb + h * stride_qfh
        b_base = BIAS + b * stride_bb + h * stride_bh
        db_base = DB + b * stride_dbb + h * stride_dbh
        lse_base = LSE + bh * NQO
        delta_base = DELTA + bh * NQO
        uk = k
        duk = tl.zeros([BLOCK_N, BLOCK_R], tl.float32)
        if HAS_REL and not REL_KF:
            uk = _rel_key_factor(offs_n, NK, WIN, k.dtype, BLOCK_W)
        elif HAS_LR:
            uk = _load_rows(KF + b * stride_kfb + h * stride_kfh, k_rows, stride_kfn, offs_r, NK, R, BLOCK_R,
                            not GRID_MODE)
            if not HAS_REL:  # loaded factors: LR_CHAIN 1's 1 / scale on the key side, once (`_dkdv_step`); the
                # rel-pos query factor comes pre-scaled, its key one-hots (REL_KF) stay exact
                uk = _lr_chain_factor(uk, 1.4426950408889634 / qk_scale, LR_CHAIN)
        if GRID_MODE:
            for it in range(f_s, f_e):
                start_m = tl.load(FULL_IDX + it) * BLOCK_M
                dk, dv, duk = _dkdv_step(dk, dv, duk, k, v, uk, q_base, do_base, qf_base, lse_base, delta_base,
                                         b_base, db_base, stride_qn, stride_dn, stride_qfn, stride_bm, stride_bn,
                                         stride_dbm, stride_dbn, start_m, offs_n, offs_d, offs_dv, offs_r, qk_scale,
                                         NQ, NK, OFF, LEFT, RIGHT, QLO, QHI, KC, DIL0, DIL1, DIL2, D, DV, R, BLOCK_M,
                                         BLOCK_D, BLOCK_DV, BLOCK_R, False, GRID_MODE, MASK_AXES, HAS_DIL, HAS_BIAS,
                                         HAS_LR, STORE_DB, DOT_PREC, HAS_REL=HAS_REL, LR_CHAIN=LR_CHAIN,
                                         GATHER=GATHER, QROW=QROW, k_rows=k_rows, k_ok=rows)
            for it in range(p_s, p_e):
                start_m = tl.load(PART_IDX + it) * BLOCK_M
                bits = 0
                if PAIR_MASK:
                    bits = tl.load(PART_BITS + it)
                dk, dv, duk = _dkdv_step(dk, dv, duk, k, v, uk, q_base, do_base, qf_base, lse_base, delta_base,
                                         b_base, db_base, stride_qn, stride_dn, stride_qfn, stride_bm, stride_bn,
                                         stride_dbm, stride_dbn, start_m, offs_n, offs_d, offs_dv, offs_r, qk_scale,
                                         NQ, NK, OFF, LEFT, RIGHT, QLO, QHI, KC, DIL0, DIL1, DIL2, D, DV, R, BLOCK_M,
                                         BLOCK_D, BLOCK_DV, BLOCK_R, True, GRID_MODE, MASK_AXES, HAS_DIL, HAS_BIAS,
                                         HAS_LR, STORE_DB, DOT_PREC, bits, KB, PAIR_MASK, HAS_REL=HAS_REL,
                                         LR_CHAIN=LR_CHAIN, GATHER=GATHER, QROW=QROW, k_rows=k_rows, k_ok=rows)
        else:
            for mb in range(fa, fe):
                dk, dv, duk = _dkdv_step(dk, dv, duk, k, v, uk, q_base, do_base, qf_base, lse_base, delta_base,
                                         b_base, db_base, stride_qn, stride_dn, stride_qfn, stride_bm, stride_bn,
                                         stride_dbm, stride_dbn, mb * BLOCK_M, offs_n, offs_d, offs_dv, offs_r,
                                         qk_scale, NQ, NK, OFF, LEFT, RIGHT, QLO, QHI, KC, DIL0, DIL1, DIL2, D, DV, R,
                                         BLOCK_M, BLOCK_D, BLOCK_DV, BLOCK_R, False, GRID_MODE, MASK_AXES, HAS_DIL,
                                         HAS_BIAS, HAS_LR, STORE_DB, DOT_PREC, HAS_REL=HAS_REL,
                                         LR_CHAIN=LR_CHAIN)
            for mb in range(pa, pe):
                dk, dv, duk = _dkdv_step(dk, dv, duk, k, v, uk, q_base, do_base, qf_base, lse_base, delta_base,
                                         b_base, db_base, stride_qn, stride_dn, stride_qfn, stride_bm, stride_bn,
                                         stride_dbm, stride_dbn, mb * BLOCK_M, offs_n, offs_d, offs_dv, offs_r,
                                         qk_scale, NQ, NK, OFF, LEFT, RIGHT, QLO, QHI, KC, DIL0, DIL1, DIL2, D, DV, R,
                                         BLOCK_M, BLOCK_D, BLOCK_DV, BLOCK_R, True, GRID_MODE, MASK_AXES, HAS_DIL,
                                         HAS_BIAS, HAS_LR, STORE_DB, DOT_PREC, HAS_REL=HAS_REL,
                                         LR_CHAIN=LR_CHAIN)
            for mb in range(qa, qe):
                dk, dv, duk = _dkdv_step(dk, dv, duk, k, v, uk, q_base, do_base, qf_base, lse_base, delta_base,
                                         b_base, db_base, stride_qn, stride_dn, stride_qfn, stride_bm, stride_bn,
                                         stride_dbm, stride_dbn, mb * BLOCK_M, offs_n, offs_d, offs_dv, offs_r,
                                         qk_scale, NQ, NK, OFF, LEFT, RIGHT, QLO, QHI, KC, DIL0, DIL1, DIL2, D, DV, R,
                                         BLOCK_M, BLOCK_D, BLOCK_DV, BLOCK_R, True, GRID_MODE, MASK_AXES, HAS_DIL,
                                         HAS_BIAS, HAS_LR, STORE_DB, DOT_PREC, HAS_REL=HAS_REL,
                                         LR_CHAIN=LR_CHAIN)
        if HAS_LR and not HAS_REL:
            duk_ptrs = DUK + pid_s.to(tl.int64) * stride_duks + b * stride_dukb + h * stride_dukh + \
                k_rows[:, None] * stride_dukn + offs_r[None, :]
            tl.store(duk_ptrs, duk.to(DUK.dtype.element_ty), mask=rows[:, None] & (offs_r < R)[None, :])

    dk_ptrs = DK + pid_s.to(tl.int64) * stride_dks + b * stride_dkb + hk * stride_dkh + \
        k_rows[:, None] * stride_dkn + offs_d[None, :]
    tl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=rows[:, None] & (offs_d < D)[None, :])
    dv_ptrs = DV_ + pid_s.to(tl.int64) * stride_dvs + b * stride_dvb + hk * stride_dvh + \
        k_rows[:, None] * stride_dvn + offs_dv[None, :]
    tl.store(dv_ptrs, dv.to(DV_.dtype.element_ty), mask=rows[:, None] & (offs_dv < DV)[None, :])


@triton.jit
def _dq_step(dq, duq, q, uq, do, lse2, delta, k_base, v_base, kf_base, b_base, stride_kn, stride_vn, stride_kfn,
             stride_bm, stride_bn, start_n, offs_m, offs_d, offs_dv, offs_r, qk_scale, NQ, NK, OFF, LEFT, RIGHT,
             QLO, QHI, KC, DIL0, DIL1, DIL2,
             D: tl.constexpr, DV: tl.constexpr, R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
             BLOCK_DV: tl.constexpr, BLOCK_R: tl.constexpr, MASKED: tl.constexpr, GRID_MODE: tl.constexpr,
             MASK_AXES: tl.constexpr, HAS_DIL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LR: tl.constexpr,
             DOT_PREC: tl.constexpr, bits=0, KB=None, PAIR_MASK: tl.constexpr = False, WIN: tl.constexpr = 1,
             BLOCK_W: tl.constexpr = 16, HAS_REL: tl.constexpr = False, LR_CHAIN: tl.constexpr = False,
             DS_STORED: tl.constexpr = False, GATHER: tl.constexpr = False, KROW=None, q_rows=None,
             REL_KF: tl.constexpr = False):
    """One key tile of a query block's dQ (and dU_q). DS_STORED (a dense bias, no factors): `b_base` points at the
    dS the dK/dV kernel stored for the bias gradient (zero where masked), so the tile is one load and one dot
    instead of recomputing P and dP (two dots, the exponentials and the bias load)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    check = MASKED and not GRID_MODE
    if GATHER:  # token-order inputs (`_attn_bwd_dkdv`); a padding slot reads key row 0, masked out of p
        k_tok = tl.load(KROW + offs_n)
        k_rows = tl.maximum(k_tok, 0)
    else:
        k_rows = offs_n
        q_rows = offs_m
    k = _load_rows(k_base, k_rows, stride_kn, offs_d, NK, D, BLOCK_D, check)
    if DS_STORED:
        ds = _load_tile(b_base, q_rows, k_rows, stride_bm, stride_bn, NQ, NK, GRID_MODE, False)
        if GATHER:  # the stored dS of a padding slot's row-0 stand-in is a real pair's
            ds = tl.where((k_tok >= 0)[None, :], ds, 0.0)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    else:
        v = _load_rows(v_base, k_rows, stride_vn, offs_dv, NK, DV, BLOCK_DV, check)
        s, uk, scale = _tile_logits(q, k, uq, kf_base, k_rows, offs_n, offs_r, stride_kfn, qk_scale, NK, check, WIN,
                                    R, BLOCK_R, BLOCK_W, HAS_LR, HAS_REL, LR_CHAIN, DOT_PREC, REL_KF)
        if HAS_BIAS:
            s = _scaled_logits(s, scale, _bias_tile(b_base, q_rows, k_rows, stride_bm, stride_bn, NQ, NK, GRID_MODE,
                                                   False))
            scale = 1.0
        if MASKED and PAIR_MASK:
            s = _pair_mask(s, bits, offs_m, offs_n, QLO, QHI, KC, KB, NQ, NK, DIL0, DIL1, DIL2, MASK_AXES, HAS_DIL,
                           False)
        p = tl.math.exp2(s * scale - lse2[:, None])
        if MASKED and not PAIR_MASK:
            vis = _visible(offs_m, offs_n, NQ, NK, OFF, LEFT, RIGHT, QLO, QHI, KC, NQ, NK, DIL0, DIL1, DIL2,
                           GRID_MODE, MASK_AXES, HAS_DIL, False)
            p = tl.where(vis, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
        if HAS_LR:
            duq += tl.dot(ds.to(uk.dtype), uk, input_precision=DOT_PREC)
    return dq, duq


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, QF, KF, BIAS, DUQ,
                 stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                 stride_vb, stride_vh, stride_vn, stride_db, stride_dh, stride_dn,
                 stride_dqb, stride_dqh, stride_dqn,
                 stride_qfb, stride_qfh, stride_qfn, stride_kfb, stride_kfh, stride_kfn,
                 stride_bb, stride_bh, stride_bm, stride_bn, stride_duqb, stride_duqh, stride_duqn,
                 stride_dqs, stride_duqs, SPLIT_BLOCKS,
                 H, GROUP, NQ, NK, qk_scale, sm_scale, OFF, LEFT, RIGHT,
                 FULL_PTR, FULL_IDX, PART_PTR, PART_IDX, QLO, QHI, KC, DIL0, DIL1, DIL2,
                 D: tl.constexpr, DV: tl.constexpr, R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_R: tl.constexpr, GRID_MODE: tl.constexpr,
                 MASK_AXES: tl.constexpr, HAS_DIL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LR: tl.constexpr,
                 DOT_PREC: tl.constexpr, PART_BITS=None, KB=None, PAIR_MASK: tl.constexpr = False, RH=None,
                 RW=None, stride_rt=0, QB: tl.constexpr = 1, WIN: tl.constexpr = 1, rel_scale=0.0,
                 BLOCK_T: tl.constexpr = 16, BLOCK_W: tl.constexpr = 16, HAS_REL: tl.constexpr = False,
                 LR_CHAIN: tl.constexpr = False, DS_STORED: tl.constexpr = False, NQO=0, QROW=None, KROW=None,
                 GATHER: tl.constexpr = False, rel_qw: tl.constexpr = 1, rel_block: tl.constexpr = 0,
                 REL_KF: tl.constexpr = False):
    """dQ (+ dU_q | the rel-pos tables' logit gradient) per query block. DS_STORED: BIAS and its strides point at
    the dS the dK/dV kernel stored (`_dq_step`): q, dO, lse and delta are not needed. GATHER: token order, as
    `_attn_bwd_dkdv`."""
    tl.static_assert(not (DS_STORED and (HAS_LR or HAS_REL)), "dQ with low-rank or rel-pos factors recomputes dS")
    tl.static_assert(not (HAS_REL and GRID_MODE and not REL_KF), "grid rel-pos loads its key one-hots (REL_KF)")
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hk = h // GROUP
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    kf_base = KF + b * stride_kfb + h * stride_kfh
    b_base = BIAS + b * stride_bb + h * stride_bh
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_r = tl.arange(0, BLOCK_R)
    if GATHER:
        q_tok = tl.load(QROW + offs_m)
        rows = q_tok >= 0
        q_rows = tl.maximum(q_tok, 0)
    else:
        rows = offs_m < NQ
        q_rows = offs_m
        q_tok = offs_m
        if HAS_REL and GRID_MODE:  # the rel-pos shift comes from the query's grid coordinates
            q_tok = tl.load(QROW + offs_m)
    if DS_STORED:
        q = 0.0
        do = 0.0
        uq = 0.0
        lse2 = 0.0
        delta = 0.0
    else:
        q = _load_rows(Q + b * stride_qb + h * stride_qh, q_rows, stride_qn, offs_d, NQ, D, BLOCK_D, True)
        do = _load_rows(DO + b * stride_db + h * stride_dh, q_rows, stride_dn, offs_dv, NQ, DV, BLOCK_DV, True)
        uq = q  # the query factor as the logits take it (pre-scaled under LR_CHAIN 1); dU_q does not depend on it
        if HAS_LR:  # with HAS_REL: the rel-pos factor, stored (rebuilding it here cost ~650 instructions)
            uq = _load_rows(QF + b * stride_qfb + h * stride_qfh, q_rows, stride_qfn, offs_r, NQ, R, BLOCK_R, True)
            if not HAS_REL:
                uq = _lr_chain_factor(uq, 1.0 / sm_scale, LR_CHAIN)
        lse2 = tl.load(LSE + pid_bh.to(tl.int64) * NQO + q_rows, mask=rows, other=float("inf"))
        lse2 = tl.where(lse2 == float("-inf"), float("inf"), lse2 * 1.4426950408889634)
        delta = tl.load(DELTA + pid_bh.to(tl.int64) * NQO + q_rows, mask=rows, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    duq = tl.zeros([BLOCK_M, BLOCK_R], tl.float32)
    if GRID_MODE:
        for it in range(tl.load(FULL_PTR + pid_m), tl.load(FULL_PTR + pid_m + 1)):
            start_n = tl.load(FULL_IDX + it) * BLOCK_N
            dq, duq = _dq_step(dq, duq, q, uq, do, lse2, delta, k_base, v_base, kf_base, b_base, stride_kn,
                               stride_vn, stride_kfn, stride_bm, stride_bn, start_n, offs_m, offs_d, offs_dv, offs_r,
                               qk_scale, NQ, NK, OFF, LEFT, RIGHT, QLO, QHI, KC, DIL0, DIL1, DIL2, D, DV, R,
                               BLOCK_N, BLOCK_D, BLOCK_DV, BLOCK_R, False, GRID_MODE, MASK_AXES, HAS_DIL, HAS_BIAS,
                               HAS_LR, DOT_PREC, WIN=WIN, BLOCK_W=BLOCK_W, HAS_REL=HAS_REL, LR_CHAIN=LR_CHAIN,
                               DS_STORED=DS_STORED, GATHER=GATHER, KROW=KROW, q_rows=q_rows, REL_KF=REL_KF)
        for it in range(tl.load(PART_PTR + pid_m), tl.load(PART_PTR + pid_m + 1)):
            start_n = tl.load(PART_IDX + it) * BLOCK_N
            bits = 0
            if PAIR_MASK:
                bits = tl.load(PART_BITS + it)
            dq, duq = _dq_step(dq, duq, q, uq, do, lse2, delta, k_base, v_base, kf_base, b_base, stride_kn,
                               stride_vn, stride_kfn, stride_bm, stride_bn, start_n, offs_m, offs_d, offs_dv, offs_r,
                               qk_scale, NQ, NK, OFF, LEFT, RIGHT, QLO, QHI, KC, DIL0, DIL1, DIL2, D, DV, R,
                               BLOCK_N, BLOCK_D, BLOCK_DV, BLOCK_R, True, GRID_MODE, MASK_AXES, HAS_DIL, HAS_BIAS,
                               HAS_LR, DOT_PREC, bits, KB, PAIR_MASK, WIN=WIN, BLOCK_W=BLOCK_W, HAS_REL=HAS_REL,
                               LR_CHAIN=LR_CHAIN, DS_STORED=DS_STORED, GATHER=GATHER, KROW=KROW, q_rows=q_rows,
                               REL_KF=REL_KF)
    else:
        nb_lo, nb_hi, f_lo, f_hi = _ranges_q(pid_m, NQ, NK, OFF, LEFT, RIGHT, BLOCK_M, BLOCK_N)
        a, e = _chunk(f_lo, f_hi, pid_s, SPLIT_BLOCKS)
        for nb in range(a, e):
            dq, duq = _dq_step(dq, duq, q, uq, do, lse2, delta, k_base, v_base, kf_base, b_base, stride_kn,
                               stride_vn, stride_kfn, stride_bm, stride_bn, nb * BLOCK_N, offs_m, offs_d, offs_dv,
                               offs_r, qk_scale, NQ, NK, OFF, LEFT, RIGHT, QLO, QHI, KC, DIL0, DIL1, DIL2, D, DV, R,
                               BLOCK_N, BLOCK_D, BLOCK_DV, BLOCK_R, False, GRID_MODE, MASK_AXES, HAS_DIL, HAS_BIAS,
                               HAS_LR, DOT_PREC, WIN=WIN, BLOCK_W=BLOCK_W, HAS_REL=HAS_REL, LR_CHAIN=LR_CHAIN,
                               DS_STORED=DS_STORED)
        a, e = _chunk(nb_lo, f_lo, pid_s, SPLIT_BLOCKS)
        for nb in range(a, e):
            dq, duq = _dq_step(dq, duq, q, uq, do, lse2, delta, k_base, v_base, kf_base, b_base, stride_kn,
                               stride_vn, stride_kfn, stride_bm, stride_bn, nb * BLOCK_N, offs_m, offs_d, offs_dv,
                               offs_r, qk_scale, NQ, NK, OFF, LEFT, RIGHT, QLO, QHI, KC, DIL0, DIL1, DIL2, D, DV, R,
                               BLOCK_N, BLOCK_D, BLOCK_DV, BLOCK_R, True, GRID_MODE, MASK_AXES, HAS_DIL, HAS_BIAS,
                               HAS_LR, DOT_PREC, WIN=WIN, BLOCK_W=BLOCK_W, HAS_REL=HAS_REL, LR_CHAIN=LR_CHAIN,
                               DS_STORED=DS_STORED)
        a, e = _chunk(f_hi, nb_hi, pid_s, SPLIT_BLOCKS)
        for nb in range(a, e):
            dq, duq = _dq_step(dq, duq, q, uq, do, lse2, delta, k_base, v_base, kf_base, b_base, stride_kn,
                               stride_vn, stride_kfn, stride_bm, stride_bn, nb * BLOCK_N, offs_m, offs_d, offs_dv,
                               offs_r, qk_scale, NQ, NK, OFF, LEFT, RIGHT, QLO, QHI, KC, DIL0, DIL1, DIL2, D, DV, R,
                               BLOCK_N, BLOCK_D, BLOCK_DV, BLOCK_R, True, GRID_MODE, MASK_AXES, HAS_DIL, HAS_BIAS,
                               HAS_LR, DOT_PREC, WIN=WIN, BLOCK_W=BLOCK_W, HAS_REL=HAS_REL, LR_CHAIN=LR_CHAIN,
                               DS_STORED=DS_STORED)
    dq = dq * sm_scale
    if HAS_REL:  # dT = the table logits' gradient: dq += dT · RT here, dRT = dTᵀ · q in torch (dT stored per row)
        dt = _rel_table_logit_grad(duq, q_tok, QB, WIN, rel_scale, BLOCK_T, BLOCK_W, GRID_MODE, rel_qw, rel_block)
        rt = _rel_tables(RH, RW, stride_rt, WIN, offs_d, D, BLOCK_D, BLOCK_T)  # reloaded: not live in the loop
        dq += tl.dot(dt.to(rt.dtype), rt, input_precision=DOT_PREC)
        _, t, packed = _rel_rows(WIN, BLOCK_T)
        dt_ptrs = DUQ + pid_s.to(tl.int64) * stride_duqs + b * stride_duqb + h * stride_duqh + \
            q_rows[:, None] * stride_duqn + packed[None, :]
        tl.store(dt_ptrs, dt.to(DUQ.dtype.element_ty), mask=rows[:, None] & (t < 2 * WIN - 1)[None, :])
    dq_ptrs = DQ + pid_s.to(tl.int64) * stride_dqs + b * stride_dqb + h * stride_dqh + q_rows[:, None] * stride_dqn + \
        offs_d[None, :]
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=rows[:, None] & (offs_d < D)[None, :])
    if HAS_LR and not HAS_REL:
        duq_ptrs = DUQ + pid_s.to(tl.int64) * stride_duqs + b * stride_duqb + h * stride_duqh + \
            q_rows[:, None] * stride_duqn + offs_r[None, :]
        tl.store(duq_ptrs, duq.to(DUQ.dtype.element_ty), mask=rows[:, None] & (offs_r < R)[None, :])


@triton.jit
def sum_leading(X, Y, R, M, BLOCK: tl.constexpr):
    """Y[m] = sum over r < R of X[r, m] for a contiguous (R, M) X: float32 accumulation, one rounding to Y's dtype
    (as torch.sum). A bias gradient summed over the batch: torch's reduction over the leading dim ran at
    1.6 TB/s on an H200 (1.0 ms for dS of 2 x 16 x 4096 x 4096 bf16), a third of the backward."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    acc = tl.zeros([BLOCK], tl.float32)
    x_ptrs = X + offs
    for _ in range(R):
        acc += tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
        x_ptrs += M
    tl.store(Y + offs, acc.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _attn_bwd_dq_pair(DS, K, DQ, DB, stride_sb, stride_sh, stride_sm, stride_sn, stride_kb, stride_kh, stride_kn,
                      stride_dqb, stride_dqh, stride_dqn, stride_dqs, stride_dbh, stride_dbm, stride_dbn,
                      SPLIT_BLOCKS, GROUP, NQ, NK, sm_scale, OFF, LEFT, RIGHT,
                      D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                      DOT_PREC: tl.constexpr):
    """dQ of a batch of two from the dS the dK/dV kernel stored (as `_attn_bwd_dq` under DS_STORED), and the
    gradient of a bias the pair shares: DB = dS[0] + dS[1] (float32 sum, one rounding, as `sum_leading`), written
    while both tiles are in registers. The separate sum pass (`sum_leading`) read all of dS again: 1.07 GB at
    2 x 16 heads x 4096^2. 1-d patterns; one program per (query block, head, split)."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ds0_base = DS + h * stride_sh
    k0_base = K + (h // GROUP) * stride_kh
    db_base = DB + h * stride_dbh
    dq0 = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dq1 = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    nb_lo, nb_hi, _, _ = _ranges_q(pid_m, NQ, NK, OFF, LEFT, RIGHT, BLOCK_M, BLOCK_N)
    a, e = _chunk(nb_lo, nb_hi, pid_s, SPLIT_BLOCKS)
    for nb in range(a, e):
        offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        ds0 = _load_tile(ds0_base, offs_m, offs_n, stride_sm, stride_sn, NQ, NK, False, False)
        ds1 = _load_tile(ds0_base + stride_sb, offs_m, offs_n, stride_sm, stride_sn, NQ, NK, False, False)
        k0 = _load_rows(k0_base, offs_n, stride_kn, offs_d, NK, D, BLOCK_D, True)
        k1 = _load_rows(k0_base + stride_kb, offs_n, stride_kn, offs_d, NK, D, BLOCK_D, True)
        dq0 += tl.dot(ds0.to(k0.dtype), k0, input_precision=DOT_PREC)
        dq1 += tl.dot(ds1.to(k1.dtype), k1, input_precision=DOT_PREC)
        db = (ds0.to(tl.float32) + ds1.to(tl.float32)).to(DB.dtype.element_ty)
        tl.store(db_base + offs_m[:, None].to(tl.int64) * stride_dbm + offs_n[None, :] * stride_dbn, db,
                 mask=(offs_m < NQ)[:, None] & (offs_n < NK)[None, :])
    dq_ptrs = DQ + pid_s.to(tl.int64) * stride_dqs + h * stride_dqh + offs_m[:, None] * stride_dqn + offs_d[None, :]
    mask = (offs_m < NQ)[:, None] & (offs_d < D)[None, :]
    tl.store(dq_ptrs, (dq0 * sm_scale).to(DQ.dtype.element_ty), mask=mask)
    tl.store(dq_ptrs + stride_dqb, (dq1 * sm_scale).to(DQ.dtype.element_ty), mask=mask)
