"""Inference LayerNorm (`zoo.layers.layer_norm`): the Triton pass (interpreter on CPU) against float64
`F.layer_norm`, the module's fallback, and the agent models on CUDA."""
import pytest
import torch
import torch.nn.functional as F

import zoo
from zoo.layers import layer_norm as layer_norm_module
from zoo.layers.layer_norm import FastLayerNorm, enable_fast_layer_norm, layer_norm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: Triton's interpreter (tests/conftest.py)


@pytest.mark.parametrize("shape", [(3, 5, 192), (7, 96), (2, 3, 4, 7), (5, 1000)])
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_matches_float64(shape, affine):
    N = shape[-1]
    x = torch.randn(shape, device=DEVICE) * 3 + 2
    w = torch.randn(N, device=DEVICE) if affine else None
    b = torch.randn(N, device=DEVICE) if affine else None
    out = layer_norm(x, w, b, 1e-5)
    ref = F.layer_norm(x.double(), (N,), None if w is None else w.double(), None if b is None else b.double(), 1e-5)
    assert out.dtype == x.dtype and out.shape == x.shape
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_repeated_calls_reuse_the_launch_with_new_tensors():
    """The second and later calls of a shape go through the prepared launch: fresh inputs and parameters, an
    unaligned view of the same shape (alignment differs from the first call's) and another weight dtype."""
    N = 40
    for i in range(4):
        base = torch.randn(3 * 7 * N + 1, device=DEVICE) * 2 - 1
        x = (base[1:] if i == 2 else base[:-1]).view(3, 7, N)
        w, b = torch.randn(N, device=DEVICE), torch.randn(N, device=DEVICE)
        if i == 3:
            w = w.half()
        out = layer_norm(x, w, b, 1e-5)
        ref = F.layer_norm(x.double(), (N,), w.double(), b.double(), 1e-5)
        torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=2e-5)


def test_layer_norm_out_dtype_and_strided_input():
    x = torch.randn(6, 4, 192, device=DEVICE).transpose(0, 1)  # not contiguous
    w, b = torch.randn(192, device=DEVICE), torch.randn(192, device=DEVICE)
    out = layer_norm(x, w, b, 1e-6, torch.bfloat16)
    ref = F.layer_norm(x, (192,), w, b, 1e-6)
    assert out.dtype == torch.bfloat16
    # the float32 result rounded once to bf16 (as a linear layer under autocast would round it): within half a
    # bf16 ulp of the float32 value on the GPU (round to nearest); Triton's CPU interpreter truncates: one ulp
    ulp = 2 ** -8 if x.is_cuda else 2 ** -7
    assert ((out.float() - ref).abs() <= ref.abs() * ulp + 1e-5).all()


def test_layer_norm_on_a_sliced_view():
    base = torch.randn(9, 300, device=DEVICE)
    x = base[:, 50:250]  # rows 300 apart: read in place
    out = layer_norm(x, None, None, 1e-5)
    torch.testing.assert_close(out.double(), F.layer_norm(x.double(), (200,), eps=1e-5), rtol=1e-5, atol=1e-5)


def test_copies_leave_the_cached_launch_behind():
    import copy
    import pickle

    norm = FastLayerNorm(8, device=DEVICE)
    _, run = layer_norm_module._layer_norm(torch.randn(3, 8, device=DEVICE), norm.weight, norm.bias, 1e-5,
                                           torch.float32)
    norm.__dict__["_launch"] = ((), run)  # as a CUDA forward leaves it
    for twin in (copy.deepcopy(norm), pickle.loads(pickle.dumps(norm))):
        assert type(twin) is FastLayerNorm and "_launch" not in twin.__dict__
        torch.testing.assert_close(twin.weight, norm.weight)
    norm.compile()  # as nn.Module: a copy does not keep the original's compiled forward (bound to its weights)
    assert "_compiled_call_impl" in norm.__dict__ and "_compiled_call_impl" not in copy.deepcopy(norm).__dict__


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"weight must be a \(8,\) tensor"):
        layer_norm(torch.randn(2, 8), torch.ones(9), None)
    with pytest.raises(ValueError, match="<= 8192"):
        layer_norm(torch.randn(1, 9000), None, None)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        layer_norm(torch.randn(2, 8, dtype=torch.float64), None, None)
    with pytest.raises(TypeError, match="block must be"):
        enable_fast_layer_norm([])


def test_module_falls_back_with_autograd_and_on_cpu():
    norm = torch.nn.LayerNorm(32)
    outer = torch.nn.Module()
    outer.blk = torch.nn.Module()
    outer.blk.norm1 = torch.nn.LayerNorm(8)
    assert enable_fast_layer_norm(outer) == 0  # one block's own norms only: not recursive
    holder = torch.nn.Module()
    holder.norm1, holder.norm2, holder.norm = norm, torch.nn.LayerNorm(32), torch.nn.LayerNorm(32)
    keys = list(holder.state_dict())
    assert enable_fast_layer_norm(holder) == 2 and type(holder.norm) is torch.nn.LayerNorm
    assert list(holder.state_dict()) == keys and isinstance(norm, FastLayerNorm)
    x = torch.randn(4, 32, requires_grad=True)
    out = norm(x)
    out.sum().backward()
    torch.testing.assert_close(out, F.layer_norm(x, (32,), norm.weight, norm.bias, norm.eps), rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the module's fast path runs on CUDA")
@pytest.mark.parametrize("name", ["agent_deit_tiny", "agent_swin_tiny", "agent_pvt_tiny"])
def test_agent_models_match_plain_layer_norm_cuda(name, monkeypatch):
    model = zoo.create_model(name).cuda().eval()
    x = torch.randn(4, 3, 224, 224, device="cuda")
    calls = []
    real = layer_norm_module._layer_norm
    monkeypatch.setattr(layer_norm_module, "_layer_norm", lambda *a: calls.append(1) or real(*a))
    x2 = torch.randn(4, 3, 224, 224, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        fast = model(x).float()
        first_calls = len(calls)
        fast2 = model(x2).float()  # the modules' cached launches
        assert first_calls and len(calls) == first_calls
        for m in model.modules():
            if isinstance(m, FastLayerNorm):
                m.__class__ = torch.nn.LayerNorm
        ref, ref2 = model(x).float(), model(x2).float()
    for out, expected in ((fast, ref), (fast2, ref2)):
        err = ((out - expected).norm() / expected.norm()).item()
        assert err < 1e-2, err
