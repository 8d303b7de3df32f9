"""The skinny kernels (kernels/backends/triton_skinny.py) and the in-kernel HaloNet relative-position bias, against
a float64 reference under Triton's CPU interpreter (float16/float32; bf16 is checked on the GPU by
scripts/bench_kernels.py). Every case also asserts which kernel ran (`triton_attention.CALLS`)."""
import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["ATTNZOO_KERNEL_POISON"] = "1"  # outputs start as NaN: a missed write fails the comparison


@pytest.fixture(autouse=True)
def _new_kernels(monkeypatch):
    """Pin the skinny and in-kernel rel-pos kernels on (the defaults; the env can pin other paths)."""
    monkeypatch.setenv("ATTNZOO_SKINNY", "auto")
    monkeypatch.setenv("ATTNZOO_RELPOS", "kernel")
pytest.importorskip("triton")

import kernels  # noqa: E402
from kernels import Dense, Halo  # noqa: E402
from kernels.backends.reference import attention_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float32: 1e-4 if DEVICE == "cpu" else 1e-3}
LSE_TOL = {torch.float16: 5e-3, torch.bfloat16: 4e-2, torch.float32: 1e-4 if DEVICE == "cpu" else 1e-3}


def _sk():
    from kernels.backends import triton_skinny

    return triton_skinny


def _calls():
    """Launches per kernel path (`triton_attention.CALLS`)."""
    from kernels.backends import triton_attention

    return triton_attention.CALLS


