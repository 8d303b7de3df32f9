"""kernels.capture and kernels.attention_probs: captured probabilities against float64 softmax of each module's own
q/k, head/row/call selection, edits recomputed by hand, dispatch counts outside the selection, cleanup, errors."""
import math
import sys

import pytest
import torch
from torch import nn

import kernels
from zoo.layers import AgentAttention, Attention

capture_module = sys.modules["kernels.capture"]  # `kernels.capture` the attribute is the function
backends_module = sys.modules["kernels.backends"]
F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------------------- helpers

class Block(nn.Module):
    def __init__(self, dim, heads, pattern):
        super().__init__()
        self.norm = nn.LayerNorm(dim, dtype=F64)
        self.attn = Attention(dim, heads, qkv_bias=True, qk_norm=True, pattern=pattern, dtype=F64)

    def forward(self, x):
        return x + self.attn(self.norm(x))


class TinyNet(nn.Module):
    """Three pre-norm attention blocks over 12 tokens on a 3×4 grid: dense, 1-d window, 2-d neighbourhood."""

    def __init__(self, dim=16, heads=4):
        super().__init__()
        patterns = [None, kernels.Window1d(2, 1), kernels.Neighborhood((3, 4), (3, 3))]
        self.blocks = nn.ModuleList([Block(dim, heads, p) for p in patterns])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def attn_qkv(attn: Attention, x):
    """The q, k, v `(B, H, N, hd)` an `Attention` module computes for its input x, in float64."""
    B, N, C = x.shape
    q, k, v = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def softmax_ref(q, k, visible, scale=None, bias=None):
    """Float64 masked softmax with torch.softmax; fully hidden rows give zeros. Returns (probs, logits)."""
    q, k = q.double(), k.double()
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = torch.einsum("bhid,bhjd->bhij", q, k) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if bias is not None:
        logits = logits + bias.double()
    logits = logits.masked_fill(~visible, -math.inf)
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    return probs, logits


def module_inputs(model, names):
    """Record the input of each named module with plain forward pre-hooks (independent of kernels.capture)."""
    seen, handles = {}, []
    for name in names:
        module = model.get_submodule(name)
        handles.append(module.register_forward_pre_hook(
            lambda m, args, name=name: seen.setdefault(name, []).append(args[0].detach())))
    return seen, handles


@pytest.fixture
def counts(monkeypatch):
    """Count calls of the reference backend (as dispatched by choose_backend) and of the capture's explicit path."""
    n = {"backend": 0, "explicit": 0}
    backend_fn, explicit_fn = backends_module.attention_reference, capture_module._explicit

    def backend(*a, **kw):
        n["backend"] += 1
        return backend_fn(*a, **kw)

    def explicit(*a, **kw):
        n["explicit"] += 1
        return explicit_fn(*a, **kw)

    monkeypatch.setattr(backends_module, "attention_reference", backend)
    monkeypatch.setattr(capture_module, "_explicit", explicit)
    return n


def zero_column_edit(col):
    """Zero key column `col` and renormalise each row over the keys left (rows left with no mass stay zero)."""
    def edit(probs, info):
        p = probs.clone()
        p[..., col] = 0
        return p / p.sum(-1, keepdim=True).clamp_min(1e-300)
    return edit


# --------------------------------------------------------------------------------------------- probabilities

