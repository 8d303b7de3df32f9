"""ULSAM (arXiv 2006.15102): the module against a per-subspace float64 loop, and the MobileNets against timm's."""
import pytest
import timm
import torch
import torch.nn.functional as F

from zoo.layers import ULSAM
from zoo.models.ulsam import UlsamMobileNet

F64 = torch.float64


def _randomize_bn(module):
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1, 0.3)
                m.bias.normal_(0, 0.3)


def _maxpool3(x):
    """3×3, stride 1, padding 1 max pool written as a max over the nine shifted copies."""
    H, W = x.shape[-2:]
    p = F.pad(x, (1, 1, 1, 1), value=float("-inf"))
    return torch.stack([p[..., i:i + H, j:j + W] for i in range(3) for j in range(3)]).amax(0)


def _ulsam_reference(x, mod):
    """The paper's formula, one subspace at a time (eval-mode BN as an affine map)."""
    g, G = mod.num_subspaces, mod.dim // mod.num_subspaces
    outs, maps = [], []
    for n in range(g):
        fn = x[:, n * G:(n + 1) * G]
        a = fn * mod.dw.weight[n * G:(n + 1) * G].view(1, G, 1, 1)
        if mod.norm_act:
            bn = mod.dw_bn
            s = slice(n * G, (n + 1) * G)
            a = (a - bn.running_mean[s].view(1, G, 1, 1)) / torch.sqrt(bn.running_var[s].view(1, G, 1, 1) + bn.eps)
            a = torch.relu(a * bn.weight[s].view(1, G, 1, 1) + bn.bias[s].view(1, G, 1, 1))
        else:
            a = a + mod.dw.bias[n * G:(n + 1) * G].view(1, G, 1, 1)
        a = _maxpool3(a)
        a = (a * mod.pw.weight[n].view(1, G, 1, 1)).sum(1, keepdim=True)  # PW: G -> 1
        if mod.norm_act:
            bn = mod.pw_bn
            a = (a - bn.running_mean[n]) / torch.sqrt(bn.running_var[n] + bn.eps) * bn.weight[n] + bn.bias[n]
            a = torch.relu(a)
        else:
            a = a + mod.pw.bias[n]
        e = torch.exp(a - a.amax(dim=(-2, -1), keepdim=True))
        a = e / e.sum(dim=(-2, -1), keepdim=True)  # softmax over h·w
        maps.append(a)
        outs.append(a * fn + fn)
    return torch.cat(outs, 1), torch.cat(maps, 1)


@pytest.mark.parametrize("norm_act", [True, False])
@pytest.mark.parametrize("g", [1, 4])
def test_matches_per_subspace_loop(norm_act, g):
    mod = ULSAM(16, g, norm_act=norm_act).to(F64).eval()
    _randomize_bn(mod)
    with torch.no_grad():
        for p in (mod.dw.weight, mod.pw.weight):
            p.normal_(0, 1.0)
        for b in (mod.dw.bias, mod.pw.bias):
            if b is not None:
                b.normal_(0, 0.5)
    x = torch.randn(2, 16, 7, 5, dtype=F64)
    ref_out, ref_maps = _ulsam_reference(x, mod)
    torch.testing.assert_close(mod.attention_maps(x), ref_maps, atol=1e-12, rtol=0)
    torch.testing.assert_close(mod(x), ref_out, atol=1e-12, rtol=0)


@pytest.mark.parametrize("norm_act", [True, False])
@pytest.mark.parametrize("train", [True, False])
def test_maps_sum_to_one_over_space(norm_act, train):
    mod = ULSAM(32, 4, norm_act=norm_act).to(F64).train(train)
    x = torch.randn(3, 32, 6, 9, dtype=F64)
    maps = mod.attention_maps(x)
    assert maps.shape == (3, 4, 6, 9) and (maps >= 0).all()
    torch.testing.assert_close(maps.sum(dim=(-2, -1)), torch.ones(3, 4, dtype=F64), atol=1e-12, rtol=0)
    assert mod(x).shape == x.shape


@pytest.mark.parametrize("norm_act", [True, False])
@pytest.mark.parametrize("train", [True, False])
def test_zero_pointwise_gives_uniform_map(norm_act, train):
    mod = ULSAM(24, 4, norm_act=norm_act).to(F64).train(train)
    with torch.no_grad():
        mod.pw.weight.zero_()
        if mod.pw.bias is not None:
            mod.pw.bias.zero_()
    x = torch.randn(2, 24, 5, 7, dtype=F64)
    torch.testing.assert_close(mod(x), x * (1 + 1 / 35), atol=1e-12, rtol=0)


