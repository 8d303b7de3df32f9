"""Probe heads (linear, AIM, V-JEPA, EP) against explicit references, and frozen encoders by name."""
import math

import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from zoo.probes import (
    AttentiveProbe,
    CrossAttentionProbe,
    EfficientProbe,
    LinearProbe,
    create_encoder,
    create_probe,
    list_probes,
)


def _randomize(module):
    """Non-trivial weights everywhere (queries too: the default 0.02 init makes attention nearly uniform)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.copy_(torch.randn_like(m.running_mean))
            m.running_var.copy_(torch.rand_like(m.running_var) + 0.5)
    return module


def _bn_eval(x, bn):
    return (x - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps)


# ---------------------------------------------------------------------------------------------------------- EP


@pytest.mark.parametrize("dim,num_queries,d_out,n", [(48, 8, 1, 13), (64, 4, 2, 7), (36, 3, 3, 10)])
def test_ep_matches_per_query_loop(dim, num_queries, d_out, n):
    probe = _randomize(EfficientProbe(dim, 5, num_queries=num_queries, d_out=d_out).double()).eval()
    x = torch.randn(3, n, dim, dtype=torch.float64)
    pool = probe.pool
    c = dim // d_out // num_queries
    ref = torch.empty(3, dim // d_out, dtype=torch.float64)
    for b in range(3):
        v = x[b] @ pool.v.weight.T  # (N, D/d_out)
        for i in range(num_queries):  # query i: softmax over tokens of q_i·x_j/√D, pools value chunk i
            logits = torch.stack([pool.query[i] @ x[b, j] / math.sqrt(dim) for j in range(n)])
            a = torch.exp(logits - logits.max())
            a = a / a.sum()
            ref[b, i * c:(i + 1) * c] = sum(a[j] * v[j, i * c:(i + 1) * c] for j in range(n))
    torch.testing.assert_close(pool(x), ref, rtol=1e-10, atol=1e-10)
    logits = _bn_eval(ref, probe.norm) @ probe.fc.weight.T + probe.fc.bias
    torch.testing.assert_close(probe(x), logits, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("d_out,num_classes", [(1, 1000), (2, 1000), (1, 10)])
def test_ep_parameter_count_vit_b(d_out, num_classes):
    D, M = 768, 32
    probe = EfficientProbe(D, num_classes, num_queries=M, d_out=d_out)
    pool = sum(p.numel() for p in probe.pool.parameters())
    assert pool == M * D + D * D // d_out
    total = sum(p.numel() for p in probe.parameters())
    assert total == M * D + D * D // d_out + (D // d_out) * num_classes + num_classes
    if d_out == 1 and num_classes == 1000:  # the paper's "< 1.4M" for EP on ViT-B
        assert 1.37e6 < total < 1.4e6
    assert not any(p.requires_grad is False for p in probe.parameters())
    assert sum(b.numel() for n, b in probe.named_buffers() if "running" in n) == 2 * (D // d_out)  # BN no affine
    assert probe.norm.weight is None and probe.norm.bias is None


def test_ep_default_hyperparameters():
    probe = create_probe("ep", 96, 7)
    assert probe.pool.num_queries == 32 and probe.pool.d_out == 1
    assert probe.pool.v.bias is None and probe.pool.query.shape == (32, 96)


# ---------------------------------------------------------------------------------------------------------- AIM


def test_aim_matches_explicit_multihead_loop():
    dim, heads, queries, n = 32, 4, 3, 9
    probe = _randomize(AttentiveProbe(dim, 6, num_heads=heads, num_queries=queries).double()).eval()
    pool = probe.pool
    x = torch.randn(2, n, dim, dtype=torch.float64)
    xn = (x - pool.norm.running_mean) / torch.sqrt(pool.norm.running_var + pool.norm.eps)
    k, v = xn @ pool.k.weight.T, xn @ pool.v.weight.T
    hd = dim // heads
    ref = torch.zeros(2, dim, dtype=torch.float64)
    for b in range(2):
        for m in range(queries):
            for h in range(heads):
                sl = slice(h * hd, (h + 1) * hd)
                logits = torch.stack([pool.query[0, m, sl] @ k[b, j, sl] for j in range(n)]) / math.sqrt(hd)
                a = torch.softmax(logits, 0)
                ref[b, sl] += sum(a[j] * v[b, j, sl] for j in range(n)) / queries
    torch.testing.assert_close(pool(x), ref, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------------------- JEPA


def test_jepa_matches_cross_attention_block_formula():
    dim, heads, n = 32, 2, 11
    probe = _randomize(CrossAttentionProbe(dim, 4, num_heads=heads, mlp_ratio=2.0).double()).eval()
    pool = probe.pool
    x = torch.randn(3, n, dim, dtype=torch.float64)
    xn = torch.nn.functional.layer_norm(x, (dim,), pool.norm1.weight, pool.norm1.bias, pool.norm1.eps)
    q0 = pool.query[0, 0]
    q = pool.q.weight @ q0 + pool.q.bias
    kv = xn @ pool.kv.weight.T + pool.kv.bias
    k, v = kv[..., :dim], kv[..., dim:]
    hd = dim // heads
    out = torch.empty(3, dim, dtype=torch.float64)
    for h in range(heads):
        sl = slice(h * hd, (h + 1) * hd)
        a = torch.softmax(k[..., sl] @ q[sl] / math.sqrt(hd), dim=-1)  # (B, N)
        out[:, sl] = torch.einsum("bn,bnd->bd", a, v[..., sl])
    z = q0 + out @ pool.proj.weight.T + pool.proj.bias
    zn = torch.nn.functional.layer_norm(z, (dim,), pool.norm2.weight, pool.norm2.bias, pool.norm2.eps)
    hidden = torch.nn.functional.gelu(zn @ pool.mlp.fc1.weight.T + pool.mlp.fc1.bias)
    z = z + hidden @ pool.mlp.fc2.weight.T + pool.mlp.fc2.bias
    torch.testing.assert_close(pool(x), z, rtol=1e-10, atol=1e-10)


def test_jepa_init_follows_vjepa():
    probe = CrossAttentionProbe(256, 3, num_heads=4)
    std = probe.pool.q.weight.std().item()
    assert 0.015 < std < 0.025  # trunc_normal(0.02)
    assert probe.pool.proj.weight.std().item() < std * 0.8  # rescaled by 1/sqrt(2)
    assert torch.all(probe.pool.kv.bias == 0)


# ---------------------------------------------------------------------------------------------------------- shared


ATTENTIVE = [("ep", dict(num_queries=4)), ("aim", dict(num_heads=4, num_queries=2)),
             ("jepa", dict(num_heads=4, num_queries=2))]


@pytest.mark.parametrize("name,kwargs", ATTENTIVE)
def test_attention_rows_sum_to_one_and_match_output(name, kwargs):
    probe = _randomize(create_probe(name, 32, 5, num_prefix_tokens=1, **kwargs).double()).eval()
    x = torch.randn(2, 1 + 15, 32, dtype=torch.float64)
    attn = probe.attention_map(x)
    assert attn.shape[-1] == 15  # prefix token dropped by default (tokens="patch")
    torch.testing.assert_close(attn.sum(-1), torch.ones_like(attn.sum(-1)), rtol=0, atol=1e-12)
    assert (attn >= 0).all() and attn.std() > 1e-3  # not uniform
    if name == "ep":  # EP's pooled output is exactly the attention-weighted value chunks
        v = probe.pool.v(x[:, 1:]).reshape(2, 15, 4, -1)
        ref = torch.einsum("bmn,bnmc->bmc", attn, v).reshape(2, -1)
        torch.testing.assert_close(probe.pool(x[:, 1:]), ref, rtol=1e-10, atol=1e-10)


def test_aim_attention_map_in_train_mode_changes_no_state():
    """Reading AIM's map in train mode uses the batch's statistics (as its forward does) and leaves the
    BatchNorm's running statistics and counter as they were."""
    probe = create_probe("aim", 32, 5, num_heads=4, num_queries=2).double().train()
    x = torch.randn(3, 15, 32, dtype=torch.float64) * 3 + 1
    before = {k: v.clone() for k, v in probe.state_dict().items()}
    attn = probe.attention_map(x)
    for key, value in probe.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=key)
    pool = probe.pool
    xn = (x - x.mean((0, 1))) / torch.sqrt(x.var((0, 1), unbiased=False) + pool.norm.eps)  # batch statistics
    q = pool.query.reshape(1, 2, 4, 8).permute(0, 2, 1, 3)
    k = pool.k(xn).reshape(3, 15, 4, 8).transpose(1, 2)
    ref = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)
    torch.testing.assert_close(attn, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name,kwargs", ATTENTIVE + [("linear", dict(pool="mean"))])
def test_token_permutation_invariance(name, kwargs):
    probe = _randomize(create_probe(name, 32, 5, num_prefix_tokens=1, **kwargs).double()).eval()
    x = torch.randn(3, 1 + 20, 32, dtype=torch.float64)
    perm = torch.randperm(20) + 1
    xp = torch.cat([x[:, :1], x[:, perm]], dim=1)
    torch.testing.assert_close(probe(xp), probe(x), rtol=1e-10, atol=1e-10)
    # the order matters for nothing but the set: changing one token changes the output
    x2 = x.clone()
    x2[:, 5] += torch.randn(3, 32, dtype=torch.float64)
    assert not torch.allclose(probe(x2), probe(x))


def test_tokens_all_includes_prefix():
    probe = _randomize(create_probe("ep", 16, 3, num_prefix_tokens=1, num_queries=2, tokens="all").double()).eval()
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    assert probe.attention_map(x).shape == (2, 2, 6)
    x2 = x.clone()
    x2[:, 0] += torch.randn(2, 16, dtype=torch.float64)  # the CLS token now matters
    assert not torch.allclose(probe(x2), probe(x))


def test_linear_probe_cls_and_mean():
    x = torch.randn(4, 1 + 9, 24, dtype=torch.float64)
    for pool, feat in (("cls", x[:, 0]), ("mean", x[:, 1:].mean(1))):
        probe = _randomize(LinearProbe(24, 6, pool=pool, num_prefix_tokens=1).double()).eval()
        ref = _bn_eval(feat, probe.norm) @ probe.fc.weight.T + probe.fc.bias
        torch.testing.assert_close(probe(x), ref, rtol=1e-10, atol=1e-10)
        assert sum(p.numel() for p in probe.parameters()) == 24 * 6 + 6


@pytest.mark.parametrize("name,kwargs", ATTENTIVE + [("linear", {})])
def test_every_parameter_gets_a_gradient(name, kwargs):
    probe = create_probe(name, 32, 5, num_prefix_tokens=1, **kwargs).train()
    loss = torch.nn.functional.cross_entropy(probe(torch.randn(4, 10, 32)), torch.randint(0, 5, (4,)))
    loss.backward()
    for n, p in probe.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n


def test_probe_bad_arguments():
    assert list_probes() == ["aim", "ep", "jepa", "linear"]
    with pytest.raises(ValueError, match="probe name"):
        create_probe("nope", 32, 3)
    with pytest.raises(ValueError, match="num_queries"):
        create_probe("ep", 32, 3, num_queries=5)
    with pytest.raises(ValueError, match="d_out"):
        create_probe("ep", 32, 3, d_out=3)
    with pytest.raises(ValueError, match="num_heads"):
        create_probe("aim", 32, 3, num_heads=5)
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        create_probe("linear", 32, 3, pool="cls", num_prefix_tokens=0)
    with pytest.raises(ValueError, match="tokens"):
        create_probe("ep", 32, 3, num_queries=4, tokens="some")
    with pytest.raises(ValueError, match="num_classes"):
        create_probe("ep", 32, 0, num_queries=4)


# ---------------------------------------------------------------------------------------------------------- encoders


def test_timm_encoder_tokens_frozen_and_weights(tmp_path):
    enc = create_encoder("timm:test_vit", img_size=32)
    ref = timm.create_model("test_vit", img_size=32)
    save_file(ref.state_dict(), str(tmp_path / "w.safetensors"))  # includes the classifier: it is ignored
    enc = create_encoder("timm:test_vit", checkpoint_path=str(tmp_path / "w.safetensors"), img_size=32)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = ref.eval().forward_features(x)
    torch.testing.assert_close(enc(x), expected)
    assert enc(x).shape == (2, 1 + 4, 64) and enc.num_prefix_tokens == 1 and enc.embed_dim == 64
    assert enc.data_config["input_size"] == (3, 32, 32)
    enc.train()
    assert not enc.training and not enc.model.training
    assert not any(p.requires_grad for p in enc.parameters())
    assert not enc(x).requires_grad
    assert enc.fingerprint()["checkpoint_sha256"] is not None


def test_timm_cnn_encoder_gives_flattened_map():
    enc = create_encoder("timm:resnet10t")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        fmap = enc.model.forward_features(x)
    torch.testing.assert_close(enc(x), fmap.flatten(2).transpose(1, 2))
    assert enc.num_prefix_tokens == 0


def test_encoder_bad_names_and_checkpoints(tmp_path):
    for bad in ("test_vit", "hf:abc", "timm:", "timm:not_a_model_xyz", "zoo:not_a_model_xyz",
                "open_clip:not-a-model"):
        with pytest.raises(ValueError):
            create_encoder(bad)
    with pytest.raises(ValueError, match="checkpoint_path"):
        create_encoder("timm:test_vit", checkpoint_path=str(tmp_path / "missing.safetensors"))
    save_file({"foo.weight": torch.randn(3, 3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="does not match"):
        create_encoder("timm:test_vit", checkpoint_path=str(tmp_path / "other.safetensors"))


def test_zoo_encoder_prefix():
    import zoo

    names = zoo.list_models()
    if not names:
        pytest.skip("no zoo model is registered yet")
    name = next((n for n in names if n.startswith("test_")), names[0])
    enc = create_encoder(f"zoo:{name}")
    size = enc.data_config["input_size"]
    tokens = enc(torch.randn(1, *size))
    assert tokens.dim() == 3 and tokens.shape[-1] == enc.embed_dim and torch.isfinite(tokens).all()


@pytest.fixture
def tiny_open_clip(tmp_path):
    cfg = ('{"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, '
           '"patch_size": 8}, "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, '
           '"layers": 1}}')
    (tmp_path / "attnzoo-tiny-clip.json").write_text(cfg)
    open_clip.add_model_config(tmp_path / "attnzoo-tiny-clip.json")
    return "attnzoo-tiny-clip"


def test_open_clip_encoder_tokens_and_local_checkpoint(tiny_open_clip, tmp_path):
    model = open_clip.create_model(tiny_open_clip)
    save_file(model.state_dict(), str(tmp_path / "clip.safetensors"))
    enc = create_encoder(f"open_clip:{tiny_open_clip}", checkpoint_path=str(tmp_path / "clip.safetensors"))
    x = torch.randn(2, 3, 32, 32)
    model.visual.output_tokens = True
    with torch.no_grad():
        _, patch_tokens = model.eval().visual(x)
    tokens = enc(x)
    assert tokens.shape == (2, 1 + 16, 64) and enc.num_prefix_tokens == 1
    torch.testing.assert_close(tokens[:, 1:], patch_tokens, rtol=1e-5, atol=1e-5)
    assert enc.data_config["input_size"] == (3, 32, 32)


# ---------------------------------------------------------------------------------------------------------- layers


def test_timm_encoder_layers_equal_forward_intermediates(tmp_path):
    ref = timm.create_model("test_vit", img_size=32).eval()
    save_file(ref.state_dict(), str(tmp_path / "w.safetensors"))
    enc = create_encoder("timm:test_vit", checkpoint_path=str(tmp_path / "w.safetensors"), img_size=32)
    assert enc.num_layers == len(ref.blocks) == 6 and enc.layer_prefix_tokens == 1
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        inter = ref.forward_intermediates(x, indices=[1, 3, 5], return_prefix_tokens=True, output_fmt="NLC",
                                          intermediates_only=True)
        final = ref.forward_features(x)
    want = {b: torch.cat([prefix, spatial], dim=1) for b, (spatial, prefix) in zip((1, 3, 5), inter)}
    got = enc.forward_layers(x, [-1, 1, -3])  # any order; negative counts from the end
    assert [tuple(t.shape) for t in got] == [(2, 1 + 4, 64)] * 3
    for tokens, block in zip(got, (5, 1, 3)):
        torch.testing.assert_close(tokens, want[block], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(got[0], got[2], atol=1e-2)  # different blocks, different tokens
    # with the final norm, the last block is the encoder's default output
    torch.testing.assert_close(enc.forward_layers(x, [-1], norm=True)[0], final, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(enc(x), final, rtol=1e-6, atol=1e-6)


def test_cnn_encoder_layers_are_flattened_stages():
    enc = create_encoder("timm:resnet10t")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        stages = enc.model.forward_intermediates(x, indices=[1, 4], intermediates_only=True)  # NCHW
    got = enc.forward_layers(x, [1, -1])
    assert enc.num_layers == 5 and enc.layer_prefix_tokens == 0
    for tokens, fmap in zip(got, stages):
        torch.testing.assert_close(tokens, fmap.flatten(2).transpose(1, 2))
    assert got[0].shape == (1, 16 * 16, 64) and got[1].shape == (1, 2 * 2, 512)
    torch.testing.assert_close(got[1], enc(x))  # a ResNet's last stage is its forward_features


def test_encoder_layers_validation():
    enc = create_encoder("timm:test_vit", img_size=32)
    assert enc.resolve_layers([-1, 0, -2]) == (5, 0, 4)
    for bad in ([], [6], [-7], [0, -6], [1.0], (True,), -1, "last", None):
        with pytest.raises(ValueError, match="layers"):
            enc.resolve_layers(bad)
    with pytest.raises(ValueError, match="layers"):
        enc.forward_layers(torch.randn(1, 3, 32, 32), [2, 2])


def test_open_clip_vit_layers_and_other_towers(tiny_open_clip, tmp_path):
    enc = create_encoder(f"open_clip:{tiny_open_clip}")
    x = torch.randn(2, 3, 32, 32)
    assert enc.num_layers == 2 and enc.layer_prefix_tokens == 1
    with torch.no_grad():
        out = enc.model.forward_intermediates(x, indices=[0, 1], output_fmt="NLC", output_extra_tokens=True,
                                              intermediates_only=True)
    got = enc.forward_layers(x, [-1, 0])
    for tokens, i in zip(got, (1, 0)):
        want = torch.cat([out["image_intermediates_prefix"][i], out["image_intermediates"][i]], dim=1)
        torch.testing.assert_close(tokens, want, rtol=1e-6, atol=1e-6)
    assert got[0].shape == (2, 1 + 16, 64)
    torch.testing.assert_close(enc.forward_layers(x, [-1], norm=True)[0], enc(x), rtol=1e-6, atol=1e-6)
    # a non-ViT tower (ModifiedResNet) gives its final output, and says plainly that it has no layers
    cfg = ('{"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, '
           '"head_width": 8}, "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, '
           '"layers": 1}}')
    (tmp_path / "attnzoo-tiny-rn.json").write_text(cfg)
    open_clip.add_model_config(tmp_path / "attnzoo-tiny-rn.json")
    rn = create_encoder("open_clip:attnzoo-tiny-rn")
    assert rn.num_layers is None
    with pytest.raises(NotImplementedError, match="ModifiedResNet"):
        rn.forward_layers(x, [-1])


@pytest.mark.parametrize("kind", ["linear", "aim", "jepa", "ep"])
def test_probes_run_under_autocast(kind):
    """The probe trainer trains under bf16 autocast on GPU; every probe type must accept that."""
    probe = create_probe(kind, 64, 10, num_prefix_tokens=1, **({"num_heads": 4} if kind in ("aim", "jepa") else {}))
    x = torch.randn(4, 17, 64).half()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = probe(x)
    assert out.shape == (4, 10) and torch.isfinite(out.float()).all()


def test_linear_cls_pool_reads_the_cls_token_only():
    """With register tokens after the CLS token (timm's *_reg4 models), `cls` is token 0, not their mean."""
    probe = create_probe("linear", 8, 3, num_prefix_tokens=5, pool="cls")
    x = torch.randn(2, 21, 8)
    assert torch.equal(probe.pool(x), x[:, 0])
    assert torch.allclose(create_probe("linear", 8, 3, num_prefix_tokens=5, pool="mean").pool(x), x[:, 5:].mean(1))
    assert create_probe("linear", 8, 3).pool.num_prefix_tokens == 1  # the default: a ViT's CLS token


def test_create_probe_keeps_each_probes_own_prefix_default():
    """The paper's input is patch tokens (B, N, D): `create_probe("ep" | "aim" | "jepa", D, C)` reads every token
    (no prefix dropped; EP is then invariant to the token order), as the classes do; linear keeps its CLS token."""
    torch.manual_seed(0)
    x = torch.randn(3, 9, 16)
    perm = torch.randperm(9)
    for name, kw in (("ep", {"num_queries": 4}), ("aim", {"num_heads": 2}), ("jepa", {"num_heads": 2})):
        probe = create_probe(name, 16, 5, **kw).eval()
        assert probe.num_prefix_tokens == 0, name
        torch.testing.assert_close(probe(x), probe(x[:, perm]), rtol=1e-5, atol=1e-6, msg=name)
    assert create_probe("linear", 16, 5).num_prefix_tokens == 1
    assert create_probe("ep", 16, 5, num_prefix_tokens=1, num_queries=4).num_prefix_tokens == 1


def test_linear_gap_is_the_patch_mean_and_bad_tokens_are_named():
    torch.manual_seed(0)
    x = torch.randn(4, 7, 16)
    gap, mean = create_probe("linear", 16, 3, pool="gap").eval(), create_probe("linear", 16, 3, pool="mean").eval()
    gap.load_state_dict(mean.state_dict())
    torch.testing.assert_close(gap(x), mean(x))
    torch.testing.assert_close(gap.forward_features(x), F.batch_norm(x[:, 1:].mean(1), torch.zeros(16),
                                                                     torch.ones(16), eps=1e-6))
    ep = create_probe("ep", 16, 3, num_queries=4).eval()
    for bad, match in ((torch.randn(4, 7, 8), "width D=16"), (torch.randn(4, 16), "floating-point \\(B, N, D\\)"),
                       (torch.randint(0, 3, (4, 7, 16)), "floating-point")):
        with pytest.raises(ValueError, match=match):
            ep(bad)
    with pytest.raises(ValueError, match="patch tokens"):
        mean(torch.randn(4, 1, 16))  # only the CLS token: the mean has nothing to average
    for kw in ({"num_queries": True}, {"num_queries": 2.0}, {"d_out": 0}):
        with pytest.raises(ValueError, match="positive int"):
            create_probe("ep", 16, 3, **kw)