def test_captured_probs_equal_explicit_softmax_of_module_qk():
    model = TinyNet()
    x = torch.randn(2, 12, 16, dtype=F64)
    names = [f"blocks.{i}.attn" for i in range(3)]
    expected = model(x)
    inputs, handles = module_inputs(model, names)
    with kernels.capture(model, names, logits=True) as cap:
        out = model(x)
    for h in handles:
        h.remove()
    assert torch.equal(out, expected)  # no edit: the normal path's output, untouched
    assert [(r.module, r.forward, r.call) for r in cap.records] == [(n, 0, 0) for n in names]
    for name, rec in zip(names, cap.records):
        attn = model.get_submodule(name)
        q, k, _ = attn_qkv(attn, inputs[name][0])
        visible = (attn.pattern or kernels.Dense()).mask(12, 12)
        ref, ref_logits = softmax_ref(q, k, visible)
        assert rec.shape == (2, 4, 12, 12) and rec.probs.dtype == F64
        torch.testing.assert_close(rec.probs, ref, **TOL)
        torch.testing.assert_close(rec.logits, ref_logits, **TOL)
        torch.testing.assert_close(rec.probs.sum(-1), torch.ones(2, 4, 12, dtype=F64), **TOL)
        assert (rec.probs[..., ~visible] == 0).all() and (rec.probs[..., visible] > 0).all()
        assert torch.isneginf(rec.logits[..., ~visible]).all() and torch.isfinite(rec.logits[..., visible]).all()
        assert rec.edited is None and not rec.probs.requires_grad
    assert cap.find("blocks.1.attn")[0] is cap.records[1]


@pytest.mark.parametrize("heads,rows,want_heads,want_rows", [
    (None, None, [0, 1, 2, 3], list(range(12))),
    ([2, 0], -1, [2, 0], [11]),
    (1, slice(1, None, 4), [1], [1, 5, 9]),
    (torch.tensor([-1]), torch.tensor([0, 7, 3]), [3], [0, 7, 3]),
    (range(1, 3), [4, -2], [1, 2], [4, 10]),
])
def test_head_and_row_selection(heads, rows, want_heads, want_rows):
    model = TinyNet()
    x = torch.randn(1, 12, 16, dtype=F64)
    with kernels.capture(model, ["blocks.2.attn"], logits=True) as full:
        model(x)
    with kernels.capture(model, "blocks.2.attn", heads=heads, rows=rows, logits=True) as cap:
        model(x)
    (rec,), (ref,) = cap.records, full.records
    assert rec.heads.tolist() == want_heads and rec.rows.tolist() == want_rows
    assert rec.probs.shape == (1, len(want_heads), len(want_rows), 12)
    sel = (slice(None), torch.tensor(want_heads)[:, None], torch.tensor(want_rows)[None, :])
    torch.testing.assert_close(rec.probs, ref.probs[sel], rtol=0, atol=1e-14)
    torch.testing.assert_close(rec.logits, ref.logits[sel], rtol=0, atol=1e-14)


