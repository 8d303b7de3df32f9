"""Building blocks shared by the zoo's model families."""
from .agent_attention import AgentAttention  # noqa: F401
from .attention import Attention
from .halo_attention import HaloAttention, HaloRelPosEmbed, halo_rel_pos_bias  # noqa: F401

__all__ = ["Attention"]
