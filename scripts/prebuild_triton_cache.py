"""Compile the benchmarks' Triton kernels for the H200 on a machine without a GPU, into a cache the device reuses.

    PYTHONPATH=<triton 3.6 install> TRITON_CACHE_DIR=/tmp/triton-cache \\
        python scripts/prebuild_triton_cache.py --device-libtriton <device wheel's triton/_C/libtriton.so>

Device time went mostly to compiling (kernels/NOTES.md). Triton's cache key hashes its own sources, libtriton,
the bundled ptxas, the kernel source, the launch specialization (dtypes, 16-byte divisibility of pointers and
ints) and the options. This script runs the benchmark cases' `kernels.attention` calls on CPU tensors with the
same shapes, a stand-in CUDA driver (target sm_90) and launches turned into compile-only warm-ups, with every
autotune candidate compiled (ATTNZOO_WARM=0/1) and `_num_sms` = 132 (the H200's, which sets the split/item
arguments). `--device-libtriton` swaps the hash of this machine's libtriton for the device's in the cache key
(the wheels for other Pythons differ only in that binary). The device then finds the kernels compiled if the
Triton build and the arguments match; any mismatch only costs a normal compile there.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
H200_SMS = 132


def install_fake_device(device_libtriton=None):
    """Patch Triton and kernels so launches compile for sm_90 and stop before loading the binary."""
    import triton
    import triton.runtime.cache as tcache
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver as drv
    from triton.runtime.jit import JITFunction

    if device_libtriton:
        local_lib = os.path.join(os.path.dirname(triton.__file__), "_C", "libtriton.so")
        key = tcache.triton_key()
        from zoo.probes.encoders import _file_digest  # sha256 of a file, in chunks

        local_hash, device_hash = _file_digest(local_lib), _file_digest(device_libtriton)
        if local_hash not in key:
            raise SystemExit("this Triton's cache key does not contain its libtriton hash: unknown Triton layout")
        device_key = key.replace(local_hash, device_hash)
        tcache.triton_key = lambda: device_key

    class FakeCudaDriver:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

    drv.set_active(FakeCudaDriver())
    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        return run(self, *args, grid=grid, warmup=True, **kwargs)

    JITFunction.run = compile_only
    torch.cuda.is_available = lambda: True

    import kernels.agent as ka
    import kernels.functional as kf
    from kernels.backends import triton_attention as ta

    ta._num_sms = lambda device: H200_SMS
    kf.choose_backend = lambda *a, **k: ta.attention_triton  # CPU / meta tensors, Triton path
    ka._fused_device = lambda q, backend: True  # agent layers take the fused kernels, as on the device
    os.environ["ATTNZOO_WARM"] = "0/1"


def ptxas_path() -> str:
    """Triton's bundled ptxas for sm_90 (its folder also holds nvdisasm)."""
    from triton.backends.nvidia.compiler import get_ptxas

    tool = get_ptxas(90)
    return getattr(tool, "path", tool)


def ptxas_report(ptx_text):
    """'registers, spill stores' of a PTX through Triton's bundled ptxas (sm_90a)."""
    import re
    import subprocess
    import tempfile

    tool = ptxas_path()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx_text)
        err = subprocess.run([tool, "--gpu-name", "sm_90a", "-v", path, "-o", "/dev/null"], capture_output=True,
                             text=True).stderr
    regs = re.search(r"Used (\d+) registers", err)
    spill = re.search(r"(\d+) bytes spill stores", err)
    return f"{regs.group(1) if regs else '?'} registers, {spill.group(1) if spill else '?'} B spill stores"


