"""`kernels.agent_attention`: the fused Triton kernel (CPU interpreter here, CUDA on the GPU) and the composition,
against an explicit float64 reference written out below (loops over pooling bins and conv taps), on fresh random
inputs; and which path runs when."""
import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["ATTNZOO_KERNEL_POISON"] = "1"  # outputs start as NaN: a missed write fails the comparison

import kernels  # noqa: E402
import kernels.agent as kernels_agent  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
D64 = torch.float64
TOL = {torch.float32: 2e-5 if DEVICE == "cpu" else 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def _bins(size, out):
    return [((i * size) // out, -((-(i + 1) * size) // out)) for i in range(out)]


def explicit_agent_attention(q, k, v, grid, agent_grid, P, bias1, bias2, w, wb, scale):
    """float64, one (b, h) at a time: pooled agents, two softmaxes, the depthwise conv tap by tap."""
    q, k, v = q.double(), k.double(), v.double()
    B, H, N, D = q.shape
    Dv = v.shape[-1]
    GH, GW = grid
    n = agent_grid[0] * agent_grid[1]
    b1 = torch.zeros(B, H, n, N, dtype=D64) if bias1 is None else bias1.double().cpu().expand(B, H, n, N)
    b2 = torch.zeros(B, H, N, n, dtype=D64) if bias2 is None else bias2.double().cpu().expand(B, H, N, n)
    q, k, v = q.cpu(), k.cpu(), v.cpu()
    out = torch.zeros(B, N, H * Dv, dtype=D64)
    for b in range(B):
        for h in range(H):
            qg = q[b, h, P:].reshape(GH, GW, D)
            agents = torch.stack([qg[r0:r1, c0:c1].mean(dim=(0, 1)) for r0, r1 in _bins(GH, agent_grid[0])
                                  for c0, c1 in _bins(GW, agent_grid[1])])
            agent_v = torch.softmax(scale * agents @ k[b, h].T + b1[b, h], -1) @ v[b, h]
            o = torch.softmax(scale * q[b, h] @ agents.T + b2[b, h], -1) @ agent_v
            if w is not None:
                ks = w.shape[-1]
                vg = v[b, h, P:].reshape(GH, GW, Dv)
                wh = w.double().cpu()[h * Dv:(h + 1) * Dv, 0]  # (Dv, ks, ks)
                for y in range(GH):
                    for x in range(GW):
                        acc = torch.zeros(Dv, dtype=D64)
                        if wb is not None:
                            acc += wb.double().cpu()[h * Dv:(h + 1) * Dv]
                        for ky in range(ks):
                            for kx in range(ks):
                                yy, xx = y + ky - ks // 2, x + kx - ks // 2
                                if 0 <= yy < GH and 0 <= xx < GW:
                                    acc += wh[:, ky, kx] * vg[yy, xx]
                        o[P + y * GW + x] += acc
            out[b, :, h * Dv:(h + 1) * Dv] = o
    return out


def _inputs(B, H, P, grid, agent_grid, D, Dv, dtype, bias_batch=1, ks=3, dwc_bias=True, biases=True,
            layout="qkv"):
    N = P + grid[0] * grid[1]
    n = agent_grid[0] * agent_grid[1]
    if layout == "qkv":  # views of one (B, N, 3, H, D) projection, as the layer makes them
        assert D == Dv
        q, k, v = torch.randn(B, N, 3, H, D, device=DEVICE).to(dtype).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q, k = (torch.randn(B, H, N, D, device=DEVICE).to(dtype) for _ in range(2))
        v = torch.randn(B, H, N, Dv, device=DEVICE).to(dtype)
    bias1 = torch.randn(bias_batch, H, n, N, device=DEVICE) if biases else None
    bias2 = torch.randn(bias_batch, H, N, n, device=DEVICE) if biases else None
    w = 0.3 * torch.randn(H * Dv, 1, ks, ks, device=DEVICE) if ks else None
    wb = torch.randn(H * Dv, device=DEVICE) if ks and dwc_bias else None
    return q, k, v, bias1, bias2, w, wb


def _rel(x, ref):
    ref = ref.detach().double().cpu()
    return ((x.detach().double().cpu() - ref).norm() / ref.norm()).item()


CASES = [  # B, H, P, grid, agent_grid, D, Dv, bias_batch, ks, dwc_bias, biases, layout
    (2, 3, 1, (14, 14), (7, 7), 16, 16, 1, 3, True, True, "qkv"),  # agent_deit's layer, small heads
    (1, 2, 0, (9, 7), (4, 4), 32, 32, 1, 3, True, True, "qkv"),  # odd, non-square, uneven bins
    (2, 1, 2, (5, 11), (3, 2), 24, 40, 2, 5, False, True, "split"),  # D, Dv not powers of two, per-batch bias
    (1, 2, 1, (3, 3), (4, 4), 16, 16, 1, 3, True, False, "qkv"),  # more agents than tokens: repeated bins
    (1, 1, 0, (16, 12), (3, 3), 16, 16, 1, 0, False, True, "qkv"),  # no DWC; 192 rows, several query tiles
    (2, 3, 1, (5, 6), (2, 3), 24, 40, 1, 3, True, True, "split"),  # several heads with D != Dv, not powers of 2
]
DTYPES = [torch.float32, torch.float16,
          pytest.param(torch.bfloat16, marks=pytest.mark.skipif(DEVICE == "cpu", reason="the interpreter's bf16 "
                                                                "dots are wrong; bf16 runs on the GPU"))]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}H{c[1]}P{c[2]}g{c[3]}a{c[4]}d{c[5]}-{c[6]}k{c[8]}")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernels_", ["two", "one"])
def test_fused_kernel_matches_float64(case, dtype, kernels_, monkeypatch):
    """Both launch plans: aggregate + broadcast kernels, and the broadcast inside the aggregate program (with
    the conv's taps sequenced by barriers)."""
    from kernels.backends import triton_agent

    monkeypatch.setitem(triton_agent.CONFIG, "one_kernel_tokens", 1 << 30 if kernels_ == "one" else 0)
    B, H, P, grid, agent_grid, D, Dv, bb, ks, has_wb, biases, layout = case
    q, k, v, b1, b2, w, wb = _inputs(B, H, P, grid, agent_grid, D, Dv, dtype, bb, ks, has_wb, biases, layout)
    scale = 0.7 * D ** -0.5
    with torch.no_grad():
        out = kernels.agent_attention(q, k, v, grid=grid, agent_grid=agent_grid, num_prefix_tokens=P, bias1=b1,
                                      bias2=b2, dwc_weight=w, dwc_bias=wb, scale=scale, backend="triton")
    assert out.shape == (B, P + grid[0] * grid[1], H * Dv) and out.dtype == dtype
    ref = explicit_agent_attention(q, k, v, grid, agent_grid, P, b1, b2, w, wb, scale)
    assert _rel(out, ref) < TOL[dtype]


def test_fused_kernel_small_tiles_and_long_prefix(monkeypatch):
    """16-row tiles in both kernels: the 20 prefix rows span two query tiles, 5x5 conv windows cross tiles."""
    from kernels.backends import triton_agent

    monkeypatch.setitem(triton_agent.CONFIG, "block_m", 16)
    monkeypatch.setitem(triton_agent.CONFIG, "block_n", 16)
    monkeypatch.setitem(triton_agent.CONFIG, "one_kernel_tokens", 0)
    q, k, v, b1, b2, w, wb = _inputs(1, 2, 20, (7, 11), (3, 4), 16, 16, torch.float32, 1, 5, True, True, "qkv")
    with torch.no_grad():
        out = kernels.agent_attention(q, k, v, grid=(7, 11), agent_grid=(3, 4), num_prefix_tokens=20, bias1=b1,
                                      bias2=b2, dwc_weight=w, dwc_bias=wb, backend="triton")
    ref = explicit_agent_attention(q, k, v, (7, 11), (3, 4), 20, b1, b2, w, wb, 16 ** -0.5)
    assert _rel(out, ref) < TOL[torch.float32]


@pytest.mark.parametrize("kernels_", ["two", "one"])
def test_fused_kernel_hidden_keys_and_rows_give_zeros_like_the_composition(kernels_, monkeypatch):
    """-inf biases: some keys hidden from every agent, all keys hidden from one agent, all agents hidden from
    one query row. The fused kernels and the composition (kernels.attention's zero rows) agree, no NaN."""
    from kernels.backends import triton_agent

    monkeypatch.setitem(triton_agent.CONFIG, "one_kernel_tokens", 1 << 30 if kernels_ == "one" else 0)
    q, k, v, b1, b2, w, wb = _inputs(2, 2, 1, (6, 7), (2, 2), 16, 16, torch.float32)
    b1[..., :9] = float("-inf")
    b1[:, 1, 2] = float("-inf")
    b2[:, 0, 5] = float("-inf")
    kw = dict(grid=(6, 7), agent_grid=(2, 2), num_prefix_tokens=1, bias1=b1, bias2=b2, dwc_weight=w, dwc_bias=wb)
    with torch.no_grad():
        out = kernels.agent_attention(q, k, v, backend="triton", **kw)
        ref = kernels.agent_attention(q.double(), k.double(), v.double(), backend="reference",
                                      **{key: val.double() if torch.is_tensor(val) else val for key, val in kw.items()})
    assert torch.isfinite(out).all()
    assert _rel(out, ref) < TOL[torch.float32]


def _nan_padded(bias, rows, cols):
    """`bias` as a view into a NaN-filled (.., rows, cols) buffer: whole-tile loads read NaN past the valid
    entries, which the kernels must select away."""
    buf = torch.full((*bias.shape[:-2], rows, cols), float("nan"), device=bias.device, dtype=bias.dtype)
    view = buf[..., :bias.shape[-2], :bias.shape[-1]]
    view.copy_(bias)
    return view


@pytest.mark.parametrize("kernels_", ["two", "one"])
def test_fused_kernel_loads_padded_biases_whole(kernels_, monkeypatch):
    """Biases whose storage covers the kernels' tiles take the unmasked loads when agents fill >= 3/4 of the
    agent tile (checked through a spy on the host's coverage test); NaN in the padding must not reach the output.
    `padded_bias` gives that layout."""
    from kernels.backends import triton_agent

    monkeypatch.setitem(triton_agent.CONFIG, "one_kernel_tokens", 1 << 30 if kernels_ == "one" else 0)
    covered = []
    real = triton_agent._covers
    monkeypatch.setattr(triton_agent, "_covers", lambda *a: covered.append(real(*a)) or covered[-1])
    q, k, v, b1, b2, w, wb = _inputs(2, 3, 1, (9, 7), (4, 3), 16, 16, torch.float32)  # 12 of 16 agents
    ref = explicit_agent_attention(q, k, v, (9, 7), (4, 3), 1, b1, b2, w, wb, 16 ** -0.5)
    kw = dict(grid=(9, 7), agent_grid=(4, 3), num_prefix_tokens=1, dwc_weight=w, dwc_bias=wb, backend="triton")
    with torch.no_grad():
        tight = kernels.agent_attention(q, k, v, bias1=b1, bias2=b2, **kw)
        assert covered == [False, False]
        covered.clear()
        wide = kernels.agent_attention(q, k, v, bias1=_nan_padded(b1, 16, 128), bias2=_nan_padded(b2, 128, 16),
                                       **kw)
        assert covered == [True, True]
        covered.clear()
        padded = kernels.agent_attention(q, k, v, bias1=kernels.agent.padded_bias(b1),
                                         bias2=kernels.agent.padded_bias(b2), **kw)
        assert covered == [True, True]
        covered.clear()
        short = kernels.agent_attention(q, k, v, bias1=_nan_padded(b1, 12, 64), bias2=b2, **kw)  # 12 < 16 rows
        assert covered[-1] is False  # bias1 is checked last (the aggregate kernel's own argument)
    for out in (tight, wide, padded, short):
        assert _rel(out, ref) < TOL[torch.float32]
    # 73 tokens, not a multiple of any tile: storage of exactly 73 keys/rows is not enough for whole tiles
    q, k, v, b1, b2, w, wb = _inputs(1, 2, 1, (9, 8), (4, 3), 16, 16, torch.float32)
    kw.update(grid=(9, 8), dwc_weight=w, dwc_bias=wb)
    covered.clear()
    with torch.no_grad():
        out = kernels.agent_attention(q, k, v, bias1=_nan_padded(b1, 16, 73), bias2=_nan_padded(b2, 73, 16), **kw)
    assert covered == [False, False]
    assert _rel(out, explicit_agent_attention(q, k, v, (9, 8), (4, 3), 1, b1, b2, w, wb, 16 ** -0.5)) < TOL[
        torch.float32]
    # 9 of 16 agents: whole tiles would read mostly padding, so padded biases keep the masked loads
    kw.update(agent_grid=(3, 3))
    q, k, v, b1, b2, _, _ = _inputs(1, 2, 1, (9, 8), (3, 3), 16, 16, torch.float32)
    covered.clear()
    with torch.no_grad():
        out = kernels.agent_attention(q, k, v, bias1=kernels.agent.padded_bias(b1),
                                      bias2=kernels.agent.padded_bias(b2), **kw)
    assert covered == []
    assert _rel(out, explicit_agent_attention(q, k, v, (9, 8), (3, 3), 1, b1, b2, w, wb, 16 ** -0.5)) < TOL[
        torch.float32]


def test_padded_bias_keeps_values_and_pads_storage():
    """Agent dims (<= 128) pad to the kernels' agent tile, token dims to multiples of 64."""
    for shape, padded_shape in (((1, 3, 49, 197), (64, 256)), ((1, 3, 3136, 9), (3136, 16)), ((2, 5), (16, 16)),
                                ((1, 1, 100, 129), (128, 192))):
        bias = torch.randn(shape)
        padded = kernels.agent.padded_bias(bias)
        assert padded.shape == bias.shape and padded.dtype == bias.dtype and torch.equal(padded, bias)
        assert padded.stride()[-2:] == (padded_shape[1], 1)
        assert padded.untyped_storage().nbytes() == math.prod(shape[:-2]) * math.prod(padded_shape) * 4
    with pytest.raises(TypeError, match="bias must be a tensor"):
        kernels.agent.padded_bias([1.0, 2.0])
    with pytest.raises(ValueError, match="bias must have at least 2 dims"):
        kernels.agent.padded_bias(torch.ones(3))


def test_covers_checks_the_storage_the_tiles_read():
    """The host's coverage test: whole-tile loads over the given index ranges stay inside the storage."""
    from kernels.backends.triton_agent import _covers, ta

    def covers(t, extents):
        return _covers(t, ta._bstrides(t), extents)

    buf = torch.zeros(1, 2, 16, 64)
    view = buf[..., :9, :50]
    assert covers(view, (4, 2, 16, 64))  # batch broadcast (stride 0), exact fit
    assert not covers(view, (4, 2, 16, 65))  # one column past the end
    assert not covers(view, (4, 2, 17, 64))
    shifted = torch.zeros(1, 2, 17, 64)[..., 1:, :][..., :9, :50]  # storage offset 64: the last row is past the end
    assert covers(shifted, (1, 2, 16, 64)) and not covers(shifted, (1, 2, 17, 64))
    assert not covers(torch.zeros(1, 2, 16, 128)[..., ::2], (1, 2, 16, 64))  # not unit-stride along the last dim
    assert not covers(None, (1, 1, 1, 1))


def test_fused_kernel_strided_conv_bias_and_low_dim_biases():
    """A strided dwc_bias (a view), 2-d/3-d biases broadcast from the left, one head."""
    q, k, v, _, _, w, _ = _inputs(2, 1, 1, (5, 5), (2, 2), 16, 16, torch.float32)
    wb = torch.randn(32, device=DEVICE)[::2]
    b1 = torch.randn(4, 26, device=DEVICE)  # (n, Nk)
    b2 = torch.randn(1, 26, 4, device=DEVICE)  # (H, N, n)
    with torch.no_grad():
        out = kernels.agent_attention(q, k, v, grid=(5, 5), agent_grid=(2, 2), num_prefix_tokens=1, bias1=b1,
                                      bias2=b2, dwc_weight=w, dwc_bias=wb, backend="triton")
    ref = explicit_agent_attention(q, k, v, (5, 5), (2, 2), 1, b1, b2, w, wb, 16 ** -0.5)
    assert _rel(out, ref) < TOL[torch.float32]


def test_fused_kernel_under_autocast_matches_the_composition():
    """float32 inputs and weights under float16 autocast: both paths cast q, k, v and the conv to float16."""
    q, k, v, b1, b2, w, wb = _inputs(2, 2, 1, (6, 6), (3, 3), 16, 16, torch.float32)
    kw = dict(grid=(6, 6), agent_grid=(3, 3), num_prefix_tokens=1, bias1=b1, bias2=b2, dwc_weight=w, dwc_bias=wb)
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.float16):
        out = kernels.agent_attention(q, k, v, backend="triton", **kw)
        ref = kernels.agent_attention(q, k, v, backend="reference", **kw)
    assert out.dtype == ref.dtype == torch.float16
    assert _rel(out, ref.double()) < 1e-2


