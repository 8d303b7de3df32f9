"""Agent-DeiT: DeiT with Agent Attention.

Paper: Han et al., "Agent Attention: On the Integration of Softmax and Linear Attention", ECCV 2024
(arXiv:2312.08874). Reference code (read, not copied): LeapLabTHU/Agent-Attention @207ce3e,
`agent_transformer/models/agent_deit.py` and `cfgs/agent_deit_{t,s,b}.yaml`, MIT licence. No weights ship here;
the reference checkpoints use the same parameter names (timm ViT layout plus the agent biases).

Built on timm's `VisionTransformer` (patch embed, class token, position embedding, head) with the blocks swapped
for agent-attention blocks: every block for T/S (49 agents), the first 4 of 12 for B (81 agents), the rest dense
attention through `kernels.attention`. Any input size: the position embedding is resampled as timm does with
`dynamic_img_size`, inputs are padded to a multiple of the patch, and the agent biases are interpolated to the grid.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, LayerNorm, LayerScale, Mlp, to_2tuple
from timm.models import build_model_with_cfg, checkpoint, generate_default_cfgs
from timm.models._features import feature_take_indices
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn as _vit_checkpoint_filter_fn
from torch import nn

from .._registry import register_model
from ..layers.checks import check_image_input
from ..layers.layer_norm import enable_fast_layer_norm
from ..layers.agent_attention import AgentAttention, resize_agent_biases
from ..layers.attention import Attention
from ..layers.patch_embed import PatchEmbed

__all__ = ["AgentDeiT"]


class AgentBlock(nn.Module):
    """Pre-norm transformer block over a token grid: agent attention (or dense attention) and an MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 qk_norm: bool = False, proj_drop: float = 0.0, attn_drop: float = 0.0,
                 init_values: Optional[float] = None, drop_path: float = 0.0, act_layer=nn.GELU,
                 norm_layer=LayerNorm, mlp_layer=Mlp, depth: int = 0, agent_num: int = 49,
                 agent_layers: Optional[int] = None, bias_grid=(14, 14), num_prefix_tokens: int = 1,
                 device=None, dtype=None, **kwargs):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if attn_drop:
            raise NotImplementedError(f"attention dropout is not supported by kernels.attention, got {attn_drop=}")
        unsupported = {k: v for k, v in kwargs.items()
                       if v and k in ("scale_attn_norm", "scale_mlp_norm") or (k == "proj_bias" and not v)}
        if unsupported:
            raise NotImplementedError(f"AgentBlock does not support {unsupported}")
        self.agent = agent_layers is None or depth < agent_layers
        self.norm1 = norm_layer(dim, **dd)
        if self.agent:
            if qk_norm:
                raise NotImplementedError("qk_norm is not part of agent attention")
            self.attn = AgentAttention(dim, num_heads=num_heads, agent_num=agent_num, bias_grid=bias_grid,
                                       num_prefix_tokens=num_prefix_tokens, qkv_bias=qkv_bias, proj_drop=proj_drop,
                                       **dd)
        else:
            self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm,
                                  proj_drop=proj_drop, **dd)
        self.ls1 = LayerScale(dim, init_values=init_values, **dd) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = mlp_layer(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer,
                             drop=proj_drop, **dd)
        self.ls2 = LayerScale(dim, init_values=init_values, **dd) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        enable_fast_layer_norm(self)  # inference: the norms write what the linear layers read

    def forward(self, x: torch.Tensor, feat_size: Tuple[int, int]) -> torch.Tensor:
        y = self.norm1(x)
        y = self.attn(y, feat_size) if self.agent else self.attn(y)
        x = x + _residual(y, self.ls1, self.drop_path1)
        x = x + _residual(self.mlp(self.norm2(x)), self.ls2, self.drop_path2)
        return x


def _residual(y: torch.Tensor, layer_scale: nn.Module, drop_path: nn.Module) -> torch.Tensor:
    """drop_path(layer_scale(y)), not calling `nn.Identity` ones without hooks (DeiT's defaults): a module call is
    several microseconds of host time, and agent_deit's inference at 224 px waits on the host."""
    if not _bare_identity(layer_scale):
        y = layer_scale(y)
    return y if _bare_identity(drop_path) else drop_path(y)


