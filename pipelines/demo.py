"""`zoo demo`: a tour of what works, on embedded defaults, offline, on a CPU in a few minutes.

Each capability adds a step to `DEMO_STEPS`: a (title, function(args)) pair.
"""
from __future__ import annotations

import time

import timm
import torch
from rich.console import Console
from rich.table import Table
from tqdm.auto import tqdm

import zoo

from .digits import fit_digits
from .model_info import models_table

# One representative model per family trained on digits: (name, img_size, in_chans, epochs, lr); the model
# must default to that input size.
DIGITS_MODELS = [
    ("minimal_vit_nomlp_wqk_mnist", 28, 1, 8, 4e-3),  # ~0.5 s an epoch; 8 epochs: ~0.9 held-out accuracy
    ("ninformer_small", 32, 3, 3, 3e-3),
    ("ulsam_mobilenetv1_tiny", 32, 3, 4, 1e-2),
]


def step_models(args, console):
    names = zoo.list_models()
    console.print(models_table(names))
    for name in tqdm(names, desc="create and run", disable=args.quiet, leave=False):  # each at its default size
        model = timm.create_model(name).eval()
        with torch.no_grad():
            model(torch.randn(1, *model.pretrained_cfg["input_size"]))
    console.print(f"created and ran all {len(names)} zoo models")


def step_digits(args, console):
    table = Table(title="brief training on scikit-learn digits (held-out accuracy; chance = 10%)")
    for col in ("model", "params", "epochs", "accuracy", "seconds"):
        table.add_column(col)
    for name, size, chans, epochs, lr in DIGITS_MODELS:
        if not zoo.is_zoo_model(name):
            continue
        torch.manual_seed(0)
        model = zoo.create_model(name, num_classes=10)  # default input size is (chans, size, size)
        res = fit_digits(model, size, chans, epochs=args.epochs or epochs, lr=lr, progress=not args.quiet)
        table.add_row(name, f"{res.params / 1e6:.3f}M", str(args.epochs or epochs), f"{100 * res.accuracy:.1f}%",
                      f"{res.seconds:.1f}")
    console.print(table)


def step_freeswim(args, console):
    from .freeswim.cli import demo_step  # diffusers loads only when this step runs

    demo_step(args, console)


def step_probes(args, console):
    from .probing.cli import demo_step

    demo_step(args, console)


DEMO_STEPS = [
    ("models", step_models),
    ("digits", step_digits),
    ("freeswim", step_freeswim),
    ("probes", step_probes),
]


def run_demo(args) -> int:
    console = Console()
    torch.manual_seed(0)
    for title, fn in DEMO_STEPS:
        if args.only and title not in args.only:
            continue
        console.rule(f"[bold]{title}")
        t0 = time.perf_counter()
        fn(args, console)
        console.print(f"[dim]{title}: {time.perf_counter() - t0:.1f} s")
    return 0


def _positive_int(text: str) -> int:
    import argparse

    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run the offline tour: every model, brief digits training, and more")
    p.add_argument("--only", nargs="+", default=None, choices=[title for title, _ in DEMO_STEPS],
                   help="steps to run (default all)")
    p.add_argument("--epochs", type=_positive_int, default=None, help="override the digits training epochs")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--out", default="./zoo-demo-out", help="directory for the demo's files (videos, pictures)")
    p.set_defaults(func=run_demo)
