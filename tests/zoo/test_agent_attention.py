"""AgentAttention against an explicit float64 two-softmax composition written out here (loops for pooling,
interpolation and the depthwise conv), on fresh random inputs."""
import math

import pytest
import torch

import kernels
import kernels.agent as kernels_agent
import zoo
from zoo.layers import AgentAttention

D64 = torch.float64


# ---------------------------------------------------------------- explicit references (independent of the module)

def _linear_weights(n_in, n_out):
    """(n_out, n_in) matrix of 1-d linear interpolation, align_corners=False (source clamped at 0)."""
    m = torch.zeros(n_out, n_in, dtype=D64)
    for i in range(n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = int(math.floor(src))
        i1 = min(i0 + 1, n_in - 1)
        lam = src - i0
        m[i, i0] += 1 - lam
        m[i, i1] += lam
    return m


def _resize2d(t, size):
    """Bilinear resize of the last two axes."""
    return _linear_weights(t.shape[-2], size[0]) @ t @ _linear_weights(t.shape[-1], size[1]).T


def _adaptive_pool(grid, out):
    """(C, H, W) -> (C, out*out) with PyTorch's adaptive bins [floor(i·H/o), ceil((i+1)·H/o))."""
    C, H, W = grid.shape
    cells = []
    for i in range(out):
        h0, h1 = (i * H) // out, -((-(i + 1) * H) // out)
        for j in range(out):
            w0, w1 = (j * W) // out, -((-(j + 1) * W) // out)
            cells.append(grid[:, h0:h1, w0:w1].mean(dim=(1, 2)))
    return torch.stack(cells, dim=1)


def _dwconv3x3(grid, weight, bias):
    """Depthwise 3x3 conv with zero padding, by shifting: grid (C, H, W), weight (C, 1, 3, 3)."""
    C, H, W = grid.shape
    padded = torch.zeros(C, H + 2, W + 2, dtype=grid.dtype)
    padded[:, 1:-1, 1:-1] = grid
    out = bias[:, None, None].clone().expand(C, H, W).clone()
    for dy in range(3):
        for dx in range(3):
            out += weight[:, 0, dy, dx][:, None, None] * padded[:, dy:dy + H, dx:dx + W]
    return out


def _softmax(z):
    e = torch.exp(z - z.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def explicit_agent_attention(m, x, feat_size):
    """The paper's composition for one AgentAttention (sr_ratio=1), batch by batch, head by head."""
    H, W = feat_size
    P, h, n = m.num_prefix_tokens, m.num_heads, m.agent_num
    C = m.dim
    d = C // h
    pool = math.isqrt(n)
    Wqkv, bqkv = m.qkv.weight.detach(), m.qkv.bias.detach() if m.qkv.bias is not None else torch.zeros(3 * C, dtype=D64)
    gh, gw = m.bias_grid
    # agent biases (h, n, Nk) and (h, N, n), interpolated to the grid
    an = _resize2d(m.an_bias.detach(), (H, W)).reshape(h, n, H * W)
    ah = (_linear_weights(gh, H) @ m.ah_bias.detach()[0, :, :, :, 0].unsqueeze(-1)).squeeze(-1)  # (h, n, H)
    aw = (_linear_weights(gw, W) @ m.aw_bias.detach()[0, :, :, 0, :].unsqueeze(-1)).squeeze(-1)  # (h, n, W)
    b1 = an + (ah[..., :, None] + aw[..., None, :]).reshape(h, n, H * W)
    na = _resize2d(m.na_bias.detach(), (H, W)).reshape(h, n, H * W).transpose(1, 2)
    ha = _linear_weights(gh, H) @ m.ha_bias.detach()[0, :, :, 0, :]  # (h, H, n)
    wa = _linear_weights(gw, W) @ m.wa_bias.detach()[0, :, 0, :, :]  # (h, W, n)
    b2 = na + (ha[:, :, None, :] + wa[:, None, :, :]).reshape(h, H * W, n)
    if P:
        b1 = torch.cat([m.ac_bias.detach()[0], b1], dim=-1)
        b2 = torch.cat([m.ca_bias.detach()[0], b2], dim=-2)
    outs = []
    for b in range(x.shape[0]):
        qkv = x[b] @ Wqkv.T + bqkv
        q, k, v = qkv[:, :C], qkv[:, C:2 * C], qkv[:, 2 * C:]  # (N, C)
        agents = _adaptive_pool(q[P:].T.reshape(C, H, W), pool).T  # (n, C)
        o = torch.zeros_like(q)
        for head in range(h):
            sl = slice(head * d, (head + 1) * d)
            p1 = _softmax(agents[:, sl] @ k[:, sl].T * d ** -0.5 + b1[head])  # (n, N)
            va = p1 @ v[:, sl]
            p2 = _softmax(q[:, sl] @ agents[:, sl].T * d ** -0.5 + b2[head])  # (N, n)
            o[:, sl] = p2 @ va
        local = _dwconv3x3(v[P:].T.reshape(C, H, W), m.dwc.weight.detach(), m.dwc.bias.detach())
        o[P:] = o[P:] + local.reshape(C, H * W).T
        outs.append(o @ m.proj.weight.detach().T + m.proj.bias.detach())
    return torch.stack(outs)


def _module(dim, heads, n, grid, prefix=0, **kw):
    return AgentAttention(dim, num_heads=heads, agent_num=n, bias_grid=grid, num_prefix_tokens=prefix,
                          qkv_bias=True, dtype=D64, **kw).eval()


def _randomize(m, scale=0.5):
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(torch.randn_like(p) * (scale if "bias" in name and p.dim() >= 4 else 0.3))


# ------------------------------------------------------------------------------------------------------- tests

def test_zero_bias_zero_dwc_equals_two_softmax_composition_with_cls():
    """The spec's case: N = 196 + 1 (CLS), n = 49, zero biases and zero DWC."""
    m = _module(48, 3, 49, (14, 14), prefix=1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("_bias") or name.startswith("dwc"):
                p.zero_()
    x = torch.randn(2, 197, 48, dtype=D64)
    out = m(x, (14, 14))
    assert out.shape == (2, 197, 48)
    torch.testing.assert_close(out, explicit_agent_attention(m, x, (14, 14)), rtol=1e-10, atol=1e-10)
    b1, b2 = m.agent_bias((14, 14))
    assert b1.shape == (1, 3, 49, 197) and b2.shape == (1, 3, 197, 49)
    assert not b1.any() and not b2.any()


@pytest.mark.parametrize("grid,feat,prefix,n", [((7, 7), (7, 7), 1, 9), ((7, 7), (5, 9), 0, 4),
                                                ((6, 10), (11, 3), 2, 16), ((4, 4), (1, 1), 1, 9)])
def test_random_biases_and_dwc_equal_explicit_composition(grid, feat, prefix, n):
    """Random biases interpolated to odd / non-square grids (also smaller than the agent grid), random DWC."""
    m = _module(32, 2, n, grid, prefix=prefix)
    _randomize(m)
    x = torch.randn(2, prefix + feat[0] * feat[1], 32, dtype=D64)
    torch.testing.assert_close(m(x, feat), explicit_agent_attention(m, x, feat), rtol=1e-10, atol=1e-10)


def test_inference_bias_cache_follows_parameter_changes():
    """Under no_grad the interpolated biases are reused per grid; any change of a bias parameter (in place, as an
    optimizer step or load_state_dict does) or of the grid rebuilds them: outputs stay the explicit ones."""
    m = _module(16, 2, 4, (5, 6), prefix=1)
    _randomize(m)
    x = torch.randn(2, 1 + 7 * 3, 16, dtype=D64)
    with torch.no_grad():
        first = m.agent_bias((7, 3))
        assert all(a is b for a, b in zip(first, m.agent_bias((7, 3))))  # cached
        torch.testing.assert_close(m(x, (7, 3)), explicit_agent_attention(m, x, (7, 3)), rtol=1e-10, atol=1e-10)
        for name in ("an_bias", "na_bias", "ah_bias", "wa_bias", "ca_bias"):
            getattr(m, name).add_(torch.randn_like(getattr(m, name)))
            torch.testing.assert_close(m(x, (7, 3)), explicit_agent_attention(m, x, (7, 3)), rtol=1e-10,
                                       atol=1e-10, msg=f"stale cache after changing {name}")
        m.load_state_dict({k: torch.randn_like(v) for k, v in m.state_dict().items()})
        torch.testing.assert_close(m(x, (7, 3)), explicit_agent_attention(m, x, (7, 3)), rtol=1e-10, atol=1e-10)
        y = torch.randn(1, 1 + 4 * 4, 16, dtype=D64)
        torch.testing.assert_close(m(y, (4, 4)), explicit_agent_attention(m, y, (4, 4)), rtol=1e-10, atol=1e-10)
    with torch.enable_grad():  # training builds the biases from the parameters every call (autograd graph)
        b1, _ = m.agent_bias((4, 4))
        assert b1.requires_grad and b1 is not m.agent_bias((4, 4))[0]


def test_bias_cache_survives_repeated_eval_and_is_dropped_by_a_mode_switch():
    """Benchmarks call `model.eval()` every step: that must not rebuild the biases; `train().eval()` must, so
    writes through `param.data` (no version bump) can be picked up."""
    m = _module(16, 2, 4, (5, 6), prefix=1)
    _randomize(m)
    m.eval()
    with torch.no_grad():
        first = m.agent_bias((7, 3))
        m.eval()
        assert m.agent_bias((7, 3))[0] is first[0]
        m.an_bias.data.add_(1.0)  # bypasses the version counter: still the old cache
        assert m.agent_bias((7, 3))[0] is first[0]
        m.train().eval()
        fresh = m.agent_bias((7, 3))
        assert fresh[0] is not first[0]
        torch.testing.assert_close(fresh[0], m._agent_bias((7, 3), (7, 3))[0], rtol=0, atol=0)


@pytest.mark.parametrize("heads", [1, 2])
def test_prefix_gradients_match_the_explicit_composition(heads):
    """Training with a class token: the local term is added in place on the grid rows (with one head the
    reshaped attention output is a view of the op's output and is cloned first: the Triton op's backward keeps
    it); the input gradient equals the explicit composition's."""
    m = _module(8 * heads, heads, 4, (5, 6), prefix=1).train()
    _randomize(m)
    x = torch.randn(2, 1 + 4 * 3, 8 * heads, dtype=D64, requires_grad=True)
    out = m(x, (4, 3))
    ref = explicit_agent_attention(m, x, (4, 3))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, x, g)  # the explicit composition detaches the parameters: x's gradient
    (want,) = torch.autograd.grad(ref, x, g)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_rows_of_both_steps_sum_to_one():
    """Constant values V = c: the output is c iff every row of both attention steps sums to one."""
    m = _module(24, 3, 9, (6, 6), prefix=1)
    _randomize(m, scale=2.0)  # large biases: the rows still normalise
    c = torch.randn(24, dtype=D64)
    with torch.no_grad():
        m.qkv.weight[48:].zero_()
        m.qkv.bias[48:] = c
        m.dwc.weight.zero_()
        m.dwc.bias.zero_()
        m.proj.weight.copy_(torch.eye(24, dtype=D64))
        m.proj.bias.zero_()
    x = torch.randn(3, 1 + 5 * 7, 24, dtype=D64)
    out = m(x, (5, 7))
    torch.testing.assert_close(out, c.expand_as(out), rtol=1e-12, atol=1e-12)


def test_agents_are_pooled_from_the_grid_queries(monkeypatch):
    m = _module(32, 4, 16, (8, 8), prefix=1)
    _randomize(m)
    seen = []
    real = kernels_agent.attention

    def spy(q, k, v, **kwargs):
        seen.append(q)
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(kernels_agent, "attention", spy)
    x = torch.randn(2, 1 + 6 * 10, 32, dtype=D64)
    m(x, (6, 10))
    agents = seen[0]  # the first step's queries: (B, h, n, d)
    q = x @ m.qkv.weight[:32].T + m.qkv.bias[:32]
    expect = q[:, 1:].transpose(1, 2).reshape(2, 32, 6, 10)
    for b in range(2):
        pooled = agents[b].transpose(-1, -2).reshape(32, 16)
        torch.testing.assert_close(pooled, _adaptive_pool(expect[b], 4))


def test_both_steps_go_through_kernels_attention(monkeypatch):
    """Two calls with the skinny shapes and dense biases broadcastable to (B, H, Nq, Nk)."""
    calls = []
    real = kernels_agent.attention

    def spy(q, k, v, **kwargs):
        calls.append((tuple(q.shape), tuple(k.shape), tuple(v.shape), tuple(kwargs["bias"].shape)))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(kernels_agent, "attention", spy)
    m = _module(48, 3, 49, (14, 14), prefix=1)
    m(torch.randn(2, 197, 48, dtype=D64), (14, 14))
    assert calls == [((2, 3, 49, 16), (2, 3, 197, 16), (2, 3, 197, 16), (1, 3, 49, 197)),
                     ((2, 3, 197, 16), (2, 3, 49, 16), (2, 3, 49, 16), (1, 3, 197, 49))]


def test_parameter_shapes_follow_the_reference():
    m = AgentAttention(192, num_heads=3, agent_num=49, bias_grid=(14, 14), num_prefix_tokens=1, qkv_bias=True)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {
        "qkv.weight": (576, 192), "qkv.bias": (576,), "proj.weight": (192, 192), "proj.bias": (192,),
        "dwc.weight": (192, 1, 3, 3), "dwc.bias": (192,),
        "an_bias": (3, 49, 7, 7), "na_bias": (3, 49, 7, 7),
        "ah_bias": (1, 3, 49, 14, 1), "aw_bias": (1, 3, 49, 1, 14),
        "ha_bias": (1, 3, 14, 1, 49), "wa_bias": (1, 3, 1, 14, 49),
        "ac_bias": (1, 3, 49, 1), "ca_bias": (1, 3, 1, 49),
    }
    biases = torch.cat([p.flatten() for n, p in m.named_parameters() if n.endswith("_bias")])
    assert 0.015 < biases.std() < 0.025 and abs(biases.mean()) < 0.002  # timm trunc_normal_(std=.02), as the reference


def test_spatial_reduction_matches_explicit():
    """Agent-PVT's K/V reduction: stride-2 conv + LayerNorm before k/v, V upsampled back for the DWC."""
    m = AgentAttention(16, num_heads=2, agent_num=4, bias_grid=(6, 8), qkv_bias=True, sr_ratio=2, dtype=D64).eval()
    _randomize(m)
    with torch.no_grad():
        m.norm.weight.copy_(1 + 0.3 * torch.randn(16, dtype=D64))
    H, W, C, h, d = 6, 8, 16, 2, 8
    x = torch.randn(2, H * W, C, dtype=D64)
    out = m(x, (H, W))
    b1, b2 = m.agent_bias((H, W), (3, 4))
    for b in range(2):
        q = x[b] @ m.q.weight.T + m.q.bias
        g = x[b].T.reshape(C, H, W)
        red = torch.einsum("ciajb,ocab->oij", g.reshape(C, 3, 2, 4, 2), m.sr.weight) + m.sr.bias[:, None, None]
        red = red.reshape(C, 12).T  # (12, C)
        red = (red - red.mean(-1, keepdim=True)) / torch.sqrt(red.var(-1, unbiased=False, keepdim=True) + 1e-5)
        red = red * m.norm.weight + m.norm.bias
        kv = red @ m.kv.weight.T + m.kv.bias
        k, v = kv[:, :C], kv[:, C:]
        agents = _adaptive_pool(q.T.reshape(C, H, W), 2).T
        o = torch.zeros_like(q)
        for head in range(h):
            sl = slice(head * d, (head + 1) * d)
            va = _softmax(agents[:, sl] @ k[:, sl].T * d ** -0.5 + b1[0, head]) @ v[:, sl]
            o[:, sl] = _softmax(q[:, sl] @ agents[:, sl].T * d ** -0.5 + b2[0, head]) @ va
        v_up = _resize2d(v.T.reshape(C, 3, 4), (H, W))
        o = o + _dwconv3x3(v_up, m.dwc.weight, m.dwc.bias).reshape(C, H * W).T
        torch.testing.assert_close(out[b], o @ m.proj.weight.T + m.proj.bias, rtol=1e-10, atol=1e-10)
    assert b1.shape == (1, 2, 4, 12) and b2.shape == (1, 2, 48, 4)


def test_gradients_reach_input_and_biases():
    m = _module(8, 2, 4, (3, 4), prefix=1)
    _randomize(m)
    x = torch.randn(1, 1 + 5 * 2, 8, dtype=D64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: m(t, (5, 2)), (x,))
    m(x, (5, 2)).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


def test_float32_matches_float64():
    m = _module(32, 2, 9, (7, 7), prefix=1)
    _randomize(m)
    x = torch.randn(2, 1 + 7 * 9, 32, dtype=D64)
    ref = m(x, (7, 9))
    out = m.float()(x.float(), (7, 9))
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kwargs,match", [
    (dict(dim=30, num_heads=4), "num_heads"),
    (dict(dim=32, num_heads=4, agent_num=10), "agent_num"),
    (dict(dim=32, num_heads=4, agent_num=0), "agent_num"),
    (dict(dim=32, num_heads=4, bias_grid=(0, 4)), "bias_grid"),
    (dict(dim=32, num_heads=4, num_prefix_tokens=-1), "num_prefix_tokens"),
    (dict(dim=32, num_heads=4, sr_ratio=0), "sr_ratio"),
    (dict(dim=32, num_heads=4, sr_ratio=2, num_prefix_tokens=1), "sr_ratio"),
])
def test_constructor_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AgentAttention(**kwargs)


