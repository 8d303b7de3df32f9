"""Shared GPU benchmark utilities: CUDA-event timing after warm-up (median of repeats), peak memory, and
results written as JSON under `benchmarks/` plus a markdown table for BENCHMARKS.md."""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
from typing import Callable, Dict, List, Optional

import torch


def _summary(times: List[float], **extra) -> dict:
    """The timers' result: median/min/max milliseconds of `times` and their count, plus `extra` fields."""
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "n": len(times),
            **extra}


def time_cuda(fn: Callable[[], object], warmup: int = 5, repeats: int = 20, min_ms: float = 200.0) -> dict:
    """Median/min/max milliseconds of `fn()` on the current CUDA device, timed with CUDA events.

    Runs `warmup` calls first (compilation, autotuning, allocator), then rounds of `repeats` back-to-back calls
    until at least `min_ms` of timed work. Each call has its own pair of events, and the host does not wait
    between calls (as `triton.testing.do_bench`): a call's time is the GPU's time for it once the host runs
    ahead, and includes the host's launch overhead only where that overhead is longer than the GPU work, as in
    a model's forward. The median is the headline.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("time_cuda needs a CUDA device; speeds measured on a CPU are not results")
    if os.environ.get("ATTNZOO_WARM"):  # a compile-only shard (scripts/warm_triton_cache.py): one call, no timing
        fn()
        torch.cuda.synchronize()
        nan = float("nan")
        return {"median_ms": nan, "min_ms": nan, "max_ms": nan, "n": 0}
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times: List[float] = []
    while len(times) < repeats or sum(times) < min_ms:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(repeats)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        times += [start.elapsed_time(end) for start, end in events]
        if len(times) >= 10 * repeats:
            break
    return _summary(times)


def _side_stream_check(name: str) -> None:
    if torch.cuda.current_stream() == torch.cuda.default_stream():
        raise RuntimeError(f"{name}: run it under `with torch.cuda.stream(side_stream):` (capture and warm-up need "
                           "a non-default stream; an autograd backward captures only when its forward ran on that "
                           "stream too)")


def _capture(fn: Callable[[], object], target_ms: float):
    """(graph, calls per graph): `fn` captured into one CUDA graph, as many calls as take about `target_ms`
    (1 to 100), replayed once."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    per_graph = max(1, min(100, int(target_ms / max(start.elapsed_time(end), 1e-3))))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=torch.cuda.current_stream()):
        for _ in range(per_graph):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    return graph, per_graph


def time_cuda_graph(fn: Callable[[], object], warmup: int = 3, repeats: int = 20, target_ms: float = 2.0) -> dict:
    """Median/min/max milliseconds of one `fn()` on the GPU alone: `fn` is captured into a CUDA graph (several
    calls per graph, about `target_ms` of work) and each replay is timed with CUDA events.

    For kernel benchmarks (the device's METHOD.md: "for many small launches, capture a graph and time its
    replays"): a call's host-side launch cost drops out, so a kernel shorter than its launch is timed by its
    GPU work and not by the host's. `fn` must be capturable (no host synchronisation, no CPU-to-GPU copies
    after the warm-up, which also settles autotuning). Model and pipeline benchmarks keep `time_cuda`: there the
    host's cost is part of what a user waits for.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("time_cuda_graph needs a CUDA device; speeds measured on a CPU are not results")
    if os.environ.get("ATTNZOO_WARM"):
        return time_cuda(fn)
    _side_stream_check("time_cuda_graph")
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    graph, per_graph = _capture(fn, target_ms)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for s, e in events:
        s.record()
        graph.replay()
        e.record()
    torch.cuda.synchronize()
    times = [s.elapsed_time(e) / per_graph for s, e in events]
    del graph
    return _summary(times, calls_per_graph=per_graph)


def time_interleaved(fns: Dict[str, Callable[[], object]], warmup: int = 3, rounds: int = 40, graph: bool = True,
                     target_ms: float = 2.0) -> Dict[str, dict]:
    """Median/min/max milliseconds of one call of each `fns[name]`, the cases interleaved: `rounds` rounds, each
    timing every case once, in an order that rotates from round to round, between its own CUDA events. With
    `graph` a case is a replay of its CUDA graph (as `time_cuda_graph`, about `target_ms` of calls; needs a side
    stream), else one eager call.

    For ratios between calls of similar cost (a fused term against the same kernel without it): the GPU's clock
    drifts by several percent within a process (H200: 0.536 -> 0.59 ms for one kernel within a minute), and
    timing one case after the other puts that drift into the ratio. Neighbouring cases share the clock. How long
    the rounds keep the GPU busy shows too: a short run stays nearer the boost clock (the same kernel 0.53 ms over
    20 rounds of three ~2 ms replays, 0.58-0.59 ms over 60).
    """
    if not torch.cuda.is_available():
        raise RuntimeError("time_interleaved needs a CUDA device; speeds measured on a CPU are not results")
    if not fns or rounds < 1:
        raise ValueError(f"time_interleaved needs at least one function and rounds >= 1, got {len(fns)} and {rounds}")
    names = list(fns)
    if os.environ.get("ATTNZOO_WARM"):
        return {name: time_cuda(fns[name]) for name in names}
    if graph:
        _side_stream_check("time_interleaved")
    for _ in range(warmup):
        for name in names:
            fns[name]()
    torch.cuda.synchronize()
    runs, per_call = {}, {}
    for name in names:
        if graph:
            g, per_call[name] = _capture(fns[name], target_ms)
            runs[name] = g.replay
        else:
            runs[name], per_call[name] = fns[name], 1
    events: Dict[str, list] = {name: [] for name in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            runs[name]()
            end.record()
            events[name].append((start, end))
    torch.cuda.synchronize()
    out = {}
    for name in names:
        times = [start.elapsed_time(end) / per_call[name] for start, end in events[name]]
        out[name] = _summary(times, calls_per_graph=per_call[name])
    return out


def set_env(**values: Optional[str]) -> None:
    """Set environment flags read per call (ATTNZOO_SKINNY, ATTNZOO_RELPOS, ...); None removes one."""
    for key, val in values.items():
        if val is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = val


def peak_memory(fn: Callable[[], object]) -> float:
    """Peak CUDA memory in GiB allocated while running `fn()` once."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def environment() -> Dict[str, str]:
    """GPU, driver-visible versions and date, recorded with every result."""
    import triton

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": str(torch.version.cuda),
        "python": platform.python_version(),
    }
    for mod in ("timm", "diffusers", "transformers"):
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return env


def write_results(name: str, rows: List[dict], command: str, out_dir: Optional[str] = None) -> str:
    """Write `{env, command, rows}` to `benchmarks/<name>.json` (or `out_dir`) and return the path."""
    out_dir = out_dir or os.path.join(os.getcwd(), "benchmarks")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    with open(path, "w") as f:
        json.dump({"env": environment(), "command": command, "rows": rows}, f, indent=2)
    return path


def markdown_table(rows: List[dict], columns: Optional[List[str]] = None) -> str:
    """Rows of dicts as a markdown table (floats to 3 significant digits)."""
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))

    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else ("" if v is None else str(v))

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
