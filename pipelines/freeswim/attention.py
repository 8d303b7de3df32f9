"""FreeSwim attention for diffusers' Wan transformer, through attention processors over `kernels.attention`.

FreeSwim (Wu et al., "Revisiting Sliding-Window Attention Mechanisms for Training-Free Ultra-High-Resolution
Video Generation", arXiv 2511.14712; reference code WillWu111/FreeSwim, read, not copied) runs a video DiT above
its training resolution with three pieces, all here:

* **inward sliding-window self-attention** over the latent token grid `(T', H', W')`: a query sees every latent
  frame and a spatial window of `(2 d_h + 1) x (2 d_w + 1)` tokens, with `d = base // 2` per axis of the
  base-resolution (training-scale) token grid; windows at the border are shifted inward so every query keeps the
  full training-scale receptive field. This is `kernels.Neighborhood(grid, window, inward=True)`
  (`freeswim_pattern`).
* **dual path with cross-attention override**: the batch holds `[window rows; full rows]`; the full rows use
  dense self-attention, and the cross-attention output computed from the full rows' queries replaces the
  window rows' own (`FreeSwimState.mode == "dual"`).
* **cross-attention cache**: on refresh steps the full rows' cross-attention output (before `to_out`) is stored
  per layer; on the other steps the window rows use the stored tensor instead of computing cross-attention, and
  no full self-attention runs at all (`mode == "reuse"`).

Self-attention in both branches uses the temperature `scale = sqrt(log_{N_base}(N_target) / d_head)`
(`freeswim_attention_scale`) with the reference's constants `N_base = 1560` (30 x 52 tokens per frame at
480 x 832, Wan2.1's training size) and `N_target = 3120`, at every resolution (`FREESWIM_BASE_TOKENS`,
`FREESWIM_TARGET_TOKENS`: about 1.046 / sqrt(d_head)). A resolution-aware variant (the actual tokens per latent
frame of the base and target resolutions) is `freeswim_attention_scale(d_head, H_b' * W_b', H' * W')`, passed
to the pipeline as `attention_scale`.

The stock Wan `forward` does not pass per-call kwargs to processors, so the processors share one mutable
`FreeSwimState` that the pipeline sets before each transformer call.
"""
from __future__ import annotations

import contextlib
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch

import kernels

__all__ = [
    "freeswim_window",
    "freeswim_pattern",
    "freeswim_attention_scale",
    "FREESWIM_BASE_TOKENS",
    "FREESWIM_TARGET_TOKENS",
    "FreeSwimState",
    "FreeSwimSelfAttnProcessor",
    "FreeSwimCrossAttnProcessor",
    "freeswim_attn_processors",
    "freeswim_processors",
]


