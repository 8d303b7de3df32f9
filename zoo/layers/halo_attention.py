"""Halo attention: HaloNet's blocked local self-attention over `kernels.attention`.

Paper: `Scaling Local Self-Attention for Parameter Efficient Visual Backbones`, Vaswani et al., CVPR 2021
(arXiv:2103.12731). There is no official code; the layout (weights, relative-position index, strided queries)
follows timm's `HaloAttn` (huggingface/pytorch-image-models, `timm/layers/halo_attn.py`, Apache-2.0) so that
timm checkpoints load strictly and give the same outputs. The implementation here is independent: it lays the
problem out as blocked dense attention and calls the kernel core.

Layout: the feature map is cut into non-overlapping `block x block` query blocks (`block / stride` after query
subsampling); each block attends to its `win x win` window, `win = block + 2 * halo`, taken from the keys and
values zero-padded by `halo` on every side. As batched dense attention that is

    q (B * nblocks, heads, qb * qb, dqk)  vs  k, v (B * nblocks, heads, win * win, dqk | dv)

plus the relative-position logits `q . R_h[ky - qy + win - 1] + q . R_w[kx - qx + win - 1]` (unscaled, timm's
index: (qy, qx) in the query block, (ky, kx) in the window). They reach the kernel in one of three exact forms
(`HaloAttention.rel_pos_mode`): "relpos" (default) passes the per-axis tables as a `kernels.RelPosBias`, which
the Triton path computes inside the kernels (the general ones, or the few-keys ones for <= 256 keys at head dims
<= 64 and <= 64 keys at <= 128, whichever tunes faster; windows up to 32); "fold" appends the per-axis logits to
q and one-hot window coordinates to k (`halo_rel_pos_factors`: 2 * win extra channels), so the attention is plain
dense attention; "bias" passes them as a dense additive bias (`halo_rel_pos_bias`). The last two come from one
function, `_rel_logits_per_axis`. (The `kernels.Halo` pattern over the whole padded key grid describes the same
visibility, but its relative logits would be a dense `(N, N_keys)` bias per head; the blocked layout keeps
everything at window size.)

Any size: timm asserts `H % block == 0`; here the map is zero-padded at the bottom/right to whole blocks
(padded keys/values are zeros, exactly like the halo) and the output is cropped, so the result is identical to
timm wherever timm runs, and defined everywhere else.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from timm.layers import make_divisible, trunc_normal_
from torch import nn

import kernels

from .checks import check_positive_ints

__all__ = ["HaloAttention", "HaloRelPosEmbed", "halo_rel_pos_bias", "halo_rel_pos_factors", "halo_rel_index"]


REL_POS_MODES = ("fold", "relpos", "bias")


def halo_rel_index(query_block: int, win: int, device=None) -> torch.Tensor:
    """`(query_block, win)` index into a `(2 win - 1)` relative table: `k - q + win - 1` (timm's HaloAttn)."""
    q = torch.arange(query_block, device=device)
    k = torch.arange(win, device=device)
    return k[None, :] - q[:, None] + (win - 1)


def _rel_logits_per_axis(q, height_rel, width_rel, win):
    """`(..., qb, qb, win)` twice: `q . height_rel[ky - qy + win - 1]` over ky and `q . width_rel[kx - qx + ...]`."""
    qb = q.shape[-2]
    idx = halo_rel_index(qb, win, q.device)  # (qb, win)
    rows = torch.arange(qb, device=q.device)
    rel_h = torch.matmul(q, height_rel.transpose(0, 1))  # (..., qy, qx, 2win-1)
    rel_w = torch.matmul(q, width_rel.transpose(0, 1))
    rel_h = rel_h[..., rows[:, None, None], rows[None, :, None], idx[:, None, :]]  # (..., qy, qx, ky)
    rel_w = rel_w[..., rows[:, None, None], rows[None, :, None], idx[None, :, :]]  # (..., qy, qx, kx)
    return rel_h, rel_w


def halo_rel_pos_bias(q: torch.Tensor, height_rel: torch.Tensor, width_rel: torch.Tensor, win: int) -> torch.Tensor:
    """Relative-position logits of HaloNet as a dense bias.

    Args:
        q: blocked queries `(..., qb, qb, D)` (row, column inside the query block).
        height_rel, width_rel: per-axis tables `(2 * win - 1, D)`.
        win: key window size per axis.

    Returns:
        `(..., qb * qb, win * win)`: `q . height_rel[ky - qy + win - 1] + q . width_rel[kx - qx + win - 1]`.
    """
    rel_h, rel_w = _rel_logits_per_axis(q, height_rel, width_rel, win)
    bias = rel_h[..., :, None] + rel_w[..., None, :]  # (..., qy, qx, ky, kx)
    return bias.flatten(-4, -3).flatten(-2, -1)


def halo_rel_pos_factors(q: torch.Tensor, height_rel: torch.Tensor, width_rel: torch.Tensor, win: int):
    """The same logits as rank-`2 win` factors: `halo_rel_pos_bias(...) == q_rel @ k_rel.T`.

    `q_rel (..., qb * qb, 2 win)` holds the per-axis relative logits of each query; `k_rel (win * win, 2 win)` is
    the one-hot of each key's (row, column) in the window. Appending them to q and k as extra channels folds the
    bias into `q . k` exactly, so the attention runs bias-free (FlashBias' low-rank form).
    """
    rel_h, rel_w = _rel_logits_per_axis(q, height_rel, width_rel, win)
    q_rel = torch.cat([rel_h, rel_w], dim=-1).flatten(-3, -2)
    eye = torch.eye(win, device=q.device, dtype=q.dtype)
    k_rel = torch.cat([eye.repeat_interleave(win, dim=0), eye.repeat(win, 1)], dim=-1)  # row ky*win+kx
    return q_rel, k_rel


class HaloRelPosEmbed(nn.Module):
    """Factorized relative-position tables of a halo layer, shared by heads and blocks."""

    def __init__(self, win: int, dim_head: int, device=None, dtype=None):
        super().__init__()
        self.win = win
        self.height_rel = nn.Parameter(torch.empty(2 * win - 1, dim_head, device=device, dtype=dtype))
        self.width_rel = nn.Parameter(torch.empty(2 * win - 1, dim_head, device=device, dtype=dtype))

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return halo_rel_pos_bias(q, self.height_rel, self.width_rel, self.win)

    def factors(self, q: torch.Tensor):
        return halo_rel_pos_factors(q, self.height_rel, self.width_rel, self.win)


class HaloAttention(nn.Module):
    """HaloNet's blocked local self-attention, weight- and output-compatible with timm's `HaloAttn`.

    Args:
        dim: input channels.
        dim_out: output channels (the value width); None means `dim`. There is no output projection.
        feat_size: accepted for compatibility with timm's self-attention factory; unused (any size works).
        stride: 1 or 2. With stride 2 and `block % 2 == 0` (and not `avg_down`) queries are subsampled
            (a `block/2` query block attends the same window); otherwise the output is average-pooled.
        num_heads: attention heads; `dim_out % num_heads == 0`.
        dim_head: query/key width per head; None means `make_divisible(dim_out * qk_ratio, 8) // num_heads`.
        block_size: query block size `b` (full resolution).
        halo_size: halo `h` around each block; the key window is `b + 2h` per axis.
        qk_ratio: query/key width relative to `dim_out` when `dim_head` is None.
        qkv_bias: bias on the query and key/value projections.
        avg_down: downsample by average pooling instead of strided queries.
        scale_pos_embed: scale the relative logits by `dim_head ** -0.5` too (timm's option; off by default).
        rel_pos_mode: how the relative logits reach the kernel: "relpos" (default) passes the tables as a
            factorized `kernels.RelPosBias` (computed inside the Triton kernel on this blocked layout; H200:
            the attention forward 1.9x faster than "fold"); "fold" appends them to q and k as `2 * win` extra
            channels (`halo_rel_pos_factors`; exact, bias-free); "bias" passes them as a dense additive bias
            (`halo_rel_pos_bias`). Also settable as an attribute.
        device, dtype: factory kwargs for the parameters.
    """

    def __init__(
            self,
            dim: int,
            dim_out: Optional[int] = None,
            feat_size: Optional[Tuple[int, int]] = None,
            stride: int = 1,
            num_heads: int = 8,
            dim_head: Optional[int] = None,
            block_size: int = 8,
            halo_size: int = 3,
            qk_ratio: float = 1.0,
            qkv_bias: bool = False,
            avg_down: bool = False,
            scale_pos_embed: bool = False,
            rel_pos_mode: str = "relpos",
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        dim_out = dim_out or dim
        check_positive_ints("HaloAttention: ", dim=dim, dim_out=dim_out, num_heads=num_heads, block_size=block_size)
        if not isinstance(halo_size, int) or halo_size < 0:
            raise ValueError(f"HaloAttention: halo_size must be an int >= 0, got {halo_size!r}")
        if dim_out % num_heads:
            raise ValueError(f"HaloAttention: dim_out ({dim_out}) must be divisible by num_heads ({num_heads})")
        if stride not in (1, 2):
            raise ValueError(f"HaloAttention: stride must be 1 or 2, got {stride!r}")
        if rel_pos_mode not in REL_POS_MODES:
            raise ValueError(f"HaloAttention: rel_pos_mode must be one of {REL_POS_MODES}, got {rel_pos_mode!r}")
        self.num_heads = num_heads
        self.dim_head_qk = dim_head or make_divisible(dim_out * qk_ratio, divisor=8) // num_heads
        self.dim_head_v = dim_out // num_heads
        self.dim_out_qk = num_heads * self.dim_head_qk
        self.dim_out_v = num_heads * self.dim_head_v
        self.scale = self.dim_head_qk ** -0.5
        self.scale_pos_embed = scale_pos_embed
        self.block_size = block_size
        self.halo_size = halo_size
        self.win_size = block_size + 2 * halo_size
        use_avg_pool = stride > 1 and (avg_down or block_size % stride != 0)
        self.block_stride = stride if stride > 1 and not use_avg_pool else 1
        self.block_size_ds = block_size // self.block_stride  # query block after subsampling
        self.rel_pos_mode = rel_pos_mode
        self.backend: Optional[str] = None  # None: kernels picks; "reference" forces the explicit path

        self.q = nn.Conv2d(dim, self.dim_out_qk, 1, stride=self.block_stride, bias=qkv_bias, **dd)
        self.kv = nn.Conv2d(dim, self.dim_out_qk + self.dim_out_v, 1, bias=qkv_bias, **dd)  # per head [k_h | v_h]
        self.pos_embed = HaloRelPosEmbed(self.win_size, self.dim_head_qk, **dd)
        # timm's floor-mode pool (odd maps lose their last row/column here, as in timm)
        self.pool = nn.AvgPool2d(2, 2) if use_avg_pool else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self):
        std = self.q.weight.shape[1] ** -0.5  # fan-in
        trunc_normal_(self.q.weight, std=std)
        trunc_normal_(self.kv.weight, std=std)
        trunc_normal_(self.pos_embed.height_rel, std=self.scale)
        trunc_normal_(self.pos_embed.width_rel, std=self.scale)

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, dim_head_qk={self.dim_head_qk}, dim_head_v={self.dim_head_v}, "
                f"block={self.block_size}, halo={self.halo_size}, block_stride={self.block_stride}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        b, h, win, qb, heads = self.block_size, self.halo_size, self.win_size, self.block_size_ds, self.num_heads
        nh, nw = -(-H // b), -(-W // b)  # blocks per axis, the map rounded up to whole blocks
        dqk, dv = self.dim_head_qk, self.dim_head_v

        # Layouts are built from the channels-last (B, H, W, C) view of the 1x1-conv outputs: for a channels_last
        # model each of q, k/v and the output takes one gather copy (timm's NCHW layout code takes two for q and
        # for the 3x-expanded halo'd k/v); for NCHW input the first reshape copies, as before.
        q = self.q(x).permute(0, 2, 3, 1)  # (B, ceil(H / s), ceil(W / s), heads * dqk)
        out_h, out_w = q.shape[1:3]
        if (nh * qb, nw * qb) != (out_h, out_w):
            q = F.pad(q, [0, 0, 0, nw * qb - out_w, 0, nh * qb - out_h])
        q = q.reshape(B, nh, qb, nw, qb, heads, dqk).permute(0, 1, 3, 5, 2, 4, 6)  # (B, nh, nw, heads, qb, qb, dqk)
        q = q.reshape(B * nh * nw, heads, qb, qb, dqk)

        kv = self.kv(x).permute(0, 2, 3, 1)  # (B, H, W, heads * (dqk + dv))
        kv = F.pad(kv, [0, 0, h, h + nw * b - W, h, h + nh * b - H])  # halo + round-up, zeros
        kv = kv.unfold(1, win, b).unfold(2, win, b)  # (B, nh, nw, C, win, win), a view
        kv = kv.permute(0, 1, 2, 4, 5, 3).reshape(B * nh * nw, win * win, heads, dqk + dv)  # the halo gather
        k, v = kv.transpose(1, 2).split([dqk, dv], dim=-1)  # (B * nblocks, heads, win * win, d), views

        rel_scale = self.scale if self.scale_pos_embed else 1.0
        if self.rel_pos_mode == "fold":
            q_rel, k_rel = self.pos_embed.factors(q)  # (B * nblocks, heads, qb * qb, 2 win), (win * win, 2 win)
            q = torch.cat([q.reshape(B * nh * nw, heads, qb * qb, dqk) * self.scale, q_rel * rel_scale], dim=-1)
            k = torch.cat([k, k_rel.expand(B * nh * nw, heads, -1, -1)], dim=-1)
            out = kernels.attention(q, k, v, scale=1.0, backend=self.backend)
        elif self.rel_pos_mode == "relpos":
            rel = kernels.RelPosBias(kernels.Halo((qb, qb), b, h, self.block_stride),
                                     (self.pos_embed.height_rel, self.pos_embed.width_rel), scale=rel_scale)
            out = kernels.attention(q.reshape(B * nh * nw, heads, qb * qb, dqk), k, v, bias=rel, scale=self.scale,
                                    backend=self.backend)
        else:
            bias = self.pos_embed(q) * rel_scale  # (B * nblocks, heads, qb * qb, win * win)
            out = kernels.attention(q.reshape(B * nh * nw, heads, qb * qb, dqk), k, v, bias=bias, scale=self.scale,
                                    backend=self.backend)
        # out: (B * nblocks, heads, qb * qb, dv)

        out = out.reshape(B, nh, nw, heads, qb, qb, dv).permute(0, 1, 4, 2, 5, 3, 6)  # (B, nh, qb, nw, qb, heads, dv)
        out = out.reshape(B, nh * qb, nw * qb, heads * dv)[:, :out_h, :out_w]
        return self.pool(out.permute(0, 3, 1, 2))  # (B, heads * dv, H', W') with channels_last strides
