"""kernels.attention on the reference path: against an explicit per-row float64 loop, and input validation."""
import math
import os

import pytest
import torch

import kernels


def explicit_attention(q, k, v, visible, bias=None, gate=None, scale=None):
    """Row-by-row softmax attention in float64 with python loops over batch, head and query."""
    B, H, Nq, D = q.shape
    Hkv = k.shape[1]
    scale = D ** -0.5 if scale is None else scale
    out = torch.zeros(B, H, Nq, v.shape[-1], dtype=torch.float64)
    lse = torch.full((B, H, Nq), -math.inf, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            kv = h // (H // Hkv)
            for i in range(Nq):
                cols = [j for j in range(k.shape[2]) if visible[i][j]]
                if not cols:
                    continue
                s = torch.stack([(q[b, h, i].double() @ k[b, kv, j].double()) * scale for j in cols])
                if bias is not None:
                    s = s + torch.stack([bias[b % bias.shape[0], h % bias.shape[1], i, j].double() for j in cols])
                m = s.max()
                p = torch.exp(s - m)
                lse[b, h, i] = m + torch.log(p.sum())
                out[b, h, i] = (p[:, None] * v[b, kv, cols].double()).sum(0) / p.sum()
                if gate is not None:
                    g = gate[b, i, h] if gate.dim() == 3 else gate[b, i, h]
                    out[b, h, i] = out[b, h, i] * torch.sigmoid(g.double())
    return out, lse


PATTERNS = [
    (None, 7, 9),
    (kernels.Causal(), 9, 9),
    (kernels.Causal(), 5, 8),
    (kernels.Causal(), 8, 5),  # first rows see nothing
    (kernels.Window1d(2, 1), 11, 11),
    (kernels.Neighborhood((3, 5), (2, 3)), 15, 15),
    (kernels.Neighborhood((4, 3, 5), (3, 2, 3), dilation=(1, 1, 2), inward=False), 60, 60),
    (kernels.Halo((2, 4), block=2, halo=1), 8, 24),
]


@pytest.mark.parametrize("pattern,nq,nk", PATTERNS)
def test_reference_matches_explicit_loop(pattern, nq, nk):
    B, H, Hkv, D, Dv = 2, 4, 2, 8, 6
    q = torch.randn(B, H, nq, D, dtype=torch.float64)
    k = torch.randn(B, Hkv, nk, D, dtype=torch.float64)
    v = torch.randn(B, Hkv, nk, Dv, dtype=torch.float64)
    bias = torch.randn(1, H, nq, nk, dtype=torch.float64)
    gate = torch.randn(B, nq, H, dtype=torch.float64)
    visible = (pattern or kernels.Dense()).mask(nq, nk).tolist()
    out, lse = kernels.attention(q, k, v, pattern=pattern, bias=bias, gate=gate, scale=0.3, return_lse=True,
                                 backend="reference")
    ref_out, ref_lse = explicit_attention(q, k, v, visible, bias=bias, gate=gate, scale=0.3)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-10)


def test_elementwise_gate_and_half_precision():
    q = torch.randn(1, 2, 10, 16)
    k, v = torch.randn(1, 2, 10, 16), torch.randn(1, 2, 10, 16)
    gate = torch.randn(1, 10, 2, 16)
    out = kernels.attention(q.half(), k.half(), v.half(), gate=gate.half())
    ref, _ = explicit_attention(q.half(), k.half(), v.half(), [[True] * 10] * 10)
    ref = ref * torch.sigmoid(gate.half().double()).permute(0, 2, 1, 3)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.double(), ref, rtol=2e-3, atol=2e-3)


