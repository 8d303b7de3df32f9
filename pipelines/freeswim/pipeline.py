"""FreeSwimWanPipeline: training-free high-resolution video (and image) generation with a stock diffusers Wan.

FreeSwim (arXiv 2511.14712; reference code WillWu111/FreeSwim, read, not copied) is coarse to fine:

1. generate at the base (training) resolution with diffusers' own `WanPipeline` over the same components;
2. upscale the frames bilinearly to the target resolution;
3. video-to-video at the target resolution (`strength` of the schedule) with FreeSwim attention: inward
   sliding-window self-attention, a full-attention branch whose cross-attention output overrides the window
   branch's, and a cross-attention cache refreshed every `cache_steps` steps (see `attention.py`).

Work saved against the reference, with the same result for the kept (window) latent: the reference feeds
duplicated `[window; full]` rows to every pass and discards what the full rows' FFNs compute when their
self-attention is the window output; here the uncond pass (cache mode) and the cond pass between refresh steps
run the window rows alone (the full rows would be identical to them), and the scheduler steps the window latent
only. The dual path runs on every step of the target stage (the reference stops it after step 40, which its
defaults, 35 of 50 steps at strength 0.7, never reach). A given `video` is resized to the target bilinearly,
like stage 1's frames.

`mode="window"` is plain high-resolution text-to-video with window attention only (no base stage, no full
branch); `num_frames=1` makes images. The transformer is diffusers' `WanTransformer3DModel`, unchanged: the
attention is swapped through `set_attn_processor` for the target-resolution stage only, and restored after.

Wan2.2 two-expert checkpoints (`transformer_2` + `boundary_ratio`) follow diffusers' `WanPipeline`: the step at
timestep `t` runs the high-noise expert `transformer` when `t >= boundary_ratio * num_train_timesteps` and the
low-noise expert `transformer_2` below, with `guidance_scale_2` for the latter. Both experts get FreeSwim
processors (each with its own `FreeSwimState`) for the target-resolution stage. The cross-attention cache is per
expert and a switch of expert is always a refresh step: a cached tensor is one layer's cross-attention output of
one expert (its own `to_q`/`to_k`/`to_v`), so it cannot stand in for the other expert's layer, and the expert
that takes over has no output of its own yet; refreshes then follow every `cache_steps` steps counted from the
switch. With one expert this is the plain `i % cache_steps == 0` schedule. LoRA loads through diffusers'
`WanLoraLoaderMixin` (`load_lora_weights`, `load_into_transformer_2=True` for the low-noise expert): the
processors call the module's own (peft-wrapped) projections, so the LoRA applies in both branches and stages.
Image-to-video Wan checkpoints (image cross-attention, or latent channels concatenated to the input) are not
supported.
"""
from __future__ import annotations

import contextlib
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import (AutoencoderKLWan, DiffusionPipeline, FlowMatchEulerDiscreteScheduler, WanPipeline,
                       WanTransformer3DModel)
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.loaders import WanLoraLoaderMixin
from diffusers.utils import BaseOutput, logging
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor
from transformers import AutoTokenizer, UMT5EncoderModel

from .attention import FreeSwimState, freeswim_attention_scale, freeswim_pattern, freeswim_processors

logger = logging.get_logger(__name__)

__all__ = ["FreeSwimWanPipeline", "FreeSwimWanPipelineOutput"]

MODES = ("freeswim", "window")
OUTPUT_TYPES = ("np", "pil", "pt", "latent")


@dataclass
class FreeSwimWanPipelineOutput(BaseOutput):
    """Output of `FreeSwimWanPipeline`.

    Args:
        frames: the target-resolution videos: `np.ndarray` `(B, F, H, W, 3)` in [0, 1] (`output_type="np"`), a
            `torch.Tensor` `(B, F, 3, H, W)` (`"pt"`), a list of lists of `PIL.Image` (`"pil"`), or the latents.
        base_frames: the base-resolution videos of stage 1 as `(B, F, 3, h, w)` in [0, 1], or None when no base
            stage ran (`mode="window"`, or a `video` was given).
    """

    frames: Any
    base_frames: Optional[torch.Tensor] = None