def _rel(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


def _rand(*shape, dtype, scale=1.0):
    return (scale * torch.randn(*shape, device=DEVICE, dtype=torch.float32)).to(dtype).requires_grad_()


def _check(B, H, HKV, NQ, NK, D, DV, dtype, bias_fn=None, gate_shape=None, lse_grad=False, expect=(),
           pattern=None):
    """Triton vs float64: out, lse, and the gradients of q, k, v, gate and the bias leaves; `expect` names the
    `triton_attention.CALLS` entries that must have run."""
    calls = _calls()
    before = dict(calls)
    q, k, v = _rand(B, H, NQ, D, dtype=dtype), _rand(B, HKV, NK, D, dtype=dtype), _rand(B, HKV, NK, DV, dtype=dtype)
    gate = None if gate_shape is None else _rand(*gate_shape, dtype=dtype)
    bias, bias_leaves = (None, []) if bias_fn is None else bias_fn(lambda *s, dt=dtype: _rand(*s, dtype=dt))
    scale = 0.7 / math.sqrt(D)
    out, lse = kernels.attention(q, k, v, pattern, bias=bias, gate=gate, scale=scale, return_lse=True,
                                 backend="triton")
    leaves = [q, k, v] + ([gate] if gate is not None else []) + bias_leaves
    do = torch.randn_like(out)
    dlse = torch.randn_like(lse) if lse_grad else None
    finite = torch.isfinite(lse.detach())
    loss = (out * do).sum() + ((torch.where(finite, lse, 0.0) * dlse).sum() if lse_grad else 0.0)
    grads = torch.autograd.grad(loss, leaves)

    l64 = [x.detach().double().requires_grad_() for x in leaves]
    it = iter(l64[3 + (gate is not None):])
    bias64 = None if bias_fn is None else bias_fn(lambda *s, dt=None: next(it))[0]
    ro, rl = attention_reference(l64[0], l64[1], l64[2], pattern, bias=bias64,
                                 gate=l64[3] if gate is not None else None, scale=scale, return_lse=True)
    rloss = (ro * do.double()).sum() + ((torch.where(torch.isfinite(rl), rl, 0.0) * dlse.double()).sum()
                                        if lse_grad else 0.0)
    rgrads = torch.autograd.grad(rloss, l64)

    tol = TOL[dtype]
    assert torch.isfinite(out).all(), "output not fully written"
    assert _rel(out, ro) < tol
    assert torch.equal(torch.isfinite(lse), torch.isfinite(rl))
    assert (lse[finite].double() - rl[finite]).abs().max() < LSE_TOL[dtype]
    names = ["dq", "dk", "dv"] + (["dgate"] if gate is not None else []) + [f"dbias{i}" for i in
                                                                              range(len(bias_leaves))]
    for name, g, rg in zip(names, grads, rgrads):
        assert g is not None and g.shape == rg.shape, name
        assert torch.isfinite(g).all(), f"{name} not fully written"
        assert _rel(g, rg) < tol, (name, _rel(g, rg))
    ran = {key for key, n in calls.items() if n > before.get(key, 0)}
    assert set(expect) <= ran, (expect, ran)
    return ran


def _dense_bias(shape, dtype=None):
    def fn(make):
        leaf = make(*shape) if dtype is None else make(*shape, dt=dtype)
        return leaf, [leaf]
    return fn


@pytest.fixture
def force():
    sk = _sk()
    yield sk._FORCE
    sk._FORCE.clear()


# ----------------------------------------------------------------------------------------------------------
# few keys: K/V resident, loop over query blocks


def test_few_keys_resident_bias_gate():
    # 3 query blocks of 16 in one program chunk: the dK/dV partials and the dS store of a (1, H, Nq, Nk) bias
    _check(2, 2, 2, 40, 20, 32, 32, torch.float16, bias_fn=_dense_bias((1, 2, 40, 20)), gate_shape=(2, 40, 2),
           expect=("keys_fwd_res", "keys_bwd_res"))


def test_few_keys_gqa_fp32_elementwise_gate_lse_grad():
    _check(1, 4, 2, 37, 9, 16, 32, torch.float32, gate_shape=(1, 37, 4, 32), lse_grad=True,
           expect=("keys_fwd_res", "keys_bwd_res"))


@pytest.mark.parametrize("nk", [32, 27])
@pytest.mark.parametrize("mode", ["res", "flat"])
def test_few_keys_one_pass_without_bias(mode, nk, force):
    # no bias, one key tile: the one-pass softmax (`_one_pass`) on a full (32) or padded (27) key tile, with K/V
    # resident across the query blocks or loaded per item; GQA
    force["keys_mode"] = mode
    _check(2, 4, 2, 40, nk, 16, 16, torch.float16, lse_grad=True, expect=("keys_fwd_" + mode,))


def test_few_keys_flat_single_block_keypad_bias():
    # every (b, h) has one query block: FLAT programs walk (b, h) items; bias broadcast over heads and queries
    _check(3, 2, 2, 12, 30, 16, 16, torch.float16, bias_fn=_dense_bias((3, 1, 1, 30)),
           expect=("keys_fwd_flat", "keys_bwd_flat"))


def test_few_keys_full_bias_gradient_in_its_dtype():
    # a bias with the full batch and heads: dS goes out in float16 directly (no float32 buffer, no reduction)
    _check(2, 2, 2, 20, 24, 16, 16, torch.float16, bias_fn=_dense_bias((2, 2, 20, 24)),
           expect=("keys_fwd_res", "keys_bwd_res"))


@pytest.mark.parametrize("path", ["auto", "old"])
def test_fp16_broadcast_bias_grad_keeps_float32_sum(path, monkeypatch):
    """A float16 bias (1, 1, Nq, Nk) shared by B*H = 128 problems and a small upstream gradient (an unscaled mean
    loss): dS must be summed over the broadcast dims before rounding to float16 (per-element values fall below
    float16's normal range). Judged against float64, at most 2x the error of the float32 bias's gradient rounded
    once (rounding dS to float16 first measured ~11x). Both the few-keys and the general kernels."""
    monkeypatch.setenv("ATTNZOO_SKINNY", path)
    B, H, NQ, NK, D = 32, 4, 12, 37, 16
    q, k, v = (torch.randn(B, H, n, D, device=DEVICE).half() for n in (NQ, NK, NK))
    b = torch.randn(1, 1, NQ, NK, device=DEVICE).half()
    do = (torch.randn(B, H, NQ, D, device=DEVICE) * 1e-5).half()
    grads = []
    for dt in (torch.float16, torch.float32, torch.float64):
        leaf = b.to(dt).requires_grad_()
        if dt == torch.float64:
            out = attention_reference(q.double(), k.double(), v.double(), bias=leaf)
        else:
            out = kernels.attention(q, k, v, bias=leaf, backend="triton")
        grads.append(torch.autograd.grad(out, leaf, do.to(out.dtype))[0])
    db16, db32, ref = grads
    assert db16.dtype == torch.float16
    rel = lambda x: ((x.double() - ref).norm() / ref.norm()).item()  # noqa: E731
    assert rel(db16) < 2 * rel(db32.half()), (rel(db16), rel(db32.half()))


def test_few_keys_flat_forward_many_blocks_gqa(force):
    force["keys_mode"] = "flat"  # forward FLAT over several query blocks per (b, h); the backward goes RESIDENT
    _check(2, 4, 1, 35, 17, 16, 16, torch.float16, bias_fn=_dense_bias((4, 35, 17), torch.float32),
           expect=("keys_fwd_flat", "keys_bwd_res"))


@pytest.mark.parametrize("chunk", [16, 32])
def test_few_keys_chunked_keys_bias_gate_gqa(chunk, force):
    # 45 keys in 16-key chunks (3 chunks, the last partial): the online-softmax loop, forward and backward (one
    # query block per (b, h)), with a dense bias, an element-wise gate, GQA and the lse gradient. In 32-key chunks
    # the backward runs the last chunk's 13 keys on a 16-key tile
    force["key_chunk"] = chunk
    tails = _calls()["keys_bwd_tail"]
    _check(2, 4, 2, 13, 45, 16, 32, torch.float16, bias_fn=_dense_bias((1, 4, 13, 45)), gate_shape=(2, 13, 4, 32),
           lse_grad=True, expect=("keys_fwd_flat_chunked", "keys_bwd_flat_chunked"))
    assert _calls()["keys_bwd_tail"] - tails == (chunk == 32)


def test_few_keys_chunked_forward_several_query_blocks(force):
    # several query blocks per (b, h): the forward loops over key chunks per block, the backward falls back to
    # one resident key tile (dK/dV accumulate over the blocks)
    force["key_chunk"] = 16
    _check(1, 2, 2, 40, 33, 16, 16, torch.float32, bias_fn=_dense_bias((1, 1, 40, 33), torch.float32),
           expect=("keys_fwd_flat_chunked", "keys_bwd_res"))


def test_few_keys_fully_masked_row():
    # a -inf bias on every key of query row 5: zero output, lse = -inf, no gradient from that row; the other rows
    # must match the float64 reference of the problem without row 5
    n0 = _calls()["keys_bwd_res"]
    dt = torch.float32
    q, k, v = _rand(1, 2, 21, 16, dtype=dt), _rand(1, 2, 18, 16, dtype=dt), _rand(1, 2, 18, 16, dtype=dt)
    leaf = _rand(1, 2, 21, 18, dtype=dt)
    row = torch.arange(21, device=DEVICE)[:, None] == 5
    out, lse = kernels.attention(q, k, v, bias=torch.where(row, float("-inf"), leaf), return_lse=True,
                                 backend="triton")
    do = torch.randn_like(out)
    grads = torch.autograd.grad((out * do).sum(), (q, k, v, leaf))
    keep = torch.arange(21, device=DEVICE) != 5
    l64 = [x.detach().double().requires_grad_() for x in (q, k, v, leaf)]
    ro, rl = attention_reference(l64[0][:, :, keep], l64[1], l64[2], bias=l64[3][:, :, keep], return_lse=True)
    rgrads = torch.autograd.grad((ro * do.double()[:, :, keep]).sum(), l64)
    assert torch.equal(out[:, :, 5], torch.zeros_like(out[:, :, 5])) and torch.isinf(lse[:, :, 5]).all()
    assert _rel(out[:, :, keep], ro) < TOL[dt] and (lse[:, :, keep].double() - rl).abs().max() < LSE_TOL[dt]
    assert torch.equal(grads[0][:, :, 5], torch.zeros_like(grads[0][:, :, 5]))
    assert torch.equal(grads[3][:, :, 5], torch.zeros_like(grads[3][:, :, 5]))
    for g, rg in zip(grads, rgrads):
        assert _rel(g, rg) < TOL[dt]
    assert _calls()["keys_bwd_res"] == n0 + 1


# ----------------------------------------------------------------------------------------------------------
# few queries: split keys, lse-combined partials


def test_few_queries_split_bias():
    # agent aggregation shape: 9 agents x 120 keys, (1, H, n, N) bias; splits over key blocks
    _check(2, 2, 2, 9, 300, 16, 16, torch.float16, bias_fn=_dense_bias((1, 2, 9, 300)),
           expect=("queries_fwd", "queries_bwd"))


def test_few_queries_gqa_rows_fold_two_row_blocks_fp32(force):
    force["block_n"] = 64
    # 4 query heads on 1 KV head: 20 folded rows = 2 row blocks (dK/dV accumulated in fp32); element-wise gate
    _check(1, 4, 1, 5, 270, 16, 16, torch.float32, gate_shape=(1, 5, 4, 16), lse_grad=True,
           bias_fn=_dense_bias((1, 4, 5, 270)), expect=("queries_fwd", "queries_bwd"))


def test_few_queries_single_split_fused_gate(force):
    force["block_n"] = 128  # 3 key blocks over 8 programs: no split, the gate runs in the forward epilogue
    from kernels.backends.triton_attention import _skinny_kind

    q = torch.empty(2, 4, 7, 16)
    k = torch.empty(2, 4, 300, 16)
    assert _skinny_kind(Dense(), q, k, k, None) == "queries"
    _check(2, 4, 4, 7, 300, 16, 16, torch.float16, gate_shape=(2, 7, 4), expect=("queries_fwd", "queries_bwd"))


def test_old_path_selectable(monkeypatch):
    monkeypatch.setenv("ATTNZOO_SKINNY", "old")
    ran = _check(1, 2, 2, 40, 20, 16, 16, torch.float16, bias_fn=_dense_bias((1, 2, 40, 20)))
    assert not {key for key in ran if key.startswith(("keys_", "queries_"))}, ran  # no few-keys / few-queries kernel


# ----------------------------------------------------------------------------------------------------------
# HaloNet relative positions in-kernel (blocked layout)


def _rel_pos(pattern, d, scale=0.3):
    def fn(make):
        t = [make(2 * pattern.window - 1, d) for _ in pattern.grid]
        return kernels.RelPosBias(pattern, t, scale=scale), t
    return fn


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_relpos_blocked_in_kernel(dtype):
    hb = Halo((4, 4), block=4, halo=1)  # 16 queries, 6 x 6 = 36 keys per block
    _check(3, 2, 2, 16, 36, 16, 16, dtype, bias_fn=_rel_pos(hb, 16), lse_grad=dtype == torch.float32,
           expect=("keys_fwd_flat_rel", "keys_bwd_flat_rel", "keys_bwd_rel_factor_loaded"))


def test_relpos_blocked_strided_gqa_gate_and_pattern():
    hb = Halo((2, 2), block=4, halo=1, query_stride=2)  # 2 x 2 queries per block against the 6 x 6 window
    _check(2, 4, 2, 4, 36, 16, 32, torch.float16, bias_fn=_rel_pos(hb, 16), gate_shape=(2, 4, 4),
           expect=("keys_fwd_flat_rel", "keys_bwd_flat_rel"))
    # the single-block Halo pattern itself (every pair visible) takes the same path
    _check(1, 2, 2, 4, 36, 16, 16, torch.float16, bias_fn=_rel_pos(hb, 16), pattern=hb,
           expect=("keys_fwd_flat_rel", "keys_bwd_flat_rel"))


@pytest.mark.parametrize("chunk", [16, 32])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_relpos_blocked_chunked_keys(dtype, chunk, force):
    # HaloNet's blocked layout with the keys in 16-key chunks: 36 keys = 3 chunks (the last partial), the
    # rel-pos one-hots per chunk and the table gradients summed over them; strided queries and a gate too. The
    # narrower last tile is not used with rel-pos (`tail_tile`)
    force["key_chunk"] = chunk
    tails = _calls()["keys_bwd_tail"]
    hb = Halo((4, 4), block=4, halo=1)
    _check(3, 2, 2, 16, 36, 16, 16, dtype, bias_fn=_rel_pos(hb, 16), lse_grad=dtype == torch.float32,
           expect=("keys_fwd_flat_chunked_rel", "keys_bwd_flat_chunked_rel"))
    hs = Halo((2, 2), block=4, halo=1, query_stride=2)
    _check(2, 4, 2, 4, 36, 16, 32, dtype, bias_fn=_rel_pos(hs, 16), gate_shape=(2, 4, 4),
           expect=("keys_fwd_flat_chunked_rel", "keys_bwd_flat_chunked_rel"))
    assert _calls()["keys_bwd_tail"] == tails


def test_relpos_blocked_several_items_per_program():
    # 40 (b, h) items over the interpreter's 16 programs: each program sums the tables' gradient over its items
    # (with one item per program the kernel writes it directly)
    hb = Halo((4, 4), block=4, halo=1)
    _check(10, 4, 4, 16, 36, 16, 16, torch.float32, bias_fn=_rel_pos(hb, 16),
           expect=("keys_fwd_flat_rel", "keys_bwd_flat_rel_items"))


def test_relpos_resident_several_query_blocks():
    hb = Halo((6, 6), block=6, halo=1)  # 36 queries = 3 query blocks of 16 (RESIDENT), 8 x 8 keys
    _check(1, 2, 1, 36, 64, 16, 16, torch.float16, bias_fn=_rel_pos(hb, 16),
           expect=("keys_fwd_res_rel", "keys_bwd_res_rel"))


@pytest.mark.parametrize("path", ["few-keys", "general"])
def test_relpos_in_kernel_under_torch_compile(path, monkeypatch, no_lowering):
    """torch.compile (fullgraph) traces the attnzoo::relpos ops (fake impls) and runs the in-kernel path: the
    few-keys kernel (float16) or the general kernels (float32), whose two table gradients come from one GEMM and
    must not alias (a custom op's outputs)."""
    dtype, expect = torch.float16, {"keys_fwd_flat_rel", "keys_bwd_flat_rel", "keys_bwd_rel_factor_loaded"}
    monkeypatch.setenv("ATTNZOO_SKINNY", "new")  # pinned: on a GPU the tuner would also run the general kernels
    if path == "general":
        monkeypatch.setenv("ATTNZOO_SKINNY", "old")
        dtype, expect = torch.float32, set(GENERAL_REL)
    hb = Halo((4, 4), block=4, halo=1)
    mk = lambda *s: torch.randn(*s, device=DEVICE, dtype=dtype, requires_grad=True)  # noqa: E731
    q, k, v, th, tw = mk(2, 2, 16, 16), mk(2, 2, 36, 16), mk(2, 2, 36, 16), mk(11, 16), mk(11, 16)

    def f(q, k, v, th, tw):
        return kernels.attention(q, k, v, bias=kernels.RelPosBias(hb, (th, tw), scale=0.5), backend="triton")

    before = dict(_calls())
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, th, tw)
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v, th, tw))
    assert {key for key, n in _calls().items() if n > before.get(key, 0)} == expect
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v, th, tw)]
    ref = attention_reference(*leaves[:3], bias=kernels.RelPosBias(hb, leaves[3:], scale=0.5))
    rgrads = torch.autograd.grad(ref.square().sum(), leaves)
    assert _rel(out, ref) < TOL[dtype]
    for g, rg in zip(grads, rgrads):
        assert _rel(g, rg) < (5 if dtype == torch.float16 else 1) * TOL[dtype]