def test_gradients_flow_to_all_inputs():
    q = torch.randn(1, 2, 6, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 6, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, 6, 8, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(2, 6, 6, dtype=torch.float64, requires_grad=True)
    gate = torch.randn(1, 6, 2, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda *a: kernels.attention(*a[:3], bias=a[3], gate=a[4], pattern=kernels.Causal()),
                             (q, k, v, bias, gate))


BAD = [
    (dict(q=torch.randn(2, 3, 4)), ValueError, "q must have layout"),
    (dict(k=torch.randn(1, 2, 5, 4)), ValueError, "head dim"),
    (dict(k=torch.randn(1, 3, 5, 8), v=torch.randn(1, 3, 5, 8)), ValueError, "multiple of key/value heads"),
    (dict(v=torch.randn(1, 2, 4, 8)), ValueError, "same heads and length"),
    (dict(q=torch.randn(1, 4, 5, 8).half()), TypeError, "dtype"),
    (dict(pattern="causal"), TypeError, "pattern"),
    (dict(pattern=kernels.Neighborhood((2, 2), 3)), ValueError, "nq == nk == 4"),
    (dict(bias=torch.randn(3, 5, 5)), ValueError, "bias must broadcast"),
    (dict(gate=torch.randn(1, 5, 3)), ValueError, "gate must have shape"),
    (dict(bias=torch.ones(5, 5, dtype=torch.bool)), TypeError, "bias must be a floating-point"),
    (dict(gate=torch.ones(1, 5, 4, dtype=torch.long)), TypeError, "gate must be a floating-point"),
    (dict(gate=torch.randn(1, 5, 4, device="meta")), ValueError, "gate must be on"),
    (dict(scale=-1.0), ValueError, "scale"),
    (dict(scale=float("nan")), ValueError, "positive finite"),
    (dict(scale=float("inf")), ValueError, "positive finite"),
    (dict(scale=True), TypeError, "scale"),
    (dict(return_lse="False"), TypeError, "return_lse must be a bool"),
    (dict(q=[1, 2]), TypeError, "torch.Tensor"),
]


@pytest.mark.parametrize("override,exc,msg", BAD)
def test_invalid_inputs_raise(override, exc, msg):
    args = dict(q=torch.randn(1, 4, 5, 8), k=torch.randn(1, 2, 5, 8), v=torch.randn(1, 2, 5, 8))
    args.update(override)
    with pytest.raises(exc, match=msg):
        kernels.attention(**args)


def test_unknown_backend():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="backend"):
        kernels.attention(q, q, q, backend="cuda-magic")


def test_pattern_arguments_validated():
    with pytest.raises(ValueError, match="left"):
        kernels.Window1d(-1, 0)
    with pytest.raises(ValueError, match="window"):
        kernels.Neighborhood((4, 4), (0, 3))
    with pytest.raises(TypeError, match="window"):
        kernels.Neighborhood((4, 4), (3, 3, 3))
    with pytest.raises(ValueError, match="divisible"):
        kernels.Halo((6, 6), block=4, halo=1)


def _rel_pos_loop(q, tables, pattern, scale):
    """RelPosBias by its definition, one (query, key) pair at a time: float64 loops."""
    qgrid = pattern.grid
    kgrid = getattr(pattern, "key_grid", pattern.grid)
    mask = pattern.mask(math.prod(qgrid), math.prod(kgrid))
    B, H, Nq, _ = q.shape
    out = torch.zeros(B, H, Nq, math.prod(kgrid), dtype=torch.float64)
    for m in range(Nq):
        qc = [int(c) for c in torch.unravel_index(torch.tensor(m), qgrid)]
        for n in range(out.shape[-1]):
            if not mask[m, n]:
                continue
            kc = [int(c) for c in torch.unravel_index(torch.tensor(n), kgrid)]
            for a, table in enumerate(tables):
                if isinstance(pattern, kernels.Halo):
                    blk = qc[a] // pattern.query_block
                    idx = (kc[a] - blk * pattern.block) - (qc[a] % pattern.query_block) + pattern.window - 1
                else:
                    idx = (kc[a] - qc[a]) // pattern.dilation[a] + pattern.window[a] - 1
                out[:, :, m, n] += scale * (q[:, :, m].double() @ table[idx].double())
    return out


REL_PATTERNS = [
    kernels.Halo((4, 6), block=2, halo=1),
    kernels.Halo((2, 4), block=4, halo=1, query_stride=2),
    kernels.Neighborhood((5, 6), (3, 5), dilation=(1, 2)),
    kernels.Neighborhood((4, 3, 5), (3, 2, 3), causal_axes=(0,), inward=False),
]


@pytest.mark.parametrize("pattern", REL_PATTERNS, ids=repr)
def test_rel_pos_bias_matches_definition_and_factors(pattern):
    windows = [pattern.window] * len(pattern.grid) if isinstance(pattern, kernels.Halo) else list(pattern.window)
    tables = [torch.randn(2 * w - 1, 8, dtype=torch.float64) for w in windows]
    nq, nk = math.prod(pattern.grid), math.prod(getattr(pattern, "key_grid", pattern.grid))
    q, k = torch.randn(2, 3, nq, 8, dtype=torch.float64), torch.randn(2, 3, nk, 8, dtype=torch.float64)
    bias = kernels.RelPosBias(pattern, tables, scale=0.3)
    dense = bias.materialize(q, k)
    torch.testing.assert_close(dense, _rel_pos_loop(q, tables, pattern, 0.3), rtol=1e-12, atol=1e-12)
    uq, uk = bias.kernel_factors(q, k)  # what the Triton path fuses: equal on every visible pair
    assert uq.shape[-1] == bias.kernel_rank == sum(windows)
    mask = pattern.mask(nq, nk)
    torch.testing.assert_close((uq @ uk.transpose(-1, -2))[..., mask], dense[..., mask], rtol=1e-12, atol=1e-12)


