"""Agent-DeiT / Agent-PVT / Agent-Swin: the paper's parameter counts, the reference layouts, any input size, and the
non-agent paths against timm's own models with the same weights."""
import math

import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed
from timm.models.swin_transformer import SwinTransformer, WindowAttention
from timm.models.vision_transformer import VisionTransformer

import zoo
from pipelines.model_info import models_markdown
from zoo.layers import AgentAttention, Attention
from zoo.models.agent_pvt import SpatialReductionAttention
from zoo.models.agent_swin import AgentSwinBlock, AgentSwinTransformer, KernelWindowAttention, parse_attn_type
from zoo.models.agent_deit import AgentDeiT

D64 = torch.float64

# Agent Attention (arXiv:2312.08874), repository README / paper table: parameters in millions.
PAPER_PARAMS = {
    "agent_deit_tiny": 6.0, "agent_deit_small": 22.7, "agent_deit_base": 87.2,
    "agent_pvt_tiny": 11.6, "agent_pvt_small": 20.6, "agent_pvt_medium": 35.9, "agent_pvt_large": 48.7,
    "agent_swin_tiny": 29, "agent_swin_small": 50, "agent_swin_base": 88,
}


def _meta(name, **kwargs):
    with torch.device("meta"):
        return timm.create_model(name, **kwargs)


def _params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_parameter_count_within_2_percent_of_the_paper(name):
    count = _params(_meta(name)) / 1e6
    assert abs(count - PAPER_PARAMS[name]) / PAPER_PARAMS[name] < 0.02, f"{name}: {count:.3f}M"


