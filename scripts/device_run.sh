#!/bin/bash
# One device call: set up the lent GPU machine and run benchmark steps under per-step time limits, logging
# everything to one file under $OUT (the call returns only a few files; logs behind pipes were lost before).
#
#   bash scripts/device_run.sh STEP[:SECONDS] ...      (run through the `device` tool; $OUT is its output folder)
#
# Steps: host (scripts/profile_host.py --cprofile 25), kernels (bench_kernels: $KERNELS_ONLY, default
# skinny2,relpos,bias,gate,na2d; KERNELS_CHECK=1 runs the GPU checks first),
# models (bench_models, all cases, --profile), halonet (bench_models: the HaloNet cases), agent (bench_models:
# the Agent cases, inference, --profile), agenttrain (the same, training), pipelines (bench_pipelines), checks
# (bench_kernels' issue-4 GPU checks, via --only gate), corechecks (its issue-3 GPU checks alone). Default limit per step: 240 s. Set-up: the wheels in .whl/ (sh ../shared/tools/device-wheels.sh)
# go to /tmp/site; a carried .device-cache.tar.xz (scripts/prebuild_triton_cache.py) is unpacked to
# /tmp/triton-cache, and the log says how many kernels each step had to compile (new cache entries).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/device-out}"
mkdir -p "$OUT"
LOG="$OUT/run.log"
T0=$(date +%s)
say() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a "$LOG"; }

if ls .whl/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl >> "$LOG" 2>&1 || say "wheel install failed"
fi
export PYTHONPATH="/tmp/site:$PWD" HF_HUB_OFFLINE=1 TRITON_CACHE_DIR=/tmp/triton-cache \
    TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache ATTNZOO_AUTOTUNE="${ATTNZOO_AUTOTUNE:-fast}"
mkdir -p /tmp/triton-cache
for cache in .device-cache.tar.xz .device-cache.tgz; do  # the first present; tar detects the compression
    [ -f "$cache" ] && tar xf "$cache" -C /tmp && break
done
entries() { ls /tmp/triton-cache | wc -l; }
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" >> "$LOG" 2>&1
say "set up; $(entries) cached kernels"

run_step() {
    local name="${1%%:*}" limit="${1#*:}"
    [ "$limit" = "$1" ] && limit=240
    local before; before=$(entries)
    say "step $name (limit $limit s)"
    case "$name" in
        host) timeout "$limit" python3 -u scripts/profile_host.py --cprofile 25 ;;
        kernels) timeout "$limit" python3 -u scripts/bench_kernels.py $([ -n "${KERNELS_CHECK:-}" ] || echo --skip-check) \
                 --only "${KERNELS_ONLY:-skinny2,relpos,bias,gate,na2d}" --name kernels_run --out "$OUT" ;;
        checks) timeout "$limit" python3 -u scripts/bench_kernels.py --only gate --name kernels_checks --out "$OUT" ;;
        corechecks) timeout "$limit" python3 -u -c "import sys; sys.path.insert(0, 'scripts'); import bench_kernels as bk; \
sys.exit(0 if bk.run_checks() else 1)" ;;
        models) timeout "$limit" python3 -u scripts/bench_models.py --out "$OUT" --profile "$OUT/prof" ;;
        halonet) timeout "$limit" python3 -u scripts/bench_models.py --out "$OUT" \
                 --cases halonet50ts halonet26t "halonet26t unfused" "accelerate(halonet26t)" ;;
        agent) timeout "$limit" python3 -u scripts/bench_models.py --out "$OUT" --modes infer --profile "$OUT/prof" \
               --cases agent_deit_tiny@224 agent_deit_tiny@1024 agent_swin_tiny@224 ;;
        agenttrain) timeout "$limit" python3 -u scripts/bench_models.py --out "$OUT" --modes train --profile "$OUT/prof" \
               --cases agent_deit_tiny@224 agent_swin_tiny@224 ;;
        pipelines) timeout "$limit" python3 -u scripts/bench_pipelines.py --repeats 1 --out-dir "$OUT" ;;
        *) echo "unknown step $name" ;;
    esac >> "$LOG" 2>&1
    say "step $name rc=$? ($(( $(entries) - before )) kernels compiled)"
}

for step in "$@"; do run_step "$step"; done
if [ -d "$OUT/prof" ]; then cat "$OUT"/prof/*.txt > "$OUT/profiles.txt" 2>/dev/null; rm -rf "$OUT/prof"; fi
say "done"
