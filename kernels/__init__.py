"""The attention kernel core: one op, many patterns (and agent attention, two of its calls fused).

>>> import kernels
>>> out = kernels.attention(q, k, v, pattern=kernels.Neighborhood(grid=(16, 16), window=(7, 7)))
"""
from .agent import agent_attention
from .bias import LowRankBias, RelPosBias
from .capture import AttentionCall, CaptureRecord, attention_probs, capture
from .functional import attention
from .patterns import Causal, Dense, Halo, Neighborhood, Pattern, Window1d

__all__ = ["attention", "Pattern", "Dense", "Causal", "Window1d", "Neighborhood", "Halo", "capture", "attention_probs",
           "CaptureRecord", "AttentionCall", "LowRankBias", "RelPosBias", "agent_attention"]
