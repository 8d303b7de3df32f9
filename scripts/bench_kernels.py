"""Benchmark `kernels.attention` (Triton) against its anchors on one CUDA GPU, after a GPU correctness check.

Usage: python scripts/bench_kernels.py [--out benchmarks] [--name kernels] [--skip-check]
       [--only dense,causal,na3d,na2d,win1d,bias,gate,skinny,grid,skinny2,relpos,agent]

Every row is measured with its anchor in the same run (torch SDPA with the flash backend, FlexAttention compiled
with a block mask of the same pattern, or our own kernel without the fused term: no bias, no gate); bf16.
Writes `<out>/<name>.json` and prints a markdown table for BENCHMARKS.md. The issue-4 rows (bias, gate, skinny)
tune over three configs per kernel (ATTNZOO_AUTOTUNE=fast) to bound compile time; ATTNZOO_BENCH_AUTOTUNE=1 tunes
them over the full lists. Times are GPU time per call from CUDA-graph replays (ATTNZOO_BENCH_TIMER=eager: eager
back-to-back calls, host launch cost included where it exceeds the kernel). The bias and gate rows, ratios to our
own kernel without the term, time each case and its anchor interleaved (`_fb_interleaved`).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import importlib.util
import itertools
import math
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import kernels  # noqa: E402
from kernels.backends.reference import attention_reference  # noqa: E402


def _load_benchmark_utils():
    spec = importlib.util.spec_from_file_location("_bench_utils", os.path.join(ROOT, "pipelines", "benchmark.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


bench = _load_benchmark_utils()
TOL = {torch.bfloat16: 2e-2, torch.float16: 3e-3, torch.float32: 1e-4}


# ----------------------------------------------------------------------------------------------------------
# correctness on the GPU


def _rel(a, b):
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-300)).item()


_AUTOTUNE_STACK = []


def _set_autotune(mode: str) -> None:
    """ATTNZOO_AUTOTUNE for one check or bench; `_restore_autotune` puts back the caller's value (a run under
    ATTNZOO_AUTOTUNE=fast stays fast after the checks)."""
    _AUTOTUNE_STACK.append(os.environ.get("ATTNZOO_AUTOTUNE"))
    os.environ["ATTNZOO_AUTOTUNE"] = mode


def _restore_autotune() -> None:
    bench.set_env(ATTNZOO_AUTOTUNE=_AUTOTUNE_STACK.pop())


def check_case(name, pattern, B, H, HKV, NQ, NK, D, DV, dtype, dev="cuda"):
    """Forward (with lse) and backward vs float64. `dev`: "cuda"; scripts/prebuild_triton_cache.py runs the same
    calls on CPU tensors to compile them."""
    q = torch.randn(B, H, NQ, D, device=dev, dtype=dtype, requires_grad=True)
    k = torch.randn(B, HKV, NK, D, device=dev, dtype=dtype, requires_grad=True)
    v = torch.randn(B, HKV, NK, DV, device=dev, dtype=dtype, requires_grad=True)
    out, lse = kernels.attention(q, k, v, pattern, backend="triton", return_lse=True)
    do = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    q64, k64, v64 = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ro, rl = attention_reference(q64, k64, v64, pattern, return_lse=True)
    rdq, rdk, rdv = torch.autograd.grad(ro, (q64, k64, v64), do.double())
    fin = torch.isfinite(rl)
    errs = dict(out=_rel(out, ro), dq=_rel(dq, rdq), dk=_rel(dk, rdk), dv=_rel(dv, rdv),
                lse=(lse[fin].double() - rl[fin]).abs().max().item() if fin.any() else 0.0)
    finite = all(torch.isfinite(t).all().item() for t in (out, dq, dk, dv))
    ok = finite and max(errs["out"], errs["dq"], errs["dk"], errs["dv"]) < TOL[dtype] and errs["lse"] < 1e-2
    print(f"check {name:44s} {str(dtype):15s} " + " ".join(f"{k}={v:.1e}" for k, v in errs.items())
          + f" {'ok' if ok else 'FAIL'}", flush=True)
    return ok


def check_extra(name, pattern, B, H, HKV, NQ, NK, D, DV, dtype, bias_fn=None, gate_shape=None, kv_expand=False,
                dev="cuda", scale=None):
    """Bias / gate / skinny / expanded-k/v features vs float64: out and every gradient (bias leaves too), at the
    softmax `scale` (default 1 / sqrt(D)). `dev`: "cuda"; scripts/prebuild_triton_cache.py runs the same calls on
    CPU tensors to compile them."""

    def mk(*shape, dt=dtype):
        return torch.randn(*shape, device=dev, dtype=dt, requires_grad=True)

    q, k, v = mk(B, H, NQ, D), mk(B, HKV, NK, D), mk(B, HKV, NK, DV)
    gate = mk(*gate_shape) if gate_shape else None
    bias, bl = bias_fn(mk) if bias_fn else (None, [])
    kv = (lambda a, b: (a.expand(-1, H, -1, -1), b.expand(-1, H, -1, -1))) if kv_expand else (lambda a, b: (a, b))
    out = kernels.attention(q, *kv(k, v), pattern, bias=bias, gate=gate, scale=scale, backend="triton")
    do = torch.randn_like(out)
    leaves = [q, k, v] + ([gate] if gate is not None else []) + bl
    grads = torch.autograd.grad(out, leaves, do)
    l64 = [x.detach().double().requires_grad_() for x in leaves]
    it = iter(l64[3 + (gate is not None):])
    bias64 = bias_fn(lambda *s, dt=None: next(it))[0] if bias_fn else None
    ro = attention_reference(l64[0], *kv(l64[1], l64[2]), pattern, bias=bias64,
                             gate=l64[3] if gate is not None else None, scale=scale)
    rgrads = torch.autograd.grad(ro, l64, do.double())
    errs = dict(out=_rel(out, ro), **{f"g{i}": _rel(g, rg) for i, (g, rg) in enumerate(zip(grads, rgrads))})
    finite = torch.isfinite(out).all().item() and all(torch.isfinite(g).all().item() for g in grads)
    ok = finite and max(errs.values()) < TOL[dtype]
    print(f"check {name:44s} {str(dtype):15s} " + " ".join(f"{k}={v:.1e}" for k, v in errs.items())
          + f" {'ok' if ok else 'FAIL'}", flush=True)
    return ok


def _dense_bias(shape, dt=None):
    return lambda mk: (lambda b: (b, [b]))(mk(*shape) if dt is None else mk(*shape, dt=dt))


def _low_rank(qs, ks):
    def fn(mk):
        a, b = mk(*qs), mk(*ks)
        return kernels.LowRankBias(a, b), [a, b]
    return fn


def _rel_pos(pattern, d, scale=0.25):
    def fn(mk):
        t = [mk(2 * pattern.window - 1, d) for _ in pattern.grid]
        return kernels.RelPosBias(pattern, t, scale=scale), t
    return fn


def extra_check_cases():
    """The issue-4 GPU checks (bias, low-rank, rel-pos, gate, skinny): (name, pattern, B, H, HKV, NQ, NK, D, DV,
    dtype, check_extra kwargs), untuned."""
    bf, fp = torch.bfloat16, torch.float16
    halo = kernels.Halo((16, 16), 8, 2)
    return [
        ("dense bias (1,H,N,N) d128 n1000", kernels.Dense(), 2, 4, 2, 1000, 1000, 128, 128, bf,
         dict(bias_fn=_dense_bias((1, 4, 1000, 1000)))),
        ("causal bias fp32-under-bf16 (N,N) d64", kernels.Causal(), 1, 4, 4, 777, 800, 64, 64, bf,
         dict(bias_fn=_dense_bias((777, 800), torch.float32))),
        ("window1d bias (1,H,N,N) batch of two d64", kernels.Window1d(300, 200), 2, 4, 4, 1500, 1500, 64, 64, bf,
         dict(bias_fn=_dense_bias((1, 4, 1500, 1500)))),
        ("na2d (30,37) w(7,9) bias (H,N,N) d64", kernels.Neighborhood((30, 37), (7, 9)), 1, 2, 2, 1110, 1110, 64,
         64, bf, dict(bias_fn=_dense_bias((2, 1110, 1110)))),
        ("low-rank r16 dense d64 n900", kernels.Dense(), 2, 4, 2, 900, 1000, 64, 64, bf,
         dict(bias_fn=_low_rank((1, 4, 900, 16), (2, 1, 1000, 16)))),
        ("low-rank r7 window1d fp16 d96", kernels.Window1d(100, 50), 1, 3, 1, 777, 777, 96, 96, fp,
         dict(bias_fn=_low_rank((1, 3, 777, 7), (1, 3, 777, 7)))),
        ("low-rank r16 causal d128", kernels.Causal(), 1, 4, 2, 700, 777, 128, 128, bf,
         dict(bias_fn=_low_rank((1, 4, 700, 16), (1, 4, 777, 16)))),
        ("low-rank r16 causal d128 scale 1/8 (chained)", kernels.Causal(), 1, 4, 2, 700, 777, 128, 128, bf,
         dict(bias_fn=_low_rank((1, 4, 700, 16), (1, 4, 777, 16)), scale=0.125)),
        ("relpos halo grid (16,16) b8 h2 d64", halo, 1, 2, 2, 256, 400, 64, 64, bf, dict(bias_fn=_rel_pos(halo, 64))),
        ("relpos halo block (blocked dense) d32", None, 64, 4, 4, 64, 144, 32, 32, bf,
         dict(bias_fn=_rel_pos(kernels.Halo((8, 8), 8, 2), 32))),
        ("gate head-wise dense d128", kernels.Dense(), 2, 4, 4, 1000, 1000, 128, 128, bf,
         dict(gate_shape=(2, 1000, 4))),
        ("gate element-wise na2d d64", kernels.Neighborhood((30, 37), (7, 9)), 1, 2, 2, 1110, 1110, 64, 64, bf,
         dict(gate_shape=(1, 1110, 2, 64))),
        ("skinny nq4096 nk100 + bias + gate d64", kernels.Dense(), 2, 8, 8, 4096, 100, 64, 64, bf,
         dict(bias_fn=_dense_bias((1, 8, 4096, 100)), gate_shape=(2, 4096, 8))),
        ("skinny nq49 nk5000 + bias d64", kernels.Dense(), 2, 8, 8, 49, 5000, 64, 64, bf,
         dict(bias_fn=_dense_bias((1, 8, 49, 5000)))),
        ("expanded k/v (probe) nq16 nk3000 d64", kernels.Dense(), 4, 8, 1, 16, 3000, 64, 64, bf,
         dict(kv_expand=True)),
    ]


def run_checks_ii():
    _set_autotune("0")
    cases = extra_check_cases()
    ok = all([check_extra(*c[:10], **c[10]) for c in cases])
    ok &= check_short_loop_configs()
    ok &= check_qreg_configs()
    _restore_autotune()
    return ok


def _forcing_forward(tune, pick, what: str):
    """A stand-in for `triton_attention._autotune`: forward keys get the first offered config that `pick` accepts
    (a ValueError names `what` when none is offered); other keys go to `tune`."""
    def forced(key, candidates, run):
        if key[0] != "fwd":
            return tune(key, candidates, run)
        offered = candidates() if callable(candidates) else candidates
        match = [c for c in offered if pick(c)]
        if not match:
            raise ValueError(f"forward config {what} not offered for {key}")
        return match[0]

    return forced


def check_short_loop_configs():
    """The Halo and rel-pos checks with each forward config that only the tuner picks
    (`triton_attention._short_loop_candidates`) forced: untuned checks run the first candidate alone. Fails too
    when a config is not offered for these problems."""
    from kernels.backends import triton_attention as ta

    halo = next(c for c in core_check_cases() if c[0].startswith("halo"))
    plain = ta._short_loop_candidates([], halo[1], halo[7], halo[8], halo[6])
    configs = ta._short_loop_candidates([], halo[1], halo[7], halo[8], halo[6], rel=True)
    rel = [c for c in extra_check_cases() if c[0].startswith("relpos")]
    tune, ok = ta._autotune, True
    for cfg in configs:
        # grid candidates carry (tile variant, in place) after the block config
        ta._autotune = _forcing_forward(
            tune, lambda c, cfg=cfg: c == cfg or (c[0] != "skinny" and len(c) >= 6 and c[:4] + c[6:] == cfg), cfg)
        try:
            if cfg in plain:  # the capped rel-pos configs are offered with rel-pos only
                ok &= check_case(f"{halo[0]} fwd {cfg}", *halo[1:])
            ok &= all([check_extra(f"{c[0]} fwd {cfg}", *c[1:10], **c[10]) for c in rel])
        finally:
            ta._autotune = tune
    return ok


def check_qreg_configs(dev: str = "cuda"):
    """The issue-4 checks of the general forward (head dims <= 128) on a `QREG` config, q held in registers: untuned
    checks run the first candidate, which keeps q in shared memory."""
    from kernels.backends import triton_attention as ta

    cases = [c for c in extra_check_cases()
             if c[1] is not None and not c[0].startswith(("skinny", "expanded")) and max(c[7], c[8]) <= 128]
    tune, ok = ta._autotune, True
    ta._autotune = _forcing_forward(tune, lambda c: c[0] != "skinny" and ta.QREG in c, ta.QREG)
    try:
        for c in cases:
            ok &= check_extra(f"{c[0]} fwd {ta.QREG}", *c[1:10], **c[10], dev=dev)
    finally:
        ta._autotune = tune
    return ok


def core_check_cases():
    """bench_kernels' issue-3 GPU checks: (name, pattern, B, H, HKV, NQ, NK, D, DV, dtype), untuned (first
    config); scripts/prebuild_triton_cache.py compiles the same calls."""
    N = kernels.Neighborhood
    return [
        ("dense gqa 4/2 d128 n1000", kernels.Dense(), 2, 4, 2, 1000, 1000, 128, 128, torch.bfloat16),
        ("causal d64 nq1000 nk1111", kernels.Causal(), 1, 4, 4, 1000, 1111, 64, 64, torch.bfloat16),
        ("window1d(100,50) d96 n777", kernels.Window1d(100, 50), 1, 3, 1, 777, 777, 96, 96, torch.bfloat16),
        ("na2d (30,37) w(7,9) d128", N((30, 37), (7, 9)), 1, 2, 2, 1110, 1110, 128, 128, torch.bfloat16),
        ("na3d (5,12,20) w(3,5,7) dil/stride d80", N((5, 12, 20), (3, 5, 7), stride=(1, 1, 2), dilation=(1, 2, 1)),
         1, 2, 1, 1200, 1200, 80, 80, torch.bfloat16),
        ("na3d causal t, noinward d64", N((6, 9, 11), (3, 4, 5), inward=False, causal_axes=(0,)), 1, 2, 2, 594, 594,
         64, 64, torch.float16),
        ("halo (16,16) b8 h2 d64", kernels.Halo((16, 16), 8, 2), 1, 2, 2, 256, 400, 64, 64, torch.bfloat16),
        ("dense d256 n513", kernels.Dense(), 1, 2, 2, 513, 513, 256, 256, torch.bfloat16),
        ("dense d72 fp16 n300", kernels.Dense(), 1, 2, 1, 300, 301, 72, 72, torch.float16),
        ("window1d fp32 d32", kernels.Window1d(20, 0), 1, 2, 2, 200, 200, 32, 32, torch.float32),
    ]


def run_checks():
    _set_autotune("0")
    cases = core_check_cases()
    ok = all([check_case(*c) for c in cases])
    _restore_autotune()
    return ok


# ----------------------------------------------------------------------------------------------------------
# timing


def _time(fn, heavy=False):
    """GPU milliseconds of one call: replays of a CUDA graph (host launch costs drop out, as the device's
    METHOD.md asks for small launches); ATTNZOO_BENCH_TIMER=eager, or a call that cannot be captured, times
    back-to-back eager calls instead. `heavy`: a few repeats only (calls of ~100 ms)."""
    repeats = 5 if heavy else 15
    if os.environ.get("ATTNZOO_BENCH_TIMER", "graph") != "eager":
        try:
            return bench.time_cuda_graph(fn, warmup=2 if heavy else 3, repeats=repeats,
                                         target_ms=0.0 if heavy else 2.0)["median_ms"]
        except RuntimeError as err:
            print(f"  (CUDA graph capture failed, timed eagerly: {str(err).splitlines()[0][:200]})", flush=True)
            torch.cuda.synchronize()
    return bench.time_cuda(fn, warmup=2 if heavy else 3, repeats=repeats, min_ms=0.0 if heavy else 100.0)["median_ms"]


def _sdpa(q, k, v, causal=False):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)


def _bwd_fn(fwd, q, k, v):
    out = fwd()
    do = torch.randn_like(out)
    return lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True)


_FLEX = None


def _flex():
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


def _flex_grid_mask(pattern, n):
    """A FlexAttention block mask with exactly the pattern's visibility (from its per-axis windows)."""
    from torch.nn.attention.flex_attention import create_block_mask

    grid = pattern.grid
    wins = [(lo.cuda(), hi.cuda(), d) for lo, hi, d in pattern.axis_windows()]
    strides = [math.prod(grid[a + 1:]) for a in range(len(grid))]

    def mask_mod(b, h, qi, ki):
        vis = qi >= 0
        for (lo, hi, d), s, g in zip(wins, strides, grid):
            cq, ck = (qi // s) % g, (ki // s) % g
            vis = vis & (ck >= lo[cq]) & (ck <= hi[cq])
            if d > 1:
                vis = vis & ((ck - lo[cq]) % d == 0)
        return vis

    return torch.compile(create_block_mask)(mask_mod, None, None, n, n, device="cuda")


def _flex_window_mask(left, right, n):
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, qi, ki):
        return (ki >= qi - left) & (ki <= qi + right)

    return torch.compile(create_block_mask)(mask_mod, None, None, n, n, device="cuda")


