"""Agent-PVT: the Pyramid Vision Transformer (v1) with Agent Attention.

Paper: Han et al., "Agent Attention: On the Integration of Softmax and Linear Attention", ECCV 2024
(arXiv:2312.08874); PVT: Wang et al., "Pyramid Vision Transformer", ICCV 2021 (arXiv:2102.12122).
Reference code (read, not copied): LeapLabTHU/Agent-Attention @207ce3e, `agent_transformer/models/agent_pvt.py`
and `cfgs/agent_pvt_{t,s,m,b}.yaml`, MIT licence. No weights ship here.

PVT v1, as the reference builds it: four stages, each a non-overlapping patch embedding (stride 4, then 2) with
LayerNorm, its own learned position embedding, and pre-norm blocks; no class token and no final norm, the head
averages the last stage's tokens. The released configs use agent attention in every block ("AAAA") with 9-16-49-49
agents and full-resolution keys/values (`agent_sr_ratios` 1111); "B" stages fall back to PVT's spatial-reduction
attention. timm's `pvt_v2` is a different architecture (overlapping embeddings, conv MLP), so the stages are built
here from timm's PatchEmbed, Mlp and DropPath. Any input size: inputs are padded to the stage strides, position
embeddings resampled (bilinear, as the reference) and agent biases interpolated.
"""
from __future__ import annotations

import math
import re
from functools import partial
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from timm.layers import (DropPath, LayerNorm, Mlp, calculate_drop_path_rates, get_device_dtype,
                         resample_abs_pos_embed, to_2tuple, to_ntuple, trunc_normal_)
from timm.models import build_model_with_cfg, checkpoint, generate_default_cfgs
from timm.models._features import feature_take_indices
from torch import nn

import kernels

from .._registry import register_model
from ..layers.agent_attention import AgentAttention, resize_agent_biases
from ..layers.checks import check_image_input
from ..layers.layer_norm import enable_fast_layer_norm
from ..layers.patch_embed import PatchEmbed
from .agent_deit import agent_cfg

__all__ = ["AgentPvt"]


