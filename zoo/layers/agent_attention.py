"""Agent Attention.

Paper: Han et al., "Agent Attention: On the Integration of Softmax and Linear Attention", ECCV 2024
(arXiv:2312.08874). Reference code (read, not copied): LeapLabTHU/Agent-Attention @207ce3e,
`agent_transformer/models/agent_{deit,pvt,swin}.py`, MIT licence.

n agent tokens, average-pooled from the queries, first gather from all N keys/values and then broadcast back to
every query. Both steps are ordinary softmax attention with "skinny" shapes (n ≪ N), so the cost is O(N·n·d)
instead of O(N²·d). The layer runs `kernels.agent_attention`: two `kernels.attention` calls when training (or
captured, compiled, on CPU), fused Triton kernels (one or two launches) for CUDA inference.

Parameter names and shapes follow the reference (`an_bias`, `ah_bias`, ..., `dwc`) so its checkpoints load
unchanged. Unlike the reference, nothing assumes a square token grid: agents are pooled adaptively from any H×W,
and the agent biases, sized for the grid the model was built for, are interpolated to the grid of each forward.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from timm.layers import to_2tuple, trunc_normal_
from torch import nn

import kernels
import kernels.agent
from kernels.capture import active_frame

from .cache import version_key

__all__ = ["AgentAttention", "resize_agent_biases"]


def _resize_axis(t: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """Linear (align_corners=False) resampling of `t` along `dim` to `size` entries; identity at equal size."""
    if t.shape[dim] == size:
        return t
    moved = t.movedim(dim, -1)
    lead = moved.shape[:-1]
    out = F.interpolate(moved.reshape(1, -1, moved.shape[-1]), size=size, mode="linear", align_corners=False)
    return out.reshape(*lead, size).movedim(-1, dim)


def resize_agent_biases(state_dict: dict, model: nn.Module) -> dict:
    """Resize the per-axis agent biases (`ah/aw/ha/wa_bias`) of a checkpoint to `model`'s bias grids.

    Loading a checkpoint into a model built for another `img_size`: each axis whose length differs is resampled
    linearly (align_corners=False), as the forward does at run time. Other entries pass through unchanged.
    """
    own = model.state_dict()
    out = dict(state_dict)
    for k, v in state_dict.items():
        if k.rsplit(".", 1)[-1] in ("ah_bias", "aw_bias", "ha_bias", "wa_bias") and k in own \
                and v.dim() == own[k].dim() and v.shape != own[k].shape:
            for dim, size in enumerate(own[k].shape):
                v = _resize_axis(v, size, dim)
            out[k] = v
    return out


class AgentAttention(nn.Module):
    """Agent attention over a token grid (Agent-DeiT / Agent-PVT / Agent-Swin), with prefix tokens and K/V reduction.

    With `Q, K, V` the per-head projections of the tokens, `A = AdaptiveAvgPool2d(√n)(Q)` the n agents pooled
    from the grid queries and `s = head_dim ** -0.5`:

        V_A = softmax(s · A Kᵀ + B1) V            agent aggregation: (n × Nk) logits
        O   = softmax(s · Q Aᵀ + B2) V_A + DWC(V)  agent broadcast:   (N × n) logits

    then the output projection. `B1` (agents × keys) is `interp(an_bias) + ah_bias + aw_bias`, `B2`
    (queries × agents) is `interp(na_bias) + ha_bias + wa_bias`; prefix tokens (the class token) get their own
    columns `ac_bias` / rows `ca_bias`. `DWC` is a depthwise 3×3 conv on V over the grid (prefix tokens excluded).

    Args:
        dim: token width C.
        num_heads: attention heads; `dim % num_heads == 0`.
        agent_num: number of agents n, a perfect square (the agents form a √n × √n grid).
        bias_grid: (H, W) token grid the agent biases are sized for: the model's grid at its `img_size`.
            Forwards over another grid interpolate the biases to it (bilinear / linear, align_corners=False).
        num_prefix_tokens: leading tokens outside the grid (class/register tokens): they attend and are attended,
            but are neither pooled into agents nor convolved.
        qkv_bias: bias on the q, k, v projections.
        proj_drop: dropout after the output projection.
        sr_ratio: spatial reduction of keys/values (Agent-PVT): a stride-`sr_ratio` conv and `norm_layer` before
            the k/v projection, V upsampled back to the grid before the DWC. 1 (the released configs) keeps one
            fused `qkv` projection.
        norm_layer: norm after the spatial-reduction conv.
        device, dtype: factory kwargs for the parameters.
    """

    def __init__(self, dim: int, num_heads: int = 8, agent_num: int = 49, bias_grid=(14, 14),
                 num_prefix_tokens: int = 0, qkv_bias: bool = False, proj_drop: float = 0.0, sr_ratio: int = 1,
                 norm_layer=nn.LayerNorm, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if not isinstance(dim, int) or not isinstance(num_heads, int) or num_heads < 1 or dim % num_heads:
            raise ValueError(f"dim must be a multiple of num_heads, got dim={dim!r}, num_heads={num_heads!r}")
        pool = math.isqrt(agent_num) if isinstance(agent_num, int) and agent_num > 0 else 0
        if pool < 1 or pool * pool != agent_num:
            raise ValueError(f"agent_num must be a positive perfect square (√n × √n agents), got {agent_num!r}")
        bias_grid = tuple(to_2tuple(bias_grid))
        if len(bias_grid) != 2 or any(not isinstance(g, int) or g < 1 for g in bias_grid):
            raise ValueError(f"bias_grid must be two positive ints (H, W), got {bias_grid!r}")
        if not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
            raise ValueError(f"num_prefix_tokens must be an int >= 0, got {num_prefix_tokens!r}")
        if not isinstance(sr_ratio, int) or sr_ratio < 1:
            raise ValueError(f"sr_ratio must be an int >= 1, got {sr_ratio!r}")
        if sr_ratio > 1 and num_prefix_tokens:
            raise ValueError(f"sr_ratio > 1 needs a pure grid (num_prefix_tokens=0), got {num_prefix_tokens=}")
        if sr_ratio > 1 and min(bias_grid) < sr_ratio:
            raise ValueError(f"bias_grid {bias_grid} is smaller than sr_ratio={sr_ratio}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.agent_num = agent_num
        self.agent_grid = (pool, pool)
        self.bias_grid = bias_grid
        self.num_prefix_tokens = num_prefix_tokens
        self.sr_ratio = sr_ratio
        self.backend: Optional[str] = None  # None: kernels picks; "reference" forces the explicit path

        if sr_ratio == 1:
            self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        else:
            self.q = nn.Linear(dim, dim, bias=qkv_bias, **dd)
            self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias, **dd)
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio, **dd)
            self.norm = norm_layer(dim, **dd)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.dwc = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim, **dd)

        gh, gw = bias_grid
        kh, kw = gh // sr_ratio, gw // sr_ratio
        h, n = num_heads, agent_num
        self.an_bias = nn.Parameter(torch.empty(h, n, 7, 7, **dd))
        self.na_bias = nn.Parameter(torch.empty(h, n, 7, 7, **dd))
        self.ah_bias = nn.Parameter(torch.empty(1, h, n, kh, 1, **dd))
        self.aw_bias = nn.Parameter(torch.empty(1, h, n, 1, kw, **dd))
        self.ha_bias = nn.Parameter(torch.empty(1, h, gh, 1, n, **dd))
        self.wa_bias = nn.Parameter(torch.empty(1, h, 1, gw, n, **dd))
        if num_prefix_tokens:
            self.ac_bias = nn.Parameter(torch.empty(1, h, n, num_prefix_tokens, **dd))
            self.ca_bias = nn.Parameter(torch.empty(1, h, num_prefix_tokens, n, **dd))
        else:
            self.ac_bias = self.ca_bias = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for p in (self.an_bias, self.na_bias, self.ah_bias, self.aw_bias, self.ha_bias, self.wa_bias,
                  self.ac_bias, self.ca_bias):
            if p is not None:
                trunc_normal_(p, std=0.02)

    def _apply(self, fn, recurse=True):
        """`Module._apply` with the reference's 5-d bias parameters `(1, h, ...)` handed to `fn` as 4-d views:
        `model.to(memory_format=torch.channels_last)` (timm's --channels-last) converts 4-d tensors and refuses
        5-d ones. Also drops the inference bias cache and launch plan (device, dtype or storage may change)."""
        self.__dict__.pop("_bias_cache", None)
        self.__dict__.pop("_plan", None)

        def apply(t):
            if t.dim() == 5 and t.shape[0] == 1:
                return fn(t[0]).unsqueeze(0)
            return fn(t)

        return super()._apply(apply, recurse)

    def train(self, mode: bool = True):
        if mode or self.training:  # a switch, or training (no cache then): `model.train().eval()` clears it
            self.__dict__.pop("_bias_cache", None)
            self.__dict__.pop("_plan", None)
        return super().train(mode)

    def __getstate__(self):
        """Copies and pickles (`copy.deepcopy` for EMA weights, `torch.save(model)`) leave the launch plan behind:
        it holds Triton's compiled kernels and the original's tensors."""
        state = super().__getstate__()  # a copy of __dict__, without what `module.compile()` set
        state.pop("_plan", None)
        return state

    def _bias_params(self):
        return [p for p in (self.an_bias, self.na_bias, self.ah_bias, self.aw_bias, self.ha_bias, self.wa_bias,
                            self.ac_bias, self.ca_bias) if p is not None]

    def agent_bias(self, feat_size: Tuple[int, int], kv_size: Optional[Tuple[int, int]] = None):
        """The two dense additive biases for a query grid `feat_size` and a key grid `kv_size` (default: same).

        Without autograd (inference) the result is cached per grid and reused until a bias parameter changes
        (its storage or its in-place version counter: `load_state_dict`, an optimizer step, EMA updates), the
        module moves (`.to`, `.half`) or switches between `train()` and `eval()` (an `eval()` on a module in eval
        mode keeps it: benchmarks call it every step): the interpolations and sums are ~10 small kernels per
        layer that only depend on the parameters. Writes through `param.data` bypass the version counter: call
        `model.train().eval()` after them. Cached biases are `kernels.agent.padded_bias` views (the fused kernels
        load their tiles whole).

        Returns:
            `B1 (1, H, n, P + Hk·Wk)` for agents × keys and `B2 (1, H, P + H·W, n)` for queries × agents,
            P = num_prefix_tokens.
        """
        kv_size = tuple(kv_size) if kv_size is not None else tuple(feat_size)
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self._agent_bias(tuple(feat_size), kv_size)
        versions = version_key(self._bias_params())
        key = None if versions is None else (tuple(feat_size), kv_size) + versions
        cached = self.__dict__.get("_bias_cache")
        if key is None or cached is None or cached[0] != key:  # padded: the fused kernels load its tiles whole
            cached = (key, tuple(kernels.agent.padded_bias(b) for b in self._agent_bias(tuple(feat_size), kv_size)))
            if key is not None:  # inference-tensor parameters: no version counters to key a cache on
                self.__dict__["_bias_cache"] = cached
        return cached[1]

    def _agent_bias(self, feat_size: Tuple[int, int], kv_size: Tuple[int, int]):
        H, W = feat_size
        Hk, Wk = kv_size
        h, n = self.num_heads, self.agent_num
        an = F.interpolate(self.an_bias, size=(Hk, Wk), mode="bilinear", align_corners=False)  # (h, n, Hk, Wk)
        ahw = _resize_axis(self.ah_bias, Hk, 3) + _resize_axis(self.aw_bias, Wk, 4)  # (1, h, n, Hk, Wk)
        bias1 = an.reshape(1, h, n, Hk * Wk) + ahw.reshape(1, h, n, Hk * Wk)
        na = F.interpolate(self.na_bias, size=(H, W), mode="bilinear", align_corners=False)  # (h, n, H, W)
        hwa = _resize_axis(self.ha_bias, H, 2) + _resize_axis(self.wa_bias, W, 3)  # (1, h, H, W, n)
        bias2 = na.reshape(1, h, n, H * W).transpose(-1, -2) + hwa.reshape(1, h, H * W, n)
        if self.num_prefix_tokens:
            bias1 = torch.cat([self.ac_bias, bias1], dim=-1)
            bias2 = torch.cat([self.ca_bias, bias2], dim=-2)
        return bias1, bias2

    def forward(self, x: torch.Tensor, feat_size: Tuple[int, int]) -> torch.Tensor:
        B, N, C = x.shape
        H, W = feat_size
        P, h, d = self.num_prefix_tokens, self.num_heads, self.head_dim
        if self.sr_ratio == 1:
            qkv = self.qkv(x)
            if not torch.is_grad_enabled() and (qkv.is_cuda and self.backend is None or self.backend == "triton"):
                out = self._planned(qkv, (H, W))
                if out is not None:
                    return self.proj_drop(self.proj(out))
            q, k, v = self._split_heads(qkv)
            kv_size = (H, W)
        else:
            q = self.q(x).reshape(B, N, h, d).transpose(1, 2)  # (B, h, N, d)
            x_ = x.transpose(1, 2).reshape(B, C, H, W)
            if H < self.sr_ratio or W < self.sr_ratio:  # a grid smaller than one reduction cell: zero-pad to one
                x_ = F.pad(x_, (0, max(0, self.sr_ratio - W), 0, max(0, self.sr_ratio - H)))
            x_ = self.sr(x_)  # (B, C, Hk, Wk)
            kv_size = tuple(x_.shape[-2:])
            x_ = self.norm(x_.flatten(2).transpose(1, 2))  # (B, Nk, C)
            k, v = self.kv(x_).reshape(B, -1, 2, h, d).permute(2, 0, 3, 1, 4).unbind(0)  # (B, h, Nk, d)

        bias1, bias2 = self.agent_bias((H, W), kv_size)
        x = kernels.agent_attention(q, k, v, grid=(H, W), agent_grid=self.agent_grid, kv_grid=kv_size,
                                    num_prefix_tokens=P, bias1=bias1, bias2=bias2, dwc_weight=self.dwc.weight,
                                    dwc_bias=self.dwc.bias, backend=self.backend)  # (B, N, C)
        return self.proj_drop(self.proj(x))

    def _split_heads(self, qkv: torch.Tensor):
        """q, k, v `(B, h, N, d)` views of the fused projection `(B, N, 3·C)`."""
        B, N, _ = qkv.shape
        return qkv.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def _planned(self, qkv: torch.Tensor, feat_size: Tuple[int, int]) -> Optional[torch.Tensor]:
        """Inference through a cached `kernels.agent.agent_attention_planned` plan: after the first call for an
        input shape, the layer's host time is the two linear layers and one kernel launch (no views, checks or
        Triton argument binding: agent_deit's step at 224 px was host-bound). The plan is keyed on the input's
        shape and dtype and on the biases' and conv's parameters (storage and version, as the bias cache). None
        where the fused kernels do not run (the caller takes the general path)."""
        if torch.compiler.is_compiling() or torch.jit.is_tracing() or not qkv.is_contiguous() \
                or active_frame() is not None or qkv.is_cuda and qkv.get_device() != torch._C._cuda_getDevice():
            return None
        versions = version_key(self._bias_params() + [t for t in (self.dwc.weight, self.dwc.bias) if t is not None])
        if versions is None:
            return None
        key = (versions, qkv.shape, qkv.dtype, feat_size)
        cached = self.__dict__.get("_plan")
        if cached is not None and cached[0] == key:
            if cached[1] is None:
                return None
            if cached[1].direct:  # q, k, v by address: no view ops
                address, step = qkv.data_ptr(), qkv.shape[-1] // 3 * qkv.element_size()
                return cached[1](address, address + step, address + 2 * step)
            return cached[1](*self._split_heads(qkv))
        bias1, bias2 = self.agent_bias(feat_size)
        out, plan = kernels.agent.agent_attention_planned(
            *self._split_heads(qkv), grid=feat_size, agent_grid=self.agent_grid,
            num_prefix_tokens=self.num_prefix_tokens, bias1=bias1, bias2=bias2, dwc_weight=self.dwc.weight,
            dwc_bias=self.dwc.bias, backend=self.backend)
        self.__dict__["_plan"] = (key, plan)
        return out

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, agent_num={self.agent_num}, "
                f"bias_grid={self.bias_grid}, num_prefix_tokens={self.num_prefix_tokens}, sr_ratio={self.sr_ratio}")
