"""``fastweight`` command line: each subcommand lives in its own module, which exposes
``register(subparsers)`` adding its parser with ``set_defaults(func=...)``."""
from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = ("fastweight.info", "fastweight.scoring", "fastweight.train", "fastweight.demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastweight", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # that command is not part of this build
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