@pytest.mark.parametrize("pattern,nq,nk", [
    (kernels.Causal(), 7, 10),
    (kernels.Causal(), 9, 6),  # first rows see nothing: zeros
    (kernels.Window1d(1, 2), 11, 11),
    (kernels.Neighborhood((3, 5), (2, 3)), 15, 15),
    (kernels.Neighborhood((4, 3, 5), (3, 2, 3), dilation=(1, 1, 2), inward=False, causal_axes=(0,)), 60, 60),
    (kernels.Halo((4, 2), block=2, halo=1), 8, 24),
])
def test_attention_probs_rows_respect_pattern(pattern, nq, nk):
    q = torch.randn(2, 4, nq, 8, dtype=F64)
    k = torch.randn(2, 2, nk, 8, dtype=F64)  # GQA
    bias = torch.randn(4, nq, nk, dtype=F64)
    rows = torch.randperm(nq)[: max(1, nq // 2)]
    visible = pattern.mask(nq, nk)
    ref, ref_logits = softmax_ref(q, k, visible, scale=0.4, bias=bias)
    probs, logits = kernels.attention_probs(q, k, pattern, bias=bias, scale=0.4, heads=[3, 1], rows=rows,
                                            return_logits=True)
    sel = (slice(None), torch.tensor([3, 1])[:, None], rows[None, :])
    torch.testing.assert_close(probs, ref[sel], **TOL)
    torch.testing.assert_close(logits, ref_logits[sel], **TOL)
    seen = visible[rows].any(-1)
    torch.testing.assert_close(probs.sum(-1), seen.to(F64).expand_as(probs.sum(-1)), **TOL)
    assert (probs[..., ~visible[rows]] == 0).all()


def test_attention_probs_dtype_and_gradient():
    q, k = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 7, 8)
    probs = kernels.attention_probs(q.half(), k.half(), kernels.Causal())
    assert probs.dtype == torch.float32
    ref, _ = softmax_ref(q.half(), k.half(), kernels.Causal().mask(5, 7))
    torch.testing.assert_close(probs.double(), ref, rtol=1e-5, atol=1e-6)
    q64 = torch.randn(1, 2, 4, 3, dtype=F64, requires_grad=True)
    k64 = torch.randn(1, 1, 4, 3, dtype=F64, requires_grad=True)
    weights = torch.randn(1, 1, 2, 4, dtype=F64)
    torch.autograd.gradcheck(lambda a, b: (kernels.attention_probs(a, b, kernels.Causal(), rows=[1, 3]) * weights),
                             (q64, k64))


# ---------------------------------------------------------------------------------------------------- edits

@pytest.mark.parametrize("heads,rows", [(None, None), ([3, 1], [0, 5, -1]), (2, slice(None))])
def test_identity_edit_keeps_output(heads, rows):
    model = TinyNet()
    x = torch.randn(2, 12, 16, dtype=F64)
    expected = model(x)
    with kernels.capture(model, Attention, heads=heads, rows=rows, edit=lambda p, info: p) as cap:
        out = model(x)
    torch.testing.assert_close(out, expected, **TOL)
    assert len(cap.records) == 3 and all(torch.equal(r.edited, r.probs) for r in cap.records)


@pytest.mark.parametrize("heads,rows", [([1, 3], [0, 4, -1]), (None, None)])
def test_zero_column_edit_matches_hand_recomputation(heads, rows):
    model = TinyNet()
    x = torch.randn(2, 12, 16, dtype=F64)
    col, infos = 5, []
    edit = zero_column_edit(col)

    def spy(probs, info):
        infos.append(info)
        return edit(probs, info)

    with kernels.capture(model, ["blocks.1.attn"], heads=heads, rows=rows, edit=spy) as cap:
        out = model(x)

    # by hand: block 0 as is; block 1 with the edited probabilities on the chosen heads/rows; block 2 as is
    b0, b1, b2 = model.blocks
    x1 = b0(x)
    attn = b1.attn
    q, k, v = attn_qkv(attn, b1.norm(x1))
    visible = attn.pattern.mask(12, 12)
    probs, _ = softmax_ref(q, k, visible)
    hs = list(range(4)) if heads is None else heads
    rs = list(range(12)) if rows is None else [r % 12 for r in rows]
    sel = (slice(None), torch.tensor(hs)[:, None], torch.tensor(rs)[None, :])
    edited = probs.clone()
    part = edited[sel].clone()
    part[..., col] = 0
    edited[sel] = part / part.sum(-1, keepdim=True)
    y = (edited @ v).transpose(1, 2).reshape(2, 12, 16)
    x2 = x1 + attn.proj(y)
    torch.testing.assert_close(out, b2(x2), **TOL)
    assert not torch.allclose(out, model(x), atol=1e-6)  # the edit changed something

    (info,) = infos
    assert (info.module, info.forward, info.call, info.shape) == ("blocks.1.attn", 0, 0, (2, 4, 12, 12))
    assert info.heads.tolist() == hs and info.rows.tolist() == rs
    assert torch.equal(info.visible, visible[rs])
    (rec,) = cap.records
    torch.testing.assert_close(rec.probs, probs[sel], **TOL)
    torch.testing.assert_close(rec.edited, edited[sel], **TOL)
    assert (rec.edited[..., col] == 0).all()


class Direct(nn.Module):
    """Calls kernels.attention on given tensors (GQA, bias, gate, pattern, lse), so edits can be checked exactly."""

    def forward(self, q, k, v, **kw):
        return kernels.attention(q, k, v, **kw)


class LowRankBias:
    """A factorized bias u vᵀ per head, materialised on demand (the op's `materialize(q, k)` protocol)."""

    def __init__(self, u, w):
        self.u, self.w = u, w

    def materialize(self, q, k):
        return (self.u @ self.w.transpose(-1, -2)).to(q.dtype)  # (1, H, Nq, Nk)


@pytest.mark.parametrize("heads,rows,gate_kind,fast_calls", [
    ([3, 0], [6, 0, 2], "head", 1),
    (None, [4], "element", 1),
    (None, None, "head", 0),  # every head and row recomputed: the fast path is skipped
    ([1, 0, 2, 3], None, "element", 1),  # every head, permuted: still scattered back in place
])
def test_edit_with_gqa_bias_gate_and_lse(counts, heads, rows, gate_kind, fast_calls):
    B, H, Hkv, Nq, Nk, D, Dv = 2, 4, 2, 7, 9, 8, 5
    q = torch.randn(B, H, Nq, D, dtype=F64)
    k, v = torch.randn(B, Hkv, Nk, D, dtype=F64), torch.randn(B, Hkv, Nk, Dv, dtype=F64)
    u, w = torch.randn(1, H, Nq, 2, dtype=F64), torch.randn(1, H, Nk, 2, dtype=F64)
    gate = torch.randn(B, Nq, H, dtype=F64) if gate_kind == "head" else torch.randn(B, Nq, H, Dv, dtype=F64)
    pattern = kernels.Causal()
    kw = dict(pattern=pattern, bias=LowRankBias(u, w), gate=gate, scale=0.3, return_lse=True)
    base_out, base_lse = kernels.attention(q, k, v, **kw)
    col_weight = torch.rand(Nk, dtype=F64) + 0.5

    def edit(p, info):  # reweight keys and renormalise (an ACT/VAR-like redistribution)
        p = p * col_weight
        return p / p.sum(-1, keepdim=True).clamp_min(1e-300)

    module = Direct()
    counts["backend"] = 0
    with kernels.capture(module, "", heads=heads, rows=rows, edit=edit):
        out, lse = module(q, k, v, **kw)
    assert counts == {"backend": fast_calls, "explicit": 1}

    visible = pattern.mask(Nq, Nk)
    probs, _ = softmax_ref(q, k, visible, scale=0.3, bias=u @ w.transpose(-1, -2))
    hs = list(range(H)) if heads is None else heads
    rs = list(range(Nq)) if rows is None else rows
    sel = (slice(None), torch.tensor(hs)[:, None], torch.tensor(rs)[None, :])
    edited = probs.clone()
    edited[sel] = edit(probs[sel], None)
    ref = edited @ v.repeat_interleave(2, dim=1)
    g = gate.permute(0, 2, 1)[..., None] if gate_kind == "head" else gate.permute(0, 2, 1, 3)
    ref = ref * torch.sigmoid(g)
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(lse, base_lse, **TOL)  # lse of the unedited logits
    untouched = torch.ones(B, H, Nq, Dv, dtype=torch.bool)
    untouched[sel] = False
    assert torch.equal(out[untouched], base_out[untouched])


def test_edit_is_differentiable_and_works_under_no_grad():
    model = TinyNet(dim=8, heads=2)
    x = torch.randn(1, 12, 8, dtype=F64, requires_grad=True)
    alpha = torch.tensor([0.7], dtype=F64, requires_grad=True)

    def edit(p, info):  # move a learnable share of each row's mass onto its first visible key
        first = info.visible.to(p.dtype).cumsum(-1).eq(1) & info.visible
        return p * (1 - alpha) + alpha * first.to(p.dtype)

    def f(x, alpha, **kw):
        with kernels.capture(model, ["blocks.1.attn", "blocks.2.attn"], heads=[1], rows=slice(0, 12, 2), edit=edit,
                             **kw) as cap:
            return model(x), cap

    torch.autograd.gradcheck(lambda x, alpha: f(x, alpha)[0], (x, alpha))
    with torch.no_grad():
        out, cap = f(x, alpha, logits=True)
    assert not out.requires_grad and len(cap.records) == 2 and cap.records[0].logits.shape == (1, 1, 6, 12)
    torch.testing.assert_close(out, f(x, alpha)[0], **TOL)
    with kernels.capture(model, ["blocks.0.attn"], detach=False, offload=True) as cap:
        model(x)
    (rec,) = cap.records
    assert rec.probs.requires_grad and rec.probs.device.type == "cpu"
    rec.probs[0, 0, 3, 4].backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------- dispatch

def test_unselected_modules_keep_their_backend(counts):
    model = TinyNet()
    x = torch.randn(1, 12, 16, dtype=F64)
    model(x)
    assert counts == {"backend": 3, "explicit": 0}
    with kernels.capture(model, ["blocks.1.attn"]) as cap:
        model(x)
    assert counts == {"backend": 6, "explicit": 1} and len(cap.records) == 1
    with kernels.capture(model, ["blocks.1.attn"], edit=lambda p, i: p):  # full edit: only the explicit path
        model(x)
    assert counts == {"backend": 8, "explicit": 2}
    model(x)  # after exit: plain dispatch again, nothing recorded
    assert counts == {"backend": 11, "explicit": 2} and len(cap.records) == 1


def test_selected_call_on_triton_keeps_the_kernel_for_the_rest():
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: Triton's interpreter (tests/kernels/conftest.py)
    pattern = kernels.Neighborhood((4, 6), (3, 3))
    q, k, v = (torch.randn(1, 2, 24, 16, device=device) for _ in range(3))
    kernel_out = kernels.attention(q, k, v, pattern, backend="triton")
    module = Direct()
    with kernels.capture(module, "", heads=[1], rows=[0, 5, 23], edit=zero_column_edit(7)) as cap:
        out = module(q, k, v, pattern=pattern, backend="triton")
    sel = (slice(None), torch.tensor([1])[:, None], torch.tensor([0, 5, 23])[None, :])
    untouched = torch.ones_like(out, dtype=torch.bool)
    untouched[sel] = False
    assert torch.equal(out[untouched], kernel_out[untouched])  # everything not selected: the kernel's own output
    probs, _ = softmax_ref(q.cpu(), k.cpu(), pattern.mask(24, 24))
    edited = zero_column_edit(7)(probs[sel], None)
    torch.testing.assert_close(cap.records[0].probs.cpu().double(), probs[sel], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[sel].cpu().double(), edited @ v.cpu().double()[:, 1:2], rtol=1e-5, atol=1e-5)


def test_calls_within_one_forward_and_module_reuse(counts):
    agent = AgentAttention(16, num_heads=2, agent_num=4, bias_grid=(3, 4), dtype=F64)
    x = torch.randn(2, 12, 16, dtype=F64)
    with kernels.capture(agent, "") as cap:
        agent(x, (3, 4))
    assert [(r.call, r.shape) for r in cap.records] == [(0, (2, 2, 4, 12)), (1, (2, 2, 12, 4))]
    torch.testing.assert_close(cap.records[1].probs.sum(-1), torch.ones(2, 2, 12, dtype=F64), **TOL)
    counts.update(backend=0, explicit=0)
    with kernels.capture(agent, "", calls=1, rows=-1) as cap:
        agent(x, (3, 4))
    assert [(r.call, r.probs.shape) for r in cap.records] == [(1, (2, 2, 1, 4))]
    assert counts == {"backend": 2, "explicit": 1}

    class Twice(nn.Module):  # one block applied twice per forward
        def __init__(self):
            super().__init__()
            self.block = Block(16, 4, None)

        def forward(self, x):
            return self.block(self.block(x))

    model = Twice()
    inputs, handles = module_inputs(model, ["block.attn"])
    with kernels.capture(model, ["block.attn"]) as cap:
        model(x)
        model(x)
    for h in handles:
        h.remove()
    assert [(r.forward, r.call) for r in cap.records] == [(0, 0), (1, 0), (2, 0), (3, 0)]
    for rec, inp in zip(cap.records, inputs["block.attn"]):
        q, k, _ = attn_qkv(model.block.attn, inp)
        torch.testing.assert_close(rec.probs, softmax_ref(q, k, torch.ones(12, 12, dtype=torch.bool))[0], **TOL)
    assert not torch.allclose(cap.records[0].probs, cap.records[1].probs)
    assert [r.forward for r in cap.find("block.attn", forward=2)] == [2]
    cap.clear()
    assert cap.records == []


def test_nested_modules_and_nested_captures():
    model = TinyNet()
    x = torch.randn(1, 12, 16, dtype=F64)
    with kernels.capture(model, ["blocks.0"]) as cap:  # a block: its attention call is recorded under the block
        model(x)
    assert [r.module for r in cap.records] == ["blocks.0"]
    with kernels.capture(model, ["blocks.0", "blocks.0.attn"]) as cap:  # the innermost selected module wins
        model(x)
    assert [r.module for r in cap.records] == ["blocks.0.attn"]
    with kernels.capture(model, ["blocks.0.attn", "blocks.2.attn"], rows=0) as outer:
        with kernels.capture(model, ["blocks.0.attn"], heads=1) as inner:
            model(x)
        model(x)
    # read-only captures nest: each records the calls of its own selection
    assert [r.module for r in inner.records] == ["blocks.0.attn"] and inner.records[0].probs.shape[1] == 1
    assert [(r.module, r.forward) for r in outer.records] == [("blocks.0.attn", 0), ("blocks.2.attn", 0),
                                                               ("blocks.0.attn", 1), ("blocks.2.attn", 1)]
    assert outer.records[0].probs.shape[1:3] == (4, 1)
    torch.testing.assert_close(outer.records[0].probs[:, 1], inner.records[0].probs[:, 0, :1])
    # an edit nested with another capture of the same call would be ambiguous: an error, never a dropped edit
    zero = lambda p, info: torch.zeros_like(p)  # noqa: E731
    for edits in ((True, False), (False, True)):
        with kernels.capture(model, ["blocks.0"], edit=zero if edits[0] else None):
            with kernels.capture(model, ["blocks.0.attn"], edit=zero if edits[1] else None):
                with pytest.raises(RuntimeError, match="one of them edits"):
                    model(x)
    assert capture_module.ACTIVE == 0


def test_records_are_float32_under_autocast():
    """VAR/CARVE run under autocast: the captured math and the reference backend stay float32 (under autocast
    their matmuls would otherwise run in bf16: errors ~1e-2 instead of ~1e-7)."""

    class Call(nn.Module):
        def forward(self, q, k, v):
            return kernels.attention(q, k, v, return_lse=True, backend="reference")

    q, k, v = (torch.randn(1, 2, 12, 16).to(torch.bfloat16) for _ in range(3))
    probs64, _ = softmax_ref(q, k, torch.ones(12, 12, dtype=torch.bool))
    lse64 = torch.logsumexp(torch.einsum("bhid,bhjd->bhij", q.double(), k.double()) * 0.25, dim=-1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, lse = Call()(q, k, v)
    call = Call()
    with torch.autocast("cpu", dtype=torch.bfloat16), kernels.capture(call, "", logits=True) as cap:
        call(q, k, v)
    rec = cap.records[0]
    assert rec.probs.dtype == torch.float32 and rec.logits.dtype == torch.float32
    assert (rec.probs.double() - probs64).abs().max() < 1e-5
    assert lse.dtype == torch.float32 and (lse.double() - lse64).abs().max() < 1e-4


def test_no_leakage_after_exit_or_errors():
    model = TinyNet()
    x = torch.randn(1, 12, 16, dtype=F64)
    attn = model.blocks[1].attn
    hooks = lambda: (len(attn._forward_pre_hooks), len(attn._forward_hooks))  # noqa: E731
    before = hooks()
    cap = kernels.capture(model, ["blocks.1.attn"])
    with cap:
        assert hooks() != before and capture_module.ACTIVE == 1 and cap.active
        with pytest.raises(RuntimeError, match="already open"):
            cap.__enter__()
        model(x)
    assert hooks() == before and capture_module.ACTIVE == 0 and not cap.active
    model(x)
    assert len(cap.records) == 1

    with pytest.raises(KeyError, match="boom"):
        with kernels.capture(model, ["blocks.1.attn"]):
            raise KeyError("boom")
    assert hooks() == before and capture_module.ACTIVE == 0

    def bad_edit(p, info):
        raise ArithmeticError("edit failed")

    with kernels.capture(model, ["blocks.1.attn"], edit=bad_edit):  # error inside a selected module's forward
        with pytest.raises(ArithmeticError, match="edit failed"):
            model(x)
        assert capture_module.current_frame() is None  # the frame was popped on the way out
    assert hooks() == before and capture_module.ACTIVE == 0 and capture_module.current_frame() is None
    def close_early(p, info):  # a capture closed from inside a selected module's forward leaves no frame behind
        early.__exit__(None, None, None)
        return p

    with kernels.capture(model, ["blocks.1.attn", "blocks.2.attn"], edit=close_early) as early:
        model(x)
    assert len(early.records) == 1 and capture_module.current_frame() is None and hooks() == before
    with kernels.capture(model, ["blocks.1.attn"], record=False, edit=zero_column_edit(0)) as cap:
        edited = model(x)
    assert cap.records == [] and not torch.allclose(edited, model(x))


def test_compile_fullgraph_with_no_capture_open():
    def f(q, k, v):
        return kernels.attention(q, k, v, kernels.Causal()).sum()

    q, k, v = (torch.randn(1, 2, 6, 4) for _ in range(3))
    compiled = torch.compile(f, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(q, k, v), f(q, k, v))


# ---------------------------------------------------------------------------------------------------- errors

BAD_CAPTURE = [
    (dict(model="net"), TypeError, "model must be a torch.nn.Module"),
    (dict(modules=["blocks.9.attn"]), ValueError, "no submodule named 'blocks.9.attn'"),
    (dict(modules=3), TypeError, "modules must be"),
    (dict(modules=[]), TypeError, "modules must be"),
    (dict(modules=int), TypeError, "nn.Module subclasses"),
    (dict(modules=lambda n, m: False), ValueError, "selects no module"),
    (dict(heads=1.5), TypeError, "heads must be"),
    (dict(heads=[0, True]), TypeError, "heads must be"),
    (dict(heads=torch.tensor([0.0])), TypeError, "heads must be a 1-d integer tensor"),
    (dict(heads={"blocks.0.attn": 1}), ValueError, "missing keys"),
    (dict(rows="last"), TypeError, "rows must be"),
    (dict(rows=[]), ValueError, "rows must select at least one"),
    (dict(calls=-1), ValueError, "calls must select call indices >= 0"),
    (dict(calls="0"), TypeError, "calls must be"),
    (dict(logits="yes"), TypeError, "logits must be a bool"),
    (dict(offload=1), TypeError, "offload must be a bool"),
    (dict(edit="zero"), TypeError, "edit must be a callable"),
]


@pytest.mark.parametrize("override,exc,msg", BAD_CAPTURE)
def test_bad_capture_arguments(override, exc, msg):
    args = dict(model=TinyNet(), modules=["blocks.1.attn"])
    args.update(override)
    with pytest.raises(exc, match=msg):
        kernels.capture(**args)


BAD_CALL = [
    (dict(heads=[0, 4]), ValueError, r"heads must index 4 entries \(query heads of 'blocks.1.attn' call 0\)"),
    (dict(rows=[12]), ValueError, "rows must index 12 entries"),
    (dict(rows=[3, -9]), ValueError, "rows must not repeat"),
    (dict(rows=slice(5, 2)), ValueError, "rows selects no index"),
    (dict(edit=lambda p, i: p.tolist()), TypeError, "edit must return a tensor"),
    (dict(edit=lambda p, i: p[:, :1]), ValueError, r"edit must return probabilities of shape \(1, 4, 12, 12\)"),
]


@pytest.mark.parametrize("override,exc,msg", BAD_CALL)
def test_bad_selection_or_edit_raises_at_call_time(override, exc, msg):
    model = TinyNet()
    with kernels.capture(model, ["blocks.1.attn"], **override):
        with pytest.raises(exc, match=msg):
            model(torch.randn(1, 12, 16, dtype=F64))


def test_bad_attention_probs_arguments():
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="q must have layout"):
        kernels.attention_probs(q[0], q)
    with pytest.raises(ValueError, match="heads must index 2"):
        kernels.attention_probs(q, q, heads=2)
    with pytest.raises(TypeError, match="rows must be"):
        kernels.attention_probs(q, q, rows=1.0)
    with pytest.raises(TypeError, match="return_logits"):
        kernels.attention_probs(q, q, return_logits=None)


def test_in_place_edit_leaves_the_record_unedited():
    """An edit may change its input in place; the record still holds the probabilities (and logits) before it."""
    m = Direct()
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))

    def inplace(p, info):
        p[..., 0] = 0
        info.logits[..., 0] = 0
        return p / p.sum(-1, keepdim=True)

    with kernels.capture(m, "", edit=inplace, logits=True) as cap:
        m(q, k, v)
    rec = cap.records[0]
    expected = kernels.attention_probs(q, k)
    torch.testing.assert_close(rec.probs, expected)
    torch.testing.assert_close(rec.logits, torch.matmul(q, k.transpose(-1, -2)) * 8 ** -0.5)
    assert (rec.edited[..., 0] == 0).all()


