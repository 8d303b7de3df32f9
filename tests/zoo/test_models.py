"""The generic suite every registered zoo model passes (after timm's tests/test_models.py)."""
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
    assert pre.shape == (1, model.num_features) or pre.shape[-1] == model.num_features

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
    model.reset_classifier(7)
    assert model(x).shape == (1, 7)
    model.reset_classifier(0)
    assert model(x).shape == (1, model.num_features)


@pytest.mark.parametrize("name", ALL_MODELS)
@torch.no_grad()
def test_model_forward_intermediates(name):
    cfg = _cfg(name)
    model = timm.create_model(name).eval()
    x = torch.randn(1, *_contract_size(cfg))
    final, inters = model.forward_intermediates(x)
    assert len(inters) >= 1 and all(torch.isfinite(t).all() for t in inters)
    assert torch.allclose(model.forward_head(final), model(x), rtol=1e-4, atol=1e-5)
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
    feats = model(torch.randn(1, *_contract_size(cfg)))
    assert len(feats) == len(model.feature_info.channels())
    for f, c in zip(feats, model.feature_info.channels()):
        assert f.shape[1] == c and torch.isfinite(f).all()


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
