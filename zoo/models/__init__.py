"""Model families, one file each; importing them registers their models in timm."""
from .halonet import *  # noqa: F401,F403
from .agent_deit import *  # noqa: F401,F403
from .agent_pvt import *  # noqa: F401,F403
from .agent_swin import *  # noqa: F401,F403
from .minimal_transformer import *  # noqa: F401,F403
from .ninformer import *  # noqa: F401,F403
from .ulsam import *  # noqa: F401,F403
