"""Inference-time conv-BN-ReLU fusion (`zoo.layers.conv_bn_fusion`) against timm's own unfused modules."""
import copy
from dataclasses import replace

import pytest
import timm
import torch
from timm.models.byobnet import ByoBlockCfg

import zoo
from zoo.layers import conv_bn_fusion
from zoo.layers.conv_bn_fusion import FusedBottleneckBlock, FusedConvNormAct, FusedSelfAttnBlock
from zoo.models.halonet import HaloNet, model_cfgs


def _relu_halonet(downsample="conv1x1"):
    """A tiny ReLU HaloNet whose blocks cover every shortcut kind: a conv (or avg-pool + conv) shortcut, an
    identity shortcut (second block of a stage), in bottleneck and self-attention blocks."""
    cfg = replace(model_cfgs["test_halonet"], act_layer="relu", downsample=downsample, blocks=(
        ByoBlockCfg(type="bottle", d=2, c=32, s=1, gs=0, br=0.5),
        ByoBlockCfg(type="self_attn", d=2, c=48, s=2, gs=0, br=0.5),
        ByoBlockCfg(type="bottle", d=1, c=64, s=2, gs=0, br=0.5),
    ))
    model = HaloNet(cfg=cfg, num_classes=10).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.3, 2.0)
            m.weight.data.uniform_(0.3, 1.2)
            m.bias.data.normal_(0, 0.2)
    return model


def _unfused(model):
    ref = copy.deepcopy(model)
    zoo.layers.set_fused_inference(ref, False)
    return ref


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the fused convs that run (so a test cannot pass on the unfused path)."""
    calls = []
    real = conv_bn_fusion._conv_bias_relu

    def spy(x, weight, bias, conv, residual=None):
        calls.append(residual is not None)
        return real(x, weight, bias, conv, residual)

    monkeypatch.setattr(conv_bn_fusion, "_conv_bias_relu", spy)
    return calls


@pytest.mark.parametrize("downsample", ["conv1x1", "avg"])
def test_fused_inference_matches_unfused_float64(fused_calls, downsample):
    model = _relu_halonet(downsample).double()
    x = torch.randn(2, 3, 40, 56, dtype=torch.float64)
    with torch.no_grad():
        out = model(x)
        ref = _unfused(model)(x)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    # conv + ReLU: the stem's conv, 2 per bottleneck (3), 1 per self-attention block (2); conv + residual + ReLU:
    # every block's end (5)
    assert fused_calls.count(False) == 1 + 2 * 3 + 2 and fused_calls.count(True) == 5


def test_fused_inference_float32_matches_timm_model():
    """The fused zoo_halonet26t equals timm's halonet26t (its own modules) with the same state_dict."""
    ref = timm.create_model("halonet26t").eval()
    for m in ref.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.2, 0.5)
            m.bias.data.normal_(0, 0.1)
    model = zoo.create_model("zoo_halonet26t").eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        out, out_ref = model(x), ref(x)
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-5 * out_ref.abs().max().item())


def test_folded_weights_follow_parameter_changes(fused_calls):
    model = _relu_halonet()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        model(x)
        bn = model.stages[1][0].conv3_1x1.bn
        bn.weight.mul_(-2.0)  # an in-place update, as an optimizer step or load_state_dict makes
        bn.running_mean.add_(0.5)
        out = model(x)
        ref = _unfused(model)(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert fused_calls


def test_training_and_autograd_take_timm_path(fused_calls):
    model = _relu_halonet()
    x = torch.randn(2, 3, 32, 32)
    out = model(x)  # eval mode, but with autograd: unfused, differentiable
    out.sum().backward()
    assert model.stem.conv1.conv.weight.grad is not None
    model.train()
    bn = model.stem.conv1.bn
    before = bn.running_mean.clone()
    with torch.no_grad():
        model(x)  # training mode updates the running statistics: unfused
    assert not torch.equal(before, bn.running_mean)
    assert fused_calls == []


def test_silu_blocks_are_not_fused(fused_calls):
    model = zoo.create_model("test_halonet").eval()  # SiLU
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert fused_calls == []


def test_enable_fused_inference_on_a_timm_model():
    model = timm.create_model("halonet26t")
    keys = list(model.state_dict())
    assert conv_bn_fusion.enable_fused_inference(model) == 28 + 5 + 3
    assert list(model.state_dict()) == keys
    assert isinstance(model.stem.conv1, FusedConvNormAct)
    assert isinstance(model.stages[0][0], FusedBottleneckBlock) and isinstance(model.stages[3][0], FusedSelfAttnBlock)
    assert zoo.layers.set_fused_inference(model, False) == 36
    assert all(not m.fused_inference for m in model.modules() if isinstance(m, FusedConvNormAct))


def test_bad_arguments():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        conv_bn_fusion.enable_fused_inference("halonet26t")
    with pytest.raises(TypeError, match="enabled must be a bool"):
        zoo.layers.set_fused_inference(torch.nn.Linear(2, 2), 1)
