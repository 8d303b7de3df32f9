"""Multi-head self-attention over `kernels.attention`."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

import kernels


class Attention(nn.Module):
    """timm-style multi-head self-attention whose core is `kernels.attention`.

    Args:
        dim: token width.
        num_heads: attention heads; `dim % num_heads == 0`.
        qkv_bias: bias on the fused qkv projection.
        qk_norm: LayerNorm on q and k per head.
        proj_drop: dropout after the output projection.
        pattern: a `kernels` pattern (None: dense).
        device, dtype: factory kwargs for the parameters.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_norm: bool = False,
                 proj_drop: float = 0.0, pattern: Optional[kernels.Pattern] = None, device=None, dtype=None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        dd = dict(device=device, dtype=dtype)
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.pattern = pattern
        self.backend: Optional[str] = None  # None: kernels picks; "reference" forces the explicit path
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.q_norm = nn.LayerNorm(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, N, hd)
        q, k = self.q_norm(q), self.k_norm(k)
        x = kernels.attention(q, k, v, pattern=self.pattern, backend=self.backend)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))
