"""Training-mode BatchNorm (+ ReLU) for channels_last CUDA activations, in Triton.

Why: PyTorch computes a channels_last BatchNorm's batch statistics with a kernel that reads bf16 activations at
~0.6 TB/s on an H200 (8.9 ms of `halonet26t`'s 58 ms training step), and timm applies the ReLU after the norm as
two more passes over the activations (forward, and `threshold_backward`: 5.2 ms a step). Here:
- the statistics: one pass writes per-row-block shifted sums, one launch combines them (Chan et al.'s parallel
  variance) and updates the running statistics as `F.batch_norm` does (momentum, unbiased variance);
- forward: one pass normalizes and applies the ReLU;
- backward: one pass sums g and g·x̂ per row block (g: the output gradient where the ReLU's output is positive),
  one pass writes the input gradient.
Results match `F.batch_norm` + ReLU up to summation order (tests: float64 references, timm's module on CUDA).

`FastBatchNormAct2d` is timm's `BatchNormAct2d` (same parameters, buffers and state_dict) taking this path in
training mode on CUDA channels_last inputs with a ReLU or no activation, outside `torch.compile`; everything else
runs timm's forward.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from timm.layers import BatchNormAct2d
from torch.autograd.function import once_differentiable

from .cache import swap_classes

__all__ = ["FastBatchNormAct2d", "batch_norm_act_train", "batch_stats", "enable_fast_batch_norm"]


@triton.jit
def _partial_stats(X, MEAN, M2, ROWS, C, ROWS_PER_PROG, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per (row block, channel block): mean and sum of squared deviations over rows of X (ROWS, C), row-major.
    Sums are shifted by the block's first row (no cancellation when |mean| >> std)."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cols < C
    start = pid_r * ROWS_PER_PROG
    end = tl.minimum(start + ROWS_PER_PROG, ROWS)
    shift = tl.load(X + start.to(tl.int64) * C + cols, mask=c_ok, other=0.0).to(tl.float32)
    s1 = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    s2 = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    for r in range(start, end, BLOCK_R):
        rows = r + tl.arange(0, BLOCK_R)
        ok = (rows < end)[:, None] & c_ok[None, :]
        x = tl.load(X + rows.to(tl.int64)[:, None] * C + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        d = tl.where(ok, x - shift[None, :], 0.0)
        s1 += d
        s2 += d * d
    n = (end - start).to(tl.float32)
    t1 = tl.sum(s1, 0)
    t2 = tl.sum(s2, 0)
    tl.store(MEAN + pid_r * C + cols, shift + t1 / n, mask=c_ok)
    tl.store(M2 + pid_r * C + cols, tl.maximum(t2 - t1 * t1 / n, 0.0), mask=c_ok)


@triton.jit
def _combine_stats(MEAN_P, M2_P, MEAN, VAR, INVSTD, RMEAN, RVAR, ROW_BLOCKS, ROWS, PER_PROG, C, momentum, eps,
                   HAS_RUNNING: tl.constexpr, BLOCK_C: tl.constexpr):
    """Chan et al.'s parallel combination of the row blocks' statistics; mean, biased variance, 1/sqrt(var + eps),
    and the running statistics updated in place as `F.batch_norm` does (unbiased variance, momentum)."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = cols < C
    mean = tl.zeros([BLOCK_C], tl.float32)
    for r in range(0, ROW_BLOCKS):
        n = tl.minimum(PER_PROG, ROWS - r * PER_PROG).to(tl.float32)
        mean += tl.load(MEAN_P + r * C + cols, mask=ok, other=0.0) * n
    mean = mean / ROWS
    m2 = tl.zeros([BLOCK_C], tl.float32)
    for r in range(0, ROW_BLOCKS):
        n = tl.minimum(PER_PROG, ROWS - r * PER_PROG).to(tl.float32)
        dm = tl.load(MEAN_P + r * C + cols, mask=ok, other=0.0) - mean
        m2 += tl.load(M2_P + r * C + cols, mask=ok, other=0.0) + dm * dm * n
    var = m2 / ROWS
    tl.store(MEAN + cols, mean, mask=ok)
    tl.store(VAR + cols, var, mask=ok)
    tl.store(INVSTD + cols, 1.0 / tl.sqrt(var + eps), mask=ok)
    if HAS_RUNNING:
        unbiased = var * (ROWS / tl.maximum(ROWS - 1, 1).to(tl.float32))
        rm = tl.load(RMEAN + cols, mask=ok, other=0.0).to(tl.float32)
        rv = tl.load(RVAR + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(RMEAN + cols, (rm + momentum * (mean - rm)).to(RMEAN.dtype.element_ty), mask=ok)
        tl.store(RVAR + cols, (rv + momentum * (unbiased - rv)).to(RVAR.dtype.element_ty), mask=ok)


@triton.jit
def _bn_act_fwd(X, Y, MEAN, INVSTD, W, B, ROWS, C, ROWS_PER_PROG, RELU: tl.constexpr, BLOCK_R: tl.constexpr,
                BLOCK_C: tl.constexpr):
    """Y = act((X - mean) · invstd · w + b) over X (ROWS, C), act = ReLU or identity."""
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cols < C
    start = tl.program_id(0) * ROWS_PER_PROG
    end = tl.minimum(start + ROWS_PER_PROG, ROWS)
    mean = tl.load(MEAN + cols, mask=c_ok, other=0.0)
    a = tl.load(INVSTD + cols, mask=c_ok, other=0.0) * tl.load(W + cols, mask=c_ok, other=0.0).to(tl.float32)
    shift = tl.load(B + cols, mask=c_ok, other=0.0).to(tl.float32) - mean * a
    for r in range(start, end, BLOCK_R):
        rows = r + tl.arange(0, BLOCK_R)
        ok = (rows < end)[:, None] & c_ok[None, :]
        offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
        y = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32) * a[None, :] + shift[None, :]
        if RELU:
            y = tl.maximum(y, 0.0)
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=ok)


