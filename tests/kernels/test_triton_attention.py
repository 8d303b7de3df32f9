"""The Triton kernels (forward and dq/dk/dv) against a float64 reference, under Triton's CPU interpreter.

Triton 3.8's interpreter computes tl.dot on bf16 wrongly, so CPU tests use float16/float32; bf16 is checked on
the GPU by scripts/bench_kernels.py (and by the `gpu` cases here when CUDA is present).
"""
import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["ATTNZOO_KERNEL_POISON"] = "1"  # kernel outputs start as NaN: a missed write fails the comparison
pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import kernels  # noqa: E402
from kernels import Causal, Dense, Halo, Neighborhood, Window1d  # noqa: E402
from kernels.backends.reference import attention_reference  # noqa: E402
from kernels.backends.triton_kernels import gated_output  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# per dtype: relative error bound (‖x - ref‖ / ‖ref‖) for out and every gradient, and absolute bound on lse
# (factorized biases are formed in the input dtype, so lse carries its rounding: |bias| x eps)
TOL = {torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float32: 1e-4 if DEVICE == "cpu" else 1e-3}
# bias gradients are sums of dS rounded to the input dtype over many keys, often of tiny tensors (a rank-4 query
# factor of 7 rows: 56 entries): in float16 their relative error has a tail past 2e-3 (median 6e-4, 1.6e-3 in
# 60 draws, 3 of 150 over 2e-3) where a wrong index gives O(1)
BIAS_GRAD_TOL = {torch.float16: 5e-3, torch.bfloat16: 3e-2, torch.float32: 1e-4 if DEVICE == "cpu" else 1e-3}
LSE_TOL = {torch.float16: 5e-3, torch.bfloat16: 4e-2, torch.float32: 1e-4 if DEVICE == "cpu" else 1e-3}
DTYPES = [torch.float16, torch.float32] if DEVICE == "cpu" else [torch.float16, torch.bfloat16]

CASES = [  # (id, pattern, B, H, HKV, NQ, NK, D, DV)
    ("dense-odd", Dense(), 1, 2, 2, 37, 45, 32, 32),
    ("dense-gqa-d72", Dense(), 2, 4, 2, 33, 33, 72, 72),
    ("causal-nq<nk", Causal(), 1, 2, 1, 29, 50, 32, 48),
    ("causal-nq>nk", Causal(), 1, 2, 2, 50, 29, 32, 32),  # first rows see nothing: zeros, lse=-inf
    ("window1d", Window1d(5, 3), 1, 2, 1, 41, 41, 16, 16),
    ("window1d-causal", Window1d(7, 0), 1, 1, 1, 40, 40, 32, 32),
    ("na1d-border", Neighborhood((43,), (9,)), 1, 2, 2, 43, 43, 16, 16),
    ("na2d-stride-dil", Neighborhood((7, 9), (3, 4), stride=(1, 2), dilation=(2, 1)), 1, 2, 1, 63, 63, 32, 32),
    ("na2d-even-noinward", Neighborhood((6, 10), (4, 6), inward=False), 1, 1, 1, 60, 60, 16, 16),
    ("na3d", Neighborhood((3, 5, 6), (3, 3, 5)), 1, 2, 2, 90, 90, 16, 16),
    ("na2d-causal-stride", Neighborhood((6, 7), (3, 4), stride=(2, 3), causal_axes=(0,)), 1, 2, 1, 42, 42, 16, 16),
    ("na3d-causal-dil", Neighborhood((4, 5, 6), (2, 3, 3), dilation=(1, 1, 2), causal_axes=(0,)), 1, 1, 1, 120,
     120, 16, 16),
    ("halo", Halo((4, 6), block=2, halo=1), 1, 2, 2, 24, 48, 16, 16),
]