def test_reduced_key_grid_takes_the_composition():
    """Keys on a coarser grid (Agent-PVT's sr_ratio): the conv's V is resized to the query grid; backend='triton'
    falls back to the composition and agrees with the reference."""
    B, H, D = 2, 2, 16
    q = torch.randn(B, H, 1 + 6 * 8, D, device=DEVICE)
    k, v = (torch.randn(B, H, 1 + 3 * 4, D, device=DEVICE) for _ in range(2))
    w = torch.randn(H * D, 1, 3, 3, device=DEVICE)
    kw = dict(grid=(6, 8), kv_grid=(3, 4), agent_grid=(2, 2), num_prefix_tokens=1, dwc_weight=w)
    with torch.no_grad():
        out = kernels.agent_attention(q, k, v, backend="triton", **kw)
        ref = kernels.agent_attention(q, k, v, backend="reference", **kw)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("change, reason", [
    ("kv_grid", "reduced grid"),
    ("strided_d", "unit stride along D"),
    ("agents", "at most 128 agents"),
    ("reference", "backend='reference'"),
    ("grad", "a gradient is needed"),
    ("empty", "empty inputs"),
    ("cpu_default_backend", "runs CUDA tensors"),
])
def test_fused_blocker_names_why(change, reason):
    q, k, v = (torch.randn(2, 2, 1 + 12 * 12, 16, device=DEVICE) for _ in range(3))
    grid = kv_grid = (12, 12)
    agent_grid, backend, tensors = (2, 2), "triton", [q, k, v]
    if change == "kv_grid":
        kv_grid = (6, 6)
    elif change == "strided_d":
        q = torch.randn(2, 2, 1 + 12 * 12, 32, device=DEVICE)[..., ::2]
    elif change == "agents":
        agent_grid = (12, 12)
    elif change == "reference":
        backend = "reference"
    elif change == "grad":
        tensors = [q.requires_grad_()]
    elif change == "empty":
        q = q[:0]
    elif change == "cpu_default_backend":
        if DEVICE != "cpu":
            pytest.skip("a CPU-only case")
        backend = None
    with torch.enable_grad():
        got = kernels_agent._fused_blocker(q, k, v, grid, kv_grid, agent_grid, tensors, backend)
    assert got is not None and reason in got


