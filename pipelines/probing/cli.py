"""`zoo probe --config configs/probe/NAME.yaml [key.sub=value ...]`: train probes on a frozen encoder; and the
`zoo demo` probes step."""
from __future__ import annotations

import copy
import os

from .run import load_config, run_probe
from .trainer import results_table

# The demo's grid, embedded (configs/ is not package data): linear (CLS) vs EP probes × two learning rates × two
# blocks of timm's tiny `test_vit` (random weights) on scikit-learn's digits; one encoder pass caches both blocks.
DEMO_CONFIG = {
    "name": "demo_probes",
    "seed": 0,
    "progress": False,
    "encoder": {"name": "timm:test_vit", "kwargs": {"img_size": 32}, "layers": [-1, -4]},
    "data": {"kind": "digits", "val_fraction": 0.25},
    "cache": {"batch_size": 256},
    "probes": [{"type": "linear", "pool": "cls"}, {"type": "ep", "num_queries": 8}],
    "train": {"epochs": 5, "batch_size": 128, "lr": [1e-3, 3e-3], "warmup_epochs": 1, "eval_every": 5},
}


def _probe(args) -> int:
    config = load_config(args.config, args.overrides)
    if args.quiet:
        config["progress"] = False
    if args.output_dir:
        config["output_dir"] = args.output_dir
    metrics = run_probe(config)
    if args.quiet:
        best = max(metrics["runs"].items(), key=lambda kv: kv[1]["top1"] or 0.0)
        print(f"{metrics['name']}: best {best[0]} top-1 {best[1]['top1']:.2f}% -> {metrics['outputs']['metrics']}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("probe", help="train linear/attentive/efficient probes on a frozen encoder's cached features")
    p.add_argument("--config", required=True, help="a probe config YAML, e.g. configs/probe/digits_ep.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, e.g. train.epochs=5 'train.lr=[1e-3,3e-3]' encoder.name=timm:test_vit")
    p.add_argument("--output-dir", default=None, help="override output_dir")
    p.add_argument("--quiet", action="store_true", help="no progress bars or tables; print one summary line")
    p.set_defaults(func=_probe)


def demo_step(args, console) -> None:
    """`zoo demo` step: the embedded probe grid (types × lrs × layers) on digits, offline, and its table."""
    config = copy.deepcopy(DEMO_CONFIG)
    config["output_dir"] = os.path.join(getattr(args, "out", None) or "./zoo-demo-out", "probes")
    if getattr(args, "epochs", None):
        config["train"]["epochs"] = args.epochs
    metrics = run_probe(config)
    table, _ = results_table(metrics, title=f"digits, {metrics['num_val']} held out: probes on {metrics['encoder']} "
                                            f"(random weights; chance {metrics['chance_top1']:.0f}%)")
    console.print(table)
    console.print(f"one encoder pass cached blocks {metrics['cache']['layers']} for {len(metrics['runs'])} probes "
                  f"-> {metrics['outputs']['table']}")
