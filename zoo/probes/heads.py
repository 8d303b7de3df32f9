"""Probe heads for frozen encoders: linear, attentive (AIM, V-JEPA) and Efficient Probing (EP).

Papers:
    Efficient Probing — Psomas et al., "Attention, Please! Revisiting Attentive Probing Through the Lens of
        Efficiency", arXiv 2506.10178 (ICLR 2026).
    AIM — El-Nouby et al., "Scalable Pre-training of Large Autoregressive Image Models", arXiv 2401.08541.
    V-JEPA — Bardes et al., "Revisiting Feature Prediction for Learning Visual Representations from Video",
        arXiv 2404.08471 (its attentive classifier, a DINOv2/ViT-style cross-attention block).

Every probe has the same shape (as in the EP reference, billpsomas/efficient-probing `probe_heads.py`, read for
reference only): a pooling module that maps tokens `(B, N, D)` to one vector `(B, F)`, a BatchNorm1d without
affine parameters, and a new Linear classifier. All attention goes through `kernels.attention`.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Type

import torch
from timm.layers import Mlp, trunc_normal_
from torch import nn

import kernels
from ..layers.checks import check_positive_ints

__all__ = [
    "ProbeHead", "LinearProbe", "AttentiveProbe", "CrossAttentionProbe", "EfficientProbe",
    "TokenPool", "AttentionPool", "CrossAttentionPool", "EfficientProbingPool",
    "PROBES", "create_probe", "list_probes",
]

_TOKENS = ("patch", "all")


def _split_tokens(x: torch.Tensor, num_prefix_tokens: int, tokens: str) -> torch.Tensor:
    return x[:, num_prefix_tokens:] if tokens == "patch" else x


class TokenPool(nn.Module):
    """Parameter-free pooling for linear probing: `cls` (the first token, the CLS token; register tokens after it
    are ignored) or `mean` (global average of the patch tokens, MAE's `gap`)."""

    def __init__(self, pool: str = "cls", num_prefix_tokens: int = 1):
        super().__init__()
        pool = "mean" if pool == "gap" else pool  # the EP paper's and MAE's name for the patch-token mean
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls', 'mean' or 'gap', got {pool!r}")
        if pool == "cls" and num_prefix_tokens < 1:
            raise ValueError(f"pool='cls' needs a prefix (CLS) token, got num_prefix_tokens={num_prefix_tokens}")
        self.pool = pool
        self.num_prefix_tokens = num_prefix_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool == "cls":
            return x[:, 0]
        if x.shape[1] <= self.num_prefix_tokens:
            raise ValueError(f"pool='mean' needs patch tokens after the {self.num_prefix_tokens} prefix token(s), got "
                             f"{x.shape[1]} tokens")
        return x[:, self.num_prefix_tokens:].mean(1)


class _MultiHeadQueryPool(nn.Module):
    """Shared by the attentive pools: learnable queries over `num_heads` heads; subclasses define `_qkv(x)`."""

    def __init__(self, dim: int, num_heads: int, num_queries: int):
        super().__init__()
        check_positive_ints(dim=dim, num_heads=num_heads, num_queries=num_queries)
        if dim % num_heads:
            raise ValueError(f"dim must be divisible by num_heads, got dim={dim} num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.num_queries = num_queries
        self.backend: Optional[str] = None

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """Attention probabilities `(B, H, M, N)`, computed explicitly. Reading them changes no state (in train
        mode a BatchNorm normalizes with the batch's statistics without updating its running ones)."""
        q, k, _ = self._qkv(x, update_stats=False)
        return torch.softmax(q @ k.transpose(-1, -2) * self.head_dim ** -0.5, dim=-1)


class AttentionPool(_MultiHeadQueryPool):
    """AIM's attention-pooling classifier body: BN over tokens, K/V projections, learnable queries, multi-head
    cross-attention, mean over queries."""

    def __init__(self, dim: int, num_heads: int = 12, num_queries: int = 1, qkv_bias: bool = False,
                 device=None, dtype=None):
        super().__init__(dim, num_heads, num_queries)
        dd = dict(device=device, dtype=dtype)
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6, **dd)
        self.k = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.v = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.query = nn.Parameter(torch.randn(1, num_queries, dim, **dd) * 0.02)

    def _qkv(self, x, update_stats: bool = True):
        B, N, C = x.shape
        x = x.transpose(1, 2)
        if self.training and not update_stats:  # batch statistics, as forward uses; running ones untouched
            x = nn.functional.batch_norm(x, None, None, training=True, eps=self.norm.eps)
        else:
            x = self.norm(x)
        x = x.transpose(1, 2)
        q = self.query.reshape(1, self.num_queries, self.num_heads, self.head_dim).permute(0, 2, 1, 3)
        q = q.expand(B, -1, -1, -1)  # (B, H, M, hd)
        k = self.k(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, hd)
        v = self.v(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, hd)
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._qkv(x)
        out = kernels.attention(q, k, v, backend=self.backend)  # (B, H, M, hd)
        out = out.transpose(1, 2).reshape(x.shape[0], self.num_queries, -1)  # (B, M, D)
        return out.mean(1)


class CrossAttentionPool(_MultiHeadQueryPool):
    """V-JEPA's attentive pooler (one DINOv2/ViT-style cross-attention block): learnable queries attend to
    LayerNorm-ed tokens through Q/KV projections and an output projection, then a residual MLP."""

    def __init__(self, dim: int, num_heads: int = 12, num_queries: int = 1, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, init_std: float = 0.02, device=None, dtype=None):
        super().__init__(dim, num_heads, num_queries)
        dd = dict(device=device, dtype=dtype)
        self.query = nn.Parameter(torch.zeros(1, num_queries, dim, **dd))
        self.norm1 = nn.LayerNorm(dim, **dd)
        self.q = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias, **dd)
        self.proj = nn.Linear(dim, dim, **dd)
        self.norm2 = nn.LayerNorm(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, **dd)
        trunc_normal_(self.query, std=init_std)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=init_std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        with torch.no_grad():  # residual-branch rescaling of the first (and only) layer: 1/sqrt(2·1)
            self.proj.weight.div_(math.sqrt(2.0))
            self.mlp.fc2.weight.div_(math.sqrt(2.0))

    def _qkv(self, x, update_stats: bool = True):  # no running statistics here
        B, N, C = x.shape
        x = self.norm1(x)
        q = self.q(self.query).reshape(1, self.num_queries, self.num_heads, self.head_dim).transpose(1, 2)
        q = q.expand(B, -1, -1, -1)  # (B, H, M, hd)
        kv = self.kv(x).reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)  # (B, H, N, hd)
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        q, k, v = self._qkv(x)
        y = kernels.attention(q, k, v, backend=self.backend)  # (B, H, M, hd)
        y = self.proj(y.transpose(1, 2).reshape(B, self.num_queries, -1))  # (B, M, D)
        z = self.query.expand(B, -1, -1) + y
        z = z + self.mlp(self.norm2(z))
        return z.mean(1)


