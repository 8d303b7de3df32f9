"""AOT-compile the grid-pattern kernels for sm_90 without a GPU (Triton + its bundled ptxas): catches compile errors
of new kernel paths before device time is spent. Usage: python scripts/aot_compile_kernels.py"""
import sys, time, inspect
sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.abspath(__file__))))
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels.backends import triton_kernels as tk

PTR = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "O": "*bf16", "LSE": "*fp32", "QF": "*bf16", "KF": "*bf16",
       "BIAS": "*bf16", "GATE": "*bf16", "FULL_PTR": "*i32", "FULL_IDX": "*i32", "PART_PTR": "*i32",
       "PART_IDX": "*i32", "QLO": "*i32", "QHI": "*i32", "KC": "*i32", "PART_BITS": "*i32", "KB": "*fp32",
       "DO": "*bf16", "DELTA": "*fp32", "DK": "*bf16", "DV_": "*bf16", "DB": "*fp32", "DUK": "*fp32",
       "DQ": "*bf16", "DUQ": "*fp32"}
FLOATS = {"qk_scale", "sm_scale"}


def compile_one(fn, consts, num_warps, num_stages):
    sig = {}
    for name in inspect.signature(fn.fn).parameters:
        if name in consts:
            sig[name] = "constexpr"
        elif name in PTR:
            sig[name] = PTR[name]
        elif name in FLOATS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    src = ASTSource(fn, signature=sig, constexprs=consts)
    t = time.time()
    c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages))
    return time.time() - t, len(c.asm["cubin"]), c.metadata.shared


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
