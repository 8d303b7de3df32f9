"""AOT-compile the grid-pattern and skinny kernels for sm_90 without a GPU (Triton + its bundled ptxas): catches
compile errors of new kernel paths and configs over the H200's shared memory before device time is spent. Shared
memory depends on the Triton version: use the device's (PYTHONPATH=<triton 3.6 install>).
Usage: python scripts/aot_compile_kernels.py [--registers]   (--registers: ptxas register/spill report of the
general kernels' autotune candidates at head dims 64 and 128)"""
import sys, time, inspect
sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.abspath(__file__))))
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels.backends import triton_kernels as tk
from prebuild_triton_cache import ptxas_report  # noqa: E402

PTR = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "O": "*bf16", "LSE": "*fp32", "QF": "*bf16", "KF": "*bf16",
       "BIAS": "*bf16", "GATE": "*bf16", "FULL_PTR": "*i32", "FULL_IDX": "*i32", "PART_PTR": "*i32",
       "PART_IDX": "*i32", "QLO": "*i32", "QHI": "*i32", "KC": "*i32", "PART_BITS": "*i32", "KB": "*fp32",
       "DO": "*bf16", "DELTA": "*fp32", "DK": "*bf16", "DV_": "*bf16", "DB": "*fp32", "DUK": "*fp32",
       "DQ": "*bf16", "DUQ": "*fp32", "QROW": "*i32", "KROW": "*i32", "RH": "*bf16", "RW": "*bf16"}
FLOATS = {"qk_scale", "sm_scale", "rel_scale"}


def compile_one(fn, consts, num_warps, num_stages, ptx=False, ptr=None, maxnreg=None):
    sig = {}
    params = inspect.signature(fn.fn).parameters
    # constexpr flags with a default (e.g. GATHER) keep it unless the caller sets them
    consts = {**{n: p.default for n, p in params.items() if p.default is not inspect.Parameter.empty
                 and "constexpr" in str(p.annotation)}, **consts}
    for name in params:
        if name in consts:
            sig[name] = "constexpr"
        elif name in (ptr or PTR):
            sig[name] = (ptr or PTR)[name]
        elif name in FLOATS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    # the launcher marks pointers and int arguments divisible by 16 (16-byte aligned tensors, strides of head dims
    # >= 16); without these hints loads are not pipelined through shared memory and its size is under-estimated
    names = list(inspect.signature(fn.fn).parameters)
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(names)
             if sig[name].startswith("*") or (name.startswith("stride_") and sig[name] == "i32")}
    src = ASTSource(fn, signature=sig, constexprs=consts, attrs=attrs)
    t = time.time()
    c = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=num_warps, num_stages=num_stages, maxnreg=maxnreg))
    if ptx:
        return c.asm["ptx"]
    return time.time() - t, len(c.asm["cubin"]), c.metadata.shared


if "--registers" in sys.argv:
    from kernels.backends import triton_attention as ta

    ta._interpret = lambda: False
    for d in (64, 128):
        base = dict(D=d, DV=d, R=1, BLOCK_D=d, BLOCK_DV=d, BLOCK_R=16, GRID_MODE=False, HAS_DIL=False,
                    HAS_BIAS=False, HAS_LR=False, DOT_PREC="tf32", MASK_AXES=0, PAIR_MASK=False)
        for cand in ta._fwd_candidates(d, d):
            (bm, bn, w, st), (cap, qreg) = cand[:4], ta._config_options(cand, False)
            c = dict(base, BLOCK_M=bm, BLOCK_N=bn, REVERSE=False, HAS_GATE=False, Q_IN_REGS=qreg)
            print(f"fwd  d{d} {cand}: {ptxas_report(compile_one(tk._attn_fwd, c, w, st, ptx=True, maxnreg=cap))}",
                  flush=True)
        for cand in ta._bwd_candidates(d, d):
            (bm, bn, w, st), cap = cand[:4], ta._config_options(cand, False)[0]
            c = dict(base, BLOCK_M=bm, BLOCK_N=bn)
            print(f"dkdv d{d} {cand}: "
                  f"{ptxas_report(compile_one(tk._attn_bwd_dkdv, dict(c, STORE_DB=False), w, st, True, maxnreg=cap))}"
                  f"; dq {ptxas_report(compile_one(tk._attn_bwd_dq, c, w, st, ptx=True, maxnreg=cap))}", flush=True)
    sys.exit(0)


common = dict(D=128, DV=128, R=1, BLOCK_D=128, BLOCK_DV=128, BLOCK_R=16, GRID_MODE=True, HAS_DIL=False,
              HAS_BIAS=False, HAS_LR=False, DOT_PREC="tf32")