def test_triton_backend_matches_reference_when_it_can_run(monkeypatch):
    """backend='triton' (the fused kernels in inference: CUDA, or CPU under TRITON_INTERPRET=1) vs the reference."""
    pytest.importorskip("triton")
    from kernels.backends.triton_attention import _interpret

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not _interpret():
        pytest.skip("the fused kernels need CUDA or TRITON_INTERPRET=1")
    m = AgentAttention(64, num_heads=2, agent_num=16, bias_grid=(9, 7), num_prefix_tokens=1, qkv_bias=True,
                       device=device).eval()
    _randomize(m)
    x = torch.randn(2, 1 + 9 * 7, 64, device=device)
    with torch.no_grad():
        ref = m(x, (9, 7))
        m.backend = "triton"
        composition = kernels_agent._composition
        monkeypatch.setattr(kernels_agent, "_composition", None)  # the fused path must run: a fallback raises
        out = m(x, (9, 7))
        monkeypatch.setattr(kernels_agent, "_composition", composition)
    torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3)


def test_inference_tensor_parameters_run_uncached():
    """Parameters made under `torch.inference_mode()` have no version counters: the bias cache is skipped."""
    model = zoo.create_model("test_agent_deit").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    with torch.inference_mode():
        frozen = zoo.create_model("test_agent_deit").eval()
        frozen.load_state_dict(model.state_dict())
        out = frozen(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_inference_plan_follows_inputs_and_parameters():
    """Inference reuses one launch plan per input shape (CUDA; here on CPU with backend='triton', Triton's
    interpreter): fresh inputs, in-place parameter changes (biases rebuild the plan, conv weights are read at
    launch), another batch and autocast all match the reference path."""
    pytest.importorskip("triton")
    from kernels.backends.triton_attention import _interpret

    cuda = torch.cuda.is_available()
    if not cuda and not _interpret():
        pytest.skip("the fused kernels need CUDA or TRITON_INTERPRET=1")
    device, backend = ("cuda", None) if cuda else ("cpu", "triton")
    B, grid, n = (32, (14, 14), 49) if cuda else (2, (5, 6), 9)
    m = AgentAttention(96, num_heads=3, agent_num=n, bias_grid=grid, num_prefix_tokens=1, qkv_bias=True,
                       device=device).eval()
    _randomize(m)
    m.backend = backend
    tokens = 1 + grid[0] * grid[1]

    def check(x, tol=1e-4):
        out = m(x, grid)
        m.backend = "reference"
        ref = m(x, grid)
        m.backend = backend
        assert ((out.double() - ref.double()).norm() / ref.double().norm()).item() < tol
        return out

    with torch.no_grad():
        x = torch.randn(B, tokens, 96, device=device)
        first = check(x)  # builds the plan: Triton's ordinary launch
        torch.testing.assert_close(m(x, grid), first, rtol=0, atol=0)  # the prepared launch: the same kernel
        for _ in range(2):
            check(torch.randn(B, tokens, 96, device=device))
        plan = m._plan
        assert plan[1] is not None  # the fused kernels run (CUDA: enough (batch, head) pairs)
        m.an_bias.add_(torch.randn_like(m.an_bias))
        check(torch.randn(B, tokens, 96, device=device))
        assert m._plan is not plan
        m.dwc.weight.mul_(-2.0)
        check(torch.randn(B, tokens, 96, device=device))
        check(torch.randn(B + 1, tokens, 96, device=device))
        if cuda:
            with torch.autocast("cuda", torch.bfloat16):
                check(torch.randn(B, tokens, 96, device=device), tol=2e-2)


def test_copies_and_pickles_leave_the_launch_plan_behind():
    """`copy.deepcopy` (EMA) and pickling (`torch.save(model)`) of a layer that has run inference: the plan
    (compiled kernels, the original's tensors) is not copied; the copy builds its own and matches the original."""
    import copy
    import pickle

    pytest.importorskip("triton")
    from kernels.backends.triton_attention import _interpret

    cuda = torch.cuda.is_available()
    if not cuda and not _interpret():
        pytest.skip("the fused kernels need CUDA or TRITON_INTERPRET=1")
    device = "cuda" if cuda else "cpu"
    m = AgentAttention(32, num_heads=2, agent_num=4, bias_grid=(4, 4), num_prefix_tokens=1, device=device).eval()
    _randomize(m)
    m.backend = "triton"
    x = torch.randn(2, 17, 32, device=device)
    with torch.no_grad():
        out = m(x, (4, 4))
        assert m.__dict__.get("_plan") is not None
        twin = copy.deepcopy(m)
        assert "_plan" not in twin.__dict__
        loaded = pickle.loads(pickle.dumps(m))
        assert "_plan" not in loaded.__dict__
        for other in (twin, loaded):
            torch.testing.assert_close(other(x, (4, 4)), out, rtol=1e-5, atol=1e-5)
