"""Keys for the layers' inference caches (values derived from parameters, reused until a parameter changes)."""
from __future__ import annotations

from typing import Iterable, Tuple

import torch


def version_key(tensors: Iterable[torch.Tensor]) -> Tuple:
    """Identity of `tensors`' current values: storage, in-place version counter, dtype and device of each. It
    changes on `load_state_dict`, optimizer steps, `.to()`; not on writes through `.data`."""
    return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)
