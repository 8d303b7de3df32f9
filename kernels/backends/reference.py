"""The reference path: explicit attention in torch, on any device. It is the oracle every kernel is tested
against, and the path `kernels.capture` uses."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

NAME = "reference"


def can_run_reference(q, k, v, pattern=None, bias=None, gate=None, return_lse=False, raise_error=False) -> bool:
    return True


def expand_kv(k: torch.Tensor, num_q_heads: int) -> torch.Tensor:
    """Repeat GQA key/value heads so they line up with the query heads: (B, Hkv, N, D) -> (B, Hq, N, D)."""
    groups = num_q_heads // k.shape[1]
    return k if groups == 1 else k.repeat_interleave(groups, dim=1)


def attention_logits(q, k, pattern=None, bias=None, scale=None):
    """Masked logits (B, H, Nq, Nk): q·kᵀ·scale + bias, -inf where the pattern hides a key."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k = expand_kv(k, q.shape[1])
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale
    if bias is not None:
        logits = logits + (bias if isinstance(bias, torch.Tensor) else bias.materialize(q, k)).to(logits.dtype)
    if pattern is not None:
        mask = pattern.mask(q.shape[2], k.shape[2], device=q.device)
        logits = logits.masked_fill(~mask, float("-inf"))
    return logits


def softmax_rows(logits):
    """Softmax over keys that gives zeros (not NaN) on rows with no visible key, in the forward and the backward
    (a row of -inf logits, from a pattern or a -inf bias, has lse = -inf and zero probabilities and gradients);
    also returns the lse."""
    dead = torch.isneginf(logits).all(dim=-1, keepdim=True)
    safe = logits.masked_fill(dead, 0.0)
    lse = torch.logsumexp(safe, dim=-1, keepdim=True)
    probs = torch.exp(safe - lse).masked_fill(dead, 0.0)
    return probs, lse.masked_fill(dead, float("-inf"))[..., 0]


def apply_gate(out, gate):
    """out (B, H, N, Dv) times sigmoid(gate), gate (B, N, H) or (B, N, H, 1) head-wise, (B, N, H, Dv)
    element-wise."""
    if gate is None:
        return out
    g = gate.permute(0, 2, 1)[..., None] if gate.dim() == 3 else gate.permute(0, 2, 1, 3)
    return out * torch.sigmoid(g.to(out.dtype))


def autocast_off(device_type: str):
    """`torch.autocast(device_type, enabled=False)`, or nothing where the device has no autocast (meta tensors:
    entering one raises there)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


AUTOCAST_FROM = (torch.float32, torch.float16, torch.bfloat16)  # what autocast casts (float64 stays float64)


def autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype autocast would run an op on `x` in (its `get_autocast_dtype`), or None: autocast off, a device
    without autocast (meta tensors: asking raises there), or a dtype autocast leaves alone."""
    device_type = x.device.type
    if (not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type)
            or x.dtype not in AUTOCAST_FROM):
        return None
    return torch.get_autocast_dtype(device_type)


def attention_reference(q, k, v, pattern=None, bias=None, gate=None, scale=None, return_lse=False):
    """Explicit softmax attention; computed in float32 for half inputs (float64 stays float64), also under
    `torch.autocast` (which would otherwise run the matmuls in half precision)."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    with autocast_off(q.device.type):
        qc, kc, vc = q.to(compute), k.to(compute), v.to(compute)
        if isinstance(bias, torch.Tensor):
            bias = bias.to(compute)
        probs, lse = softmax_rows(attention_logits(qc, kc, pattern, bias, scale))
        out = torch.matmul(probs, expand_kv(vc, q.shape[1]))
        out = apply_gate(out, gate).to(q.dtype)
    return (out, lse.float() if compute != torch.float64 else lse) if return_lse else out
