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

import kernels  # noqa: E402
from kernels import Causal, Dense, Halo, Neighborhood, Window1d  # noqa: E402
from kernels.backends.reference import attention_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# relative error bounds (‖x - ref‖ / ‖ref‖) per dtype, for out and for dq/dk/dv
TOL = {torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float32: 1e-4 if DEVICE == "cpu" else 1e-3}
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
    ("na3d-causal-dil", Neighborhood((4, 5, 6), (2, 3, 3), dilation=(1, 1, 2), causal_axes=(0,)), 1, 1, 1, 120,
     120, 16, 16),
    ("halo", Halo((4, 6), block=2, halo=1), 1, 2, 2, 24, 48, 16, 16),
]


def _rel(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


def _check(pattern, B, H, HKV, NQ, NK, D, DV, dtype, gate_shape=None, lse_grad=False):
    q = torch.randn(B, H, NQ, D, device=DEVICE, dtype=dtype, requires_grad=True)
    k = torch.randn(B, HKV, NK, D, device=DEVICE, dtype=dtype, requires_grad=True)
    v = torch.randn(B, HKV, NK, DV, device=DEVICE, dtype=dtype, requires_grad=True)
    gate = None if gate_shape is None else torch.randn(*gate_shape, device=DEVICE, dtype=dtype, requires_grad=True)
    scale = 0.5 / math.sqrt(D)
    out, lse = kernels.attention(q, k, v, pattern, gate=gate, scale=scale, return_lse=True, backend="triton")
    do = torch.randn_like(out)
    dlse = torch.randn_like(lse) if lse_grad else None
    leaves = (q, k, v) + (() if gate is None else (gate,))
    finite_lse = torch.isfinite(lse.detach())
    loss_terms = [(out * do).sum()]
    if lse_grad:
        loss_terms.append((torch.where(finite_lse, lse, 0.0) * dlse).sum())
    grads = torch.autograd.grad(sum(loss_terms), leaves)

    leaves64 = [x.detach().double().requires_grad_() for x in leaves]
    gate64 = leaves64[3] if gate is not None else None
    ro, rl = attention_reference(*leaves64[:3], pattern, gate=gate64, scale=scale, return_lse=True)
    ref_terms = [(ro * do.double()).sum()]
    if lse_grad:
        ref_terms.append((torch.where(torch.isfinite(rl), rl, 0.0) * dlse.double()).sum())
    rgrads = torch.autograd.grad(sum(ref_terms), leaves64)

    tol = TOL[dtype]
    assert torch.isfinite(out).all(), "output not fully written"
    assert _rel(out, ro) < tol
    assert torch.equal(torch.isfinite(lse), torch.isfinite(rl)), "rows without keys must give lse = -inf"
    assert (lse[finite_lse].double() - rl[finite_lse]).abs().max() < 1e-3
    for name, g, rg in zip(("dq", "dk", "dv", "dgate"), grads, rgrads):
        assert torch.isfinite(g).all(), f"{name} not fully written"
        assert _rel(g, rg) < tol, name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_forward_backward_matches_reference(case, dtype):
    _check(*case[1:], dtype)


def test_lse_gradient():
    _check(Neighborhood((5, 7), (3, 5)), 1, 2, 1, 35, 35, 32, 32, torch.float16, lse_grad=True)


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
    assert not can_run_triton(q, q, q, Dense(), torch.zeros(16, 16, device=DEVICE), None, False)
    with pytest.raises(NotImplementedError, match="bias"):
        kernels.attention(q, q, q, bias=torch.zeros(16, 16, device=DEVICE), backend="triton")
    assert not can_run_triton(q.double(), q.double(), q.double(), Dense(), None, None, False)
    # CPU tensors dispatch to the reference unless the triton backend is named
    out = kernels.attention(q.cpu().float(), q.cpu().float(), q.cpu().float())
    assert torch.allclose(out, attention_reference(q.cpu().float(), q.cpu().float(), q.cpu().float()))


def test_torch_compile_fullgraph():
    pattern = Neighborhood((4, 6), (3, 3))

    def f(q, k, v):
        return kernels.attention(q, k, v, pattern, backend="triton").sum()

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
