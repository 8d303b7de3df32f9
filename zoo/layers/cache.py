"""Keys for the layers' inference caches (values derived from parameters, reused until a parameter changes)."""
from __future__ import annotations

from typing import Iterable, Optional, Tuple

import torch


def version_key(tensors: Iterable[torch.Tensor]) -> Optional[Tuple]:
    """Identity of `tensors`' current values: storage, in-place version counter, dtype and device of each. It
    changes on `load_state_dict`, optimizer steps, `.to()`; not on writes through `.data`. None when a tensor is
    an inference tensor (created under `torch.inference_mode()`: no version counter): do not cache then."""
    tensors = list(tensors)
    if any(t.is_inference() for t in tensors):
        return None
    return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)
