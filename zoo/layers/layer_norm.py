"""Inference LayerNorm over the last dim in one Triton pass, for the norms that feed a block's linear layers.

Why: PyTorch's LayerNorm kernel is slow at the small widths of these models (192 channels: 1.8 ms per call over
256 x 4097 tokens on an H200, ~0.9 TB/s; 25 calls were 45 of agent_deit_tiny@1024's 143 ms step), and under bf16
autocast its float32 output is then copied to bf16 by the linear layer that reads it. Here one pass reads x,
normalizes in float32 and writes the output directly in the dtype that linear layer computes in (the autocast
dtype; x's dtype without autocast): the same values, one read and one half-size write.

`FastLayerNorm` is `nn.LayerNorm` (same parameters and state_dict) taking this path without autograd, on CUDA,
outside `torch.compile` and `torch.jit`, for float16/bfloat16/float32 inputs; otherwise `F.layer_norm`. Repeated
shapes launch through a prepared `kernels.backends.launch.Launch`: Triton's ordinary launch cost ~100 us more host
time than `F.layer_norm` on the device's CPU, which made small inputs slower (agent_deit_tiny @224, batch 256: GPU
step 7.82 -> 5.76 ms, but wall 10.9 -> 14.3 ms, host-bound); with prepared launches, and each module repeating its
last shape's launch without the argument checks, that step is GPU-bound (BENCHMARKS.md, tenth session).
`enable_fast_layer_norm(block)`
gives it to a pre-norm block's `norm1` / `norm2` (their outputs go straight into the attention's and the MLP's
first linear layers; the model's final norm keeps its float32 output under autocast, as in timm).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import nn

from kernels.backends import launch

__all__ = ["FastLayerNorm", "enable_fast_layer_norm", "layer_norm"]

MAX_WIDTH = 8192  # wider rows: F.layer_norm (the row would not fit one program's registers)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LAUNCHES = {}  # (shape, row stride, dtypes, device, eps, affine) -> launch.Launch: repeats skip Triton's binding


@triton.jit
def _layer_norm_fwd(X, W, B, Y, ROWS, N, stride_x, eps, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    c_ok = cols < N
    ok = (rows < ROWS)[:, None] & c_ok[None, :]
    x = tl.load(X + rows.to(tl.int64)[:, None] * stride_x + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    mean = tl.sum(x, 1) / N
    d = tl.where(ok, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, 1) / N + eps)
    y = d * rstd[:, None]
    if HAS_W:
        y = y * tl.load(W + cols, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(B + cols, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows.to(tl.int64)[:, None] * N + cols[None, :], y.to(Y.dtype.element_ty), mask=ok)


def layer_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float = 1e-5,
               out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """`F.layer_norm(x, (x.shape[-1],), weight, bias, eps)` computed in float32, returned in `out_dtype`
    (default x's dtype). CUDA tensors, or CPU tensors under Triton's interpreter; last dim <= 8192."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must be a tensor with a non-empty last dim, got {getattr(x, 'shape', type(x).__name__)}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"x must be float16, bfloat16 or float32 (computed in float32), got {x.dtype}")
    N = x.shape[-1]
    if N > MAX_WIDTH:
        raise ValueError(f"x's last dim must be <= {MAX_WIDTH}, got {N}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.shape != (N,):
            raise ValueError(f"{name} must be a ({N},) tensor, got {tuple(t.shape)}")
    return _layer_norm(x, weight, bias, eps, out_dtype or x.dtype)[0]


def _layer_norm(x, weight, bias, eps: float, out_dtype: torch.dtype):
    """`layer_norm` on checked arguments: one launch, repeated through a prepared `launch.Launch` per shape.
    Returns the output and that `Launch` (None for an empty input), whose pointers are (x rows, weight, bias,
    output), absent weight/bias replaced by the x rows."""
    N = x.shape[-1]
    x2 = x.reshape(-1, N)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(x.shape, device=x.device, dtype=out_dtype)
    if y.numel() == 0:
        return y, None
    w = weight if weight is not None else x2
    b = bias if bias is not None else x2
    key = (x2.shape, x2.stride(0), x2.dtype, out_dtype, x2.get_device(), eps, w.dtype, b.dtype, weight is None,
           bias is None)
    run = _LAUNCHES.get(key)
    if run is not None:
        run(x2, w, b, y)
        return y, run
    rows = x2.shape[0]
    block_n = max(16, 1 << (N - 1).bit_length())
    block_m = max(1, min(64, 4096 // block_n))
    run = launch.prepare(_layer_norm_fwd, (-(-rows // block_m),), [x2, w, b, y, rows, N, x2.stride(0), eps],
                         (0, 1, 2, 3), HAS_W=weight is not None, HAS_B=bias is not None, BLOCK_M=block_m,
                         BLOCK_N=block_n, num_warps=4)
    if len(_LAUNCHES) >= 64:  # shapes of a long-running process: drop the oldest (None: another thread did)
        _LAUNCHES.pop(next(iter(_LAUNCHES), None), None)
    _LAUNCHES[key] = run
    return y, run


class FastLayerNorm(nn.LayerNorm):
    """`nn.LayerNorm` whose inference (no autograd, CUDA) runs `layer_norm`, writing the autocast dtype under
    autocast (module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Triton launches on the current device: x elsewhere (multi-GPU without torch.cuda.set_device) takes torch's
        if (x.is_cuda and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
                and not torch.jit.is_tracing() and not torch.jit.is_scripting()
                and x.get_device() == torch._C._cuda_getDevice()):
            # autocast (when on) computes the next linear layer in its dtype
            out_dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
            w, b = self.weight, self.bias
            key = (x.shape, x.dtype, out_dtype, x.get_device(), self.eps, w is None, b is None,
                   None if w is None else w.dtype, None if b is None else b.dtype)
            cached = self.__dict__.get("_launch")
            if cached is not None and cached[0] == key and x.is_contiguous():  # this module's last shape: no checks
                y = torch.empty(x.shape, device=x.device, dtype=out_dtype)
                cached[1](x, w if w is not None else x, b if b is not None else x, y)
                return y
            if (x.dtype in _DTYPES and len(self.normalized_shape) == 1
                    and x.shape[-1] == self.normalized_shape[0] <= MAX_WIDTH):
                y, run = _layer_norm(x, w, b, self.eps, out_dtype)
                if run is not None and x.is_contiguous():
                    self.__dict__["_launch"] = (key, run)
                return y
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def __getstate__(self):
        """Copies and pickles leave the cached launch behind (it holds Triton's compiled kernel)."""
        state = super().__getstate__()  # a copy of __dict__, without what `module.compile()` set
        state.pop("_launch", None)
        return state


def enable_fast_layer_norm(block: nn.Module) -> int:
    """Give a pre-norm transformer block's `norm1` / `norm2` (exactly `nn.LayerNorm` or timm's `LayerNorm`)
    `FastLayerNorm`'s forward, in place; parameters and state_dict keys are unchanged. Returns how many changed.

    Only for blocks whose norm outputs go straight into linear layers (the zoo's Agent blocks): under autocast
    they come out in the autocast dtype. In a post-norm block (timm's SwinV2, `ResPostBlock`) the norm output is
    the residual branch, which would then be rounded to bf16."""
    from timm.layers import LayerNorm as TimmLayerNorm

    if not isinstance(block, nn.Module):
        raise TypeError(f"block must be a torch.nn.Module, got {type(block).__name__}")
    changed = 0
    for name in ("norm1", "norm2"):
        norm = getattr(block, name, None)
        if type(norm) in (nn.LayerNorm, TimmLayerNorm):
            norm.__class__ = FastLayerNorm
            changed += 1
    return changed
