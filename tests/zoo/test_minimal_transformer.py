"""Minimal transformers (arXiv 2410.13732): each reduced attention form against an independent reference."""
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from scipy.optimize import nnls
from timm.layers import Attention as TimmAttention

import kernels
import zoo
from zoo.layers import MinimalAttention
from zoo.models.minimal_transformer import MinimalViT

F64 = torch.float64


def _softmax_attention(q, k, v, scale):
    """Float64 explicit softmax attention over (B, H, N, D)."""
    logits = torch.einsum("bhnd,bhmd->bhnm", q, k) * scale
    p = torch.exp(logits - logits.amax(-1, keepdim=True))
    return torch.einsum("bhnm,bhmd->bhnd", p / p.sum(-1, keepdim=True), v)


def test_full_equals_timm_attention():
    dim, heads = 24, 3
    ref = TimmAttention(dim, num_heads=heads, qkv_bias=True).to(F64).eval()
    mod = MinimalAttention(dim, heads, qk="full", value_proj=True, qkv_bias=True).to(F64).eval()
    with torch.no_grad():
        for i, lin in enumerate((mod.q, mod.k, mod.v)):
            lin.weight.copy_(ref.qkv.weight[i * dim:(i + 1) * dim])
            lin.bias.copy_(ref.qkv.bias[i * dim:(i + 1) * dim])
        mod.proj.load_state_dict(ref.proj.state_dict())
    x = torch.randn(2, 7, dim, dtype=F64)
    torch.testing.assert_close(mod(x), ref(x), atol=1e-12, rtol=0)


def test_collapsed_equals_standard_attention_when_wqk_is_wq_wkT():
    """Wqk: with W_qk = W_q W_kᵀ the logits x W_q (x W_k)ᵀ are unchanged (one head, as in the paper)."""
    dim = 16
    ref = TimmAttention(dim, num_heads=1, qkv_bias=False).to(F64).eval()
    mod = MinimalAttention(dim, 1, qk="collapsed", value_proj=True, qkv_bias=False).to(F64).eval()
    wq, wk, wv = ref.qkv.weight.detach().split(dim)  # nn.Linear weights: q = x wqᵀ
    with torch.no_grad():
        mod.qk.weight.copy_(wk.T @ wq)  # q' = x (wqᵀ wk), k' = x  =>  q' k'ᵀ = x wqᵀ wk xᵀ = q kᵀ
        mod.v.weight.copy_(wv)
        mod.proj.load_state_dict(ref.proj.state_dict())
    x = torch.randn(3, 9, dim, dtype=F64)
    torch.testing.assert_close(mod(x), ref(x), atol=1e-12, rtol=0)
    # and the module's logits are the explicit similarity x W_qk xᵀ / sqrt(d)
    w_qk = wq.T @ wk
    torch.testing.assert_close(mod.logits(x)[:, 0], x @ w_qk @ x.transpose(1, 2) * dim ** -0.5)