def freeswim_window(grid: Tuple[int, int, int], base_grid: Tuple[int, int]) -> Tuple[int, int, int]:
    """Window `(T', 2 d_h + 1, 2 d_w + 1)` with `d = base // 2`, capped at the grid (a window that covers an axis
    sees all of it either way)."""
    t, h, w = grid
    bh, bw = base_grid
    return (t, min(2 * (bh // 2) + 1, h), min(2 * (bw // 2) + 1, w))


def freeswim_pattern(grid: Tuple[int, int, int], base_grid: Tuple[int, int]) -> kernels.Neighborhood:
    """FreeSwim's inward sliding window over the row-major `(T', H', W')` latent token grid.

    Args:
        grid: latent token grid `(T', H', W')` at the target resolution.
        base_grid: token grid `(H_b', W_b')` of one frame at the base (training) resolution.
    """
    if len(grid) != 3 or any(not isinstance(g, int) or g < 1 for g in grid):
        raise ValueError(f"grid must be three positive ints (T', H', W'), got {grid!r}")
    if len(base_grid) != 2 or any(not isinstance(g, int) or g < 1 for g in base_grid):
        raise ValueError(f"base_grid must be two positive ints (H_b', W_b'), got {base_grid!r}")
    return kernels.Neighborhood(grid=tuple(grid), window=freeswim_window(grid, base_grid), inward=True)


FREESWIM_BASE_TOKENS = 1560  # the reference's hard-coded temperature constants (specs: FreeSwim, Temperature)
FREESWIM_TARGET_TOKENS = 3120


def freeswim_attention_scale(head_dim: int, base_tokens: int = FREESWIM_BASE_TOKENS,
                             target_tokens: int = FREESWIM_TARGET_TOKENS) -> float:
    """`sqrt(log_{base_tokens}(target_tokens) / head_dim)`: FreeSwim's self-attention temperature.

    Args:
        head_dim: attention head dimension `d_head`.
        base_tokens: tokens per latent frame at the training (base) resolution, >= 2 (default: the reference's
            1560).
        target_tokens: tokens per latent frame at the target resolution, >= base_tokens (default: the
            reference's 3120).
    """
    if head_dim < 1:
        raise ValueError(f"head_dim must be >= 1, got {head_dim}")
    if base_tokens < 2:
        raise ValueError(f"base_tokens must be >= 2 (the logarithm's base), got {base_tokens}")
    if target_tokens < base_tokens:
        raise ValueError(f"target_tokens must be >= base_tokens ({base_tokens}), got {target_tokens}")
    return math.sqrt(math.log(target_tokens) / math.log(base_tokens) / head_dim)


@dataclass
class FreeSwimState:
    """What the FreeSwim processors of one transformer do on the next forward; set by the pipeline.

    Modes (B = rows of one branch):

    * ``"window"``: all rows use window self-attention and their own cross-attention (the uncond pass in cache
      mode, and the plain high-resolution text-to-video mode);
    * ``"dual"``: the batch is ``[window rows (B); full rows (B)]``; the full rows use dense self-attention, and
      the full rows' cross-attention output is used by both halves; with ``store_cross`` it is also stored per
      layer in ``cross_cache``;
    * ``"reuse"``: all rows use window self-attention, and cross-attention returns the stored tensor.

    ``counts`` tallies calls by kind (``window_self``, ``full_self``, ``cross``, ``cross_reuse``).
    """

    pattern: Optional[kernels.Neighborhood] = None
    scale: Optional[float] = None
    mode: str = "window"
    store_cross: bool = False
    cross_cache: Dict[str, torch.Tensor] = field(default_factory=dict)
    counts: Counter = field(default_factory=Counter)

    def set_mode(self, mode: str, store_cross: bool = False) -> None:
        if mode not in ("window", "dual", "reuse"):
            raise ValueError(f"mode must be 'window', 'dual' or 'reuse', got {mode!r}")
        self.mode, self.store_cross = mode, store_cross


def _qkv(attn, hidden_states, context):
    """Projections (B, L, H, D) with Wan's q/k RMS norms over all heads."""
    if getattr(attn, "fused_projections", False):
        if attn.is_cross_attention:
            query = attn.to_q(hidden_states)
            key, value = attn.to_kv(context).chunk(2, dim=-1)
        else:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
    else:
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return tuple(t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))  # (B, L, H, D)


def _rope(x, freqs_cos, freqs_sin):
    """Rotate interleaved channel pairs (x[2i], x[2i+1]) by Wan's 3-d RoPE angles; x (B, L, H, D)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).type_as(x)


def _out(attn, hidden_states):
    return attn.to_out[1](attn.to_out[0](hidden_states))


class FreeSwimSelfAttnProcessor:
    """Wan self-attention (`attn1`) with FreeSwim's window / full branches, through `kernels.attention`."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, state: FreeSwimState):
        self.state = state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if attention_mask is not None:
            raise NotImplementedError("FreeSwim self-attention takes no attention_mask")
        st = self.state
        query, key, value = _qkv(attn, hidden_states, hidden_states)
        if rotary_emb is not None:
            query, key = _rope(query, *rotary_emb), _rope(key, *rotary_emb)
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (B, H, L, D)
        if st.mode == "dual":
            n = q.shape[0] // 2
            window = kernels.attention(q[:n], k[:n], v[:n], pattern=st.pattern, scale=st.scale)
            full = kernels.attention(q[n:], k[n:], v[n:], pattern=kernels.Dense(), scale=st.scale)
            out = torch.cat([window, full])
            st.counts["full_self"] += 1
        else:
            out = kernels.attention(q, k, v, pattern=st.pattern, scale=st.scale)
        st.counts["window_self"] += 1
        out = out.transpose(1, 2).flatten(2, 3).type_as(hidden_states)  # (B, L, H*D)
        return _out(attn, out)


class FreeSwimCrossAttnProcessor:
    """Wan text cross-attention (`attn2`) with FreeSwim's override and cache; `name` keys the cache."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, state: FreeSwimState, name: str):
        self.state = state
        self.name = name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if attn.add_k_proj is not None:
            raise NotImplementedError("FreeSwim processors support text-conditioned Wan (no image cross-attention)")
        if attention_mask is not None:
            raise NotImplementedError("FreeSwim cross-attention takes no attention_mask")
        st = self.state
        if st.mode == "reuse":
            out = st.cross_cache[self.name]  # (B, L, H*D), stored on the last refresh step
            st.counts["cross_reuse"] += 1
            return _out(attn, out.type_as(hidden_states))
        if st.mode == "dual":  # only the full rows' queries are needed: their output overrides the window rows'
            n = hidden_states.shape[0] // 2
            hidden_states, encoder_hidden_states = hidden_states[n:], encoder_hidden_states[n:]
        query, key, value = _qkv(attn, hidden_states, encoder_hidden_states)
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (B, H, L|S, D)
        out = kernels.attention(q, k, v, pattern=kernels.Dense())
        out = out.transpose(1, 2).flatten(2, 3).type_as(hidden_states)  # (B, L, H*D)
        if st.mode == "dual":
            if st.store_cross:
                st.cross_cache[self.name] = out
            out = torch.cat([out, out])
        st.counts["cross"] += 1
        return _out(attn, out)


def freeswim_attn_processors(transformer, state: FreeSwimState) -> Dict[str, object]:
    """Processor dict for `transformer.set_attn_processor`: FreeSwim processors on every attention layer."""
    procs = {}
    for key in transformer.attn_processors:
        module = transformer.get_submodule(key[: -len(".processor")])
        if getattr(module, "is_cross_attention", False):
            procs[key] = FreeSwimCrossAttnProcessor(state, key)
        else:
            procs[key] = FreeSwimSelfAttnProcessor(state)
    return procs


@contextlib.contextmanager
def freeswim_processors(transformer, state: FreeSwimState):
    """Install FreeSwim processors on `transformer` for the duration of the block, then restore the previous
    ones and drop the cross-attention cache."""
    previous = dict(transformer.attn_processors)
    transformer.set_attn_processor(freeswim_attn_processors(transformer, state))
    try:
        yield state
    finally:
        transformer.set_attn_processor(previous)
        state.cross_cache.clear()