def test_fused_blocker_clears_inference_inputs():
    q, k, v = (torch.randn(2, 2, 1 + 12 * 12, 16, device=DEVICE) for _ in range(3))
    with torch.no_grad():
        assert kernels_agent._fused_blocker(q, k, v, (12, 12), (12, 12), (2, 2), [q, k, v], "triton") is None


def test_composition_matches_float64_with_gradients():
    q, k, v, b1, b2, w, wb = _inputs(2, 2, 1, (6, 5), (3, 3), 16, 16, torch.float64, 1, 3, True, True, "split")
    leaves = [t.double().requires_grad_() for t in (q, k, v, b1, b2, w, wb)]
    q, k, v, b1, b2, w, wb = leaves
    out = kernels.agent_attention(q, k, v, grid=(6, 5), agent_grid=(3, 3), num_prefix_tokens=1, bias1=b1,
                                  bias2=b2, dwc_weight=w, dwc_bias=wb)
    ref = explicit_agent_attention(q.detach(), k.detach(), v.detach(), (6, 5), (3, 3), 1, b1.detach(), b2.detach(),
                                   w.detach(), wb.detach(), 16 ** -0.5)
    torch.testing.assert_close(out.detach().cpu(), ref)
    assert torch.autograd.gradcheck(
        lambda *t: kernels.agent_attention(t[0], t[1], t[2], grid=(6, 5), agent_grid=(3, 3), num_prefix_tokens=1,
                                           bias1=t[3], bias2=t[4], dwc_weight=t[5], dwc_bias=t[6]),
        leaves, eps=1e-6, atol=1e-5, fast_mode=True)