def _row(rows, case, direction, ours_ms, anchor, anchor_ms, flops, target, **extra):
    ratio = anchor_ms / ours_ms
    row = dict(case=case, direction=direction, ours_ms=ours_ms, anchor=anchor, anchor_ms=anchor_ms,
               speedup=ratio, target=target, met=("yes" if ratio >= target else "no") if target else "",
               ours_tflops=flops / ours_ms * 1e-9, anchor_tflops=flops / anchor_ms * 1e-9, **extra)
    rows.append(row)
    print(f"{case:42s} {direction:4s} ours {ours_ms:9.3f} ms  {anchor:22s} {anchor_ms:9.3f} ms  x{ratio:5.2f}"
          f"  target {target}  useful TFLOP/s ours {row['ours_tflops']:.0f} anchor {row['anchor_tflops']:.0f}",
          flush=True)


def _qkv(B, H, N, D, dtype=torch.bfloat16):
    return [torch.randn(B, H, N, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3)]


def relpos_inputs(layout: str, D: int = 64, device: str = "cuda"):
    """The rel-pos rows' problem: (pattern, q, k, v, (R_h, R_w)), bf16 leaves, tables shared by the heads (rank
    2 x 12). "grid": HaloNet's form on the full grid, Halo((64, 64), block 8, halo 2), B8 H8 (keys on the padded
    68 x 68 grid); "blocked": the HaloNet layer's blocked-dense layout, (B * 64 blocks, heads, 8 x 8 queries,
    12 x 12 keys), with the single-block pattern the bias is defined on (the attention itself is Dense: see
    `relpos_attend`)."""
    def leaf(*shape, scale=1.0):
        return (scale * torch.randn(*shape, device=device, dtype=torch.bfloat16)).requires_grad_()

    if layout == "grid":
        pattern, q, k, v = kernels.Halo((64, 64), 8, 2), leaf(8, 8, 64 * 64, D), leaf(8, 8, 68 * 68, D), \
            leaf(8, 8, 68 * 68, D)
    elif layout == "blocked":
        pattern, q, k, v = kernels.Halo((8, 8), 8, 2), leaf(512, 8, 64, D), leaf(512, 8, 144, D), leaf(512, 8, 144, D)
    else:
        raise ValueError(f"relpos_inputs: layout must be 'grid' or 'blocked', got {layout!r}")
    return pattern, q, k, v, (leaf(23, D, scale=0.125), leaf(23, D, scale=0.125))


