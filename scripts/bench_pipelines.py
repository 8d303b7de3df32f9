"""FreeSwim vs dense attention, per denoising step with classifier-free guidance, on a Wan2.1-1.3B-shaped
transformer (12 heads x 128, 30 layers, ffn 8960; random bf16 weights), measured in the same run.

    python scripts/bench_pipelines.py              # 960x1664, 81 frames (21x60x104 = 131,040 tokens), base 480x832
    python scripts/bench_pipelines.py --small      # GPU smoke run: 4 layers, 480x832, 21 frames
    python scripts/bench_pipelines.py --cpu-check  # CPU: a tiny transformer, checks the script runs (no results)

One guided step = a cond and an uncond transformer forward, as diffusers' WanPipeline runs them.

* dense: diffusers' stock `WanAttnProcessor` (SDPA) on both passes (the anchor; one dense forward at the full
  size takes ~6.6 s on an H200);
* FreeSwim refresh step: cond pass on [window; full] rows (window attention through `kernels.attention`'s
  Neighborhood pattern + dense full branch, cross-attention of the full rows stored), uncond pass window-only;
* FreeSwim cached step: cond pass window-only reusing the stored cross-attention, uncond pass window-only.

With the cache refreshed every c steps, FreeSwim's mean step is (refresh + (c - 1) cached) / c; the table gives
it for c = 2 (the reference pipeline's default) and c = 5 (the value its inference script suggests), and the
ratio to the dense step (target <= 0.5). Writes benchmarks/pipelines.json and prints a markdown table.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffusers import WanTransformer3DModel  # noqa: E402

from pipelines.benchmark import markdown_table, peak_memory, time_cuda, write_results  # noqa: E402
from pipelines.freeswim.attention import (FreeSwimState, freeswim_attention_scale, freeswim_pattern,  # noqa: E402
                                          freeswim_processors)

WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6)
# name -> (model overrides, height, width, frames, base height, base width, text tokens)
SIZES = {
    "full": ({}, 960, 1664, 81, 480, 832, 512),
    "small": ({"num_layers": 4}, 480, 832, 21, 240, 416, 512),
    "cpu": ({"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 32, "ffn_dim": 64, "text_dim": 32},
            64, 96, 5, 32, 48, 16),
}


def build_transformer(config, device, dtype):
    """Random-weight Wan transformer; modules Wan keeps in float32 stay float32 (as from_pretrained does)."""
    with torch.device(device):
        model = WanTransformer3DModel(**config).eval()
    model.to(dtype)
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, module in model.named_modules():
        if keep & set(name.split(".")):
            module.float()
    for name, param in model.named_parameters():
        if keep & set(name.split(".")):
            param.data = param.data.float()
    return model


def cpu_time(fn, warmup=1, repeats=2):
    """Wall-clock median on the CPU: only to check that the script runs; never a result."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "n": repeats}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="quick GPU smoke run (4 layers, 480x832, 21 frames)")
    parser.add_argument("--cpu-check", action="store_true", help="tiny CPU run to check the script (no results)")
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats per step kind (after 1 warm-up)")
    parser.add_argument("--out-dir", default=None, help="where pipelines.json goes (default ./benchmarks)")
    args = parser.parse_args(argv)

    size = "cpu" if args.cpu_check else "small" if args.small else "full"
    overrides, height, width, frames, base_h, base_w, text_len = SIZES[size]
    cuda = torch.cuda.is_available() and not args.cpu_check
    if not cuda and not args.cpu_check:
        raise SystemExit("no CUDA device: run with --cpu-check for a CPU smoke run (timings there are not results)")
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    torch.manual_seed(0)

    config = {**WAN_1_3B, **overrides}
    model = build_transformer(config, device, dtype)
    grid = (1 + (frames - 1) // 4, height // 16, width // 16)
    base_grid = (base_h // 16, base_w // 16)
    tokens = grid[0] * grid[1] * grid[2]
    x = torch.randn(1, 16, grid[0], 2 * grid[1], 2 * grid[2], device=device, dtype=dtype)
    t = torch.full((1,), 700.0, device=device)
    cond = torch.randn(1, text_len, config["text_dim"], device=device, dtype=dtype)
    uncond = torch.randn(1, text_len, config["text_dim"], device=device, dtype=dtype)

    def forward(latents, context):
        n = latents.shape[0]
        return model(hidden_states=latents, timestep=t.expand(n), encoder_hidden_states=context.expand(n, -1, -1),
                     return_dict=False)[0]

    @torch.no_grad()
    def dense_step():
        return forward(x, cond), forward(x, uncond)

    state = FreeSwimState(pattern=freeswim_pattern(grid, base_grid),
                          scale=freeswim_attention_scale(config["attention_head_dim"], base_grid[0] * base_grid[1],
                                                         grid[1] * grid[2]))

    @torch.no_grad()
    def refresh_step():
        state.set_mode("dual", store_cross=True)
        c = forward(torch.cat([x, x]), cond)[:1]
        state.set_mode("window")
        return c, forward(x, uncond)

    @torch.no_grad()
    def cached_step():
        state.set_mode("reuse")
        c = forward(x, cond)
        state.set_mode("window")
        return c, forward(x, uncond)

    timer = (lambda fn: time_cuda(fn, warmup=1, repeats=args.repeats, min_ms=0.0)) if cuda else cpu_time
    memory = peak_memory if cuda else (lambda fn: (fn(), None)[1])
    print(f"{size}: {height}x{width}, {frames} frames -> grid {grid} = {tokens} tokens; window "
          f"{state.pattern.window} ({100 * state.pattern.density(tokens, tokens):.1f}% of keys); "
          f"{config['num_layers']} layers; {device} {dtype}", flush=True)

    t0 = time.perf_counter()
    if os.environ.get("ATTNZOO_WARM"):  # compile-only shard (scripts/warm_triton_cache.py): SDPA needs no warming
        dense_mem, dense = None, {"median_ms": float("nan")}
    else:
        dense_mem = memory(dense_step)
        dense = timer(dense_step)
    print(f"dense step: {dense['median_ms'] / 1e3:.2f} s ({time.perf_counter() - t0:.0f} s)", flush=True)
    with freeswim_processors(model, state):
        t0 = time.perf_counter()
        refresh_mem = memory(refresh_step)  # also fills the cache the cached step reads
        refresh = timer(refresh_step)
        cached_mem = memory(cached_step)
        cached = timer(cached_step)
        print(f"FreeSwim refresh / cached step: {refresh['median_ms'] / 1e3:.2f} / {cached['median_ms'] / 1e3:.2f} s "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        cache_gib = sum(v.numel() * v.element_size() for v in state.cross_cache.values()) / 2**30

    def row(name, ms, mem, **extra):
        return {"case": name, "size": f"{height}x{width}x{frames}", "tokens": tokens, "step_s": ms / 1e3,
                "vs_dense": ms / dense["median_ms"], "peak_GiB": mem, **extra}

    freeswim_mem = None if refresh_mem is None else max(refresh_mem, cached_mem)
    rows = [
        row("dense (SDPA), cond+uncond", dense["median_ms"], dense_mem, forward_s=dense["median_ms"] / 2e3,
            anchor_forward_s=6.6 if size == "full" else None),
        row("FreeSwim refresh step", refresh["median_ms"], refresh_mem),
        row("FreeSwim cached step", cached["median_ms"], cached_mem, cache_GiB=cache_gib),
    ]
    for c in (2, 5):
        mean = (refresh["median_ms"] + (c - 1) * cached["median_ms"]) / c
        rows.append(row(f"FreeSwim mean step, cache_steps={c}", mean, freeswim_mem,
                        target_met=bool(mean <= 0.5 * dense["median_ms"])))
    for r in rows:
        r.update(window=str(state.pattern.window), layers=config["num_layers"], device=device)
    columns = ["case", "size", "tokens", "step_s", "vs_dense", "peak_GiB", "target_met"]
    print(markdown_table(rows, columns))
    if not cuda:
        print("(CPU check: the timings above are not results)")
    out_dir = args.out_dir
    if not cuda and out_dir is None:
        out_dir = os.path.join(tempfile.gettempdir(), "attnzoo-cpu-check")  # never mixed with GPU results
    path = write_results("pipelines", rows, " ".join(["python", "scripts/bench_pipelines.py", *(argv or sys.argv[1:])]),
                         out_dir)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
