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
    return _randomize_bn(HaloNet(cfg=cfg, num_classes=10).eval())


def _randomize_bn(model, spread=0.2):
    """Norms with statistics and affine terms away from the identity (a fresh model's are identities)."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, spread)
            m.running_var.uniform_(0.3, 2.0)
            m.weight.data.uniform_(0.3, 1.2)
            m.bias.data.normal_(0, spread)
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
    ref = _randomize_bn(timm.create_model("halonet26t").eval(), spread=0.1)
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
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        zoo.layers.set_fused_inference("halonet26t", True)
    with pytest.raises(TypeError, match="enabled must be a bool"):
        zoo.layers.set_fused_inference(torch.nn.Linear(2, 2), 1)


def test_training_forwards_invalidate_the_folded_weights():
    """A training-mode forward updates the running statistics in place (no version bump): the fold follows."""
    model = _relu_halonet()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model(x)  # folds and caches
        model.train()
        for _ in range(3):
            model(torch.randn(2, 3, 32, 32) * 2 + 1)
        model.eval()
        out = model(x)
        ref = _unfused(model)(x)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        # only the norms switched (no train() on the fused modules, whose hook clears the cache): the
        # statistics' update reaches the key through num_batches_tracked
        norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        for bn in norms:
            bn.train()
        model(torch.randn(2, 3, 32, 32) * 3 - 1)
        for bn in norms:
            bn.eval()
        torch.testing.assert_close(model(x), _unfused(model)(x), rtol=1e-5, atol=1e-5)


def test_norms_in_training_mode_are_not_fused(fused_calls):
    """Test-time BN adaptation: an eval model whose norms train uses batch statistics, as timm does."""
    model = _relu_halonet()
    ref = _unfused(model)
    for m in (model, ref):
        for bn in m.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                bn.train()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out, out_ref = model(x), ref(x)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    assert int(model.stem.conv1.bn.num_batches_tracked) == 1 and fused_calls == []


def test_inference_tensor_parameters_and_param_data_writes():
    with torch.inference_mode():
        model = _relu_halonet()
        x = torch.randn(1, 3, 32, 32)
        out = model(x)
        ref = _unfused(model)(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    model = _relu_halonet()
    with torch.no_grad():
        model(x)
        model.stages[0][0].conv2_kxk.bn.weight.data.mul_(3)  # bypasses the version counter
        model.train().eval()  # the documented remedy
        torch.testing.assert_close(model(x), _unfused(model)(x), rtol=1e-5, atol=1e-5)


def test_eps_change_refolds():
    model = _relu_halonet()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        model(x)
        for bn in model.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                bn.eps = 0.5
        torch.testing.assert_close(model(x), _unfused(model)(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs", [dict(bias=True), dict(groups=4), dict(dilation=2), dict(stride=2, groups=2)])
def test_conv_variants_fold_exactly(kwargs, fused_calls):
    """Conv bias, groups, dilation and stride reach the fused conv (float64 against timm's module)."""
    from timm.layers import ConvNormAct

    block = _randomize_bn(torch.nn.Sequential(ConvNormAct(8, 16, 3, **kwargs)).double().eval(), spread=0.3)
    ref = copy.deepcopy(block)
    conv_bn_fusion.enable_fused_inference(block)
    x = torch.randn(2, 8, 13, 11, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(block(x), ref(x), rtol=1e-10, atol=1e-10)
    assert fused_calls == [False]


def test_meta_and_jit_trace():
    model = _relu_halonet()
    with torch.no_grad():
        out = copy.deepcopy(model).to("meta")(torch.randn(2, 3, 32, 32, device="meta"))
        assert out.shape == (2, 10) and out.device.type == "meta"
        x = torch.randn(1, 3, 32, 32)
        traced = torch.jit.trace(model, x)  # checks that two traced runs give the same graph
        torch.testing.assert_close(traced(x), _unfused(model)(x), rtol=1e-5, atol=1e-5)
