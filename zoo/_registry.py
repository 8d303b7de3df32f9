"""The zoo's model registry: timm's registry, guarded against shadowing timm's own models."""
from __future__ import annotations

import fnmatch
import importlib
import os
from typing import Callable, Dict, List, Optional

import timm
import torch
from timm.models import _registry as timm_registry

__all__ = ["register_model", "create_model", "list_models", "model_family", "load_checkpoint", "is_zoo_model"]

# Names timm had before the zoo registered anything: a zoo model must never take one of them.
_TIMM_BUILTIN = frozenset(timm_registry._model_entrypoints)
_ZOO_MODELS: Dict[str, str] = {}  # name -> family (module file name)


def register_model(fn: Callable) -> Callable:
    """`timm.models.register_model`, refusing a name timm already has (timm would silently overwrite it)."""
    name = fn.__name__
    if name in _TIMM_BUILTIN:
        raise ValueError(f"model name {name!r} is already a timm model; zoo models take a `zoo_` prefix")
    family = fn.__module__.rsplit(".", 1)[-1]
    if name in _ZOO_MODELS and _ZOO_MODELS[name] != family:
        raise ValueError(f"model name {name!r} is registered twice (families {_ZOO_MODELS[name]} and {family})")
    _ZOO_MODELS[name] = family
    return timm_registry.register_model(fn)


def is_zoo_model(name: str) -> bool:
    """True when `name` is a model this zoo registered with timm (timm's own models are not)."""
    return name in _ZOO_MODELS


def model_family(name: str) -> str:
    """The family (paper) a zoo model belongs to, e.g. "halonet", "agent"; ValueError for other names."""
    if name not in _ZOO_MODELS:
        raise ValueError(f"unknown zoo model {name!r}; see zoo.list_models()")
    return _ZOO_MODELS[name]


def list_models(pattern: Optional[str] = None) -> List[str]:
    """Sorted names of the zoo's registered models, optionally filtered by a shell-style `pattern`."""
    names = sorted(_ZOO_MODELS)
    return [n for n in names if pattern is None or fnmatch.fnmatch(n, pattern)]


def load_checkpoint(model: torch.nn.Module, path: str, strict: bool = True, filter_fn: Optional[Callable] = None):
    """Load a local `.safetensors` file (or a tensors-only torch file, read with weights_only=True).

    `filter_fn(state_dict, model)` maps another layout (the reference code's, a different image size) onto the
    model's, as timm's `pretrained_filter_fn` does; `create_model` passes the family's `checkpoint_filter_fn`.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint_path {path!r} is not a file")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state_dict = load_file(path, device="cpu")
    else:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("state_dict", "model", "module"):
            if isinstance(state_dict, dict) and key in state_dict and isinstance(state_dict[key], dict):
                state_dict = state_dict[key]
    if filter_fn is not None:
        state_dict = filter_fn(state_dict, model)
    return model.load_state_dict(state_dict, strict=strict)


def _family_filter_fn(name: str) -> Optional[Callable]:
    module = timm_registry._model_to_module.get(name)
    if module is None or name not in _ZOO_MODELS:
        return None
    return getattr(importlib.import_module(f"zoo.models.{module}"), "checkpoint_filter_fn", None)


def _pretrained_cfg(name: str, kwargs: dict):
    """The pretrained cfg `timm.create_model(name, pretrained=True, **kwargs)` loads from: timm's own resolution
    (a tag in the name or `pretrained_cfg`, the registered cfg, `pretrained_cfg_overlay`)."""
    overlay = kwargs.get("pretrained_cfg_overlay")
    if overlay is not None and not isinstance(overlay, dict):
        raise TypeError(f"pretrained_cfg_overlay must be a dict, got {type(overlay).__name__}")
    arch, tag = timm.models.split_model_name_tag(name)
    return timm.models.resolve_pretrained_cfg(arch, pretrained_cfg=kwargs.get("pretrained_cfg") or tag or None,
                                              pretrained_cfg_overlay=overlay)


def create_model(name: str, pretrained: bool = False, checkpoint_path: Optional[str] = None, **kwargs):
    """Create a zoo (or timm) model by name, optionally loading local weights.

    Args:
        name: a registered model name, e.g. "ninformer_cifar"; see `zoo.list_models()`.
        pretrained: load the weights `pretrained_cfg` names (its `file` or `state_dict`; the registered cfg, or a
            `pretrained_cfg_overlay=dict(file=...)` / `pretrained_cfg=dict(file=...)` argument) through timm's
            loader, as `timm.create_model(pretrained=True)` does: the family's `pretrained_filter_fn`, the first
            conv adapted to `in_chans`, the classifier dropped when `num_classes` differs. The zoo downloads
            nothing; without such a file, pass `checkpoint_path`.
        checkpoint_path: a local `.safetensors` (or tensors-only `.pth`) file loaded strictly after creation,
            through the family's `checkpoint_filter_fn` when it has one (reference layouts, other image sizes).
        **kwargs: model arguments (`num_classes`, `in_chans`, `img_size`, ...), as for `timm.create_model`.
    """
    if not isinstance(name, str) or not timm.is_model(name):
        raise ValueError(f"unknown model name {name!r}; zoo models: zoo.list_models(), timm's: timm.list_models()")
    if pretrained and checkpoint_path is None:
        cfg = _pretrained_cfg(name, kwargs)
        if cfg.state_dict is None and not cfg.file:
            raise ValueError(f"{name!r} has no local weights file in its pretrained_cfg; pass checkpoint_path= "
                             f"or pretrained_cfg_overlay=dict(file=...)")
        if cfg.state_dict is None and not os.path.isfile(cfg.file):
            raise FileNotFoundError(f"pretrained_cfg file {cfg.file!r} is not a file")
        return timm.create_model(name, pretrained=True, **kwargs)
    model = timm.create_model(name, pretrained=False, **kwargs)
    if checkpoint_path is not None:
        load_checkpoint(model, checkpoint_path, filter_fn=_family_filter_fn(name))
    return model
