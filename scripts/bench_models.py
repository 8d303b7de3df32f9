"""Model throughput on the GPU: zoo models vs timm's model of the same architecture, in the same run.

    python scripts/bench_models.py                 # the issue's cases, bf16 autocast, batch 256
    python scripts/bench_models.py --smoke         # CPU check that every case runs (tiny batch, no timing)
    python scripts/bench_models.py --profile DIR   # also: torch.profiler tables per case (attention layers' share)

Writes benchmarks/models.json and prints a markdown table (images/s and the zoo/timm ratio).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import timm  # noqa: E402

import zoo  # noqa: E402
from pipelines.benchmark import markdown_table, peak_memory, time_cuda, write_results  # noqa: E402

# (label, zoo model, "accelerate:<timm name>" or "unfused:<zoo model>", timm anchor, image size, modes)
CASES = [
    ("halonet26t", "zoo_halonet26t", "halonet26t", 256, ("infer", "train")),
    # the zoo model with its conv-BN-ReLU inference fusion off: what the attention layers alone give
    ("halonet26t unfused", "unfused:zoo_halonet26t", "halonet26t", 256, ("infer",)),
    ("halonet50ts", "zoo_halonet50ts", "halonet50ts", 256, ("infer", "train")),
    ("accelerate(halonet26t)", "accelerate:halonet26t", "halonet26t", 256, ("infer", "train")),
    ("agent_deit_tiny@224", "agent_deit_tiny", "deit_tiny_patch16_224", 224, ("infer", "train")),
    ("agent_deit_tiny@1024", "agent_deit_tiny", "deit_tiny_patch16_224", 1024, ("infer",)),
    ("agent_swin_tiny@224", "agent_swin_tiny", "swin_tiny_patch4_window7_224", 224, ("infer", "train")),
]


def build(name: str, img_size: int, device, channels_last: bool):
    if name.startswith("accelerate:"):
        model = timm.create_model(name.split(":", 1)[1])
        model, report = zoo.accelerate(model)
        print(f"accelerate swapped: {report}")
    elif name.startswith("unfused:"):
        model = timm.create_model(name.split(":", 1)[1])
        zoo.layers.set_fused_inference(model, False)
    else:
        kwargs = {}
        cfg = timm.models.get_pretrained_cfg(name).to_dict()
        if cfg["input_size"][-1] != img_size:
            kwargs["img_size"] = img_size
        model = timm.create_model(name, **kwargs)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def step_fns(model, batch: int, img_size: int, device, channels_last: bool):
    x = torch.randn(batch, 3, img_size, img_size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    @torch.no_grad()
    def infer():
        model.eval()
        with amp:
            return model(x)

    def train():
        model.train()
        with amp:
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return {"infer": infer, "train": train}


def _attention_layer_types():
    from timm.layers.halo_attn import HaloAttn

    from zoo.layers.agent_attention import AgentAttention
    from zoo.layers.halo_attention import HaloAttention

    return (HaloAttn, HaloAttention, AgentAttention, timm.models.vision_transformer.Attention,
            timm.models.swin_transformer.WindowAttention)


def profile_step(model, fn, path: str, steps: int = 3) -> dict:
    """GPU time of `steps` calls of `fn` and the part inside attention layers' forward (a `record_function` range
    per layer call); writes the profiler's kernel table to `path`."""
    from torch.profiler import ProfilerActivity, profile, record_function

    open_ranges = []

    def pre(mod, args):
        rf = record_function("attention_layer")
        rf.__enter__()
        open_ranges.append(rf)

    def post(mod, args, out):
        open_ranges.pop().__exit__(None, None, None)

    types = _attention_layer_types()
    layers = [m for m in model.modules() if isinstance(m, types)]
    handles = [h for m in layers for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn()
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        sync()
    for h in handles:
        h.remove()
    events = prof.key_averages()
    # the annotation's own GPU-side range (its span over the kernels it encloses) is reported like a kernel: keep
    # it out of the total (the second session's JSON counted it: its shares are too low)
    kernel_us = sum(e.self_device_time_total for e in events
                    if e.device_type == torch.autograd.DeviceType.CUDA and e.key != "attention_layer")
    attn_us = max([e.device_time_total for e in events if e.key == "attention_layer"] or [0.0])
    with open(path, "w") as f:
        f.write(events.table(sort_by="self_device_time_total", row_limit=40, max_name_column_width=90))
        f.write("\n\nhost (CPU) side, by self CPU time:\n")
        f.write(events.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=90))
    return {"gpu_ms_per_step": kernel_us / steps / 1e3, "attention_fwd_ms_per_step": attn_us / steps / 1e3,
            "attention_fwd_share": attn_us / kernel_us if kernel_us else None}


