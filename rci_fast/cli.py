"""The `rci-fast` command: parses arguments and dispatches; the work lives in the subpackages."""
from __future__ import annotations

import argparse
import sys

from rci_fast import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rci-fast",
        description="rci_fast: train LLMs to reason with a code interpreter "
                    "(multi-turn SFT + curriculum GRPO), fast.")
    parser.add_argument("--version", action="version", version=f"rci_fast {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from rci_fast import demo
    from rci_fast.sandbox import cli as sandbox_cli
    from rci_fast.tasks import cli as tasks_cli
    from rci_fast.train import cli as train_cli
    from rci_fast.train import rl_cli

    sandbox_cli.add_parser(sub)
    tasks_cli.add_parser(sub)
    train_cli.add_parser(sub)
    rl_cli.add_parser(sub)
    demo.add_parser(sub)
    parser.commands = sub.choices  # main() reports a stray argument with the command's own usage
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse takes positional KEY=VALUE overrides in one run only; accept those after options too
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.commands.get(args.command, parser).error(f"unrecognized arguments: {' '.join(extra)}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