def test_parameter_formula_and_validation():
    C, g = 512, 4
    assert sum(p.numel() for p in ULSAM(C, g, norm_act=False).parameters()) == 2 * C + C + g  # DW w+b, PW w+b
    assert sum(p.numel() for p in ULSAM(C, g).parameters()) == C + 2 * C + C + 2 * g  # DW, BN, PW, BN
    assert sum(p.numel() for p in ULSAM(C, g).parameters()) < 2100  # "~1k parameters" scale at m=512
    with pytest.raises(ValueError, match="num_subspaces"):
        ULSAM(30, 4)
    with pytest.raises(ValueError, match="dim"):
        ULSAM(0, 1)


def _copy_by_order(dst, src):
    """Load `src`'s state into `dst` by position (same architecture, different module names)."""
    ds, ss = dst.state_dict(), src.state_dict()
    assert len(ds) == len(ss)
    dst.load_state_dict({k: v for k, v in zip(ds, ss.values(), strict=True)})


@pytest.mark.parametrize("name,timm_name", [("ulsam_mobilenetv1", "mobilenetv1_100"),
                                            ("ulsam_mobilenetv2", "mobilenetv2_100")])
def test_backbone_matches_timm_mobilenet(name, timm_name):
    ours = timm.create_model(name, ulsam_stages=()).eval()
    ref = timm.create_model(timm_name).eval()
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    _copy_by_order(ours, ref)
    x = torch.randn(1, 3, 96, 96)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=1e-4)


def test_ulsam_placement():
    seen = {}
    model = timm.create_model("ulsam_mobilenetv1").eval()
    mods = [m for m in model.modules() if isinstance(m, ULSAM)]
    assert len(mods) == 1 and mods[0].num_subspaces == 4 and mods[0].dim == 512
    mods[0].register_forward_hook(lambda m, i, o: seen.update(shape=tuple(o.shape)))  # returns None
    model(torch.randn(1, 3, 224, 224))
    assert seen["shape"] == (1, 512, 14, 14)
    base = sum(p.numel() for p in timm.create_model("mobilenetv1_100").parameters())
    ulsam = sum(p.numel() for p in mods[0].parameters())
    assert sum(p.numel() for p in model.parameters()) == base + ulsam
    # replace: one 512->512 depthwise-separable block (3×3 DW + BN, 1×1 PW + BN) swapped for ULSAM
    replaced = timm.create_model("ulsam_mobilenetv1_replace")
    block = 512 * 9 + 2 * 512 + 512 * 512 + 2 * 512
    assert sum(p.numel() for p in replaced.parameters()) == base - block + ulsam
    assert round(sum(p.numel() for p in replaced.parameters()) / 1e6, 1) == 4.0  # paper: 4.2M -> 3.9M
    v2 = timm.create_model("ulsam_mobilenetv2")
    (m2,) = [m for m in v2.modules() if isinstance(m, ULSAM)]
    assert m2.dim == 96


def test_tiny_model_and_validation():
    model = timm.create_model("ulsam_mobilenetv1_tiny").eval()
    assert model.pretrained_cfg["input_size"] == (3, 32, 32)
    x = torch.randn(2, 3, 32, 32)
    final, inter = model.forward_intermediates(x)
    assert [t.shape[-1] for t in inter] == [32, 16, 8, 4, 2]
    torch.testing.assert_close(final, model.forward_features(x))
    torch.testing.assert_close(model.forward_head(final), model(x))
    assert model(torch.randn(1, 3, 40, 24)).shape == (1, 10)
    with pytest.raises(ValueError, match="in_chans=3 channels"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="at least 16x16"):
        model(torch.randn(1, 3, 8, 32))
    with pytest.raises(ValueError, match="ulsam_stages"):
        UlsamMobileNet(ulsam_stages=(7,))


def test_global_pool_empty_keeps_the_feature_map_as_timm():
    """`num_classes=0, global_pool=""` returns the unpooled map (B, C, H, W), as timm's own MobileNets do."""
    x = torch.randn(1, 3, 64, 64)
    ref = timm.create_model("mobilenetv1_100", num_classes=0, global_pool="").eval()
    model = timm.create_model("ulsam_mobilenetv1", num_classes=0, global_pool="").eval()
    with torch.no_grad():
        assert model(x).shape == ref(x).shape == (1, 1024, 2, 2)
        model.reset_classifier(0, "avg")
        assert model(x).shape == (1, 1024)
        model.reset_classifier(0, "")
        assert model(x).shape == (1, 1024, 2, 2)