def test_capture_builds_only_the_selected_rows_of_a_1d_mask(monkeypatch):
    """Causal / Window1d masks for a few captured rows are built row-wise (a 50K-token prefill must not build
    a 50K x 50K mask), and equal the full mask's rows."""
    for pattern in (kernels.Causal(), kernels.Window1d(3, 1)):
        rows = torch.tensor([0, 7, 11])
        full = pattern.mask(12, 15)
        torch.testing.assert_close(pattern.mask_rows(rows, 12, 15), full[rows])
    monkeypatch.setattr(kernels.Causal, "mask", lambda *a, **k: (_ for _ in ()).throw(AssertionError("full mask")))
    q, k, v = (torch.randn(1, 2, 9, 8) for _ in range(3))
    probs = kernels.attention_probs(q, k, kernels.Causal(), rows=-1)
    assert probs.shape == (1, 2, 1, 9) and torch.allclose(probs.sum(-1), torch.ones(1, 2, 1))


def test_rows_as_a_function_of_the_call_shape():
    """VAR's selection: the rows after an image span in the prefill, the single row at each decode step."""
    m = Direct()
    img_end = 4
    picks = lambda nq, nk: slice(img_end, None) if nq > 1 else -1  # noqa: E731
    q, k, v = (torch.randn(1, 2, 7, 8) for _ in range(3))
    with kernels.capture(m, "", rows=picks) as cap:
        m(q, k, v, pattern=kernels.Causal())  # prefill: 7 queries
        m(q[:, :, -1:], k, v, pattern=kernels.Causal())  # decode: 1 query against the 7 keys
    assert cap.records[0].rows.tolist() == [4, 5, 6] and cap.records[1].rows.tolist() == [0]
    torch.testing.assert_close(cap.records[0].probs, kernels.attention_probs(q, k, kernels.Causal(), rows=[4, 5, 6]))
    with pytest.raises(TypeError, match="rows must be"):
        with kernels.capture(m, "", rows=lambda nq, nk: "last"):
            m(q, k, v)


def test_edit_returning_none_is_a_read_only_callback():
    """Retrieval-head scoring: look at every call's probabilities without recording or changing the output (the
    normal backend computes it)."""
    model = TinyNet()
    x = torch.randn(1, 12, 16, dtype=F64)
    expected = model(x)
    seen = []
    with kernels.capture(model, ["blocks.1.attn"], rows=-1, record=False,
                         edit=lambda p, info: seen.append((info.module, p.argmax(-1))) and None) as cap:
        out = model(x)
    assert torch.equal(out, expected) and cap.records == [] and len(seen) == 1
    assert seen[0][0] == "blocks.1.attn" and seen[0][1].shape == (1, 4, 1)