@pytest.mark.parametrize("heads", [1, 2])
def test_symmetric_logits_and_output(heads):
    dim = 12
    mod = MinimalAttention(dim, heads, qk="symmetric", value_proj=True).to(F64).eval()
    hd = dim // heads
    assert mod.qk_tril.numel() == heads * hd * (hd + 1) // 2  # N(N+1)/2 per head
    x = torch.randn(2, 6, dim, dtype=F64)
    logits = mod.logits(x)
    torch.testing.assert_close(logits, logits.transpose(-1, -2), atol=1e-12, rtol=0)
    assert (torch.diagonal(logits, dim1=-2, dim2=-1) >= 0).all()  # x T Tᵀ xᵀ has a non-negative diagonal
    # independent reference: fill T row by row from the free entries, W = T Tᵀ, explicit softmax attention
    ref_out = []
    for h in range(heads):
        t = torch.zeros(hd, hd, dtype=F64)
        idx = 0
        for r in range(hd):
            for c in range(r + 1):
                t[r, c] = mod.qk_tril[h, idx]
                idx += 1
        w = t @ t.T
        xh = x[..., h * hd:(h + 1) * hd]
        vh = mod.v(x)[..., h * hd:(h + 1) * hd]
        sim = xh @ w @ xh.transpose(1, 2) * hd ** -0.5
        ref_out.append(torch.softmax(sim, -1) @ vh)
    ref = mod.proj(torch.cat(ref_out, -1))
    torch.testing.assert_close(mod(x), ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(mod.qk_matrix(), mod.qk_matrix().transpose(-1, -2))


@pytest.mark.parametrize("heads", [1, 2])
def test_tied_keys_are_the_queries(heads):
    """The other symmetric form, W_k := W_q: logits (x W_q + b)(x W_q + b)ᵀ, symmetric with a non-negative
    diagonal, against an explicit per-head softmax; one projection fewer than the full form."""
    dim = 12
    mod = MinimalAttention(dim, heads, qk="tied").to(F64).eval()
    full = MinimalAttention(dim, heads, qk="full")
    assert sum(p.numel() for p in full.parameters()) - sum(p.numel() for p in mod.parameters()) == dim * dim + dim
    x = torch.randn(2, 6, dim, dtype=F64)
    logits = mod.logits(x)
    torch.testing.assert_close(logits, logits.transpose(-1, -2), atol=1e-12, rtol=0)
    assert (torch.diagonal(logits, dim1=-2, dim2=-1) >= 0).all()
    hd = dim // heads
    q = x @ mod.q.weight.T + mod.q.bias
    ref = torch.cat([torch.softmax(q[..., h * hd:(h + 1) * hd] @ q[..., h * hd:(h + 1) * hd].transpose(1, 2)
                                   * hd ** -0.5, -1) @ mod.v(x)[..., h * hd:(h + 1) * hd] for h in range(heads)], -1)
    torch.testing.assert_close(mod(x), mod.proj(ref), atol=1e-12, rtol=0)


def _hull_residual(points: np.ndarray, y: np.ndarray) -> float:
    """Distance-like residual of the best convex combination of `points` (N, D) to `y` (D,)."""
    a = np.vstack([points.T, 1e3 * np.ones((1, len(points)))])  # the heavy row enforces sum(weights) = 1
    _, res = nnls(a, np.concatenate([y, [1e3]]))
    return res


@pytest.mark.parametrize("qk", ["collapsed", "symmetric", "full", "tied"])
def test_no_value_output_is_convex_combination(qk):
    dim, n = 6, 9
    mod = MinimalAttention(dim, 1, qk=qk, value_proj=False).to(F64).eval()
    x = torch.randn(1, n, dim, dtype=F64) * 3
    out = mod(x)[0].detach().numpy()
    pts = x[0].numpy()
    for i in range(n):
        assert _hull_residual(pts, out[i]) < 1e-6
    # the check can fail: a point beyond every input is not in the hull
    assert _hull_residual(pts, pts.max(0) + 1.0) > 1e-2
    q, k, v = mod.qkv(x)
    assert torch.equal(v[:, 0], x)  # W_v = I


def test_no_value_multihead_is_per_slice_convex_combination():
    dim, heads, n = 8, 2, 7
    mod = MinimalAttention(dim, heads, qk="collapsed", value_proj=False).to(F64).eval()
    x = torch.randn(2, n, dim, dtype=F64)
    out = mod(x)
    q, k, v = mod.qkv(x)
    p = torch.softmax(q @ k.transpose(-1, -2) * (dim // heads) ** -0.5, -1)  # (B, H, N, N), rows sum to 1
    assert (p >= 0).all()
    ref = torch.cat([p[:, h] @ x[..., h * 4:(h + 1) * 4] for h in range(heads)], -1)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)


def test_attention_goes_through_kernels(monkeypatch):
    calls = []
    original = kernels.attention

    def spy(q, k, v, **kw):
        calls.append((q.shape, kw.get("scale")))
        return original(q, k, v, **kw)

    monkeypatch.setattr(kernels, "attention", spy)
    model = timm.create_model("minimal_vit_nomlp_sym_nowvwo_mnist").eval()
    model(torch.randn(1, 1, 28, 28))
    assert len(calls) == 6 and all(s == 64 ** -0.5 for _, s in calls)


def _paper_count(n, depth, heads, mlp, qk, vo, patch, chans, tokens, classes, mlp_ratio=4):
    """Parameters by the paper's accounting: 4N² attention (+ biases), ≈8N² MLP, plus embedding and head."""
    hd = n // heads
    attn = {"full": 2 * (n * n + n), "collapsed": n * n, "symmetric": heads * hd * (hd + 1) // 2}[qk]  # W_qk: no bias
    attn += 2 * (n * n + n) if vo else 0
    hidden = mlp_ratio * n
    layer = 2 * n + attn + ((2 * n + n * hidden + hidden + hidden * n + n) if mlp else 0)
    base = patch * patch * chans * n + n + n + (tokens + 1) * n + 2 * n + n * classes + classes
    return depth * layer + base


@pytest.mark.parametrize("name", zoo.list_models("minimal_vit_*"))
def test_parameter_counts_follow_the_paper(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    mnist = name.endswith("_mnist")
    tags = name[len("minimal_vit_"):].rsplit("_", 1)[0].split("_")
    qk = "symmetric" if "sym" in tags else "collapsed" if "wqk" in tags else "full"
    expected = _paper_count(64, 6, 1, "nomlp" not in tags, qk, "nowvwo" not in tags, 7 if mnist else 8,
                            1 if mnist else 3, 16, 10)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_reduction_ratios():
    full = _paper_count(64, 6, 1, True, "full", True, 7, 1, 16, 10)
    minimal = timm.create_model("minimal_vit_nomlp_wqk_nowvwo_mnist")
    n_min = sum(p.numel() for p in minimal.parameters())
    assert n_min < 0.11 * full  # "up to 90% of the parameters saved"
    mlp_layer = 64 * 256 * 2 + 256 + 64
    assert abs(mlp_layer / (8 * 64 * 64) - 1) < 0.02  # the paper's ≈8N² MLP


def test_variant_structure():
    m = timm.create_model("minimal_vit_nomlp_wqk_nowvwo_cifar")
    names = {n for n, _ in m.named_parameters()}
    assert not any(".mlp." in n or ".norm2." in n or ".attn.v." in n or ".attn.proj." in n for n in names)
    assert any(".attn.qk.weight" in n for n in names)
    sym = timm.create_model("minimal_vit_sym_mnist", num_heads=4)
    assert sym.blocks[0].attn.qk_tril.shape == (4, 16 * 17 // 2)


def test_model_other_sizes_and_validation():
    model = timm.create_model("minimal_vit_mnist").eval()
    out = model(torch.randn(2, 1, 35, 42))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    feats = model.forward_features(torch.randn(1, 1, 28, 28))
    assert feats.shape == (1, 17, 64)
    with pytest.raises(ValueError, match="in_chans=1 channels"):
        model(torch.randn(1, 3, 28, 28))
    # a size that is not a multiple of the patch is zero-padded (bottom/right) to the next multiple
    x = torch.randn(1, 1, 30, 26)
    torch.testing.assert_close(model.forward_features(x), model.forward_features(F.pad(x, (0, 2, 0, 5))))
    assert model.forward_intermediates(x, intermediates_only=True)[0].shape == (1, 64, 5, 4)
    assert torch.isfinite(model(torch.randn(1, 1, 5, 7))).all()
    with pytest.raises(ValueError, match="qk"):
        MinimalAttention(16, qk="diagonal")
    with pytest.raises(ValueError, match="num_heads"):
        MinimalAttention(16, num_heads=3)
    with pytest.raises(ValueError, match="class_token"):
        MinimalViT(class_token=False, global_pool="token")


def test_forward_intermediates_match_forward():
    model = timm.create_model("test_minimal_transformer").eval()
    x = torch.randn(2, 3, 32, 32)
    final, inter = model.forward_intermediates(x)
    torch.testing.assert_close(final, model.forward_features(x))
    assert len(inter) == 2 and inter[0].shape == (2, 32, 4, 4)
    nlc = model.forward_intermediates(x, indices=[0], output_fmt="NLC", intermediates_only=True)
    assert nlc[0].shape == (2, 16, 32)
    torch.testing.assert_close(model.forward_head(final), model(x))
    pooled = model.forward_head(final, pre_logits=True)
    torch.testing.assert_close(pooled, final[:, 0])


def test_matches_explicit_float64_model():
    """A whole block stack against a hand-written float64 pre-norm encoder with the same weights."""
    model = timm.create_model("test_minimal_transformer", qk="collapsed").to(F64).eval()
    x = torch.randn(2, 3, 32, 32, dtype=F64)
    tok = F.conv2d(x, model.patch_embed.proj.weight, model.patch_embed.proj.bias, stride=8)
    tok = tok.flatten(2).transpose(1, 2)
    tok = torch.cat([model.cls_token.expand(2, -1, -1), tok], 1) + model.pos_embed
    for blk in model.blocks:
        a = blk.attn
        h = F.layer_norm(tok, (32,), blk.norm1.weight, blk.norm1.bias, blk.norm1.eps)
        q = (h @ a.qk.weight.T).view(2, 17, 2, 16).transpose(1, 2)  # x W_qk x^T: no bias
        k = h.view(2, 17, 2, 16).transpose(1, 2)
        v = (h @ a.v.weight.T + a.v.bias).view(2, 17, 2, 16).transpose(1, 2)
        o = _softmax_attention(q, k, v, 16 ** -0.5).transpose(1, 2).reshape(2, 17, 32)
        tok = tok + o @ a.proj.weight.T + a.proj.bias
        h = F.layer_norm(tok, (32,), blk.norm2.weight, blk.norm2.bias, blk.norm2.eps)
        tok = tok + blk.mlp.fc2(F.gelu(blk.mlp.fc1(h)))
    tok = F.layer_norm(tok, (32,), model.norm.weight, model.norm.bias, model.norm.eps)
    torch.testing.assert_close(model(x), model.head(tok[:, 0]), atol=1e-10, rtol=0)


def test_symmetric_model_built_on_meta_then_loaded_matches():
    """Built on the meta device, materialised with `to_empty` and filled by `load_state_dict` (how large models
    are loaded): the symmetric form must not depend on a buffer that loading leaves uninitialised."""
    ref = timm.create_model("minimal_vit_nomlp_sym_nowvwo_mnist").eval()
    with torch.device("meta"):
        model = timm.create_model("minimal_vit_nomlp_sym_nowvwo_mnist")
    model = model.to_empty(device="cpu").eval()
    model.load_state_dict(ref.state_dict())
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)


def test_symmetric_layer_trains_after_an_inference_call():
    """The symmetric form's triangle index is cached per device; filled by a forward under torch.inference_mode(),
    it must still serve training (index_copy saves it for backward), with the gradients of a fresh layer."""
    torch.manual_seed(0)
    layer = MinimalAttention(32, num_heads=2, qk="symmetric").double()
    fresh = MinimalAttention(32, num_heads=2, qk="symmetric").double()
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(2, 10, 32, dtype=F64)
    with torch.inference_mode():
        layer(x)
    grads = torch.autograd.grad(layer(x).square().sum(), layer.qk_tril)
    expected = torch.autograd.grad(fresh(x).square().sum(), fresh.qk_tril)
    torch.testing.assert_close(grads[0], expected[0], rtol=0, atol=0)