def _rel(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


def _rand(*shape, dtype, grad=True):
    return torch.randn(*shape, device=DEVICE, dtype=dtype, requires_grad=grad)


def _check(pattern, B, H, HKV, NQ, NK, D, DV, dtype, gate_shape=None, lse_grad=False, bias_fn=None, kv_fn=None):
    """Triton vs float64 reference: out, lse and the gradient of every leaf (q, k, v, gate, bias tensors).

    `bias_fn(q) -> (bias, leaves)` builds the bias (a tensor or a factorized bias) from its leaf tensors;
    `kv_fn(k, v) -> (k, v)` may turn the leaves into views (expanded, strided) before the call."""
    q = _rand(B, H, NQ, D, dtype=dtype)
    k = _rand(B, HKV, NK, D, dtype=dtype)
    v = _rand(B, HKV, NK, DV, dtype=dtype)
    gate = None if gate_shape is None else _rand(*gate_shape, dtype=dtype)
    bias, bias_leaves = (None, ()) if bias_fn is None else bias_fn(lambda *s, dtype=dtype: _rand(*s, dtype=dtype))
    kv_fn = kv_fn or (lambda k_, v_: (k_, v_))
    scale = 0.5 / math.sqrt(D)
    out, lse = kernels.attention(q, *kv_fn(k, v), pattern, bias=bias, gate=gate, scale=scale, return_lse=True,
                                 backend="triton")
    do = torch.randn_like(out)
    dlse = torch.randn_like(lse) if lse_grad else None
    leaves = (q, k, v) + (() if gate is None else (gate,)) + tuple(bias_leaves)
    finite_lse = torch.isfinite(lse.detach())
    loss_terms = [(out * do).sum()]
    if lse_grad:
        loss_terms.append((torch.where(finite_lse, lse, 0.0) * dlse).sum())
    grads = torch.autograd.grad(sum(loss_terms), leaves)

    leaves64 = [x.detach().double().requires_grad_() for x in leaves]
    q64, k64, v64 = leaves64[:3]
    gate64 = leaves64[3] if gate is not None else None
    bias64 = None
    if bias_fn is not None:
        it = iter(leaves64[3 + (gate is not None):])
        bias64, _ = bias_fn(lambda *s, dtype=None: next(it))
    ro, rl = attention_reference(q64, *kv_fn(k64, v64), pattern, bias=bias64, gate=gate64, scale=scale,
                                 return_lse=True)
    ref_terms = [(ro * do.double()).sum()]
    if lse_grad:
        ref_terms.append((torch.where(torch.isfinite(rl), rl, 0.0) * dlse.double()).sum())
    rgrads = torch.autograd.grad(sum(ref_terms), leaves64)

    tol = TOL[dtype]
    assert torch.isfinite(out).all(), "output not fully written"
    assert _rel(out, ro) < tol
    assert torch.equal(torch.isfinite(lse), torch.isfinite(rl)), "rows without keys must give lse = -inf"
    assert (lse[finite_lse].double() - rl[finite_lse]).abs().max() < LSE_TOL[dtype]
    names = ["dq", "dk", "dv"] + (["dgate"] if gate is not None else []) + [f"dbias{i}" for i in
                                                                              range(len(bias_leaves))]
    for name, g, rg in zip(names, grads, rgrads):
        assert g is not None and g.shape == rg.shape, name
        assert torch.isfinite(g).all(), f"{name} not fully written"
        assert _rel(g, rg) < (BIAS_GRAD_TOL[dtype] if name.startswith("dbias") else tol), name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_forward_backward_matches_reference(case, dtype):
    _check(*case[1:], dtype)


def test_lse_gradient():
    _check(Neighborhood((5, 7), (3, 5)), 1, 2, 1, 35, 35, 32, 32, torch.float16, lse_grad=True)


@pytest.mark.parametrize("bias", ["none", "rel-pos"])
def test_unused_lse_gets_no_gradient(bias, monkeypatch):
    """Backward through `out` alone: the kernels get no lse gradient (None, not a zero-filled tensor they would
    read), with or without rel-pos (whose forward also returns the saved query factor); the gradients still match
    float64."""
    from kernels.backends import triton_attention as ta

    seen = []
    backward = ta._backward
    monkeypatch.setattr(ta, "_backward", lambda *a: seen.append(a[6]) or backward(*a))
    hb = Halo((4, 4), block=4, halo=1)
    q, k, v = (torch.randn(2, 2, n, 16, requires_grad=True) for n in (16, 36, 36))
    tables = [(0.3 * torch.randn(11, 16)).requires_grad_() for _ in range(2)]
    rel = kernels.RelPosBias(hb, tables) if bias == "rel-pos" else None
    out = kernels.attention(q, k, v, bias=rel, backend="triton")
    leaves = [q, k, v] + (tables if rel is not None else [])
    grads = torch.autograd.grad(out.square().sum(), leaves)
    assert seen == [None]
    l64 = [x.detach().double().requires_grad_() for x in leaves]
    ref = attention_reference(*l64[:3], bias=kernels.RelPosBias(hb, l64[3:]) if rel is not None else None)
    for g, rg in zip(grads, torch.autograd.grad(ref.square().sum(), l64)):
        assert ((g.double() - rg).norm() / rg.norm()).item() < TOL[torch.float32]


@pytest.mark.parametrize("kind", ["head", "element"])
def test_gate(kind):
    B, H, N, D = 1, 2, 30, 32
    shape = (B, N, H) if kind == "head" else (B, N, H, D)
    _check(Window1d(4, 4), B, H, H, N, N, D, D, torch.float32, gate_shape=shape)


def test_noncontiguous_inputs():
    # (B, N, H, D) projections viewed as (B, H, N, D): strided, no copy needed
    x = torch.randn(1, 50, 3, 2, 32, device=DEVICE, dtype=torch.float16)
    q, k, v = (x[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, N, D) strided views
    assert not q.is_contiguous()
    out = kernels.attention(q, k, v, Causal(), backend="triton")
    ref = attention_reference(q.double(), k.double(), v.double(), Causal())
    assert _rel(out, ref) < TOL[torch.float16]


def test_default_dispatch_and_can_run():
    from kernels.backends.triton_attention import can_run_triton

    q = torch.randn(1, 2, 16, 32, device=DEVICE, dtype=torch.float16)
    assert can_run_triton(q, q, q, Dense(), None, None, False)
    assert can_run_triton(q, q, q, Dense(), torch.randn(16, 16, device=DEVICE), None, False)
    big = kernels.LowRankBias(torch.randn(1, 1, 16, 65, device=DEVICE), torch.randn(1, 1, 16, 65, device=DEVICE))
    assert not can_run_triton(q, q, q, Dense(), big, None, False)
    with pytest.raises(NotImplementedError, match="rank"):
        kernels.attention(q, q, q, bias=big, backend="triton")
    assert not can_run_triton(q.double(), q.double(), q.double(), Dense(), None, None, False)
    # CPU tensors dispatch to the reference unless the triton backend is named
    out = kernels.attention(q.cpu().float(), q.cpu().float(), q.cpu().float())
    assert torch.allclose(out, attention_reference(q.cpu().float(), q.cpu().float(), q.cpu().float()))


def test_torch_compile_fullgraph():
    pattern = Neighborhood((4, 6), (3, 3))

    def f(q, k, v):  # the pattern is built inside the compiled code (as model layers do)
        return kernels.attention(q, k, v, Neighborhood((4, 6), (3, 3)), backend="triton").sum()

    q, k, v = [torch.randn(1, 2, 24, 16, device=DEVICE, dtype=torch.float16, requires_grad=True) for _ in range(3)]
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    q64, k64, v64 = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = attention_reference(q64, k64, v64, pattern).sum()
    rgrads = torch.autograd.grad(ref, (q64, k64, v64))
    assert abs(loss.item() - ref.item()) < 1e-2 * max(1.0, abs(ref.item()))
    for g, rg in zip(grads, rgrads):
        assert _rel(g, rg) < TOL[torch.float16]


@pytest.mark.parametrize("case", ["dense", "rel-pos"])
def test_torch_compile_dynamic_shapes(case):
    """torch.compile(dynamic=True, fullgraph=True): batch sizes (and, densely, lengths) change between calls
    without a failed trace. The rel-pos bias's check asked the pattern's density at the symbolic lengths, which
    `assume_constant_result` cannot take. The pattern is built inside the compiled code, as layers do (one that
    a plain function reaches through a closure arrives with symbolic ints: not supported)."""
    hb = Halo((4, 4), block=4, halo=1)
    tables = [(0.3 * torch.randn(11, 16, device=DEVICE)).requires_grad_() for _ in range(2)]

    def f(q, k, v):
        bias = kernels.RelPosBias(Halo((4, 4), block=4, halo=1), tables) if case == "rel-pos" else None
        return kernels.attention(q, k, v, bias=bias, backend="triton")

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=True)
    for B, nq, nk in ((2, 16, 36), (3, 16, 36)) if case == "rel-pos" else ((2, 20, 28), (3, 24, 40)):
        q, k, v = (torch.randn(B, 2, n, 16, device=DEVICE, requires_grad=True) for n in (nq, nk, nk))
        out = compiled(q, k, v)
        leaves = [q, k, v] + (tables if case == "rel-pos" else [])
        grads = torch.autograd.grad(out.square().sum(), leaves)
        l64 = [x.detach().double().requires_grad_() for x in leaves]
        ref = attention_reference(*l64[:3], bias=kernels.RelPosBias(hb, l64[3:]) if case == "rel-pos" else None)
        assert _rel(out, ref) < TOL[torch.float32]
        for g, rg in zip(grads, torch.autograd.grad(ref.square().sum(), l64)):
            assert _rel(g, rg) < TOL[torch.float32]


# ----------------------------------------------------------------------------------------------------------
# issue 4: bias (dense, low-rank, relative position), fused gate, skinny shapes, expanded k/v


def _dense_bias(shape, dtype=None, expand_to=None):
    def fn(make):
        leaf = make(*shape) if dtype is None else make(*shape, dtype=dtype)
        return (leaf if expand_to is None else leaf.expand(*expand_to)), [leaf]
    return fn


def _low_rank(qshape, kshape):
    def fn(make):
        qf, kf = make(*qshape), make(*kshape)
        return kernels.LowRankBias(qf, kf), [qf, kf]
    return fn


def _rel_pos(pattern, d):
    windows = [pattern.window] * len(pattern.grid) if isinstance(pattern, Halo) else list(pattern.window)

    def fn(make):
        tables = [make(2 * w - 1, d) for w in windows]
        return kernels.RelPosBias(pattern, tables, scale=0.2), tables
    return fn


BIAS_CASES = [  # (id, pattern, B, H, HKV, NQ, NK, D, DV, bias_fn)
    ("dense-bias-1hqk", Dense(), 2, 2, 1, 37, 45, 32, 32, _dense_bias((1, 2, 37, 45))),
    # full batch and heads: dS is written in the bias's dtype (no reduction)
    ("causal-bias-full", Causal(), 2, 2, 2, 37, 45, 32, 32, _dense_bias((2, 2, 37, 45))),
    ("causal-bias-2d", Causal(), 1, 2, 2, 29, 50, 32, 32, _dense_bias((29, 50))),
    ("window1d-bias-keypad", Window1d(6, 2), 2, 2, 2, 41, 41, 16, 16, _dense_bias((2, 1, 1, 41))),
    ("dense-bias-expanded-fp32", Dense(), 2, 2, 2, 33, 20, 16, 16,
     _dense_bias((1, 2, 1, 20), torch.float32, expand_to=(2, 2, 33, 20))),
    ("na2d-bias", Neighborhood((6, 7), (3, 5), dilation=(2, 1)), 1, 2, 1, 42, 42, 16, 16, _dense_bias((2, 42, 42))),
    ("halo-bias", Halo((4, 6), block=2, halo=1), 1, 2, 2, 24, 48, 16, 16, _dense_bias((1, 1, 24, 48))),
    ("dense-lowrank-r5", Dense(), 2, 2, 1, 37, 45, 32, 32, _low_rank((1, 2, 37, 5), (2, 1, 45, 5))),
    ("causal-lowrank-r16", Causal(), 1, 2, 2, 40, 40, 32, 32, _low_rank((1, 2, 40, 16), (1, 2, 40, 16))),
    ("na3d-lowrank-r3", Neighborhood((3, 4, 5), (3, 3, 3)), 1, 1, 1, 60, 60, 16, 16,
     _low_rank((1, 1, 60, 3), (1, 1, 60, 3))),
    ("relpos-halo-block", None, 3, 2, 2, 16, 64, 16, 16, _rel_pos(Halo((4, 4), block=4, halo=2), 16)),
    ("relpos-halo-grid-stride2", Halo((4, 4), block=4, halo=1, query_stride=2), 1, 2, 1, 16, 100, 16, 16,
     _rel_pos(Halo((4, 4), block=4, halo=1, query_stride=2), 16)),
    ("relpos-na2d-dil-causal", Neighborhood((6, 7), (3, 3), dilation=(1, 2), causal_axes=(0,)), 1, 2, 2, 42, 42,
     16, 16, _rel_pos(Neighborhood((6, 7), (3, 3), dilation=(1, 2), causal_axes=(0,)), 16)),
]


@pytest.mark.parametrize("case", BIAS_CASES, ids=[c[0] for c in BIAS_CASES])
def test_bias_forward_backward(case):
    *args, bias_fn = case[1:]
    _check(*args, torch.float16, bias_fn=bias_fn)


@pytest.mark.parametrize("d", [32, 128])
def test_lowrank_float32_chained(d):
    """float32 takes the pre-scaled chain (`LR_CHAIN` 1; head dims <= 128): 1 / scale rides on the query factor in
    the forward and dQ kernels and on the key factor in the dK/dV kernel."""
    from kernels.backends import triton_attention as ta

    assert ta.lr_chain(torch.empty(1, 1, 1, d), "loaded", d ** -0.5) == 1
    _check(Window1d(9, 4), 2, 2, 1, 70, 70, d, d, torch.float32, bias_fn=_low_rank((2, 2, 70, 16), (2, 1, 70, 16)))


def test_lowrank_chain_rule():
    """The pre-scaled chain (1) where pre-scaling a factor is exact and cannot overflow: 16-bit loaded factors
    only when 1 / scale is a power of two, never float16; the scaled sum (2) elsewhere up to head dim 128; past
    it loaded factors take two dots (0). The rel-pos factors always chain."""
    from kernels.backends.triton_attention import lr_chain

    def mode(d, dtype, factors="loaded", scale=None):
        return lr_chain(torch.empty(1, 1, 1, d, dtype=dtype), factors, d ** -0.5 if scale is None else scale)

    bf, f16, f32 = torch.bfloat16, torch.float16, torch.float32
    assert mode(64, bf) == mode(16, bf) == mode(128, bf, scale=0.125) == mode(128, f32) == 1
    assert mode(128, bf) == mode(32, bf) == mode(64, bf, scale=0.1) == mode(64, f16) == mode(128, f16) == 2
    assert mode(256, bf, scale=1 / 16) == mode(256, f16) == mode(256, f32) == mode(64, bf, factors=None) == 0
    assert mode(128, bf, factors="rel") == mode(256, f32, factors="rel") == 1
    assert mode(64, f16, factors="rel") == mode(256, f16, factors="rel") == 2
    for dtype in (bf, f16):
        with pytest.raises(ValueError, match="scale"):
            lr_chain(torch.empty(1, 1, 1, 64, dtype=dtype), "loaded")
    with pytest.raises(ValueError, match="factors"):
        lr_chain(torch.empty(1, 1, 1, 64, dtype=bf), "dense", 0.125)


CHAIN_CASES = [c for c in BIAS_CASES  # loaded factors; rel-pos in the few-keys kernels, and on the Halo grid
               if c[0] in ("causal-lowrank-r16", "relpos-halo-block", "relpos-halo-grid-stride2")]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("chain", [0, 1, 2])
@pytest.mark.parametrize("case", CHAIN_CASES, ids=[c[0] for c in CHAIN_CASES])
def test_lowrank_chain_modes(case, chain, dtype, monkeypatch):
    """Every `LR_CHAIN` mode, forced for loaded and rel-pos factors alike, against float64 (the rule picks one per
    dtype and scale, so the others would go untested here): two dots and a sum, the pre-scaled factor (one more
    rounding at D = 32, where 1 / scale is not a power of two: within these dtypes' tolerances), and q·kᵀ scaled
    before the factor dot."""
    from kernels.backends import triton_attention as ta

    seen = []

    def forced(q, factors, scale=None):
        seen.append(factors)
        return 0 if factors is None else chain

    monkeypatch.setattr(ta, "lr_chain", forced)
    *args, bias_fn = case[1:]
    _check(*args, dtype, bias_fn=bias_fn)
    assert {"loaded", "rel"} & set(seen), seen


def test_bias_float32_and_gate_together():
    _check(Causal(), 1, 2, 1, 30, 30, 32, 32, torch.float32, gate_shape=(1, 30, 2, 32),
           bias_fn=_dense_bias((1, 2, 30, 30)))


HALO_GRID_RELPOS = [  # (id, pattern, B, H, HKV, D, gate_shape(B, N, H))
    ("block2-halo1-gqa-elem-gate", Halo((4, 6), block=2, halo=1), 2, 2, 1, 16, lambda B, N, H: (B, N, H, 16)),
    ("block4-halo1-stride2-head-gate", Halo((4, 4), block=4, halo=1, query_stride=2), 1, 2, 2, 16,
     lambda B, N, H: (B, N, H)),
    ("block3-halo2-no-gate", Halo((6, 3), block=3, halo=2), 1, 1, 1, 32, None),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("route", ["kernel-in-place", "kernel-permuted", "lowrank"])
@pytest.mark.parametrize("case", HALO_GRID_RELPOS, ids=[c[0] for c in HALO_GRID_RELPOS])
def test_relpos_on_halo_grid(case, route, dtype, monkeypatch):
    """A RelPosBias on a multi-block Halo grid with GQA, gates and an lse gradient: out, lse and every gradient
    against float64; computed in the general kernels (`HAS_REL` on the grid: each slot's window shift and key
    classes from its grid coordinates; inputs in token order or permuted copies), or by the torch lowering to
    low-rank factors (ATTNZOO_RELPOS=lowrank). Asserts which path ran. float32 (and bfloat16 on a GPU) takes the
    pre-scaled factor dot (`LR_CHAIN` 1), float16 the scaled sum (2)."""
    from kernels.backends import triton_attention as ta

    _, pattern, B, H, HKV, D, gate_fn = case
    monkeypatch.setenv("ATTNZOO_RELPOS", "lowrank" if route == "lowrank" else "kernel")
    monkeypatch.setenv("ATTNZOO_GRID_INPUTS", "permuted" if route == "kernel-permuted" else "in-place")
    nq, nk = math.prod(pattern.grid), math.prod(pattern.key_grid)
    before = dict(ta.CALLS)
    _check(pattern, B, H, HKV, nq, nk, D, D, dtype, lse_grad=True, bias_fn=_rel_pos(pattern, D),
           gate_shape=None if gate_fn is None else gate_fn(B, nq, H))
    ran = {key for key, n in ta.CALLS.items() if n > before.get(key, 0)}
    in_kernel = {"general_fwd_rel", "general_bwd_rel", "general_bwd_rel_factor_loaded"}
    assert (ran & in_kernel) == (set() if route == "lowrank" else in_kernel), ran


DS_STORED_CASES = [  # (id, pattern, B, H, HKV, NQ, NK, D, bias_fn, dS from the dK/dV kernel's buffer, and with
    # it the dQ kernel of a batch of two writes the shared bias's gradient: `_attn_bwd_dq_pair`)
    ("dense-full-gqa", Dense(), 2, 4, 2, 37, 45, 32, _dense_bias((2, 4, 37, 45)), True, False),
    ("window-batch-broadcast-fp32", Window1d(6, 2), 3, 2, 2, 41, 41, 16, _dense_bias((1, 2, 41, 41), torch.float32),
     True, False),
    ("na2d-dil-head-broadcast", Neighborhood((6, 7), (3, 5), dilation=(2, 1)), 2, 2, 1, 42, 42, 16,
     _dense_bias((2, 1, 42, 42)), True, False),
    ("halo-grid", Halo((4, 6), block=2, halo=1), 2, 2, 2, 24, 48, 16, _dense_bias((2, 2, 24, 48)), True, False),
    # a bfloat16 bias under float16 q: a bfloat16 dS buffer would round dS twice, so dQ recomputes it
    ("bf16-bias-fp16-q", Dense(), 2, 2, 2, 30, 33, 16, _dense_bias((1, 2, 30, 33), torch.bfloat16), False, False),
    ("pair-dense-gqa", Dense(), 2, 4, 2, 37, 45, 32, _dense_bias((1, 4, 37, 45)), True, True),
    ("pair-causal-fp32-bias", Causal(), 2, 2, 2, 90, 90, 16, _dense_bias((1, 2, 90, 90), torch.float32), True,
     True),  # unvisited tiles keep a zero gradient
    ("pair-window-nq-ne-nk", Window1d(5, 9), 2, 2, 1, 70, 83, 16, _dense_bias((1, 2, 70, 83)), True, True),
    ("pair-few-queries-splits", Dense(), 2, 2, 2, 9, 300, 16, _dense_bias((1, 2, 9, 300)), True, True),
    ("pair-shared-by-heads", Dense(), 2, 2, 2, 33, 40, 16, _dense_bias((1, 1, 33, 40)), True, False),
]


@pytest.mark.parametrize("case", DS_STORED_CASES, ids=[c[0] for c in DS_STORED_CASES])
def test_bias_backward_dq_from_stored_ds(case, monkeypatch):
    """With a bias gradient, the general dQ kernel takes dS from the buffer the dK/dV kernel wrote (masked tiles
    included) instead of recomputing it; for a batch of two sharing a per-head bias it also writes the bias's
    gradient. Results against float64 either way."""
    from kernels.backends.triton_attention import CALLS

    monkeypatch.setenv("ATTNZOO_SKINNY", "old")  # these shapes would otherwise also fit the few-keys kernels
    _, pattern, B, H, HKV, NQ, NK, D, bias_fn, stored, pair = case
    before = dict(CALLS)
    _check(pattern, B, H, HKV, NQ, NK, D, D, torch.float16, bias_fn=bias_fn)
    assert (CALLS["general_dq_ds_stored"] > before.get("general_dq_ds_stored", 0)) == (stored and not pair)
    assert (CALLS["general_dq_pair_sum"] > before.get("general_dq_pair_sum", 0)) == pair


@pytest.mark.parametrize("g_shape,like_shape,g_dtype,like_dtype,streamed", [
    ((3, 2, 130, 260), (1, 2, 130, 260), torch.float32, torch.float16, True),  # batch-shared, float32 dS buffer
    ((2, 3, 120, 200), (1, 1, 120, 200), torch.bfloat16, torch.bfloat16, True),  # shared by batch and heads
    ((1, 3, 120, 200), (1, 1, 120, 200), torch.float16, torch.float16, True),  # one image, heads shared
    ((2, 3, 120, 200), (2, 1, 120, 200), torch.float16, torch.float16, False),  # heads only: torch's sum
    ((2, 3, 4, 5), (1, 3, 4, 5), torch.float16, torch.float16, False),  # small: torch's sum
])
def test_bias_gradient_sum_over_broadcast_dims(g_shape, like_shape, g_dtype, like_dtype, streamed):
    """`_reduce_to` (the bias gradient summed where the bias broadcasts) against a float64 sum: within one unit in
    the last place of the output dtype (float32 accumulation; Triton's interpreter also truncates to bfloat16);
    leading dims through the streaming kernel."""
    from kernels.backends.triton_attention import CALLS, _reduce_to

    before = CALLS["bias_grad_sum_leading"]
    g = torch.randn(*g_shape, device=DEVICE).to(g_dtype)
    like = torch.empty(like_shape, device=DEVICE, dtype=like_dtype)
    dims = [i for i, (a, b) in enumerate(zip(like_shape, g_shape)) if a == 1 and b != 1]
    ref = g.double().sum(dim=dims, keepdim=True)
    out = _reduce_to(g, like)
    assert out.shape == like.shape and out.dtype == like_dtype
    ulp = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}[like_dtype]
    torch.testing.assert_close(out.double(), ref, rtol=ulp, atol=1e-6)
    assert (CALLS["bias_grad_sum_leading"] > before) == streamed


@pytest.mark.parametrize("pattern", [Window1d(4, 4), Neighborhood((5, 6), (3, 3))], ids=["window1d", "na2d"])
@pytest.mark.parametrize("kind", ["head", "element"])
def test_gate_fused(kind, pattern):
    B, H, N, D = 2, 2, 30, 32
    shape = (B, N, H) if kind == "head" else (B, N, H, D)
    _check(pattern, B, H, H, N, N, D, D, torch.float16, gate_shape=shape)


@pytest.mark.parametrize("case", [("fused", Window1d(4, 4), 40, 40), ("split", Dense(), 10, 300),
                                  ("few-keys", Dense(), 200, 20)], ids=lambda c: c[0])
@pytest.mark.parametrize("kind", ["head", "element"])
def test_gate_saturates(kind, case, monkeypatch):
    """Gate logits far past sigmoid's float32 range (2^(-g log2 e) overflows for g < -88.7) and +-inf: every output
    element is the ungated kernel's times sigmoid(g) (float64) to float32 precision, no inf or NaN. Each case's
    gate runs in the epilogue it names (`_attn_fwd`, the split merge, `_keys_fwd`)."""
    from kernels.backends import triton_combine
    from kernels.backends.triton_attention import CALLS

    merged, combine = [], triton_combine.combine_splits
    monkeypatch.setattr(triton_combine, "combine_splits",
                        lambda out, lse, gate=None, dtype=torch.float32: merged.append(gate is not None)
                        or combine(out, lse, gate, dtype))
    few_keys = sum(n for name, n in CALLS.items() if name.startswith("keys_fwd"))
    path, pattern, NQ, NK = case
    B, H, D = 1, 2, 16
    q, k, v = (_rand(B, H, n, D, dtype=torch.float32, grad=False) for n in (NQ, NK, NK))
    values = torch.tensor([-float("inf"), -1e4, -120.0, -88.0, -30.0, -3.0, 0.0, 3.0, 30.0, 88.0, 120.0, 1e4,
                           float("inf")], device=DEVICE)
    shape = (B, NQ, H) if kind == "head" else (B, NQ, H, D)
    gate = values[torch.randint(len(values), shape, device=DEVICE)]
    out = kernels.attention(q, k, v, pattern, gate=gate, backend="triton")
    ran = "few-keys" if sum(n for name, n in CALLS.items() if name.startswith("keys_fwd")) > few_keys else \
        "split" if merged == [True] else "fused" if not merged else merged
    assert ran == path
    plain = kernels.attention(q, k, v, pattern, backend="triton")
    sig = torch.sigmoid(gate.double().transpose(1, 2))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), plain.double() * (sig[..., None] if kind == "head" else sig),
                               rtol=2e-6, atol=1e-30)
    ref = attention_reference(q.double(), k.double(), v.double(), pattern, gate=gate.double())
    assert _rel(out, ref) < TOL[torch.float32]


