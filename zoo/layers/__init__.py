"""Building blocks shared by the zoo's model families."""
from .agent_attention import AgentAttention  # noqa: F401
from .attention import Attention

__all__ = ["Attention"]