@triton.jit
def _bn_act_grad(DY, Y, X, MEAN, INVSTD, RELU: tl.constexpr, offs, ok, mean, invstd):
    """The gradient at the norm's output (ReLU: where the output is positive, as torch's threshold_backward) and
    the normalized input x̂, for one tile."""
    g = tl.load(DY + offs, mask=ok, other=0.0).to(tl.float32)
    if RELU:
        g = tl.where(tl.load(Y + offs, mask=ok, other=0.0) > 0, g, 0.0)
    xhat = (tl.load(X + offs, mask=ok, other=0.0).to(tl.float32) - mean[None, :]) * invstd[None, :]
    return tl.where(ok, g, 0.0), xhat


@triton.jit
def _bn_act_bwd_reduce(DY, Y, X, MEAN, INVSTD, SUMS, ROWS, C, ROWS_PER_PROG, RELU: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per row block: Σ g and Σ g·x̂ (SUMS (2, row blocks, C))."""
    pid_r = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cols < C
    start = pid_r * ROWS_PER_PROG
    end = tl.minimum(start + ROWS_PER_PROG, ROWS)
    mean = tl.load(MEAN + cols, mask=c_ok, other=0.0)
    invstd = tl.load(INVSTD + cols, mask=c_ok, other=0.0)
    acc_g = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    acc_gx = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    for r in range(start, end, BLOCK_R):
        rows = r + tl.arange(0, BLOCK_R)
        ok = (rows < end)[:, None] & c_ok[None, :]
        g, xhat = _bn_act_grad(DY, Y, X, MEAN, INVSTD, RELU, rows.to(tl.int64)[:, None] * C + cols[None, :], ok,
                               mean, invstd)
        acc_g += g
        acc_gx += g * xhat
    blocks = tl.num_programs(0)
    tl.store(SUMS + pid_r * C + cols, tl.sum(acc_g, 0), mask=c_ok)
    tl.store(SUMS + (blocks + pid_r) * C + cols, tl.sum(acc_gx, 0), mask=c_ok)


@triton.jit
def _bn_act_bwd_elemt(DY, Y, X, MEAN, INVSTD, W, TOTALS, DX, ROWS, C, ROWS_PER_PROG, inv_n, RELU: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """dX = (g − mean(g) − x̂ · mean(g·x̂)) · invstd · w (TOTALS (2, C): Σ g, Σ g·x̂)."""
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cols < C
    start = tl.program_id(0) * ROWS_PER_PROG
    end = tl.minimum(start + ROWS_PER_PROG, ROWS)
    mean = tl.load(MEAN + cols, mask=c_ok, other=0.0)
    invstd = tl.load(INVSTD + cols, mask=c_ok, other=0.0)
    mean_g = tl.load(TOTALS + cols, mask=c_ok, other=0.0) * inv_n
    mean_gx = tl.load(TOTALS + C + cols, mask=c_ok, other=0.0) * inv_n
    scale = invstd * tl.load(W + cols, mask=c_ok, other=0.0).to(tl.float32)
    for r in range(start, end, BLOCK_R):
        rows = r + tl.arange(0, BLOCK_R)
        ok = (rows < end)[:, None] & c_ok[None, :]
        offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
        g, xhat = _bn_act_grad(DY, Y, X, MEAN, INVSTD, RELU, offs, ok, mean, invstd)
        dx = (g - mean_g[None, :] - xhat * mean_gx[None, :]) * scale[None, :]
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=ok)


_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# launch plan: programs per SM, rows per tile, warps. H200, bf16, six halonet26t activation shapes: 637 us
# for all six (2.1 TB/s) vs 872 at 4 warps and 2055 for torch.batch_norm_stats (kernels/NOTES.md, ninth session)
CONFIG = dict(programs_per_sm=4, block_r=32, warps=8)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _plan(x: torch.Tensor) -> Tuple[int, int, int, int, int]:
    """(rows, BLOCK_C, channel blocks, rows per program, row blocks) of the kernels' grid over x (rows, C)."""
    C = x.shape[1]
    rows = x.numel() // C
    # plain int math: triton.cdiv / next_power_of_2 are jit-wrapped (~4 us of host time each)
    block_c = min(128, 1 << (C - 1).bit_length())
    col_blocks = _cdiv(C, block_c)
    sms = _num_sms(x.device.index if x.device.index is not None else torch.cuda.current_device()) if x.is_cuda else 8
    programs = CONFIG["programs_per_sm"] * sms
    per_prog = _cdiv(rows, max(1, min(_cdiv(rows, 1024), programs // col_blocks)))
    return rows, block_c, col_blocks, per_prog, _cdiv(rows, per_prog)


def _check_input(x):
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a 4-d (N, C, H, W) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"x must be float16, bfloat16 or float32 (the kernels compute in float32), got {x.dtype}")
    if not x.is_contiguous(memory_format=torch.channels_last):
        raise ValueError("x must be channels_last contiguous (x.contiguous(memory_format=torch.channels_last))")


def _check_running(x, running_mean, running_var):
    C = x.shape[1]
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together")
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is not None and (t.shape != (C,) or t.device != x.device or not t.is_contiguous()):
            raise ValueError(f"{name} must be a contiguous ({C},) tensor on {x.device}, got shape {tuple(t.shape)} "
                             f"on {t.device}, {'contiguous' if t.is_contiguous() else 'not contiguous'}")


def _check_training(x):
    if x.numel() == x.shape[1]:  # as F.batch_norm in training
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")


def batch_stats(x: torch.Tensor, eps: float = 1e-5, running_mean: Optional[torch.Tensor] = None,
                running_var: Optional[torch.Tensor] = None, momentum: float = 0.1
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel mean, biased variance and 1/sqrt(var + eps) (float32) of a channels_last `(N, C, H, W)`
    tensor, in one pass over it; with `running_mean` / `running_var`, those are updated in place as
    `F.batch_norm` does in training (momentum, unbiased variance)."""
    _check_input(x)
    _check_running(x, running_mean, running_var)
    if x.numel() == 0:
        raise ValueError(f"x has no elements per channel: shape {tuple(x.shape)}")
    if running_mean is not None:
        _check_training(x)
    return _stats(x, _plan(x), eps, running_mean, running_var, momentum)


def _stats(x, plan, eps, running_mean, running_var, momentum):
    """`batch_stats` on checked inputs, with the grid plan of x."""
    rows, block_c, col_blocks, per_prog, row_blocks = plan
    C = x.shape[1]
    mean_p = torch.empty(row_blocks, C, device=x.device, dtype=torch.float32)
    m2_p = torch.empty_like(mean_p)
    _partial_stats[(row_blocks, col_blocks)](x, mean_p, m2_p, rows, C, per_prog, BLOCK_R=CONFIG["block_r"],
                                             BLOCK_C=block_c, num_warps=CONFIG["warps"])
    out = torch.empty(3, C, device=x.device, dtype=torch.float32)  # mean, var, invstd
    rm, rv = (running_mean, running_var) if running_mean is not None else (out, out)
    _combine_stats[(col_blocks,)](mean_p, m2_p, out[0], out[1], out[2], rm, rv, row_blocks, rows, per_prog, C,
                                  momentum, eps, HAS_RUNNING=running_mean is not None, BLOCK_C=block_c)
    for t in (running_mean, running_var):  # written in place by the kernel: caches keyed on versions must see it
        if t is not None and not t.is_inference():
            torch.autograd.graph.increment_version(t)
    return out[0], out[1], out[2]


class _BatchNormActTrain(torch.autograd.Function):
    """Training-mode BatchNorm (+ ReLU) over a channels_last (N, C, H, W) tensor: four Triton passes (statistics;
    normalize + activation; the backward's two sums; the input gradient) and two tiny combine launches."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum: float, eps: float, relu: bool):
        """Inputs checked by `batch_norm_act_train` or `FastBatchNormAct2d`'s gate."""
        plan = _plan(x)
        rows, block_c, col_blocks, per_prog, row_blocks = plan
        mean, _, invstd = _stats(x, plan, eps, running_mean, running_var, momentum)
        y = torch.empty_like(x)  # keeps channels_last
        _bn_act_fwd[(row_blocks, col_blocks)](x, y, mean, invstd, weight, bias, rows, x.shape[1], per_prog,
                                              RELU=relu, BLOCK_R=CONFIG["block_r"], BLOCK_C=block_c,
                                              num_warps=CONFIG["warps"])
        ctx.save_for_backward(x, y if relu else None, weight, mean, invstd)
        ctx.relu, ctx.plan = relu, plan
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, y, weight, mean, invstd = ctx.saved_tensors
        grad_out = grad_out.contiguous(memory_format=torch.channels_last)
        rows, block_c, col_blocks, per_prog, row_blocks = ctx.plan
        C = x.shape[1]
        y = y if y is not None else x  # not read without ReLU
        meta = dict(RELU=ctx.relu, BLOCK_R=CONFIG["block_r"], BLOCK_C=block_c, num_warps=CONFIG["warps"])
        sums = torch.empty(2, row_blocks, C, device=x.device, dtype=torch.float32)
        _bn_act_bwd_reduce[(row_blocks, col_blocks)](grad_out, y, x, mean, invstd, sums, rows, C, per_prog, **meta)
        totals = sums.sum(1)  # (2, C): Σ g, Σ g·x̂
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.empty_like(x)
            _bn_act_bwd_elemt[(row_blocks, col_blocks)](grad_out, y, x, mean, invstd, weight, totals, grad_x, rows, C,
                                                        per_prog, 1.0 / rows, **meta)
        grad_w = totals[1].to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_b = totals[0].to(weight.dtype) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None, None, None, None


def batch_norm_act_train(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                         running_mean: Optional[torch.Tensor] = None, running_var: Optional[torch.Tensor] = None,
                         momentum: float = 0.1, eps: float = 1e-5, relu: bool = False) -> torch.Tensor:
    """`act(F.batch_norm(x, running_mean, running_var, weight, bias, training=True, momentum, eps))`, act = ReLU
    or identity, for a channels_last `(N, C, H, W)` x (CUDA, or CPU under Triton's interpreter); differentiable in
    x, weight and bias; updates the running statistics in place."""
    _check_input(x)
    for name, t in (("weight", weight), ("bias", bias)):
        if not isinstance(t, torch.Tensor) or t.shape != (x.shape[1],) or t.device != x.device:
            raise ValueError(f"{name} must be a ({x.shape[1]},) tensor on {x.device}, got "
                             f"{getattr(t, 'shape', type(t).__name__)} on {getattr(t, 'device', None)}")
    _check_running(x, running_mean, running_var)
    _check_training(x)
    return _BatchNormActTrain.apply(x, weight, bias, running_mean, running_var, momentum, eps, bool(relu))


def _fast_device(x: torch.Tensor) -> bool:
    """Whether the module takes the Triton path for x's device (CUDA; tests add the interpreter's CPU)."""
    return x.is_cuda


class FastBatchNormAct2d(BatchNormAct2d):
    """timm's `BatchNormAct2d` whose training forward and backward run `batch_norm_act_train` on CUDA
    channels_last inputs when its activation is a ReLU or none (module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        relu = isinstance(self.act, torch.nn.ReLU)
        if not (self.training and self.affine and self.track_running_stats and _fast_device(x) and x.dim() == 4
                and x.dtype in _DTYPES and x.numel() > x.shape[1]
                and x.is_contiguous(memory_format=torch.channels_last) and not torch.compiler.is_compiling()
                and not torch.jit.is_tracing() and not torch.jit.is_scripting()
                and (relu or isinstance(self.act, torch.nn.Identity)) and isinstance(self.drop, torch.nn.Identity)):
            return super().forward(x)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as timm / torch
                momentum = 1.0 / float(self.num_batches_tracked)
        return _BatchNormActTrain.apply(x, self.weight, self.bias, self.running_mean, self.running_var, momentum,
                                        self.eps, relu)


def enable_fast_batch_norm(model: torch.nn.Module) -> int:
    """Give `model`'s timm `BatchNormAct2d` modules (exactly that class) `FastBatchNormAct2d`'s forward, in place;
    parameters and state_dict keys are unchanged. Returns how many modules changed."""
    return swap_classes(model, {BatchNormAct2d: FastBatchNormAct2d})
