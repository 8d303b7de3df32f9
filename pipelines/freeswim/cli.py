"""`zoo generate --pipeline freeswim`: FreeSwim high-resolution video from a Wan diffusers folder, or (without
`--model`) from a tiny random Wan built offline so the command runs anywhere; plus the demo step and a picture
of the inward window pattern. Heavy imports happen inside the functions, so `zoo --help` stays fast."""
from __future__ import annotations

import os
import sys
import time

# Defaults per case: (height, width, base_height, base_width, frames, steps)
REAL_DEFAULTS = (1088, 1920, 480, 832, 81, 50)
TINY_DEFAULTS = (64, 96, 32, 48, 9, 6)
DEFAULT_PROMPT = "a red fox running through fresh snow at sunrise, cinematic, detailed fur"


def _dtype(name, device):
    import torch

    if name is None:
        name = "bf16" if device.startswith("cuda") else "fp32"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def load_pipeline(model, device="cpu", dtype=None, seed=0, offload=False, vae_tiling=False):
    """`FreeSwimWanPipeline` from a local Wan diffusers folder (VAE kept in float32, as the reference does), or
    over tiny random components when `model` is None. `offload`: False, True / "model" (diffusers' model CPU
    offload) or "sequential" (sequential CPU offload: the reference's setting for 1080p x 81 frames on 24 GB, with
    `vae_tiling`)."""
    import torch
    from diffusers import AutoencoderKLWan

    from .pipeline import FreeSwimWanPipeline
    from .tiny import tiny_wan_components

    if model is None:
        pipe = FreeSwimWanPipeline(**tiny_wan_components(seed=seed, dtype=dtype or torch.float32))
    else:
        if not os.path.isdir(model):
            raise ValueError(f"--model must be a local diffusers Wan folder (model_index.json), got {model!r}")
        vae = AutoencoderKLWan.from_pretrained(model, subfolder="vae", torch_dtype=torch.float32)
        pipe = FreeSwimWanPipeline.from_pretrained(model, vae=vae, torch_dtype=dtype or torch.bfloat16)
    if vae_tiling:
        pipe.vae.enable_tiling()
    if offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    elif offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    return pipe


def base_size_for(pipe):
    """The reference's base resolution for a Wan checkpoint: 720 x 1280 for the 14B models (width 5120),
    480 x 832 otherwise."""
    cfg = pipe.transformer.config
    return (720, 1280) if cfg.num_attention_heads * cfg.attention_head_dim >= 5120 else (480, 832)


def save_frames(frames, path, fps=16) -> str:
    """Write one video's frames (list of PIL images) as a video (`.mp4`, `.gif`) or, for one frame, an image."""
    from diffusers.utils import export_to_video

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.lower().endswith((".png", ".jpg", ".jpeg", ".webp")):
        if len(frames) != 1:
            raise ValueError(f"an image path needs --frames 1, got {len(frames)} frames for {path!r}")
        frames[0].save(path)
        return path
    return export_to_video(frames, path, fps=fps)