def test_registered_listed_and_test_models_are_tiny():
    names = zoo.list_models("*agent*")
    assert set(PAPER_PARAMS) | {"test_agent_deit", "test_agent_pvt", "test_agent_swin"} == set(names)
    assert {zoo.model_family(n) for n in names} == {"agent_deit", "agent_pvt", "agent_swin"}
    table = models_markdown(names)  # what `zoo list --markdown` prints
    assert all(f"`{n}`" in table for n in names) and "arXiv:2312.08874" in table
    for name in ("test_agent_deit", "test_agent_pvt", "test_agent_swin"):
        cfg = timm.models.get_pretrained_cfg(name)
        assert 32 <= cfg.input_size[1] <= 64
        model = _meta(name)
        widths = [m.normalized_shape[0] for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
        blocks = [m for m in model.modules() if hasattr(m, "mlp") and hasattr(m, "norm1")]
        assert max(widths[:-1] or widths) <= 64 * 2 and len(blocks) <= 4  # PatchMerging norms see 4·C/2
        assert all(getattr(b, "attn", None) is not None for b in blocks)


def test_reference_layouts():
    # DeiT: every block agent with 49 agents (T/S); B: 81 agents in the first 4 blocks, dense attention after
    tiny, base = _meta("agent_deit_tiny"), _meta("agent_deit_base")
    assert all(isinstance(b.attn, AgentAttention) and b.attn.agent_num == 49 for b in tiny.blocks)
    kinds = [type(b.attn) for b in base.blocks]
    assert kinds == [AgentAttention] * 4 + [Attention] * 8
    assert all(b.attn.agent_num == 81 and b.attn.num_prefix_tokens == 1 for b in base.blocks[:4])
    # PVT: AAAA, 9-16-49-49 agents, full-resolution K/V, biases sized for the 56-28-14-7 grids
    pvt = _meta("agent_pvt_small")
    for stage, n, g in zip(pvt.stages, (9, 16, 49, 49), (56, 28, 14, 7)):
        assert all(b.attn.agent_num == n and b.attn.sr_ratio == 1 and b.attn.bias_grid == (g, g)
                   for b in stage.blocks)
        assert stage.pos_embed.shape[1] == g * g
    # Swin: T = AAAB, S = AABB, B = AAMB2; agent blocks global over 56-28-14-7, window blocks of 7
    for name, layout in (("agent_swin_tiny", ("AA", "AA", "AAAAAA", "BB")),
                         ("agent_swin_small", ("AA", "AA", "B" * 18, "BB")),
                         ("agent_swin_base", ("AA", "AA", "AA" + "B" * 16, "BB"))):
        model = _meta(name)
        for stage, letters, n, g in zip(model.layers, layout, (9, 16, 49, 49), (56, 28, 14, 7)):
            for blk, letter in zip(stage.blocks, letters):
                if letter == "A":
                    assert isinstance(blk, AgentSwinBlock) and blk.attn.agent_num == n
                    assert blk.attn.bias_grid == (g, g)
                else:
                    assert isinstance(blk.attn, KernelWindowAttention) and blk.window_size == (7, 7)
    assert parse_attn_type("AAMB2", (2, 2, 18, 2))[2] == ("A",) * 2 + ("B",) * 16
    with pytest.raises(ValueError, match="attn_type"):
        parse_attn_type("AAM", (2, 2, 6))
    with pytest.raises(ValueError, match="attn_type"):
        parse_attn_type("AXB", (2, 2, 6))


def test_agent_deit_tiny_at_1024_keeps_49_agents():
    model = _meta("agent_deit_tiny", img_size=1024)
    assert model.pos_embed.shape == (1, 64 * 64 + 1, 192)
    assert all(b.attn.agent_num == 49 and b.attn.bias_grid == (64, 64) for b in model.blocks)
    assert model.blocks[0].attn.ah_bias.shape == (1, 3, 49, 64, 1)
    # 14x14 -> 64x64 only grows the per-axis biases and the position embedding
    assert _params(model) - _params(_meta("agent_deit_tiny")) == 192 * (64 * 64 - 14 * 14) + 12 * 4 * 3 * 49 * 50


@torch.no_grad()
def test_agent_deit_tiny_any_size():
    model = timm.create_model("agent_deit_tiny").eval()
    for size, grid in (((224, 224), (14, 14)), ((160, 224), (10, 14)), ((100, 150), (7, 10))):
        x = torch.randn(1, 3, *size)
        out = model(x)
        assert out.shape == (1, 1000) and torch.isfinite(out).all()
        final, inters = model.forward_intermediates(x, indices=1)
        assert inters[0].shape == (1, 192, *grid) and final.shape == (1, 1 + grid[0] * grid[1], 192)
    # the position embedding is resampled as timm's dynamic_img_size does
    tokens = torch.randn(1, 10, 14, 192)
    expect = resample_abs_pos_embed(model.pos_embed, (10, 14), old_size=(14, 14), num_prefix_tokens=1)
    torch.testing.assert_close(model._pos_embed(tokens) - torch.cat([model.cls_token, tokens.reshape(1, 140, 192)], 1),
                               expect)


def _copy_weights(src, dst):
    missing, unexpected = dst.load_state_dict(src.state_dict(), strict=True)
    assert not missing and not unexpected


@torch.no_grad()
def test_agent_deit_dense_blocks_equal_timm_vit():
    """With agent_layers=0 every block is dense attention through kernels: the model is timm's ViT."""
    args = dict(img_size=64, patch_size=8, embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=10)
    zoo_model = AgentDeiT(agent_layers=0, **args).double().eval()
    ref = VisionTransformer(dynamic_img_size=True, dynamic_img_pad=True, **args).double().eval()
    _copy_weights(zoo_model, ref)
    for size in ((64, 64), (40, 64), (37, 51)):
        x = torch.randn(2, 3, *size, dtype=D64)
        torch.testing.assert_close(zoo_model(x), ref(x), rtol=1e-10, atol=1e-10)
        a = zoo_model.forward_intermediates(x, indices=[0, 1], return_prefix_tokens=True)
        b = ref.forward_intermediates(x, indices=[0, 1], return_prefix_tokens=True)
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@torch.no_grad()
def test_window_attention_equals_timm_with_and_without_mask():
    ref = WindowAttention(32, num_heads=4, window_size=(3, 5)).double().eval()
    ref.fused_attn = False
    mine = KernelWindowAttention(32, num_heads=4, window_size=(3, 5), dtype=D64).eval()
    _copy_weights(ref, mine)
    with torch.no_grad():
        ref.relative_position_bias_table.normal_()
        mine.relative_position_bias_table.copy_(ref.relative_position_bias_table)
    x = torch.randn(2 * 6, 15, 32, dtype=D64)  # batch 2, 6 windows
    mask = torch.where(torch.rand(6, 15, 15) < 0.3, -100.0, 0.0).double()
    torch.testing.assert_close(mine(x), ref(x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(mine(x, mask), ref(x, mask), rtol=1e-10, atol=1e-10)


@torch.no_grad()
def test_agent_swin_window_blocks_equal_timm_swin():
    """An all-window layout ('BBB') is timm's Swin with the same weights, shifted windows and padding included."""
    args = dict(img_size=64, embed_dim=16, depths=(2, 2, 2), num_heads=(1, 2, 4), window_size=2, mlp_ratio=2.0,
                num_classes=10, drop_path_rate=0.0)
    zoo_model = AgentSwinTransformer(attn_type="BBB", agent_num=(4, 4, 4), **args).double().eval()
    ref = SwinTransformer(strict_img_size=False, **args).double().eval()
    _copy_weights(zoo_model, ref)
    for size in ((64, 64), (32, 64), (48, 40)):
        x = torch.randn(2, 3, *size, dtype=D64)
        torch.testing.assert_close(zoo_model(x), ref(x), rtol=1e-10, atol=1e-10)


@torch.no_grad()
def test_agent_swin_agent_blocks_are_global():
    model = timm.create_model("test_agent_swin").double().eval()
    blk = model.layers[0].blocks[0]
    assert isinstance(blk, AgentSwinBlock)
    for p in blk.parameters():
        p.copy_(torch.randn_like(p) * 0.3)
    x = torch.randn(1, 11, 13, 16, dtype=D64)
    y = x.clone()
    y[0, 0, 0, 0] += 1.0
    diff = (blk(x) - blk(y)).abs().sum(-1)[0]
    assert (diff > 1e-6).all(), "a token change must reach every position through the agents"
    window = model.layers[2].blocks[1]  # a window block (window 2, shifted): a change stays local
    z = torch.randn(1, 6, 8, 64, dtype=D64)
    w = z.clone()
    w[0, 0, 0, 0] += 1.0
    changed = (window(z) - window(w)).abs().sum(-1)[0] > 1e-12
    assert changed[0, 0] and not changed[3:, 3:].any()


def test_spatial_reduction_attention_matches_explicit():
    m = SpatialReductionAttention(16, num_heads=2, qkv_bias=True, sr_ratio=2, dtype=D64).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    H, W, C, d = 4, 6, 16, 8
    x = torch.randn(2, H * W, C, dtype=D64)
    out = m(x, (H, W))
    for b in range(2):
        q = x[b] @ m.q.weight.T + m.q.bias
        g = x[b].T.reshape(C, 2, 2, 3, 2)
        red = (torch.einsum("ciajb,ocab->oij", g, m.sr.weight) + m.sr.bias[:, None, None]).reshape(C, 6).T
        red = (red - red.mean(-1, keepdim=True)) / torch.sqrt(red.var(-1, unbiased=False, keepdim=True) + 1e-5)
        kv = (red * m.norm.weight + m.norm.bias) @ m.kv.weight.T + m.kv.bias
        o = torch.cat([torch.softmax(q[:, s] @ kv[:, s].T / math.sqrt(d), -1) @ kv[:, C:][:, s]
                       for s in (slice(0, d), slice(d, 2 * d))], dim=1)
        torch.testing.assert_close(out[b], o @ m.proj.weight.T + m.proj.bias, rtol=1e-10, atol=1e-10)


@torch.no_grad()
def test_agent_pvt_head_is_the_mean_of_the_last_stage_without_norm():
    model = timm.create_model("test_agent_pvt").eval()
    x = torch.randn(2, 3, 48, 80)
    feats = model.forward_features(x)
    assert feats.shape == (2, 64, 2, 3)  # 48x80 -> 12x20 -> 6x10 -> 3x5 -> 2x3 (padded)
    torch.testing.assert_close(model(x), feats.mean(dim=(2, 3)) @ model.head.weight.T + model.head.bias)
    assert not any(n.startswith("norm") for n, _ in model.named_children())


@pytest.mark.parametrize("name", ["test_agent_deit", "test_agent_pvt", "test_agent_swin"])
def test_grad_checkpointing_gives_the_same_gradients(name):
    model = timm.create_model(name, num_classes=5).train()
    x = torch.randn(2, 3, 48, 64)
    grads = []
    for enable in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        model(x).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("name", ["test_agent_deit", "test_agent_pvt", "test_agent_swin"])
@torch.no_grad()
def test_large_input_keeps_the_agent_count(name):
    model = timm.create_model(name).eval()
    out = model(torch.randn(1, 3, 160, 96))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()
    assert {m.agent_num for m in model.modules() if isinstance(m, AgentAttention)} <= {4, 9, 16}


@pytest.mark.parametrize("name", ["test_agent_deit", "test_agent_pvt", "test_agent_swin"])
def test_bad_input_names_the_problem(name):
    model = timm.create_model(name).eval()
    with pytest.raises(ValueError, match="in_chans=3"):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match=r"\(B, in_chans=3 channels, H, W\)"):
        model(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match="in_chans=3"):
        model.forward_intermediates(torch.randn(1, 4, 64, 64))


@pytest.mark.parametrize("name, strict", [("test_agent_deit", dict(dynamic_img_size=False)),
                                          ("test_agent_swin", dict(strict_img_size=True))])
@torch.no_grad()
def test_strict_image_size_is_a_value_error(name, strict):
    """timm's fixed-size modes (ViT without dynamic_img_size, Swin with strict_img_size) take only img_size; another
    size is a ValueError naming img_size (timm's PatchEmbed asserts; the zoo pads to whole patches, which would
    otherwise let 60 px through as 64). The fixed-size model matches the dynamic one at img_size."""
    model = timm.create_model(name, **strict).eval()
    dynamic = timm.create_model(name).eval()
    dynamic.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(model(x), dynamic(x))
    for size in ((60, 64), (72, 64), (64, 56)):
        with pytest.raises(ValueError, match=r"img_size=\(64, 64\)"):
            model(torch.randn(1, 3, *size))
        with pytest.raises(ValueError, match=r"img_size=\(64, 64\)"):
            model.forward_intermediates(torch.randn(1, 3, *size))
        assert dynamic(torch.randn(1, 3, *size)).shape == (1, 1000)


@pytest.mark.parametrize("name", ["test_agent_deit", "test_agent_pvt", "test_agent_swin"])
def test_attention_dropout_is_refused_by_name(name):
    """timm's attn_drop_rate is accepted at 0 and refused otherwise (kernels.attention has no attention dropout),
    never an unexpected-keyword TypeError."""
    assert timm.create_model(name, attn_drop_rate=0.0) is not None
    with pytest.raises(NotImplementedError, match="attn_drop"):
        timm.create_model(name, attn_drop_rate=0.1)


@torch.no_grad()
def test_agent_pvt_loads_reference_layout_checkpoints():
    """The reference names stages patch_embed1/pos_embed1/block1.0 and splits q / kv; the filter maps them."""
    from zoo.models.agent_pvt import checkpoint_filter_fn

    model = timm.create_model("test_agent_pvt").eval()
    reference = {}
    for k, v in model.state_dict().items():
        if k.startswith("stages."):
            i = int(k.split(".")[1])
            k = k.replace(f"stages.{i}.patch_embed.", f"patch_embed{i + 1}.")
            k = k.replace(f"stages.{i}.pos_embed", f"pos_embed{i + 1}").replace(f"stages.{i}.blocks.", f"block{i + 1}.")
        if ".attn.qkv." in k:
            C = v.shape[0] // 3
            reference[k.replace(".qkv.", ".q.")], reference[k.replace(".qkv.", ".kv.")] = v[:C], v[C:]
        else:
            reference[k] = v
    assert "block1.0.attn.q.weight" in reference and "block2.0.attn.kv.bias" in reference
    assert "pos_embed3" in reference and "patch_embed4.norm.weight" in reference
    other = timm.create_model("test_agent_pvt").eval()
    other.load_state_dict(checkpoint_filter_fn({"model": reference}, other), strict=True)
    x = torch.randn(1, 3, 64, 48)
    torch.testing.assert_close(other(x), model(x))
    # a different img_size: the position embeddings are resampled to the new grids
    bigger = timm.create_model("test_agent_pvt", img_size=96)
    bigger.load_state_dict(checkpoint_filter_fn(reference, bigger), strict=True)
    assert bigger.stages[0].pos_embed.shape == (1, 24 * 24, 16)


@torch.no_grad()
def test_reference_checkpoints_load_at_another_size():
    """A checkpoint filtered into a model built for 96 px runs exactly as the 64-px original run at 96 px: the
    position embedding and the per-axis agent biases are resampled once instead of per forward."""
    from zoo.models.agent_deit import checkpoint_filter_fn as deit_filter
    from zoo.models.agent_swin import checkpoint_filter_fn as swin_filter

    x = torch.randn(1, 3, 96, 96)
    src = timm.create_model("test_agent_deit").eval()
    dst = timm.create_model("test_agent_deit", img_size=96).eval()
    dst.load_state_dict(deit_filter({"model": src.state_dict()}, dst), strict=True)
    assert dst.blocks[0].attn.ah_bias.shape == (1, 2, 16, 12, 1) and dst.pos_embed.shape == (1, 145, 64)
    torch.testing.assert_close(dst(x), src(x), rtol=1e-5, atol=1e-5)

    src = timm.create_model("test_agent_swin").eval()
    reference = {}  # the original Swin layout: downsample at the end of the previous stage, plain `head`
    for k, v in src.state_dict().items():
        if ".downsample." in k:
            i = int(k.split(".")[1])
            k = k.replace(f"layers.{i}.downsample", f"layers.{i - 1}.downsample")
        reference[k.replace("head.fc.", "head.")] = v
    assert "layers.0.downsample.reduction.weight" in reference and "head.weight" in reference
    dst = timm.create_model("test_agent_swin", img_size=96).eval()
    dst.load_state_dict(swin_filter({"model": reference}, dst), strict=True)
    assert dst.layers[0].blocks[0].attn.wa_bias.shape == (1, 1, 1, 24, 4)
    torch.testing.assert_close(dst(x), src(x), rtol=1e-5, atol=1e-5)


def test_agent_swin_window_follows_the_input_size():
    """The reference configs give the window blocks img_size / 32 (7 at 224, 9 at 288, 12 at 384); an explicit
    window_size wins."""
    def windows(**kw):
        m = timm.create_model("agent_swin_tiny", **kw)
        return {tuple(b.window_size) for b in m.modules() if type(b).__name__ == "SwinTransformerBlock"}

    assert windows() == {(7, 7)} and windows(img_size=288) == {(9, 9)} and windows(img_size=384) == {(12, 12)}
    assert windows(img_size=384, window_size=8) == {(8, 8)}


@pytest.mark.parametrize("name", ["test_agent_deit", "test_agent_pvt", "test_agent_swin"])
def test_channels_last_conversion_keeps_outputs_and_checkpoint_layout(name):
    """timm's --channels-last calls model.to(memory_format=channels_last): the reference's 5-d agent biases must
    not stop it, and keep their (checkpoint-compatible) shapes."""
    model = timm.create_model(name).eval()
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, *model.pretrained_cfg["input_size"][1:])
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes


def test_bias_cache_is_dropped_by_mode_switches_and_moves():
    """Writes through `param.data` bypass the version counter the inference cache keys on: `train().eval()` (or
    any `.to`) drops the cache, so the next forward sees them."""
    model = timm.create_model("test_agent_deit").eval()
    x = torch.randn(1, 3, *model.pretrained_cfg["input_size"][1:])
    attn = next(m for m in model.modules() if isinstance(m, AgentAttention))
    with torch.no_grad():
        model(x)
        attn.ah_bias.data.add_(1.0)
        stale = model(x)
        model.train().eval()
        fresh = model(x)
        model.double().float()
        again = model(x)
    uncached = model(x)  # grad enabled: built from the parameters
    torch.testing.assert_close(fresh, uncached.detach())
    torch.testing.assert_close(again, uncached.detach())
    assert not torch.allclose(stale, fresh)


def test_block_identity_hooks_still_fire():
    """AgentBlock skips its `nn.Identity` layer-scale/drop-path calls (host time) unless they carry hooks."""
    model = zoo.create_model("test_agent_deit").eval()
    block = model.blocks[0]
    assert type(block.ls1) is torch.nn.Identity and type(block.drop_path2) is torch.nn.Identity
    seen = []
    block.ls1.register_forward_hook(lambda m, args, out: seen.append("ls1"))
    block.drop_path2.register_forward_pre_hook(lambda m, args: seen.append("drop_path2"))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        model(x)
    assert seen == ["ls1", "drop_path2"]
