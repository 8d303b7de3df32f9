"""HaloNet: ResNet-style bottlenecks whose 3x3 conv is blocked local (halo) self-attention.

Paper: `Scaling Local Self-Attention for Parameter Efficient Visual Backbones`, Vaswani, Ramachandran,
Srinivas, Parmar, Hechtman, Shlens, CVPR 2021 (arXiv:2103.12731). There is no official code.

Two groups of models, all timm `ByobNet`s (timm's bring-your-own-blocks network, reused by import) whose
self-attention layer is the zoo's `HaloAttention` (over `kernels.attention`):

* timm-compatible: `zoo_halonet26t`, `zoo_sehalonet33ts`, `zoo_halonet50ts`, `zoo_eca_halonext26ts` have the
  architecture of timm's model without the prefix (timm `timm/models/byoanet.py`, Apache-2.0): a timm
  state_dict loads strictly and gives the same outputs. timm's `halonet_h1` is the paper's H1 as read below.
* the paper's H0-H7 family, `zoo_halonet_h0` ... `zoo_halonet_h7`: stages of `(3, 3, l3, 3)` halo blocks with
  bottleneck widths (64, 128, 256, 512), block outputs `rb` times wider, values `rv` times wider, an optional
  final 1x1 conv of width `df`, block `b`, halo `h` and resolution from the paper's table (as transcribed by
  keras_cv_attention_models, "architecture guessed"), with heads (4, 8, 8, 8) per stage as that table reads.
  Undetermined details follow timm's `halonet_h1`: 7x7 stem and max-pool, ReLU. This reading gives the paper's
  parameter counts within 0.1M (5.5M ... 67.4M). `zoo_halonet_h1` is timm's `halonet_h1` (8 heads in every
  stage), weight-compatible with it.

No weights are distributed; every model is built with random initialisation (a local file may be loaded
with `zoo.create_model(name, checkpoint_path=...)`).
"""
from __future__ import annotations

from dataclasses import replace
from functools import partial
from typing import Any, Dict, Optional

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import make_divisible
from timm.models import build_model_with_cfg, generate_default_cfgs
from timm.models import byoanet
from timm.models.byobnet import ByoBlockCfg, ByobNet, ByoModelCfg

from .._registry import register_model
from ..layers.batch_norm import enable_fast_batch_norm
from ..layers.checks import check_image_input
from ..layers.conv_bn_fusion import FusedSelfAttnBlock, enable_fused_inference
from ..layers.halo_attention import HaloAttention

__all__ = ["HaloNet"]


class HaloBlock(FusedSelfAttnBlock):
    """timm's `SelfAttnBlock` (with the zoo's fused inference) whose attention values are `value_ratio` times
    wider (HaloNet's rv)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, value_ratio: float = 1.0, layers=None,
                 device=None, dtype=None, **kwargs):
        super().__init__(in_chs, out_chs, stride=stride, layers=layers, device=device, dtype=dtype, **kwargs)
        if value_ratio != 1.0:
            dd = dict(device=device, dtype=dtype)
            mid_chs = self.conv1_1x1.conv.out_channels
            v_chs = make_divisible(mid_chs * value_ratio)
            self.self_attn = layers.self_attn(mid_chs, dim_out=v_chs, stride=stride, **dd)
            self.post_attn = layers.norm_act(v_chs, **dd)
            self.conv3_1x1 = layers.conv_norm_act(v_chs, out_chs, 1, apply_act=False, **dd)


class HaloNet(ByobNet):
    """timm's `ByobNet` with zoo halo attention; validates its input at the boundary.

    Inference (eval mode, no autograd) folds each BatchNorm into its conv and runs conv + bias + ReLU, and a
    block's last conv + residual + ReLU, as single cuDNN kernels (`zoo.layers.conv_bn_fusion`; ReLU models:
    `zoo_halonet26t`, `zoo_halonet_h*`). `zoo.layers.set_fused_inference(model, False)` gives timm's
    unfused path. Training on CUDA channels_last inputs runs BatchNorm (+ ReLU) as Triton passes
    (`zoo.layers.batch_norm`).

    Args: as `timm.models.byobnet.ByobNet` (`cfg`, `num_classes`, `in_chans`, `global_pool`, `output_stride`,
        `drop_rate`, `drop_path_rate`, `device`, `dtype`, ...). Any input size works: halo layers pad to whole
        blocks.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        enable_fused_inference(self)
        enable_fast_batch_norm(self)

    def _check_input(self, x):
        check_image_input(x, self.in_chans)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return super().forward_features(x)

    def forward_intermediates(self, x: torch.Tensor, *args, **kwargs):
        self._check_input(x)
        return super().forward_intermediates(x, *args, **kwargs)


