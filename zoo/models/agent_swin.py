"""Agent-Swin: the Swin Transformer with Agent Attention.

Paper: Han et al., "Agent Attention: On the Integration of Softmax and Linear Attention", ECCV 2024
(arXiv:2312.08874); Swin: Liu et al., ICCV 2021 (arXiv:2103.14030). Reference code (read, not copied):
LeapLabTHU/Agent-Attention @207ce3e, `agent_transformer/models/agent_swin.py` and `cfgs/agent_swin_{t,s,b}.yaml`,
MIT licence. No weights ship here; reference checkpoints map with timm's Swin `checkpoint_filter_fn`.

Built on timm's `SwinTransformer` (patch embedding, patch merging, stages, head) with the attention swapped:
agent blocks replace whole Swin blocks, the remaining window blocks keep timm's layout and relative-position
table but attend through `kernels.attention` (relative-position bias and shift mask as one additive bias).
The reference sets the agent stages' WINDOW_SIZE to the patch grid (56 at 224 px, 96 at 384 px), so the window
is clamped to the feature map and agent blocks attend globally without shift; here agent blocks are global at every
input size, with their biases interpolated to the stage grid. Layouts (`attn_type`, one letter per stage):
'A' agent, 'B' window attention, 'M' + a count after the letters: that many agent blocks, then window blocks
(T = AAAB, S = AABB, B = AAMB2, 9-16-49-49 agents, window 7 elsewhere).
"""
from __future__ import annotations

from functools import partial
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from timm.layers import DropPath, Mlp, calculate_drop_path_rates
from timm.models import build_model_with_cfg, generate_default_cfgs, named_apply
from timm.models.swin_transformer import SwinTransformer, WindowAttention
from timm.models.swin_transformer import checkpoint_filter_fn as _swin_checkpoint_filter_fn
from timm.models.vision_transformer import init_weights_vit_timm
from torch import nn

import kernels

from .._registry import register_model
from ..layers.agent_attention import AgentAttention, resize_agent_biases
from ..layers.checks import check_image_input
from ..layers.layer_norm import enable_fast_layer_norm
from ..layers.patch_embed import PatchEmbed
from .agent_deit import agent_cfg

__all__ = ["AgentSwinTransformer"]


def parse_attn_type(attn_type: str, depths: Sequence[int]) -> Tuple[Tuple[str, ...], ...]:
    """Per-block 'A' (agent) / 'B' (window) layout from the reference's code: 'AAAB', 'AABB', 'AAMB2', ..."""
    n = len(depths)
    letters, count = attn_type[:n], attn_type[n:]
    if len(letters) != n or set(letters) - {"A", "B", "M"} or ("M" in letters) != bool(count) or \
            (count and not count.isdigit()):
        raise ValueError(f"attn_type must be one letter per stage ({n}) from 'A'/'B'/'M', followed by the number "
                         f"of agent blocks when an 'M' stage is present (e.g. 'AAMB2'), got {attn_type!r}")
    layout = []
    for letter, depth in zip(letters, depths):
        if letter == "M":
            layout.append(tuple("A" if j < int(count) else "B" for j in range(depth)))
        else:
            layout.append((letter,) * depth)
    return tuple(layout)


