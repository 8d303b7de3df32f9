"""Probes behind the issue-4 bias rows (kernels/NOTES.md, eleventh session); run on the GPU.

    python scripts/probe_bias_kernels.py              # dense-bias backward: CUDA time per kernel (torch.profiler)
    python scripts/probe_bias_kernels.py --lowrank    # low-rank r16 rows with the full autotune lists
    python scripts/probe_bias_kernels.py --lr-chain [--full]   # low-rank rows, the chained dot on / off
    python scripts/probe_bias_kernels.py --relpos     # rel-pos rows (Halo grid and blocked): CUDA time per kernel
    python scripts/probe_bias_kernels.py --grid-inputs   # grid patterns tuned in place vs on permuted copies
    python scripts/probe_bias_kernels.py --maxnreg    # the bias rows with register caps on the tuned kernels
        [--fwd-caps 128,168 --bwd-caps 168 --cases "d64 low-rank,d64 no bias"]
    python scripts/probe_bias_kernels.py --rel-factor # the rel-pos query-factor kernel's launch options
    python scripts/probe_bias_kernels.py --keys-grid  # the blocked HaloNet rows over a grid of few-keys configs
    python scripts/probe_bias_kernels.py --keys-tail  # the same rows with and without the narrower last key tile
    python scripts/probe_bias_kernels.py --per-kernel "B2 d64 no bias,B2 d64 low-rank"   # CUDA time per kernel
    python scripts/probe_bias_kernels.py --extra-bwd "64,64,4,1,168"   # the grid and d64 rows with extra configs
        [--extra-head-dim 128 --cases "B1 d128"]
    ATTNZOO_AUTOTUNE=0 ATTNZOO_SKINNY=old ncu -k regex:_attn_fwd --launch-skip 2 --launch-count 1 \
        python scripts/probe_bias_kernels.py --forced-forward grid,rel,64,16,4,3   # one forward for a profiler
    python scripts/probe_bias_kernels.py --forced-bwd "32,64,4,2,168;64,64,4,2" --cases "B2 d64 low-rank"
        # CUDA time per kernel on each config alone (--forced-fwd: the forward)
    python scripts/probe_bias_kernels.py --rel-factor-ab   # rel-pos backward: saved query factor vs rebuilt
    python scripts/probe_bias_kernels.py --reduce-partials # summing the blocked rel-pos table-gradient partials
    python scripts/probe_bias_kernels.py --splits     # few-query problems (merged key splits) vs SDPA, per kernel
    python scripts/probe_bias_kernels.py --skinny-configs   # the skinny2 forwards on forced few-keys configs
    python scripts/probe_bias_kernels.py --gate       # the gate rows: CUDA time per kernel, forward and backward
    python scripts/probe_bias_kernels.py --gate-prefetch   # element-wise gate forward, L2 prefetch on / off
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
from kernels.backends.triton_attention import QREG  # noqa: E402
from pipelines.benchmark import set_env  # noqa: E402


def _per_kernel(label: str, fn, calls: int = 5) -> None:
    """Print the CUDA time per kernel of one `fn()` call (after three calls for autotuning and compilation)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    print(f"== {label}: per call")
    total = 0.0
    for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total):
        if e.device_time_total > 0:
            total += e.device_time_total / calls
            print(f"   {e.device_time_total / calls / 1e3:8.3f} ms  x{e.count // calls:<3d} {e.key[:90]}")
    print(f"   total {total / 1e3:.3f} ms", flush=True)


def _per_kernel_bwd(label: str, fn, leaves) -> None:
    """`_per_kernel` of one backward of `fn()` with respect to `leaves`."""
    out = fn()
    do = torch.randn_like(out)
    _per_kernel(label, lambda: torch.autograd.grad(out, leaves, do, retain_graph=True))


def _per_kernel_fb(label: str, fn, leaves) -> None:
    """`_per_kernel` of one forward (no autograd) and of one backward of `fn()` with respect to `leaves`."""
    with torch.no_grad():
        _per_kernel(f"{label} forward", fn)
    _per_kernel_bwd(f"{label} backward", fn, leaves)


def _configs(text):
    """General-kernel configs from "BM,BN,WARPS,STAGES[,CAP][,qreg];..." (None or "": none)."""
    return [tuple(x if x == QREG else int(x) for x in c.split(",")) for c in (text or "").split(";") if c]