def test_rel_pos_bias_equals_halonet_layer_bias():
    # the HaloNet layer's blocked layout: one block of qb x qb queries against its win x win window
    from zoo.layers.halo_attention import halo_rel_pos_bias

    block, halo, stride, dqk = 4, 1, 2, 8
    qb, win = block // stride, block + 2 * halo
    q = torch.randn(3, 2, qb, qb, dqk, dtype=torch.float64)
    rel_h, rel_w = torch.randn(2 * win - 1, dqk, dtype=torch.float64), torch.randn(2 * win - 1, dqk,
                                                                                    dtype=torch.float64)
    bias = kernels.RelPosBias(kernels.Halo((qb, qb), block, halo, stride), (rel_h, rel_w))
    ours = bias.materialize(q.reshape(3, 2, qb * qb, dqk), None)
    torch.testing.assert_close(ours, halo_rel_pos_bias(q, rel_h, rel_w, win), rtol=1e-12, atol=1e-12)


def test_factorized_bias_gradients_on_reference():
    pattern = kernels.Neighborhood((3, 4), (3, 3))
    q = torch.randn(1, 2, 12, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 12, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, 12, 4, dtype=torch.float64, requires_grad=True)
    th, tw = (torch.randn(5, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    uq = torch.randn(1, 2, 12, 3, dtype=torch.float64, requires_grad=True)
    uk = torch.randn(1, 1, 12, 3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda q, k, v, th, tw: kernels.attention(
        q, k, v, pattern, bias=kernels.RelPosBias(pattern, (th, tw)), backend="reference"), (q, k, v, th, tw))
    torch.autograd.gradcheck(lambda q, k, v, uq, uk: kernels.attention(
        q, k, v, bias=kernels.LowRankBias(uq, uk), backend="reference"), (q, k, v, uq, uk))


@pytest.mark.parametrize("pattern", REL_PATTERNS[:1] + REL_PATTERNS[2:3], ids=repr)
def test_cached_index_tensors_survive_an_inference_call(pattern):
    """The index maps and masks behind a pattern and a RelPosBias are cached per pattern. Filled first under
    torch.inference_mode(), they must still serve a later training step (gather and where save them for
    backward; an inference tensor cannot be saved), with the same gradients as from a fresh cache."""
    from kernels import bias as bias_mod
    from kernels import patterns

    windows = [pattern.window] * len(pattern.grid) if isinstance(pattern, kernels.Halo) else list(pattern.window)
    nq, nk = math.prod(pattern.grid), math.prod(getattr(pattern, "key_grid", pattern.grid))
    leaves = [torch.randn(1, 2, nq, 8, dtype=torch.float64), torch.randn(1, 2, nk, 8, dtype=torch.float64),
              torch.randn(1, 2, nk, 8, dtype=torch.float64)] + [torch.randn(2 * w - 1, 8, dtype=torch.float64)
                                                                 for w in windows]

    def grads():  # the dense bias (reference path) and the factors (the Triton path's torch lowering)
        xs = [x.clone().requires_grad_() for x in leaves]
        bias = kernels.RelPosBias(pattern, xs[3:])
        out = kernels.attention(*xs[:3], pattern, bias=bias, backend="reference")
        uq, _ = bias.kernel_factors(xs[0], xs[1])
        return torch.autograd.grad(out.square().sum() + uq.square().sum(), xs)

    for cached in (bias_mod._dense_index, bias_mod._factor_index, patterns._axis_mask_cached):
        cached.cache_clear()
    fresh = grads()
    for cached in (bias_mod._dense_index, bias_mod._factor_index, patterns._axis_mask_cached):
        cached.cache_clear()
    with torch.inference_mode():
        kernels.attention(*leaves[:3], pattern, bias=kernels.RelPosBias(pattern, leaves[3:]), backend="reference")
        bias_mod.RelPosBias(pattern, leaves[3:]).kernel_factors(leaves[0], leaves[1])
    for g, f in zip(grads(), fresh):
        torch.testing.assert_close(g, f, rtol=0, atol=0)


def test_autocast_casts_inputs_like_sdpa():
    """Under autocast, mixed-precision inputs (a float32 parameter as queries, bf16 activations) work and the
    result is the reference computed on the autocast-dtype inputs."""
    q = torch.randn(2, 4, 5, 16)
    k = torch.randn(2, 2, 9, 16).to(torch.bfloat16)
    v = torch.randn(2, 2, 9, 8).to(torch.float16)
    bias = torch.randn(4, 5, 9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = kernels.attention(q, k, v, bias=bias)
    assert out.dtype == torch.bfloat16
    qb, kb, vb = (t.to(torch.bfloat16) for t in (q, k, v))
    ref, _ = explicit_attention(qb, kb, vb, [[True] * 9] * 5, bias=bias[None])
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)
    q64 = torch.randn(1, 1, 3, 8, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert kernels.attention(q64, q64, q64).dtype == torch.float64



def test_neighborhood_causal_axes_accepts_an_int():
    p = kernels.Neighborhood((4, 5), (3, 3), causal_axes=0)
    assert p.causal_axes == (0,) and p == kernels.Neighborhood((4, 5), (3, 3), causal_axes=(0,))
    with pytest.raises(TypeError, match="causal_axes"):
        kernels.Neighborhood((4, 5), (3, 3), causal_axes="x")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_rows_hidden_by_a_minus_inf_bias_have_zero_output_and_finite_gradients(backend):
    """A -inf bias row (a padding mask) hides every key: output 0, lse -inf, and no NaN in any gradient; the other
    rows' gradients equal those of the same attention without the hidden row."""
    if backend == "triton":
        pytest.importorskip("triton")
        if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("the Triton path needs CUDA or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dt = torch.float64 if backend == "reference" else torch.float32
    q, k, v = [torch.randn(1, 2, 6, 16, dtype=dt, device=device, requires_grad=True) for _ in range(3)]
    bias = torch.randn(1, 2, 6, 6, dtype=dt, device=device)
    bias[..., 2, :] = float("-inf")
    bias.requires_grad_()
    gate = torch.randn(1, 6, 2, 1, dtype=dt, device=device, requires_grad=True)  # head-wise, (B, N, H, 1) form
    out, lse = kernels.attention(q, k, v, bias=bias, gate=gate, return_lse=True, backend=backend)
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2])) and torch.isneginf(lse[:, :, 2]).all()
    w = torch.randn_like(out)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v, bias, gate))
    assert all(torch.isfinite(g).all() for g in grads)
    keep = [0, 1, 3, 4, 5]  # the same problem without the hidden query row
    q2 = q.detach()[:, :, keep].requires_grad_()
    k2, v2 = k.detach().requires_grad_(), v.detach().requires_grad_()
    out2 = kernels.attention(q2, k2, v2, bias=bias.detach()[:, :, keep], gate=gate.detach()[:, keep, :, 0],
                             backend="reference")
    ref = torch.autograd.grad((out2 * w[:, :, keep]).sum(), (q2, k2, v2))
    tol = 1e-10 if backend == "reference" else 1e-4
    torch.testing.assert_close(grads[0][:, :, keep], ref[0].to(dt), rtol=tol, atol=tol)
    torch.testing.assert_close(grads[1], ref[1].to(dt), rtol=tol, atol=tol)
    torch.testing.assert_close(grads[2], ref[2].to(dt), rtol=tol, atol=tol)
    assert torch.equal(grads[0][:, :, 2], torch.zeros_like(grads[0][:, :, 2]))


