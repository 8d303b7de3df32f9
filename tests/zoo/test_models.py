"""The generic suite every registered zoo model passes (after timm's tests/test_models.py)."""
import copy
import fnmatch
import math

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import zoo

ALL_MODELS = zoo.list_models()
# Contract checks (backward, heads, intermediates, features, round trip, bad input) run at most at this many
# pixels: real-size models are exercised at their default size only in test_model_forward.
MAX_CONTRACT_PIXELS = 128 * 128
# Default-size forwards that take over ~20 s on one CPU thread: only under `-m slow`.
SLOW_FORWARD = ["zoo_halonet_h[5-7]"]


def _cfg(name):
    return timm.models.get_pretrained_cfg(name).to_dict()


def _other_size(cfg):
    """A second valid input size: the cfg's test_input_size, else a smaller, non-square multiple of 32."""
    size = tuple(cfg["input_size"])
    if cfg.get("test_input_size") and tuple(cfg["test_input_size"]) != size:
        return tuple(cfg["test_input_size"])
    small = _contract_size(cfg)
    if small != size:
        return small[0], small[1], small[2] + 32  # smaller and non-square
    c, h, w = size
    step = 32 if h >= 64 else 8
    return c, max(step, h - step), w


def _contract_size(cfg):
    """The default input size, or a smaller one (multiple of 32, aspect kept) above MAX_CONTRACT_PIXELS."""
    c, h, w = cfg["input_size"]
    if h * w <= MAX_CONTRACT_PIXELS or cfg.get("fixed_input_size"):
        return c, h, w
    f = math.sqrt(MAX_CONTRACT_PIXELS / (h * w))
    return c, max(32, int(h * f) // 32 * 32), max(32, int(w * f) // 32 * 32)


def _create(name, size=None, **kwargs):
    cfg = _cfg(name)
    if size is not None and cfg.get("fixed_input_size"):
        kwargs["img_size"] = size[1:]
    return timm.create_model(name, **kwargs)


def test_models_registered():
    assert ALL_MODELS, "no zoo models registered"
    for name in ALL_MODELS:
        assert timm.is_model(name)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_model_cfg(name):
    cfg = _cfg(name)
    assert len(cfg["input_size"]) == 3 and cfg["num_classes"] > 0
    assert cfg.get("paper_ids") or cfg.get("paper_name"), "pretrained_cfg must name the paper it implements"
    assert len(cfg["mean"]) == len(cfg["std"]) == cfg["input_size"][0]
    with torch.device("meta"):
        model = timm.create_model(name)
    keys = dict(model.named_parameters())
    for key in ("first_conv", "classifier"):
        if cfg.get(key):
            for entry in [cfg[key]] if isinstance(cfg[key], str) else cfg[key]:
                assert entry + ".weight" in keys, f"{key}={entry!r} does not name a module with a weight"
    assert model.num_classes == cfg["num_classes"]
    assert model.num_features > 0
    # the names timm's loader uses to adapt in_chans and drop the classifier name the right modules
    modules = dict(model.named_modules())
    assert modules[cfg["first_conv"]].in_channels == cfg["input_size"][0] == model.in_chans
    assert modules[cfg["classifier"]].out_features == cfg["num_classes"]
    assert model.get_classifier() is modules[cfg["classifier"]]
    assert model.pretrained_cfg["input_size"] == cfg["input_size"]
    assert model.feature_info and all(f["num_chs"] > 0 and f["reduction"] >= 1 for f in model.feature_info)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow)
                                  if any(fnmatch.fnmatch(n, p) for p in SLOW_FORWARD) else n for n in ALL_MODELS])
@torch.no_grad()
def test_model_forward(name):
    cfg = _cfg(name)
    model = timm.create_model(name).eval()
    x = torch.randn(1, *cfg["input_size"])
    out = model(x)
    assert out.shape == (1, cfg["num_classes"]) and torch.isfinite(out).all()
    feats = model.forward_features(x)
    assert torch.allclose(model.forward_head(feats), out, rtol=1e-4, atol=1e-5)
    pre = model.forward_head(feats, pre_logits=True)
    assert pre.shape == (1, model.head_hidden_size)
    # as timm's test_model_default_cfgs: unpooled features are num_features wide, on a pool_size grid
    channels_last = getattr(model, "output_fmt", "NCHW") == "NHWC" or feats.dim() == 3
    assert feats.shape[-1 if channels_last else 1] == model.num_features
    if cfg.get("pool_size"):
        grid = feats.shape[1:3] if channels_last else feats.shape[2:]
        assert tuple(grid) == tuple(cfg["pool_size"]), f"forward_features grid {tuple(grid)} != pool_size"

    other = _other_size(cfg)
    model2 = _create(name, other).eval() if cfg.get("fixed_input_size") else model
    out2 = model2(torch.randn(1, *other))
    assert out2.shape == (1, cfg["num_classes"]) and torch.isfinite(out2).all()