def relpos_attend(layout: str, pattern):
    """The pattern a `relpos_inputs` row attends with: its Halo on the grid; None (dense) on the blocked layout."""
    return pattern if layout == "grid" else None


def _grid_case(grid, window, H=12, D=128):
    """One neighbourhood benchmark problem: (pattern, q, k, v, useful forward FLOPs, FlexAttention block mask,
    seconds to build the mask)."""
    pattern = kernels.Neighborhood(grid, window)
    n = math.prod(grid)
    q, k, v = _qkv(1, H, n, D)
    t0 = time.time()
    mask = _flex_grid_mask(pattern, n)
    return pattern, q, k, v, 4 * H * n * n * D * pattern.density(n, n), mask, time.time() - t0


def bench_dense(rows):
    for B, H, N in [(4, 16, 4096), (2, 16, 8192), (1, 16, 16384)]:
        q, k, v = _qkv(B, H, N, 128)
        flops = 4 * B * H * N * N * 128
        ours = lambda: kernels.attention(q, k, v)  # noqa: E731
        anchor = lambda: _sdpa(q, k, v)  # noqa: E731
        with torch.no_grad():
            t_o, t_a = _time(ours), _time(anchor)
        _row(rows, f"dense B{B} H{H} N{N} d128", "fwd", t_o, "SDPA flash", t_a, flops, 1.2)
        t_o, t_a = _time(_bwd_fn(ours, q, k, v)), _time(_bwd_fn(anchor, q, k, v))
        _row(rows, f"dense B{B} H{H} N{N} d128", "bwd", t_o, "SDPA flash", t_a, 2.5 * flops, 1.0)


def bench_causal(rows):
    for B, H, N in [(4, 16, 4096), (1, 16, 16384)]:
        q, k, v = _qkv(B, H, N, 128)
        flops = 2 * B * H * N * N * 128
        with torch.no_grad():
            t_o = _time(lambda: kernels.attention(q, k, v, kernels.Causal()))
            t_a = _time(lambda: _sdpa(q, k, v, causal=True))
        _row(rows, f"causal B{B} H{H} N{N} d128", "fwd", t_o, "SDPA flash causal", t_a, flops, 1.2)


def bench_na3d(rows):
    pattern, q, k, v, flops, mask, mask_s = _grid_case((21, 60, 104), (21, 30, 52))
    ours = lambda: kernels.attention(q, k, v, pattern)  # noqa: E731
    dense = lambda: _sdpa(q, k, v)  # noqa: E731
    flex = lambda: _flex()(q, k, v, block_mask=mask)  # noqa: E731
    with torch.no_grad():
        t_o, t_d, t_f = _time(ours, True), _time(dense, True), _time(flex, True)
    mem = bench.peak_memory(lambda: kernels.attention(q.detach(), k.detach(), v.detach(), pattern))
    case = "na3d grid(21,60,104) win(21,30,52) H12"
    _row(rows, case, "fwd", t_o, "dense SDPA flash", t_d, flops, 3.0, ours_peak_gib=mem)
    _row(rows, case, "fwd", t_o, "FlexAttention", t_f, flops, 4.0, flex_block_mask_s=mask_s)
    t_o, t_d = _time(_bwd_fn(ours, q, k, v), True), _time(_bwd_fn(dense, q, k, v), True)
    _row(rows, case, "bwd", t_o, "dense SDPA flash", t_d, 2.5 * flops, 2.5)


def bench_na2d(rows):
    pattern, q, k, v, flops, mask, _ = _grid_case((128, 128), (33, 33))
    with torch.no_grad():
        t_o = _time(lambda: kernels.attention(q, k, v, pattern))
        t_f = _time(lambda: _flex()(q, k, v, block_mask=mask))
    _row(rows, "na2d grid(128,128) win(33,33) H12", "fwd", t_o, "FlexAttention", t_f, flops, 3.0)


def bench_win1d(rows):
    B, H, N, left, right = 2, 16, 16384, 1024, 1023
    pattern = kernels.Window1d(left, right)
    q, k, v = _qkv(B, H, N, 128)
    flops = 4 * B * H * N * N * 128 * pattern.density(N, N)
    mask = _flex_window_mask(left, right, N)
    with torch.no_grad():
        t_o = _time(lambda: kernels.attention(q, k, v, pattern))
        t_f = _time(lambda: _flex()(q, k, v, block_mask=mask))
    _row(rows, f"window1d({left},{right}) B{B} H{H} N{N}", "fwd", t_o, "FlexAttention", t_f, flops, 1.0)


def _rel_row(rows, case, direction, t_o, anchor, t_a, target_ratio, **extra):
    """A row whose target is a ratio to our own anchor time (<= target_ratio x anchor)."""
    row = dict(case=case, direction=direction, ours_ms=t_o, anchor=anchor, anchor_ms=t_a, speedup=t_a / t_o,
               ratio=t_o / t_a, target=f"<= {target_ratio:.3g}x anchor",
               met="yes" if t_o <= target_ratio * t_a else "no", **extra)
    rows.append(row)
    print(f"{case:42s} {direction:4s} ours {t_o:9.3f} ms  {anchor:22s} {t_a:9.3f} ms  ratio {t_o / t_a:5.3f}"
          f"  target <= {target_ratio:.3f} {row['met']}", flush=True)