def plot_window_pattern(path, grid=(1, 12, 20), base_grid=(6, 10), queries=((6, 10), (0, 0), (3, 19), (11, 4))):
    """Picture of FreeSwim's inward window on one frame: visible keys of a few queries (interior, corner, edges)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .attention import freeswim_pattern

    pattern = freeswim_pattern(grid, base_grid)
    n = pattern.num_tokens
    mask = pattern.mask(n, n)
    t, h, w = grid
    fig, axes = plt.subplots(1, len(queries), figsize=(3.2 * len(queries), 2.6))
    for ax, (qh, qw) in zip(axes, queries):
        ax.imshow(mask[qh * w + qw, : h * w].reshape(h, w).float(), cmap="Blues", vmin=0, vmax=1.4)
        ax.scatter([qw], [qh], c="red", s=30, marker="s")
        ax.set_title(f"query ({qh}, {qw})", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    _, wh, ww = pattern.window
    fig.suptitle(f"FreeSwim inward window: grid {h}x{w}, base {base_grid[0]}x{base_grid[1]} -> window {wh}x{ww} "
                 f"(every query sees {t}x{wh}x{ww} keys; border windows shift inward)", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_generate(args) -> int:
    import torch

    if args.pipeline != "freeswim":
        raise ValueError(f"--pipeline must be 'freeswim', got {args.pipeline!r}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    defaults = TINY_DEFAULTS if args.model is None else REAL_DEFAULTS
    height, width, base_height, base_width, frames, steps = (
        v if v is not None else d for v, d in zip(
            (args.height, args.width, args.base_height, args.base_width, args.frames, args.steps), defaults))
    t0 = time.perf_counter()
    try:
        return _generate(args, device, height, width, base_height, base_width, frames, steps, t0)
    except ValueError as err:  # bad sizes, frame counts, paths: a usage error, not a traceback
        print(f"zoo generate: error: {err}", file=sys.stderr)
        return 2


def _generate(args, device, height, width, base_height, base_width, frames, steps, t0) -> int:
    import torch

    pipe = load_pipeline(args.model, device, _dtype(args.dtype, device), seed=args.seed, offload=args.offload,
                         vae_tiling=args.vae_tiling)
    if args.model is not None:  # 14B checkpoints default to their own base resolution
        default_h, default_w = base_size_for(pipe)
        base_height, base_width = args.base_height or default_h, args.base_width or default_w
    pipe.set_progress_bar_config(disable=args.quiet)
    out = pipe(
        prompt=args.prompt, negative_prompt=args.negative_prompt, height=height, width=width,
        base_height=base_height, base_width=base_width, num_frames=frames, num_inference_steps=steps,
        guidance_scale=args.guidance, strength=args.strength, cache_steps=args.cache_steps or None, mode=args.mode,
        flow_shift=args.flow_shift, generator=torch.Generator("cpu").manual_seed(args.seed), output_type="pil",
        max_sequence_length=args.max_sequence_length or (16 if args.model is None else 512),
    )
    path = save_frames(out.frames[0], args.out, fps=args.fps)
    kind = "tiny random Wan" if args.model is None else args.model
    print(f"wrote {path}: {frames} frame(s) at {height}x{width} ({args.mode}, {kind}) in "
          f"{time.perf_counter() - t0:.1f} s")
    return 0


def demo_step(args, console) -> None:
    """`zoo demo` step: tiny FreeSwim run on CPU, writing the video and a picture of the window pattern."""
    import torch
    from rich.table import Table

    out_dir = getattr(args, "out", None) or "./zoo-demo-out"
    height, width, base_height, base_width, frames, steps = TINY_DEFAULTS
    pipe = load_pipeline(None, "cpu", seed=0)
    pipe.set_progress_bar_config(disable=getattr(args, "quiet", False))
    t0 = time.perf_counter()
    out = pipe(prompt=DEFAULT_PROMPT, height=height, width=width, base_height=base_height, base_width=base_width,
               num_frames=frames, num_inference_steps=steps, cache_steps=2, output_type="pil",
               max_sequence_length=16, generator=torch.Generator().manual_seed(0))
    seconds = time.perf_counter() - t0
    video = save_frames(out.frames[0], os.path.join(out_dir, "freeswim_tiny.mp4"), fps=8)
    picture = plot_window_pattern(os.path.join(out_dir, "freeswim_window.png"))
    state = pipe._freeswim_state
    table = Table(title="FreeSwim on a tiny random Wan (CPU; random weights, so the video is noise-like)")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    head_dim = pipe.transformer.config.attention_head_dim
    for name, value in (
        ("target / base resolution", f"{height}x{width} / {base_height}x{base_width}, {frames} frames"),
        ("token grid (T', H', W') / window", f"{state.pattern.grid} / {state.pattern.window}"),
        ("self-attention scale x sqrt(d_head)", f"{state.scale * head_dim ** 0.5:.3f}"),
        ("window / full self-attention calls", f"{state.counts['window_self']} / {state.counts['full_self']}"),
        ("cross-attention computed / reused", f"{state.counts['cross']} / {state.counts['cross_reuse']}"),
        ("seconds", f"{seconds:.1f}"),
    ):
        table.add_row(name, value)
    console.print(table)
    console.print(f"wrote {video} and {picture}")


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="high-resolution video with FreeSwim over a Wan diffusers checkpoint "
                                        "(a tiny random Wan without --model)")
    p.add_argument("--pipeline", default="freeswim", choices=["freeswim"], help="generation pipeline")
    p.add_argument("--model", default=None, help="local Wan diffusers folder (default: tiny random Wan, offline)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--height", type=int, default=None, help="target height (default 1088; tiny 64)")
    p.add_argument("--width", type=int, default=None, help="target width (default 1920; tiny 96)")
    p.add_argument("--base-height", type=int, default=None, help="base height (default 480, 720 for 14B; tiny 32)")
    p.add_argument("--base-width", type=int, default=None, help="base width (default 832, 1280 for 14B; tiny 48)")
    p.add_argument("--frames", type=int, default=None, help="frames, 4k+1; 1 = image (default 81; tiny 9)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 50; tiny 6)")
    p.add_argument("--strength", type=float, default=0.7, help="video-to-video strength of the FreeSwim stage")
    p.add_argument("--cache-steps", type=int, default=2, help="cross-attention cache refresh period (0: no cache)")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    p.add_argument("--flow-shift", type=float, default=9.0, help="scheduler shift at the target resolution")
    p.add_argument("--mode", default="freeswim", choices=["freeswim", "window"],
                   help="freeswim: coarse to fine with the dual path; window: plain high-res text-to-video")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-sequence-length", type=int, default=None, help="T5 tokens (default 512; tiny 16)")
    p.add_argument("--device", default=None, help="default cuda when available, else cpu")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="default bf16 on cuda")
    p.add_argument("--offload", nargs="?", const="model", default=None, choices=["model", "sequential"],
                   help="CPU offload: model (enable_model_cpu_offload; the default when given without a value) or "
                        "sequential (enable_sequential_cpu_offload, least memory)")
    p.add_argument("--vae-tiling", action="store_true", help="decode/encode the video in VAE tiles (less memory)")
    p.add_argument("--fps", type=int, default=16)
    p.add_argument("--out", default="video.mp4", help="output .mp4/.gif, or .png/.jpg with --frames 1")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_generate)
