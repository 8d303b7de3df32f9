"""Building blocks shared by the zoo's model families."""
from .attention import Attention

__all__ = ["Attention"]
