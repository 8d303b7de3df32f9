"""NiNformer ("NiNformer: A Network in Network Transformer with Token Mixing Generated Gating Function",
arXiv 2403.02411; Neural Computing and Applications 2025).

Conv patchify → NiN blocks (`zoo.layers.NiNBlock`: an MLP-Mixer gating unit times a linear projection, then an
FFN, one shared LayerNorm) → mean over tokens → linear classifier, after the reference code
Abdullah-88/NiNformer (`ninformer.py`, `train.py`; read, not copied). There is no position embedding, class
token or final norm, as in the reference.

`ninformer_cifar` is the reference's CIFAR-10 configuration (32 px, patch 4 → 64 tokens, d=256, d_ffn=512,
4 layers, dropout 0.5). `ninformer_small` (d=64, d_ffn=128, 4 layers, no dropout; trains on CPU in
seconds) and `ninformer_large` (d=384, d_ffn=768, 6 layers) are zoo siblings at the same resolution, not from
the paper.

The token-mixing MLP has weights over the token axis, so a model runs at the image size it was built for
(`fixed_input_size`); build another size with `img_size=`.
"""
from __future__ import annotations

from typing import List, Optional, Tuple, Union

import torch
from timm.layers import PatchEmbed, calculate_drop_path_rates, to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq
from torch import nn

from .._registry import register_model
from ..layers.checks import check_image_input
from ..layers.nin import NiNBlock

__all__ = ["NiNformer"]


