"""MobileNet-V1 and MobileNet-V2 with ULSAM, the Ultra-Lightweight Subspace Attention Module (Saini, Jha, Das,
Mittal, Mohan; "ULSAM: Ultra-Lightweight Subspace Attention Module for Compact Convolutional Neural
Networks", WACV 2020, arXiv 2006.15102; reference code Nandan91/ULSAM, read, not copied).

The backbones are the standard MobileNets built from timm's blocks, so without ULSAM they match timm's
`mobilenetv1_100` / `mobilenetv2_100` parameter for parameter. ULSAM (`zoo.layers.ULSAM`, g=4 subspaces by
default, the reference code's BN+ReLU form) is either *inserted* after a block (the paper's
"MV1 + ULSAM": +0.2 MFLOPs, ~1k parameters) or *replaces* a stride-1 block (the paper's 4.2M → 3.9M,
569M → 517M FLOPs MobileNet-V1). The paper places ULSAM in MobileNet-V1's 14×14×512 stage; its exact block
indices are not in the public code or slides, so the zoo uses the end of that stage (after the sixth 512-channel
block; `replace` swaps that block for ULSAM) and, for MobileNet-V2, the end of the 14×14 stage (96 channels).
Both are arguments (`ulsam_stages`, `ulsam_replace`).

`ulsam_mobilenetv1_tiny` is a 32 px MobileNet-V1 (width 0.25, stride-1 stem, as CIFAR MobileNets do) with ULSAM
at the end of its 4×4×128 stage, small enough to train on digits in seconds.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
from timm.layers import ConvNormAct, SelectAdaptivePool2d, get_act_layer, make_divisible
from timm.models import build_model_with_cfg, generate_default_cfgs
from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq
from torch import nn

from .._registry import register_model
from ..layers.checks import check_image_input
from ..layers.ulsam import ULSAM

__all__ = ["UlsamMobileNet"]

# Stages as tuples of (block, out_chs, first stride, repeats, expansion); a new stage starts at each stride-2
# block, so stage i has reduction stem_stride·2^i. "dsa": depthwise-separable with activated pointwise conv
# (MobileNet-V1); "ds": without (MobileNet-V2's first block); "ir": inverted residual.
ArchT = Sequence[Sequence[Tuple[str, int, int, int, float]]]
_MV1_ARCH: ArchT = (
    (("dsa", 64, 1, 1, 1.0),),
    (("dsa", 128, 2, 2, 1.0),),
    (("dsa", 256, 2, 2, 1.0),),
    (("dsa", 512, 2, 6, 1.0),),
    (("dsa", 1024, 2, 2, 1.0),),
)
_MV2_ARCH: ArchT = (
    (("ds", 16, 1, 1, 1.0),),
    (("ir", 24, 2, 2, 6.0),),
    (("ir", 32, 2, 3, 6.0),),
    (("ir", 64, 2, 4, 6.0), ("ir", 96, 1, 3, 6.0)),
    (("ir", 160, 2, 3, 6.0), ("ir", 320, 1, 1, 6.0)),
)
_TEST_ARCH: ArchT = (
    (("dsa", 16, 1, 1, 1.0),),
    (("dsa", 32, 2, 1, 1.0),),
    (("dsa", 64, 2, 1, 1.0),),
)


class UlsamMobileNet(nn.Module):
    """MobileNet (V1 or V2 layout) with ULSAM modules at the ends of chosen stages.

    Args:
        arch: stages of (block, out_chs, first stride, repeats, expansion); see `_MV1_ARCH`, `_MV2_ARCH`.
        num_classes: classifier outputs; 0 gives pooled features.
        in_chans: input channels.
        global_pool: pooling type of timm's `SelectAdaptivePool2d` ("avg", "max", "avgmax", ...; "" for none).
        width_mult: channel multiplier (channels rounded to multiples of 8).
        stem_chs: stem width before `width_mult`.
        stem_stride: stride of the stem conv (2 for ImageNet; 1 for 32 px inputs).
        head_chs: width of the final 1×1 conv (MobileNet-V2: 1280); None for no head conv (MobileNet-V1).
        act_layer: activation ("relu" for V1, "relu6" for V2).
        ulsam_stages: indices of the stages that end with ULSAM.
        ulsam_groups: g, ULSAM's number of subspaces.
        ulsam_norm_act: ULSAM's BN+ReLU form (reference code) if True, the paper's plain form if False.
        ulsam_replace: ULSAM replaces the stage's last block (which must keep stride 1 and width) instead of
            following it.
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth over the blocks that have a residual.
        device, dtype: factory kwargs for the parameters.
    """

    def __init__(self, arch: ArchT = _MV1_ARCH, num_classes: int = 1000, in_chans: int = 3,
                 global_pool: str = "avg", width_mult: float = 1.0, stem_chs: int = 32, stem_stride: int = 2,
                 head_chs: Optional[int] = None, act_layer: str = "relu", ulsam_stages: Sequence[int] = (3,),
                 ulsam_groups: int = 4, ulsam_norm_act: bool = True, ulsam_replace: bool = False,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0, device=None, dtype=None):
        super().__init__()
        if any(not 0 <= s < len(arch) for s in ulsam_stages):
            raise ValueError(f"ulsam_stages must index the {len(arch)} stages, got {tuple(ulsam_stages)}")
        dd = dict(device=device, dtype=dtype)
        act = get_act_layer(act_layer)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        chs = make_divisible(stem_chs * width_mult, 8)
        self.stem = ConvNormAct(in_chans, chs, 3, stride=stem_stride, act_layer=act, **dd)
        n_blocks = sum(r for stage in arch for _, _, _, r, _ in stage)
        block_idx, reduction = 0, stem_stride
        stages, self.feature_info = [], []
        for si, stage in enumerate(arch):
            blocks = []
            for kind, out_chs, first_stride, repeats, exp in stage:
                out_chs = make_divisible(out_chs * width_mult, 8)
                for r in range(repeats):
                    stride = first_stride if r == 0 else 1
                    dpr = drop_path_rate * block_idx / max(n_blocks - 1, 1)
                    if kind == "ir":
                        blk = InvertedResidual(chs, out_chs, stride=stride, exp_ratio=exp, act_layer=act,
                                               drop_path_rate=dpr, **dd)
                    elif kind in ("ds", "dsa"):
                        blk = DepthwiseSeparableConv(chs, out_chs, stride=stride, pw_act=kind == "dsa",
                                                     noskip=kind == "dsa", act_layer=act, drop_path_rate=dpr, **dd)
                    else:
                        raise ValueError(f"arch block kind must be 'ir', 'ds' or 'dsa', got {kind!r}")
                    blocks.append(blk)
                    chs, reduction, block_idx = out_chs, reduction * stride, block_idx + 1
            if si in ulsam_stages:
                if ulsam_replace:
                    last = blocks[-1]
                    if len(blocks) < 2 or last.conv_dw.stride[0] != 1 or _in_chs(last) != chs:
                        raise ValueError(f"ulsam_replace needs stage {si} to end with a stride-1 block that keeps "
                                         f"its width and to have another block before it")
                    blocks.pop()
                blocks.append(ULSAM(chs, ulsam_groups, norm_act=ulsam_norm_act, **dd))
            stages.append(nn.Sequential(*blocks))
            self.feature_info.append(dict(module=f"stages.{si}", num_chs=chs, reduction=reduction))
        self.stages = nn.Sequential(*stages)
        self.reduction = reduction
        if head_chs is not None:
            head_chs = max(head_chs, make_divisible(head_chs * width_mult, 8))
            self.conv_head = ConvNormAct(chs, head_chs, 1, act_layer=act, **dd)
            chs = head_chs
        else:
            self.conv_head = nn.Identity()
        self.num_features = self.head_hidden_size = chs
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
        self.head_drop = nn.Dropout(drop_rate)
        self.classifier = (nn.Linear(chs * self.global_pool.feat_mult(), num_classes, **dd) if num_classes > 0
                           else nn.Identity())
        self.init_weights()

    def init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(stem=r"^stem", blocks=r"^stages\.(\d+)" if coarse else r"^stages\.(\d+)\.(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
        w = self.stem.conv.weight
        self.classifier = (nn.Linear(self.num_features * self.global_pool.feat_mult(), num_classes,
                                     device=w.device, dtype=w.dtype) if num_classes > 0 else nn.Identity())

    def _check_input(self, x: torch.Tensor) -> None:
        check_image_input(x, self.in_chans, min_size=self.reduction)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map `(B, num_features, H/stride, W/stride)` before pooling."""
        self._check_input(x)
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.stages, x, flatten=True)
        else:
            x = self.stages(x)
        return self.conv_head(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.global_pool(x))
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """Stage outputs (timm's signature): `(final_features, [intermediates])`, or the list alone.

        Args:
            x: images `(B, C, H, W)`.
            indices: take the last n stages if int, all if None, the listed stages if a sequence.
            norm: accepted for timm compatibility; a CNN has no final norm, so it changes nothing.
            stop_early: stop after the last requested stage.
            output_fmt: "NCHW" only.
            intermediates_only: return only the intermediates.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        self._check_input(x)
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        x = self.stem(x)
        stages = self.stages[:max_index + 1] if stop_early else self.stages
        intermediates = []
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        if len(stages) == len(self.stages):
            x = self.conv_head(x)
        return x, intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop the stages after the last requested intermediate, and the head conv and classifier with the head or
        when stages go (they are sized for the last stage; timm's EfficientNet/ByobNet do the same)."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[:max_index + 1]
        if prune_head or prune_end:
            self.conv_head = nn.Identity()
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
            self.reset_classifier(0, "")
        return take_indices


def _in_chs(block: nn.Module) -> int:
    conv = block.conv_pw if isinstance(block, InvertedResidual) else block.conv_dw
    return conv.in_channels


def _create_ulsam_mobilenet(variant: str, pretrained: bool = False, **kwargs) -> UlsamMobileNet:
    out_indices = kwargs.pop("out_indices", tuple(range(len(kwargs.get("arch", _MV1_ARCH)))))
    return build_model_with_cfg(UlsamMobileNet, variant, pretrained,
                                feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **kwargs)


def _cfg(**kwargs):
    cfg = dict(num_classes=1000, input_size=(3, 224, 224), min_input_size=(3, 32, 32), pool_size=(7, 7),
               crop_pct=0.875, interpolation="bilinear", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
               first_conv="stem.conv", classifier="classifier", license="mit", paper_ids="arXiv:2006.15102",
               paper_name="ULSAM: Ultra-Lightweight Subspace Attention Module for Compact Convolutional Neural "
                          "Networks", origin_url="https://github.com/Nandan91/ULSAM")
    cfg.update(kwargs)
    return cfg


_SMALL = dict(num_classes=10, input_size=(3, 32, 32), crop_pct=1.0, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

default_cfgs = generate_default_cfgs({
    "ulsam_mobilenetv1": _cfg(),
    "ulsam_mobilenetv1_replace": _cfg(),
    "ulsam_mobilenetv2": _cfg(),
    "ulsam_mobilenetv1_tiny": _cfg(**_SMALL, min_input_size=(3, 16, 16), pool_size=(2, 2)),
    "test_ulsam": _cfg(**_SMALL, min_input_size=(3, 4, 4), pool_size=(8, 8)),
})


@register_model
def ulsam_mobilenetv1(pretrained: bool = False, **kwargs) -> UlsamMobileNet:
    """MobileNet-V1 1.0 with ULSAM (g=4) inserted after the 14×14×512 stage (ULSAM, WACV 2020)."""
    model_args = dict(arch=_MV1_ARCH, act_layer="relu", ulsam_stages=(3,), ulsam_groups=4)
    return _create_ulsam_mobilenet("ulsam_mobilenetv1", pretrained, **dict(model_args, **kwargs))


@register_model
def ulsam_mobilenetv1_replace(pretrained: bool = False, **kwargs) -> UlsamMobileNet:
    """MobileNet-V1 1.0 with ULSAM (g=4) replacing the last 14×14×512 block (ULSAM, WACV 2020)."""
    model_args = dict(arch=_MV1_ARCH, act_layer="relu", ulsam_stages=(3,), ulsam_groups=4, ulsam_replace=True)
    return _create_ulsam_mobilenet("ulsam_mobilenetv1_replace", pretrained, **dict(model_args, **kwargs))


@register_model
def ulsam_mobilenetv2(pretrained: bool = False, **kwargs) -> UlsamMobileNet:
    """MobileNet-V2 1.0 with ULSAM (g=4) inserted after the 14×14×96 stage (ULSAM, WACV 2020)."""
    model_args = dict(arch=_MV2_ARCH, act_layer="relu6", head_chs=1280, ulsam_stages=(3,), ulsam_groups=4)
    return _create_ulsam_mobilenet("ulsam_mobilenetv2", pretrained, **dict(model_args, **kwargs))


@register_model
def ulsam_mobilenetv1_tiny(pretrained: bool = False, **kwargs) -> UlsamMobileNet:
    """32 px MobileNet-V1 0.25 (stride-1 stem) with ULSAM (g=4) after its 4×4×128 stage."""
    model_args = dict(arch=_MV1_ARCH, width_mult=0.25, stem_stride=1, act_layer="relu", ulsam_stages=(3,),
                      ulsam_groups=4)
    return _create_ulsam_mobilenet("ulsam_mobilenetv1_tiny", pretrained, **dict(model_args, **kwargs))


@register_model
def test_ulsam(pretrained: bool = False, **kwargs) -> UlsamMobileNet:
    """Tiny 3-block MobileNet-V1 layout (width ≤ 64, 32 px) with ULSAM (g=4) for the generic model tests."""
    model_args = dict(arch=_TEST_ARCH, stem_chs=16, stem_stride=1, act_layer="relu", ulsam_stages=(2,),
                      ulsam_groups=4)
    return _create_ulsam_mobilenet("test_ulsam", pretrained, **dict(model_args, **kwargs))