def _blocked_factor_reference(q, tables, qb, win, block_w, rel_scale):
    """The rel-pos query factor by its definition, float64: u[m, c] = rel_scale · q_m · R_h[c - qy(m) + win - 1]
    for the row classes c < win, then R_w and qx(m) for the column classes (columns block_w + c); qy, qx: the
    query's row and column in its qb x qb block. Classes >= win are padding (NaN here: never compared)."""
    m = torch.arange(q.shape[2])
    out = torch.full((*q.shape[:3], 2 * block_w), float("nan"), dtype=torch.float64)
    for half, (table, pos) in enumerate(zip(tables, (m // qb, m % qb))):
        for i in range(q.shape[2]):
            for c in range(win):
                out[:, :, i, half * block_w + c] = rel_scale * (q[:, :, i].double() @ table[c - pos[i] + win - 1]
                                                                .double())
    return out


@pytest.mark.parametrize("path", ["few-keys", "general", "grid"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_relpos_saved_query_factor(path, dtype, monkeypatch):
    """The forward's saved rel-pos query factor (`save_factor`, what autograd keeps for the backward): on the
    blocked layout its entries against the definition, times 1 / scale where the factor dot is chained (not in
    float16); the forward's outputs unchanged by saving it; and the backward that loads it against the one that
    rebuilds it (the few-keys backward in its prologue, the general one by `_rel_factor_bwd`). The grid has
    padding slots (token -1), whose rows the forward must not store."""
    from kernels.backends import triton_attention as ta
    from kernels.patterns import pattern_key

    monkeypatch.setenv("ATTNZOO_SKINNY", "new" if path == "few-keys" else "old")
    d, rel_scale, scale = 16, 0.3, 0.25
    if path == "grid":
        p = Halo((6, 9), block=3, halo=1)
        B, H, nq, nk, qb, win, key = 2, 2, 54, math.prod(p.key_grid), 3, 5, pattern_key(p)
    else:
        B, H, nq, nk, qb, win, key = 2, 3, 16, 36, 4, 6, ""
    q, k, v = (torch.randn(B, H, n, d, dtype=torch.float32).to(dtype) for n in (nq, nk, nk))
    rh, rw = (0.5 * torch.randn(2 * win - 1, d, dtype=torch.float32).to(dtype) for _ in range(2))
    if path == "grid":  # the first forward config (the interpreter's) has padding slots
        cfg = ta._with_tile_costs(p, ta._fwd_candidates(d, d))[0]
        assert (ta._problem(p, nq, nk, cfg, q.device).map.q_rows < 0).any()
    out, lse, factor = ta._relpos_fwd_impl(q, k, v, rh, rw, None, qb, win, rel_scale, scale, key, True)
    out0, lse0, none = ta._relpos_fwd_impl(q, k, v, rh, rw, None, qb, win, rel_scale, scale, key, False)
    assert none.numel() == 0 and torch.equal(out, out0) and torch.equal(lse, lse0)
    block_w = ta._block_d(win)
    assert factor.shape == (B, H, nq, 2 * block_w) and factor.dtype == dtype
    if path != "grid":
        mult = rel_scale if dtype == torch.float16 else rel_scale / scale
        ref = _blocked_factor_reference(q, (rh, rw), qb, win, block_w, mult)
        cls = torch.cat([torch.arange(win), block_w + torch.arange(win)])
        assert _rel(factor[..., cls], ref[..., cls]) < TOL[dtype]
    do = torch.randn_like(out)
    calls = _calls()
    loaded = "general_bwd_rel_factor_loaded" if path != "few-keys" else "keys_bwd_rel_factor_loaded"
    n0 = calls[loaded]
    grads = ta._relpos_bwd_impl(do, q, k, v, out, lse, None, factor, rh, rw, None, qb, win, rel_scale, scale, key)
    assert calls[loaded] == n0 + 1
    rebuilt = ta._relpos_bwd_impl(do, q, k, v, out, lse, None, None, rh, rw, None, qb, win, rel_scale, scale, key)
    assert calls[loaded] == n0 + 1
    for g, rg in zip(grads[:5], rebuilt[:5]):
        assert torch.isfinite(g).all() and _rel(g, rg.double()) < TOL[dtype]


@pytest.fixture
def no_lowering(monkeypatch):
    """Forbids the torch lowering of the rel-pos bias to low-rank factors."""
    def lowered(*_):
        raise AssertionError("the rel-pos bias was lowered to low-rank factors in torch")

    monkeypatch.setattr(kernels.RelPosBias, "kernel_factors", lowered)


GENERAL_REL = ("general_fwd_rel", "general_bwd_rel", "general_bwd_rel_factor_loaded")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_relpos_blocked_general_kernels(dtype, monkeypatch, no_lowering):
    """The general kernels' in-kernel rel-pos (`HAS_REL`): factors built from q and the tables, dT · RT added to dq,
    the tables' gradient from the stored dT; skinny kernels off."""
    monkeypatch.setenv("ATTNZOO_SKINNY", "old")
    hb = Halo((4, 4), block=4, halo=1)
    assert _check(3, 2, 2, 16, 36, 16, 16, dtype, bias_fn=_rel_pos(hb, 16), lse_grad=dtype == torch.float32,
                  expect=GENERAL_REL) == set(GENERAL_REL)
    hs = Halo((2, 2), block=4, halo=1, query_stride=2)  # strided queries, GQA, head-wise gate, Dv != D
    assert _check(2, 4, 2, 4, 36, 16, 32, dtype, bias_fn=_rel_pos(hs, 16), gate_shape=(2, 4, 4),
                  expect=GENERAL_REL) == set(GENERAL_REL)


def test_relpos_general_kernels_split_large_window(no_lowering, monkeypatch):
    """A window past the few-keys limit (16 x 16 keys at head dim 72; 16 classes fill the factor's half) runs the
    general kernels in-kernel even with the skinny kernels on; one (b, h) makes the forward and dQ split their
    key blocks (fp32 partials of dT summed; under the interpreter's block sizes), with an element-wise gate
    combined after the split."""
    from kernels.backends import triton_attention as ta

    splits, real = [], ta._splits
    monkeypatch.setattr(ta, "_splits", lambda *a, **kw: splits.append((kw.get("min_blocks", 2), real(*a, **kw)[0]))
                        or real(*a, **kw))
    hb = Halo((4, 4), block=4, halo=6)
    assert _check(1, 1, 1, 16, 256, 72, 72, torch.float32, bias_fn=_rel_pos(hb, 72), gate_shape=(1, 16, 1, 72),
                  lse_grad=True, expect=GENERAL_REL) == set(GENERAL_REL)
    if DEVICE == "cpu":  # the GPU's block sizes leave too few key blocks to split
        assert any(s > 1 for mb, s in splits if mb == 2) and any(s > 1 for mb, s in splits if mb == 4)


def test_relpos_general_kernels_wide_window_odd_block(no_lowering):
    """HaloNet H5's geometry: a 7 x 7 query block (block 14, strided queries; not a power of two) in an 18 x 18
    window (324 keys, past the few-keys kernels; 32 classes per axis, rank 64), value width != query width."""
    hb = Halo((7, 7), block=14, halo=2, query_stride=2)
    assert (hb.query_block, hb.window) == (7, 18)
    assert _check(2, 2, 2, 49, 324, 16, 40, torch.float32, bias_fn=_rel_pos(hb, 16), lse_grad=True,
                  expect=GENERAL_REL) == set(GENERAL_REL)


def test_relpos_lowrank_selectable(monkeypatch):
    monkeypatch.setenv("ATTNZOO_RELPOS", "lowrank")
    hb = Halo((4, 4), block=4, halo=1)
    ran = _check(2, 2, 2, 16, 36, 16, 16, torch.float16, bias_fn=_rel_pos(hb, 16))
    assert not any(key.endswith("_rel") for key in ran)


@pytest.mark.parametrize("case", [(1, 2, 2, 37, 45, 32, 32), (1, 4, 2, 33, 33, 72, 72), (2, 2, 1, 9, 120, 16, 16)],
                         ids=["few-keys", "gqa-d72", "few-queries"])
def test_general_kernels_still_cover_small_dense(case, monkeypatch):
    # these shapes now dispatch to the skinny kernels; the general kernels stay selectable (and tested) for them
    monkeypatch.setenv("ATTNZOO_SKINNY", "old")
    B, H, HKV, NQ, NK, D, DV = case
    ran = _check(B, H, HKV, NQ, NK, D, DV, torch.float16, bias_fn=_dense_bias((1, H, NQ, NK)),
                 gate_shape=(B, NQ, H))
    assert not {key for key in ran if key.startswith(("keys_", "queries_"))}, ran
