"""Probes on frozen encoders: linear, attentive (AIM, V-JEPA) and Efficient Probing heads, and encoders by
name (timm, zoo, open_clip) that output tokens."""
from .encoders import ENCODER_SOURCES, FrozenEncoder, create_encoder
from .heads import (
    PROBES,
    AttentionPool,
    AttentiveProbe,
    CrossAttentionPool,
    CrossAttentionProbe,
    EfficientProbe,
    EfficientProbingPool,
    LinearProbe,
    ProbeHead,
    TokenPool,
    create_probe,
    list_probes,
)

__all__ = [
    "ProbeHead", "LinearProbe", "AttentiveProbe", "CrossAttentionProbe", "EfficientProbe",
    "TokenPool", "AttentionPool", "CrossAttentionPool", "EfficientProbingPool",
    "PROBES", "create_probe", "list_probes",
    "FrozenEncoder", "create_encoder", "ENCODER_SOURCES",
]