def _bare_identity(module: nn.Module) -> bool:
    return type(module) is nn.Identity and not (module._forward_hooks or module._forward_pre_hooks)


class AgentDeiT(VisionTransformer):
    """DeiT whose blocks use Agent Attention (Agent-DeiT, arXiv:2312.08874).

    Args:
        img_size: input size the position embedding and the agent biases are sized for; other sizes work
            (the embedding is resampled and the biases interpolated per forward).
        patch_size: patch size.
        in_chans: input channels.
        num_classes: classifier classes (0: no classifier).
        global_pool: 'token' (class token, the reference), 'avg', ... as timm's VisionTransformer.
        agent_num: agents per agent block, a perfect square (49 for T/S, 81 for B).
        agent_layers: the first `agent_layers` blocks use agent attention, the others dense attention through
            `kernels.attention`; None: all blocks (the reference's `agent_layer=-1`).
        dynamic_img_size: accept any grid, resampling the position embedding per forward (timm's flag).
        dynamic_img_pad: pad inputs to a multiple of the patch size.
        drop_path_rate: stochastic depth rate.
        device, dtype: factory kwargs.
        **kwargs: the rest of timm's VisionTransformer arguments (embed_dim, depth, num_heads, mlp_ratio,
            qkv_bias, class_token, reg_tokens, init_values, drop_rate, ...).
    """

    def __init__(self, img_size: Union[int, Tuple[int, int]] = 224, patch_size: Union[int, Tuple[int, int]] = 16,
                 in_chans: int = 3, num_classes: int = 1000, global_pool: str = "token", agent_num: int = 49,
                 agent_layers: Optional[int] = None, dynamic_img_size: bool = True, dynamic_img_pad: bool = True,
                 drop_path_rate: float = 0.0, device=None, dtype=None, **kwargs):
        if kwargs.get("patch_drop_rate"):
            raise NotImplementedError("patch dropout breaks the token grid agent attention pools from")
        if kwargs.get("pos_embed", "learn") != "learn" or kwargs.get("no_embed_class"):
            raise NotImplementedError("AgentDeiT uses a learned position embedding that covers the class token")
        grid = tuple(s // p for s, p in zip(to_2tuple(img_size), to_2tuple(patch_size)))
        num_prefix = int(kwargs.get("class_token", True)) + kwargs.get("reg_tokens", 0)
        block_fn = partial(AgentBlock, agent_num=agent_num, agent_layers=agent_layers, bias_grid=grid,
                           num_prefix_tokens=num_prefix)
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
                         global_pool=global_pool, dynamic_img_size=dynamic_img_size, dynamic_img_pad=dynamic_img_pad,
                         drop_path_rate=drop_path_rate, block_fn=block_fn, device=device, dtype=dtype,
                         **{"embed_layer": PatchEmbed, **kwargs})
        self.agent_num = agent_num

    def _embed(self, x: torch.Tensor):
        check_image_input(x, self.in_chans, fixed_size=self.patch_embed.fixed_img_size)
        x = self.patch_embed(x)
        feat_size = tuple(x.shape[1:3]) if self.dynamic_img_size else tuple(self.patch_embed.grid_size)
        x = self._pos_embed(x)
        x = self.norm_pre(x)
        return x, feat_size

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x, feat_size = self._embed(x)
        for blk in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x, feat_size)
            else:
                x = blk(x, feat_size)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
            output_dict: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]], Dict[str, Any]]:
        """Forward that also returns the outputs of chosen blocks (timm's contract).

        Args:
            x: images `(B, C, H, W)`.
            indices: the last n blocks if an int, all if None, else the block indices to take.
            return_prefix_tokens: pair each intermediate with its prefix (class) tokens.
            norm: apply the final norm to the intermediates.
            stop_early: stop after the last block taken.
            output_fmt: 'NCHW' (grid maps) or 'NLC' (tokens).
            intermediates_only: return only the intermediates.
            output_dict: return a dict with 'image_features' / 'image_intermediates' (and '_prefix').

        Returns:
            `(final_features, intermediates)`, the intermediates, or the dict.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        x, (H, W) = self._embed(x)
        B = x.shape[0]
        blocks = self.blocks[:max_index + 1] if stop_early else self.blocks
        intermediates = []
        for i, blk in enumerate(blocks):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x, (H, W))
            else:
                x = blk(x, (H, W))
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)
        P = self.num_prefix_tokens
        prefix_tokens = [y[:, :P] for y in intermediates] if P else None
        intermediates = [y[:, P:] for y in intermediates]
        if output_fmt == "NCHW":
            intermediates = [y.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if output_dict:
            out = {"image_intermediates": intermediates}
            if prefix_tokens is not None and return_prefix_tokens:
                out["image_intermediates_prefix"] = prefix_tokens
            if not intermediates_only:
                out["image_features"] = self.norm(x)
            return out
        if return_prefix_tokens and prefix_tokens is not None:
            intermediates = list(zip(intermediates, prefix_tokens))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: AgentDeiT) -> Dict[str, torch.Tensor]:
    """Reference Agent-DeiT checkpoints use timm's ViT names: timm's ViT filter (position embedding resampled to
    the model's grid), then the per-axis agent biases resampled to the model's bias grid."""
    return resize_agent_biases(_vit_checkpoint_filter_fn(state_dict, model), model)


def _create_agent_deit(variant: str, pretrained: bool = False, **kwargs) -> AgentDeiT:
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(
        AgentDeiT, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


def agent_cfg(**kwargs) -> Dict[str, Any]:
    """The pretrained_cfg shared by the Agent Attention families (224 px ImageNet-1k, no downloadable weights)."""
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None,
        # the reference's eval transform: resize to a 256 x 256 square, centre crop 224 (timm: squash, 0.875)
        "crop_pct": 0.875, "crop_mode": "squash", "interpolation": "bicubic", "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj", "classifier": "head",
        "paper_ids": "arXiv:2312.08874",
        "paper_name": "Agent Attention: On the Integration of Softmax and Linear Attention",
        "license": "mit",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "agent_deit_tiny": agent_cfg(),
    "agent_deit_small": agent_cfg(),
    "agent_deit_base": agent_cfg(),
    "test_agent_deit": agent_cfg(input_size=(3, 64, 64), crop_pct=1.0),
})


@register_model
def agent_deit_tiny(pretrained: bool = False, **kwargs) -> AgentDeiT:
    """Agent-DeiT-T (6.0M, 49 agents in all 12 blocks), arXiv:2312.08874. Stochastic depth per family and size
    follows the reference training configs (override with `drop_path_rate=`)."""
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, drop_path_rate=0.0, agent_num=49)
    return _create_agent_deit("agent_deit_tiny", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def agent_deit_small(pretrained: bool = False, **kwargs) -> AgentDeiT:
    """Agent-DeiT-S (22.7M, 49 agents in all 12 blocks), arXiv:2312.08874."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, drop_path_rate=0.1, agent_num=49)
    return _create_agent_deit("agent_deit_small", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def agent_deit_base(pretrained: bool = False, **kwargs) -> AgentDeiT:
    """Agent-DeiT-B (87.2M, 81 agents in the first 4 of 12 blocks), arXiv:2312.08874."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, drop_path_rate=0.3, agent_num=81,
                      agent_layers=4)
    return _create_agent_deit("agent_deit_base", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def test_agent_deit(pretrained: bool = False, **kwargs) -> AgentDeiT:
    """Tiny Agent-DeiT for tests: 64 px, patch 8, width 64, 4 blocks (3 agent, 1 dense), 16 agents."""
    model_args = dict(img_size=64, patch_size=8, embed_dim=64, depth=4, num_heads=2, mlp_ratio=2.0, agent_num=16,
                      agent_layers=3)
    return _create_agent_deit("test_agent_deit", pretrained=pretrained, **dict(model_args, **kwargs))