def _halo_family(b: int, h: int, rv: float, rb: float, l3: int, df: int, heads=(4, 8, 8, 8)) -> ByoModelCfg:
    """The paper's HaloNet H-model: 4 stages of halo blocks, bottleneck widths 64..512, `heads` per stage."""
    block = partial(HaloBlock, value_ratio=rv) if rv != 1 else "self_attn"
    stages = []
    for d, mid, s, nh in zip((3, 3, l3, 3), (64, 128, 256, 512), (1, 2, 2, 2), heads):
        # qk width stays the bottleneck width when rv widens the values (timm's default when rv == 1)
        attn_kwargs = dict(block_size=b, halo_size=h, num_heads=nh)
        if rv != 1:
            attn_kwargs["dim_head"] = mid // nh
        stages.append(ByoBlockCfg(type=block, d=d, c=int(mid * rb), s=s, gs=0, br=1 / rb,
                                  self_attn_kwargs=attn_kwargs))
    return ByoModelCfg(
        blocks=tuple(stages),
        stem_chs=64,
        stem_type="7x7",
        stem_pool="maxpool",
        num_features=df,
        self_attn_layer=HaloAttention,
        self_attn_kwargs=dict(block_size=b, halo_size=h),
    )


def _zoo_halo_cfg(timm_variant: str) -> ByoModelCfg:
    """timm's own config of `timm_variant` with every `halo` self-attention layer replaced by the zoo's."""

    def swap(block: ByoBlockCfg) -> ByoBlockCfg:
        return replace(block, self_attn_layer=HaloAttention) if block.self_attn_layer == "halo" else block

    cfg = byoanet.model_cfgs[timm_variant]
    blocks = tuple(tuple(swap(b) for b in blk) if isinstance(blk, tuple) else swap(blk) for blk in cfg.blocks)
    if cfg.self_attn_layer != "halo":
        raise ValueError(f"timm's {timm_variant!r} is not a HaloNet (self_attn_layer={cfg.self_attn_layer!r})")
    return replace(cfg, blocks=blocks, self_attn_layer=HaloAttention)


model_cfgs = dict(
    # timm-compatible architectures: timm's own configs (timm/models/byoanet.py), zoo HaloAttention swapped in
    **{name: _zoo_halo_cfg(name) for name in ("halonet26t", "sehalonet33ts", "halonet50ts", "eca_halonext26ts")},
    # the paper's family (b, h, rv, rb, l3, df); H1 is timm's halonet_h1
    halonet_h0=_halo_family(b=8, h=3, rv=1, rb=0.5, l3=7, df=0),
    halonet_h1=_halo_family(b=8, h=3, rv=1, rb=1, l3=10, df=0, heads=(8, 8, 8, 8)),  # timm's halonet_h1
    halonet_h2=_halo_family(b=8, h=3, rv=1, rb=1.25, l3=11, df=0),
    halonet_h3=_halo_family(b=10, h=3, rv=1, rb=1.5, l3=12, df=1024),
    halonet_h4=_halo_family(b=12, h=2, rv=1, rb=3, l3=12, df=1280),
    halonet_h5=_halo_family(b=14, h=2, rv=2.5, rb=2, l3=23, df=1536),
    halonet_h6=_halo_family(b=8, h=4, rv=3, rb=2.75, l3=24, df=1536),
    halonet_h7=_halo_family(b=10, h=3, rv=4, rb=3.5, l3=26, df=2048),
    # tiny model for tests: stride-1 and strided-query halo layers, 2 heads, block 4, halo 1, 4 blocks
    test_halonet=ByoModelCfg(
        blocks=(
            ByoBlockCfg(type="self_attn", d=1, c=32, s=1, gs=0, br=0.5),
            ByoBlockCfg(type="bottle", d=1, c=48, s=2, gs=0, br=0.5),
            ByoBlockCfg(type="self_attn", d=1, c=64, s=2, gs=0, br=0.5),
            ByoBlockCfg(type="self_attn", d=1, c=64, s=2, gs=0, br=0.5),
        ),
        stem_chs=16,
        stem_type="3x3",
        stem_pool="maxpool",
        act_layer="silu",
        self_attn_layer=HaloAttention,
        self_attn_kwargs=dict(block_size=4, halo_size=1, num_heads=2),
    ),
)


def _create_halonet(variant: str, cfg_variant: Optional[str] = None, pretrained: bool = False, **kwargs) -> HaloNet:
    return build_model_with_cfg(
        HaloNet, variant, pretrained,
        model_cfg=model_cfgs[cfg_variant or variant],
        feature_cfg=dict(flatten_sequential=True),
        **kwargs,
    )