def test_fused_path_runs_only_where_it_can(monkeypatch):
    """Fused for inference with backend='triton' (CUDA: also backend=None); the composition when a gradient is
    needed, under kernels.capture, with a reduced key grid, or with backend='reference'."""
    calls = []
    real = kernels_agent.attention

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels_agent, "attention", spy)
    q, k, v, b1, b2, w, wb = _inputs(1, 2, 1, (4, 4), (2, 2), 16, 16, torch.float32)
    kw = dict(grid=(4, 4), agent_grid=(2, 2), num_prefix_tokens=1, bias1=b1, bias2=b2, dwc_weight=w, dwc_bias=wb)
    with torch.no_grad():
        fused = kernels.agent_attention(q, k, v, backend="triton", **kw)
    assert calls == []
    ref = kernels.agent_attention(q, k, v, backend="reference", **kw)
    assert len(calls) == 2
    torch.testing.assert_close(fused, ref, rtol=1e-4, atol=1e-4)
    w.requires_grad_()
    kernels.agent_attention(q, k, v, backend="triton", **kw).sum().backward()  # needs a gradient: composition
    assert len(calls) == 4 and w.grad is not None


def test_fused_path_steps_aside_for_capture():
    class Layer(torch.nn.Module):
        def forward(self, q, k, v):
            return kernels.agent_attention(q, k, v, grid=(4, 4), agent_grid=(2, 2), backend="triton")

    layer = Layer()
    q, k, v = (torch.randn(1, 2, 16, 16, device=DEVICE) for _ in range(3))
    with torch.no_grad(), kernels.capture(layer, Layer) as cap:
        out = layer(q, k, v)
    assert len(cap.records) == 2  # both steps were recorded
    torch.testing.assert_close(out, kernels.agent_attention(q, k, v, grid=(4, 4), agent_grid=(2, 2),
                                                            backend="reference"), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kwargs, match", [
    (dict(grid=(4, 5)), "num_prefix_tokens \\+ H·W"),
    (dict(agent_grid=0), "agent_grid must be a positive int"),
    (dict(kv_grid=(2, 2)), "k and v must have"),
    (dict(bias1=torch.zeros(2, 5, 16)), "bias1 must be broadcastable to \\(1, 2, 4, 16\\)"),
    (dict(bias2=torch.zeros(16, 3)), "bias2 must be broadcastable"),
    (dict(dwc_weight=torch.zeros(32, 1, 2, 2)), "dwc_weight must be a floating depthwise conv weight"),
    (dict(dwc_weight=torch.zeros(())), "dwc_weight must be a floating depthwise conv weight"),
    (dict(bias1=torch.ones(2, 4, 16, dtype=torch.bool)), "a boolean mask becomes torch.where"),
    (dict(dwc_weight=torch.zeros(32, 1, 3, 3), dwc_bias=torch.zeros(3)),
     "dwc_bias must be a floating tensor of shape \\(32,\\)"),
    (dict(num_prefix_tokens=-1), "num_prefix_tokens must be an int >= 0"),
    (dict(scale=0.0), "scale must be a positive number"),
    (dict(backend="cuda"), "backend must be"),
])
def test_bad_arguments_name_the_problem(kwargs, match):
    q, k, v = (torch.randn(1, 2, 16, 16) for _ in range(3))
    args = dict(grid=(4, 4), agent_grid=(2, 2))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        kernels.agent_attention(q, k, v, **args)


