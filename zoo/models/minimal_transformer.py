"""Minimal vision transformers of "Reducing the Transformer Architecture to a Minimum" (Bermeitinger, Hrycej,
Pavone, Kath, Handschuh; KDIR 2024, arXiv 2410.13732).

A ViT-style encoder whose layers can drop the MLP (*noMLP*), collapse the query and key matrices into one
W_qk (*Wqk*), make W_qk = T Tᵀ symmetric (*sym*), and omit the value and output matrices (*noWv/Wo*), alone or
combined; attention runs through `kernels.attention` (`zoo.layers.MinimalAttention`).

Configuration. The paper trains a Keras ViT-style encoder (6 or 12 layers, 1 or 4 heads) on MNIST and
CIFAR-10 and counts per layer 4N² attention parameters and ≈8N² in the MLP (hidden width 4N). Its
parameter totals as quoted in the project spec (6 encoders 287,686 with MLP / 101,470 without; 12 encoders
563,242 / 198,100) cannot all come from one layout that differs only in depth and MLP: the with-minus-without
gap is 186,216 = 6·31,036 at 6 encoders but 365,142 at 12, which is not a multiple of 12; no searched
(width, MLP width, patch, token, head) layout reproduces any of them exactly. The one public
re-implementation (Abdessamad-Badaoui/Reducing_the_Transformer_Architecture_to_a_Minimum) uses width 64,
16 patch tokens (MNIST 28 px patch 7, CIFAR 32 px patch 8), a class token, 6 layers and an MLP of width 64
(its counts: 156,298 / 106,378 for MNIST). The zoo takes that token layout and width and the paper's MLP
accounting (hidden 4N): width 64, 6 layers, 1 head, MLP 256, pre-norm blocks (the MLP's LayerNorm goes with the
MLP), class-token pooling, a final LayerNorm, biases on the projections (Keras Dense layers). `depth=12`,
`num_heads=4` and `mlp_ratio` are constructor arguments.
"""
from __future__ import annotations

from typing import List, Optional, Tuple, Union

import torch
from timm.layers import DropPath, Mlp, calculate_drop_path_rates, resample_abs_pos_embed, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq
from torch import nn

from .._registry import register_model
from ..layers.checks import check_image_input
from ..layers.minimal_attention import MinimalAttention
from ..layers.patch_embed import PatchEmbed

__all__ = ["MinimalViT"]


