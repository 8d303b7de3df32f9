"""The merges of split partials against float64 on fresh inputs: `triton_combine.combine_splits` (a forward's key
splits) and `triton_attention.sum_over_leading` (backward partials, batch-summed gradients)."""
import pytest
import torch

pytest.importorskip("triton")

from kernels.backends.triton_combine import combine_splits  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: Triton's interpreter (tests/conftest.py)


def _reference(out, lse, gate):
    """The definition: softmax weights of the splits' lse per row; rows that no split saw stay 0 with lse -inf."""
    out, lse = out.double(), lse.double()
    lse_all = torch.logsumexp(lse, dim=0)
    w = torch.where(torch.isfinite(lse_all), torch.exp(lse - lse_all), 0.0)
    o = (w[..., None] * out).sum(0)
    if gate is not None:
        o = o * torch.sigmoid(gate.double())
    return o, lse_all


@pytest.mark.parametrize("dv,gate_width", [(16, None), (24, 1), (16, 16)], ids=["plain", "head-gate", "elem-gate"])
def test_combine_splits_matches_float64(dv, gate_width, monkeypatch):
    monkeypatch.setenv("ATTNZOO_KERNEL_POISON", "1")  # outputs start as NaN: an unwritten element fails
    S, B, H, N = 3, 2, 3, 37
    out = torch.randn(S, B, H, N, dv, device=DEVICE)
    lse = torch.randn(S, B, H, N, device=DEVICE) * 4
    lse[1, 0, 1, :5] = float("-inf")  # a split that saw no key of these rows
    lse[:, 1, 2, 7] = float("-inf")  # a row no split saw (its partials are the kernels' zeros)
    out[:, 1, 2, 7] = 0.0
    gate = None
    if gate_width is not None:  # the (B, H, N, 1 | Dv) view of a (B, N, H[, Dv]) gate, as the callers pass it
        g = torch.randn(B, N, H, gate_width, device=DEVICE)
        gate = g.permute(0, 2, 1, 3)
    o, lse_all = combine_splits(out, lse, gate, torch.float16)
    ro, rl = _reference(out, lse, gate)
    assert o.dtype == torch.float16 and o.shape == (B, H, N, dv) and lse_all.dtype == torch.float32
    torch.testing.assert_close(o.double(), ro, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(lse_all.double(), rl, rtol=1e-5, atol=1e-5)
    assert lse_all[1, 2, 7] == float("-inf") and (o[1, 2, 7] == 0).all()


def test_combine_splits_validates_its_inputs():
    out, lse = torch.randn(2, 1, 2, 5, 8, device=DEVICE), torch.randn(2, 1, 2, 5, device=DEVICE)
    with pytest.raises(ValueError, match="lse"):
        combine_splits(out, lse[:, :, :, :4])
    with pytest.raises(ValueError, match="float32"):
        combine_splits(out.half(), lse)
    with pytest.raises(ValueError, match="gate"):
        combine_splits(out, lse, torch.randn(1, 2, 5, 3, device=DEVICE))


def test_sum_over_leading_matches_float64(monkeypatch):
    """Per-split partials (and batch-summed gradients) summed over leading dims in one pass, one rounding."""
    monkeypatch.setenv("ATTNZOO_KERNEL_POISON", "1")
    from kernels.backends.triton_attention import sum_over_leading

    x = torch.randn(3, 2, 5, 7, device=DEVICE)
    y = sum_over_leading(x, torch.float16)
    assert y.shape == (2, 5, 7) and y.dtype == torch.float16
    torch.testing.assert_close(y.double(), x.double().sum(0), rtol=1e-3, atol=2e-3)
    torch.testing.assert_close(sum_over_leading(x, lead=2).double(), x.double().sum((0, 1)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="contiguous"):
        sum_over_leading(x.transpose(0, 1))


@pytest.mark.parametrize("shape", [(2, 5, 3), (2, 5, 3, 8)], ids=["head-wise", "element-wise"])
def test_gate_gradient_needs_no_transpose(shape):
    """The kernels write the gate's gradient into a buffer laid out as the gate is, so handing it back in the gate's
    (B, N, H[, Dv]) layout is a view of the same memory, not a transposing copy."""
    from kernels.backends.triton_attention import _gate4, _gate_grad, _gate_grad_buffer

    gate = torch.randn(*shape, device=DEVICE)
    buf = _gate_grad_buffer(_gate4(gate))
    assert buf.shape == _gate4(gate).shape
    grad = _gate_grad(buf, gate)
    assert grad.shape == gate.shape and grad.is_contiguous() and grad.data_ptr() == buf.data_ptr()
