"""Building blocks shared by the zoo's model families."""
from .agent_attention import AgentAttention
from .attention import Attention
from .checks import check_image_input
from .conv_bn_fusion import enable_fused_inference, set_fused_inference
from .halo_attention import HaloAttention, HaloRelPosEmbed, halo_rel_pos_bias
from .layer_norm import FastLayerNorm, enable_fast_layer_norm
from .minimal_attention import MinimalAttention
from .nin import MixerBlock, MixerGatingUnit, NiNBlock
from .patch_embed import PatchEmbed
from .ulsam import ULSAM

__all__ = ["AgentAttention", "Attention", "check_image_input", "enable_fast_layer_norm", "enable_fused_inference",
           "FastLayerNorm", "HaloAttention",
           "HaloRelPosEmbed", "halo_rel_pos_bias", "MinimalAttention", "MixerBlock", "MixerGatingUnit", "NiNBlock",
           "PatchEmbed", "set_fused_inference", "ULSAM"]