class SpatialReductionAttention(nn.Module):
    """PVT's spatial-reduction attention: keys/values from a stride-`sr_ratio` conv of the grid, through kernels."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, proj_drop: float = 0.0,
                 sr_ratio: int = 1, norm_layer=nn.LayerNorm, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if dim % num_heads:
            raise ValueError(f"dim must be a multiple of num_heads, got dim={dim}, num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.sr_ratio = sr_ratio
        self.backend: Optional[str] = None
        self.q = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias, **dd)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio, **dd)
            self.norm = norm_layer(dim, **dd)
        else:
            self.sr = self.norm = None

    def forward(self, x: torch.Tensor, feat_size: Tuple[int, int]) -> torch.Tensor:
        B, N, C = x.shape
        h, d = self.num_heads, self.head_dim
        q = self.q(x).reshape(B, N, h, d).transpose(1, 2)  # (B, h, N, d)
        if self.sr is not None:
            H, W = feat_size
            x_ = x.transpose(1, 2).reshape(B, C, H, W)
            if H < self.sr_ratio or W < self.sr_ratio:  # a grid smaller than one reduction cell: zero-pad to one
                x_ = nn.functional.pad(x_, (0, max(0, self.sr_ratio - W), 0, max(0, self.sr_ratio - H)))
            x = self.norm(self.sr(x_).flatten(2).transpose(1, 2))  # (B, Nk, C)
        k, v = self.kv(x).reshape(B, -1, 2, h, d).permute(2, 0, 3, 1, 4).unbind(0)  # (B, h, Nk, d)
        x = kernels.attention(q, k, v, backend=self.backend).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class AgentPvtBlock(nn.Module):
    """Pre-norm PVT block: agent attention ('A') or spatial-reduction attention ('B'), then an MLP."""

    def __init__(self, dim: int, num_heads: int, bias_grid: Tuple[int, int], agent_num: int = 49,
                 attn_type: str = "A", sr_ratio: int = 1, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_drop: float = 0.0, drop_path: float = 0.0, act_layer=nn.GELU, norm_layer=LayerNorm,
                 device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.norm1 = norm_layer(dim, **dd)
        if attn_type == "A":
            self.attn = AgentAttention(dim, num_heads=num_heads, agent_num=agent_num, bias_grid=bias_grid,
                                       qkv_bias=qkv_bias, proj_drop=proj_drop, sr_ratio=sr_ratio, **dd)
        elif attn_type == "B":
            self.attn = SpatialReductionAttention(dim, num_heads=num_heads, qkv_bias=qkv_bias, proj_drop=proj_drop,
                                                  sr_ratio=sr_ratio, **dd)
        else:
            raise ValueError(f"attn_type must be 'A' (agent) or 'B' (spatial reduction), got {attn_type!r}")
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop,
                       **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        enable_fast_layer_norm(self)  # inference: the norms write what the linear layers read

    def forward(self, x: torch.Tensor, feat_size: Tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x), feat_size))
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x


class AgentPvtStage(nn.Module):
    """One PVT stage: patch embedding (+LayerNorm), position embedding, blocks; NCHW in and out."""

    def __init__(self, dim: int, dim_out: int, depth: int, in_size: Tuple[int, int], patch_size: int,
                 num_heads: int, agent_num: int, attn_type: str, sr_ratio: int, mlp_ratio: float, qkv_bias: bool,
                 pos_drop: float, proj_drop: float, drop_path: Union[List[float], float], norm_layer,
                 device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.grad_checkpointing = False
        self.patch_embed = PatchEmbed(img_size=in_size, patch_size=patch_size, in_chans=dim, embed_dim=dim_out,
                                      norm_layer=nn.LayerNorm, output_fmt="NHWC", strict_img_size=False,
                                      dynamic_img_pad=True, **dd)
        self.grid_size = tuple(self.patch_embed.grid_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size[0] * self.grid_size[1], dim_out, **dd))
        self.pos_drop = nn.Dropout(pos_drop)
        self.blocks = nn.ModuleList([AgentPvtBlock(
            dim_out, num_heads=num_heads, bias_grid=self.grid_size, agent_num=agent_num, attn_type=attn_type,
            sr_ratio=sr_ratio, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop,
            drop_path=drop_path[i] if isinstance(drop_path, (list, tuple)) else drop_path, norm_layer=norm_layer,
            **dd) for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # (B, H, W, C)
        B, H, W, C = x.shape
        pos = resample_abs_pos_embed(self.pos_embed, new_size=(H, W), old_size=self.grid_size, num_prefix_tokens=0,
                                     interpolation="bilinear", antialias=False)
        x = self.pos_drop(x.reshape(B, H * W, C) + pos)
        for blk in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x, (H, W))
            else:
                x = blk(x, (H, W))
        return x.reshape(B, H, W, C).permute(0, 3, 1, 2).contiguous()


class AgentPvt(nn.Module):
    """Pyramid Vision Transformer (v1) with Agent Attention (Agent-PVT, arXiv:2312.08874).

    Args:
        img_size: input size the position embeddings and agent biases are sized for (other sizes work).
        patch_size: stride of the first patch embedding (later stages use 2).
        in_chans: input channels.
        num_classes: classifier classes (0: no classifier).
        global_pool: 'avg' (mean of the last stage's tokens) or '' (none).
        embed_dims, depths, num_heads, mlp_ratios: per-stage widths, block counts, heads, MLP ratios.
        qkv_bias: bias on the q/k/v projections.
        sr_ratios: spatial-reduction ratios of 'B' (spatial-reduction attention) stages.
        agent_sr_ratios: spatial-reduction ratios of 'A' (agent) stages; the released configs use 1.
        agent_num: agents per stage, perfect squares (9-16-49-49).
        attn_type: one letter per stage, 'A' agent attention or 'B' spatial-reduction attention.
        drop_rate: dropout before the classifier.
        pos_drop_rate: dropout after adding the position embeddings.
        proj_drop_rate: dropout after the attention/MLP projections.
        attn_drop_rate: attention dropout; only 0 (timm's argument, refused otherwise: kernels.attention has none).
        drop_path_rate: stochastic depth rate (linear over all blocks).
        norm_layer: the blocks' norm.
        device, dtype: factory kwargs.
    """

    def __init__(self, img_size: Union[int, Tuple[int, int]] = 224, patch_size: int = 4, in_chans: int = 3,
                 num_classes: int = 1000, global_pool: str = "avg", embed_dims: Sequence[int] = (64, 128, 320, 512),
                 depths: Sequence[int] = (3, 4, 6, 3), num_heads: Sequence[int] = (1, 2, 5, 8),
                 mlp_ratios: Sequence[float] = (8.0, 8.0, 4.0, 4.0), qkv_bias: bool = True,
                 sr_ratios: Sequence[int] = (8, 4, 2, 1), agent_sr_ratios: Sequence[int] = (1, 1, 1, 1),
                 agent_num: Sequence[int] = (9, 16, 49, 49), attn_type: str = "AAAA", drop_rate: float = 0.0,
                 pos_drop_rate: float = 0.0, proj_drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, norm_layer=partial(LayerNorm, eps=1e-6), device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        num_stages = len(depths)
        if attn_drop_rate:
            raise NotImplementedError(f"attention dropout is not supported by kernels.attention, got "
                                      f"{attn_drop_rate=}")
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        for name, seq in (("embed_dims", embed_dims), ("agent_num", agent_num)):
            if len(seq) != num_stages:
                raise ValueError(f"{name} needs one entry per stage ({num_stages}), got {tuple(seq)}")
        if len(attn_type) != num_stages or set(attn_type) - {"A", "B"}:
            raise ValueError(f"attn_type must be {num_stages} letters of 'A'/'B', got {attn_type!r}")
        num_heads, mlp_ratios = to_ntuple(num_stages)(num_heads), to_ntuple(num_stages)(mlp_ratios)
        sr_ratios, agent_sr_ratios = to_ntuple(num_stages)(sr_ratios), to_ntuple(num_stages)(agent_sr_ratios)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.feature_info = []

        dpr = calculate_drop_path_rates(drop_path_rate, depths, stagewise=True)
        size = to_2tuple(img_size)
        stages, prev_dim = [], in_chans
        for i in range(num_stages):
            stride = patch_size if i == 0 else 2
            stage = AgentPvtStage(
                prev_dim, embed_dims[i], depths[i], in_size=size, patch_size=stride, num_heads=num_heads[i],
                agent_num=int(agent_num[i]), attn_type=attn_type[i],
                sr_ratio=int(agent_sr_ratios[i] if attn_type[i] == "A" else sr_ratios[i]), mlp_ratio=mlp_ratios[i],
                qkv_bias=qkv_bias, pos_drop=pos_drop_rate, proj_drop=proj_drop_rate, drop_path=dpr[i],
                norm_layer=norm_layer, **dd)
            stages.append(stage)
            size, prev_dim = stage.grid_size, embed_dims[i]
            self.feature_info.append(dict(num_chs=prev_dim, reduction=patch_size * 2 ** i, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)

        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()
        for stage in self.stages:
            trunc_normal_(stage.pos_embed, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self):
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        # only the stage/block indices may be capture groups: timm turns every group into a sort ordinal
        return dict(
            stem=r"^stages\.0\.(?:patch_embed|pos_embed)",
            blocks=r"^stages\.(\d+)" if coarse else [
                (r"^stages\.(\d+)\.(?:patch_embed|pos_embed)", (0,)),  # with the stage's first block
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        dd = get_device_dtype(self)
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.head.train(self.training)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward that also returns the outputs of chosen stages (timm's contract).

        Args:
            x: images `(B, C, H, W)`.
            indices: the last n stages if an int, all if None, else the stage indices to take.
            norm: unused (Agent-PVT has no final norm); kept for timm's interface.
            stop_early: stop after the last stage taken.
            output_fmt: 'NCHW' only.
            intermediates_only: return only the intermediates.

        Returns:
            `(final_features, intermediates)` or the intermediates, each `(B, C_i, H_i, W_i)`.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        check_image_input(x, self.in_chans)
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        stages = self.stages[:max_index + 1] if stop_early else self.stages
        intermediates = []
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[:max_index + 1]
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        check_image_input(x, self.in_chans)
        return self.stages(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(-2, -1))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: AgentPvt) -> Dict[str, torch.Tensor]:
    """Map a reference Agent-PVT checkpoint (`patch_embed1`, `pos_embed1`, `block1.0.attn.q`/`kv`) to this layout.

    Stages become `stages.{i}`, separate q/kv projections are fused into `qkv` where the block has one, and position
    embeddings (bilinear) and per-axis agent biases (linear) are resampled when the model's grids differ.
    """
    state_dict = state_dict.get("model", state_dict)
    out = {}
    for k, v in state_dict.items():
        k = re.sub(r"^patch_embed(\d+)\.", lambda m: f"stages.{int(m.group(1)) - 1}.patch_embed.", k)
        k = re.sub(r"^pos_embed(\d+)$", lambda m: f"stages.{int(m.group(1)) - 1}.pos_embed", k)
        k = re.sub(r"^block(\d+)\.(\d+)\.", lambda m: f"stages.{int(m.group(1)) - 1}.blocks.{m.group(2)}.", k)
        out[k] = v
    own = model.state_dict()
    for k in list(out):
        m = re.match(r"(.*\.attn)\.q\.(weight|bias)$", k)
        if m and f"{m[1]}.qkv.{m[2]}" in own:  # q (C rows) then kv (k, v): the fused layout q, k, v
            out[f"{m[1]}.qkv.{m[2]}"] = torch.cat([out.pop(k), out.pop(f"{m[1]}.kv.{m[2]}")], dim=0)
    for i, stage in enumerate(model.stages):
        key = f"stages.{i}.pos_embed"
        if key in out and out[key].shape != stage.pos_embed.shape:
            n_old = out[key].shape[1]
            side = math.isqrt(n_old)
            old_size = (side, side) if side * side == n_old else stage.grid_size
            out[key] = resample_abs_pos_embed(out[key], new_size=stage.grid_size, old_size=old_size,
                                              num_prefix_tokens=0, interpolation="bilinear", antialias=False)
    return resize_agent_biases(out, model)


def _create_agent_pvt(variant: str, pretrained: bool = False, **kwargs) -> AgentPvt:
    out_indices = kwargs.pop("out_indices", tuple(range(len(kwargs.get("depths", (3, 4, 6, 3))))))
    return build_model_with_cfg(
        AgentPvt, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices),
        **kwargs,
    )


_cfg = partial(agent_cfg, pool_size=(7, 7), first_conv="stages.0.patch_embed.proj", classifier="head")


default_cfgs = generate_default_cfgs({
    "agent_pvt_tiny": _cfg(),
    "agent_pvt_small": _cfg(),
    "agent_pvt_medium": _cfg(),
    "agent_pvt_large": _cfg(),
    "test_agent_pvt": _cfg(input_size=(3, 64, 64), pool_size=(2, 2), crop_pct=1.0),
})

_PVT_ARGS = dict(patch_size=4, embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4),
                 qkv_bias=True, sr_ratios=(8, 4, 2, 1), agent_num=(9, 16, 49, 49), attn_type="AAAA")


@register_model
def agent_pvt_tiny(pretrained: bool = False, **kwargs) -> AgentPvt:
    """Agent-PVT-T (11.6M, depths 2-2-2-2, agents 9-16-49-49), arXiv:2312.08874."""
    model_args = dict(_PVT_ARGS, depths=(2, 2, 2, 2), drop_path_rate=0.1)
    return _create_agent_pvt("agent_pvt_tiny", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def agent_pvt_small(pretrained: bool = False, **kwargs) -> AgentPvt:
    """Agent-PVT-S (20.6M, depths 3-4-6-3, agents 9-16-49-49), arXiv:2312.08874."""
    model_args = dict(_PVT_ARGS, depths=(3, 4, 6, 3), drop_path_rate=0.1)
    return _create_agent_pvt("agent_pvt_small", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def agent_pvt_medium(pretrained: bool = False, **kwargs) -> AgentPvt:
    """Agent-PVT-M (35.9M, depths 3-4-18-3, agents 9-16-49-49), arXiv:2312.08874."""
    model_args = dict(_PVT_ARGS, depths=(3, 4, 18, 3), drop_path_rate=0.3)
    return _create_agent_pvt("agent_pvt_medium", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def agent_pvt_large(pretrained: bool = False, **kwargs) -> AgentPvt:
    """Agent-PVT-L (48.7M, depths 3-8-27-3, agents 9-16-49-49), arXiv:2312.08874."""
    model_args = dict(_PVT_ARGS, depths=(3, 8, 27, 3), drop_path_rate=0.3)
    return _create_agent_pvt("agent_pvt_large", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def test_agent_pvt(pretrained: bool = False, **kwargs) -> AgentPvt:
    """Tiny Agent-PVT for tests: 64 px, widths 16-32-48-64, one block per stage; reduced K/V in stages 1 and 3."""
    model_args = dict(img_size=64, patch_size=4, embed_dims=(16, 32, 48, 64), depths=(1, 1, 1, 1),
                      num_heads=(1, 2, 2, 4), mlp_ratios=(2, 2, 2, 2), sr_ratios=(4, 2, 2, 1),
                      agent_sr_ratios=(2, 1, 1, 1), agent_num=(4, 9, 4, 4), attn_type="AABA")
    return _create_agent_pvt("test_agent_pvt", pretrained=pretrained, **dict(model_args, **kwargs))