def _cfg(size: int = 256, **kwargs) -> Dict[str, Any]:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, size, size), "pool_size": (size // 32, size // 32),
        "crop_pct": 0.94, "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.conv1.conv", "classifier": "head.fc", "license": "apache-2.0",
        "paper_ids": "arXiv:2103.12731",
        "paper_name": "Scaling Local Self-Attention for Parameter Efficient Visual Backbones",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "zoo_halonet26t": _cfg(crop_pct=0.95, notes=("architecture of timm halonet26t",)),
    "zoo_sehalonet33ts": _cfg(notes=("architecture of timm sehalonet33ts",)),
    "zoo_halonet50ts": _cfg(notes=("architecture of timm halonet50ts",)),
    "zoo_eca_halonext26ts": _cfg(notes=("architecture of timm eca_halonext26ts",)),
    "zoo_halonet_h0": _cfg(256),
    "zoo_halonet_h1": _cfg(256, crop_pct=0.95, notes=("architecture of timm halonet_h1",)),
    "zoo_halonet_h2": _cfg(256),
    "zoo_halonet_h3": _cfg(320),
    "zoo_halonet_h4": _cfg(384),
    "zoo_halonet_h5": _cfg(448),
    "zoo_halonet_h6": _cfg(512),
    "zoo_halonet_h7": _cfg(600, pool_size=(19, 19)),
    "test_halonet": _cfg(64, pool_size=(2, 2)),
})


@register_model
def zoo_halonet26t(pretrained: bool = False, **kwargs) -> HaloNet:
    """HaloNet-26T (timm halonet26t architecture), zoo halo attention."""
    return _create_halonet("zoo_halonet26t", "halonet26t", pretrained=pretrained, **kwargs)


@register_model
def zoo_sehalonet33ts(pretrained: bool = False, **kwargs) -> HaloNet:
    """SE-HaloNet-33TS (timm sehalonet33ts architecture), zoo halo attention."""
    return _create_halonet("zoo_sehalonet33ts", "sehalonet33ts", pretrained=pretrained, **kwargs)


@register_model
def zoo_halonet50ts(pretrained: bool = False, **kwargs) -> HaloNet:
    """HaloNet-50TS (timm halonet50ts architecture), zoo halo attention."""
    return _create_halonet("zoo_halonet50ts", "halonet50ts", pretrained=pretrained, **kwargs)


@register_model
def zoo_eca_halonext26ts(pretrained: bool = False, **kwargs) -> HaloNet:
    """ECA-HaloNeXt-26TS (timm eca_halonext26ts architecture), zoo halo attention."""
    return _create_halonet("zoo_eca_halonext26ts", "eca_halonext26ts", pretrained=pretrained, **kwargs)


@register_model
def zoo_halonet_h0(pretrained: bool = False, **kwargs) -> HaloNet:
    """HaloNet-H0 (arXiv:2103.12731), b8 h3, 256 px."""
    return _create_halonet("zoo_halonet_h0", "halonet_h0", pretrained=pretrained, **kwargs)


@register_model
def zoo_halonet_h1(pretrained: bool = False, **kwargs) -> HaloNet:
    """HaloNet-H1 (arXiv:2103.12731; timm halonet_h1 architecture), b8 h3, 256 px."""
    return _create_halonet("zoo_halonet_h1", "halonet_h1", pretrained=pretrained, **kwargs)


@register_model
def zoo_halonet_h2(pretrained: bool = False, **kwargs) -> HaloNet:
    """HaloNet-H2 (arXiv:2103.12731), b8 h3, 256 px."""
    return _create_halonet("zoo_halonet_h2", "halonet_h2", pretrained=pretrained, **kwargs)


@register_model
def zoo_halonet_h3(pretrained: bool = False, **kwargs) -> HaloNet:
    """HaloNet-H3 (arXiv:2103.12731), b10 h3, 320 px."""
    return _create_halonet("zoo_halonet_h3", "halonet_h3", pretrained=pretrained, **kwargs)


@register_model
def zoo_halonet_h4(pretrained: bool = False, **kwargs) -> HaloNet:
    """HaloNet-H4 (arXiv:2103.12731), b12 h2, 384 px."""
    return _create_halonet("zoo_halonet_h4", "halonet_h4", pretrained=pretrained, **kwargs)


@register_model
def zoo_halonet_h5(pretrained: bool = False, **kwargs) -> HaloNet:
    """HaloNet-H5 (arXiv:2103.12731), b14 h2, rv 2.5, 448 px."""
    return _create_halonet("zoo_halonet_h5", "halonet_h5", pretrained=pretrained, **kwargs)


@register_model
def zoo_halonet_h6(pretrained: bool = False, **kwargs) -> HaloNet:
    """HaloNet-H6 (arXiv:2103.12731), b8 h4, rv 3, 512 px."""
    return _create_halonet("zoo_halonet_h6", "halonet_h6", pretrained=pretrained, **kwargs)


@register_model
def zoo_halonet_h7(pretrained: bool = False, **kwargs) -> HaloNet:
    """HaloNet-H7 (arXiv:2103.12731), b10 h3, rv 4, 600 px."""
    return _create_halonet("zoo_halonet_h7", "halonet_h7", pretrained=pretrained, **kwargs)


@register_model
def test_halonet(pretrained: bool = False, **kwargs) -> HaloNet:
    """Tiny HaloNet for tests: 4 blocks, width <= 64, block 4 halo 1, 64 px."""
    return _create_halonet("test_halonet", pretrained=pretrained, **kwargs)