class MinimalBlock(nn.Module):
    """Pre-norm encoder layer: `x + attn(LN(x))`, then `x + MLP(LN(x))` unless the MLP is dropped."""

    def __init__(self, dim: int, num_heads: int, qk: str = "full", value_proj: bool = True, mlp: bool = True,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, proj_drop: float = 0.0, drop_path: float = 0.0,
                 act_layer=nn.GELU, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.norm1 = nn.LayerNorm(dim, **dd)
        self.attn = MinimalAttention(dim, num_heads, qk=qk, value_proj=value_proj, qkv_bias=qkv_bias,
                                     proj_drop=proj_drop, **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        if mlp:
            self.norm2 = nn.LayerNorm(dim, **dd)
            self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop, **dd)
            self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        else:
            self.mlp = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        if self.mlp is not None:
            x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x


class MinimalViT(nn.Module):
    """ViT-style classifier with the paper's reduced encoder layers.

    Args:
        img_size: default input size; other sizes work (the image is zero-padded on the bottom/right to a
            multiple of `patch_size`, and the position embeddings are resampled to the patch grid).
        patch_size: square patch side.
        in_chans: input channels.
        num_classes: classifier outputs; 0 gives pooled features.
        global_pool: "token" (class token, default), "avg" (mean of patch tokens) or "" (no pooling).
        embed_dim: token width N.
        depth: encoder layers (the paper: 6 or 12).
        num_heads: attention heads (the paper's collapsed variants use 1).
        qk: "full", "collapsed" (Wqk), "symmetric" (W_qk = T Tᵀ) or "tied" (W_k := W_q).
        value_proj: keep W_v and W_o (False: the noWv/Wo variant).
        mlp: keep the MLP in every layer (False: the noMLP variant).
        mlp_ratio: MLP hidden width over `embed_dim` (4: the paper's ≈8N² per layer).
        qkv_bias: bias on the attention projections.
        class_token: prepend a class token.
        drop_rate: dropout before the classifier.
        proj_drop_rate: dropout after the attention output and inside the MLP.
        drop_path_rate: stochastic depth, increasing linearly over the layers.
        device, dtype: factory kwargs for the parameters.
    """

    def __init__(self, img_size: Union[int, Tuple[int, int]] = 28, patch_size: int = 7, in_chans: int = 1,
                 num_classes: int = 10, global_pool: str = "token", embed_dim: int = 64, depth: int = 6,
                 num_heads: int = 1, qk: str = "full", value_proj: bool = True, mlp: bool = True,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, class_token: bool = True, drop_rate: float = 0.0,
                 proj_drop_rate: float = 0.0, drop_path_rate: float = 0.0, device=None, dtype=None):
        super().__init__()
        if global_pool not in ("token", "avg", ""):
            raise ValueError(f"global_pool must be 'token', 'avg' or '', got {global_pool!r}")
        if global_pool == "token" and not class_token:
            raise ValueError("global_pool='token' needs class_token=True")
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be a positive int, got {depth!r}")
        dd = dict(device=device, dtype=dtype)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.in_chans = in_chans
        self.patch_size = patch_size
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1 if class_token else 0
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, output_fmt="NHWC",
                                      strict_img_size=False, dynamic_img_pad=True, **dd)
        self.grid_size = self.patch_embed.grid_size
        num_patches = self.grid_size[0] * self.grid_size[1]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim, **dd)) if class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + self.num_prefix_tokens, embed_dim, **dd))
        dpr = calculate_drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.Sequential(*[
            MinimalBlock(embed_dim, num_heads, qk=qk, value_proj=value_proj, mlp=mlp, mlp_ratio=mlp_ratio,
                         qkv_bias=qkv_bias, proj_drop=proj_drop_rate, drop_path=dpr[i], **dd)
            for i in range(depth)])
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=patch_size)
                             for i in range(depth)]
        self.norm = nn.LayerNorm(embed_dim, **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.init_weights()

    def init_weights(self) -> None:
        trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"pos_embed", "cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(stem=r"^cls_token|^pos_embed|^patch_embed", blocks=[(r"^blocks\.(\d+)", None),
                                                                      (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None:
            if global_pool not in ("token", "avg", ""):
                raise ValueError(f"global_pool must be 'token', 'avg' or '', got {global_pool!r}")
            if global_pool == "token" and self.cls_token is None:
                raise ValueError("global_pool='token' needs a class token")
            self.global_pool = global_pool
        self.num_classes = num_classes
        dd = dict(device=self.pos_embed.device, dtype=self.pos_embed.dtype)
        self.head = nn.Linear(self.embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()

    def _check_input(self, x: torch.Tensor) -> None:
        check_image_input(x, self.in_chans)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # (B, gh, gw, C)
        B, gh, gw, C = x.shape
        pos = self.pos_embed
        if (gh, gw) != tuple(self.grid_size):
            pos = resample_abs_pos_embed(pos, (gh, gw), old_size=self.grid_size,
                                         num_prefix_tokens=self.num_prefix_tokens)
        x = x.reshape(B, gh * gw, C)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)
        return x + pos

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens `(B, num_prefix_tokens + H/p·W/p, embed_dim)` after the final norm."""
        self._check_input(x)
        x = self._embed(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "token":
            x = x[:, 0]
        elif self.global_pool == "avg":
            x = x[:, self.num_prefix_tokens:].mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              return_prefix_tokens: bool = False, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        """Block outputs (timm's signature): `(final_tokens, [intermediates])`, or the list alone.

        Args:
            x: images `(B, C, H, W)`.
            indices: take the last n blocks if int, all if None, the listed blocks if a sequence.
            return_prefix_tokens: pair each intermediate with its prefix (class) tokens.
            norm: apply the final norm to the intermediates.
            stop_early: stop after the last requested block.
            output_fmt: "NCHW" (patch grid) or "NLC" (tokens).
            intermediates_only: return only the intermediates.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        self._check_input(x)
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        B, _, H, W = x.shape
        x = self._embed(x)
        blocks = self.blocks[:max_index + 1] if stop_early else self.blocks
        intermediates = []
        for i, blk in enumerate(blocks):
            x = blk(x)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)
        npt = self.num_prefix_tokens
        prefix = [y[:, :npt] for y in intermediates]
        intermediates = [y[:, npt:] for y in intermediates]
        if output_fmt == "NCHW":
            gh, gw = self.patch_embed.dynamic_feat_size((H, W))
            intermediates = [y.reshape(B, gh, gw, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if return_prefix_tokens and npt:
            intermediates = list(zip(intermediates, prefix))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop the blocks after the last requested intermediate (and optionally the norm and head)."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices


def _create_minimal_vit(variant: str, pretrained: bool = False, **kwargs) -> MinimalViT:
    out_indices = kwargs.pop("out_indices", min(3, kwargs.get("depth", 6)))
    return build_model_with_cfg(MinimalViT, variant, pretrained,
                                feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **kwargs)


_PAPER = dict(paper_ids="arXiv:2410.13732", paper_name="Reducing the Transformer Architecture to a Minimum")


def _cfg_mnist(**kwargs):
    return dict(num_classes=10, input_size=(1, 28, 28), min_input_size=(1, 7, 7), pool_size=None,
                mean=(0.1307,), std=(0.3081,), interpolation="bilinear", crop_pct=1.0,
                first_conv="patch_embed.proj", classifier="head", license="apache-2.0", **_PAPER, **kwargs)


def _cfg_cifar(**kwargs):
    return dict(num_classes=10, input_size=(3, 32, 32), min_input_size=(3, 8, 8), pool_size=None,
                mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616), interpolation="bilinear",
                crop_pct=1.0, first_conv="patch_embed.proj", classifier="head", license="apache-2.0",
                **_PAPER, **kwargs)


_VARIANTS = ("", "nomlp_", "wqk_", "nowvwo_", "sym_", "nomlp_wqk_", "nomlp_sym_", "wqk_nowvwo_",
             "nomlp_wqk_nowvwo_", "nomlp_sym_nowvwo_")
_MNIST = dict(img_size=28, patch_size=7, in_chans=1, embed_dim=64, depth=6, num_heads=1)
_CIFAR = dict(img_size=32, patch_size=8, in_chans=3, embed_dim=64, depth=6, num_heads=1)

default_cfgs = generate_default_cfgs({
    **{f"minimal_vit_{v}mnist": _cfg_mnist() for v in _VARIANTS},
    **{f"minimal_vit_{v}cifar": _cfg_cifar() for v in _VARIANTS},
    "test_minimal_transformer": _cfg_cifar(),
})


@register_model
def minimal_vit_mnist(pretrained: bool = False, **kwargs) -> MinimalViT:
    """Full ViT baseline (MNIST configuration) of Reducing the Transformer Architecture to a Minimum."""
    return _create_minimal_vit("minimal_vit_mnist", pretrained, **dict(_MNIST, **kwargs))


@register_model
def minimal_vit_nomlp_mnist(pretrained: bool = False, **kwargs) -> MinimalViT:
    """noMLP variant (MNIST configuration)."""
    return _create_minimal_vit("minimal_vit_nomlp_mnist", pretrained, **dict(_MNIST, mlp=False, **kwargs))


@register_model
def minimal_vit_wqk_mnist(pretrained: bool = False, **kwargs) -> MinimalViT:
    """Wqk (collapsed query-key) variant (MNIST configuration)."""
    return _create_minimal_vit("minimal_vit_wqk_mnist", pretrained, **dict(_MNIST, qk="collapsed", **kwargs))


@register_model
def minimal_vit_nowvwo_mnist(pretrained: bool = False, **kwargs) -> MinimalViT:
    """noWv/Wo variant (MNIST configuration)."""
    return _create_minimal_vit("minimal_vit_nowvwo_mnist", pretrained, **dict(_MNIST, value_proj=False, **kwargs))


@register_model
def minimal_vit_sym_mnist(pretrained: bool = False, **kwargs) -> MinimalViT:
    """Symmetric W_qk = T Tᵀ variant (MNIST configuration)."""
    return _create_minimal_vit("minimal_vit_sym_mnist", pretrained, **dict(_MNIST, qk="symmetric", **kwargs))


@register_model
def minimal_vit_nomlp_wqk_mnist(pretrained: bool = False, **kwargs) -> MinimalViT:
    """noMLP + Wqk variant (MNIST configuration)."""
    model_args = dict(_MNIST, mlp=False, qk="collapsed")
    return _create_minimal_vit("minimal_vit_nomlp_wqk_mnist", pretrained, **dict(model_args, **kwargs))


@register_model
def minimal_vit_nomlp_sym_mnist(pretrained: bool = False, **kwargs) -> MinimalViT:
    """noMLP + symmetric variant (MNIST configuration)."""
    model_args = dict(_MNIST, mlp=False, qk="symmetric")
    return _create_minimal_vit("minimal_vit_nomlp_sym_mnist", pretrained, **dict(model_args, **kwargs))


@register_model
def minimal_vit_wqk_nowvwo_mnist(pretrained: bool = False, **kwargs) -> MinimalViT:
    """Wqk + noWv/Wo variant, MLP kept (MNIST configuration)."""
    model_args = dict(_MNIST, qk="collapsed", value_proj=False)
    return _create_minimal_vit("minimal_vit_wqk_nowvwo_mnist", pretrained, **dict(model_args, **kwargs))


@register_model
def minimal_vit_nomlp_wqk_nowvwo_mnist(pretrained: bool = False, **kwargs) -> MinimalViT:
    """The minimal transformer: noMLP + Wqk + noWv/Wo (MNIST configuration)."""
    model_args = dict(_MNIST, mlp=False, qk="collapsed", value_proj=False)
    return _create_minimal_vit("minimal_vit_nomlp_wqk_nowvwo_mnist", pretrained, **dict(model_args, **kwargs))


@register_model
def minimal_vit_nomlp_sym_nowvwo_mnist(pretrained: bool = False, **kwargs) -> MinimalViT:
    """noMLP + symmetric + noWv/Wo variant (MNIST configuration)."""
    model_args = dict(_MNIST, mlp=False, qk="symmetric", value_proj=False)
    return _create_minimal_vit("minimal_vit_nomlp_sym_nowvwo_mnist", pretrained, **dict(model_args, **kwargs))


@register_model
def minimal_vit_cifar(pretrained: bool = False, **kwargs) -> MinimalViT:
    """Full ViT baseline (CIFAR configuration) of Reducing the Transformer Architecture to a Minimum."""
    return _create_minimal_vit("minimal_vit_cifar", pretrained, **dict(_CIFAR, **kwargs))


@register_model
def minimal_vit_nomlp_cifar(pretrained: bool = False, **kwargs) -> MinimalViT:
    """noMLP variant (CIFAR configuration)."""
    return _create_minimal_vit("minimal_vit_nomlp_cifar", pretrained, **dict(_CIFAR, mlp=False, **kwargs))


@register_model
def minimal_vit_wqk_cifar(pretrained: bool = False, **kwargs) -> MinimalViT:
    """Wqk (collapsed query-key) variant (CIFAR configuration)."""
    return _create_minimal_vit("minimal_vit_wqk_cifar", pretrained, **dict(_CIFAR, qk="collapsed", **kwargs))


@register_model
def minimal_vit_nowvwo_cifar(pretrained: bool = False, **kwargs) -> MinimalViT:
    """noWv/Wo variant (CIFAR configuration)."""
    return _create_minimal_vit("minimal_vit_nowvwo_cifar", pretrained, **dict(_CIFAR, value_proj=False, **kwargs))


@register_model
def minimal_vit_sym_cifar(pretrained: bool = False, **kwargs) -> MinimalViT:
    """Symmetric W_qk = T Tᵀ variant (CIFAR configuration)."""
    return _create_minimal_vit("minimal_vit_sym_cifar", pretrained, **dict(_CIFAR, qk="symmetric", **kwargs))


@register_model
def minimal_vit_nomlp_wqk_cifar(pretrained: bool = False, **kwargs) -> MinimalViT:
    """noMLP + Wqk variant (CIFAR configuration)."""
    model_args = dict(_CIFAR, mlp=False, qk="collapsed")
    return _create_minimal_vit("minimal_vit_nomlp_wqk_cifar", pretrained, **dict(model_args, **kwargs))


@register_model
def minimal_vit_nomlp_sym_cifar(pretrained: bool = False, **kwargs) -> MinimalViT:
    """noMLP + symmetric variant (CIFAR configuration)."""
    model_args = dict(_CIFAR, mlp=False, qk="symmetric")
    return _create_minimal_vit("minimal_vit_nomlp_sym_cifar", pretrained, **dict(model_args, **kwargs))


@register_model
def minimal_vit_wqk_nowvwo_cifar(pretrained: bool = False, **kwargs) -> MinimalViT:
    """Wqk + noWv/Wo variant, MLP kept (CIFAR configuration)."""
    model_args = dict(_CIFAR, qk="collapsed", value_proj=False)
    return _create_minimal_vit("minimal_vit_wqk_nowvwo_cifar", pretrained, **dict(model_args, **kwargs))


@register_model
def minimal_vit_nomlp_wqk_nowvwo_cifar(pretrained: bool = False, **kwargs) -> MinimalViT:
    """The minimal transformer: noMLP + Wqk + noWv/Wo (CIFAR configuration)."""
    model_args = dict(_CIFAR, mlp=False, qk="collapsed", value_proj=False)
    return _create_minimal_vit("minimal_vit_nomlp_wqk_nowvwo_cifar", pretrained, **dict(model_args, **kwargs))


@register_model
def minimal_vit_nomlp_sym_nowvwo_cifar(pretrained: bool = False, **kwargs) -> MinimalViT:
    """noMLP + symmetric + noWv/Wo variant (CIFAR configuration)."""
    model_args = dict(_CIFAR, mlp=False, qk="symmetric", value_proj=False)
    return _create_minimal_vit("minimal_vit_nomlp_sym_nowvwo_cifar", pretrained, **dict(model_args, **kwargs))


@register_model
def test_minimal_transformer(pretrained: bool = False, **kwargs) -> MinimalViT:
    """Tiny minimal transformer (2 layers, 2 heads, width 32) for the generic model tests."""
    model_args = dict(img_size=32, patch_size=8, in_chans=3, embed_dim=32, depth=2, num_heads=2)
    return _create_minimal_vit("test_minimal_transformer", pretrained, **dict(model_args, **kwargs))
