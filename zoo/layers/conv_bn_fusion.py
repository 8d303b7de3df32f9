"""Inference-time Conv → BatchNorm → ReLU fusion for timm's ResNet-style blocks (`ConvNormAct`,
`BottleneckBlock`, `SelfAttnBlock`).

Why: in eval mode a BatchNorm is a per-channel affine map, so it folds into the conv's weight and a bias
(w' = w·γ/√(σ²+ε), b' = β − μ·γ/√(σ²+ε)). On CUDA, cuDNN's fused `conv + bias + ReLU` and `conv + bias + residual
+ ReLU` kernels then apply the bias, the activation and the block's residual add in the conv's epilogue. timm runs
each of them as its own pass over the activations: on an H200 (bf16, channels_last, batch 256) the BatchNorm,
ReLU and add kernels were ~60% of `halonet26t`'s inference GPU time. A folded conv followed by a separate bias or
activation pass is slower than timm's path, so only convs whose output goes through a ReLU are fused.

When: a module and its conv-norm children in eval mode, without autograd (`torch.no_grad()` /
`torch.inference_mode()`), outside `torch.compile` and `torch.jit` tracing, with `fused_inference` true (the
default; `set_fused_inference(model, False)` turns it off). Anything else (training, norms in training mode,
gradients, SiLU blocks, anti-aliasing, `Conv2dSame` padding, non-affine norms) runs timm's own forward. Folded
weights are cached per module and recomputed when a parameter or running statistic changes (its storage or in-place version counter: `load_state_dict`, optimizer steps; a training-mode
forward counts through `num_batches_tracked`), or the dtype or eps changes; `train()` clears them. Writes through
`param.data` bypass the version counter: call `model.train().eval()` after them.

The result equals timm's forward up to rounding: exact in float32 to ~1e-6; under bf16 autocast the folded weights
are rounded once to bf16 where timm rounds the conv output before the norm.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import BatchNormAct2d, ConvNormAct
from timm.models.byobnet import BottleneckBlock, SelfAttnBlock

from kernels.backends.reference import autocast_dtype

from .cache import swap_classes, version_key

__all__ = ["FusedConvNormAct", "FusedBottleneckBlock", "FusedSelfAttnBlock", "enable_fused_inference",
           "set_fused_inference"]


def _fusable(cna: nn.Module) -> bool:
    """A `ConvNormAct` whose conv and norm fold: a plain zero-padded `nn.Conv2d`, an affine `BatchNormAct2d` with
    running statistics and no dropout, no anti-aliasing."""
    if not isinstance(cna, ConvNormAct) or type(cna.conv) is not nn.Conv2d or getattr(cna, "aa", None) is not None:
        return False
    conv, bn = cna.conv, cna.bn
    return (conv.padding_mode == "zeros" and not isinstance(conv.padding, str) and isinstance(bn, BatchNormAct2d)
            and bn.affine and bn.running_var is not None and isinstance(bn.drop, nn.Identity)
            and not cna.training and not bn.training)


def _relu(module: Optional[nn.Module]) -> bool:
    return isinstance(module, nn.ReLU)


def _active(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether this call may take the fused path (inference without autograd; see the module docstring)."""
    return (getattr(module, "fused_inference", True) and not module.training and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling() and not torch.jit.is_tracing() and not torch.jit.is_scripting()
            and x.dim() == 4 and x.is_floating_point())


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return autocast_dtype(x) or x.dtype


