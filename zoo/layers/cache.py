"""The layers' inference-path plumbing: keys for caches of values derived from parameters (reused until a
parameter changes), and the in-place class swap that gives timm modules a zoo forward."""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Tuple

import torch


def version_key(tensors: Iterable[torch.Tensor]) -> Optional[Tuple]:
    """Identity of `tensors`' current values: storage, in-place version counter, dtype and device of each. It
    changes on `load_state_dict`, optimizer steps, `.to()`; not on writes through `.data`. None when a tensor is
    an inference tensor (created under `torch.inference_mode()`: no version counter): do not cache then."""
    tensors = list(tensors)
    if any(t.is_inference() for t in tensors):
        return None
    return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)


def swap_classes(model: torch.nn.Module, classes: Dict[type, type]) -> int:
    """Give each module of `model` whose class is exactly a key of `classes` the mapped subclass, in place (same
    parameters, buffers and state_dict keys; only `forward` and friends change). Returns how many changed."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    changed = 0
    for module in model.modules():
        swapped = classes.get(type(module))
        if swapped is not None:
            module.__class__ = swapped
            changed += 1
    return changed
