"""`zoo probe --config configs/probe/NAME.yaml [key.sub=value ...]`: train probes on a frozen encoder."""
from __future__ import annotations

from .run import load_config, run_probe


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