@pytest.mark.parametrize("build,exc,msg", [
    (lambda: kernels.Halo((4, 4), 2.0, 1), TypeError, "Halo.block must be an int"),
    (lambda: kernels.Halo((4, 4), 2, 1.0), TypeError, "Halo.halo must be an int"),
    (lambda: kernels.Halo((4, 4), 2, True), TypeError, "Halo.halo must be an int"),
    (lambda: kernels.Halo((4, 4), 2, 1, query_stride="2"), TypeError, "Halo.query_stride"),
    (lambda: kernels.Neighborhood((4, 4), 3, inward="no"), TypeError, "inward must be a bool"),
])
def test_pattern_fields_are_type_checked(build, exc, msg):
    with pytest.raises(exc, match=msg):
        build()


def test_meta_tensors_give_shapes_without_data():
    """Shape inference on the meta device (timm's `device='meta'` construction, the Triton cache prebuild): the
    op runs without touching autocast, which meta tensors do not have (capture records data: not on meta)."""
    q = torch.empty(2, 3, 10, 16, device="meta")
    v = torch.empty(2, 3, 7, 24, device="meta")
    out = kernels.attention(q, q[:, :, :7], v, bias=torch.empty(3, 10, 7, device="meta"))
    assert out.device.type == "meta" and out.shape == (2, 3, 10, 24)