@pytest.mark.parametrize("name", ALL_MODELS)
def test_model_backward(name):
    size = _contract_size(_cfg(name))
    model = _create(name, size).train()
    out = model(torch.randn(2, *size))
    out.float().pow(2).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:10]}"
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients: {bad[:10]}"


@pytest.mark.parametrize("name", ALL_MODELS)
@torch.no_grad()
def test_model_no_classifier_and_reset(name):
    cfg = _cfg(name)
    x = torch.randn(1, *_contract_size(cfg))
    model = timm.create_model(name, num_classes=0).eval()
    out = model(x)
    assert out.shape == (1, model.num_features)
    feats = model.forward_features(x)
    torch.testing.assert_close(out, model.forward_head(feats, pre_logits=True))
    model.reset_classifier(7)
    assert model.get_classifier().out_features == model.num_classes == 7
    assert model.forward_head(feats).shape == (1, 7)
    model.reset_classifier(0)
    assert model.forward_head(feats).shape == (1, model.num_features)
    model.reset_classifier(0, "")  # timm: classifier and pooling off, forward gives the unpooled features
    torch.testing.assert_close(model.forward_head(feats), feats)


@pytest.mark.parametrize("name", ALL_MODELS)
@torch.no_grad()
def test_model_forward_intermediates(name):
    cfg = _cfg(name)
    model = timm.create_model(name).eval()
    x = torch.randn(1, *_contract_size(cfg))
    final, inters = model.forward_intermediates(x)
    assert len(inters) >= 1 and all(torch.isfinite(t).all() for t in inters)
    assert torch.allclose(final, model.forward_features(x), rtol=1e-4, atol=1e-5)
    # as timm's test_model_forward_intermediates: one NCHW map per feature_info entry, of its width and stride
    info = timm.models.FeatureInfo(model.feature_info, len(model.feature_info))
    assert len(inters) == len(info.channels())
    _check_maps(inters, info.channels(), info.reduction(), x.shape[-2:])
    only = model.forward_intermediates(x, indices=1, intermediates_only=True)
    assert len(only) == 1 and torch.allclose(only[0], inters[-1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ALL_MODELS)
@torch.no_grad()
def test_model_features_only(name):
    cfg = _cfg(name)
    try:
        model = timm.create_model(name, features_only=True).eval()
    except (RuntimeError, TypeError, ValueError, NotImplementedError) as e:
        pytest.skip(f"{name} does not offer features_only: {e}")
    x = torch.randn(1, *_contract_size(cfg))
    feats = model(x)
    assert len(feats) == len(model.feature_info.channels())
    _check_maps(feats, model.feature_info.channels(), model.feature_info.reduction(), x.shape[-2:])


def _check_maps(maps, channels, reductions, size):
    """Feature maps `(B, C, H, W)` of the given widths, each on the input grid divided by its reduction (inputs
    that are not whole strides are padded up, as the zoo's layers do: ceil)."""
    for f, c, r in zip(maps, channels, reductions):
        assert f.dim() == 4 and f.shape[1] == c and torch.isfinite(f).all()
        assert tuple(f.shape[2:]) == tuple(math.ceil(s / r) for s in size), (tuple(f.shape), c, r, tuple(size))


@pytest.mark.parametrize("name", ALL_MODELS)
@torch.no_grad()
def test_model_safetensors_round_trip(name, tmp_path):
    cfg = _cfg(name)
    model = timm.create_model(name).eval()
    path = str(tmp_path / "w.safetensors")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, path)
    model2 = zoo.create_model(name, checkpoint_path=path).eval()
    loaded = load_file(path)
    assert loaded.keys() == model2.state_dict().keys()
    x = torch.randn(1, *_contract_size(cfg))
    torch.testing.assert_close(model2(x), model(x))


@pytest.mark.parametrize("name", ALL_MODELS)
def test_model_rejects_bad_input(name):
    cfg = _cfg(name)
    c, h, w = _contract_size(cfg)
    model = timm.create_model(name).eval()
    with pytest.raises(ValueError, match=r"(?i)chan"):
        model(torch.randn(1, c + 2, h, w))
    # A tiny odd, non-square input: either handled (finite logits) or a ValueError, never a deep crash.
    try:
        out = model(torch.randn(1, c, 5, 7))
    except ValueError as e:
        assert str(e)
    else:
        assert out.shape == (1, cfg["num_classes"]) and torch.isfinite(out).all()


def test_names_do_not_shadow_timm():
    from zoo._registry import _TIMM_BUILTIN

    assert not set(ALL_MODELS) & _TIMM_BUILTIN


