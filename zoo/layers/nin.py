"""The Network-in-Network block of NiNformer (arXiv 2403.02411; Neural Computing and Applications 2025),
after the reference code Abdullah-88/NiNformer (`ninformer.py`, read, not copied).

NiNformer replaces self-attention with a dynamic element-wise gate: an MLP-Mixer block (token mixing over the
N tokens, then channel mixing, each with its own LayerNorm and residual) computed from the tokens, multiplied
element-wise with a linear projection of the same tokens:

    MGU(x) = Linear(x) ⊙ MixerBlock(x)
    x = x + MGU(LN(x));  x = x + FFN(LN(x))        (one LayerNorm instance used twice, as in the reference)

The token-mixing MLP has weights over the token axis, so a block is built for a fixed number of tokens.
"""
from __future__ import annotations

import torch
from timm.layers import DropPath, Mlp
from torch import nn

from .checks import check_positive_ints

__all__ = ["MixerBlock", "MixerGatingUnit", "NiNBlock"]


class MixerBlock(nn.Module):
    """MLP-Mixer block: token-mixing MLP over N, then channel-mixing MLP over C, each pre-norm residual.

    Args:
        dim: token width C.
        num_tokens: sequence length N the token MLP is built for.
        token_hidden: hidden width of the token-mixing MLP.
        channel_hidden: hidden width of the channel-mixing MLP.
        act_layer: MLP activation.
        drop: dropout inside both MLPs (after the activation and after the output, as in the reference).
        device, dtype: factory kwargs for the parameters.
    """

    def __init__(self, dim: int, num_tokens: int, token_hidden: int, channel_hidden: int,
                 act_layer=nn.GELU, drop: float = 0.0, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.norm1 = nn.LayerNorm(dim, **dd)
        self.mlp_tokens = Mlp(num_tokens, token_hidden, act_layer=act_layer, drop=drop, **dd)
        self.norm2 = nn.LayerNorm(dim, **dd)
        self.mlp_channels = Mlp(dim, channel_hidden, act_layer=act_layer, drop=drop, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, C)
        x = x + self.mlp_tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        x = x + self.mlp_channels(self.norm2(x))
        return x


class MixerGatingUnit(nn.Module):
    """`proj(x) ⊙ MixerBlock(x)`: the element-wise gate that takes attention's place.

    Args:
        dim: token width C.
        num_tokens: sequence length N.
        token_hidden: hidden width of the Mixer's token MLP.
        channel_hidden: hidden width of the Mixer's channel MLP.
        act_layer: MLP activation.
        drop: dropout inside the Mixer's MLPs.
        device, dtype: factory kwargs for the parameters.
    """

    def __init__(self, dim: int, num_tokens: int, token_hidden: int, channel_hidden: int,
                 act_layer=nn.GELU, drop: float = 0.0, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.mixer = MixerBlock(dim, num_tokens, token_hidden, channel_hidden, act_layer, drop, **dd)
        self.proj = nn.Linear(dim, dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) * self.mixer(x)


class NiNBlock(nn.Module):
    """NiNformer block: `x + MGU(LN(x))`, then `x + FFN(LN(x))` with the same LayerNorm.

    Args:
        dim: token width C (d_model).
        num_tokens: sequence length N.
        ffn_dim: hidden width d_ffn of the FFN and of both Mixer MLPs (the reference ties them).
        act_layer: MLP activation.
        drop: dropout inside the MLPs (the reference trains CIFAR-10 with 0.5).
        drop_path: stochastic depth on both residual branches (0 in the reference).
        device, dtype: factory kwargs for the parameters.
    """

    def __init__(self, dim: int, num_tokens: int, ffn_dim: int, act_layer=nn.GELU, drop: float = 0.0,
                 drop_path: float = 0.0, device=None, dtype=None):
        super().__init__()
        check_positive_ints(dim=dim, num_tokens=num_tokens, ffn_dim=ffn_dim)
        dd = dict(device=device, dtype=dtype)
        self.norm = nn.LayerNorm(dim, **dd)  # shared by both branches, as in the reference
        self.mgu = MixerGatingUnit(dim, num_tokens, ffn_dim, ffn_dim, act_layer, drop, **dd)
        self.ffn = Mlp(dim, ffn_dim, act_layer=act_layer, drop=drop, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.mgu(self.norm(x)))
        x = x + self.drop_path(self.ffn(self.norm(x)))
        return x
