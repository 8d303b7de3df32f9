"""zoo.accelerate: timm's HaloAttn layers swapped in place for zoo HaloAttention, same weights, same outputs."""
import logging

import pytest
import timm
import torch
from timm.layers.halo_attn import HaloAttn
from timm.models.byobnet import ByoBlockCfg, ByobNet, ByoModelCfg

import zoo
from zoo.accelerate import AccelerateReport
from zoo.layers.halo_attention import HaloAttention


def _tiny_timm_halonet(**self_attn_kwargs):
    """A small timm ByobNet whose self-attention is timm's own HaloAttn (stride-1 and strided layers)."""
    cfg = ByoModelCfg(
        blocks=(
            ByoBlockCfg(type="self_attn", d=1, c=32, s=1, gs=0, br=0.5),
            ByoBlockCfg(type="bottle", d=1, c=48, s=2, gs=0, br=0.5),
            ByoBlockCfg(type="self_attn", d=2, c=64, s=2, gs=0, br=0.5),
        ),
        stem_chs=16, stem_type="3x3", stem_pool="maxpool",
        self_attn_layer="halo", self_attn_kwargs=dict(block_size=4, halo_size=1, num_heads=2, **self_attn_kwargs),
    )
    return ByobNet(cfg, num_classes=10)


def _randomize_bn(model):
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)


@pytest.mark.parametrize("kwargs", [dict(), dict(qkv_bias=True, scale_pos_embed=True), dict(avg_down=True)])
def test_accelerate_tiny_timm_model(kwargs):
    model = _tiny_timm_halonet(**kwargs).double().eval()
    _randomize_bn(model)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, HaloAttn):
                m.pos_embed.height_rel.normal_(0, 0.5)  # sizeable relative terms, so a wrong index would show
                m.pos_embed.width_rel.normal_(0, 0.5)
    names = [n for n, m in model.named_modules() if isinstance(m, HaloAttn)]
    params = dict(model.named_parameters())
    x = torch.randn(2, 3, 64, 128, dtype=torch.float64)  # every halo map a multiple of 4, as timm needs
    with torch.no_grad():
        expected = model(x)

    out_model, report = zoo.accelerate(model)
    assert out_model is model
    assert isinstance(report, AccelerateReport) and len(report) == len(names) == 3
    assert [s.name for s in report.swapped] == names and not report.skipped
    assert all(s.old.endswith("HaloAttn") and s.new.endswith("HaloAttention") for s in report.swapped)
    assert not any(isinstance(m, HaloAttn) for m in model.modules())
    assert all(isinstance(model.get_submodule(n), HaloAttention) for n in names)
    assert {m.block_stride for m in model.modules() if isinstance(m, HaloAttention)} == (
        {1} if kwargs.get("avg_down") else {1, 2})
    # same parameter objects under the same names: weights shared, an existing optimizer keeps working
    after = dict(model.named_parameters())
    assert after.keys() == params.keys() and all(after[k] is params[k] for k in params)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-10, atol=1e-10)

    # a second call finds nothing left to swap
    _, again = zoo.accelerate(model)
    assert len(again) == 0


def test_accelerate_keeps_training_mode_and_gradients():
    model = _tiny_timm_halonet().train()
    _randomize_bn(model)  # timm zero-inits the last BN of each residual branch, which would stop the gradient
    zoo.accelerate(model)
    swapped = [m for m in model.modules() if isinstance(m, HaloAttention)]
    assert swapped and all(m.training for m in swapped)
    model(torch.randn(2, 3, 40, 56)).pow(2).mean().backward()
    for m in swapped:
        for name, p in m.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@torch.no_grad()
def test_accelerate_timm_halonet26t():
    model = timm.create_model("halonet26t").eval()
    _randomize_bn(model)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.2, 0.5)  # moderate residual branches: fp32 stays well-conditioned
    x = torch.randn(1, 3, 256, 256)
    expected = model(x)
    model, report = zoo.accelerate(model)
    assert [s.name for s in report.swapped] == ["stages.2.1.self_attn", "stages.3.0.self_attn", "stages.3.1.self_attn"]
    assert "swapped 3 module(s)" in str(report)
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


def test_accelerate_bare_layer_subclass_and_logging(caplog):
    layer = HaloAttn(16, num_heads=2, block_size=4, halo_size=1, stride=2).eval()
    x = torch.randn(1, 16, 8, 12)
    with torch.no_grad():
        expected = layer(x)
    with caplog.at_level(logging.INFO, logger="zoo"):
        new, report = zoo.accelerate(layer)
    assert isinstance(new, HaloAttention) and [s.name for s in report.swapped] == [""]
    assert "HaloAttention" in caplog.text
    with torch.no_grad():
        torch.testing.assert_close(new(x), expected, rtol=1e-5, atol=1e-6)

    class MyHalo(HaloAttn):
        pass

    holder = torch.nn.Sequential(MyHalo(16, num_heads=2, block_size=4, halo_size=1))
    _, report = zoo.accelerate(holder)
    assert len(report) == 0 and report.skipped and report.skipped[0][0] == "0"
    assert type(holder[0]) is MyHalo


def test_accelerate_rejects_non_module():
    with pytest.raises(TypeError, match="model"):
        zoo.accelerate("halonet26t")


def test_accelerate_swaps_every_alias_of_a_shared_layer():
    """One HaloAttn registered under two names (weight sharing) becomes one HaloAttention under both names."""
    layer = HaloAttn(16, num_heads=2, block_size=4, halo_size=1).eval()
    model = torch.nn.Sequential(layer, layer).eval()
    x = torch.randn(1, 16, 8, 8)
    with torch.no_grad():
        ref = model(x)
    model, report = zoo.accelerate(model)
    assert isinstance(model[0], HaloAttention) and model[0] is model[1]
    assert [s.name for s in report.swapped] == ["0", "1"] and not report.skipped
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


def test_accelerate_keeps_hooks_and_their_handles():
    layer = HaloAttn(16, num_heads=2, block_size=4, halo_size=1).eval()
    model = torch.nn.Sequential(layer)
    seen = []
    handle = layer.register_forward_hook(lambda m, a, out: seen.append(type(m).__name__))
    model, _ = zoo.accelerate(model)
    model(torch.randn(1, 16, 8, 8))
    assert seen == ["HaloAttention"]
    handle.remove()
    model(torch.randn(1, 16, 8, 8))
    assert seen == ["HaloAttention"]