def test_each_family_has_a_test_model():
    families = {zoo.model_family(n) for n in ALL_MODELS}
    test_families = {zoo.model_family(n) for n in ALL_MODELS if n.startswith("test_")}
    assert families == test_families, f"families without a test_* model: {families - test_families}"


@pytest.mark.parametrize("name", [n for n in ALL_MODELS if n.startswith("test_")])
def test_model_torch_compile_fullgraph(name):
    """Each family compiles into one graph (no graph breaks: attention patterns and biases built inside forward
    stay constants) and gives the eager outputs."""
    model = timm.create_model(name).eval()
    x = torch.randn(2, *_contract_size(_cfg(name)))
    with torch.no_grad():
        expected = model(x)
        out = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


TEST_MODELS = [n for n in ALL_MODELS if n.startswith("test_")]


@pytest.mark.parametrize("name", TEST_MODELS)
def test_model_forward_on_meta_tensors(name):
    """timm's `device='meta'` construction also runs forward (shape inference, no data)."""
    cfg = _cfg(name)
    with torch.device("meta"):
        model = timm.create_model(name).eval()
    with torch.no_grad():
        out = model(torch.empty(2, *cfg["input_size"], device="meta"))
    assert out.device.type == "meta" and out.shape == (2, cfg["num_classes"])


@pytest.mark.parametrize("name", ALL_MODELS)
def test_model_group_matcher_and_no_weight_decay(name):
    """timm's optimizer helpers: group_matcher groups every parameter (stem first, classifier last, fine and
    coarse), and no_weight_decay names parameters (or an optional timm token the model does not have)."""
    cfg = _cfg(name)
    with torch.device("meta"):
        model = timm.create_model(name)
    params = dict(model.named_parameters())
    for coarse in (False, True):
        groups = list(timm.models.group_parameters(model, model.group_matcher(coarse=coarse)).values())
        assert sorted(n for g in groups for n in g) == sorted(params)
        assert len(groups) >= 3, f"coarse={coarse}: {len(groups)} groups"
        assert cfg["first_conv"] + ".weight" in groups[0]
        assert cfg["classifier"] + ".weight" in groups[-1]
    if hasattr(model, "no_weight_decay"):
        for n in model.no_weight_decay():
            assert n in params or getattr(model, n, None) is None, f"no_weight_decay names {n!r}, not a parameter"


@pytest.mark.parametrize("name", TEST_MODELS)
def test_model_grad_checkpointing(name, monkeypatch):
    """set_grad_checkpointing(True) checkpoints (torch's checkpoint is called) and gives the same outputs and
    gradients (parameters and input) as the plain forward."""
    model = timm.create_model(name, num_classes=5).train()
    x = torch.randn(2, *_contract_size(_cfg(name)))
    calls = []
    checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k))
    results = []
    for enable in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        xi = x.clone().requires_grad_(True)
        out = model(xi)
        out.square().sum().backward()
        results.append((out.detach(), xi.grad, {n: p.grad for n, p in model.named_parameters()}))
        assert bool(calls) == enable, f"checkpoint calls with grad checkpointing {enable}: {len(calls)}"
    (out0, gx0, g0), (out1, gx1, g1) = results
    torch.testing.assert_close(out1, out0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx1, gx0, rtol=1e-5, atol=1e-6)
    for n, g in g0.items():
        torch.testing.assert_close(g1[n], g, rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("name", TEST_MODELS)
@torch.no_grad()
def test_model_timm_create_kwargs(name):
    """timm's common create_model arguments: num_classes, in_chans, num_classes=0 with global_pool='' (unpooled
    features), drop_rate and drop_path_rate (stochastic in train mode; in eval mode the same weights give the
    outputs of a model built without them)."""
    c, h, w = _contract_size(_cfg(name))
    x = torch.randn(2, c, h, w)
    for in_chans in (1, 4):
        model = timm.create_model(name, in_chans=in_chans, num_classes=3).eval()
        out = model(torch.randn(2, in_chans, h, w))
        assert out.shape == (2, 3) and torch.isfinite(out).all()
    plain = timm.create_model(name).eval()
    unpooled = timm.create_model(name, num_classes=0, global_pool="").eval()
    unpooled.load_state_dict({k: v for k, v in plain.state_dict().items() if k in unpooled.state_dict()})
    torch.testing.assert_close(unpooled(x), plain.forward_features(x))

    dropping = timm.create_model(name, drop_rate=0.5, drop_path_rate=0.3)
    rates = [m.drop_prob for m in dropping.modules() if isinstance(m, timm.layers.DropPath)]
    assert rates and max(rates) == pytest.approx(0.3), f"drop_path rates {rates}"
    assert any(isinstance(m, torch.nn.Dropout) and m.p == 0.5 for m in dropping.modules()), "no head dropout"
    dropping.load_state_dict(plain.state_dict())
    torch.testing.assert_close(dropping.eval()(x), plain(x))
    dropping.train()
    torch.manual_seed(0)
    a = dropping(x)
    torch.manual_seed(1)
    assert not torch.allclose(dropping(x), a), "train-mode outputs do not depend on the dropout draw"


@pytest.mark.parametrize("name", TEST_MODELS)
@torch.no_grad()
def test_model_pretrained_file(name, tmp_path):
    """timm's pretrained path on a local file (test_model_load_pretrained): `pretrained=True` with a
    pretrained_cfg file gives the source model, adapts the first conv to in_chans=1 (timm sums the RGB kernels)
    and drops the classifier for another num_classes; zoo.create_model takes the same overlay."""
    cfg = _cfg(name)
    src = timm.create_model(name).eval()
    path = str(tmp_path / "w.safetensors")
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, path)
    x = torch.randn(1, *_contract_size(cfg))
    overlay = dict(file=path)
    in_memory = dict(state_dict=src.state_dict())  # timm's other local source
    for model in (timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay),
                  zoo.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay),
                  zoo.create_model(name, pretrained=True, pretrained_cfg_overlay=in_memory)):
        torch.testing.assert_close(model.eval()(x), src(x))
    with pytest.raises(FileNotFoundError, match="not a file"):
        zoo.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "missing.pth")))
    model = zoo.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, in_chans=1, num_classes=5)
    first = cfg["first_conv"] + ".weight"
    own, ref = model.state_dict(), src.state_dict()
    torch.testing.assert_close(own[first], ref[first].sum(dim=1, keepdim=True))
    assert own[cfg["classifier"] + ".weight"].shape[0] == 5
    same = [k for k in ref if k != first and not k.startswith(cfg["classifier"] + ".")]
    assert all(torch.equal(own[k], ref[k]) for k in same)
    out = model.eval()(x[:, :1])
    assert out.shape == (1, 5) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", TEST_MODELS)