def folded_conv_bn(cna: ConvNormAct, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """`cna`'s conv weight and bias with its BatchNorm folded in, in `dtype` (folded in float32, or float64 for
    float64), cached on the module until a parameter or statistic changes."""
    conv, bn = cna.conv, cna.bn
    tensors = [t for t in (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                           bn.num_batches_tracked) if t is not None]
    versions = version_key(tensors)
    key = None if versions is None else versions + (dtype, bn.eps)
    cached = cna.__dict__.get("_folded")
    if key is None or cached is None or cached[0] != key:
        fold = torch.float64 if dtype == torch.float64 else torch.float32
        scale = bn.weight.to(fold) * torch.rsqrt(bn.running_var.to(fold) + bn.eps)
        shift = bn.bias.to(fold) - bn.running_mean.to(fold) * scale
        if conv.bias is not None:
            shift = shift + conv.bias.to(fold) * scale
        # elementwise ops keep the weight's memory format (channels_last after `model.to(memory_format=...)`)
        weight = (conv.weight.to(fold) * scale.view(-1, 1, 1, 1)).to(dtype)
        cached = (key, weight, shift.to(dtype))
        if key is not None:  # inference-tensor parameters: no version counters, no cache
            cna.__dict__["_folded"] = cached
    return cached[1], cached[2]


def _conv_bias_relu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, conv: nn.Conv2d,
                    residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """relu(conv(x, weight) + bias [+ residual]): one cuDNN kernel on CUDA, the composition elsewhere."""
    args = (conv.stride, conv.padding, conv.dilation, conv.groups)
    if x.is_cuda and torch.backends.cudnn.enabled and x.dtype != torch.float64:
        if residual is None:
            return torch.cudnn_convolution_relu(x, weight, bias, *args)
        return torch.cudnn_convolution_add_relu(x, weight, residual, 1.0, bias, *args)
    y = F.conv2d(x, weight, bias, *args)
    if residual is not None:
        y = y + residual
    return F.relu_(y)


def conv_bn_relu(cna: ConvNormAct, x: torch.Tensor) -> Optional[torch.Tensor]:
    """`cna(x)` fused, or None when `cna` does not fuse (no ReLU, or not foldable)."""
    if not (_fusable(cna) and _relu(cna.bn.act)):
        return None
    dtype = _compute_dtype(x)
    weight, bias = folded_conv_bn(cna, dtype)
    return _conv_bias_relu(x.to(dtype), weight, bias, cna.conv)


class FusedConvNormAct(ConvNormAct):
    """timm's `ConvNormAct` (same parameters and state_dict) whose inference folds the norm into the conv and
    fuses the ReLU (module docstring)."""

    fused_inference = True

    def train(self, mode: bool = True):
        if mode or self.training:  # a switch, or training (no cache then): `model.train().eval()` clears it
            self.__dict__.pop("_folded", None)
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _active(self, x):
            y = conv_bn_relu(self, x)
            if y is not None:
                return y
        return super().forward(x)


def _block_end(block: nn.Module, x: torch.Tensor, shortcut_in: torch.Tensor) -> torch.Tensor:
    """act(conv3_1x1(x) + shortcut(shortcut_in)) of a timm bottleneck-style block in eval mode. Fused when the
    block's activation is a ReLU and conv3 has no activation of its own: one cuDNN kernel for conv3, its folded
    norm, the residual add and the ReLU, with a conv shortcut's norm folded too (its bias joins conv3's)."""
    conv3, shortcut = block.conv3_1x1, block.shortcut
    if not (_relu(block.act) and _fusable(conv3) and isinstance(conv3.bn.act, nn.Identity)
            and isinstance(getattr(block, "attn_last", None), (nn.Identity, type(None)))):
        x = conv3(x)
        if getattr(block, "attn_last", None) is not None:
            x = block.attn_last(x)
        if shortcut is not None:
            x = x + shortcut(shortcut_in)
        return block.act(x)
    dtype = _compute_dtype(x)
    weight, bias = folded_conv_bn(conv3, dtype)
    if shortcut is None:
        return _conv_bias_relu(x.to(dtype), weight, bias, conv3.conv)
    if _fusable(shortcut) and isinstance(shortcut.bn.act, nn.Identity):
        w_sc, b_sc = folded_conv_bn(shortcut, dtype)
        sc = shortcut.conv
        residual = F.conv2d(shortcut_in.to(dtype), w_sc, None, sc.stride, sc.padding, sc.dilation, sc.groups)
        bias = bias + b_sc
    else:
        residual = shortcut(shortcut_in)
    return _conv_bias_relu(x.to(dtype), weight, bias, conv3.conv, residual.to(dtype))


class _FusedBlock:
    """The inference forward of timm's bottleneck-style blocks: the modules named in `_body` in order (their
    conv-norm pairs fuse on their own), then the fused end (`_block_end`); timm's forward otherwise."""

    fused_inference = True
    _body: Tuple[str, ...] = ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _active(self, x):
            return super().forward(x)
        shortcut = x
        for name in self._body:
            x = getattr(self, name)(x)
        return _block_end(self, x, shortcut)  # drop_path is the identity in eval mode


class FusedBottleneckBlock(_FusedBlock, BottleneckBlock):
    """timm's `BottleneckBlock` whose inference fuses its convs' norms and ReLUs, and the last conv with the
    residual add and the block's ReLU (module docstring)."""

    _body = ("conv1_1x1", "conv2_kxk", "conv2b_kxk", "attn")


class FusedSelfAttnBlock(_FusedBlock, SelfAttnBlock):
    """timm's `SelfAttnBlock` whose inference fuses its convs' norms and ReLUs, and the last conv with the
    residual add and the block's ReLU (module docstring)."""

    _body = ("conv1_1x1", "conv2_kxk", "self_attn", "post_attn")


def enable_fused_inference(model: nn.Module) -> int:
    """Give `model`'s timm `ConvNormAct`, `BottleneckBlock` and `SelfAttnBlock` modules (exactly those classes)
    the fused inference forward, in place; parameters and state_dict keys are unchanged. Returns how many
    modules changed."""
    return swap_classes(model, {ConvNormAct: FusedConvNormAct, BottleneckBlock: FusedBottleneckBlock,
                                SelfAttnBlock: FusedSelfAttnBlock})


def set_fused_inference(model: nn.Module, enabled: bool) -> int:
    """Turn the fused inference path of `model`'s fused modules on or off; returns how many modules it set."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    count = 0
    for module in model.modules():
        if isinstance(module, (FusedConvNormAct, _FusedBlock)):
            module.fused_inference = enabled
            count += 1
    return count