def _fb(fn, leaves, heavy=False):
    """(forward ms, backward ms) of fn() with respect to leaves."""
    with torch.no_grad():
        t_f = _time(fn, heavy)
    out = fn()
    do = torch.randn_like(out)
    t_b = _time(lambda: torch.autograd.grad(out, leaves, do, retain_graph=True), heavy)
    return t_f, t_b


def _fb_interleaved(cases, rounds=60, forwards=None):
    """{name: (forward ms, backward ms)} of `cases` = {name: (fn, leaves)}, the cases timed interleaved
    (`bench.time_interleaved`: rotating order, CUDA-graph replays, or eager calls under ATTNZOO_BENCH_TIMER=eager)
    so that each ratio row's case and anchor share the GPU's clock, which drifts by several percent within a
    process. Until the nineteenth session each case was timed after the other (`_fb`). `forwards`: {name: fn}
    timed as the forward instead of the case's own fn (calls that rotate among input sets). 60 rounds keep the
    GPU busy long enough to leave its boost clock (r98: no-gate forward 0.53 ms over 20 rounds, 0.58-0.59 ms over
    60; the element-wise gate's ratio 1.022x-1.024x and 1.032x), as a training loop would."""
    graph = os.environ.get("ATTNZOO_BENCH_TIMER", "graph") != "eager"
    forwards = forwards or {name: fn for name, (fn, _) in cases.items()}
    with torch.no_grad():
        fwd = bench.time_interleaved(forwards, rounds=rounds, graph=graph)
    grads = {}
    for name, (fn, leaves) in cases.items():
        out = fn()
        grads[name] = lambda out=out, leaves=leaves, do=torch.randn_like(out): torch.autograd.grad(
            out, leaves, do, retain_graph=True)
    bwd = bench.time_interleaved(grads, rounds=rounds, graph=graph)
    return {name: (fwd[name]["median_ms"], bwd[name]["median_ms"]) for name in cases}