for pair, axes in ((True, 0b1110), (True, 0b1011), (False, 0b111)):
    for bm, bn, w, st in ((128, 64, 4, 3), (128, 128, 8, 3)):
        c = dict(common, BLOCK_M=bm, BLOCK_N=bn, MASK_AXES=axes, PAIR_MASK=pair, REVERSE=False, HAS_GATE=False)
        print("fwd", pair, bin(axes), bm, bn, compile_one(tk._attn_fwd, c, w, st), flush=True)
    for bm, bn, w, st in ((64, 64, 4, 2),):
        c = dict(common, BLOCK_M=bm, BLOCK_N=bn, MASK_AXES=axes, PAIR_MASK=pair, STORE_DB=False)
        print("dkdv", pair, bin(axes), bm, bn, compile_one(tk._attn_bwd_dkdv, c, w, st), flush=True)
        c = dict(common, BLOCK_M=bm, BLOCK_N=bn, MASK_AXES=axes, PAIR_MASK=pair)
        print("dq", pair, bin(axes), bm, bn, compile_one(tk._attn_bwd_dq, c, w, st), flush=True)
# a feature mix on the pair path: dilation + bias + low rank + gate
c = dict(common, BLOCK_M=64, BLOCK_N=64, MASK_AXES=0b1111, PAIR_MASK=True, HAS_DIL=True, HAS_BIAS=True, HAS_LR=True,
         REVERSE=False, HAS_GATE=True, BLOCK_R=16, R=5)
print("fwd features", compile_one(tk._attn_fwd, c, 4, 3), flush=True)

# ---- skinny kernels (kernels/backends/triton_skinny.py): every autotune candidate, shared memory vs the H200's
# 227 KiB per block (a config over it fails at launch with OutOfResources)
from kernels.backends import triton_skinny as sk
from kernels.backends import triton_attention as ta

SMEM_LIMIT = 232448
SK_PTR = dict(PTR, DLSE="*fp32", DB="*fp32", DG="*bf16", DRT="*fp32", RH="*bf16", RW="*bf16")
over = []


def compile_skinny(name, fn, consts, warps, stages, ptr_over=()):
    _, size, shared = compile_one(fn, consts, warps, stages, ptr=dict(SK_PTR, **dict(ptr_over)))
    flag = "OVER" if shared > SMEM_LIMIT else "ok"
    if shared > SMEM_LIMIT:
        over.append((name, consts, warps, stages, shared))
    print(f"{name:60s} w{warps} s{stages} shared {shared:7d} {flag}", flush=True)


ta._fast_tune = lambda: False  # all candidates
for d in (32, 64, 128):
    bd = ta._block_d(d)
    for nq, nk in ((16384, 64), (16384, sk.max_keys(d, d)), (64, 144 if d <= 64 else 64)):
        if nk == 0:
            continue
        for backward in (False, True):
            for cfg in sk.keys_candidates(nq, nk, d, d, backward):
                bm, warps, stages = cfg[:3]
                mode, bn, key_chunks = sk.key_plan(nq, nk, cfg, backward)
                for rel in ((False, True) if nq == 64 and nk == 144 else (False,)):
                    ra = ta.rel_args(ta.Rel(torch.empty(23, d), torch.empty(23, d), 8, 12, 1.0), None)  # 8x8 in 12x12
                    c = dict(D=d, DV=d, BLOCK_M=bm, BLOCK_N=bn, KEY_CHUNKS=key_chunks, BLOCK_D=bd, BLOCK_DV=bd,
                             BLOCK_T=ra["BLOCK_T"], BLOCK_W=ra["BLOCK_W"], RESIDENT=mode == "res", HAS_BIAS=not rel,
                             HAS_GATE=True, HAS_REL=rel, LR_CHAIN=int(rel), QB=ra["QB"], WIN=ra["WIN"], DOT_PREC="tf32")
                    if backward:
                        c.update(STORE_DB=not rel, GATE_ELEM=False, HAS_DLSE=False)
                    fn = sk._keys_bwd if backward else sk._keys_fwd
                    compile_skinny(f"keys_{'bwd' if backward else 'fwd'} d{d} nq{nq} nk{nk} bm{bm} {mode} rel={rel}",
                                   fn, c, warps, stages, {"DK": "*fp32", "DV_": "*fp32"})
    if bd <= 128:
        for rows in (49, 256):
            for bm, bn, warps, stages, _ in sk.queries_candidates(rows, d, False):
                c = dict(D=d, DV=d, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, BLOCK_DV=bd, HAS_BIAS=True, HAS_GATE=True,
                         DOT_PREC="tf32")
                compile_skinny(f"queries_fwd d{d} rows{rows} bm{bm} bn{bn}", sk._queries_fwd, c, warps, stages,
                               {"O": "*fp32"})
            for bm, bn, warps, stages, _ in sk.queries_candidates(rows, d, True):
                c = dict(D=d, DV=d, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, BLOCK_DV=bd, ACCUM=rows > bm, HAS_BIAS=True,
                         STORE_DB=True, HAS_GATE=True, GATE_ELEM=False, HAS_DLSE=False, DOT_PREC="tf32")
                compile_skinny(f"queries_bwd d{d} rows{rows} bm{bm} bn{bn}", sk._queries_bwd, c, warps, stages,
                               {"DQ": "*fp32", "DK": "*fp32", "DV_": "*fp32"})
print("skinny configs over the shared-memory limit:", over or "none")
