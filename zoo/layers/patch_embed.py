"""timm's PatchEmbed, padding the input to whole patches only when it needs padding."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed as TimmPatchEmbed

__all__ = ["PatchEmbed"]


class PatchEmbed(TimmPatchEmbed):
    """`timm.layers.PatchEmbed` with `dynamic_img_pad` padding only inputs that are not whole patches.

    timm pads on every forward when `dynamic_img_pad=True`; `F.pad` with zero padding still copies the batch (77 MB
    at 256 x 3 x 224 x 224 in bf16: a device-to-device copy and a launch per forward). Same parameters, buffers and
    outputs as timm's module.
    """

    def __init__(self, *args, dynamic_img_pad: bool = False, **kwargs):
        super().__init__(*args, dynamic_img_pad=False, **kwargs)
        self.pad_to_patch = dynamic_img_pad

    @property
    def fixed_img_size(self) -> Optional[Tuple[int, int]]:
        """The one input size strict mode accepts (timm asserts it in forward), None when any size passes: models
        check it up front (`zoo.layers.checks.check_image_input`) for a ValueError naming the size."""
        return tuple(self.img_size) if self.strict_img_size and self.img_size is not None else None

    def dynamic_feat_size(self, img_size: Tuple[int, int]) -> Tuple[int, int]:
        if self.pad_to_patch:
            return math.ceil(img_size[0] / self.patch_size[0]), math.ceil(img_size[1] / self.patch_size[1])
        return super().dynamic_feat_size(img_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad_to_patch:
            pad_h, pad_w = -x.shape[-2] % self.patch_size[0], -x.shape[-1] % self.patch_size[1]
            if pad_h or pad_w:
                x = F.pad(x, (0, pad_w, 0, pad_h))
        return super().forward(x)