def _is_int(value) -> bool:
    """An integer (Python or NumPy), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _frame_size(video) -> Tuple[int, int]:
    """(height, width) of a video as diffusers' video processor takes it: PIL frames (or a batch of lists of
    them), arrays `(..., H, W, C)` or tensors `(..., C, H, W)`."""
    first = video
    while isinstance(first, (list, tuple)):
        if not first:
            raise ValueError("video must not be empty")
        first = first[0]
    if isinstance(first, PIL.Image.Image):
        return first.height, first.width
    if isinstance(first, np.ndarray):
        return int(first.shape[-3]), int(first.shape[-2])
    if isinstance(first, torch.Tensor):
        return int(first.shape[-2]), int(first.shape[-1])
    raise TypeError(f"video frames must be PIL images, numpy arrays or torch tensors, got {type(first).__name__}")


class FreeSwimWanPipeline(DiffusionPipeline, WanLoraLoaderMixin):
    r"""FreeSwim high-resolution generation over diffusers' Wan text-to-video components.

    Components (those of a Wan diffusers checkpoint, so `from_pretrained(wan_folder)` and
    `from_pipe(wan_pipeline)` work):
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]): the T5 tokenizer.
        text_encoder ([`~transformers.UMT5EncoderModel`]): the T5 text encoder.
        vae ([`AutoencoderKLWan`]): the video VAE.
        scheduler: a flow-matching scheduler (`UniPCMultistepScheduler` or `FlowMatchEulerDiscreteScheduler`).
        transformer ([`WanTransformer3DModel`]): the denoiser; its attention processors are replaced only during
            the target-resolution stage.
        transformer_2 ([`WanTransformer3DModel`], *optional*): Wan2.2's low-noise expert, used for timesteps below
            `boundary_ratio * num_train_timesteps` (both stages); its processors are replaced as `transformer`'s.
        boundary_ratio (`float`, *optional*): the expert boundary as a fraction of the training timesteps; None
            uses `transformer` on every step (as diffusers' `WanPipeline`).
        expand_timesteps (`bool`): per-token timesteps (Wan2.2 TI2V-5B), as diffusers' `WanPipeline`.
    """

    model_cpu_offload_seq = "text_encoder->transformer->transformer_2->vae"
    _optional_components = ["transformer", "transformer_2"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self,
        tokenizer: AutoTokenizer,
        text_encoder: UMT5EncoderModel,
        vae: AutoencoderKLWan,
        scheduler: FlowMatchEulerDiscreteScheduler,
        transformer: Optional[WanTransformer3DModel] = None,
        transformer_2: Optional[WanTransformer3DModel] = None,
        boundary_ratio: Optional[float] = None,
        expand_timesteps: bool = False,
    ):
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer,
                              scheduler=scheduler, transformer_2=transformer_2)
        self.register_to_config(boundary_ratio=boundary_ratio, expand_timesteps=expand_timesteps)
        self.vae_scale_factor_temporal = self.vae.config.scale_factor_temporal if getattr(self, "vae", None) else 4
        self.vae_scale_factor_spatial = self.vae.config.scale_factor_spatial if getattr(self, "vae", None) else 8
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor_spatial)

    # ------------------------------------------------------------------ helpers

    def base_pipeline(self) -> WanPipeline:
        """Diffusers' stock `WanPipeline` over this pipeline's components (stage 1, prompt encoding)."""
        pipe = WanPipeline(tokenizer=self.tokenizer, text_encoder=self.text_encoder, vae=self.vae,
                           scheduler=self.scheduler, transformer=self.transformer, transformer_2=self.transformer_2,
                           boundary_ratio=self.config.boundary_ratio, expand_timesteps=self.config.expand_timesteps)
        pipe.set_progress_bar_config(**getattr(self, "_progress_bar_config", {}))
        return pipe

    def encode_prompt(self, prompt, negative_prompt=None, do_classifier_free_guidance=True, num_videos_per_prompt=1,
                      prompt_embeds=None, negative_prompt_embeds=None, max_sequence_length=512, device=None,
                      dtype=None):
        """T5 embeddings `(B · num_videos_per_prompt, max_sequence_length, text_dim)` through
        `WanPipeline.encode_prompt` (same arguments, same order)."""
        return self.base_pipeline().encode_prompt(
            prompt=prompt, negative_prompt=negative_prompt, do_classifier_free_guidance=do_classifier_free_guidance,
            num_videos_per_prompt=num_videos_per_prompt, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, max_sequence_length=max_sequence_length,
            device=device or self._execution_device, dtype=dtype)

    @property
    def token_multiple(self) -> int:
        """Pixels per latent token along height/width (VAE factor x transformer patch)."""
        return self.vae_scale_factor_spatial * self.transformer.config.patch_size[1]

    def token_grid(self, num_frames: int, height: int, width: int):
        """Latent token grid `(T', H', W')` of a `num_frames x height x width` video."""
        p_t, p_h, p_w = self.transformer.config.patch_size
        t = ((num_frames - 1) // self.vae_scale_factor_temporal + 1) // p_t
        return (t, height // self.vae_scale_factor_spatial // p_h, width // self.vae_scale_factor_spatial // p_w)

    def high_res_scheduler(self, flow_shift: Optional[float]):
        """A fresh scheduler for the target-resolution stage, with `flow_shift` (or `shift`) overridden."""
        config = dict(self.scheduler.config)
        overrides = {}
        if flow_shift is not None:
            key = "flow_shift" if "flow_shift" in config else "shift" if "shift" in config else None
            if key is None:
                raise ValueError(f"flow_shift={flow_shift} given but {type(self.scheduler).__name__} has neither "
                                 f"`flow_shift` nor `shift`")
            overrides[key] = flow_shift
        return type(self.scheduler).from_config(self.scheduler.config, **overrides)

    def experts(self) -> Dict[str, WanTransformer3DModel]:
        """The denoisers this pipeline runs, by component name: `transformer`, plus `transformer_2` when a
        `boundary_ratio` is set (without one diffusers' `WanPipeline` never calls `transformer_2` either)."""
        experts = {"transformer": self.transformer}
        if self.config.boundary_ratio is not None and self.transformer_2 is not None:
            experts["transformer_2"] = self.transformer_2
        return experts

    def expert_name(self, timestep, boundary_timestep: Optional[float]) -> str:
        """`"transformer"` (high noise) for `timestep >= boundary_timestep` or no boundary, else `"transformer_2"`."""
        if boundary_timestep is None or timestep >= boundary_timestep:
            return "transformer"
        return "transformer_2"

    def check_inputs(self, prompt, negative_prompt, height, width, base_height, base_width, num_frames,
                     num_inference_steps, strength, cache_steps, mode, output_type, video, prompt_embeds,
                     negative_prompt_embeds, callback_on_step_end_tensor_inputs, guidance_scale_2=None,
                     num_videos_per_prompt=1, latents=None):
        if self.transformer is None:
            raise ValueError("FreeSwimWanPipeline needs a `transformer` (the high-noise expert), got None")
        ratio = self.config.boundary_ratio
        if ratio is not None:
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1:
                raise ValueError(f"`boundary_ratio` must be a number in [0, 1] or None, got {ratio!r}")
            if self.transformer_2 is None:
                raise ValueError(f"`boundary_ratio`={ratio} needs a low-noise expert `transformer_2`, got None")
            if tuple(self.transformer_2.config.patch_size) != tuple(self.transformer.config.patch_size):
                raise ValueError(f"the experts' patch sizes differ: transformer {self.transformer.config.patch_size}, "
                                 f"transformer_2 {self.transformer_2.config.patch_size}")
        elif guidance_scale_2 is not None:
            raise ValueError("`guidance_scale_2` is only supported when the pipeline's `boundary_ratio` is not None, "
                             f"got guidance_scale_2={guidance_scale_2!r}")
        for name, expert in self.experts().items():
            cfg = expert.config
            if cfg.image_dim is not None or cfg.added_kv_proj_dim is not None or cfg.in_channels != cfg.out_channels:
                raise NotImplementedError(
                    f"image-to-video Wan checkpoints are not supported: `{name}` has image_dim={cfg.image_dim}, "
                    f"added_kv_proj_dim={cfg.added_kv_proj_dim}, in_channels={cfg.in_channels} "
                    f"(out_channels={cfg.out_channels})")
        if mode not in MODES:
            raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}")
        m = self.token_multiple
        for name, value in (("height", height), ("width", width), ("base_height", base_height),
                            ("base_width", base_width)):
            if not _is_int(value) or value < m or value % m:
                raise ValueError(f"`{name}` must be a positive multiple of {m} (VAE x patch), got {value!r}")
        if base_height > height or base_width > width:
            raise ValueError(f"the base resolution must not exceed the target: got base {base_height}x{base_width} "
                             f"for target {height}x{width}")
        vt = self.vae_scale_factor_temporal
        if not _is_int(num_frames) or num_frames < 1 or (num_frames - 1) % vt:
            raise ValueError(f"`num_frames` must be a positive int with (num_frames - 1) divisible by {vt}, "
                             f"got {num_frames!r}")
        if not _is_int(num_inference_steps) or num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be a positive int, got {num_inference_steps!r}")
        if not 0 < strength <= 1:
            raise ValueError(f"`strength` must be in (0, 1], got {strength!r}")
        if mode == "freeswim" and int(num_inference_steps * strength) < 1:
            raise ValueError(f"`num_inference_steps * strength` must be >= 1, got {num_inference_steps} * {strength}")
        if cache_steps is not None and (not _is_int(cache_steps) or cache_steps < 1):
            raise ValueError(f"`cache_steps` must be a positive int or None (no cache), got {cache_steps!r}")
        if not _is_int(num_videos_per_prompt) or num_videos_per_prompt < 1:
            raise ValueError(f"`num_videos_per_prompt` must be a positive int, got {num_videos_per_prompt!r}")
        if latents is not None and video is not None:
            raise ValueError("pass either `latents` (initial noise) or `video` (to upscale), not both")
        if mode == "window" and video is not None:
            raise ValueError("`video` is only used by mode='freeswim' (video-to-video); got a video with "
                             "mode='window'")
        if prompt is not None and prompt_embeds is not None:
            raise ValueError(f"Cannot forward both `prompt`: {prompt} and `prompt_embeds`. Pass only one of them.")
        if prompt is None and prompt_embeds is None:
            raise ValueError("Provide either `prompt` or `prompt_embeds`.")
        if prompt is not None and not isinstance(prompt, (str, list)):
            raise ValueError(f"`prompt` has to be of type `str` or `list` but is {type(prompt)}")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("Cannot forward both `negative_prompt` and `negative_prompt_embeds`.")
        if callback_on_step_end_tensor_inputs is not None and not all(
                k in self._callback_tensor_inputs for k in callback_on_step_end_tensor_inputs):
            raise ValueError(f"`callback_on_step_end_tensor_inputs` has to be in {self._callback_tensor_inputs}, "
                             f"got {callback_on_step_end_tensor_inputs}")

    def _normalize_latents(self, latents, inverse=False):
        cfg = self.vae.config
        mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
        std = torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
        return latents * std + mean if inverse else (latents - mean) / std

    def upscale_frames(self, frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Stage 2: `(B, F, 3, h, w)` in [0, 1] -> `(B, 3, F, height, width)` in [-1, 1], bilinear (half-pixel
        centres, as the reference's cv2.INTER_LINEAR on its float [0, 1] frames)."""
        b, f = frames.shape[:2]
        up = F.interpolate(frames.flatten(0, 1).float(), size=(height, width), mode="bilinear", align_corners=False)
        up = up.clamp(0, 1).unflatten(0, (b, f)) * 2 - 1  # (B, F, 3, H, W)
        return up.permute(0, 2, 1, 3, 4)

    def prepare_video_latents(self, video, scheduler, timestep, generator, device):
        """Encode `(B, 3, F, H, W)` in [-1, 1] with the VAE (distribution mode), normalise, and noise to
        `timestep` with the scheduler's forward process."""
        video = video.to(device=device, dtype=self.vae.dtype)
        init = self.vae.encode(video).latent_dist.mode()
        init = self._normalize_latents(init.float())
        noise = randn_tensor(init.shape, generator=generator, device=init.device, dtype=init.dtype)
        t = timestep.repeat(init.shape[0])
        if hasattr(scheduler, "scale_noise"):
            return scheduler.scale_noise(init, t, noise)
        return scheduler.add_noise(init, noise, t)

    # ------------------------------------------------------------------ call

    @torch.no_grad()
    def __call__(
        self,
        prompt: Union[str, List[str], None] = None,
        negative_prompt: Union[str, List[str], None] = None,
        height: int = 1088,
        width: int = 1920,
        base_height: int = 480,
        base_width: int = 832,
        num_frames: int = 81,
        num_inference_steps: int = 50,
        base_num_inference_steps: Optional[int] = None,
        guidance_scale: float = 5.0,
        guidance_scale_2: Optional[float] = None,
        strength: float = 0.7,
        cache_steps: Optional[int] = 2,
        mode: str = "freeswim",
        flow_shift: Optional[float] = 9.0,
        attention_scale: Optional[float] = None,
        video: Optional[Any] = None,
        num_videos_per_prompt: int = 1,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        latents: Optional[torch.Tensor] = None,
        prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        output_type: str = "np",
        return_dict: bool = True,
        attention_kwargs: Optional[Dict[str, Any]] = None,
        callback_on_step_end: Optional[Callable[[Any, int, Any, Dict], Dict]] = None,
        callback_on_step_end_tensor_inputs: List[str] = ("latents",),
        max_sequence_length: int = 512,
    ):
        r"""Generate a video (or image, `num_frames=1`) at `height x width`.

        Args:
            prompt: text prompt(s); or pass `prompt_embeds` `(B, S, text_dim)`.
            negative_prompt: negative prompt(s) for classifier-free guidance; or `negative_prompt_embeds`.
            height, width: target resolution (multiples of 16 for Wan).
            base_height, base_width: base (training) resolution of stage 1; also sets the window: `2 d + 1`
                tokens per spatial axis with `d = base_tokens // 2`, over all latent frames.
            num_frames: frames, `4 k + 1` for Wan (1 gives an image).
            num_inference_steps: schedule length at the target resolution; `strength` of it runs
                (`int(num_inference_steps * strength)` steps) in mode "freeswim", all of it in mode "window".
            base_num_inference_steps: stage-1 steps (default `num_inference_steps`).
            guidance_scale: classifier-free guidance weight (both stages); <= 1 disables guidance.
            guidance_scale_2: guidance weight of the low-noise expert `transformer_2` (both stages); None uses
                `guidance_scale`. Only with a `boundary_ratio`.
            strength: how much of the schedule the video-to-video stage re-noises and denoises (0, 1].
            cache_steps: refresh the cross-attention cache every `cache_steps` steps (full branch only on those
                steps, cond pass only), counted from the first step and from each switch of expert (a switch
                always refreshes: the cache is per expert); None runs the full dual path on every step and both
                guidance passes (the reference's "nocache" mode).
            mode: "freeswim" (coarse to fine, dual path) or "window" (text-to-video at the target resolution
                with window attention only).
            flow_shift: scheduler shift for the target-resolution stage (the reference uses 9.0); None keeps the
                scheduler's.
            attention_scale: self-attention logit scale; None means the reference's temperature
                `sqrt(log_1560(3120) / d_head)` (`freeswim_attention_scale(d_head)`);
                `freeswim_attention_scale(d_head, H_b' * W_b', H' * W')` is the resolution-aware variant.
            video: optional base video to upscale instead of stage 1 (frames as `diffusers`' video processor
                takes them: list of PIL images, arrays or tensors); mode "freeswim" only.
            num_videos_per_prompt: videos generated per prompt.
            generator: torch generator(s) for determinism.
            latents: initial Gaussian noise, as `WanPipeline` takes it: at the target resolution in mode
                "window"; in mode "freeswim" the stage-1 noise at the base resolution (not with `video`).
            output_type: "np", "pil", "pt" or "latent".
            return_dict: return a `FreeSwimWanPipelineOutput` (else a tuple `(frames,)`).
            attention_kwargs: passed to the transformer (e.g. LoRA `scale`).
            callback_on_step_end: called as `fn(pipe, step, t, {name: tensor})` after each target-resolution
                step; may return replacements for `callback_on_step_end_tensor_inputs`.
            max_sequence_length: T5 sequence length.

        Returns:
            `FreeSwimWanPipelineOutput` (or a tuple with the frames).
        """
        callback_on_step_end_tensor_inputs = list(callback_on_step_end_tensor_inputs)
        # 1. Check inputs
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        self.check_inputs(prompt, negative_prompt, height, width, base_height, base_width, num_frames,
                          num_inference_steps, strength, cache_steps, mode, output_type, video, prompt_embeds,
                          negative_prompt_embeds, callback_on_step_end_tensor_inputs, guidance_scale_2,
                          num_videos_per_prompt, latents)
        height, width, base_height, base_width, num_frames = (
            int(x) for x in (height, width, base_height, base_width, num_frames))
        if guidance_scale_2 is None:
            guidance_scale_2 = guidance_scale
        device = self._execution_device
        do_cfg = guidance_scale > 1.0
        self._guidance_scale = guidance_scale
        self._attention_kwargs = attention_kwargs
        self._current_timestep = None
        self._interrupt = False

        # 2. Encode the prompt once (diffusers' WanPipeline.encode_prompt), for both stages
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, negative_prompt, do_cfg, num_videos_per_prompt, prompt_embeds, negative_prompt_embeds,
            max_sequence_length, device)
        dtype = self.transformer.dtype
        prompt_embeds = prompt_embeds.to(dtype)
        if negative_prompt_embeds is not None:
            negative_prompt_embeds = negative_prompt_embeds.to(dtype)
        batch_size = prompt_embeds.shape[0]

        # 3. Target-resolution schedule
        scheduler = self.high_res_scheduler(flow_shift)
        scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = scheduler.timesteps
        t_start = 0
        if mode == "freeswim":
            t_start = num_inference_steps - min(int(num_inference_steps * strength), num_inference_steps)
            timesteps = timesteps[t_start * scheduler.order:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(t_start * scheduler.order)

        # 4. Stage 1 (base generation with stock attention) and stage 2 (upscaling), or noise for mode "window"
        base_frames = None
        if mode == "freeswim":
            if video is None:
                base = self.base_pipeline()(
                    prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                    height=base_height, width=base_width, num_frames=num_frames,
                    num_inference_steps=base_num_inference_steps or num_inference_steps,
                    guidance_scale=guidance_scale, generator=generator, latents=latents, output_type="pt",
                    guidance_scale_2=guidance_scale_2 if self.config.boundary_ratio is not None else None,
                    attention_kwargs=attention_kwargs, max_sequence_length=max_sequence_length)
                base_frames = base.frames  # (B, F, 3, h, w) in [0, 1]
                video = self.upscale_frames(base_frames, height, width)
            else:  # to [0, 1] at its own size, then the same bilinear upscale as stage 1's frames
                h0, w0 = _frame_size(video)
                frames = self.video_processor.preprocess_video(video, height=h0, width=w0)  # (B, 3, F, h, w)
                if frames.shape[2] != num_frames:
                    raise ValueError(f"`video` has {frames.shape[2]} frames but `num_frames` is {num_frames}: pass "
                                     f"num_frames={frames.shape[2]} (4k + 1 frames)")
                video = self.upscale_frames((frames.permute(0, 2, 1, 3, 4) + 1) / 2, height, width)
                if video.shape[0] * num_videos_per_prompt == batch_size:
                    video = video.repeat_interleave(num_videos_per_prompt, dim=0)
                if video.shape[0] != batch_size:
                    raise ValueError(f"`video` has batch {video.shape[0]} but the prompts have "
                                     f"{batch_size // num_videos_per_prompt}")
            latents = self.prepare_video_latents(video, scheduler, timesteps[:1], generator, device)
        else:
            latents = self.base_pipeline().prepare_latents(
                batch_size, self.transformer.config.in_channels, height, width, num_frames, torch.float32,
                device, generator, latents)

        # 5. FreeSwim attention state for this resolution, one per expert (each keeps its own cross-attention cache)
        grid = self.token_grid(num_frames, height, width)
        base_grid = self.token_grid(num_frames, base_height, base_width)[1:]
        pattern = freeswim_pattern(grid, base_grid)
        states = {}
        for name, expert in self.experts().items():
            scale = attention_scale
            if scale is None:
                scale = freeswim_attention_scale(expert.config.attention_head_dim)
            states[name] = FreeSwimState(pattern=pattern, scale=scale)
        self._freeswim_states = states  # exposed for inspection (call counts per expert)
        self._freeswim_state = states["transformer"]
        num_tokens = grid[0] * grid[1] * grid[2]
        boundary_timestep = None
        if self.config.boundary_ratio is not None:
            boundary_timestep = self.config.boundary_ratio * scheduler.config.num_train_timesteps

        def denoise(model, state, x, embeds, branch_mode, store=False, t=None, name="cond"):
            """One transformer pass; mode "dual" runs [window; full] rows and returns the window rows. Inside the
            model's `cache_context` (diffusers' block caches keep per-pass state; the dual pass has twice the
            rows, so it has its own context)."""
            state.set_mode(branch_mode, store)
            inp = torch.cat([x, x]) if branch_mode == "dual" else x
            ctx = torch.cat([embeds, embeds]) if branch_mode == "dual" else embeds
            ts = t.expand(inp.shape[0], num_tokens) if self.config.expand_timesteps else t.expand(inp.shape[0])
            cache_context = getattr(model, "cache_context", None)
            scope = cache_context(f"{name}_{branch_mode}") if cache_context else contextlib.nullcontext()
            with scope:
                out = model(hidden_states=inp.to(dtype), timestep=ts, encoder_hidden_states=ctx,
                            attention_kwargs=attention_kwargs, return_dict=False)[0]
            return out[: x.shape[0]]

        # 6. Denoising loop at the target resolution
        self._num_timesteps = len(timesteps)
        with contextlib.ExitStack() as stack:
            for name, expert in self.experts().items():
                stack.enter_context(freeswim_processors(expert, states[name]))
            bar = stack.enter_context(self.progress_bar(total=len(timesteps)))
            current, since_switch = None, 0
            for i, t in enumerate(timesteps):
                if self._interrupt:
                    continue
                name = self.expert_name(t, boundary_timestep)
                model, state = getattr(self, name), states[name]
                step_guidance = guidance_scale if name == "transformer" else guidance_scale_2
                if name != current:  # a new expert: its cache starts over with a refresh
                    current, since_switch = name, 0
                    state.cross_cache.clear()
                if mode == "window":
                    cond_mode, store, uncond_mode = "window", False, "window"
                elif cache_steps is None:  # the full dual path on every pass, nothing cached
                    cond_mode, store, uncond_mode = "dual", False, "dual"
                elif since_switch % cache_steps == 0:  # refresh: full branch runs and its cross-attention is stored
                    cond_mode, store, uncond_mode = "dual", True, "window"
                else:  # the full branch would equal the window branch: one window pass reusing the cache
                    cond_mode, store, uncond_mode = "reuse", False, "window"
                since_switch += 1
                self._current_timestep = t
                noise_pred = denoise(model, state, latents, prompt_embeds, cond_mode, store, t, "cond")
                if do_cfg:
                    noise_uncond = denoise(model, state, latents, negative_prompt_embeds, uncond_mode, False, t,
                                           "uncond")
                    noise_pred = noise_uncond + step_guidance * (noise_pred - noise_uncond)
                latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]

                if callback_on_step_end is not None:
                    local = {"latents": latents, "prompt_embeds": prompt_embeds,
                             "negative_prompt_embeds": negative_prompt_embeds}
                    outs = callback_on_step_end(self, i, t, {k: local[k] for k in callback_on_step_end_tensor_inputs})
                    outs = outs or {}
                    latents = outs.pop("latents", latents)
                    prompt_embeds = outs.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = outs.pop("negative_prompt_embeds", negative_prompt_embeds)
                bar.update()

        self._current_timestep = None

        # 7. Decode
        if output_type == "latent":
            frames = latents
        else:
            latents = self._normalize_latents(latents.to(self.vae.dtype), inverse=True)
            frames = self.vae.decode(latents, return_dict=False)[0]
            frames = self.video_processor.postprocess_video(frames, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (frames,)
        return FreeSwimWanPipelineOutput(frames=frames, base_frames=base_frames)

    @property
    def interrupt(self):
        return getattr(self, "_interrupt", False)

    @property
    def guidance_scale(self):
        return self._guidance_scale

    @property
    def num_timesteps(self):
        return self._num_timesteps

    @property
    def current_timestep(self):
        return getattr(self, "_current_timestep", None)

    @property
    def attention_kwargs(self):
        return getattr(self, "_attention_kwargs", None)
