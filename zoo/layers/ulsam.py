"""ULSAM: Ultra-Lightweight Subspace Attention Module (Saini, Jha, Das, Mittal, Mohan; WACV 2020,
arXiv 2006.15102), after the reference code Nandan91/ULSAM (`ulsam.py`, read, not copied).

The C channels are split into g subspaces of G = C/g channels. Each subspace F_n gets one spatial attention map

    a_n = softmax over h·w of PW_{G→1}(MaxPool3×3,s1,p1(DW1×1(F_n))),   out_n = a_n ⊙ F_n + F_n

(a_n broadcast over the G channels), and the g outputs are concatenated. The paper's figure has no
normalisation; the reference code puts BatchNorm + ReLU after both the depthwise and the pointwise conv.

Here the g subspaces run as one vectorised module: the depthwise 1×1 conv is per channel anyway, and a grouped
1×1 conv with g groups gives each subspace its own G→1 pointwise conv; BatchNorm is per channel, so one BN over
C (or g) channels equals the reference's g separate BNs. In the BN form the convs have no bias (BN removes a
constant shift, so a bias there only adds parameters). The reference's `BatchNorm2d(momentum=0.9)` makes the
running statistics follow the last batch almost entirely in PyTorch's convention (likely a TF-convention slip);
the default here is PyTorch's 0.1, settable with `bn_momentum`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ULSAM"]


class ULSAM(nn.Module):
    """Subspace attention: one softmax-over-space map per channel group, applied as `a ⊙ x + x`.

    Args:
        dim: input (and output) channels C; `C % num_subspaces == 0`.
        num_subspaces: g, the number of channel groups (the paper's default for MobileNets is 4).
        norm_act: True (default) uses the reference code's form, BatchNorm + ReLU after the depthwise and the
            pointwise conv; False gives the paper's plain form (convs with bias, no normalisation).
        bn_momentum: BatchNorm momentum (PyTorch convention) in the `norm_act` form.
        device, dtype: factory kwargs for the parameters.
    """

    def __init__(self, dim: int, num_subspaces: int = 4, norm_act: bool = True, bn_momentum: float = 0.1,
                 device=None, dtype=None):
        super().__init__()
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if not isinstance(num_subspaces, int) or num_subspaces < 1 or dim % num_subspaces:
            raise ValueError(f"num_subspaces must be a positive divisor of dim={dim}, got {num_subspaces!r}")
        dd = dict(device=device, dtype=dtype)
        self.dim = dim
        self.num_subspaces = num_subspaces
        self.norm_act = norm_act
        self.dw = nn.Conv2d(dim, dim, 1, groups=dim, bias=not norm_act, **dd)
        self.dw_bn = nn.BatchNorm2d(dim, momentum=bn_momentum, **dd) if norm_act else nn.Identity()
        self.pw = nn.Conv2d(dim, num_subspaces, 1, groups=num_subspaces, bias=not norm_act, **dd)
        self.pw_bn = nn.BatchNorm2d(num_subspaces, momentum=bn_momentum, **dd) if norm_act else nn.Identity()
        self.act = nn.ReLU() if norm_act else nn.Identity()

    def attention_maps(self, x: torch.Tensor) -> torch.Tensor:
        """The g maps `(B, g, H, W)`, each summing to one over H·W."""
        B, _, H, W = x.shape
        a = self.act(self.dw_bn(self.dw(x)))
        a = F.max_pool2d(a, kernel_size=3, stride=1, padding=1)
        a = self.act(self.pw_bn(self.pw(a)))  # (B, g, H, W)
        return a.flatten(2).softmax(dim=-1).view(B, self.num_subspaces, H, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attention_maps(x)
        a = a.repeat_interleave(self.dim // self.num_subspaces, dim=1)  # (B, C, H, W): map n over subspace n
        return x * a + x
