"""Where a kernel's instructions come from, without a GPU: a general kernel of the rel-pos rows (Halo grid or
HaloNet's blocked layout, d64; `_attn_fwd` by default, or a backward kernel) compiled for sm_90 on a forced
config, without and with the rel-pos term; per kernel the static SASS instruction count, the loop bodies' sizes
and the source lines with the most instructions (Triton's line info through its bundled nvdisasm). Use the
device's Triton:

    PYTHONPATH=<triton 3.6 install> python scripts/sass_lines.py grid 64,16,4,3 [_attn_bwd_dq]
    PYTHONPATH=<triton 3.6 install> python scripts/sass_lines.py blocked 64,4,1,flat,64,64 _keys_bwd

(a few-keys kernel takes a `triton_skinny.keys_candidates` config). Each line also gives ptxas's register count
and spill stores. The ncu profile of the same kernels (`probe_bias_kernels.py --forced-forward`) counts the
executed ones."""
import collections
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))
os.environ.update(ATTNZOO_AUTOTUNE="0", ATTNZOO_SKINNY="old")

import torch  # noqa: E402

import prebuild_triton_cache as pb  # noqa: E402

OPCODE = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*?);")


def compiled_kernels(layout: str, cfg: tuple, name: str = "_attn_fwd") -> dict:
    """{has rel-pos: compiled kernel `name`} of the row's no-bias and rel-pos calls on `cfg` (forward, and backward
    when `name` is not the forward; fake sm_90 device)."""
    from triton.runtime.jit import JITFunction

    pb.install_fake_device(None)
    run, got = JITFunction.run, {}

    def record(self, *args, grid, warmup, **kw):
        k = run(self, *args, grid=grid, warmup=True, **kw)
        if self.fn.__name__ == name:
            got[bool(kw.get("HAS_REL"))] = k
        return k

    JITFunction.run = record
    import bench_kernels as bk
    import kernels
    from kernels.backends import triton_attention as ta
    from kernels.backends import triton_skinny as ts

    if name.startswith("_keys"):  # the few-keys kernels on their own config family
        os.environ["ATTNZOO_SKINNY"] = "new"
        ts.keys_candidates = lambda *args, **kw: [cfg]
    else:
        ta._fwd_candidates = ta._bwd_candidates = lambda d, dv: [cfg]
    pattern, q, k, v, tables = bk.relpos_inputs(layout, device="cpu")
    with torch.set_grad_enabled(name != "_attn_fwd"):
        for bias in (None, kernels.RelPosBias(pattern, tables)):
            out = kernels.attention(q, k, v, bk.relpos_attend(layout, pattern), bias=bias)
            if out.requires_grad:
                out.backward(torch.randn_like(out))
    JITFunction.run = run
    return got


def report(kernel, top: int = 10) -> str:
    """Static instruction count, loop bodies (backward branches) and the `top` source lines by instruction count."""
    tool = os.path.join(os.path.dirname(pb.ptxas_path()), "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        text = subprocess.run([tool, "-gi", f.name], capture_output=True, text=True, check=True).stdout
    ins, labels, per_line, line = [], {}, collections.Counter(), None
    for row in text.splitlines():
        m = re.search(r'//## File "[^"]*?([^/"]+)", line (\d+)', row)
        if m:
            line = f"{m.group(1)}:{m.group(2)}"
            continue
        m = re.match(r"(\.L_x_\d+):", row)
        if m:
            labels[m.group(1)] = len(ins)  # the next instruction's index
            continue
        m = OPCODE.match(row)
        if m:
            ins.append((m.group(2), m.group(3)))
            per_line[line] += 1
    loops = []  # backward branches: loop bodies
    for i, (op, rest) in enumerate(ins):
        target = re.search(r"\((\.L_x_\d+)\)", rest) if op == "BRA" else None
        if target and labels.get(target.group(1), i + 1) <= i:
            loops.append(i - labels[target.group(1)] + 1)
    lines = ", ".join(f"{k} {v}" for k, v in per_line.most_common(top))
    registers = pb.ptxas_report(kernel.asm["ptx"])
    return f"{len(ins)} instructions ({registers}); loop bodies {loops}; by source line: {lines}"


def main() -> None:
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    cfg = tuple(int(c) if c.isdigit() else c for c in sys.argv[2].split(","))
    for rel, kernel in sorted(compiled_kernels(sys.argv[1], cfg, *sys.argv[3:]).items()):
        print(f"{sys.argv[1]} {'rel-pos' if rel else 'no bias'} {cfg}: {report(kernel)}", flush=True)


if __name__ == "__main__":
    main()