def breakdown() -> None:
    """CUDA time per kernel of one backward call, without and with a dense (H, N, N) bias."""
    for B, H, N, D in [(2, 16, 4096, 64), (1, 16, 4096, 128)]:
        q, k, v = [torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in "qkv"]
        bias = torch.randn(H, N, N, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for with_bias in (False, True):
            _per_kernel_bwd(f"B{B} H{H} N{N} d{D} bias={with_bias} backward",
                            lambda: kernels.attention(q, k, v, bias=bias if with_bias else None),
                            [q, k, v] + ([bias] if with_bias else []))


def _lowered(fn):
    """`fn` run with ATTNZOO_RELPOS=lowrank: a RelPosBias through the torch lowering to low-rank factors."""
    def run():
        before = os.environ.get("ATTNZOO_RELPOS")
        set_env(ATTNZOO_RELPOS="lowrank")
        try:
            return fn()
        finally:
            set_env(ATTNZOO_RELPOS=before)
    return run


def relpos_breakdown(only=None) -> None:
    """The rel-pos rows of `bench_kernels --only bias` and `--only relpos` (HaloNet's form on the Halo grid and on
    the blocked layout), with their no-bias anchors and, on the grid, the torch lowering to low-rank factors and a
    random rank-24 low-rank bias (the lowering's kernel part): graph-timed totals, then CUDA time per kernel,
    forward and backward. `only`: the labels of the cases to run (default all)."""
    import bench_kernels as bk

    torch.cuda.set_stream(torch.cuda.Stream())  # CUDA graphs need a side stream
    grid, q, k, v, (th, tw) = bk.relpos_inputs("grid")
    blocked, qb, kb, vb, _ = bk.relpos_inputs("blocked")
    uq = torch.randn(8, 8, 64 * 64, 24, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    uk = torch.randn(1, 1, 68 * 68, 24, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    cases = [
        ("grid no bias", lambda: kernels.attention(q, k, v, grid), [q, k, v]),
        ("grid rel-pos", lambda: kernels.attention(q, k, v, grid, bias=kernels.RelPosBias(grid, (th, tw))),
         [q, k, v, th, tw]),
        ("grid rel-pos lowering", _lowered(lambda: kernels.attention(
            q, k, v, grid, bias=kernels.RelPosBias(grid, (th, tw)))), [q, k, v, th, tw]),
        ("grid low-rank r24", lambda: kernels.attention(q, k, v, grid, bias=kernels.LowRankBias(uq, uk)),
         [q, k, v, uq, uk]),
        ("blocked no bias", lambda: kernels.attention(qb, kb, vb), [qb, kb, vb]),
        ("blocked rel-pos", lambda: kernels.attention(qb, kb, vb, bias=kernels.RelPosBias(blocked, (th, tw))),
         [qb, kb, vb, th, tw]),
    ]
    cases = [c for c in cases if only is None or c[0] in only]
    for label, fn, leaves in cases:
        tf, tb = bk._fb(fn, leaves)
        print(f"{label:22s} graph-timed fwd {tf:.4f} ms  bwd {tb:.4f} ms", flush=True)
    for label, fn, leaves in cases:
        _per_kernel_fb(label, fn, leaves)
    bk.print_autotuned()


def grid_inputs() -> None:
    """A Halo grid (with and without the rel-pos bias) and the 2-d neighbourhood row, tuned with both input modes
    (ATTNZOO_GRID_INPUTS=auto: in place or permuted copies, per kernel) and with permuted copies only."""
    import bench_kernels as bk
    from kernels.backends import triton_attention as ta

    torch.cuda.set_stream(torch.cuda.Stream())  # CUDA graphs need a side stream
    halo, q, k, v, (th, tw) = bk.relpos_inputs("grid")
    na = kernels.Neighborhood((128, 128), (33, 33))
    q2, k2, v2 = [torch.randn(1, 12, 128 * 128, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                  for _ in "qkv"]
    for mode in ("auto", "permuted"):
        set_env(ATTNZOO_GRID_INPUTS=mode)
        ta._BEST.clear()
        cases = [("halo grid (64,64) b8 h2 B8 H8 d64", lambda: kernels.attention(q, k, v, halo), [q, k, v]),
                 ("na2d (128,128) w33 B1 H12 d128", lambda: kernels.attention(q2, k2, v2, na), [q2, k2, v2])]
        if mode == "auto":
            cases.insert(1, ("  + rel-pos in-kernel", lambda: kernels.attention(
                q, k, v, halo, bias=kernels.RelPosBias(halo, (th, tw))), [q, k, v, th, tw]))
        for label, fn, leaves in cases:
            tf, tb = bk._fb(fn, leaves)
            print(f"tuned inputs={mode:8s} {label:36s} fwd {tf:.4f} ms  bwd {tb:.4f} ms", flush=True)
        bk.print_autotuned()
    set_env(ATTNZOO_GRID_INPUTS=None)


def _bias_cases(only=None):
    """(label, fn, leaves) of the rows the probes time, those whose label contains one of `only` (all by default):
    the Halo grid and the blocked layout without and with rel-pos (`bench_kernels.relpos_inputs`), and B2 d64 /
    B1 d128 H16 N4096 problems without a bias, with a rank-16 bias and with a dense (H, N, N) bias."""
    import bench_kernels as bk

    def wanted(*labels):
        return any(only is None or any(o in label for o in only) for label in labels)

    cases = []
    for layout in ("grid", "blocked"):
        if not wanted(f"{layout} no bias", f"{layout} rel-pos"):
            continue
        pattern, q, k, v, tables = bk.relpos_inputs(layout)
        attend = bk.relpos_attend(layout, pattern)
        cases += [(f"{layout} no bias", lambda q=q, k=k, v=v, p=attend: kernels.attention(q, k, v, p), [q, k, v]),
                  (f"{layout} rel-pos", lambda q=q, k=k, v=v, p=attend, rel=pattern, t=tables: kernels.attention(
                      q, k, v, p, bias=kernels.RelPosBias(rel, t)), [q, k, v, *tables])]
    for B, D in [(2, 64), (1, 128)]:
        if not wanted(f"B{B} d{D} no bias", f"B{B} d{D} low-rank r16", f"B{B} d{D} dense bias"):
            continue
        q, k, v = bk._qkv(B, 16, 4096, D)
        cases.append((f"B{B} d{D} no bias", lambda q=q, k=k, v=v: kernels.attention(q, k, v), [q, k, v]))
        if wanted(f"B{B} d{D} low-rank r16"):
            uq, uk = [torch.randn(B, 16, 4096, 16, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                      for _ in "ab"]
            cases.append((f"B{B} d{D} low-rank r16", lambda q=q, k=k, v=v, uq=uq, uk=uk: kernels.attention(
                q, k, v, bias=kernels.LowRankBias(uq, uk)), [q, k, v, uq, uk]))
        if wanted(f"B{B} d{D} dense bias"):  # 0.5 GB
            bias = torch.randn(16, 4096, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            cases.append((f"B{B} d{D} dense bias", lambda q=q, k=k, v=v, bias=bias: kernels.attention(
                q, k, v, bias=bias), [q, k, v, bias]))
    return [c for c in cases if wanted(c[0])]


# per-thread register caps (Triton's `maxnreg`) tried on the tuned kernels: at 4 warps, <= 128 registers let 4
# programs share an SM, <= 168 three (ptxas on the grid rel-pos kernels: forward 158 -> 128 spills 20 B; dQ 222
# and dK/dV 218 -> 168 spill 156 / 244 B)
FWD_KERNELS, BWD_KERNELS = ("_attn_fwd", "_keys_fwd"), ("_attn_bwd_dq", "_attn_bwd_dkdv", "_keys_bwd")


def _cap_settings(fwd_caps, bwd_caps):
    """[{kernel name: cap}]: no cap first, then each forward cap on the forward kernels and each backward cap on
    the backward kernels."""
    return ([{}] + [dict.fromkeys(FWD_KERNELS, c) for c in fwd_caps] +
            [dict.fromkeys(BWD_KERNELS, c) for c in bwd_caps])


def register_caps(fwd_caps=(128,), bwd_caps=(168, 128), only=None) -> None:
    """The rel-pos, low-rank and dense-bias rows and their no-bias anchors (labels containing one of `only`, all
    by default), tuned without a cap (the autotuner's own capped candidates left out), then re-timed on the same
    configs under each cap (`_cap_settings`; the launches get `maxnreg`; one compile per capped kernel)."""
    import bench_kernels as bk
    from triton.runtime.jit import JITFunction

    from kernels.backends import triton_attention as ta

    for name in ("_fwd_candidates", "_bwd_candidates"):
        listed = getattr(ta, name)
        setattr(ta, name, lambda d, dv, listed=listed: [c for c in listed(d, dv) if len(c) == 4])
    torch.cuda.set_stream(torch.cuda.Stream())  # CUDA graphs need a side stream
    caps = {}
    run = JITFunction.run

    def capped_run(self, *args, **kwargs):
        cap = caps.get(self.fn.__name__)
        if cap:
            kwargs["maxnreg"] = cap
        return run(self, *args, **kwargs)

    JITFunction.run = capped_run
    cases = _bias_cases(only)
    for setting in _cap_settings(fwd_caps, bwd_caps):
        caps.clear()
        caps.update(setting)
        for label, fn, leaves in cases:
            tf, tb = bk._fb(fn, leaves)
            print(f"caps {str(setting):78s} {label:22s} fwd {tf:.4f} ms  bwd {tb:.4f} ms", flush=True)
    bk.print_autotuned()


def rel_factor_launch() -> None:
    """The rel-pos Halo grid backward under each (BLOCK_M, num_warps) of the query-factor kernel
    (`triton_attention.REL_FACTOR_LAUNCH`): graph-timed, and that kernel's CUDA time."""
    import bench_kernels as bk

    from kernels.backends import triton_attention as ta

    torch.cuda.set_stream(torch.cuda.Stream())  # CUDA graphs need a side stream
    grid, q, k, v, (th, tw) = bk.relpos_inputs("grid")
    leaves = [q, k, v, th, tw]
    out = kernels.attention(q, k, v, grid, bias=kernels.RelPosBias(grid, (th, tw)))
    do = torch.randn_like(out)
    default = ta.REL_FACTOR_LAUNCH
    for launch in ((64, 4), (64, 2), (64, 8), (128, 4), (128, 8), (32, 4), (32, 2)):
        ta.REL_FACTOR_LAUNCH = launch
        bwd = lambda: torch.autograd.grad(out, leaves, do, retain_graph=True)  # noqa: E731
        for _ in range(3):
            bwd()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                bwd()
            torch.cuda.synchronize()
        factor = sum(e.device_time_total for e in prof.key_averages() if e.key.startswith("_rel_factor_bwd")) / 5
        _, tb = bk._fb(lambda: kernels.attention(q, k, v, grid, bias=kernels.RelPosBias(grid, (th, tw))), leaves)
        print(f"rel factor launch {launch}: backward {tb:.4f} ms, _rel_factor_bwd {factor / 1e3:.4f} ms", flush=True)
    ta.REL_FACTOR_LAUNCH = default


def blocked_keys_grid() -> None:
    """The blocked HaloNet rows (no bias and rel-pos, (512, 8, 64, 144) d64) with the few-keys kernels tuned over
    a grid of configs (key chunks of 32 / 64, 4 / 8 warps, 1 / 2 stages, 4 / 16 / 64 waves) instead of
    `triton_skinny.keys_candidates`' lists."""
    import itertools

    import bench_kernels as bk

    from kernels.backends import triton_attention as ta
    from kernels.backends import triton_skinny as sk

    torch.cuda.set_stream(torch.cuda.Stream())  # CUDA graphs need a side stream
    listed = sk.keys_candidates

    def grid(nq, nk, d, dv, backward=False):
        if nq > 128:
            return listed(nq, nk, d, dv, backward)
        return [(64, w, st, "flat", waves, chunk) for chunk, w, st, waves in
                itertools.product((32, 64), (4, 8), (1, 2), (4, 16, 64))]

    sk.keys_candidates = grid
    ta._BEST.clear()
    for label, fn, leaves in _bias_cases(["blocked"]):
        tf, tb = bk._fb(fn, leaves)
        print(f"keys grid {label:16s} fwd {tf:.4f} ms  bwd {tb:.4f} ms", flush=True)
    sk.keys_candidates = listed
    bk.print_autotuned()


def keys_tail() -> None:
    """The blocked HaloNet rows (144 keys in 64-key chunks) with the few-keys backward's last chunk on a 16-key
    tile and on a full one, each tuned afresh (`triton_skinny.tail_tile` patched: the rel-pos row takes the tail
    only if the rule there is changed)."""
    import bench_kernels as bk

    from kernels.backends import triton_attention as ta
    from kernels.backends import triton_skinny as sk

    torch.cuda.set_stream(torch.cuda.Stream())  # CUDA graphs need a side stream
    tail_tile = sk.tail_tile
    for tail in (True, False):
        sk.tail_tile = tail_tile if tail else (lambda *args: 0)
        ta._BEST.clear()
        for label, fn, leaves in _bias_cases(["blocked"]):
            tf, tb = bk._fb(fn, leaves)
            print(f"{'tail tile' if tail else 'full tile'} {label:16s} fwd {tf:.4f} ms  bwd {tb:.4f} ms", flush=True)
        bk.print_autotuned()
    sk.tail_tile = tail_tile


def per_kernel(only) -> None:
    """CUDA time per kernel, forward and backward, of the `_bias_cases` rows whose label contains one of `only`
    (e.g. "B2 d64 no bias,B2 d64 low-rank")."""
    import bench_kernels as bk

    for label, fn, leaves in _bias_cases(only):
        _per_kernel_fb(label, fn, leaves)
    bk.print_autotuned()


def extra_candidates(fwd=(), bwd=(), head_dim=64, only=None) -> None:
    """The rows whose label contains one of `only` (default: the grid and B2 d64 rows) with extra general-kernel
    configs appended to the candidates at head dim `head_dim` (64: every head dim <= 64; `fwd` to
    `_fwd_candidates`, `bwd` to `_bwd_candidates`), tuned afresh."""
    import bench_kernels as bk

    from kernels.backends import triton_attention as ta

    torch.cuda.set_stream(torch.cuda.Stream())  # CUDA graphs need a side stream
    listed = ta._fwd_candidates, ta._bwd_candidates
    applies = (lambda d: d <= 64) if head_dim <= 64 else (lambda d: ta._block_d(d) == head_dim)  # noqa: E731
    ta._fwd_candidates = lambda d, dv: listed[0](d, dv) + (list(fwd) if applies(max(d, dv)) else [])
    ta._bwd_candidates = lambda d, dv: listed[1](d, dv) + (list(bwd) if applies(max(d, dv)) else [])
    ta._BEST.clear()
    for label, fn, leaves in _bias_cases(only or ["grid", "B2 d64"]):
        tf, tb = bk._fb(fn, leaves)
        print(f"extra candidates {label:20s} fwd {tf:.4f} ms  bwd {tb:.4f} ms", flush=True)
    ta._fwd_candidates, ta._bwd_candidates = listed
    bk.print_autotuned()


def rel_factor_ab() -> None:
    """The rel-pos rows' backward with the forward's saved query factor (`_backward`'s `rel_factor`) and with the
    factor rebuilt in the backward: graph-timed in the same run, then CUDA time per kernel of each."""
    import bench_kernels as bk

    from kernels.backends import triton_attention as ta

    torch.cuda.set_stream(torch.cuda.Stream())  # CUDA graphs need a side stream
    backward = ta._backward
    rebuilt = lambda *a: backward(*a[:16])  # noqa: E731  (drops `rel_factor`)
    cases = _bias_cases(["rel-pos"])
    for saved in (True, False, True):
        ta._backward = backward if saved else rebuilt
        for label, fn, leaves in cases:
            tf, tb = bk._fb(fn, leaves)
            print(f"factor {'saved  ' if saved else 'rebuilt'} {label:16s} fwd {tf:.4f} ms  bwd {tb:.4f} ms",
                  flush=True)
    for saved in (True, False):
        ta._backward = backward if saved else rebuilt
        for label, fn, leaves in cases:
            _per_kernel_bwd(f"factor {'saved' if saved else 'rebuilt'} {label} backward", fn, leaves)
    ta._backward = backward
    bk.print_autotuned()


def reduce_partials() -> None:
    """Ways to sum the few-keys rel-pos backward's per-program table-gradient partials (HaloNet's blocked layout:
    4,096 programs x 46 x 64 fp32, 48 MB), graph-timed: torch's sum over the leading dim, two-level sums over
    (chunks, rows per chunk) views (torch, or `triton_kernels.sum_leading` for the first level at several block
    sizes), and each against the first's result."""
    import bench_kernels as bk
    import triton

    from kernels.backends import triton_kernels as tk

    torch.cuda.set_stream(torch.cuda.Stream())
    x = torch.randn(4096, 46, 64, device="cuda")
    ref = x.double().sum(0)
    flat = x.view(4096, -1)
    m = flat.shape[1]

    def two_level(chunks, block, warps):
        def run():
            part = torch.empty(4096 // chunks, m, device="cuda")
            tk.sum_leading[(triton.cdiv(part.numel(), block),)](flat, part, chunks, part.numel(), BLOCK=block,
                                                               num_warps=warps)
            return part.sum(0)
        return run

    ways = {"torch sum(0)": lambda: x.sum(0),
            "torch view(64, 64, m).sum(0).sum(0)": lambda: flat.view(64, 64, m).sum(0).sum(0),
            "torch view(256, 16, m).sum(0).sum(0)": lambda: flat.view(256, 16, m).sum(0).sum(0)}
    for chunks in (64, 256, 1024):
        for block in (512, 1024, 2048):
            ways[f"sum_leading {chunks} rows/chunk, BLOCK {block} + torch sum"] = two_level(chunks, block, 4)
    for label, fn in ways.items():
        err = ((fn().double().view_as(ref) - ref).norm() / ref.norm()).item()
        print(f"{label:52s} {bk._time(fn):.4f} ms  rel err {err:.1e}", flush=True)


def forced_configs(backward: bool, cfgs, only) -> None:
    """CUDA time per kernel of the forward (or backward) of the `_bias_cases` rows whose label contains one of
    `only`, on each general-kernel config of `cfgs` alone (the candidate list replaced by it; no tuning)."""
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    from kernels.backends import triton_attention as ta

    name = "_bwd_candidates" if backward else "_fwd_candidates"
    listed = getattr(ta, name)
    cases = _bias_cases(only)
    for cfg in cfgs:
        setattr(ta, name, lambda d, dv, cfg=cfg: [cfg])
        ta._BEST.clear()
        for label, fn, leaves in cases:
            try:
                if not backward:
                    with torch.no_grad():
                        _per_kernel(f"forced forward {cfg} {label}", fn)
                    continue
                _per_kernel_bwd(f"forced backward {cfg} {label}", fn, leaves)
            except (OutOfResources, CompilationError) as err:
                print(f"== forced {cfg} {label}: {type(err).__name__}: {str(err)[:200]}", flush=True)
    setattr(ta, name, listed)


def forced_forward(layout: str, kind: str, cfg: tuple) -> None:
    """Three inference forwards of the grid or blocked row (`kind` "rel" or "nobias") on the forward config `cfg`
    alone, for a profiler (under ATTNZOO_AUTOTUNE=0 the first call launches the kernel twice)."""
    import bench_kernels as bk

    from kernels.backends import triton_attention as ta

    if kind not in ("rel", "nobias"):
        raise ValueError(f"forced_forward: kind must be 'rel' or 'nobias', got {kind!r}")
    ta._fwd_candidates = lambda d, dv: [cfg]
    pattern, q, k, v, tables = bk.relpos_inputs(layout)
    attend = bk.relpos_attend(layout, pattern)
    bias = kernels.RelPosBias(pattern, tables) if kind == "rel" else None
    with torch.no_grad():
        for _ in range(3):
            kernels.attention(q, k, v, attend, bias=bias)
    torch.cuda.synchronize()
    print("forced forward", layout, kind, dict(ta._BEST), flush=True)


def split_problems() -> None:
    """Few-query problems, whose key splits `triton_combine.combine_splits` merges (forward) and
    `triton_attention.sum_over_leading` sums (backward): graph-timed against SDPA, then CUDA time per kernel."""
    import bench_kernels as bk

    torch.cuda.set_stream(torch.cuda.Stream())  # CUDA graphs need a side stream
    sdpa = torch.nn.functional.scaled_dot_product_attention
    for nq, nk in ((49, 4096), (64, 16384), (256, 16384)):
        q = torch.randn(8, 8, nq, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k, v = [torch.randn(8, 8, nk, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in "kv"]
        tf, tb = bk._fb(lambda: kernels.attention(q, k, v), [q, k, v])
        sf, sb = bk._fb(lambda: sdpa(q, k, v), [q, k, v])
        print(f"nq{nq} nk{nk}: fwd ours {tf:.4f} ms  SDPA {sf:.4f} ms  x{sf / tf:.2f};  bwd ours {tb:.4f} ms  "
              f"SDPA {sb:.4f} ms  x{sb / tb:.2f}", flush=True)
        _per_kernel_fb(f"nq{nq} nk{nk}", lambda: kernels.attention(q, k, v), [q, k, v])
    bk.print_autotuned()


def skinny_configs(rounds: int = 30) -> None:
    """The skinny2 forwards (Nq16384 B8 H8 d64, Nk 64 / 128 / 256) on each of a list of few-keys configs
    (`triton_skinny.keys_forward` called directly), against the tuned op and SDPA, interleaved CUDA graphs."""
    import bench_kernels as bk
    from kernels.backends import triton_skinny as sk

    torch.cuda.set_stream(torch.cuda.Stream())  # CUDA graphs need a side stream
    sdpa = torch.nn.functional.scaled_dot_product_attention
    cfgs = [(64, 4, 3, "res", 4), (64, 4, 3, "res", 8), (64, 4, 2, "res", 8), (64, 4, 2, "res", 4),
            (128, 4, 3, "res", 4), (128, 8, 3, "res", 4), (64, 4, 4, "res", 8), (32, 4, 3, "res", 8),
            (128, 4, 2, "res", 4), (64, 8, 3, "res", 4)]
    B, H, NQ, D = 8, 8, 16384, 64
    for nk in (64, 128, 256):
        q = torch.randn(B, H, NQ, D, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(B, H, nk, D, device="cuda", dtype=torch.bfloat16) for _ in "kv")
        ref = sdpa(q.float(), k.float(), v.float())
        cases = {"sdpa": lambda: sdpa(q, k, v), "op (tuned)": lambda: kernels.attention(q, k, v)}
        for cfg in cfgs:
            out = sk.keys_forward(q, k, v, None, None, D ** -0.5, cfg)[0]
            print(f"Nk{nk} {cfg}: max error vs float32 SDPA {(out.float() - ref).abs().max().item():.2e}", flush=True)
            cases[f"{cfg}"] = lambda cfg=cfg: sk.keys_forward(q, k, v, None, None, D ** -0.5, cfg)
        gb = (2 * q.numel() + 2 * k.numel()) * 2 / 1e9
        res = bk.bench.time_interleaved(cases, rounds=rounds)
        base = res["sdpa"]["median_ms"]
        print(f"Nk{nk} forward ({gb * 1e3:.0f} MB of q, k, v, o):")
        for name, r in sorted(res.items(), key=lambda kv: kv[1]["median_ms"]):
            ms = r["median_ms"]
            print(f"  {name:28s} {ms:.4f} ms  {gb / ms:.2f} TB/s  {base / ms:.2f}x SDPA", flush=True)
    bk.print_autotuned()


def gate_breakdown() -> None:
    """The gate rows of `bench_kernels --only gate` (B2 H16 N4096 d128; no gate, head-wise, element-wise):
    graph-timed three times over (interleaved: the spread within one process), then CUDA time per kernel, forward
    and backward."""
    import bench_kernels as bk

    torch.cuda.set_stream(torch.cuda.Stream())  # CUDA graphs need a side stream
    B, H, N, D = 2, 16, 4096, 128
    q, k, v = bk._qkv(B, H, N, D)
    cases = []
    for kind, shape in (("none", None), ("head-wise", (B, N, H)), ("element-wise", (B, N, H, D))):
        g = None if shape is None else torch.randn(*shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        cases.append((kind, lambda g=g: kernels.attention(q, k, v, gate=g), [q, k, v] + ([g] if g is not None else [])))
    for rep in range(3):
        for kind, fn, leaves in cases:
            tf, tb = bk._fb(fn, leaves)
            print(f"round {rep} gate {kind}: fwd {tf:.4f} ms  bwd {tb:.4f} ms", flush=True)
    for kind, fn, leaves in cases:
        _per_kernel_fb(f"gate {kind}", fn, leaves)
    bk.print_autotuned()


def gate_prefetch_ab(rounds: int = 60) -> None:
    """The element-wise gate forward (B2 H16 N4096 d128) with and without `_prefetch_l2` of its gate tile, against
    no gate: calls interleaved in rotating order (`time_interleaved`), each case's successive calls on three input
    sets (`bench_kernels._rotating`), medians and ratios; then CUDA time per kernel."""
    import bench_kernels as bk
    from kernels.backends import triton_attention as ta

    torch.cuda.set_stream(torch.cuda.Stream())  # CUDA graphs need a side stream
    B, H, N, D = 2, 16, 4096, 128
    sets = [(*bk._qkv(B, H, N, D), torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16)) for _ in range(3)]

    def case(prefetch, gated):
        def call(q, k, v, g):
            ta.GATE_PREFETCH = prefetch
            return kernels.attention(q, k, v, gate=g if gated else None)
        return bk._rotating([lambda s=s: call(*s) for s in sets])

    cases = {"none": case(True, False), "prefetch": case(True, True), "no prefetch": case(False, True)}
    with torch.no_grad():
        print(f"outputs with and without the prefetch bit-identical: "
              f"{torch.equal(cases['prefetch'](), cases['no prefetch']())}", flush=True)
        for rep in range(2):
            t = {n: r["median_ms"] for n, r in bk.bench.time_interleaved(cases, rounds=rounds).items()}
            print(f"pass {rep} median ms: " + "  ".join(f"{n} {m:.4f}" for n, m in t.items()) + "; ratios "
                  + "  ".join(f"{n} {t[n] / t['none']:.4f}" for n in t if n != "none"), flush=True)
        for name, fn in cases.items():
            _per_kernel(f"gate {name}", fn)
    ta.GATE_PREFETCH = True
    bk.print_autotuned()


def _lowrank_ratios(tag: str) -> None:
    """Print the low-rank r16 rows (`_bias_cases`) against their no-bias anchors, forward and backward."""
    import bench_kernels as bk

    for shape in ("B2 d64", "B1 d128"):
        (_, f0, l0), (_, fl, ll) = _bias_cases([f"{shape} no bias", f"{shape} low-rank"])
        t0f, t0b = bk._fb(f0, l0)
        tlf, tlb = bk._fb(fl, ll)
        print(f"{tag} {shape}: fwd {tlf:.4f} / {t0f:.4f} ms = {tlf / t0f:.3f}x; "
              f"bwd {tlb:.4f} / {t0b:.4f} ms = {tlb / t0b:.3f}x", flush=True)


def lowrank_chain(full: bool = False) -> None:
    """The low-rank r16 rows with loaded factors chained into q·kᵀ (`LR_CHAIN`) as the rule says
    (`triton_attention.lr_chain`), always pre-scaled (1, inexact in 16-bit unless 1 / scale is a power of two),
    always as a scaled sum (2), and never (0); each setting tuned afresh, on the fast candidate lists (or the full
    ones)."""
    os.environ["ATTNZOO_AUTOTUNE"] = "full" if full else "fast"
    import bench_kernels as bk

    from kernels.backends import triton_attention as ta

    torch.cuda.set_stream(torch.cuda.Stream())  # CUDA graphs need a side stream
    rule = ta.lr_chain
    for setting, mode in (("rule", None), ("prescaled", 1), ("scaled-sum", 2), ("never", 0)):
        ta.lr_chain = rule if mode is None else (
            lambda q, factors, scale=None, mode=mode: rule(q, factors, scale) if factors != "loaded" else mode)
        ta._BEST.clear()
        _lowrank_ratios(f"chain {setting:10s}")
        bk.print_autotuned()
    ta.lr_chain = rule


def lowrank_full_tune() -> None:
    """The low-rank r16 rows and their no-bias anchors, both tuned over the full candidate lists."""
    os.environ["ATTNZOO_AUTOTUNE"] = "full"
    import bench_kernels as bk

    _lowrank_ratios("full-tune")
    bk.print_autotuned()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lowrank", action="store_true", help="the low-rank rows under the full autotune lists")
    ap.add_argument("--lr-chain", action="store_true", help="the low-rank rows with the chained dot on and off")
    ap.add_argument("--full", action="store_true", help="with --lr-chain: the full candidate lists")
    ap.add_argument("--relpos", action="store_true", help="the rel-pos rows: CUDA time per kernel")
    ap.add_argument("--cases", default=None, help="with --relpos (labels), --maxnreg or --extra-fwd/--extra-bwd "
                    "(label parts): comma list")
    ap.add_argument("--grid-inputs", action="store_true", help="grid patterns in place vs on permuted copies")
    ap.add_argument("--maxnreg", action="store_true", help="the bias rows with register caps on the tuned kernels")
    ap.add_argument("--fwd-caps", default="128", help="with --maxnreg: comma list of forward caps")
    ap.add_argument("--bwd-caps", default="168,128", help="with --maxnreg: comma list of backward caps")
    ap.add_argument("--per-kernel", default=None, help="labels (substrings) of the bias rows: CUDA time per kernel")
    ap.add_argument("--keys-tail", action="store_true", help="the blocked HaloNet rows with and without the "
                    "few-keys backward's narrower last key tile")
    ap.add_argument("--rel-factor", action="store_true", help="the rel-pos query-factor kernel's launch options")
    ap.add_argument("--keys-grid", action="store_true", help="the blocked HaloNet rows over a grid of few-keys configs")
    ap.add_argument("--extra-fwd", default=None, help="configs added to the forward candidates, e.g. '64,64,4,1,128'"
                    " (';' between configs)")
    ap.add_argument("--extra-bwd", default=None, help="configs added to the backward candidates, as --extra-fwd")
    ap.add_argument("--extra-head-dim", type=int, default=64, help="with --extra-fwd/--extra-bwd: the head dim the "
                    "configs are added at (64: every head dim <= 64)")
    ap.add_argument("--forced-forward", default=None, help="LAYOUT,KIND,BM,BN,WARPS,STAGES[,CAP]: three forwards of "
                    "the grid or blocked row (KIND rel or nobias) on that config, for ncu")
    ap.add_argument("--rel-factor-ab", action="store_true", help="the rel-pos backward with the forward's saved "
                    "query factor and with the factor rebuilt")
    ap.add_argument("--reduce-partials", action="store_true", help="ways to sum the blocked rel-pos backward's "
                    "table-gradient partials")
    ap.add_argument("--forced-fwd", default=None, help="general forward configs, each alone on the --cases rows: "
                    "CUDA time per kernel (';' between configs)")
    ap.add_argument("--forced-bwd", default=None, help="as --forced-fwd, for the backward")
    ap.add_argument("--splits", action="store_true", help="few-query problems (merged key splits) vs SDPA")
    ap.add_argument("--skinny-configs", action="store_true", help="the skinny2 forwards on forced few-keys "
                    "configs vs the tuned op and SDPA")
    ap.add_argument("--gate", action="store_true", help="the gate rows: CUDA time per kernel")
    ap.add_argument("--gate-prefetch", action="store_true", help="the element-wise gate forward with and without "
                    "the L2 prefetch of its gate tile")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    os.environ.setdefault("ATTNZOO_AUTOTUNE", "fast")
    if args.lowrank:
        lowrank_full_tune()
    elif args.lr_chain:
        lowrank_chain(args.full)
    elif args.grid_inputs:
        grid_inputs()
    elif args.extra_fwd or args.extra_bwd:
        extra_candidates(_configs(args.extra_fwd), _configs(args.extra_bwd), args.extra_head_dim,
                         args.cases and args.cases.split(","))
    elif args.reduce_partials:
        reduce_partials()
    elif args.rel_factor_ab:
        rel_factor_ab()
    elif args.forced_fwd or args.forced_bwd:
        forced_configs(bool(args.forced_bwd), _configs(args.forced_bwd or args.forced_fwd),
                       args.cases.split(",") if args.cases else ["B2 d64"])
    elif args.keys_grid:
        blocked_keys_grid()
    elif args.keys_tail:
        keys_tail()
    elif args.per_kernel:
        per_kernel(args.per_kernel.split(","))
    elif args.rel_factor:
        rel_factor_launch()
    elif args.maxnreg:
        ints = lambda text: tuple(int(c) for c in text.split(",") if c)  # noqa: E731
        register_caps(ints(args.fwd_caps), ints(args.bwd_caps), args.cases and args.cases.split(","))
    elif args.forced_forward:
        layout, kind, *cfg = args.forced_forward.split(",")
        forced_forward(layout, kind, tuple(int(c) for c in cfg))
    elif args.splits:
        split_problems()
    elif args.skinny_configs:
        skinny_configs()
    elif args.gate:
        gate_breakdown()
    elif args.gate_prefetch:
        gate_prefetch_ab()
    elif args.relpos:
        relpos_breakdown(None if args.cases is None else args.cases.split(","))
    else:
        breakdown()