@torch.no_grad()
def test_model_prune_intermediate_layers(name):
    """prune_intermediate_layers (what features_only's getter calls) keeps the requested intermediates unchanged, and
    the pruned model still runs forward with or without its head (timm drops a head that no longer fits)."""
    model = timm.create_model(name).eval()
    x = torch.randn(1, *_contract_size(_cfg(name)))
    reference = model.forward_intermediates(x, intermediates_only=True)
    for prune_head in (True, False):
        pruned = copy.deepcopy(model)
        assert pruned.prune_intermediate_layers([1], prune_head=prune_head) == [1]
        (got,) = pruned.forward_intermediates(x, indices=[1], intermediates_only=True)
        torch.testing.assert_close(got, reference[1])
        out = pruned(x)
        assert out.shape[0] == 1 and torch.isfinite(out).all()
        if prune_head:
            assert pruned.num_classes == 0


@pytest.mark.parametrize("name", TEST_MODELS)
@torch.no_grad()
def test_model_eval_is_deterministic_per_sample(name):
    """In eval mode a forward is repeatable bit for bit and each sample's output does not depend on the rest of the
    batch (padding, pooling and agent tokens stay per sample)."""
    model = timm.create_model(name).eval()
    x = torch.randn(3, *_contract_size(_cfg(name)))
    out = model(x)
    assert torch.equal(model(x), out)
    torch.testing.assert_close(torch.cat([model(x[i:i + 1]) for i in range(3)]), out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", [n for n in TEST_MODELS if not _cfg(n).get("fixed_input_size")])
@torch.no_grad()
def test_model_feature_maps_at_odd_sizes(name):
    """At an odd, non-square size forward_intermediates and features_only give maps of ceil(size / reduction)
    (inputs padded up to whole strides), and features_only's maps are forward_intermediates' ones."""
    c, h, w = _contract_size(_cfg(name))
    x = torch.randn(1, c, h - 3, w + 5)
    rng = torch.get_rng_state()
    model = timm.create_model(name).eval()
    info = timm.models.FeatureInfo(model.feature_info, len(model.feature_info))
    inters = model.forward_intermediates(x, intermediates_only=True)
    _check_maps(inters, info.channels(), info.reduction(), x.shape[-2:])
    torch.set_rng_state(rng)  # the same initial weights (features_only wraps the model it builds)
    features = timm.create_model(name, features_only=True, out_indices=(0, -1)).eval()
    maps = features(x)
    _check_maps(maps, features.feature_info.channels(), features.feature_info.reduction(), x.shape[-2:])
    for got, want in zip(maps, (inters[0], inters[-1])):
        torch.testing.assert_close(got, want)