class NiNformer(nn.Module):
    """NiNformer image classifier.

    Args:
        img_size: input size the token-mixing MLPs are built for.
        patch_size: square patch side (a strided conv); `img_size % patch_size == 0`.
        in_chans: input channels.
        num_classes: classifier outputs; 0 gives pooled features.
        global_pool: "avg" (mean over tokens, as in the reference) or "" (no pooling).
        embed_dim: token width d_model.
        depth: NiN blocks.
        ffn_dim: d_ffn, hidden width of the FFN and of the Mixer's token and channel MLPs.
        drop_rate: dropout before the classifier.
        proj_drop_rate: dropout inside the MLPs (the reference's `dropout`, 0.5 on CIFAR-10).
        drop_path_rate: stochastic depth, increasing linearly over the blocks.
        device, dtype: factory kwargs for the parameters.
    """

    def __init__(self, img_size: Union[int, Tuple[int, int]] = 32, patch_size: int = 4, in_chans: int = 3,
                 num_classes: int = 10, global_pool: str = "avg", embed_dim: int = 256, depth: int = 4,
                 ffn_dim: int = 512, drop_rate: float = 0.0, proj_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, device=None, dtype=None):
        super().__init__()
        img_size = to_2tuple(img_size)
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        if img_size[0] % patch_size or img_size[1] % patch_size:
            raise ValueError(f"img_size must be a multiple of patch_size={patch_size}, got {img_size}")
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be a positive int, got {depth!r}")
        dd = dict(device=device, dtype=dtype)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.in_chans = in_chans
        self.img_size = img_size
        self.patch_size = patch_size
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 0
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, **dd)
        self.grid_size = self.patch_embed.grid_size
        num_tokens = self.grid_size[0] * self.grid_size[1]
        dpr = calculate_drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.Sequential(*[
            NiNBlock(embed_dim, num_tokens, ffn_dim, drop=proj_drop_rate, drop_path=dpr[i], **dd)
            for i in range(depth)])
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=patch_size)
                             for i in range(depth)]
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.init_weights()

    def init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(stem=r"^patch_embed", blocks=[(r"^blocks\.(\d+)", None)])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        w = self.patch_embed.proj.weight
        self.head = (nn.Linear(self.embed_dim, num_classes, device=w.device, dtype=w.dtype) if num_classes > 0
                     else nn.Identity())

    def _check_input(self, x: torch.Tensor) -> None:
        check_image_input(x, self.in_chans, fixed_size=self.img_size)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens `(B, H/p·W/p, embed_dim)` after the last block."""
        self._check_input(x)
        x = self.patch_embed(x)  # (B, N, C), row-major patches
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """Block outputs (timm's signature): `(final_tokens, [intermediates])`, or the list alone.

        Args:
            x: images `(B, C, H, W)` at the model's `img_size`.
            indices: take the last n blocks if int, all if None, the listed blocks if a sequence.
            norm: accepted for timm compatibility; NiNformer has no final norm, so it changes nothing.
            stop_early: stop after the last requested block.
            output_fmt: "NCHW" (patch grid) or "NLC" (tokens).
            intermediates_only: return only the intermediates.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        self._check_input(x)
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        B = x.shape[0]
        x = self.patch_embed(x)
        blocks = self.blocks[:max_index + 1] if stop_early else self.blocks
        intermediates = []
        for i, blk in enumerate(blocks):
            x = blk(x)
            if i in take_indices:
                intermediates.append(x)
        if output_fmt == "NCHW":
            gh, gw = self.grid_size
            intermediates = [y.reshape(B, gh, gw, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop the blocks after the last requested intermediate (and optionally the head)."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices


def _create_ninformer(variant: str, pretrained: bool = False, **kwargs) -> NiNformer:
    out_indices = kwargs.pop("out_indices", min(3, kwargs.get("depth", 4)))
    return build_model_with_cfg(NiNformer, variant, pretrained,
                                feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **kwargs)


def _cfg(**kwargs):
    return dict(num_classes=10, input_size=(3, 32, 32), fixed_input_size=True, pool_size=None,
                mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear", crop_pct=1.0,
                first_conv="patch_embed.proj", classifier="head", license="mit", paper_ids="arXiv:2403.02411",
                paper_name="NiNformer: A Network in Network Transformer with Token Mixing Generated Gating "
                           "Function", origin_url="https://github.com/Abdullah-88/NiNformer", **kwargs)


default_cfgs = generate_default_cfgs({
    "ninformer_small": _cfg(),
    "ninformer_cifar": _cfg(),
    "ninformer_large": _cfg(),
    "test_ninformer": _cfg(),
})


@register_model
def ninformer_small(pretrained: bool = False, **kwargs) -> NiNformer:
    """NiNformer-Small (zoo sibling: 32 px, patch 4, d=64, d_ffn=128, 4 layers, no dropout)."""
    model_args = dict(patch_size=4, embed_dim=64, depth=4, ffn_dim=128)
    return _create_ninformer("ninformer_small", pretrained, **dict(model_args, **kwargs))


@register_model
def ninformer_cifar(pretrained: bool = False, **kwargs) -> NiNformer:
    """NiNformer, the reference CIFAR-10 configuration (32 px, patch 4, d=256, d_ffn=512, 4 layers)."""
    model_args = dict(patch_size=4, embed_dim=256, depth=4, ffn_dim=512, proj_drop_rate=0.5)
    return _create_ninformer("ninformer_cifar", pretrained, **dict(model_args, **kwargs))


@register_model
def ninformer_large(pretrained: bool = False, **kwargs) -> NiNformer:
    """NiNformer-Large (zoo sibling: 32 px, patch 4, d=384, d_ffn=768, 6 layers)."""
    model_args = dict(patch_size=4, embed_dim=384, depth=6, ffn_dim=768, proj_drop_rate=0.5)
    return _create_ninformer("ninformer_large", pretrained, **dict(model_args, **kwargs))


@register_model
def test_ninformer(pretrained: bool = False, **kwargs) -> NiNformer:
    """Tiny NiNformer (32 px, patch 8, d=32, d_ffn=64, 2 layers) for the generic model tests."""
    model_args = dict(patch_size=8, embed_dim=32, depth=2, ffn_dim=64)
    return _create_ninformer("test_ninformer", pretrained, **dict(model_args, **kwargs))
