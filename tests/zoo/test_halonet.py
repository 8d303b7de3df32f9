"""HaloNet: the halo layer against an explicit float64 window loop and timm's HaloAttn; the models against timm."""
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers.halo_attn import HaloAttn, PosEmbedRel

import zoo
from zoo.layers.halo_attention import HaloAttention, halo_rel_index, halo_rel_pos_bias, halo_rel_pos_factors

MODES = ("fold", "relpos", "bias")


def _randomize(layer):
    """Random weights everywhere (the init leaves nothing at zero, but make the tables and biases sizeable)."""
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5)
    return layer


def naive_halo(layer, x):
    """Explicit per-query loop over the key window, float64, from the definition (timm's layout):

    q at stride s; query (i, j) of the subsampled grid is in block (i // qb, j // qb) at (i % qb, j % qb); its
    window is rows bi*b - h .. bi*b - h + win - 1 (and the same for columns) of the full-resolution map, keys and
    values zero outside the map; logit = scale q.k + q.R_h[ky - qy + win - 1] + q.R_w[kx - qx + win - 1].
    """
    x = x.double()
    B, C, H, W = x.shape
    heads, dqk, dv = layer.num_heads, layer.dim_head_qk, layer.dim_head_v
    b, h, win, s, qb = layer.block_size, layer.halo_size, layer.win_size, layer.block_stride, layer.block_size_ds
    wq = layer.q.weight.double()[:, :, 0, 0]
    wkv = layer.kv.weight.double()[:, :, 0, 0]
    q_map = torch.einsum("oc,bchw->bohw", wq, x[:, :, ::s, ::s])
    kv_map = torch.einsum("oc,bchw->bohw", wkv, x)
    if layer.q.bias is not None:
        q_map = q_map + layer.q.bias.double()[None, :, None, None]
        kv_map = kv_map + layer.kv.bias.double()[None, :, None, None]
    rh, rw = layer.pos_embed.height_rel.double(), layer.pos_embed.width_rel.double()
    rel_scale = layer.scale if layer.scale_pos_embed else 1.0
    Hq, Wq = q_map.shape[-2:]
    out = torch.zeros(B, heads * dv, Hq, Wq, dtype=torch.float64)
    for n in range(B):
        for hd in range(heads):
            kvh = kv_map[n, hd * (dqk + dv):(hd + 1) * (dqk + dv)]
            for i in range(Hq):
                for j in range(Wq):
                    qv = q_map[n, hd * dqk:(hd + 1) * dqk, i, j]
                    qy, qx = i % qb, j % qb
                    y0, x0 = (i // qb) * b - h, (j // qb) * b - h
                    logits, values = [], []
                    for ky in range(win):
                        for kx in range(win):
                            y, xx = y0 + ky, x0 + kx
                            if 0 <= y < H and 0 <= xx < W:
                                kvec, vvec = kvh[:dqk, y, xx], kvh[dqk:, y, xx]
                            else:
                                kvec, vvec = torch.zeros(dqk, dtype=torch.float64), torch.zeros(dv, dtype=torch.float64)
                            rel = qv @ rh[ky - qy + win - 1] + qv @ rw[kx - qx + win - 1]
                            logits.append(layer.scale * (qv @ kvec) + rel_scale * rel)
                            values.append(vvec)
                    p = torch.softmax(torch.stack(logits), 0)
                    out[n, hd * dv:(hd + 1) * dv, i, j] = p @ torch.stack(values)
    if isinstance(layer.pool, torch.nn.AvgPool2d):
        out = F.avg_pool2d(out, 2, 2)
    return out


LAYER_CASES = [
    # (kwargs, input (C, H, W)); odd, non-square and non-divisible sizes included
    (dict(dim=8, num_heads=2, block_size=4, halo_size=1), (8, 8, 12)),
    (dict(dim=8, num_heads=2, block_size=4, halo_size=1), (8, 7, 10)),
    (dict(dim=8, num_heads=2, block_size=4, halo_size=2, stride=2), (8, 8, 8)),
    (dict(dim=8, num_heads=2, block_size=4, halo_size=1, stride=2), (8, 9, 6)),
    (dict(dim=8, dim_out=12, num_heads=3, block_size=3, halo_size=1, stride=2, qkv_bias=True), (8, 7, 5)),
    (dict(dim=6, num_heads=2, dim_head=4, block_size=4, halo_size=0, avg_down=True, stride=2,
          scale_pos_embed=True), (6, 5, 9)),
]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kwargs,shape", LAYER_CASES)
@torch.no_grad()
def test_layer_matches_naive_window_loop(kwargs, shape, mode, channels_last):
    """Also on channels_last input (the layouts are built from the (B, H, W, C) view): the output keeps
    channels_last strides whenever no border crop or pooling intervenes."""
    layer = _randomize(HaloAttention(**kwargs, rel_pos_mode=mode)).double().eval()
    x = torch.randn(2, *shape, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out = layer(x)
    ref = naive_halo(layer, x.contiguous())
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    b, s = kwargs["block_size"], kwargs.get("stride", 1)
    if shape[1] % b == 0 and shape[2] % b == 0 and (s == 1 or (b % s == 0 and not kwargs.get("avg_down"))):
        assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kwargs", [
    dict(dim=16, num_heads=2, block_size=8, halo_size=3),
    dict(dim=16, num_heads=4, block_size=8, halo_size=2, stride=2),
    dict(dim=16, dim_out=24, num_heads=2, block_size=4, halo_size=1, stride=2, avg_down=True, qkv_bias=True),
    dict(dim=16, num_heads=2, block_size=5, halo_size=2, stride=2),  # odd block: average-pooled
    dict(dim=16, num_heads=2, dim_head=8, block_size=4, halo_size=2, scale_pos_embed=True),
])
def test_layer_matches_timm_where_timm_runs(kwargs, mode):
    ref = _randomize(HaloAttn(**kwargs)).double()
    layer = HaloAttention(**kwargs, rel_pos_mode=mode).double()
    layer.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 16, 2 * kwargs["block_size"], 3 * kwargs["block_size"], dtype=torch.float64,
                    requires_grad=True)
    out_ref = ref(x)
    out = layer(x)
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    grads_ref = torch.autograd.grad(out_ref, [x, *ref.parameters()], g)
    grads = torch.autograd.grad(out, [x, *layer.parameters()], g)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    with torch.no_grad():  # and in float32, the models' dtype
        ref.float(), layer.float()
        torch.testing.assert_close(layer(x.float()), ref(x.float()), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("block,stride", [(8, 1), (8, 2), (6, 2)])
def test_rel_index_one_hot_query(block, stride):
    """With q one-hot on channel d and table entries equal to their row index, the bias reads the index back."""
    halo, D, d = 2, 5, 3
    win, qb = block + 2 * halo, block // stride
    q = torch.zeros(qb, qb, D, dtype=torch.float64)
    q[..., d] = 1.0
    idx_table = torch.arange(2 * win - 1, dtype=torch.float64)[:, None].repeat(1, D)
    zeros = torch.zeros_like(idx_table)
    bias_h = halo_rel_pos_bias(q, idx_table, zeros, win).reshape(qb, qb, win, win)
    bias_w = halo_rel_pos_bias(q, zeros, idx_table * 1000, win).reshape(qb, qb, win, win)
    for qy in range(qb):
        for qx in range(qb):
            for ky in range(win):
                for kx in range(win):
                    assert bias_h[qy, qx, ky, kx] == ky - qy + win - 1
                    assert bias_w[qy, qx, ky, kx] == 1000 * (kx - qx + win - 1)
    assert halo_rel_index(qb, win).min() >= 0 and halo_rel_index(qb, win).max() <= 2 * win - 2


@pytest.mark.parametrize("block,stride,halo", [(8, 1, 3), (8, 2, 2), (4, 2, 1)])
def test_rel_bias_matches_timm_pos_embed_and_factors(block, stride, halo):
    """The dense bias equals timm's PosEmbedRel (its pad/reshape trick) and the rank-2win factors' product."""
    D, qb, win = 8, block // stride, block + 2 * halo
    timm_pe = PosEmbedRel(block_size=qb, win_size=win, dim_head=D, scale=1.0).double()
    q = torch.randn(3, 4, qb * qb, D, dtype=torch.float64)  # (B * heads, blocks, qb * qb, D) as timm lays it out
    ref = timm_pe(q)
    bias = halo_rel_pos_bias(q.reshape(3, 4, qb, qb, D), timm_pe.height_rel, timm_pe.width_rel, win)
    torch.testing.assert_close(bias, ref, rtol=1e-12, atol=1e-12)
    q_rel, k_rel = halo_rel_pos_factors(q.reshape(3, 4, qb, qb, D), timm_pe.height_rel, timm_pe.width_rel, win)
    assert q_rel.shape == (3, 4, qb * qb, 2 * win) and k_rel.shape == (win * win, 2 * win)
    torch.testing.assert_close(q_rel @ k_rel.T, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
@torch.no_grad()
def test_layer_bf16_close_to_timm_float64(mode):
    kwargs = dict(dim=32, num_heads=4, block_size=8, halo_size=2, stride=2)
    ref = HaloAttn(**kwargs).double()  # timm's own init: realistic logit scales
    layer = HaloAttention(**kwargs, rel_pos_mode=mode)
    layer.load_state_dict(ref.state_dict())
    x = torch.randn(1, 32, 16, 24, dtype=torch.float64)
    expected = ref(x)
    out = layer.bfloat16()(x.bfloat16())
    assert out.dtype == torch.bfloat16
    # bf16 operands through three stages (1x1 convs, logits with relative terms, attention): judged by the
    # relative norm error (900 seeded runs here: <= 8.6e-3; a wrong layer gives ~1) and by the largest element
    # error against the output's scale (<= 0.020 there); an element-wise rtol/atol pair flaked on single elements
    err = out.double() - expected
    assert (err.norm() / expected.norm()).item() < 2e-2
    assert (err.abs().max() / expected.abs().max()).item() < 5e-2


def test_layer_any_size_matches_timm_on_padded_map():
    """A size that is not a multiple of the block equals timm on the map zero-padded to whole blocks, cropped."""
    kwargs = dict(dim=8, num_heads=2, block_size=4, halo_size=1)
    ref = _randomize(HaloAttn(**kwargs))  # no qkv bias: zero input -> zero keys/values, as the padding
    layer = HaloAttention(**kwargs)
    layer.load_state_dict(ref.state_dict())
    x = torch.randn(1, 8, 9, 6)
    with torch.no_grad():
        expected = ref(F.pad(x, [0, 2, 0, 3]))[:, :, :9, :6]
        torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(AssertionError):
        ref(x)  # timm asserts divisibility; the zoo layer pads


def _small_layer(mode, stride):
    """A randomised 16-channel, 2-head layer with block 4, halo 1, in eval mode."""
    return _randomize(HaloAttention(16, num_heads=2, block_size=4, halo_size=1, stride=stride,
                                    rel_pos_mode=mode)).eval()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("stride", [1, 2])
def test_layer_torch_compile_fullgraph(mode, stride):
    """torch.compile traces the layer in one graph (patterns and biases are built inside forward)."""
    layer = _small_layer(mode, stride)
    x = torch.randn(2, 16, 12, 10)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(layer, fullgraph=True, backend="aot_eager")(x), layer(x))


def test_layer_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_heads"):
        HaloAttention(16, dim_out=18, num_heads=4)
    with pytest.raises(ValueError, match="stride"):
        HaloAttention(16, stride=3)
    with pytest.raises(ValueError, match="block_size"):
        HaloAttention(16, block_size=0)
    with pytest.raises(ValueError, match="rel_pos_mode"):
        HaloAttention(16, rel_pos_mode="sparse")


@pytest.mark.skipif(not torch.cuda.is_available() and __import__("os").environ.get("TRITON_INTERPRET") != "1",
                    reason="the Triton path needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("stride", [1, 2])
def test_every_mode_runs_on_triton(mode, stride):
    layer = _small_layer(mode, stride)
    x = torch.randn(1, 16, 9, 7)
    with torch.no_grad():
        expected = layer(x)
        layer.backend = "triton"
        torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# models

COMPATIBLE = [("zoo_halonet26t", "halonet26t"), ("zoo_sehalonet33ts", "sehalonet33ts"),
              ("zoo_halonet50ts", "halonet50ts"), ("zoo_eca_halonext26ts", "eca_halonext26ts"),
              ("zoo_halonet_h1", "halonet_h1")]


def _count(name):
    with torch.device("meta"):
        return sum(p.numel() for p in timm.create_model(name).parameters())


@pytest.mark.parametrize("zoo_name,timm_name", COMPATIBLE)
def test_param_count_and_keys_match_timm(zoo_name, timm_name):
    with torch.device("meta"):
        a, b = timm.create_model(zoo_name), timm.create_model(timm_name)
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    assert _count(zoo_name) == _count(timm_name)


def test_param_counts_headline():
    assert round(_count("zoo_halonet26t") / 1e6, 2) == 12.48
    assert round(_count("zoo_halonet_h1") / 1e6, 2) == 8.10


@pytest.mark.parametrize("i,millions", [(0, 5.5), (1, 8.1), (2, 9.4), (3, 11.8), (4, 19.1), (5, 30.7), (6, 43.4),
                                        (7, 67.4)])
def test_paper_family_param_counts(i, millions):
    """The H0-H7 reading gives the paper's parameter column within 0.1M (H6: 43.46M for the paper's 43.4M)."""
    assert abs(_count(f"zoo_halonet_h{i}") / 1e6 - millions) < 0.1


def test_paper_family_heads_per_stage():
    """Heads (4, 8, 8, 8) per stage as the spec's table reads; H1 keeps timm's halonet_h1 (8 everywhere)."""
    def heads(name):
        with torch.device("meta"):
            model = timm.create_model(name)
        return [sorted({m.num_heads for m in stage.modules() if isinstance(m, HaloAttention)})
                for stage in model.stages]

    assert heads("zoo_halonet_h0") == [[4], [8], [8], [8]] and heads("zoo_halonet_h5") == [[4], [8], [8], [8]]
    assert heads("zoo_halonet_h1") == [[8], [8], [8], [8]]


def _randomize_bn(model):
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.2, 0.5)  # non-zero residual branches, not so large that fp32 error explodes
            m.bias.data.normal_(0, 0.1)


@pytest.mark.parametrize("zoo_name,timm_name", COMPATIBLE)
@torch.no_grad()
def test_timm_state_dict_loads_and_outputs_match(zoo_name, timm_name):
    ref = timm.create_model(timm_name).eval()
    _randomize_bn(ref)
    model = zoo.create_model(zoo_name).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(1, 3, 256, 256)  # smallest size timm runs: the last stage's map must be a multiple of 8
    out_ref, out = ref(x), model(x)
    tol = dict(rtol=1e-4, atol=1e-5 * out_ref.abs().max().item())
    torch.testing.assert_close(out, out_ref, **tol)
    if zoo_name == "zoo_halonet26t":  # the comparison can fail: a flipped relative table in one layer shows
        model.stages[3][0].self_attn.pos_embed.height_rel.mul_(-1)
        assert not torch.allclose(model(x), out_ref, **tol)


@torch.no_grad()
def test_model_any_size():
    """Sizes timm cannot run (224 px: 7x7 last stage; odd, non-square) work, and equal the padded layer math."""
    model = zoo.create_model("test_halonet").eval()
    _randomize_bn(model)
    for size in [(37, 50), (64, 64), (13, 9)]:
        out = model(torch.randn(1, 3, *size))
        assert out.shape == (1, 1000) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="channels"):
        model(torch.randn(1, 4, 64, 64))


def test_test_model_layout():
    model = timm.create_model("test_halonet")
    attn = [m for m in model.modules() if isinstance(m, HaloAttention)]
    assert {m.block_stride for m in attn} == {1, 2}, "test_halonet must cover stride-1 and strided-query layers"
    assert sum(isinstance(m, HaloAttn) for m in model.modules()) == 0
    assert max(m.weight.shape[0] for m in model.modules() if isinstance(m, torch.nn.Conv2d)) <= 64
    assert sum(len(s) for s in model.stages) <= 4
