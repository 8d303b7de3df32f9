"""`zoo list` and `zoo info`: what the zoo has, as tables."""
from __future__ import annotations

import json

import timm
import torch
from rich.console import Console
from rich.table import Table

import zoo


def model_summary(name: str) -> dict:
    """Name, family, parameter count, default input size and paper of a registered zoo model."""
    cfg = timm.models.get_pretrained_cfg(name)
    with torch.device("meta"):
        model = timm.create_model(name)
    return {
        "name": name,
        "family": zoo.model_family(name),
        "params": sum(p.numel() for p in model.parameters()),
        "input_size": tuple(cfg.input_size),
        "num_classes": cfg.num_classes,
        "paper": cfg.paper_name or "",
        "paper_ids": cfg.paper_ids or "",
    }


def models_table(names) -> Table:
    table = Table(title="attention zoo models")
    rows = []
    for name in names:
        s = model_summary(name)
        rows.append((s["name"], s["family"], f"{s['params'] / 1e6:.3f}M", "x".join(map(str, s["input_size"])),
                     f"{s['paper_ids']} {s['paper']}".strip()))
    widths = [max([len(col)] + [len(r[i]) for r in rows]) for i, col in enumerate(("name", "family", "params",
                                                                                   "input"))]
    for col, width in zip(("name", "family", "params", "input"), widths):  # kept whole; the paper gives way
        table.add_column(col, justify="right" if col == "params" else "left", no_wrap=True, min_width=width)
    room = Console().width - sum(widths) - 3 * 5 - 1
    table.add_column("paper", no_wrap=True, overflow="ellipsis", max_width=max(16, room))
    for row in rows:
        table.add_row(*row)
    return table


def models_markdown(names) -> str:
    """The README's model table: one row per model."""
    lines = ["| model | family | params | input | paper |", "|---|---|---:|---|---|"]
    for name in names:
        s = model_summary(name)
        paper = s["paper"] + (f" ({s['paper_ids']})" if s["paper_ids"] else "")
        lines.append(f"| `{name}` | {s['family']} | {s['params'] / 1e6:.2f}M | "
                     f"{'x'.join(map(str, s['input_size']))} | {paper} |")
    return "\n".join(lines)


def _list(args) -> int:
    names = zoo.list_models(args.pattern)
    if not names:
        print(f"no zoo model matches {args.pattern!r}")
        return 1
    if args.markdown:
        print(models_markdown(names))
    else:
        Console().print(models_table(names))
    return 0


def _info(args) -> int:
    if not zoo.is_zoo_model(args.name):
        print(f"unknown zoo model {args.name!r}; `zoo list` shows them")
        return 1
    info = model_summary(args.name)
    info["pretrained_cfg"] = timm.models.get_pretrained_cfg(args.name).to_dict()
    print(json.dumps(info, indent=2, default=str))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("list", help="list the zoo's models (name, family, params, input, paper)")
    p.add_argument("pattern", nargs="?", default=None, help="shell-style filter, e.g. 'ninformer*'")
    p.add_argument("--markdown", action="store_true", help="print a markdown table (the README's)")
    p.set_defaults(func=_list)
    p = sub.add_parser("info", help="show one model's summary and pretrained_cfg as JSON")
    p.add_argument("name", help="a zoo model name")
    p.set_defaults(func=_info)
