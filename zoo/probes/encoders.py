"""Frozen encoders by name for probing: any timm or zoo model (`timm:NAME`, `zoo:NAME`) and any open_clip
model (`open_clip:NAME`), each with an optional local weights file; the output is the encoder's tokens, of its
final output or of chosen intermediate blocks (timm's and open_clip's `forward_intermediates`).
"""
from __future__ import annotations

import hashlib
import inspect
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import timm
import torch
from torch import nn

__all__ = ["FrozenEncoder", "create_encoder", "ENCODER_SOURCES"]

ENCODER_SOURCES = ("timm", "zoo", "open_clip")


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _nchw_or_nhwc_to_tokens(x: torch.Tensor, fmt: str) -> torch.Tensor:
    if fmt == "NHWC":  # (B, H, W, C) -> (B, HW, C)
        return x.flatten(1, 2)
    return x.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, HW, C)


class FrozenEncoder(nn.Module):
    """A frozen image encoder that returns tokens `(B, N, D)`: prefix tokens (CLS, registers) first, then patch
    tokens (or flattened feature-map positions for convolutional models).

    `encoder(images)` gives the tokens of the final output (`forward_features`); `encoder.forward_layers(images,
    layers)` gives the tokens of chosen intermediate blocks (ViT blocks, or the stages of hierarchical and
    convolutional models, as the model's `forward_intermediates` counts them).

    Always in eval mode with gradients off; `train()` leaves it in eval mode.

    Attributes:
        name: the encoder's name with its source prefix, e.g. "timm:vit_base_patch16_224".
        embed_dim: token width D of the final output.
        num_prefix_tokens: leading non-patch tokens in the final output.
        num_layers: how many blocks `forward_layers` can take from (None: the model has no intermediate API).
        layer_prefix_tokens: leading non-patch tokens in each `forward_layers` output.
        data_config: preprocessing (`input_size`, `interpolation`, `mean`, `std`, `crop_pct`, `crop_mode`).
    """

    def __init__(self, name: str, model: nn.Module, token_fn, embed_dim: int, num_prefix_tokens: int,
                 data_config: Dict[str, Any], checkpoint_digest: Optional[str] = None,
                 model_kwargs: Optional[Dict[str, Any]] = None, layers_fn=None, num_layers: Optional[int] = None,
                 layer_prefix_tokens: int = 0, layers_unsupported: str = ""):
        super().__init__()
        self.name = name
        self.model = model
        self._token_fn = token_fn
        self._layers_fn = layers_fn
        self.embed_dim = embed_dim
        self.num_prefix_tokens = num_prefix_tokens
        self.num_layers = num_layers if layers_fn is not None else None
        self.layer_prefix_tokens = layer_prefix_tokens
        self._layers_unsupported = layers_unsupported or f"{name} has no intermediate-layer API"
        self.data_config = dict(data_config)
        self.checkpoint_digest = checkpoint_digest
        self.model_kwargs = dict(model_kwargs or {})
        self.model.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True):
        return super().train(False)

    def fingerprint(self) -> Dict[str, Any]:
        """What identifies this encoder's outputs (for feature-cache keys)."""
        return {"name": self.name, "checkpoint_sha256": self.checkpoint_digest, "kwargs": self.model_kwargs,
                "num_prefix_tokens": self.num_prefix_tokens, "embed_dim": self.embed_dim}

    def resolve_layers(self, layers: Sequence[int]) -> Tuple[int, ...]:
        """Block indices (negative: from the end) as absolute indices `0 <= i < num_layers`, in the given order.

        Raises:
            NotImplementedError: the encoder cannot give intermediate tokens.
            ValueError: `layers` is not a non-empty list of distinct in-range ints.
        """
        if self._layers_fn is None:
            raise NotImplementedError(f"layers: {self._layers_unsupported}; leave layers unset (None) to probe "
                                      f"the final output")
        if (not isinstance(layers, (list, tuple)) or not layers
                or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers)):
            raise ValueError(f"layers must be a non-empty list of block indices such as [-1, -2], got {layers!r}")
        n = self.num_layers
        bad = [i for i in layers if not -n <= i < n]
        if bad:
            raise ValueError(f"layers must lie in [-{n}, {n - 1}] ({self.name} has {n} blocks), got {layers!r}")
        blocks = tuple(i + n if i < 0 else i for i in layers)
        if len(set(blocks)) != len(blocks):
            raise ValueError(f"layers must name distinct blocks, got {layers!r} = blocks {list(blocks)}")
        return blocks

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Tokens `(B, N, D)` of the final output for images `(B, C, H, W)`."""
        return self._token_fn(images)

    @torch.no_grad()
    def forward_layers(self, images: torch.Tensor, layers: Sequence[int], norm: bool = False) -> List[torch.Tensor]:
        """Tokens of chosen blocks, in one forward pass that stops after the deepest one.

        Args:
            images: `(B, C, H, W)`.
            layers: block indices, negative from the end (`[-1, -2]`: the last two blocks).
            norm: apply the model's final norm to each block's tokens (timm's `norm`, open_clip's
                `normalize_intermediates`); without it, the raw block outputs.

        Returns:
            One tensor `(B, N_l, D_l)` per entry of `layers`, in that order, `layer_prefix_tokens` prefix tokens
            first.
        """
        blocks = self.resolve_layers(layers)
        order = sorted(blocks)
        outs = self._layers_fn(images, order, bool(norm))  # ascending block order, as the models return them
        return [outs[order.index(b)] for b in blocks]


def _timm_encoder(source: str, arch: str, checkpoint_path: Optional[str], kwargs: Dict[str, Any]):
    if source == "zoo":
        import zoo  # registers the zoo's models in timm

        if not zoo.is_zoo_model(arch):
            raise ValueError(f"unknown zoo model {arch!r} in encoder name; see zoo.list_models()")
    elif not timm.is_model(arch):
        raise ValueError(f"unknown timm model {arch!r} in encoder name; see timm.list_models()")
    model = timm.create_model(arch, pretrained=False, **kwargs)
    if checkpoint_path is not None:
        from zoo._registry import load_checkpoint

        result = load_checkpoint(model, checkpoint_path, strict=False)
        head = model.pretrained_cfg.get("classifier") or "head"
        heads = (head,) if isinstance(head, str) else tuple(head)
        bad = [k for k in list(result.missing_keys) + list(result.unexpected_keys)
               if not any(k.startswith(h + ".") for h in heads)]
        if bad:
            raise ValueError(f"checkpoint_path {checkpoint_path!r} does not match {arch!r} outside the classifier: "
                             f"mismatched keys {bad[:8]}{' ...' if len(bad) > 8 else ''}")
    if hasattr(model, "reset_classifier"):
        model.reset_classifier(0)
    model.eval()
    num_prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
    fmt = str(getattr(model, "output_fmt", "NCHW"))

    def tokens(x):
        y = model.forward_features(x)
        if y.dim() == 4:
            return _nchw_or_nhwc_to_tokens(y, fmt)
        if y.dim() != 3:
            raise ValueError(f"{arch}.forward_features gave shape {tuple(y.shape)}; expected tokens or a feature map")
        return y

    layers = _timm_layers(arch, model)

    data_config = timm.data.resolve_data_config(model=model)
    img_size = kwargs.get("img_size")
    if img_size is not None:
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        data_config["input_size"] = (data_config["input_size"][0], *size)
    dim = int(getattr(model, "num_features", 0) or getattr(model, "embed_dim", 0))
    return model, tokens, dim, num_prefix, data_config, layers


def _timm_layers(arch: str, model: nn.Module) -> Dict[str, Any]:
    """`forward_layers` for a timm/zoo model: its `forward_intermediates`, tokens in NLC with the prefix tokens
    where the model can return them (ViTs), else flattened NCHW maps; blocks counted by `feature_info`."""
    fn = getattr(model, "forward_intermediates", None)
    info = getattr(model, "feature_info", None)
    if fn is None or not info:
        return {"layers_unsupported": f"{arch} has no forward_intermediates/feature_info"}
    params = inspect.signature(fn).parameters
    prefix_api = "return_prefix_tokens" in params
    extra = {"output_fmt": "NLC", "return_prefix_tokens": True} if prefix_api else {}

    def layer_tokens(x, blocks, norm):
        if norm and "norm" not in params:
            raise NotImplementedError(f"norm: {arch}.forward_intermediates cannot normalise intermediates")
        kw = dict(extra, norm=True) if norm else extra
        outs = model.forward_intermediates(x, indices=list(blocks), stop_early=True, intermediates_only=True, **kw)
        tokens = []
        for y in outs:
            if isinstance(y, tuple):  # (spatial (B, L, D), prefix (B, P, D))
                y = torch.cat([y[1], y[0]], dim=1)
            elif y.dim() == 4:
                y = _nchw_or_nhwc_to_tokens(y, "NCHW")  # intermediates are NCHW unless NLC was asked for
            tokens.append(y)
        return tokens

    num_prefix = int(getattr(model, "num_prefix_tokens", 0) or 0) if prefix_api else 0
    return {"layers_fn": layer_tokens, "num_layers": len(info), "layer_prefix_tokens": num_prefix}


def _open_clip_encoder(arch: str, checkpoint_path: Optional[str], kwargs: Dict[str, Any]):
    import open_clip
    from open_clip.transformer import VisionTransformer

    if open_clip.get_model_config(arch) is None:
        raise ValueError(f"unknown open_clip model {arch!r} in encoder name; see open_clip.list_models() "
                         f"(add a local config with open_clip.add_model_config)")
    model = open_clip.create_model(arch, pretrained=checkpoint_path, weights_only=True, **kwargs)
    visual = model.visual.eval()
    pre = open_clip.get_model_preprocess_cfg(model)
    size = pre.get("size", 224)
    size = (size, size) if isinstance(size, int) else tuple(size)
    data_config = {"input_size": (3, *size), "interpolation": pre.get("interpolation", "bicubic"),
                   "mean": tuple(pre.get("mean", open_clip.OPENAI_DATASET_MEAN)),
                   "std": tuple(pre.get("std", open_clip.OPENAI_DATASET_STD)), "crop_pct": 1.0,
                   "crop_mode": "center"}
    if isinstance(visual, VisionTransformer):
        def tokens(x):
            out = visual.forward_intermediates(x, indices=1, normalize_intermediates=True, intermediates_only=True,
                                               output_fmt="NLC", output_extra_tokens=True)
            return torch.cat([out["image_intermediates_prefix"][-1], out["image_intermediates"][-1]], dim=1)

        def layer_tokens(x, blocks, norm):
            out = visual.forward_intermediates(x, indices=list(blocks), stop_early=True,
                                               normalize_intermediates=norm, intermediates_only=True,
                                               output_fmt="NLC", output_extra_tokens=True)
            return [torch.cat([p, t], dim=1) for p, t in zip(out["image_intermediates_prefix"],
                                                              out["image_intermediates"])]

        num_prefix, dim = 1, int(visual.transformer.width)
        layers = {"layers_fn": layer_tokens, "num_layers": len(visual.transformer.resblocks),
                  "layer_prefix_tokens": 1}
    else:
        def tokens(x):
            out = visual.forward_intermediates(x, indices=1, intermediates_only=True)
            return _nchw_or_nhwc_to_tokens(out["image_intermediates"][-1], "NCHW")

        with torch.no_grad():
            probe = tokens(torch.zeros(1, *data_config["input_size"]))
        num_prefix, dim = 0, int(probe.shape[-1])
        layers = {"layers_unsupported": f"intermediate layers of open_clip's {type(visual).__name__} tower are "
                                        f"not supported (only its VisionTransformer)"}
    # the text tower is not needed: keep only the vision tower
    return visual, tokens, dim, num_prefix, data_config, layers


def _parse_name(name: str) -> Tuple[str, str]:
    if not isinstance(name, str) or ":" not in name:
        raise ValueError(f"encoder name must be 'SOURCE:MODEL' with SOURCE in {ENCODER_SOURCES}, got {name!r}")
    source, arch = name.split(":", 1)
    if source not in ENCODER_SOURCES or not arch:
        raise ValueError(f"encoder name must be 'SOURCE:MODEL' with SOURCE in {ENCODER_SOURCES}, got {name!r}")
    return source, arch


def create_encoder(name: str, checkpoint_path: Optional[str] = None, data_config: Optional[Dict[str, Any]] = None,
                   **kwargs) -> FrozenEncoder:
    """A frozen, eval-mode encoder that outputs tokens, built by name with random init or local weights.

    Args:
        name: "timm:ARCH" (any timm model), "zoo:ARCH" (a zoo model) or "open_clip:ARCH" (an open_clip model;
            only its vision tower is kept).
        checkpoint_path: optional local weights: `.safetensors` or a tensors-only torch file for timm/zoo (the
            classifier may be missing or differ); for open_clip, anything `open_clip.create_model(pretrained=)`
            reads from a local path (loaded with `weights_only=True`).
        data_config: overrides of the preprocessing config (`input_size`, `mean`, `std`, ...).
        **kwargs: model arguments (`img_size`, ...) for timm/zoo, or `create_model` arguments for open_clip.

    Returns:
        A `FrozenEncoder`; `encoder(images)` gives `(B, N, D)` tokens, prefix tokens first, and
        `encoder.forward_layers(images, [-1, -2])` those of chosen blocks.
    """
    source, arch = _parse_name(name)
    digest = None
    if checkpoint_path is not None:
        if not isinstance(checkpoint_path, (str, os.PathLike)) or not os.path.isfile(checkpoint_path):
            raise ValueError(f"checkpoint_path must be an existing local file, got {checkpoint_path!r}")
        checkpoint_path = os.fspath(checkpoint_path)
        digest = _file_digest(checkpoint_path)
    if source == "open_clip":
        model, tokens, dim, num_prefix, cfg, layers = _open_clip_encoder(arch, checkpoint_path, kwargs)
    else:
        model, tokens, dim, num_prefix, cfg, layers = _timm_encoder(source, arch, checkpoint_path, kwargs)
    if data_config:
        unknown = set(data_config) - set(cfg)
        if unknown:
            raise ValueError(f"data_config keys must be among {sorted(cfg)}, got unknown {sorted(unknown)}")
        cfg.update({k: tuple(v) if isinstance(v, list) else v for k, v in data_config.items()})
    return FrozenEncoder(name, model, tokens, dim, num_prefix, cfg, checkpoint_digest=digest, model_kwargs=kwargs,
                         **layers)
