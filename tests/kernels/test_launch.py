"""`kernels.backends.launch`: a prepared launch repeats the kernel with new pointers and stays correct when the
pointers lose the first call's alignment or dtype (the ordinary Triton path takes over)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from kernels.backends import launch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _axpy(X, Y, O, n, alpha, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    x = tl.load(X + offs, mask=ok).to(tl.float32)
    y = tl.load(Y + offs, mask=ok).to(tl.float32)
    tl.store(O + offs, (alpha * x + y).to(O.dtype.element_ty), mask=ok)


def _prepared(n, dtype=torch.float32):
    x, y = (torch.randn(n, device=DEVICE, dtype=dtype) for _ in range(2))
    out = torch.empty_like(x)
    run = launch.prepare(_axpy, (triton.cdiv(n, 64),), [x, y, out, n, 0.5], (0, 1, 2), BLOCK=64, num_warps=1)
    torch.testing.assert_close(out, 0.5 * x + y)
    return run


def test_repeats_with_new_pointers(monkeypatch):
    n = 200
    run = _prepared(n)
    if DEVICE == "cuda":  # repeats must skip Triton's ordinary launch
        monkeypatch.setattr(_axpy, "run", None)
    for _ in range(3):
        x, y = torch.randn(n, device=DEVICE), torch.randn(n, device=DEVICE)
        out = torch.full_like(x, float("nan"))
        run(x, y, out)
        torch.testing.assert_close(out, 0.5 * x.double() + y.double(), check_dtype=False)


def test_unaligned_and_other_dtype_pointers_take_the_ordinary_path():
    n = 100
    run = _prepared(n)
    base = torch.randn(n + 1, device=DEVICE)
    x = base[1:]  # 4-byte offset: the compiled kernel assumed 16-byte alignment
    y = torch.randn(n, device=DEVICE)
    out = torch.empty(n + 1, device=DEVICE)[1:]
    run(x, y, out)
    torch.testing.assert_close(out, 0.5 * x + y)
    xh, yh = x.half(), y.half()
    outh = torch.empty(n, device=DEVICE, dtype=torch.float16)
    run(xh, yh, outh)
    torch.testing.assert_close(outh.float(), (0.5 * xh.float() + yh.float()), atol=2e-3, rtol=2e-3)


@pytest.mark.skipif(DEVICE != "cuda", reason="device addresses are CUDA's")
def test_int_addresses(monkeypatch):
    n = 300
    run = _prepared(n)
    x, y = torch.randn(n, device=DEVICE), torch.randn(n, device=DEVICE)
    out = torch.empty_like(x)
    with monkeypatch.context() as patch:
        patch.setattr(_axpy, "run", None)  # the fast path
        run(x.data_ptr(), y.data_ptr(), out.data_ptr())
    torch.testing.assert_close(out, 0.5 * x + y)
    base = torch.randn(n + 1, device=DEVICE)
    outu = torch.empty(n + 1, device=DEVICE)
    run(base.data_ptr() + 4, y.data_ptr(), outu.data_ptr() + 4)  # unaligned: the ordinary path, as pointers
    torch.testing.assert_close(outu[1:], 0.5 * base[1:] + y)


def test_launch_hooks_take_the_ordinary_path(monkeypatch):
    """A profiler's launch hook must see every launch: with one set, repeats go through Triton's launch."""
    from triton import knobs

    run = _prepared(64)
    calls = []
    chain = knobs.runtime.launch_enter_hook
    if hasattr(chain, "calls"):  # Triton >= 3.5: a HookChain
        monkeypatch.setattr(chain, "calls", [calls.append])
    else:
        monkeypatch.setattr(knobs.runtime, "launch_enter_hook", calls.append)
    x, y = torch.randn(64, device=DEVICE), torch.randn(64, device=DEVICE)
    out = torch.empty_like(x)
    run(x, y, out)
    torch.testing.assert_close(out, 0.5 * x + y)
    if DEVICE == "cuda":
        assert len(calls) == 1


def test_bad_arguments():
    x = torch.randn(8, device=DEVICE)
    with pytest.raises(ValueError, match="grid must be"):
        launch.prepare(_axpy, lambda meta: (1,), [x, x, x, 8, 1.0], (0,), BLOCK=16)
    with pytest.raises(ValueError, match="slots must"):
        launch.prepare(_axpy, (1,), [x, x, x, 8, 1.0], (7,), BLOCK=16)
    run = launch.prepare(_axpy, (1,), [x, x, x, 8, 1.0], (0, 1, 2), BLOCK=16)
    with pytest.raises(ValueError, match="expected 3 pointer"):
        run(x, x)
