"""Host (CPU) time per `kernels.attention` call on the GPU, against the GPU time of the same call.

    python scripts/profile_host.py                 # the small cases where host time was seen to dominate
    python scripts/profile_host.py --cprofile 25   # also the 25 costliest Python functions per case

Why: on the device (third session) small calls ran at ~0.3-0.6 ms each while their kernels take tens of
microseconds (agent attention at 224 px, the 49 x 4096 few-queries case), and on the 2-core dev CPU the
Python part of a call measures ~45 us with the launches stubbed. This script splits a call's wall time into
host time (the loop without synchronising, launches queued asynchronously) and GPU time (CUDA events), and
with --cprofile shows where the host time goes (our wrapper, Triton's launcher, torch ops).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import kernels  # noqa: E402


def _cases(device):
    bf = dict(device=device, dtype=torch.bfloat16)
    B, h = 256, 3
    q = torch.randn(B, h, 197, 64, **bf)
    agents = torch.randn(B, h, 49, 64, **bf)
    b1 = torch.randn(1, h, 49, 197, device=device)
    b2 = torch.randn(1, h, 197, 49, device=device)
    g = torch.randn(2, 4096, 16, **bf)
    d = torch.randn(2, 16, 4096, 128, **bf)
    a8 = torch.randn(8, 8, 49, 64, **bf)
    k8 = torch.randn(8, 8, 4096, 64, **bf)
    s = torch.randn(8, 8, 16384, 64, **bf)
    k64 = torch.randn(8, 8, 64, 64, **bf)
    from timm.models.vision_transformer import Attention

    from zoo.layers import AgentAttention

    x = torch.randn(B, 197, 192, **bf)
    timm_attn = Attention(192, num_heads=3, qkv_bias=True).to(device).eval()
    agent_attn = AgentAttention(192, num_heads=3, agent_num=49, bias_grid=(14, 14), num_prefix_tokens=1,
                                qkv_bias=True, device=device).eval()
    qv, kv, vv = torch.randn(B, 197, 3, h, 64, **bf).permute(2, 0, 3, 1, 4).unbind(0)
    dwc, dwc_bias = torch.randn(192, 1, 3, 3, device=device), torch.randn(192, device=device)  # as the layer's

    def autocast(fn):
        def run():
            with torch.autocast("cuda", torch.bfloat16):
                return fn()
        return run

    import timm

    import zoo

    images = torch.randn(B, 3, 224, 224, device=device)
    timm_deit = timm.create_model("deit_tiny_patch16_224").to(device).eval()
    zoo_deit = zoo.create_model("agent_deit_tiny").to(device).eval()

    return {
        "timm deit_tiny step @224": autocast(lambda: timm_deit(images)),
        "zoo agent_deit_tiny step @224": autocast(lambda: zoo_deit(images)),
        "timm Attention layer @224 (SDPA)": autocast(lambda: timm_attn(x)),
        "AgentAttention layer @224": autocast(lambda: agent_attn(x, (14, 14))),
        "kernels.agent_attention @224 (fused)": lambda: kernels.agent_attention(
            qv, kv, vv, grid=(14, 14), agent_grid=(7, 7), num_prefix_tokens=1, bias1=b1, bias2=b2, dwc_weight=dwc,
            dwc_bias=dwc_bias),
        "agent@224 step 1 (49x197, bias)": lambda: kernels.attention(agents, q, q, bias=b1),
        "agent@224 step 2 (197x49, bias)": lambda: kernels.attention(q, agents, agents, bias=b2),
        "few queries 49x4096": lambda: kernels.attention(a8, k8, k8),
        "few keys 16384x64": lambda: kernels.attention(s, k64, k64),
        "dense N4096 d128": lambda: kernels.attention(d, d, d),
        "dense N4096 d128 + head-wise gate": lambda: kernels.attention(d, d, d, gate=g),
    }


def measure(fn, calls: int):
    with torch.no_grad():
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        host = (time.perf_counter() - t0) / calls
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / calls
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        stream = start.elapsed_time(end) / calls / 1e3
        torch.cuda.synchronize()
        gpu = []
        for _ in range(20):  # one call at a time, queued behind a sleep so the host is ahead: kernel time only
            torch.cuda._sleep(2_000_000)
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            gpu.append(s.elapsed_time(e) / 1e3)
    return host, wall, stream, sorted(gpu)[len(gpu) // 2]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--cprofile", type=int, default=0, metavar="N", help="print the N costliest functions")
    parser.add_argument("--only", default="", help="run the cases whose name contains this text")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("profile_host.py needs a CUDA GPU (host time around real launches)")
    print(f"{'case':40s} {'host us':>9s} {'wall us':>9s} {'stream us':>9s} {'gpu us':>9s}")
    for name, fn in _cases("cuda").items():
        if args.only not in name:
            continue
        host, wall, stream, gpu = measure(fn, max(10, args.calls // 8) if "step @" in name else args.calls)
        print(f"{name:40s} {host * 1e6:9.1f} {wall * 1e6:9.1f} {stream * 1e6:9.1f} {gpu * 1e6:9.1f}", flush=True)
        if args.cprofile:
            prof = cProfile.Profile()
            with torch.no_grad():
                prof.enable()
                for _ in range(max(10, args.calls // 8) if "step @" in name else args.calls):
                    fn()
                prof.disable()
            torch.cuda.synchronize()
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(args.cprofile)
            print(out.getvalue(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
