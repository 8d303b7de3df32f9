"""Probes behind the issue-4 bias rows (kernels/NOTES.md, eleventh session); run on the GPU.

    python scripts/probe_bias_kernels.py              # dense-bias backward: CUDA time per kernel (torch.profiler)
    python scripts/probe_bias_kernels.py --lowrank    # low-rank r16 rows with the full autotune lists
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import kernels  # noqa: E402


def breakdown(calls: int = 5) -> None:
    """CUDA time per kernel of one backward call, without and with a dense (H, N, N) bias."""
    for B, H, N, D in [(2, 16, 4096, 64), (1, 16, 4096, 128)]:
        q, k, v = [torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in "qkv"]
        bias = torch.randn(H, N, N, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for with_bias in (False, True):
            leaves = [q, k, v] + ([bias] if with_bias else [])
            out = kernels.attention(q, k, v, bias=bias if with_bias else None)
            do = torch.randn_like(out)
            for _ in range(3):  # autotuning and compilation
                torch.autograd.grad(out, leaves, do, retain_graph=True)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(calls):
                    torch.autograd.grad(out, leaves, do, retain_graph=True)
                torch.cuda.synchronize()
            print(f"== B{B} H{H} N{N} d{D} bias={with_bias}: per backward call")
            total = 0.0
            for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total):
                if e.device_time_total > 0:
                    total += e.device_time_total / calls
                    print(f"   {e.device_time_total / calls / 1e3:8.3f} ms  x{e.count // calls:<3d} {e.key[:90]}")
            print(f"   total {total / 1e3:.3f} ms", flush=True)


def lowrank_full_tune() -> None:
    """The low-rank r16 rows and their no-bias anchors, both tuned over the full candidate lists."""
    os.environ["ATTNZOO_AUTOTUNE"] = "full"
    import bench_kernels as bk

    for B, H, N, D in [(1, 16, 4096, 128), (2, 16, 4096, 64)]:
        q, k, v = bk._qkv(B, H, N, D)
        uq, uk = [torch.randn(B, H, N, 16, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in "ab"]
        t0f, t0b = bk._fb(lambda: kernels.attention(q, k, v), [q, k, v])
        tlf, tlb = bk._fb(lambda: kernels.attention(q, k, v, bias=kernels.LowRankBias(uq, uk)), [q, k, v, uq, uk])
        print(f"full-tune B{B} H{H} N{N} d{D}: fwd {tlf:.4f} / {t0f:.4f} ms = {tlf / t0f:.3f}x; "
              f"bwd {tlb:.4f} / {t0b:.4f} ms = {tlb / t0b:.3f}x", flush=True)
    bk.print_autotuned()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lowrank", action="store_true", help="the low-rank rows under the full autotune lists")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    os.environ.setdefault("ATTNZOO_AUTOTUNE", "fast")
    if args.lowrank:
        lowrank_full_tune()
    else:
        breakdown()
