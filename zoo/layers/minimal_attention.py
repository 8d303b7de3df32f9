"""Reduced self-attention of "Reducing the Transformer Architecture to a Minimum" (Bermeitinger et al.,
KDIR 2024, arXiv 2410.13732).

The paper shrinks a ViT encoder's attention step by step:

- `qk="full"`: standard `softmax(x W_q (x W_k)ᵀ · s) x W_v W_o` (4 N² per layer).
- `qk="collapsed"` (*Wqk*): `W_k = I`, `W_q := W_qk`, so the similarity is `x_i W_qk x_jᵀ` (one N² matrix).
- `qk="symmetric"`: `W_qk = T Tᵀ` with T lower triangular (N(N+1)/2 parameters), so the similarity of
  token i to j equals that of j to i and is never negative for a token with itself.
- `value_proj=False` (*noWv/Wo*): `W_v = W_o = I`, so each output token is a convex combination of the
  input tokens.

Every form runs through `kernels.attention`: collapsed forms pass `q = x W_qk`, `k = x`, `v = x` (per head
slice), the symmetric form `q = k = x T` (then `q kᵀ = x T Tᵀ xᵀ`), always with the scale `head_dim^-0.5`
passed explicitly.

With several heads the collapsed forms work on head slices of the embedding (`W_k = I` split into heads):
head h compares `(x W_qk)[:, h]` with `x[:, h]`, and without value projection returns a convex combination of
the `x[:, h]`. The paper defines the collapsed forms for one head, where this is exactly its formula.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

import kernels
from kernels.patterns import outside_inference_mode

__all__ = ["MinimalAttention"]

_QK_MODES = ("full", "collapsed", "symmetric", "tied")


class MinimalAttention(nn.Module):
    """Self-attention with optionally collapsed, symmetric query-key and omitted value/output matrices.

    Args:
        dim: token width N.
        num_heads: attention heads; `dim % num_heads == 0`. The paper's collapsed variants use one head.
        qk: "full" (W_q, W_k), "collapsed" (one W_qk, keys are the inputs), "symmetric" (W_qk = T Tᵀ per head,
            T lower triangular) or "tied" (the paper's other symmetric form, W_k := W_q: keys are the queries).
        value_proj: keep W_v and W_o; False gives the paper's noWv/Wo form (values are the inputs).
        qkv_bias: bias on the query/key/value projections (the Keras layers of the paper have biases); the
            symmetric form has none (a bias would break the symmetry), nor has the collapsed W_qk; the tied form
            keeps it (q = k, so the logits stay symmetric).
        proj_drop: dropout after the output projection.
        device, dtype: factory kwargs for the parameters.
    """

    def __init__(self, dim: int, num_heads: int = 1, qk: str = "full", value_proj: bool = True,
                 qkv_bias: bool = True, proj_drop: float = 0.0, device=None, dtype=None):
        super().__init__()
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if not isinstance(num_heads, int) or num_heads < 1 or dim % num_heads:
            raise ValueError(f"num_heads must be a positive divisor of dim={dim}, got {num_heads!r}")
        if qk not in _QK_MODES:
            raise ValueError(f"qk must be one of {_QK_MODES}, got {qk!r}")
        dd = dict(device=device, dtype=dtype)
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qk_mode = qk
        self.value_proj = value_proj
        self.backend: Optional[str] = None  # None: kernels picks; "reference" forces the explicit path

        if qk == "full":
            self.q = nn.Linear(dim, dim, bias=qkv_bias, **dd)
            self.k = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        elif qk == "tied":  # W_k := W_q
            self.q = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        elif qk == "collapsed":  # logits x_i W_qk x_jᵀ: no bias (a bias b would add b·x_j, a per-key term)
            self.qk = nn.Linear(dim, dim, bias=False, **dd)
        else:
            n_tril = self.head_dim * (self.head_dim + 1) // 2
            self.qk_tril = nn.Parameter(torch.empty(num_heads, n_tril, **dd))  # free entries of each T
        if value_proj:
            self.v = nn.Linear(dim, dim, bias=qkv_bias, **dd)
            self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.qk_mode == "symmetric":
            # T Tᵀ then has O(1) entries, like W_q W_kᵀ of unit-variance projections.
            nn.init.trunc_normal_(self.qk_tril, std=self.head_dim ** -0.5)

    def tril_factor(self) -> torch.Tensor:
        """The lower-triangular factors T `(H, hd, hd)` of the symmetric form."""
        if self.qk_mode != "symmetric":
            raise ValueError(f"tril_factor() needs qk='symmetric', this module has qk={self.qk_mode!r}")
        hd = self.head_dim
        t = self.qk_tril.new_zeros(self.num_heads, hd * hd)
        t = t.index_copy(1, self._tril_index(t.device), self.qk_tril)
        return t.view(self.num_heads, hd, hd)

    def _tril_index(self, device: torch.device) -> torch.Tensor:
        """Flat positions of the lower triangle, per device. Not a buffer: a model built on the meta device and
        filled by `load_state_dict` would keep a non-persistent buffer's garbage."""
        cache = self.__dict__.setdefault("_tril_cache", {})
        if device not in cache:  # not an inference tensor, which index_copy's backward could not save
            def flat_positions():
                rows, cols = torch.tril_indices(self.head_dim, self.head_dim, device=device)
                return rows * self.head_dim + cols
            cache[device] = outside_inference_mode(flat_positions)
        return cache[device]

    def qk_matrix(self) -> torch.Tensor:
        """The per-head similarity matrix W_qk `(H, hd, hd)` of the symmetric form (T Tᵀ)."""
        t = self.tril_factor()
        return t @ t.transpose(-1, -2)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        return x.view(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, hd)

    def qkv(self, x: torch.Tensor):
        """The q, k, v `(B, H, N, hd)` handed to `kernels.attention` for tokens `x (B, N, C)`."""
        xh = self._heads(x)
        if self.qk_mode == "full":
            q, k = self._heads(self.q(x)), self._heads(self.k(x))
        elif self.qk_mode == "tied":
            q = k = self._heads(self.q(x))
        elif self.qk_mode == "collapsed":
            q, k = self._heads(self.qk(x)), xh  # W_k = I
        else:
            q = k = torch.matmul(xh, self.tril_factor())  # x T, so q kᵀ = x T Tᵀ xᵀ
        v = self._heads(self.v(x)) if self.value_proj else xh  # W_v = I when omitted
        return q, k, v

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-softmax similarities `(B, H, N, N)` (explicit; for analysis and tests)."""
        q, k, _ = self.qkv(x)
        return torch.matmul(q, k.transpose(-1, -2)) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x)
        x = kernels.attention(q, k, v, scale=self.scale, backend=self.backend)  # (B, H, N, hd)
        x = x.transpose(1, 2).reshape(B, N, C)
        if self.value_proj:
            x = self.proj(x)  # W_o = I when omitted
        return self.proj_drop(x)