def bench_bias(rows):
    _set_autotune(os.environ.get("ATTNZOO_BENCH_AUTOTUNE", "fast"))
    bw = 3.4e12
    for B, H, N, D in [(1, 16, 4096, 128), (2, 16, 4096, 64)]:
        q, k, v = _qkv(B, H, N, D)
        base = f"B{B} H{H} N{N} d{D}"
        # dense (H, N, N) bf16 bias with gradient; low-rank factors
        bias = torch.randn(H, N, N, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        R = 16
        uq = torch.randn(B, H, N, R, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        uk = torch.randn(B, H, N, R, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        t = _fb_interleaved({
            "none": (lambda: kernels.attention(q, k, v), [q, k, v]),
            "dense": (lambda: kernels.attention(q, k, v, bias=bias), [q, k, v, bias]),
            "low-rank": (lambda: kernels.attention(q, k, v, bias=kernels.LowRankBias(uq, uk)), [q, k, v, uq, uk])})
        (t0f, t0b), (tbf, tbb), (tlf, tlb) = t["none"], t["dense"], t["low-rank"]
        nbytes = bias.numel() * 2
        _rel_row(rows, f"dense bias (H,N,N) {base}", "fwd", tbf, "ours, no bias", t0f, (t0f + nbytes / bw * 1e3) / t0f,
                 bias_bytes=nbytes)
        # backward allowance: two bias-sized reads and B float32 dS writes (the kernels read the bias once, write
        # dS in the bias's dtype, read it back for dQ and sum it over the batch; the issue's literal "no-bias time
        # plus the bias's bytes" cannot hold for a backward that must also write a bias-sized gradient)
        _rel_row(rows, f"dense bias (H,N,N) {base}", "bwd", tbb, "ours, no bias", t0b,
                 (t0b + (2 * nbytes + B * bias.numel() * 4) / bw * 1e3) / t0b, bias_bytes=nbytes)
        _rel_row(rows, f"low-rank r{R} {base}", "fwd", tlf, "ours, no bias", t0f, 1.15)
        _rel_row(rows, f"low-rank r{R} {base}", "bwd", tlb, "ours, no bias", t0b, 1.15)
    # HaloNet form on the full grid: computed in the general kernels since the twelfth session (before: the torch
    # lowering to low-rank factors)
    pattern, q, k, v, (th, tw) = relpos_inputs("grid")
    t = _fb_interleaved({
        "none": (lambda: kernels.attention(q, k, v, pattern), [q, k, v]),
        "rel": (lambda: kernels.attention(q, k, v, pattern, bias=kernels.RelPosBias(pattern, (th, tw))),
                [q, k, v, th, tw])})
    (t0f, t0b), (trf, trb) = t["none"], t["rel"]
    case = "relpos halo grid(64,64) b8 h2 B8 H8 d64 in-kernel"
    _rel_row(rows, case, "fwd", trf, "ours, no bias", t0f, 1.15)
    _rel_row(rows, case, "bwd", trb, "ours, no bias", t0b, 1.15)
    hb, q, k, v, (th, tw) = relpos_inputs("blocked")
    t = _fb_interleaved({
        "none": (lambda: kernels.attention(q, k, v), [q, k, v]),
        "rel": (lambda: kernels.attention(q, k, v, bias=kernels.RelPosBias(hb, (th, tw))), [q, k, v, th, tw])})
    (t0f, t0b), (trf, trb) = t["none"], t["rel"]
    case = "relpos halo blocked (512,8,64,144) d64"
    _rel_row(rows, case, "fwd", trf, "ours, no bias", t0f, 1.15)
    _rel_row(rows, case, "bwd", trb, "ours, no bias", t0b, 1.15)
    _restore_autotune()


def _rotating(calls):
    """A function that makes the next of `calls` on each call: successive calls of a case (a graph holds several)
    then read different inputs, as a model's would, instead of finding the last call's in L2."""
    it = itertools.cycle(calls)
    return lambda: next(it)()


def bench_gate(rows):
    """The gates against no gate, the three cases timed interleaved (`_fb_interleaved`): the H200's clock drifts
    by as much as the 3% / 5% allowance within a process (no-gate forward 0.536 -> 0.59 ms within a minute in
    `probe_r92`). The forwards rotate among three input sets (q, k, v and gates: 134 MB a set against a 50 MB
    L2), so a call's gate is never the one the previous call left in L2. Before the nineteenth session: three
    rotated rounds of each case timed in turn, median, on one input set."""
    _set_autotune(os.environ.get("ATTNZOO_BENCH_AUTOTUNE", "fast"))
    B, H, N, D = 2, 16, 4096, 128
    sets = []
    for _ in range(3):
        q, k, v = _qkv(B, H, N, D)
        gates = {kind: torch.randn(*shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                 for kind, shape in (("head-wise", (B, N, H)), ("element-wise", (B, N, H, D)))}
        sets.append((q, k, v, gates))
    q, k, v, gates = sets[0]
    calls = {"none": (lambda: kernels.attention(q, k, v), [q, k, v])}
    forwards = {"none": _rotating([lambda s=s: kernels.attention(*s[:3]) for s in sets])}
    for kind, g in gates.items():
        calls[kind] = (lambda g=g: kernels.attention(q, k, v, gate=g), [q, k, v, g])
        forwards[kind] = _rotating([lambda s=s, kind=kind: kernels.attention(*s[:3], gate=s[3][kind]) for s in sets])
    t = _fb_interleaved(calls, forwards=forwards)
    for kind in ("head-wise", "element-wise"):
        for i, direction, limit in ((0, "fwd", 1.03), (1, "bwd", 1.05)):
            _rel_row(rows, f"gate {kind} B{B} H{H} N{N} d{D}", direction, t[kind][i], "ours, no gate",
                     t["none"][i], limit)
    _restore_autotune()


def _sdpa_any(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def bench_skinny(rows):
    _set_autotune(os.environ.get("ATTNZOO_BENCH_AUTOTUNE", "fast"))
    B, H, D, NL = 8, 8, 64, 16384
    for nq, nk in [(NL, 64), (NL, 128), (NL, 256), (64, NL), (256, NL)]:
        q = torch.randn(B, H, nq, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k, v = [torch.randn(B, H, nk, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in "kv"]
        nbytes = 2 * B * H * D * (2 * nq + 2 * nk)
        tof, tob = _fb(lambda: kernels.attention(q, k, v), [q, k, v])
        taf, tab = _fb(lambda: _sdpa_any(q, k, v), [q, k, v])
        case = f"skinny nq{nq} nk{nk} B{B} H{H} d{D}"
        for direction, t_o, t_a in (("fwd", tof, taf), ("bwd", tob, tab)):
            row = dict(case=case, direction=direction, ours_ms=t_o, anchor="SDPA (default)", anchor_ms=t_a,
                       speedup=t_a / t_o, target=2.0 if direction == "fwd" else "",
                       met=("yes" if t_a / t_o >= 2.0 and nbytes / t_o * 1e-9 >= 2.5 else "no")
                       if direction == "fwd" else "", ours_tb_s=nbytes / t_o * 1e-9, anchor_tb_s=nbytes / t_a * 1e-9)
            rows.append(row)
            print(f"{case:42s} {direction} ours {t_o:8.3f} ms ({row['ours_tb_s']:.2f} TB/s)  SDPA {t_a:8.3f} ms "
                  f"({row['anchor_tb_s']:.2f} TB/s)  x{t_a / t_o:.2f}", flush=True)
    _restore_autotune()


# ----------------------------------------------------------------------------------------------------------
# issue 4, round 2: skinny kernels (kernels/backends/triton_skinny.py), in-kernel HaloNet rel-pos, agent steps.
# Each case times the new path (ATTNZOO_SKINNY=new / in-kernel rel-pos) against the old one (ATTNZOO_SKINNY=old /
# ATTNZOO_RELPOS=lowrank) and its anchor in the same run; three or fewer configs per kernel (fast tune).


ROUND2_ENV = dict(ATTNZOO_SKINNY="new", ATTNZOO_RELPOS="kernel")  # the paths the round-2 checks must take


def round2_check_cases():
    """The skinny and in-kernel rel-pos GPU checks (under ROUND2_ENV): (name, pattern, B, H, HKV, NQ, NK, D, DV,
    dtype, check_extra kwargs, kernels that must run)."""
    bf, fp = torch.bfloat16, torch.float16
    hb, hs = kernels.Halo((8, 8), 8, 2), kernels.Halo((4, 4), 8, 3, query_stride=2)
    return [  # name, pattern, B, H, HKV, NQ, NK, D, DV, dtype, kwargs, kernels that must run
        ("skinny keys res nq3000 nk64 bias+gate d64", None, 2, 8, 8, 3000, 64, 64, 64, bf,
         dict(bias_fn=_dense_bias((1, 8, 3000, 64)), gate_shape=(2, 3000, 8)), ("keys_fwd_res", "keys_bwd_res")),
        ("skinny keys gqa nq2000 nk200 d64", None, 2, 8, 2, 2000, 200, 64, 64, fp, {}, ("keys_fwd_res", "keys_bwd_res")),
        ("skinny keys d128 nq1000 nk64 elem gate", None, 1, 4, 4, 1000, 64, 128, 128, bf,
         dict(gate_shape=(1, 1000, 4, 128)), ("keys_bwd_res",)),
        ("skinny keys flat agents nq197 nk49 bias", None, 16, 3, 3, 197, 49, 64, 64, bf,
         dict(bias_fn=_dense_bias((1, 3, 197, 49))), ("keys_fwd_res",)),
        ("skinny keys flat nq49 nk197 bias (64-key chunks)", None, 16, 3, 3, 49, 197, 64, 64, bf,
         dict(bias_fn=_dense_bias((1, 3, 49, 197))), ("keys_fwd_flat_chunked", "keys_bwd_flat_chunked")),
        ("skinny keys flat nq64 nk49 full bias (one tile)", None, 8, 3, 3, 64, 49, 64, 64, bf,
         dict(bias_fn=_dense_bias((8, 3, 64, 49))), ("keys_fwd_flat", "keys_bwd_flat")),
        ("skinny keys res nq3000 nk128 d64 (one pass)", None, 2, 4, 4, 3000, 128, 64, 64, bf, {},
         ("keys_fwd_res", "keys_bwd_res")),
        ("skinny keys flat nq64 nk49 (one pass, padded keys)", None, 8, 3, 3, 64, 49, 64, 64, bf, {},
         ("keys_fwd_flat", "keys_bwd_flat")),
        ("skinny queries nq49 nk4097 bias d64", None, 4, 3, 3, 49, 4097, 64, 64, bf,
         dict(bias_fn=_dense_bias((1, 3, 49, 4097))), ("queries_fwd", "queries_bwd")),
        ("skinny queries gqa nq40 nk3000 gate d128", None, 2, 8, 2, 40, 3000, 128, 128, fp,
         dict(gate_shape=(2, 40, 8)), ("queries_fwd", "queries_bwd")),
        ("relpos blocked in-kernel (64,144) d64", None, 64, 8, 8, 64, 144, 64, 64, bf,
         dict(bias_fn=_rel_pos(hb, 64)), ("keys_fwd_flat_chunked_rel", "keys_bwd_flat_chunked_rel")),
        ("relpos blocked stride2 (16,196) d32 fp16", None, 64, 4, 4, 16, 196, 32, 32, fp,
         dict(bias_fn=_rel_pos(hs, 32)), ("keys_fwd_flat_chunked_rel", "keys_bwd_flat_chunked_rel")),
    ]


REL_GENERAL_ENV = dict(ATTNZOO_SKINNY="old", ATTNZOO_RELPOS="kernel")  # the general kernels' in-kernel rel-pos


def rel_general_check_cases():
    """GPU checks of the general kernels' in-kernel rel-pos (`HAS_REL`, under REL_GENERAL_ENV), in
    `round2_check_cases`' format: HaloNet 26t/50ts's blocked layout, strided queries, head dim 128 with an
    element-wise gate and GQA, and halonet_h1's 14 x 14 window."""
    bf, fp = torch.bfloat16, torch.float16
    hb, hs, h3 = kernels.Halo((8, 8), 8, 2), kernels.Halo((4, 4), 8, 3, query_stride=2), kernels.Halo((8, 8), 8, 3)
    expect = ("general_fwd_rel", "general_bwd_rel")
    return [
        ("relpos general (64,144) d64", None, 64, 8, 8, 64, 144, 64, 64, bf, dict(bias_fn=_rel_pos(hb, 64)), expect),
        ("relpos general stride2 (16,196) d32 fp16", None, 64, 4, 4, 16, 196, 32, 32, fp,
         dict(bias_fn=_rel_pos(hs, 32)), expect),
        ("relpos general gqa d128 elem gate (64,144)", None, 16, 4, 2, 64, 144, 128, 128, bf,
         dict(bias_fn=_rel_pos(hb, 128), gate_shape=(16, 64, 4, 128)), expect),
        ("relpos general win14 (64,196) d64 fp16", None, 32, 4, 4, 64, 196, 64, 64, fp,
         dict(bias_fn=_rel_pos(h3, 64)), expect),
        ("relpos general H5 qb7 win18 (49,324) d64 dv160", None, 16, 4, 4, 49, 324, 64, 160, bf,
         dict(bias_fn=_rel_pos(kernels.Halo((7, 7), 14, 2, query_stride=2), 64)), expect),
    ]


def run_checks_round2():
    """bf16/fp16 GPU checks of the new paths (the interpreter cannot run bf16 dots); asserts each path ran."""
    from kernels.backends import triton_attention as ta

    _set_autotune("0")
    ok = True
    for env, cases in ((ROUND2_ENV, round2_check_cases()), (REL_GENERAL_ENV, rel_general_check_cases())):
        bench.set_env(**env)
        for name, pattern, B, H, HKV, NQ, NK, D, DV, dt, kw, expect in cases:
            before = dict(ta.CALLS)
            case_ok = check_extra(name, pattern, B, H, HKV, NQ, NK, D, DV, dt, **kw)
            ran = {key for key, n in ta.CALLS.items() if n > before.get(key, 0)}
            if not set(expect) <= ran:
                print(f"check {name}: expected kernels {expect}, ran {sorted(ran)} FAIL", flush=True)
                case_ok = False
            ok = ok and case_ok
    bench.set_env(ATTNZOO_SKINNY=None, ATTNZOO_RELPOS=None)
    _restore_autotune()
    return ok


def _guarded(rows, case, fn):
    """Run one case; a kernel that fails to compile or run on this GPU becomes an error row, not a crash."""
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    try:
        fn()
    except (CompilationError, OutOfResources, RuntimeError, AssertionError) as err:
        print(f"{case}: FAILED {type(err).__name__}: {str(err)[:400]}", flush=True)
        rows.append(dict(case=case, direction="", error=f"{type(err).__name__}: {str(err)[:400]}"))


def _tb_row(rows, case, direction, t_new, t_old, t_sdpa, nbytes, target=None, **extra):
    row = dict(case=case, direction=direction, ours_ms=t_new, old_ms=t_old, anchor="SDPA (default)",
               anchor_ms=t_sdpa, speedup=t_sdpa / t_new, new_vs_old=t_old / t_new if t_old else None,
               ours_tb_s=nbytes / t_new * 1e-9, anchor_tb_s=nbytes / t_sdpa * 1e-9, target=target or "", **extra)
    if target:
        row["met"] = "yes" if (t_sdpa / t_new >= 2.0 and row["ours_tb_s"] >= 2.5) else "no"
    rows.append(row)
    old = f"old {t_old:8.3f} ms (x{t_old / t_new:.2f})" if t_old else "old -"
    more = "".join(f"  {k} {v:.3f}" for k, v in extra.items() if k.endswith("_ms") and v is not None)
    print(f"{case:44s} {direction} new {t_new:8.3f} ms ({row['ours_tb_s']:.2f} TB/s)  {old}  SDPA {t_sdpa:8.3f} ms "
          f"({row['anchor_tb_s']:.2f} TB/s)  x{t_sdpa / t_new:.2f} vs SDPA{more}", flush=True)


def _ceilings(rows, B, H, D, nq):
    """What the skinny forward rows can reach on this GPU: a copy of q into o (the same bytes read and written,
    no attention) and a large bf16 cuBLAS matmul (the tensor-core rate a kernel can count on). A row's floor is
    max(bytes / copy rate, flops / matmul rate)."""
    q = torch.randn(B, H, nq, D, device="cuda", dtype=torch.bfloat16)
    o = torch.empty_like(q)
    t_copy = _time(lambda: o.copy_(q))
    a, b = [torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in "ab"]
    t_mm = _time(lambda: a @ b)
    copy_tb_s, mm_tflop_s = 2 * q.numel() * 2 / t_copy * 1e-9, 2 * 8192 ** 3 / t_mm * 1e-9
    print(f"ceilings: copy q -> o {t_copy:.4f} ms = {copy_tb_s:.2f} TB/s; bf16 matmul 8192^3 {t_mm:.3f} ms = "
          f"{mm_tflop_s:.0f} TFLOP/s", flush=True)
    rows.append(dict(case=f"ceiling copy B{B} H{H} nq{nq} d{D}", direction="fwd", ours_ms=t_copy,
                     ours_tb_s=copy_tb_s))
    rows.append(dict(case="ceiling bf16 matmul 8192^3", direction="fwd", ours_ms=t_mm, ours_tflop_s=mm_tflop_s))
    return copy_tb_s, mm_tflop_s


def bench_skinny2(rows):
    """Skinny dense problems as a user gets them (ATTNZOO_SKINNY=auto: the few-keys / few-queries kernels tuned
    against the general ones) vs SDPA, with each family alone (`skinny_ms`: the skinny kernels, `old_ms`: the
    general ones): Nq=16384 with Nk in {64, 128, 256}, and the reverse Nq=49 agents against 4096 keys per image;
    first the copy and matmul ceilings (`_ceilings`), and each forward row's floor from them."""
    _set_autotune(os.environ.get("ATTNZOO_BENCH_AUTOTUNE", "fast"))
    B, H, D = 8, 8, 64
    copy_tb_s, mm_tflop_s = _ceilings(rows, B, H, D, 16384)
    for nq, nk in [(16384, 64), (16384, 128), (16384, 256), (49, 4096)]:
        case = f"skinny2 nq{nq} nk{nk} B{B} H{H} d{D}"

        def one():
            q = torch.randn(B, H, nq, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            k, v = [torch.randn(B, H, nk, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in "kv"]
            nbytes = 2 * B * H * D * (2 * nq + 2 * nk)
            fn = lambda: kernels.attention(q, k, v)  # noqa: E731
            t = {}
            for mode in ("new", "old", None):
                bench.set_env(ATTNZOO_SKINNY=mode)
                t[mode] = _fb(fn, [q, k, v])
            taf, tab = _fb(lambda: _sdpa_any(q, k, v), [q, k, v])
            floor = max(nbytes / copy_tb_s, 4 * B * H * nq * nk * D / mm_tflop_s) * 1e-9  # ms
            _tb_row(rows, case, "fwd", t[None][0], t["old"][0], taf, nbytes, target=">= 2x SDPA and >= 2.5 TB/s",
                    skinny_ms=t["new"][0], floor_ms=floor, floor_vs_sdpa=taf / floor)
            print(f"  floor {floor:.4f} ms (copy / matmul rates): at most x{taf / floor:.2f} vs SDPA; ours is "
                  f"{floor / t[None][0]:.0%} of it", flush=True)
            # backward bytes: q, k, v, o, dO read; dq, dk, dv written
            _tb_row(rows, case, "bwd", t[None][1], t["old"][1], tab, 2 * B * H * D * (4 * nq + 4 * nk),
                    skinny_ms=t["new"][1])

        _guarded(rows, case, one)
    bench.set_env(ATTNZOO_SKINNY=None)
    _restore_autotune()


def bench_relpos(rows):
    """HaloNet's blocked layout (B*64 blocks, 8 heads, 8x8 queries, 12x12 keys, d64): the in-kernel rel-pos as the
    op tunes it (general `HAS_REL` and few-keys kernels), each of the two alone, and the low-rank lowering, against no
    bias (general and few-keys kernels); target: in-kernel <= 1.15x the faster no-bias time."""
    _set_autotune(os.environ.get("ATTNZOO_BENCH_AUTOTUNE", "fast"))
    case = "relpos halo blocked (512,8,64,144) d64"

    def one():
        hb, q, k, v, (th, tw) = relpos_inputs("blocked")
        plain = lambda: kernels.attention(q, k, v)  # noqa: E731
        rel = lambda: kernels.attention(q, k, v, bias=kernels.RelPosBias(hb, (th, tw)))  # noqa: E731
        t = {}
        runs = (("nobias_general", "old", None, plain), ("nobias_few_keys", "new", None, plain),
                ("rel_general", "old", "kernel", rel), ("rel_few_keys", "new", "kernel", rel),
                ("rel_lowrank", None, "lowrank", rel), ("rel_tuned", None, "kernel", rel))
        for name, skinny, relpos, fn in runs:
            bench.set_env(ATTNZOO_SKINNY=skinny, ATTNZOO_RELPOS=relpos)
            t[name] = _fb(fn, [q, k, v] + ([th, tw] if fn is rel else []))
        bench.set_env(ATTNZOO_SKINNY=None, ATTNZOO_RELPOS=None)
        # the general backward's tables gradient: one GEMM over the stored dT (B, H, Nq, 2 (2 win - 1))
        dt = torch.randn(512, 8, 64, 46, device="cuda", dtype=torch.bfloat16)
        t_dr = _time(lambda: torch.einsum("bhnt,bhnd->td", dt, q.detach()))
        for i, direction in enumerate(("fwd", "bwd")):
            base = min(t["nobias_general"][i], t["nobias_few_keys"][i])
            tk = t["rel_tuned"][i]
            extra = dict(tables_grad_gemm_ms=t_dr) if direction == "bwd" else {}
            row = dict(case=case, direction=direction, ours_ms=tk, **{f"{n}_ms": v[i] for n, v in t.items()}, **extra,
                       ratio=tk / base, target="<= 1.15x no-bias", met="yes" if tk <= 1.15 * base else "no")
            rows.append(row)
            print(f"{case:44s} {direction} in-kernel {tk:8.3f} ms (general {t['rel_general'][i]:.3f}, few-keys "
                  f"{t['rel_few_keys'][i]:.3f}, low-rank {t['rel_lowrank'][i]:.3f}); no bias {base:8.3f} ms "
                  f"(general {t['nobias_general'][i]:.3f}); ratio {tk / base:.3f}"
                  + (f"; tables-grad GEMM {t_dr:.3f} ms" if extra else ""), flush=True)

    _guarded(rows, case, one)
    case_h5 = "relpos halo blocked H5 (256,8,196,324) d64 dv160"

    def h5():
        """HaloNet H5's last-stage geometry (14 x 14 blocks, 18 x 18 windows, value width 160): past the few-keys
        kernels' limits, so before the general kernels' HAS_REL path it ran the torch lowering (now ATTNZOO_RELPOS=
        lowrank)."""
        hb = kernels.Halo((14, 14), 14, 2)
        q = torch.randn(256, 8, 196, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(256, 8, 324, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(256, 8, 324, 160, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        th, tw = [(0.125 * torch.randn(35, 64, device="cuda", dtype=torch.bfloat16)).requires_grad_() for _ in "hw"]
        rel = lambda: kernels.attention(q, k, v, bias=kernels.RelPosBias(hb, (th, tw)))  # noqa: E731
        t0 = _fb(lambda: kernels.attention(q, k, v), [q, k, v])
        tk = _fb(rel, [q, k, v, th, tw])
        bench.set_env(ATTNZOO_RELPOS="lowrank")
        tl_ = _fb(rel, [q, k, v, th, tw])
        bench.set_env(ATTNZOO_RELPOS=None)
        for i, direction in enumerate(("fwd", "bwd")):
            rows.append(dict(case=case_h5, direction=direction, ours_ms=tk[i], rel_lowrank_ms=tl_[i],
                             nobias_general_ms=t0[i], ratio=tk[i] / t0[i], speedup_vs_lowrank=tl_[i] / tk[i]))
            print(f"{case_h5:44s} {direction} in-kernel {tk[i]:8.3f} ms  low-rank lowering {tl_[i]:8.3f} ms  "
                  f"no bias {t0[i]:8.3f} ms  ratio {tk[i] / t0[i]:.3f}  vs lowering x{tl_[i] / tk[i]:.2f}", flush=True)

    _guarded(rows, case_h5, h5)
    bench.set_env(ATTNZOO_SKINNY=None, ATTNZOO_RELPOS=None)
    _restore_autotune()


AGENT_CASES = (  # name, B, heads, head dim, prefix, grid, agent grid
    ("agent_deit_tiny@224", 256, 3, 64, 1, (14, 14), (7, 7)),
    ("agent_deit_tiny@1024", 256, 3, 64, 1, (64, 64), (7, 7)),
    ("agent_swin_tiny@224 stage 1", 256, 3, 32, 0, (56, 56), (3, 3)),
    ("agent_deit_tiny@1024 batch 32", 32, 3, 64, 1, (64, 64), (7, 7)),
)


AGENT_CONFIG_KEYS = ("block_n", "warps_1", "stages_1", "block_m", "warps_2", "one_kernel_tokens", "dwc_seq")


@contextlib.contextmanager
def agent_launch_plan(cfg):
    """`triton_agent.CONFIG` set to one sweep entry (a tuple in AGENT_CONFIG_KEYS' order; its block_m also for the
    one-kernel plan) inside the block, restored after."""
    from kernels.backends import triton_agent

    default = dict(triton_agent.CONFIG)
    triton_agent.CONFIG.update(zip(AGENT_CONFIG_KEYS, cfg), one_block_m=cfg[3])
    try:
        yield
    finally:
        triton_agent.CONFIG.clear()
        triton_agent.CONFIG.update(default)


def _agent_configs():
    """BENCH_AGENT_CONFIGS: launch plans to sweep, each "block_n/warps_1/stages_1/block_m/warps_2/one_kernel_tokens/
    dwc_seq" (aggregate kernel: keys per tile, warps, stages; broadcast: rows per tile (both plans), warps;
    one-kernel length; conv barriers)."""
    spec = os.environ.get("BENCH_AGENT_CONFIGS", "32/4/3/16/1/0/0,32/4/3/32/2/0/0,32/4/3/64/4/300/1")
    return [tuple(int(x) for x in c.split("/")) for c in spec.split(",") if c]


def _agent_inputs(B, H, D, P, grid, agent_grid, dtype=torch.bfloat16, device="cuda", padded=True):
    """q, k, v as views of one (B, N, 3, H, D) projection (the layer's layout) and the op's other arguments;
    `padded`: the biases in `kernels.agent.padded_bias`'s layout, as the layer's inference cache holds them."""
    N, n = P + grid[0] * grid[1], agent_grid[0] * agent_grid[1]
    dev = dict(device=device)
    q, k, v = torch.randn(B, N, 3, H, D, dtype=dtype, **dev).permute(2, 0, 3, 1, 4).unbind(0)
    bias1, bias2 = 0.02 * torch.randn(1, H, n, N, **dev), 0.02 * torch.randn(1, H, N, n, **dev)
    if padded:
        bias1, bias2 = kernels.agent.padded_bias(bias1), kernels.agent.padded_bias(bias2)
    kw = dict(grid=grid, agent_grid=agent_grid, num_prefix_tokens=P, bias1=bias1, bias2=bias2,
              dwc_weight=0.1 * torch.randn(H * D, 1, 3, 3, **dev), dwc_bias=torch.randn(H * D, **dev))
    return q, k, v, kw


def run_checks_agent():
    """The fused agent kernels (bf16, fp16; both launch plans; padded and tight biases) vs the composition in
    float32 on the reference backend; the composition is blocked during the fused call, so a fallback fails the
    check."""
    import kernels.agent as kernels_agent

    ok = True
    for name, _, H, D, P, grid, agent_grid in AGENT_CASES:
        for dtype, padded in ((torch.bfloat16, True), (torch.float16, True), (torch.bfloat16, False)):
            q, k, v, kw = _agent_inputs(32, H, D, P, grid, agent_grid, dtype, padded=padded)
            composition = kernels_agent._composition
            kernels_agent._composition = None  # a call raises TypeError
            try:
                with torch.no_grad():
                    out = kernels.agent_attention(q, k, v, backend="triton", **kw)
            finally:
                kernels_agent._composition = composition
            with torch.no_grad():
                ref = kernels.agent_attention(q.float(), k.float(), v.float(), backend="reference", **kw)
            err = _rel(out, ref)
            good = bool(torch.isfinite(out).all()) and err < (1e-2 if dtype == torch.bfloat16 else 2e-3)
            ok &= good
            print(f"check fused agent {name} {dtype} {'padded' if padded else 'tight'} biases: rel err {err:.2e} "
                  f"{'ok' if good else 'FAILED'}", flush=True)
    return ok


def bench_agent(rows):
    """Agent attention layers, inference, GPU time per call: the fused kernel (pool, both steps, DWC, one launch)
    vs the composition (two kernels.attention calls, pooling, conv, copies) vs SDPA over all tokens (the dense
    layer timm's model runs in its place)."""
    from kernels.agent import _composition

    _set_autotune(os.environ.get("ATTNZOO_BENCH_AUTOTUNE", "fast"))
    for name, B, H, D, P, grid, agent_grid in AGENT_CASES:
        def one():
            q, k, v, kw = _agent_inputs(B, H, D, P, grid, agent_grid)
            args = (q, k, v, grid, agent_grid, grid, P, kw["bias1"], kw["bias2"], kw["dwc_weight"], kw["dwc_bias"],
                    D ** -0.5, None)
            from kernels.backends import triton_agent

            fused = lambda: kernels.agent_attention(q, k, v, **kw)  # noqa: E731
            with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
                default, real = dict(triton_agent.CONFIG), triton_agent._agent_broadcast
                try:
                    for cfg in _agent_configs():  # the fused kernels' block sizes, warps and stages
                        with agent_launch_plan(cfg):
                            print(f"  {name} fused {cfg}: {_time(fused):.4f} ms", flush=True)
                    t_fused = _time(fused)
                    tight = {**kw, "bias1": kw["bias1"].contiguous(), "bias2": kw["bias2"].contiguous()}
                    print(f"  {name} fused, tight (unpadded) biases: "
                          f"{_time(lambda: kernels.agent_attention(q, k, v, **tight)):.4f} ms", flush=True)
                    for drop in (("dwc_weight", "dwc_bias"), ("bias1", "bias2"),
                                 ("dwc_weight", "dwc_bias", "bias1", "bias2")):
                        part = {key: (None if key in drop else val) for key, val in kw.items()}
                        print(f"  {name} fused without {'/'.join(drop)}: "
                              f"{_time(lambda: kernels.agent_attention(q, k, v, **part)):.4f} ms", flush=True)
                    if q.shape[2] > triton_agent.CONFIG["one_kernel_tokens"]:
                        triton_agent._agent_broadcast = collections.defaultdict(lambda: lambda *a, **k: None)
                        print(f"  {name} aggregate kernel alone: {_time(fused):.4f} ms", flush=True)
                finally:
                    triton_agent.CONFIG.update(default)
                    triton_agent._agent_broadcast = real
                t_comp = _time(lambda: _composition(*args))
                t_sdpa = _time(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
            nbytes = 2 * (q.numel() * 4)  # q, k, v read once, the (B, N, C) output written once
            _tb_row(rows, f"{name} agent layer (fused vs composition)", "fwd", t_fused, t_comp, t_sdpa, nbytes)

        _guarded(rows, name, one)
    _restore_autotune()


# ----------------------------------------------------------------------------------------------------------
# grid patterns: old path vs pair-mask path (kernels/NOTES.md, "Grid patterns, round 2"). `--only grid` runs the
# bf16 GPU checks of the pair paths first (inside bench_grid), then the 3-d and 2-d cases once per variant
# (ATTNZOO_GRID_VARIANTS=old / pairp2 / pair, three block configs each: ATTNZOO_AUTOTUNE=fast), with the anchors
# (dense SDPA flash, FlexAttention with the same block mask) timed once in the same run.

GRID_VARIANTS = tuple(os.environ.get("BENCH_GRID_VARIANTS", "old,pairp2,pair").split(","))  # which to time


def run_checks_grid():
    """bf16/fp16 checks of the pair-mask paths vs float64 (first config of each kernel, no tuning)."""
    N = kernels.Neighborhood
    cases = [
        ("na2d (30,37) w(7,9) d128", N((30, 37), (7, 9)), 1, 2, 2, 1110, 1110, 128, 128, torch.bfloat16),
        ("na3d (5,12,20) w(3,5,7) dil/stride d80", N((5, 12, 20), (3, 5, 7), stride=(1, 1, 2), dilation=(1, 2, 1)),
         1, 2, 1, 1200, 1200, 80, 80, torch.bfloat16),
        ("na3d causal t, noinward fp16 d64", N((6, 9, 11), (3, 4, 5), inward=False, causal_axes=(0,)), 1, 2, 2,
         594, 594, 64, 64, torch.float16),
        ("freeswim-shaped (21,12,16) w(21,6,8) d128", N((21, 12, 16), (21, 6, 8)), 1, 2, 2, 4032, 4032, 128, 128,
         torch.bfloat16),
    ]
    _set_autotune("0")
    ok = True
    for variant in ("pair", "pairp2"):
        os.environ["ATTNZOO_GRID_VARIANTS"] = variant
        for c in (cases if variant == "pair" else cases[-1:]):
            ok &= check_case(f"{c[0]} [{variant}]", *c[1:])
    os.environ.pop("ATTNZOO_GRID_VARIANTS")
    _restore_autotune()
    return ok


def _grid_pick(pattern, kind, block_arg):
    """(cfg, tiles, cost-model numbers) the autotuner picked for `pattern` under the current variants."""
    from kernels import tiles
    from kernels.backends import triton_attention as ta

    variants = ta._grid_variants()
    for key, cfg in ta._BEST.items():
        if key[0] == kind and key[1] == pattern and key[2] == variants:
            prob = ta._problem(pattern, 0, 0, cfg, torch.device("cpu"))
            tm = prob.map
            w = tiles.tile_work(pattern, tm.q_layout.tile, tm.k_layout.tile, tm.q_layout.slot_size,
                                tm.k_layout.slot_size, prob.pair_mask)
            return dict(cfg=str(cfg), q_tile=str(tm.q_layout.tile), k_tile=str(tm.k_layout.tile),
                        work_frac=round(w["work"], 4), pairs=w["pairs"], partial=w["partial"],
                        masked_axes=sum(i * c for i, c in enumerate(w["by_axes"])) if prob.pair_mask
                        else w["partial"] * bin(tm.mask_axes).count("1"))
    return dict(cfg=block_arg)


def bench_grid(rows):
    checks_ok = run_checks_grid()
    rows.append(dict(case="grid pair-mask GPU checks", direction="", met="yes" if checks_ok else "no"))
    _set_autotune(os.environ.get("ATTNZOO_BENCH_AUTOTUNE", "fast"))
    # 3-d FreeSwim case
    pattern, q, k, v, flops, mask, _ = _grid_case((21, 60, 104), (21, 30, 52))
    dense = lambda: _sdpa(q, k, v)  # noqa: E731
    with torch.no_grad():
        t_d, t_f = _time(dense, True), _time(lambda: _flex()(q, k, v, block_mask=mask), True)
    t_db = _time(_bwd_fn(dense, q, k, v), True)
    case = "na3d grid(21,60,104) win(21,30,52) H12"
    for variant in GRID_VARIANTS:
        os.environ["ATTNZOO_GRID_VARIANTS"] = variant
        ours = lambda: kernels.attention(q, k, v, pattern)  # noqa: E731
        with torch.no_grad():
            t_o = _time(ours, True)
        pick = _grid_pick(pattern, "fwd", "")
        _row(rows, f"{case} [{variant}]", "fwd", t_o, "dense SDPA flash", t_d, flops, 3.0, **pick)
        _row(rows, f"{case} [{variant}]", "fwd", t_o, "FlexAttention", t_f, flops, 4.0, **pick)
        t_ob = _time(_bwd_fn(ours, q, k, v), True)
        _row(rows, f"{case} [{variant}]", "bwd", t_ob, "dense SDPA flash", t_db, 2.5 * flops, 2.5,
             **_grid_pick(pattern, "bwd", ""))
    del q, k, v, mask
    # 2-d case (power-of-two tiles are already the cost model's best there: pair == pairp2)
    pattern, q, k, v, flops, mask, _ = _grid_case((128, 128), (33, 33))
    with torch.no_grad():
        t_f = _time(lambda: _flex()(q, k, v, block_mask=mask))
    for variant in ("old", "pair"):
        os.environ["ATTNZOO_GRID_VARIANTS"] = variant
        with torch.no_grad():
            t_o = _time(lambda: kernels.attention(q, k, v, pattern))
        _row(rows, f"na2d grid(128,128) win(33,33) H12 [{variant}]", "fwd", t_o, "FlexAttention", t_f, flops, 3.0,
             **_grid_pick(pattern, "fwd", ""))
    os.environ.pop("ATTNZOO_GRID_VARIANTS")
    _restore_autotune()
    from kernels.backends import triton_attention as ta

    for key, timings in ta._TIMINGS.items():  # every config's best time: old vs new per block config
        if len(key) > 2 and isinstance(key[2], tuple):
            print("grid tune", key[0], key[1].grid, key[2], {c: round(t, 3) for c, t in sorted(timings.items(),
                                                                                          key=lambda x: x[1])})


BENCHES = dict(dense=bench_dense, causal=bench_causal, na3d=bench_na3d, na2d=bench_na2d, win1d=bench_win1d,
               bias=bench_bias, gate=bench_gate, skinny=bench_skinny, skinny2=bench_skinny2, relpos=bench_relpos,
               agent=bench_agent)
BENCHES["grid"] = bench_grid


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks"))
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--only", default=",".join(BENCHES))
    ap.add_argument("--name", default="kernels", help="results file name under --out")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels.py needs a CUDA GPU")
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
    issue4 = {"bias", "gate", "skinny"} & set(args.only.split(","))
    round2 = {"skinny2", "relpos"} & set(args.only.split(","))
    agent = {"agent"} & set(args.only.split(","))
    checks = ([run_checks_ii] if issue4 else []) + ([run_checks_round2] if round2 else []) + \
        ([run_checks_agent] if agent else []) + \
        ([run_checks] if set(args.only.split(",")) - issue4 - round2 - agent - {"grid"} else [])  # grid: own checks
    checks_ok = True if args.skip_check else all([c() for c in checks])
    rows = []
    timer = os.environ.get("ATTNZOO_BENCH_TIMER", "graph")
    print(f"timer: {'CUDA graph replays (GPU time per call)' if timer == 'graph' else 'eager back-to-back calls'}")
    with torch.cuda.stream(torch.cuda.Stream()):  # graph capture needs a side stream for forwards and backwards
        for name in args.only.split(","):
            t0 = time.time()
            BENCHES[name](rows)
            print(f"[{name} took {time.time() - t0:.0f} s]", flush=True)
    for row in rows:
        row.setdefault("timer", timer)
    command = "python scripts/bench_kernels.py " + " ".join(sys.argv[1:])
    path = bench.write_results(args.name, rows, command, out_dir=args.out)
    cols = list(dict.fromkeys(c for r in rows for c in r))
    print(bench.markdown_table(rows, cols))
    print_autotuned()
    print(f"gpu checks {'passed' if checks_ok else 'FAILED'}; wrote {path}")


def print_autotuned() -> None:
    """Each tuned problem's chosen config and the fastest candidates' times."""
    from kernels.backends import triton_attention

    for key, cfg in triton_attention._BEST.items():
        print("autotuned", key[:2], key[2:], "->", cfg)
        tried = sorted(triton_attention._TIMINGS.get(key, {}).items(), key=lambda kv: kv[1])
        if len(tried) > 1:
            print("    tried (ms):", ", ".join(f"{c}: {t:.4f}" for c, t in tried[:8]))


if __name__ == "__main__":
    main()
