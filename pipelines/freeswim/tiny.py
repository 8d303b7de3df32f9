"""Tiny randomly initialised Wan components, built in code and offline (no downloads).

The shapes follow diffusers' own Wan tests (`tests/pipelines/wan/test_wan.py`, `get_dummy_components`): a
2-layer transformer with 2 heads of 12 channels, a 3-channel VAE with the real 16 latent channels and the real
temporal/spatial compression, and a tiny UMT5 text encoder. The tokenizer is byte-level BPE without merges (every
UTF-8 byte is one token, no unknown words) followed by `</s>`, as T5 ends sequences.
"""
from __future__ import annotations

from typing import Dict

import torch

__all__ = ["tiny_tokenizer", "tiny_wan_components", "tiny_wan_pipeline", "TINY_TEXT_DIM"]

TINY_TEXT_DIM = 32


def tiny_tokenizer():
    """A `PreTrainedTokenizerFast` over the 256 byte symbols plus `<pad>` (0), `</s>` (1) and `<unk>` (2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_wan_components(seed: int = 0, num_layers: int = 2, dtype: torch.dtype = torch.float32) -> Dict[str, object]:
    """`tokenizer, text_encoder, vae, scheduler, transformer` of a tiny random Wan2.1-style text-to-video model.

    Args:
        seed: seed of the random initialisation (the same seed gives the same weights).
        num_layers: transformer blocks.
        dtype: parameter dtype of the text encoder and transformer (the VAE stays float32).
    """
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = UMT5EncoderModel(UMT5Config(
            vocab_size=len(tokenizer), d_model=TINY_TEXT_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        )).eval()
        vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               temperal_downsample=[False, True, True]).eval()
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
            text_dim=TINY_TEXT_DIM, freq_dim=256, ffn_dim=32, num_layers=num_layers, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
        ).eval()
    # Wan2.1's own scheduler setup (flow-matching UniPC).
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                        num_train_timesteps=1000)
    if dtype != torch.float32:
        text_encoder = text_encoder.to(dtype)
        keep = set(getattr(transformer, "_keep_in_fp32_modules", None) or ())
        for name, module in transformer.named_modules():  # Wan keeps some modules in float32 (from_pretrained)
            if not (keep & set(name.split("."))):
                for param in module.parameters(recurse=False):
                    param.data = param.data.to(dtype)
    return {"tokenizer": tokenizer, "text_encoder": text_encoder, "vae": vae, "scheduler": scheduler,
            "transformer": transformer}


def tiny_wan_pipeline(seed: int = 0, **kwargs):
    """Diffusers' stock `WanPipeline` over `tiny_wan_components` (what a Wan checkpoint folder loads as)."""
    from diffusers import WanPipeline

    return WanPipeline(**tiny_wan_components(seed, **kwargs))