class EfficientProbingPool(nn.Module):
    """Efficient Probing: M learnable queries attend to the tokens themselves (no Q or K projection); one value
    projection `W_V: D -> D/d_out` is split channel-wise into M chunks, query i pools chunk i, and the M outputs
    are concatenated into a `D/d_out` vector.

    `a_i = softmax(q_i Xᵀ / √D)`, `y = concat_i(a_i · X W_V[:, chunk_i])`. Parameters: `M·D + D·D/d_out`.
    """

    def __init__(self, dim: int, num_queries: int = 32, d_out: int = 1, qkv_bias: bool = False,
                 device=None, dtype=None):
        super().__init__()
        check_positive_ints(dim=dim, num_queries=num_queries, d_out=d_out)
        if dim % d_out:
            raise ValueError(f"d_out must be a positive divisor of dim, got dim={dim} d_out={d_out}")
        if num_queries < 1 or (dim // d_out) % num_queries:
            raise ValueError(f"num_queries must divide dim // d_out = {dim // d_out}, got num_queries={num_queries}")
        dd = dict(device=device, dtype=dtype)
        self.dim = dim
        self.num_queries = num_queries
        self.d_out = d_out
        self.out_dim = dim // d_out
        self.backend: Optional[str] = None
        self.query = nn.Parameter(torch.randn(num_queries, dim, **dd) * 0.02)
        self.v = nn.Linear(dim, self.out_dim, bias=qkv_bias, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        M = self.num_queries
        # each query is its own "head" with one row; keys are the raw tokens, shared by all heads
        q = self.query[None, :, None, :].expand(B, M, 1, D)  # (B, M, 1, D)
        k = x[:, None].expand(B, M, N, D)  # (B, M, N, D), a view
        v = self.v(x).reshape(B, N, M, self.out_dim // M).transpose(1, 2)  # (B, M, N, D/(d_out·M))
        out = kernels.attention(q, k, v, scale=D ** -0.5, backend=self.backend)  # (B, M, 1, D/(d_out·M))
        return out.reshape(B, self.out_dim)

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """Attention probabilities `(B, M, N)`, computed explicitly."""
        return torch.softmax(torch.einsum("md,bnd->bmn", self.query, x) * self.dim ** -0.5, dim=-1)


class ProbeHead(nn.Module):
    """A probe: `pool` (tokens `(B, N, D)` -> `(B, F)`), `BatchNorm1d(F, affine=False)`, then `Linear(F, C)`.

    Args:
        pool: the pooling module; must expose its output width as `out_dim`.
        num_classes: classifier outputs.
        num_prefix_tokens: how many leading tokens are prefix (CLS/register) tokens.
        tokens: which tokens the pooling sees: "patch" (prefix tokens dropped) or "all".
    """

    def __init__(self, pool: nn.Module, out_dim: int, num_classes: int, num_prefix_tokens: int = 0,
                 tokens: str = "patch", device=None, dtype=None, in_dim: Optional[int] = None):
        super().__init__()
        self.in_dim = in_dim
        if tokens not in _TOKENS:
            raise ValueError(f"tokens must be one of {_TOKENS}, got {tokens!r}")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if num_prefix_tokens < 0:
            raise ValueError(f"num_prefix_tokens must be >= 0, got {num_prefix_tokens}")
        dd = dict(device=device, dtype=dtype)
        self.num_prefix_tokens = num_prefix_tokens
        self.tokens = tokens
        self.num_features = out_dim
        self.num_classes = num_classes
        self.pool = pool
        self.norm = nn.BatchNorm1d(out_dim, affine=False, eps=1e-6, **dd)
        self.fc = nn.Linear(out_dim, num_classes, **dd)

    def _check_tokens(self, x) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or not x.is_floating_point():
            raise ValueError(f"tokens must be a floating-point (B, N, D) tensor, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}"
                             f"{' ' + str(x.dtype) if isinstance(x, torch.Tensor) else ''}")
        if self.in_dim is not None and x.shape[-1] != self.in_dim:
            raise ValueError(f"tokens must have width D={self.in_dim} (the probe's dim), got {tuple(x.shape)}")
        if self.tokens == "patch" and x.shape[1] <= self.num_prefix_tokens:
            raise ValueError(f"tokens='patch' needs tokens after the {self.num_prefix_tokens} prefix token(s), got "
                             f"{x.shape[1]}")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled, normalised features `(B, F)` from tokens `(B, N, D)`."""
        self._check_tokens(x)
        return self.norm(self.pool(_split_tokens(x, self.num_prefix_tokens, self.tokens)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """The pooling's attention probabilities over the tokens it sees (attentive probes only)."""
        if not hasattr(self.pool, "attention_map"):
            raise NotImplementedError(f"{type(self.pool).__name__} does not attend")
        return self.pool.attention_map(_split_tokens(x, self.num_prefix_tokens, self.tokens))


class LinearProbe(ProbeHead):
    """Linear probing: CLS token or mean of patch tokens, BN (no affine), Linear.

    Args:
        dim: token width D.
        num_classes: classifier outputs.
        pool: "cls" (the prefix token(s)) or "mean" (average of the patch tokens).
        num_prefix_tokens: leading prefix tokens in the input.
    """

    def __init__(self, dim: int, num_classes: int, pool: str = "cls", num_prefix_tokens: int = 1,
                 device=None, dtype=None):
        super().__init__(TokenPool(pool, num_prefix_tokens), dim, num_classes, num_prefix_tokens=0, tokens="all",
                         device=device, dtype=dtype, in_dim=dim)
        self.num_prefix_tokens = num_prefix_tokens


class AttentiveProbe(ProbeHead):
    """AIM-style attentive probe: multi-head cross-attention pooling with learnable queries, BN, Linear.

    Args:
        dim: token width D.
        num_classes: classifier outputs.
        num_heads: attention heads (AIM/EP's comparison uses 12 on ViT-B).
        num_queries: learnable queries (averaged after pooling).
        num_prefix_tokens: leading prefix tokens in the input.
        tokens: "patch" or "all" (include the prefix tokens).
    """

    def __init__(self, dim: int, num_classes: int, num_heads: int = 12, num_queries: int = 1,
                 qkv_bias: bool = False, num_prefix_tokens: int = 0, tokens: str = "patch", device=None,
                 dtype=None):
        pool = AttentionPool(dim, num_heads, num_queries, qkv_bias, device=device, dtype=dtype)
        super().__init__(pool, dim, num_classes, num_prefix_tokens, tokens, device=device, dtype=dtype, in_dim=dim)


class CrossAttentionProbe(ProbeHead):
    """V-JEPA / DINOv2-style attentive probe: a cross-attention block (query, LN, Q/KV/out projections, MLP),
    BN, Linear.

    Args:
        dim: token width D.
        num_classes: classifier outputs.
        num_heads: attention heads.
        num_queries: learnable queries (averaged; V-JEPA uses 1).
        mlp_ratio: MLP hidden width over D.
        num_prefix_tokens: leading prefix tokens in the input.
        tokens: "patch" or "all".
    """

    def __init__(self, dim: int, num_classes: int, num_heads: int = 12, num_queries: int = 1,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, num_prefix_tokens: int = 0, tokens: str = "patch",
                 device=None, dtype=None):
        pool = CrossAttentionPool(dim, num_heads, num_queries, mlp_ratio, qkv_bias, device=device, dtype=dtype)
        super().__init__(pool, dim, num_classes, num_prefix_tokens, tokens, device=device, dtype=dtype, in_dim=dim)


class EfficientProbe(ProbeHead):
    """Efficient Probing (EP): M learnable queries without Q/K projections, one value projection split
    channel-wise into M chunks, concatenated outputs; BN, Linear.

    Parameters: `M·D + D²/d_out` in the pooling plus `(D/d_out)·C + C` in the classifier (ViT-B, M=32:
    0.61M + 0.77M at C=1000).

    Args:
        dim: token width D.
        num_classes: classifier outputs.
        num_queries: M (32 in the paper; 8 and 16 also studied).
        d_out: width reduction of the value projection (1 in the paper's default).
        num_prefix_tokens: leading prefix tokens in the input.
        tokens: "patch" (EP) or "all" (the reference's `ep_all`, CLS included).
    """

    def __init__(self, dim: int, num_classes: int, num_queries: int = 32, d_out: int = 1,
                 num_prefix_tokens: int = 0, tokens: str = "patch", device=None, dtype=None):
        pool = EfficientProbingPool(dim, num_queries, d_out, device=device, dtype=dtype)
        super().__init__(pool, pool.out_dim, num_classes, num_prefix_tokens, tokens, device=device, dtype=dtype,
                         in_dim=dim)


PROBES: Dict[str, Type[ProbeHead]] = {
    "linear": LinearProbe,
    "aim": AttentiveProbe,
    "jepa": CrossAttentionProbe,
    "ep": EfficientProbe,
}


def list_probes():
    """Names accepted by `create_probe`."""
    return sorted(PROBES)


def create_probe(name: str, dim: int, num_classes: int, num_prefix_tokens: Optional[int] = None,
                 **kwargs) -> ProbeHead:
    """Build a probe by name.

    Args:
        name: "linear", "aim", "jepa" or "ep" (see `list_probes()`).
        dim: token width D of the encoder.
        num_classes: classifier outputs.
        num_prefix_tokens: leading prefix (CLS/register) tokens in the encoder's token output; None keeps the
            probe's own default (the attentive probes and EP: 0, every token is a patch token, as the paper's
            `(B, N, D)` input; linear: 1, the CLS token its default `pool="cls"` reads).
        **kwargs: the probe's own arguments (`pool`, `num_heads`, `num_queries`, `d_out`, `tokens`, ...).
    """
    if name not in PROBES:
        raise ValueError(f"probe name must be one of {list_probes()}, got {name!r}")
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    if num_prefix_tokens is not None:
        kwargs["num_prefix_tokens"] = num_prefix_tokens
    return PROBES[name](dim, num_classes, **kwargs)