class KernelWindowAttention(WindowAttention):
    """timm's Swin window attention (same parameters and buffers) computed by `kernels.attention`."""

    def __init__(self, *args, **kwargs):
        if kwargs.get("attn_drop"):
            raise NotImplementedError(f"attention dropout is not supported by kernels.attention, got "
                                      f"attn_drop={kwargs['attn_drop']}")
        super().__init__(*args, **kwargs)
        self.backend: Optional[str] = None

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B_, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # (B_, h, N, d)
        bias = self._get_rel_pos_bias()  # (1, h, N, N)
        if mask is not None:
            # windows are batch-major (B_ = B·nW): fold the window axis into the heads so one bias broadcasts
            nw, h = mask.shape[0], self.num_heads
            bias = (bias + mask.unsqueeze(1).to(bias.dtype)).reshape(1, nw * h, N, N)
            q, k, v = (t.reshape(B_ // nw, nw * h, N, -1) for t in (q, k, v))  # (B, nW·h, N, d)
        x = kernels.attention(q, k, v, bias=bias, scale=self.scale, backend=self.backend)
        x = x.reshape(B_, self.num_heads, N, -1).transpose(1, 2).reshape(B_, N, -1)
        return self.proj_drop(self.proj(x))


class AgentSwinBlock(nn.Module):
    """Swin block whose attention is global agent attention over the stage grid (NHWC in and out)."""

    def __init__(self, dim: int, input_resolution: Tuple[int, int], num_heads: int, agent_num: int = 49,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, proj_drop: float = 0.0, drop_path: float = 0.0,
                 act_layer=nn.GELU, norm_layer=nn.LayerNorm, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.input_resolution = tuple(input_resolution)
        self.norm1 = norm_layer(dim, **dd)
        self.attn = AgentAttention(dim, num_heads=num_heads, agent_num=agent_num, bias_grid=self.input_resolution,
                                   qkv_bias=qkv_bias, proj_drop=proj_drop, **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop,
                       **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        enable_fast_layer_norm(self)  # inference: the norms write what the linear layers read

    def set_input_size(self, feat_size: Tuple[int, int], window_size=None, always_partition=None) -> None:
        # agent blocks are global: the window is moot and the biases are interpolated to any grid per forward
        self.input_resolution = tuple(feat_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        y = self.attn(self.norm1(x).reshape(B, H * W, C), (H, W)).reshape(B, H, W, C)
        x = x + self.drop_path1(y)
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x


class AgentSwinTransformer(SwinTransformer):
    """Swin Transformer with Agent Attention blocks (Agent-Swin, arXiv:2312.08874).

    Args:
        img_size: input size the agent biases are sized for; other sizes work (inputs are padded to the patch,
            window blocks build their shift masks per forward, agent biases are interpolated).
        patch_size: patch size.
        in_chans: input channels.
        num_classes: classifier classes (0: no classifier).
        global_pool: 'avg' or '' (timm's Swin head).
        embed_dim: width of the first stage (doubles per stage).
        depths, num_heads: per-stage block counts and heads.
        window_size: window of the window-attention ('B') blocks (the registered models default to img_size // 32,
            the reference's configs: 7 at 224 px, 9 at 288, 12 at 384).
        agent_num: agents per stage, perfect squares (9-16-49-49).
        attn_type: per-stage layout, see `parse_attn_type` ('AAAB', 'AABB', 'AAMB2').
        mlp_ratio: MLP hidden ratio.
        qkv_bias: bias on the q/k/v projections.
        drop_rate, proj_drop_rate, drop_path_rate: head dropout, projection dropout, stochastic depth.
        strict_img_size: require the input to be exactly `img_size` (timm's flag); False by default.
        device, dtype: factory kwargs.
        **kwargs: other timm SwinTransformer arguments (head_dim, norm_layer, weight_init, ...).
    """

    def __init__(self, img_size: Union[int, Tuple[int, int]] = 224, patch_size: int = 4, in_chans: int = 3,
                 num_classes: int = 1000, global_pool: str = "avg", embed_dim: int = 96,
                 depths: Sequence[int] = (2, 2, 6, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                 window_size: int = 7, agent_num: Sequence[int] = (9, 16, 49, 49), attn_type: str = "AAAB",
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_rate: float = 0.0, proj_drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.1, strict_img_size: bool = False,
                 device=None, dtype=None, **kwargs):
        layout = parse_attn_type(attn_type, depths)
        if len(agent_num) != len(depths):
            raise ValueError(f"agent_num needs one entry per stage ({len(depths)}), got {tuple(agent_num)}")
        if attn_drop_rate:
            raise NotImplementedError(f"attention dropout is not supported by kernels.attention, got "
                                      f"{attn_drop_rate=}")
        if "embed_layer" not in kwargs:
            kwargs["embed_layer"] = partial(PatchEmbed, dynamic_img_pad=not strict_img_size)
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
                         global_pool=global_pool, embed_dim=embed_dim, depths=depths, num_heads=num_heads,
                         window_size=window_size, strict_img_size=strict_img_size, mlp_ratio=mlp_ratio,
                         qkv_bias=qkv_bias, drop_rate=drop_rate, proj_drop_rate=proj_drop_rate,
                         drop_path_rate=drop_path_rate, device=device, dtype=dtype, **kwargs)
        dd = dict(device=device, dtype=dtype)
        self.attn_type = attn_type
        dpr = calculate_drop_path_rates(drop_path_rate, depths, stagewise=True)
        for i, stage in enumerate(self.layers):
            for j, blk in enumerate(stage.blocks):
                dim = blk.norm1.normalized_shape[0]
                if layout[i][j] == "A":
                    norm = partial(type(blk.norm1), eps=blk.norm1.eps)
                    new = AgentSwinBlock(dim, stage.output_resolution, num_heads[i], agent_num=int(agent_num[i]),
                                         mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop_rate,
                                         drop_path=dpr[i][j], norm_layer=norm, **dd)
                    stage.blocks[j] = new
                else:  # same parameters as timm's WindowAttention, computed by kernels.attention
                    head_dim = blk.attn.qkv.out_features // (3 * num_heads[i])
                    new = KernelWindowAttention(dim, num_heads=num_heads[i], head_dim=head_dim,
                                                window_size=blk.window_size, qkv_bias=qkv_bias,
                                                proj_drop=proj_drop_rate, **dd)
                    blk.attn = new
                if kwargs.get("weight_init", "") != "skip":
                    named_apply(partial(init_weights_vit_timm, needs_reset=False), new)

    def _check_input(self, x: torch.Tensor) -> None:
        check_image_input(x, self.in_chans, fixed_size=self.patch_embed.fixed_img_size)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return super().forward_features(x)

    def forward_intermediates(self, x: torch.Tensor, *args, **kwargs):
        """timm's Swin `forward_intermediates` (NCHW stage outputs), with the input checked first."""
        self._check_input(x)
        return super().forward_intermediates(x, *args, **kwargs)


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: AgentSwinTransformer) -> Dict[str, torch.Tensor]:
    """Reference Agent-Swin checkpoints use the original Swin layout: timm's Swin filter (downsample moved to the
    next stage, `head` -> `head.fc`, buffers dropped, tables resized), then the agent biases resampled."""
    return resize_agent_biases(_swin_checkpoint_filter_fn(state_dict, model), model)


def _create_agent_swin(variant: str, pretrained: bool = False, **kwargs) -> AgentSwinTransformer:
    out_indices = kwargs.pop("out_indices", tuple(range(len(kwargs.get("depths", (2, 2, 6, 2))))))
    if kwargs.get("window_size") is None:  # the reference's window blocks: img_size / 32 (7 at 224, 12 at 384)
        img = kwargs.get("img_size", 224)
        kwargs["window_size"] = max(1, (min(img) if isinstance(img, (tuple, list)) else img) // 32)
    return build_model_with_cfg(
        AgentSwinTransformer, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


_cfg = partial(agent_cfg, pool_size=(7, 7), first_conv="patch_embed.proj", classifier="head.fc")


default_cfgs = generate_default_cfgs({
    "agent_swin_tiny": _cfg(),
    "agent_swin_small": _cfg(),
    "agent_swin_base": _cfg(),
    "test_agent_swin": _cfg(input_size=(3, 64, 64), pool_size=(4, 4), crop_pct=1.0),
})


@register_model
def agent_swin_tiny(pretrained: bool = False, **kwargs) -> AgentSwinTransformer:
    """Agent-Swin-T (29M, layout AAAB, agents 9-16-49-49), arXiv:2312.08874."""
    model_args = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
                      agent_num=(9, 16, 49, 49), attn_type="AAAB", drop_path_rate=0.2)
    return _create_agent_swin("agent_swin_tiny", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def agent_swin_small(pretrained: bool = False, **kwargs) -> AgentSwinTransformer:
    """Agent-Swin-S (50M, layout AABB, agents 9-16-49-49), arXiv:2312.08874."""
    model_args = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24),
                      agent_num=(9, 16, 49, 49), attn_type="AABB", drop_path_rate=0.3)
    return _create_agent_swin("agent_swin_small", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def agent_swin_base(pretrained: bool = False, **kwargs) -> AgentSwinTransformer:
    """Agent-Swin-B (88M, layout AAMB2: 2 agent blocks in stage 3, agents 9-16-49-49), arXiv:2312.08874."""
    model_args = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
                      agent_num=(9, 16, 49, 49), attn_type="AAMB2", drop_path_rate=0.5)
    return _create_agent_swin("agent_swin_base", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def test_agent_swin(pretrained: bool = False, **kwargs) -> AgentSwinTransformer:
    """Tiny Agent-Swin for tests: 64 px, widths 16-32-64, 4 blocks (agent, agent, agent + shifted window 2)."""
    model_args = dict(img_size=64, embed_dim=16, depths=(1, 1, 2), num_heads=(1, 2, 4), window_size=2,
                      mlp_ratio=2.0, agent_num=(4, 9, 4), attn_type="AAM1", drop_path_rate=0.0)
    return _create_agent_swin("test_agent_swin", pretrained=pretrained, **dict(model_args, **kwargs))
