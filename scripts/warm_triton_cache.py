"""Fill the Triton (and Inductor) caches in parallel before a timed benchmark run.

    python scripts/warm_triton_cache.py --shards 12 -- python scripts/bench_kernels.py --only na2d --out /tmp/w

Runs the given command `--shards` times at once, each with ATTNZOO_WARM=i/n: the autotuner of shard i compiles
only the candidate configs whose index is i mod n and times nothing (`pipelines.benchmark.time_cuda` makes one
call). All shards share TRITON_CACHE_DIR / TORCHINDUCTOR_CACHE_DIR, so the timed run that follows finds every
kernel compiled. Compilation runs on the CPU (one core per shard); the results the shards write are not
results: point their --out somewhere else.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=max(1, (os.cpu_count() or 2) - 2),
                        help="parallel compile-only processes (default: CPU cores - 2)")
    parser.add_argument("--log-dir", default=None, help="one log file per shard here (default: discard)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the benchmark command")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to warm after --")
    if args.shards < 1:
        parser.error(f"--shards must be >= 1; got {args.shards}")
    if "TRITON_CACHE_DIR" not in os.environ:
        print("warning: TRITON_CACHE_DIR unset; shards share Triton's default cache (~/.triton/cache)", flush=True)
    if args.log_dir:
        os.makedirs(args.log_dir, exist_ok=True)
    t0 = time.time()
    procs = []
    for i in range(args.shards):
        env = dict(os.environ, ATTNZOO_WARM=f"{i}/{args.shards}")
        log = open(os.path.join(args.log_dir, f"shard{i}.log"), "w") if args.log_dir else subprocess.DEVNULL
        procs.append((subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    failed = 0
    for i, (proc, log) in enumerate(procs):
        rc = proc.wait()
        if log is not subprocess.DEVNULL:
            log.close()
        if rc != 0:
            failed += 1
            print(f"shard {i} exited with {rc}", flush=True)
    print(f"warmed {args.shards} shards of {' '.join(command)} in {time.time() - t0:.0f} s "
          f"({failed} failed)", flush=True)
    return 1 if failed == args.shards else 0


if __name__ == "__main__":
    sys.exit(main())