@triton.jit
def _gated_output_kernel(ACC, DEN, G, OUT, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(OUT + i, gated_output(tl.load(ACC + i), tl.load(DEN + i), tl.load(G + i)))


def test_gated_output_against_float64():
    """`gated_output` (one EX2, the reciprocal by Newton steps from a bit-trick seed) against float64
    acc * sigmoid(g) / den, with den over [1, 2^24] (a row's softmax sum) and g over sigmoid's float32 range and
    past it: within float32 rounding, plus what rounding g * log2 e (and log2 e) costs any exp2-based sigmoid,
    ~1.2 |g| 2^-24 relative (bound: |g| 2^-23); saturated elements (sigmoid < 2^-125) within 1e-37; NaN stays
    NaN."""
    n = 4096
    special = torch.tensor([-math.inf, math.inf, -1e4, 1e4, -120.0, 120.0, -88.8, 88.8, -86.0, 0.0, math.nan])
    g = torch.cat([torch.empty(n - len(special)).uniform_(-90.0, 90.0), special]).to(DEVICE)
    acc = torch.randn(n, device=DEVICE)
    den = torch.exp2(torch.rand(n, device=DEVICE) * 24)
    out = torch.empty_like(acc)
    _gated_output_kernel[(1,)](acc, den, g, out, N=n)
    ref = acc.double() * torch.sigmoid(g.double()) / den.double()
    nan = torch.isnan(g)
    assert torch.isnan(out[nan]).all() and torch.isfinite(out[~nan]).all()
    err = (out.double() - ref).abs()[~nan]
    bound = (5e-7 + g.double().abs().clamp(max=128.0) * 2.0 ** -23)[~nan] * ref.abs()[~nan] + 1e-37
    assert (err <= bound).all(), f"worst: g {g[~nan][(err / bound).argmax()].item()}, err / bound {(err / bound).max()}"


SKINNY = [  # few keys (dK/dV split over query blocks), few queries (forward and dQ split over key blocks)
    ("few-keys", Dense(), 1, 2, 2, 200, 20, 32, 32),
    ("few-keys-gqa-causal", Causal(), 1, 4, 2, 150, 40, 16, 16),
    ("few-queries", Dense(), 1, 2, 1, 10, 300, 32, 32),
    ("few-queries-window", Window1d(100, 40), 1, 2, 2, 7, 260, 16, 16),
]


@pytest.mark.parametrize("case", SKINNY, ids=[c[0] for c in SKINNY])
def test_skinny_split_paths(case):
    from kernels.backends.triton_attention import _splits

    _, pattern, B, H, HKV, NQ, NK, D, DV = case
    _check(pattern, B, H, HKV, NQ, NK, D, DV, torch.float16, gate_shape=(B, NQ, H),
           bias_fn=_low_rank((1, H, NQ, 4), (1, 1, NK, 4)))
    # the split paths are taken here (the interpreter counts 4 multiprocessors)
    dev = torch.device(DEVICE)
    if DEVICE == "cpu":
        if NK < NQ:
            assert _splits(-(-NK // 32) * B * HKV, -(-NQ // 16), dev, 4)[0] > 1
        else:
            assert _splits(-(-NQ // 32) * B * H, -(-NK // 16), dev)[0] > 1


def test_skinny_agent_steps_with_dense_bias():
    # agent attention: agents x keys (few queries) then queries x agents (few keys), each with a dense bias
    _check(Dense(), 2, 2, 2, 9, 120, 16, 16, torch.float16, bias_fn=_dense_bias((1, 2, 9, 120)))
    _check(Dense(), 2, 2, 2, 120, 9, 16, 16, torch.float16, bias_fn=_dense_bias((1, 2, 120, 9)))


def test_expanded_key_value():
    # probes pass one key/value tensor broadcast across heads (stride 0)
    def kv_fn(k, v):
        return k.expand(-1, 3, -1, -1), v.expand(-1, 3, -1, -1)

    _check(Dense(), 2, 3, 1, 20, 40, 16, 16, torch.float16, kv_fn=kv_fn)


def test_factorized_bias_errors():
    q = torch.randn(1, 2, 16, 8)
    with pytest.raises(ValueError, match="q_factor"):
        kernels.attention(q, q, q, bias=kernels.LowRankBias(torch.randn(1, 2, 15, 4), torch.randn(1, 2, 16, 4)))
    with pytest.raises(ValueError, match="rank"):
        kernels.LowRankBias(torch.randn(1, 2, 16, 4), torch.randn(1, 2, 16, 3))
    halo = Halo((4, 4), block=2, halo=1)
    with pytest.raises(ValueError, match="tables"):
        kernels.RelPosBias(halo, [torch.randn(7, 8), torch.randn(6, 8)])
    bias = kernels.RelPosBias(halo, [torch.randn(7, 8), torch.randn(7, 8)])
    kq, kk = torch.randn(1, 2, 16, 8), torch.randn(1, 2, 36, 8)
    with pytest.raises(ValueError, match="pattern"):  # a multi-block Halo bias needs its pattern
        kernels.attention(kq, kk, kk, bias=bias)
    assert kernels.attention(kq, kk, kk, halo, bias=bias).shape == (1, 2, 16, 8)


# ----------------------------------------------------------------------------------------------------------
# grid patterns, pair-mask path (per-pair mask bits, key bias for padding / dead slots, tiles of any shape)

NEW_GRID_CASES = [
    ("na3d-whole-time-dead-slots", Neighborhood((5, 4, 6), (5, 3, 3)), 1, 2, 1, 120, 120, 16, 16),
    ("na3d-time-padded", Neighborhood((7, 6, 8), (7, 3, 3)), 1, 1, 1, 336, 336, 16, 16),
    ("na2d-full-pairs-bwd", Neighborhood((8, 16), (7, 15)), 1, 2, 2, 128, 128, 32, 32),
    ("na2d-full-pairs-fwd", Neighborhood((16, 16), (9, 9)), 1, 1, 1, 256, 256, 16, 16),
]
GRID_CASES = [c for c in CASES if isinstance(c[1], (Neighborhood, Halo))] + NEW_GRID_CASES
PAIR_RUNS = ([(c, torch.float16, "pair") for c in GRID_CASES] + [(c, DTYPES[1], "pair") for c in NEW_GRID_CASES]
             + [(c, torch.float16, "pairp2") for c in NEW_GRID_CASES])


@pytest.mark.parametrize("case,dtype,variant", PAIR_RUNS, ids=[f"{c[0]}-{str(d)[6:]}-{v}" for c, d, v in PAIR_RUNS])
def test_grid_pair_mask_matches_reference(case, dtype, variant, monkeypatch):
    monkeypatch.setenv("ATTNZOO_GRID_VARIANTS", variant)
    _check(*case[1:], dtype)


def test_pair_cases_cover_the_new_paths():
    """The interpreter blocks (forward 32x16, backward 16x32) take the pair paths these tests mean to cover:
    dead slots (a 5-frame axis whole in a tile), padded keys, full pairs, key-bias-only pairs, 1- and 2-axis
    masks."""
    from kernels.backends.triton_attention import _bwd_candidates, _fwd_candidates, _Problem

    fwd, bwd = _fwd_candidates(16, 16)[0], _bwd_candidates(16, 16)[0]
    dev = torch.device(DEVICE)
    bits, dead, full = set(), False, 0
    for case in NEW_GRID_CASES:
        for cfg in (fwd, bwd):
            for variant in ("pair", "pairp2"):
                prob = _Problem(case[1], 0, 0, cfg[0], cfg[1], dev, variant)
                assert prob.pair_mask
                tm = prob.map
                dead |= tm.k_layout.slot_size > tm.k_layout.tile_size
                full += tm.pairs_full
                bits |= set(tm.fwd_bits.tolist())
    assert dead and full > 0
    assert 8 in bits and any(b & 7 and not b & 8 for b in bits) and any(bin(b & 7).count("1") == 2 for b in bits)
    prob = _Problem(NEW_GRID_CASES[0][1], 0, 0, bwd[0], bwd[1], dev, "pair")
    assert prob.map.q_layout.tile[0] == prob.map.k_layout.tile[0] == 5  # tiles that are not a power of two


PAIR_FEATURE_CASES = [c for c in BIAS_CASES if isinstance(c[1], (Neighborhood, Halo))]


@pytest.mark.parametrize("case", PAIR_FEATURE_CASES, ids=[c[0] for c in PAIR_FEATURE_CASES])
def test_grid_pair_mask_with_bias(case, monkeypatch):
    monkeypatch.setenv("ATTNZOO_GRID_VARIANTS", "pair")
    *args, bias_fn = case[1:]
    _check(*args, torch.float16, bias_fn=bias_fn)


def test_grid_pair_mask_gate_and_lse_gradient(monkeypatch):
    monkeypatch.setenv("ATTNZOO_GRID_VARIANTS", "pair")
    _check(Neighborhood((5, 6, 7), (5, 3, 3)), 1, 2, 1, 210, 210, 16, 16, torch.float16, gate_shape=(1, 210, 2, 16),
           lse_grad=True)


def test_grid_variant_env(monkeypatch):
    from kernels.backends.triton_attention import _grid_variants, _with_tile_costs

    monkeypatch.setenv("ATTNZOO_GRID_VARIANTS", "pair,old")
    monkeypatch.setenv("ATTNZOO_GRID_INPUTS", "in-place")
    cands = _with_tile_costs(Neighborhood((5, 6), (3, 3)), [(64, 64, 4, 3), (128, 64, 4, 3)])
    assert cands[0] == (64, 64, 4, 3, "pair", True) and (128, 64, 4, 3, 1.25, True) in cands and len(cands) == 6
    assert _with_tile_costs(Dense(), [(64, 64, 4, 3)]) == [(64, 64, 4, 3)]
    monkeypatch.setenv("ATTNZOO_GRID_VARIANTS", "new")
    with pytest.raises(ValueError, match="ATTNZOO_GRID_VARIANTS"):
        _grid_variants()


def test_short_loop_candidates(monkeypatch):
    """32- and 16-key forward tiles are tried where programs visit a few key tiles (Halo windows, <= 256 keys) at head
    dims <= 64, and nowhere else; with rel-pos also under the register caps that fit its prologue."""
    from kernels.backends import triton_attention as ta

    monkeypatch.setattr(ta, "_interpret", lambda: False)
    base = [(64, 64, 4, 3), (64, 32, 4, 3)]
    narrow = [(64, 64, 4, 3), (64, 32, 4, 3), (64, 32, 4, 2, 128), (64, 16, 4, 3), (64, 16, 4, 3, 72)]
    capped = narrow + [(64, 16, 4, 2, 80), (64, 16, 4, 3, 80), (64, 32, 4, 3, 96)]
    assert ta._short_loop_candidates(base, Halo((64, 64), 8, 2), 64, 64, 4096) == narrow
    assert ta._short_loop_candidates(base, Halo((64, 64), 8, 2), 64, 64, 4096, rel=True) == capped
    assert ta._short_loop_candidates(base, Dense(), 64, 64, 4096, rel=True) == base
    assert ta._short_loop_candidates(base, Halo((64, 64), 8, 2), 48, 32, 4096) == narrow
    assert ta._short_loop_candidates(base, None, 64, 64, 144) == narrow
    assert ta._short_loop_candidates(base, Dense(), 64, 64, 4096) == base
    assert ta._short_loop_candidates(base, Window1d(64, 64), 64, 64, 4096) == base
    assert ta._short_loop_candidates(base, Halo((64, 64), 8, 2), 64, 128, 4096) == base


# ----------------------------------------------------------------------------------------------------------
# dispatch plumbing: the eager autograd.Function twin of the custom ops, and the untuned config fallback


def test_eager_twin_matches_custom_op():
    """Eager calls go through `_AttentionFunction` (no dispatcher); it must give the custom op's outputs and
    gradients exactly (same kernels), with a dense bias and a gate so every gradient slot is exercised."""
    from kernels.backends import triton_attention as ta

    pattern = Neighborhood((5, 6), (3, 3))
    mk = lambda *s: torch.randn(*s, device=DEVICE, dtype=torch.float32, requires_grad=True)  # noqa: E731
    q, k, v, bias, gate = mk(1, 2, 30, 16), mk(1, 2, 30, 16), mk(1, 2, 30, 16), mk(1, 2, 30, 30), mk(1, 30, 2)
    key = kernels.patterns.pattern_key(pattern)
    w = torch.randn(1, 2, 30, 16, device=DEVICE)
    results = []
    for fn in (ta._AttentionFunction.apply, ta._attention_fwd_op):
        out, lse = fn(q, k, v, bias, None, None, gate, key, 0.25)
        grads = torch.autograd.grad((out * w).sum() + lse.sum(), (q, k, v, bias, gate))
        results.append((out, lse) + grads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_eager_call_bypasses_dispatcher(monkeypatch):
    from kernels.backends import triton_attention as ta

    calls = []
    real = ta._attention_fwd_op
    monkeypatch.setattr(ta, "_attention_fwd_op", lambda *a: calls.append(1) or real(*a))
    q = torch.randn(1, 2, 20, 16, device=DEVICE, dtype=torch.float16)
    out = kernels.attention(q, q, q, backend="triton")
    assert calls == [] and _rel(out.double(), attention_reference(q.double(), q.double(), q.double())) < 2e-3


@pytest.fixture
def fake_gpu_launches(monkeypatch):
    """The autotuner as on a GPU, with launches replaced: returns (run, tried) where run(cfg) records cfg and
    raises OutOfResources (over the H200's shared memory) for the configs named "big"."""
    from triton.runtime.errors import OutOfResources

    from kernels.backends import triton_attention as ta

    monkeypatch.setattr(ta, "_interpret", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    tried = []

    def run(cfg):
        tried.append(cfg)
        if cfg == "big":
            raise OutOfResources(335872, 232448, "shared memory")

    return run, tried


def test_untuned_autotune_skips_configs_that_do_not_fit(monkeypatch, fake_gpu_launches):
    """ATTNZOO_AUTOTUNE=0 takes the first candidate that launches (a config over the GPU's shared memory raises
    OutOfResources at launch), and remembers it."""
    from kernels.backends import triton_attention as ta

    run, tried = fake_gpu_launches
    monkeypatch.setenv("ATTNZOO_AUTOTUNE", "0")
    key = ("test-untuned", os.urandom(4))
    assert ta._autotune(key, ["big", "small", "other"], run) == "small"
    assert tried == ["big", "small"] and ta._BEST.pop(key) == "small"
    with pytest.raises(RuntimeError, match="no kernel config"):
        ta._autotune(("test-untuned-none",), ["big", "big"], run)


def test_warm_shard_compiles_only_its_share_untimed(monkeypatch, fake_gpu_launches):
    """ATTNZOO_WARM=i/n (scripts/warm_triton_cache.py): shard i launches the candidates with index i mod n once
    (no timing), skips those that do not fit, and keeps the first that launched; a malformed spec is an error."""
    from kernels.backends import triton_attention as ta

    run, tried = fake_gpu_launches
    monkeypatch.setenv("ATTNZOO_WARM", "1/3")
    key = ("test-warm", os.urandom(4))
    assert ta._autotune(key, ["c0", "big", "c2", "c3", "c4", "c5", "c6", "c7"], run) == "c4"
    assert tried == ["big", "c4", "c7"] and ta._BEST.pop(key) == "c4"
    for bad in ("3/3", "x", "1/"):
        monkeypatch.setenv("ATTNZOO_WARM", bad)
        with pytest.raises(ValueError, match="ATTNZOO_WARM"):
            ta._autotune(("test-warm-bad", bad), ["a", "b"], run)


@pytest.mark.parametrize("inputs", ["in-place", "permuted"])
@pytest.mark.parametrize("variant", ["pair", "old"])
def test_grid_reads_tokens_in_place(variant, inputs, monkeypatch):
    """In place, the grid kernels read q/k/v (and o, dO, lse) and write o/lse and dq/dk/dv in token order through
    the tiles' row tables (no permuted copy, forward or backward); permuted, from copies in tile order. Strided
    (B, N, H, D) views, a padded grid with dead slots, GQA, an lse gradient; poisoned outputs (every gradient row
    written)."""
    from kernels import tiles

    monkeypatch.setenv("ATTNZOO_GRID_VARIANTS", variant)
    monkeypatch.setenv("ATTNZOO_GRID_INPUTS", inputs)
    monkeypatch.setenv("ATTNZOO_KERNEL_POISON", "1")
    pattern = Neighborhood((5, 7), (3, 5))
    xq = torch.randn(2, 35, 4, 16, device=DEVICE, dtype=torch.float16, requires_grad=True)
    xkv = torch.randn(2, 35, 2, 2, 16, device=DEVICE, dtype=torch.float16, requires_grad=True)
    q, k, v = xq.transpose(1, 2), xkv[:, :, 0].transpose(1, 2), xkv[:, :, 1].transpose(1, 2)
    assert not q.is_contiguous() and not k.is_contiguous()
    permuted = []
    real_permute = tiles.GridLayout.permute
    monkeypatch.setattr(tiles.GridLayout, "permute",
                        lambda self, x: permuted.append(tuple(x.shape)) or real_permute(self, x))
    out, lse = kernels.attention(q, k, v, pattern, return_lse=True, backend="triton")
    assert (permuted == []) == (inputs == "in-place")
    do, dlse = torch.randn_like(out), torch.randn_like(lse)
    grads = torch.autograd.grad((out * do).sum() + (lse * dlse).sum(), (xq, xkv))
    assert (permuted == []) == (inputs == "in-place")
    x64 = [x.detach().double().requires_grad_() for x in (xq, xkv)]
    q64, k64, v64 = x64[0].transpose(1, 2), x64[1][:, :, 0].transpose(1, 2), x64[1][:, :, 1].transpose(1, 2)
    ro, rl = attention_reference(q64, k64, v64, pattern, return_lse=True)
    rgrads = torch.autograd.grad((ro * do.double()).sum() + (rl * dlse.double()).sum(), x64)
    assert out.shape == (2, 4, 35, 16) and lse.shape == (2, 4, 35)
    assert _rel(out, ro) < TOL[torch.float16]
    assert (lse.double() - rl).abs().max() < LSE_TOL[torch.float16]
    for name, g, rg in zip(("dq", "dkv"), grads, rgrads):
        assert torch.isfinite(g).all(), f"{name} not fully written"
        assert _rel(g, rg) < TOL[torch.float16], name


def test_grid_candidates_time_their_copies(monkeypatch):
    """What the tuner times per candidate is the whole call in token order: a permuted backward config's runs copy
    the inputs into tile order and the gradients (dq, dk, dv, the bias's and the gate's) back out; an in-place one
    copies nothing."""
    from kernels import tiles
    from kernels.backends import triton_attention as ta

    monkeypatch.setenv("ATTNZOO_GRID_VARIANTS", "pair")
    calls = []
    for name in ("permute", "unpermute"):
        real = getattr(tiles.GridLayout, name)
        monkeypatch.setattr(tiles.GridLayout, name, lambda self, x, _n=name, _f=real: calls.append(_n) or _f(self, x))
    seen = {}

    def every_candidate(key, candidates, run):
        candidates = candidates() if callable(candidates) else candidates
        if key[0] == "bwd":
            for cfg in candidates:
                calls.clear()
                grads = run(cfg)
                seen[cfg[-1]] = (calls.count("permute"), calls.count("unpermute"), grads[0].shape)
        return candidates[0]

    monkeypatch.setattr(ta, "_autotune", every_candidate)
    q, k, v = (_rand(1, 2, 35, 16, dtype=torch.float16) for _ in "qkv")
    bias, gate = _rand(1, 2, 35, 35, dtype=torch.float16), _rand(1, 35, 2, dtype=torch.float16)
    out = kernels.attention(q, k, v, IN_PLACE_GRID, bias=bias, gate=gate, backend="triton")
    torch.autograd.grad(out.sum(), (q, k, v, bias, gate))
    assert seen[True] == (0, 0, (1, 2, 35, 16))
    permutes, unpermutes, shape = seen[False]
    assert shape == (1, 2, 35, 16) and permutes >= 5 and unpermutes >= 5  # dq, dk, dv, dbias (2 axes), dgate


IN_PLACE_GRID = Neighborhood((5, 7), (3, 5))  # padded tiles and dead slots at the interpreter's blocks
IN_PLACE_EXTRAS = [  # (id, kwargs of _check): every optional input the grid kernels read through the row tables
    ("gate-element", dict(gate_shape=(2, 35, 4, 16))),
    ("gate-head", dict(gate_shape=(2, 35, 4))),
    ("bias-per-head", dict(bias_fn=_dense_bias((1, 4, 35, 35)))),
    ("bias-key-row", dict(bias_fn=_dense_bias((2, 1, 1, 35)))),
    ("low-rank", dict(bias_fn=_low_rank((2, 1, 35, 3), (1, 4, 35, 3)))),
    ("rel-pos", dict(bias_fn=_rel_pos(IN_PLACE_GRID, 16))),
]


@pytest.mark.parametrize("inputs", ["in-place", "permuted"])
@pytest.mark.parametrize("variant", ["pair", "old"])
@pytest.mark.parametrize("extra", IN_PLACE_EXTRAS, ids=[e[0] for e in IN_PLACE_EXTRAS])
def test_grid_forward_extras_in_token_order(extra, variant, inputs, monkeypatch):
    """Gate, dense bias (broadcast or per head), low-rank factors and rel-pos on a padded grid with GQA, read in
    token order or from permuted copies, forward and backward; against float64."""
    monkeypatch.setenv("ATTNZOO_GRID_VARIANTS", variant)
    monkeypatch.setenv("ATTNZOO_GRID_INPUTS", inputs)
    _check(IN_PLACE_GRID, 2, 4, 2, 35, 35, 16, 16, torch.float16, **extra[1])


def test_grid_input_modes_are_candidates(monkeypatch):
    """Both input modes are candidates, forward and backward alike (in place first: the untuned default); a bad
    ATTNZOO_GRID_INPUTS is refused by name."""
    from kernels.backends import triton_attention as ta

    cands = [(64, 64, 4, 3)]
    monkeypatch.setenv("ATTNZOO_GRID_VARIANTS", "pair")
    assert ta._with_tile_costs(IN_PLACE_GRID, cands) == [(64, 64, 4, 3, "pair", True), (64, 64, 4, 3, "pair", False)]
    monkeypatch.setenv("ATTNZOO_GRID_INPUTS", "permuted")
    assert ta._with_tile_costs(IN_PLACE_GRID, cands) == [(64, 64, 4, 3, "pair", False)]
    assert ta._with_tile_costs(Dense(), cands) == cands
    monkeypatch.setenv("ATTNZOO_GRID_INPUTS", "copies")
    with pytest.raises(ValueError, match="ATTNZOO_GRID_INPUTS"):
        ta._with_tile_costs(IN_PLACE_GRID, cands)


def test_tune_key_tells_bias_dtype_and_batch_sharing():
    """Configs are tuned per bias dtype (it decides whether the dQ kernel reads the stored dS back) and per batch
    sharing (the dK/dV kernel's batch-minor order): each gets its own tune key, a repeat call the same one."""
    from kernels.backends import triton_attention as ta

    q = torch.zeros(2, 4, 8, 16, dtype=torch.bfloat16)
    feats = {(dt, b): ta._feats(torch.zeros(b, 4, 8, 8, dtype=dt), None, None, q)
             for dt in (torch.bfloat16, torch.float32) for b in (1, 2)}
    assert len(set(feats.values())) == 4
    assert feats[(torch.bfloat16, 1)] == ta._feats(torch.ones(1, 4, 8, 8, dtype=torch.bfloat16), None, None, q)
    assert ta._feats(None, None, None, q)[0] == ""


def test_inputs_past_int32_rows_are_copied(monkeypatch):
    """The kernels index rows in int32: a strided view whose row offsets pass 2^31 (a packed qkv projection of a
    long sequence) is copied before launch, on the 1-d, grid (in place or permuted) and skinny paths alike. The
    limit is lowered here so a small strided view crosses it."""
    from kernels.backends import triton_attention as ta

    x = torch.randn(1, 35, 3, 2, 16, device=DEVICE, dtype=torch.float16)
    q, k, v = (x[:, :, i].transpose(1, 2) for i in range(3))  # row stride 3 * 2 * 16 = 96
    assert ta._lastdim_contiguous(q) is q
    monkeypatch.setattr(ta, "_ROW_OFFSET_LIMIT", 34 * 96 + 16 - 1)  # the last row ends one past the limit
    assert not ta._rows_fit_int32(q) and ta._rows_fit_int32(q.contiguous())
    assert ta._lastdim_contiguous(q).is_contiguous()
    for pattern, inputs in [(IN_PLACE_GRID, "in-place"), (IN_PLACE_GRID, "permuted"), (Causal(), "in-place")]:
        monkeypatch.setenv("ATTNZOO_GRID_INPUTS", inputs)
        out = kernels.attention(q, k, v, pattern, backend="triton")
        ref = attention_reference(q.double(), k.double(), v.double(), pattern)
        assert _rel(out, ref) < TOL[torch.float16]


@pytest.mark.parametrize("pattern", [Dense(), IN_PLACE_GRID], ids=["dense", "grid"])
def test_register_capped_configs(pattern, monkeypatch):
    """A config's optional register cap (after a grid pattern's variant and input mode) reaches every general
    kernel launch as `maxnreg`, and leaves the result unchanged: the capped candidates compete in the autotuner."""
    from kernels.backends import triton_attention as ta
    from kernels.backends import triton_kernels as tk

    monkeypatch.setattr(ta, "_fwd_candidates", lambda d, dv: [(32, 16, 4, 1, 128)])
    monkeypatch.setattr(ta, "_bwd_candidates", lambda d, dv: [(16, 32, 4, 1, 168)])
    monkeypatch.setenv("ATTNZOO_GRID_VARIANTS", "pair")
    monkeypatch.setenv("ATTNZOO_SKINNY", "old")  # 35 keys: the general kernels, not the few-keys ones
    caps = {}
    kernel_type = type(tk._attn_fwd)  # JITFunction, or the interpreter's stand-in
    run = kernel_type.run

    def recording_run(self, *args, **kwargs):
        caps.setdefault(self.fn.__name__, set()).add(kwargs.get("maxnreg"))
        return run(self, *args, **kwargs)

    monkeypatch.setattr(kernel_type, "run", recording_run)
    n = 35
    _check(pattern, 2, 4, 2, n, n, 16, 16, torch.float16, gate_shape=(2, n, 4))
    assert caps["_attn_fwd"] == {128}
    assert caps["_attn_bwd_dkdv"] == caps["_attn_bwd_dq"] == {168}
    assert caps["_bwd_delta"] == {None}
    cfg = ta._with_tile_costs(pattern, [(32, 16, 4, 1, 128)])[0]
    prob = ta._problem(pattern, n, n, cfg, torch.device(DEVICE))
    assert ta._launch_opts(cfg, prob) == dict(num_warps=4, num_stages=1, maxnreg=128)
    assert ta._launch_opts(cfg[:-1], prob) == dict(num_warps=4, num_stages=1)


@pytest.mark.parametrize("pattern", [Dense(), IN_PLACE_GRID], ids=["dense", "grid"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("cap", [(), (128,)], ids=["uncapped", "capped"])
def test_qreg_configs(pattern, dtype, cap, monkeypatch):
    """A forward config's `QREG` flag (after a register cap, if any) reaches `_attn_fwd` as Q_IN_REGS for 16-bit
    inputs only, the cap still as `maxnreg`, and the forward with q (and a loaded low-rank factor) taken from
    registers matches the float64 reference, gate and gradients included."""
    from kernels.backends import triton_attention as ta
    from kernels.backends import triton_kernels as tk

    cfg = (32, 16, 4, 1) + cap + (ta.QREG,)
    monkeypatch.setattr(ta, "_fwd_candidates", lambda d, dv: [cfg])
    monkeypatch.setenv("ATTNZOO_GRID_VARIANTS", "pair")
    monkeypatch.setenv("ATTNZOO_SKINNY", "old")  # 35 keys: the general kernels, not the few-keys ones
    launches = []
    kernel_type = type(tk._attn_fwd)
    run = kernel_type.run

    def recording_run(self, *args, **kwargs):
        if self.fn.__name__ == "_attn_fwd":
            launches.append((kwargs.get("Q_IN_REGS"), kwargs.get("maxnreg"), kwargs.get("HAS_LR")))
        return run(self, *args, **kwargs)

    monkeypatch.setattr(kernel_type, "run", recording_run)
    n = 35
    _check(pattern, 2, 4, 2, n, n, 16, 16, dtype, gate_shape=(2, n, 4, 16),
           bias_fn=_low_rank((1, 4, n, 8), (2, 1, n, 8)))
    assert launches and set(launches) == {(dtype != torch.float32, cap[0] if cap else None, True)}
    grid_cfg = ta._with_tile_costs(pattern, [cfg])[0]
    prob = ta._problem(pattern, n, n, grid_cfg, torch.device(DEVICE))
    assert ta._config_options(grid_cfg, prob.grid) == (cap[0] if cap else None, True)
    assert ta._config_options(grid_cfg[:-1], prob.grid) == (cap[0] if cap else None, False)
