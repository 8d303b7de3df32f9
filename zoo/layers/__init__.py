"""Building blocks shared by the zoo's model families."""
from .agent_attention import AgentAttention  # noqa: F401
from .attention import Attention
from .halo_attention import HaloAttention, HaloRelPosEmbed, halo_rel_pos_bias  # noqa: F401
from .minimal_attention import MinimalAttention  # noqa: F401
from .nin import MixerBlock, MixerGatingUnit, NiNBlock  # noqa: F401
from .ulsam import ULSAM  # noqa: F401

__all__ = ["Attention"]