def _script(name: str):
    """Another script of this folder as a module (the benches whose calls the cases replay)."""
    spec = importlib.util.spec_from_file_location(f"_{name}", os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _randn(*shape, grad=False, dtype=torch.bfloat16):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


def _fb(fn, leaves):
    if leaves:  # the inference forward too: with rel-pos it differs (it saves no query factor for a backward)
        with torch.no_grad():
            fn()
    out = fn()
    if leaves:
        torch.autograd.grad(out, leaves, torch.randn_like(out))


def cases():
    """name -> callable: the calls of scripts/profile_host.py and scripts/bench_kernels.py (skinny2, relpos,
    agent, bias, gate, na2d, core = the issue-3 rows), the models and the pipeline, forward and backward where
    those benches time both. Agent layers take the fused kernels in inference (`kernels.agent_attention`'s
    blocker patched in `install_fake_device`), the composition in training."""
    import kernels
    from kernels.backends import triton_attention as ta
    from pipelines.benchmark import set_env

    def reset():
        ta._BEST.clear()

    def profile_host():
        B, h = 256, 3
        q, agents = _randn(B, h, 197, 64), _randn(B, h, 49, 64)
        b1, b2 = torch.randn(1, h, 49, 197), torch.randn(1, h, 197, 49)
        with torch.no_grad():
            kernels.attention(agents, q, q, bias=b1)
            kernels.attention(q, agents, agents, bias=b2)
            kernels.attention(_randn(8, 8, 49, 64), _randn(8, 8, 4096, 64), _randn(8, 8, 4096, 64))
            kernels.attention(_randn(8, 8, 16384, 64), _randn(8, 8, 64, 64), _randn(8, 8, 64, 64))
            d = _randn(2, 16, 4096, 128)
            kernels.attention(d, d, d)
            kernels.attention(d, d, d, gate=_randn(2, 4096, 16))

    def skinny2():
        for nq, nk, with_old in [(16384, 64, True), (16384, 128, False), (16384, 256, False), (49, 4096, True)]:
            q, k, v = _randn(8, 8, nq, 64, grad=True), _randn(8, 8, nk, 64, grad=True), _randn(8, 8, nk, 64, grad=True)
            for mode in ("new", "old") if with_old else ("new",):
                set_env(ATTNZOO_SKINNY=mode)
                _fb(lambda: kernels.attention(q, k, v), [q, k, v])
            set_env(ATTNZOO_SKINNY=None)

    def relpos():
        hb = kernels.Halo((8, 8), 8, 2)
        q = _randn(512, 8, 64, 64, grad=True)
        k, v = _randn(512, 8, 144, 64, grad=True), _randn(512, 8, 144, 64, grad=True)
        th, tw = _randn(23, 64, grad=True), _randn(23, 64, grad=True)
        for mode in ("old", "new"):
            set_env(ATTNZOO_SKINNY=mode)
            _fb(lambda: kernels.attention(q, k, v), [q, k, v])
        for skinny, mode in (("old", "kernel"), ("new", "kernel"), (None, "lowrank"), (None, "kernel")):
            set_env(ATTNZOO_SKINNY=skinny, ATTNZOO_RELPOS=mode)
            _fb(lambda: kernels.attention(q, k, v, bias=kernels.RelPosBias(hb, (th, tw))), [q, k, v, th, tw])
        set_env(ATTNZOO_SKINNY=None, ATTNZOO_RELPOS=None)
        h5 = kernels.Halo((14, 14), 14, 2)  # bench_relpos' H5 case
        q, k, v = _randn(256, 8, 196, 64, grad=True), _randn(256, 8, 324, 64, grad=True), _randn(256, 8, 324, 160,
                                                                                                  grad=True)
        th, tw = _randn(35, 64, grad=True), _randn(35, 64, grad=True)
        _fb(lambda: kernels.attention(q, k, v), [q, k, v])
        for mode in ("kernel", "lowrank"):
            set_env(ATTNZOO_RELPOS=mode)
            _fb(lambda: kernels.attention(q, k, v, bias=kernels.RelPosBias(h5, (th, tw))), [q, k, v, th, tw])
        set_env(ATTNZOO_RELPOS=None)

    def agent():
        """bench_kernels' agent rows (the fused kernels at their default plan, and the composition) and its GPU
        checks (bf16 and fp16, batch 32), on meta tensors."""
        from kernels.agent import _composition

        bk = _script("bench_kernels")
        for name, B, H, D, P, grid, agent_grid in bk.AGENT_CASES:
            for batch, dtype in ((B, torch.bfloat16), (32, torch.bfloat16), (32, torch.float16)):
                q, k, v, kw = bk._agent_inputs(batch, H, D, P, grid, agent_grid, dtype, device="meta")
                with torch.no_grad():
                    if batch == B:  # the bench's launch-plan sweep (BENCH_AGENT_CONFIGS)
                        for cfg in bk._agent_configs():
                            with bk.agent_launch_plan(cfg):
                                kernels.agent_attention(q, k, v, **kw)
                    kernels.agent_attention(q, k, v, **kw)
                    kernels.agent_attention(q, k, v, **{**kw, "bias1": kw["bias1"].contiguous(),  # tight biases
                                                        "bias2": kw["bias2"].contiguous()})
                    if batch == B:
                        _composition(q, k, v, grid, agent_grid, grid, P, kw["bias1"], kw["bias2"],
                                     kw["dwc_weight"].to(dtype), kw["dwc_bias"].to(dtype), D ** -0.5, None)

    def bias():
        for B, H, N, D in [(1, 16, 4096, 128), (2, 16, 4096, 64)]:
            q, k, v = _randn(B, H, N, D, grad=True), _randn(B, H, N, D, grad=True), _randn(B, H, N, D, grad=True)
            _fb(lambda: kernels.attention(q, k, v), [q, k, v])
            b = _randn(H, N, N, grad=True)
            _fb(lambda: kernels.attention(q, k, v, bias=b), [q, k, v, b])
            uq, uk = _randn(B, H, N, 16, grad=True), _randn(B, H, N, 16, grad=True)
            _fb(lambda: kernels.attention(q, k, v, bias=kernels.LowRankBias(uq, uk)), [q, k, v, uq, uk])
        pattern = kernels.Halo((64, 64), 8, 2)
        q = _randn(8, 8, 64 * 64, 64, grad=True)
        k, v = _randn(8, 8, 68 * 68, 64, grad=True), _randn(8, 8, 68 * 68, 64, grad=True)
        th, tw = _randn(23, 64, grad=True), _randn(23, 64, grad=True)
        _fb(lambda: kernels.attention(q, k, v, pattern), [q, k, v])
        _fb(lambda: kernels.attention(q, k, v, pattern, bias=kernels.RelPosBias(pattern, (th, tw))),
            [q, k, v, th, tw])
        hb = kernels.Halo((8, 8), 8, 2)
        q = _randn(512, 8, 64, 64, grad=True)
        k, v = _randn(512, 8, 144, 64, grad=True), _randn(512, 8, 144, 64, grad=True)
        _fb(lambda: kernels.attention(q, k, v), [q, k, v])
        _fb(lambda: kernels.attention(q, k, v, bias=kernels.RelPosBias(hb, (th, tw))), [q, k, v, th, tw])

    def gate():
        q, k, v = _randn(2, 16, 4096, 128, grad=True), _randn(2, 16, 4096, 128, grad=True), \
            _randn(2, 16, 4096, 128, grad=True)
        _fb(lambda: kernels.attention(q, k, v), [q, k, v])
        for shape in ((2, 4096, 16), (2, 4096, 16, 128)):
            g = _randn(*shape, grad=True)
            _fb(lambda: kernels.attention(q, k, v, gate=g), [q, k, v, g])

    def core():
        """bench_kernels' issue-3 rows: dense and causal (forward, dense backward), 1-d window, the 3-d window."""
        for B, N in [(4, 4096), (2, 8192), (1, 16384)]:
            q, k, v = (_randn(B, 16, N, 128, grad=True) for _ in range(3))
            _fb(lambda: kernels.attention(q, k, v), [q, k, v])
            with torch.no_grad():
                if N != 8192:
                    kernels.attention(q, k, v, kernels.Causal())
        q = _randn(2, 16, 16384, 128)
        with torch.no_grad():
            kernels.attention(q, q, q, kernels.Window1d(1024, 1023))
        n = 21 * 60 * 104
        q, k, v = (_randn(1, 12, n, 128, grad=True) for _ in range(3))
        _fb(lambda: kernels.attention(q, k, v, kernels.Neighborhood((21, 60, 104), (21, 30, 52))), [q, k, v])

    def checks():
        """bench_kernels' GPU checks (KERNELS_CHECK=1: issue 3's, issue 4's and the round-2 skinny/rel-pos ones):
        each case's first config, forward and backward (the checks time nothing, so ATTNZOO_AUTOTUNE=0 there: no
        candidate list to warm). The issue-4 ones run `check_extra` on CPU tensors: its float64 comparison of
        the compile-only outputs is meaningless here and its printout is dropped."""
        bk = _script("bench_kernels")
        warm, tune = os.environ.pop("ATTNZOO_WARM"), os.environ["ATTNZOO_AUTOTUNE"]
        os.environ["ATTNZOO_AUTOTUNE"] = "0"
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                for case in bk.core_check_cases():
                    bk.check_case(*case, dev="cpu")
                for case in bk.extra_check_cases():
                    bk.check_extra(*case[:10], **case[10], dev="cpu")
                bk.check_qreg_configs(dev="cpu")
                for env, cases in ((bk.ROUND2_ENV, bk.round2_check_cases()),
                                   (bk.REL_GENERAL_ENV, bk.rel_general_check_cases())):
                    set_env(**env)
                    for case in cases:
                        bk.check_extra(*case[:10], **case[10], dev="cpu")
                    set_env(**{name: None for name in env})
        finally:
            os.environ["ATTNZOO_WARM"], os.environ["ATTNZOO_AUTOTUNE"] = warm, tune

    def na2d():
        pattern = kernels.Neighborhood((128, 128), (33, 33))
        q, k, v = _randn(1, 12, 128 * 128, 128), _randn(1, 12, 128 * 128, 128), _randn(1, 12, 128 * 128, 128)
        with torch.no_grad():
            kernels.attention(q, k, v, pattern)

    def halonet():
        """scripts/bench_models.py's HaloNet cases on meta tensors (shapes and strides only, data_ptr 0 or the
        view's byte offset: the divisibility the device's 512-byte-aligned allocations give): batch 256, 256 px,
        bf16, channels_last, inference and a training step."""
        import timm

        import zoo  # noqa: F401  (registers the models)

        for name in ("zoo_halonet26t", "zoo_halonet50ts"):
            model = timm.create_model(name).to(device="meta", dtype=torch.bfloat16)
            model = model.to(memory_format=torch.channels_last)
            x = torch.empty(256, 3, 256, 256, device="meta", dtype=torch.bfloat16)
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                model.eval()(x)
            model.train()(x).float().sum().backward()

    def agent_models():
        """The Agent Attention cases of scripts/bench_models.py on meta tensors: bf16 weights, the agent biases
        kept in float32 (as under autocast, where they are computed from float32 parameters)."""
        import timm

        import zoo  # noqa: F401
        from zoo.layers.agent_attention import AgentAttention

        for name, size, train in (("agent_deit_tiny", 224, True), ("agent_deit_tiny", 1024, False),
                                  ("agent_swin_tiny", 224, False)):
            kwargs = {} if size == 224 else {"img_size": size}
            model = timm.create_model(name, **kwargs).to(device="meta", dtype=torch.bfloat16)
            for module in model.modules():
                if isinstance(module, AgentAttention):
                    for param in module._bias_params():
                        param.data = param.data.float()
            x = torch.empty(256, 3, size, size, device="meta", dtype=torch.bfloat16)
            with torch.no_grad():
                model.eval()(x)
            if train:
                model.train()(x).float().sum().backward()

    def freeswim():
        """scripts/bench_pipelines.py's full case (Wan2.1-1.3B shape, 960x1664x81) on meta tensors: the refresh
        and cached steps' kernels (window self-attention on the [window; full] batch and alone, cross-attention)."""
        from pipelines.freeswim.attention import (FreeSwimState, freeswim_attention_scale, freeswim_pattern,
                                                  freeswim_processors)

        bp = _script("bench_pipelines")
        overrides, height, width, frames, base_h, base_w, text_len = bp.SIZES["full"]
        config = {**bp.WAN_1_3B, **overrides}
        model = bp.build_transformer(config, "meta", torch.bfloat16)
        grid = (1 + (frames - 1) // 4, height // 16, width // 16)
        x = torch.empty(1, 16, grid[0], 2 * grid[1], 2 * grid[2], device="meta", dtype=torch.bfloat16)
        t = torch.full((1,), 700.0, device="meta")
        ctx = torch.empty(1, text_len, config["text_dim"], device="meta", dtype=torch.bfloat16)
        state = FreeSwimState(pattern=freeswim_pattern(grid, (base_h // 16, base_w // 16)),
                              scale=freeswim_attention_scale(config["attention_head_dim"]))

        def forward(latents):
            n = latents.shape[0]
            return model(hidden_states=latents, timestep=t.expand(n), encoder_hidden_states=ctx.expand(n, -1, -1),
                         return_dict=False)[0]

        with torch.no_grad(), freeswim_processors(model, state):
            state.set_mode("dual", store_cross=True)
            forward(torch.cat([x, x]))
            state.set_mode("window")
            forward(x)
            state.set_mode("reuse")
            forward(x)

    out = dict(freeswim=freeswim, halonet=halonet, agent_models=agent_models, profile_host=profile_host,
               skinny2=skinny2, relpos=relpos, agent=agent, bias=bias, gate=gate, na2d=na2d, core=core,
               checks=checks)
    return out, reset


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device-libtriton", default=None,
                        help="the device's triton/_C/libtriton.so (from the wheel of the device's Python)")
    parser.add_argument("--only", default=None, help="comma list of cases (default all)")
    parser.add_argument("--autotune", default="fast,1", help="ATTNZOO_AUTOTUNE modes whose candidates to compile")
    args = parser.parse_args(argv)
    if "TRITON_CACHE_DIR" not in os.environ:
        raise SystemExit("set TRITON_CACHE_DIR to the path the device will use (group files store absolute paths)")
    import triton

    if triton.__version__ != "3.6.0":
        print(f"warning: Triton {triton.__version__} here; the device runs 3.6.0 (cache keys will not match)")
    install_fake_device(args.device_libtriton)
    table, reset = cases()
    names = args.only.split(",") if args.only else list(table)
    for mode in args.autotune.split(","):
        os.environ["ATTNZOO_AUTOTUNE"] = mode
        for name in names:
            reset()
            t0 = time.time()
            before = sum(len(fs) for _, _, fs in os.walk(os.environ["TRITON_CACHE_DIR"]))
            table[name]()
            after = sum(len(fs) for _, _, fs in os.walk(os.environ["TRITON_CACHE_DIR"]))
            print(f"[autotune={mode}] {name}: {time.time() - t0:.0f} s, {after - before} new cache files", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
