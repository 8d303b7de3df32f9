"""FreeSwim (arXiv 2511.14712) for diffusers' Wan: a `DiffusionPipeline` and attention processors over
`kernels.attention`. Importing this package is light; diffusers loads when the pipeline is first used."""
from __future__ import annotations

import importlib

_LAZY = {
    "FreeSwimWanPipeline": "pipeline",
    "FreeSwimWanPipelineOutput": "pipeline",
    "FreeSwimState": "attention",
    "FreeSwimSelfAttnProcessor": "attention",
    "FreeSwimCrossAttnProcessor": "attention",
    "freeswim_attn_processors": "attention",
    "freeswim_processors": "attention",
    "freeswim_pattern": "attention",
    "freeswim_window": "attention",
    "freeswim_attention_scale": "attention",
    "FREESWIM_BASE_TOKENS": "attention",
    "FREESWIM_TARGET_TOKENS": "attention",
    "tiny_wan_components": "tiny",
    "tiny_wan_pipeline": "tiny",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
