"""Input checks shared by the model families (validated once, at the model's boundary)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def check_image_input(x, in_chans: int, fixed_size: Optional[Sequence[int]] = None, min_size: int = 1) -> None:
    """Raise unless `x` is a float `(B, in_chans, H, W)` image batch the model can take.

    Args:
        x: the model input.
        in_chans: the channels the model was built for.
        fixed_size: `(H, W)` for models whose layers are built for one size (e.g. token-mixing MLPs).
        min_size: the smallest height/width the model can reduce (e.g. its total stride).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != in_chans:
        raise ValueError(f"x must have shape (B, in_chans={in_chans} channels, H, W), got x.shape={tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got x.dtype={x.dtype}")
    if fixed_size is not None and tuple(x.shape[-2:]) != tuple(fixed_size):
        raise ValueError(f"this model is built for img_size={tuple(fixed_size)} (create it with img_size= for "
                         f"another size), got an image of {tuple(x.shape[-2:])}")
    if x.shape[0] < 1 or min(x.shape[-2:]) < min_size:
        raise ValueError(f"x must be a non-empty batch of images of at least {min_size}x{min_size} pixels, "
                         f"got x.shape={tuple(x.shape)}")


def check_positive_ints(owner: str = "", **values) -> None:
    """Raise unless every value is a positive int (bools and floats refused: these size parameters); the
    message names the argument, after `owner` (e.g. "HaloAttention: ")."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{owner}{name} must be a positive int, got {value!r}")
