"""The `zoo` command line: thin wrappers over `zoo` and `pipelines`.

Each subcommand lives in the module that does the work and exposes `add_parser(subparsers)`, which adds its
parser and sets `func` to a callable taking the parsed arguments and returning an exit code.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module exposing add_parser(subparsers); extended as workflows land.
SUBCOMMANDS = {
    "list": "pipelines.model_info",
    "info": "pipelines.model_info",
    "demo": "pipelines.demo",
    "probe": "pipelines.probing.cli",
    "generate": "pipelines.freeswim.cli",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zoo", description="The attention zoo: models, pipelines, probes.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    added = set()
    for module_name in dict.fromkeys(SUBCOMMANDS.values()):
        module = importlib.import_module(module_name)
        module.add_parser(sub)
        added.add(module_name)
    return parser


def main(argv=None) -> int:
    """The `zoo` command: parse `argv` (default: sys.argv[1:]), run the subcommand, return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