@pytest.mark.parametrize("kernels_", ["two", "one"])
@pytest.mark.parametrize("case", CASES[:3], ids=lambda c: f"B{c[0]}H{c[1]}P{c[2]}g{c[3]}-{c[-1]}")
def test_plan_repeats_the_fused_call_on_new_inputs(case, kernels_, monkeypatch):
    """`agent_attention_planned`: the first call's output and the plan's outputs for fresh q, k, v of the same
    layout (tensors; on CUDA also raw addresses) match the float64 reference, with the first call's biases and
    conv weights at their current values."""
    from kernels.backends import triton_agent

    monkeypatch.setitem(triton_agent.CONFIG, "one_kernel_tokens", 1 << 30 if kernels_ == "one" else 0)
    B, H, P, grid, agent_grid, D, Dv, bb, ks, has_wb, biases, layout = case
    q, k, v, b1, b2, w, wb = _inputs(B, H, P, grid, agent_grid, D, Dv, torch.float32, bb, ks, has_wb, biases, layout)
    kw = dict(grid=grid, agent_grid=agent_grid, num_prefix_tokens=P, bias1=b1, bias2=b2, dwc_weight=w, dwc_bias=wb)
    with torch.no_grad():
        out, plan = kernels_agent.agent_attention_planned(q, k, v, **kw, backend="triton")
        assert plan is not None
        assert _rel(out, explicit_agent_attention(q, k, v, grid, agent_grid, P, b1, b2, w, wb, D ** -0.5)) < 2e-4
        for _ in range(2):
            q2, k2, v2, *_ = _inputs(B, H, P, grid, agent_grid, D, Dv, torch.float32, bb, ks, has_wb, biases, layout)
            if w is not None:
                w.mul_(1.5)  # the plan reads the weights at launch time
            ref = explicit_agent_attention(q2, k2, v2, grid, agent_grid, P, b1, b2, w, wb, D ** -0.5)
            assert _rel(plan(q2, k2, v2), ref) < 2e-4
            if DEVICE == "cuda":
                assert _rel(plan(q2.data_ptr(), k2.data_ptr(), v2.data_ptr()), ref) < 2e-4


