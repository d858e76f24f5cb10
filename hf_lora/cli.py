"""The ``hf-lora`` command line: ``inspect`` (more commands are added per sub-command module)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .analyze_cli import add_analyze_parser
from .inspect_model import add_inspect_parser
from .merge_cli import add_merge_parser, add_push_parser


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per command."""
    parser = argparse.ArgumentParser(prog="hf-lora", description="LoRA adapters for Hugging Face models.")
    commands = parser.add_subparsers(dest="command", required=True)
    add_inspect_parser(commands)
    add_analyze_parser(commands)
    add_merge_parser(commands)
    add_push_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hf-lora`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except ValueError as exc:
        print(f"hf-lora {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
