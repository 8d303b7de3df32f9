"""Training-mode BatchNorm statistics (`zoo.layers.batch_norm`): the Triton pass (interpreter on CPU) against
float64 statistics, and the layer against timm's `BatchNormAct2d` on CUDA."""
import pytest
import torch
from timm.layers import BatchNormAct2d

import zoo
from zoo.layers.batch_norm import FastBatchNormAct2d, batch_norm_act_train, batch_stats, enable_fast_batch_norm


@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (2, 130, 6, 5), (1, 16, 40, 40)])
def test_batch_stats_match_float64(shape):
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: Triton's interpreter (tests/conftest.py)
    # |mean| >> std: checks the statistics against cancellation
    x = (torch.randn(shape, device=device) * 3 + 10).to(memory_format=torch.channels_last)
    running_mean, running_var = torch.randn(shape[1], device=device), torch.rand(shape[1], device=device) + 0.5
    rm_ref, rv_ref = running_mean.double().clone(), running_var.double().clone()
    mean, var, invstd = batch_stats(x, 1e-3, running_mean, running_var, 0.25)
    ref = x.double()
    torch.testing.assert_close(mean.double(), ref.mean((0, 2, 3)), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(var.double(), ref.var((0, 2, 3), unbiased=False), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(invstd.double(), (ref.var((0, 2, 3), unbiased=False) + 1e-3).rsqrt(), rtol=1e-4,
                               atol=1e-5)
    # F.batch_norm's running statistics: momentum 0.25, unbiased variance
    torch.nn.functional.batch_norm(ref, rm_ref, rv_ref, training=True, momentum=0.25, eps=1e-3)
    torch.testing.assert_close(running_mean.double(), rm_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(running_var.double(), rv_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (2, 130, 6, 5), (4, 8, 24, 25)])  # the last: several row blocks
def test_batch_norm_act_train_matches_float64(shape, relu):
    """Forward, the three gradients and the running statistics against float64 F.batch_norm (+ ReLU)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    C = shape[1]
    x = (torch.randn(shape, device=device) * 2 + 0.5).to(memory_format=torch.channels_last)
    w, b = torch.rand(C, device=device) + 0.5, torch.randn(C, device=device)
    rm, rv = torch.randn(C, device=device), torch.rand(C, device=device) + 0.5
    rm_ref, rv_ref = rm.double().clone(), rv.double().clone()
    xa, wa, ba = (t.clone().requires_grad_() for t in (x, w, b))
    xr, wr, br = (t.double().clone().requires_grad_() for t in (x, w, b))
    out = batch_norm_act_train(xa, wa, ba, rm, rv, momentum=0.3, eps=1e-4, relu=relu)
    ref = torch.nn.functional.batch_norm(xr, rm_ref, rv_ref, wr, br, training=True, momentum=0.3, eps=1e-4)
    ref = torch.relu(ref) if relu else ref
    assert out.is_contiguous(memory_format=torch.channels_last)
    g = torch.randn(shape, device=device)
    out.backward(g)
    ref.backward(g.double())
    tol = dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.double(), ref, **tol)
    torch.testing.assert_close(xa.grad.double(), xr.grad, **tol)
    torch.testing.assert_close(wa.grad.double(), wr.grad, **tol)
    torch.testing.assert_close(ba.grad.double(), br.grad, **tol)
    torch.testing.assert_close(rm.double(), rm_ref, **tol)
    torch.testing.assert_close(rv.double(), rv_ref, **tol)


def test_batch_stats_bad_input():
    with pytest.raises(ValueError, match="channels_last"):
        batch_stats(torch.randn(2, 3, 4, 5))
    with pytest.raises(ValueError, match="4-d"):
        batch_stats(torch.randn(2, 3))
    x = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match=r"weight must be a \(3,\) tensor"):
        batch_norm_act_train(x, torch.ones(4), torch.zeros(3))
    with pytest.raises(ValueError, match="together"):
        batch_stats(x, running_mean=torch.zeros(3))
    with pytest.raises(ValueError, match=r"running_var must be a contiguous \(3,\) tensor"):
        batch_stats(x, running_mean=torch.zeros(3), running_var=torch.zeros(4))


def test_enable_fast_batch_norm_keeps_state_dict():
    model = zoo.create_model("test_halonet")
    assert all(type(m) is not BatchNormAct2d for m in model.modules())
    assert sum(isinstance(m, FastBatchNormAct2d) for m in model.modules()) > 0
    timm_bn = torch.nn.Sequential(BatchNormAct2d(8))
    keys = list(timm_bn.state_dict())
    assert enable_fast_batch_norm(timm_bn) == 1 and list(timm_bn.state_dict()) == keys
    with pytest.raises(TypeError, match="model must be"):
        enable_fast_batch_norm(None)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_module_matches_timm_over_steps(monkeypatch, momentum):
    """FastBatchNormAct2d's own logic (momentum, cumulative average, num_batches_tracked, eval after training)
    against timm's BatchNormAct2d over three training steps; on CPU through Triton's interpreter."""
    from zoo.layers import batch_norm as bn_module

    monkeypatch.setattr(bn_module, "_fast_device", lambda x: True)
    ref = BatchNormAct2d(6, act_layer="relu", momentum=momentum)
    fast = BatchNormAct2d(6, act_layer="relu", momentum=momentum)
    enable_fast_batch_norm(fast)
    for step in range(3):
        x = (torch.randn(3, 6, 5, 7) * (step + 1) + step).to(memory_format=torch.channels_last)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ref(xa), fast(xb)
        g = torch.randn_like(ya)
        ya.backward(g)
        yb.backward(g)
        torch.testing.assert_close(yb, ya, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-4, atol=1e-5)
    version = fast.running_mean._version
    torch.testing.assert_close(fast.running_mean, ref.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast.running_var, ref.running_var, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-5)
    assert int(fast.num_batches_tracked) == 3 and version >= 3  # in-place kernel writes bump the version
    fast.eval(), ref.eval()
    x = torch.randn(2, 6, 4, 4).to(memory_format=torch.channels_last)
    torch.testing.assert_close(fast(x), ref(x), rtol=1e-5, atol=1e-6)


def test_training_with_one_value_per_channel_raises():
    x = torch.randn(1, 3, 1, 1).to(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        batch_norm_act_train(x, torch.ones(3), torch.zeros(3))
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        batch_stats(torch.randn(2, 3, 4, 4, dtype=torch.float64).to(memory_format=torch.channels_last))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the module's fast path runs on CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_batch_norm_matches_timm_cuda(dtype):
    ref = BatchNormAct2d(48, act_layer="relu").cuda()
    fast = BatchNormAct2d(48, act_layer="relu").cuda()
    enable_fast_batch_norm(fast)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.normal_()
    fast.load_state_dict(ref.state_dict())
    x = (torch.randn(8, 48, 20, 20, device="cuda") * 2 + 1).to(dtype).to(memory_format=torch.channels_last)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ref(xa), fast(xb)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(yb, ya, **tol)
    torch.testing.assert_close(xb.grad, xa.grad, **tol)
    torch.testing.assert_close(fast.weight.grad, ref.weight.grad, rtol=1e-3, atol=1e-2)
    torch.testing.assert_close(fast.running_mean, ref.running_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.running_var, ref.running_var, rtol=1e-4, atol=1e-5)
    assert int(fast.num_batches_tracked) == 1
