"""Agent attention (Han et al., ECCV 2024) as one op: pooled agents, the two skinny attention steps and the
depthwise conv on V.

The composition is two `kernels.attention` calls (differentiable, captured by `kernels.capture`, traced by
`torch.compile`). CUDA inference (no gradient needed, keys on the query grid, enough (batch, head) pairs to fill
the GPU) runs `triton_agent`'s fused kernels instead: the whole layer in one launch (up to 256 tokens) or two.
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .capture import active_frame
from .functional import _autocast_inputs, attention

__all__ = ["agent_attention", "agent_attention_planned", "padded_bias"]

logger = logging.getLogger("kernels")
_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_FUSED_MAX_DIM = 128
_FUSED_MAX_AGENTS = 128
_BIAS_PAD = 64  # the fused kernels' largest key/query tile


def _pair(name: str, value) -> Tuple[int, int]:
    if type(value) is tuple and len(value) == 2 and type(value[0]) is int and type(value[1]) is int \
            and value[0] >= 1 and value[1] >= 1:  # the common case, without the ABC check (host time per call)
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if not (isinstance(value, Sequence) and len(value) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in value)):
        raise ValueError(f"{name} must be a positive int or a pair of positive ints (H, W), got {value!r}")
    return tuple(value)


def _check(q, k, v, grid, agent_grid, kv_grid, num_prefix_tokens, bias1, bias2, dwc_weight, dwc_bias, scale):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating (B, H, N, D) tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise TypeError(f"q, k, v must share a dtype and device, got {q.dtype}/{k.dtype}/{v.dtype} on "
                        f"{q.device}/{k.device}/{v.device}")
    B, H, N, D = q.shape
    if k.shape[:2] != (B, H) or v.shape[:3] != k.shape[:3] or k.shape[-1] != D:
        raise ValueError(f"k and v must be (B, H, Nk, D) / (B, H, Nk, Dv) with q's B, H and D, got "
                         f"{tuple(q.shape)=} {tuple(k.shape)=} {tuple(v.shape)=}")
    if not isinstance(num_prefix_tokens, int) or isinstance(num_prefix_tokens, bool) or num_prefix_tokens < 0:
        raise ValueError(f"num_prefix_tokens must be an int >= 0, got {num_prefix_tokens!r}")
    P = num_prefix_tokens
    if N != P + grid[0] * grid[1]:
        raise ValueError(f"q must have num_prefix_tokens + H·W = {P} + {grid[0]}·{grid[1]} rows, got {N}")
    if k.shape[2] != P + kv_grid[0] * kv_grid[1]:
        raise ValueError(f"k and v must have num_prefix_tokens + Hk·Wk = {P} + {kv_grid[0]}·{kv_grid[1]} rows, "
                         f"got {k.shape[2]}")
    n, Nk = agent_grid[0] * agent_grid[1], k.shape[2]
    for name, t, full in (("bias1", bias1, (B, H, n, Nk)), ("bias2", bias2, (B, H, N, n))):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() > 4:
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a floating tensor of additive logits broadcastable to {full}, got "
                             f"{got} (a boolean mask becomes torch.where(mask, 0.0, float('-inf')))")
        # not torch.broadcast_shapes: ~50 us of host time a call
        if any(a != 1 and a != e for a, e in zip(t.shape[::-1], full[::-1])):
            raise ValueError(f"{name} must be broadcastable to {full}, got {tuple(t.shape)}")
    C = H * v.shape[-1]
    if dwc_weight is not None:
        ok = isinstance(dwc_weight, torch.Tensor) and dwc_weight.dim() == 4 and dwc_weight.is_floating_point()
        ks = dwc_weight.shape[-1] if ok else 0
        if not ok or tuple(dwc_weight.shape) != (C, 1, ks, ks) or ks % 2 == 0:
            got = tuple(dwc_weight.shape) if isinstance(dwc_weight, torch.Tensor) else dwc_weight
            raise ValueError(f"dwc_weight must be a floating depthwise conv weight (H·Dv, 1, k, k) = ({C}, 1, k, k) "
                             f"with k odd, got {got!r}")
    if dwc_bias is not None:
        if dwc_weight is None:
            raise ValueError("dwc_bias needs dwc_weight")
        if not isinstance(dwc_bias, torch.Tensor) or tuple(dwc_bias.shape) != (C,) or not dwc_bias.is_floating_point():
            raise ValueError(f"dwc_bias must be a floating tensor of shape ({C},), got "
                             f"{tuple(dwc_bias.shape) if isinstance(dwc_bias, torch.Tensor) else dwc_bias!r}")
    for name, t in (("bias1", bias1), ("bias2", bias2), ("dwc_weight", dwc_weight), ("dwc_bias", dwc_bias)):
        if t is not None and t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    if scale is not None and (not isinstance(scale, (int, float)) or isinstance(scale, bool) or scale <= 0):
        raise ValueError(f"scale must be a positive number or None, got {scale!r}")


def _padded_size(size: int) -> int:
    """An agent count (<= 128) pads to the kernels' agent tile, max(16, next power of two); token counts to a
    multiple of 64 (the largest key/query tile)."""
    return max(16, 1 << (size - 1).bit_length()) if size <= _FUSED_MAX_AGENTS else -(-size // _BIAS_PAD) * _BIAS_PAD


def padded_bias(bias: torch.Tensor) -> torch.Tensor:
    """`bias` (same values, shape and dtype) as a view into a zero-filled buffer whose last two dims are padded to
    the fused kernels' tiles: dims of <= 128 (agents) to max(16, the next power of two), longer ones (tokens) to
    a multiple of 64.

    The fused kernels of `agent_attention` load the tiles of such a bias whole (unmasked, 16-byte vectors on its
    aligned rows) and select the valid entries in registers; a tight bias takes masked scalar loads (rows of 49
    or 197 floats are not 16-byte aligned). Worth it for a bias reused across calls, as a layer's cached
    inference biases are; any bias works either way (the kernels check the storage covers their tiles).
    """
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a tensor, got {type(bias).__name__}")
    if bias.dim() < 2:
        raise ValueError(f"bias must have at least 2 dims, got {tuple(bias.shape)=}")
    rows, cols = bias.shape[-2:]
    buf = bias.new_zeros(*bias.shape[:-2], _padded_size(rows), _padded_size(cols))
    view = buf[..., :rows, :cols]
    view.copy_(bias)
    return view


def _fused_device(q, backend) -> bool:
    """The fused kernels run CUDA tensors, and CPU ones in Triton's interpreter when asked for (the tests);
    scripts/prebuild_triton_cache.py widens this to its meta tensors."""
    from .backends.triton_attention import _interpret

    return q.is_cuda or (_interpret() and backend == "triton")


def _fused_blocker(q, k, v, grid, kv_grid, agent_grid, tensors, backend) -> Optional[str]:
    """Why the fused kernel cannot run these inputs (None: it can); cheap checks first."""
    if torch.compiler.is_compiling():
        return "torch.compile traces the composition"
    if backend == "reference":
        return "backend='reference'"
    if q.numel() == 0 or k.numel() == 0:
        return "empty inputs"
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return "a gradient is needed (the fused kernel has no backward)"
    if active_frame() is not None:
        return "kernels.capture records this module's attention calls"
    if kv_grid != grid:
        return "keys come from a reduced grid"
    if q.dtype not in _FUSED_DTYPES or max(q.shape[-1], v.shape[-1]) > _FUSED_MAX_DIM:
        return f"the fused kernel takes float16/bfloat16/float32 and head dims <= {_FUSED_MAX_DIM}"
    if agent_grid[0] * agent_grid[1] > _FUSED_MAX_AGENTS:
        return f"the fused kernel holds at most {_FUSED_MAX_AGENTS} agents"
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        return "q, k, v need a unit stride along D"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    from .backends import triton_attention as ta

    if not _fused_device(q, backend):
        return "the fused kernel runs CUDA tensors (CPU ones under TRITON_INTERPRET=1 with backend='triton')"
    if not all(ta._rows_fit_int32(t) for t in (q, k, v)):
        return "row offsets beyond int32"
    if backend is None and q.is_cuda and q.shape[0] * q.shape[1] < ta._num_sms(q.device) // 2:
        return "too few (batch, head) pairs to fill the GPU: the composition's kernels split the keys"
    return None


def agent_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, grid, agent_grid, kv_grid=None,
                    num_prefix_tokens: int = 0, bias1: Optional[torch.Tensor] = None,
                    bias2: Optional[torch.Tensor] = None, dwc_weight: Optional[torch.Tensor] = None,
                    dwc_bias: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                    backend: Optional[str] = None) -> torch.Tensor:
    """Agent attention over a token grid, returning the tokens `(B, N, H·Dv)` before the output projection.

    With `A = adaptive_avg_pool(Q grid → agent_grid)` (n agents, per head) and `s = scale`:

        V_A = softmax(s · A Kᵀ + bias1) V
        out = softmax(s · Q Aᵀ + bias2) V_A,   out[grid rows] += DWC(V)

    `DWC` is the depthwise `k × k` conv (zero padding k // 2) of V on its grid, resized bilinearly
    (align_corners=False) to the query grid when `kv_grid` differs; prefix rows get no conv term.

    Args:
        q: queries `(B, H, P + Hq·Wq, D)`: P prefix tokens (class/register tokens) then the grid, row-major.
        k, v: keys `(B, H, P + Hk·Wk, D)` and values `(B, H, P + Hk·Wk, Dv)`.
        grid: the query grid `(Hq, Wq)`.
        agent_grid: the pooled agent grid `(ph, pw)` (n = ph·pw agents; adaptive pooling bins, which repeat
            tokens when the grid is smaller).
        kv_grid: the key grid; None means `grid`.
        num_prefix_tokens: P, leading tokens outside the grid: not pooled and not convolved.
        bias1: additive logits broadcastable to `(B, H, n, Nk)` (agents × keys).
        bias2: additive logits broadcastable to `(B, H, N, n)` (queries × agents).
        dwc_weight: depthwise conv weight `(H·Dv, 1, k, k)`, k odd, channels head-major; None: no conv.
        dwc_bias: its bias `(H·Dv,)`.
        scale: logit scale; None means `D ** -0.5`.
        backend: None picks: the fused Triton kernel for CUDA inference, else the composition over
            `kernels.attention`; "reference" runs the composition on the torch reference; "triton" runs the
            fused kernel where it can (also on CPU under TRITON_INTERPRET=1) and the composition with Triton
            attention otherwise.

    Under `torch.autocast` q, k and v are cast to the autocast dtype, as `kernels.attention` does.
    """
    out, _ = _agent_attention(q, k, v, grid, agent_grid, kv_grid, num_prefix_tokens, bias1, bias2, dwc_weight,
                              dwc_bias, scale, backend, plan=False)
    return out


def agent_attention_planned(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, grid, agent_grid,
                            num_prefix_tokens: int = 0, bias1: Optional[torch.Tensor] = None,
                            bias2: Optional[torch.Tensor] = None, dwc_weight: Optional[torch.Tensor] = None,
                            dwc_bias: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                            backend: Optional[str] = None):
    """`agent_attention(...)` (keys on the query grid), also returning a plan for repeating it on new inputs.

    Returns `(out, plan)`. `plan(q, k, v)` reruns the fused kernels for q, k, v with this call's shapes, strides,
    dtypes and device (tensors; or their device addresses as ints where `plan.direct`: not under Triton's
    interpreter), with this call's biases and conv weights
    (their current values), skipping the argument checks and Triton's per-call argument binding: for a layer that
    calls the op many times on inputs it lays out itself (host time decided agent_deit's step at 224 px). The caller
    keys its plans on what it changes; `plan` is None where the fused kernels did not run (the composition did)."""
    return _agent_attention(q, k, v, grid, agent_grid, None, num_prefix_tokens, bias1, bias2, dwc_weight, dwc_bias,
                            scale, backend, plan=True)


def _agent_attention(q, k, v, grid, agent_grid, kv_grid, num_prefix_tokens, bias1, bias2, dwc_weight, dwc_bias, scale,
                     backend, plan: bool):
    grid, agent_grid = _pair("grid", grid), _pair("agent_grid", agent_grid)
    kv_grid = grid if kv_grid is None else _pair("kv_grid", kv_grid)
    if backend not in (None, "triton", "reference"):
        raise ValueError(f"backend must be 'triton', 'reference' or None, got {backend!r}")
    q, k, v = _autocast_inputs(q, k, v)
    _check(q, k, v, grid, agent_grid, kv_grid, num_prefix_tokens, bias1, bias2, dwc_weight, dwc_bias, scale)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    blocker = _fused_blocker(q, k, v, grid, kv_grid, agent_grid, (q, k, v, bias1, bias2, dwc_weight, dwc_bias),
                             backend)
    if blocker is None:
        from .backends.triton_agent import agent_fused_forward

        result = agent_fused_forward(q, k, v, grid, agent_grid, num_prefix_tokens, bias1, bias2,
                                     dwc_weight.contiguous() if dwc_weight is not None else None,
                                     dwc_bias.contiguous() if dwc_bias is not None else None, scale, plan=plan)
        return result if plan else (result, None)
    if not torch.compiler.is_compiling():  # dynamo cannot trace logging calls
        logger.debug("agent_attention: composition (%s)", blocker)
    return _composition(q, k, v, grid, agent_grid, kv_grid, num_prefix_tokens, bias1, bias2, dwc_weight, dwc_bias,
                        scale, backend), None


def _composition(q, k, v, grid, agent_grid, kv_grid, P, bias1, bias2, dwc_weight, dwc_bias, scale, backend):
    B, H, N, D = q.shape
    Dv = v.shape[-1]
    # agents: the grid queries (channels head-major), pooled; contiguous once, both attention calls read it
    q_grid = q[:, :, P:].transpose(-1, -2).reshape(B, H * D, *grid)
    n = agent_grid[0] * agent_grid[1]
    agents = F.adaptive_avg_pool2d(q_grid, agent_grid).reshape(B, H, D, n).transpose(-1, -2).contiguous()
    agent_v = attention(agents, k, v, bias=bias1, scale=scale, backend=backend)  # (B, H, n, Dv)
    out = attention(q, agents, agent_v, bias=bias2, scale=scale, backend=backend)  # (B, H, N, Dv)
    x = out.transpose(1, 2).reshape(B, N, H * Dv)
    if dwc_weight is None:
        return x
    v_grid = v[:, :, P:].transpose(-1, -2).reshape(B, H * Dv, *kv_grid)
    if kv_grid != grid:
        v_grid = F.interpolate(v_grid, size=grid, mode="bilinear", align_corners=False)
    # the conv in V's dtype (what autocast does, and what the fused kernel does without autocast too)
    local = F.conv2d(v_grid, dwc_weight.to(v_grid.dtype), None if dwc_bias is None else dwc_bias.to(v_grid.dtype),
                     padding=dwc_weight.shape[-1] // 2, groups=H * Dv)
    local = local.flatten(2).transpose(1, 2)  # (B, Hq·Wq, C)
    if P:  # add in place on the grid rows (a cat would copy the whole sequence)
        # the reshape is a view of `out` with one head (or a non-contiguous `out`); the Triton op's backward
        # keeps `out`, so it must not be written (a static test: torch.compile cannot compare data pointers)
        if H == 1 or not out.is_contiguous():
            x = x.clone()
        x[:, P:] += local
        return x
    return x + local