def _check_fused_inference(model, fn, row):
    """A model with `zoo.layers.conv_bn_fusion` modules: its fused inference output vs its unfused one (timm's
    modules), with random norm statistics, relative error recorded in the row; a wrong fused path fails the run.
    (The values do not change the timing that follows.)"""
    if not zoo.layers.set_fused_inference(model, False):
        return
    with torch.no_grad():  # a fresh model's norms are identities (conv3's weight zero): give them statistics
        for bn in model.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                bn.running_mean.normal_(0, 0.2)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.3, 1.2)
                bn.bias.normal_(0, 0.2)
    ref = fn().float()
    zoo.layers.set_fused_inference(model, True)
    err = ((fn().float() - ref).norm() / ref.norm()).item()
    row["zoo_fused_vs_unfused_rel_err"] = err
    print(f"fused inference vs unfused: rel err {err:.2e}", flush=True)
    if not err < 2e-2:  # bf16: folded weights rounded once (~4e-3 .. 8e-3 measured on the H200)
        raise RuntimeError(f"fused inference differs from the unfused model: rel err {err:.3e}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--cases", nargs="*", default=None, help="labels to run, in this order (default all)")
    parser.add_argument("--modes", nargs="*", default=("infer", "train"), help="infer and/or train")
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="run each case once on tiny inputs (CPU ok)")
    parser.add_argument("--out", default=None, help="directory for models.json (default benchmarks/)")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="also profile each case (kernel tables into DIR, attention share in the results)")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    batch = 1 if args.smoke else args.batch
    torch.backends.cudnn.benchmark = True
    rows = []
    cases = CASES if not args.cases else [c for label in args.cases for c in CASES if c[0] == label]
    for label, zoo_name, timm_name, size, modes in cases:
        run_size = min(size, 256) if args.smoke else size
        for mode in [m for m in modes if m in args.modes]:
            row = {"case": label, "mode": mode, "img_size": size, "batch": batch}
            for tag, name in (("timm", timm_name), ("zoo", zoo_name)):
                if os.environ.get("ATTNZOO_WARM") and tag == "timm":  # compile-only shard: timm has no Triton
                    continue
                cl = not args.no_channels_last and "deit" not in name and "swin" not in name
                model = build(name, run_size, device, cl)
                fn = step_fns(model, batch, run_size, device, cl)[mode]
                if tag == "zoo" and mode == "infer" and not name.startswith("unfused:"):
                    _check_fused_inference(model, fn, row)
                if args.smoke:
                    fn()
                    row[f"{tag}_img_s"] = None
                    continue
                t = time_cuda(fn, warmup=3, repeats=10)
                row[f"{tag}_img_s"] = batch / (t["median_ms"] / 1e3)
                row[f"{tag}_ms"] = t["median_ms"]
                row[f"{tag}_peak_GiB"] = peak_memory(fn)
                if args.profile:
                    os.makedirs(args.profile, exist_ok=True)
                    prof = profile_step(model, fn, os.path.join(args.profile, f"{label}_{mode}_{tag}.txt"))
                    row.update({f"{tag}_{k}": v for k, v in prof.items()})
                del model, fn
                torch.cuda.empty_cache()
            if not args.smoke and "timm_img_s" in row:
                row["ratio"] = row["zoo_img_s"] / row["timm_img_s"]
            rows.append(row)
            print(row, flush=True)
            if not args.smoke:  # after every row: a run cut short keeps what it measured
                path = write_results("models", rows,
                                     "python scripts/bench_models.py " + " ".join(argv or sys.argv[1:]), args.out)
    if not args.smoke:
        print(f"wrote {path}")
    print(markdown_table(rows, ["case", "mode", "img_size", "batch", "timm_img_s", "zoo_img_s", "ratio",
                                "timm_peak_GiB", "zoo_peak_GiB"]))


if __name__ == "__main__":
    main()