def test_plan_holds_no_input_tensors():
    """A plan keeps its biases and conv weights, not the first call's q, k, v (a layer's plan lives as long as
    the layer), also when biases and the conv are absent (their pointer arguments)."""
    import gc
    import weakref

    q, k, v, *_ = _inputs(1, 2, 1, (4, 4), (2, 2), 16, 16, torch.float32, biases=False, ks=0)
    base = q._base if q._base is not None else q
    ref = weakref.ref(base)
    with torch.no_grad():
        _, plan = kernels_agent.agent_attention_planned(q, k, v, grid=(4, 4), agent_grid=(2, 2), num_prefix_tokens=1,
                                                        backend="triton")
    assert plan is not None
    del q, k, v, base
    gc.collect()
    assert ref() is None


def test_plan_is_none_where_the_composition_runs():
    q, k, v, b1, b2, w, wb = _inputs(1, 2, 1, (4, 4), (2, 2), 16, 16, torch.float32)
    kw = dict(grid=(4, 4), agent_grid=(2, 2), num_prefix_tokens=1, bias1=b1, bias2=b2, dwc_weight=w, dwc_bias=wb)
    with torch.no_grad():
        out, plan = kernels_agent.agent_attention_planned(q, k, v, **kw, backend="reference")
    assert plan is None
    ref = explicit_agent_attention(q, k, v, (4, 4), (2, 2), 1, b1, b2, w, wb, 16 ** -0.5)
    assert _rel(out, ref) < 1e-5
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        kernels_agent.agent_attention_planned(q, k, v, grid=(4, 4), agent_grid=(2, 2), num_prefix_tokens=2)
