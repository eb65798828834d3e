"""fastweight: FLOW (loss-weighted) fine-tuning of causal LMs with a fused cross-entropy.

Every subcommand is registered through ``add_command`` from the table ``COMMANDS``. Building the
parsers imports no torch or transformers (their modules are imported when a command runs), so
``--help`` is instant. A command's anticipated failures print one line on stderr: exit status 2
for a usage error (flags that do not fit together), 1 for a run-time failure (a missing file, a
bad data row, scores from another model...).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Callable

__all__ = ["main", "build_parser", "add_command", "UsageError", "CommandError", "HelpFormatter",
           "COMMANDS",
           "positive_int", "add_data_format_arguments", "one_line"]


class UsageError(ValueError):
    """Flags that are invalid or do not fit together: exit status 2, like argparse's own errors."""


class CommandError(RuntimeError):
    """An anticipated run-time failure that is not a ValueError or OSError: exit status 1."""


# (name, one-line summary, "module:function" adding its options or None, "module:function" running it)
COMMANDS: tuple[tuple[str, str, str | None, str], ...] = (
    ("score", "score every sample once with the frozen pre-trained model (FLOW step 1)",
     "fastweight.scoring.options:add_score_arguments", "fastweight.scoring.run:score"),
    ("weights", "summarise a scores file: tau, loss quantiles with their weights, effective sample size",
     "fastweight.scoring.options:add_weights_arguments", "fastweight.scoring.summary:run_weights"),
    ("train", "fine-tune a causal LM on the FLOW-weighted (or standard) fused loss (FLOW step 2)",
     "fastweight.training.config:add_arguments", "fastweight.training.loop:run_cli"),
    ("demo", "offline end-to-end demo: pre-train a small model, score, fine-tune standard vs FLOW",
     "fastweight.demo:add_arguments", "fastweight.demo:run_cli"),
    ("info", "show which backend each op uses on this machine, and why",
     None, "fastweight.info:run"),
)

# Errors a command anticipates and reports in one line; anything else is a bug and keeps its
# traceback.
_RUNTIME_ERRORS = (ValueError, OSError, NotImplementedError, CommandError)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends ``(default: X)`` to every optional flag's help, unless the help already says
    what the default is (for defaults that are not a plain value, such as "the model path")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.required or not action.option_strings or action.default is argparse.SUPPRESS
                or "default" in text):
            return text
        return f"{text} (default: %(default)s)"


def _resolve(target: str) -> Callable:
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)


def add_command(subparsers, name: str, summary: str, add_arguments: Callable | None,
                run: str, description: str | None = None) -> argparse.ArgumentParser:
    """Add subcommand ``name``: ``summary`` is its line in ``fastweight --help``;
    ``add_arguments(parser)`` adds its options; ``run`` ("module:function", imported only when
    the command runs) takes the parsed arguments and returns the exit status."""
    parser = subparsers.add_parser(name, help=summary, description=description or summary,
                                   formatter_class=HelpFormatter)
    if add_arguments is not None:
        add_arguments(parser)
    parser.set_defaults(command_name=name, command_run=run)
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The ``fastweight`` parser with every subcommand of ``COMMANDS`` (imports no torch)."""
    parser = argparse.ArgumentParser(prog="fastweight", description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, summary, arguments, run in COMMANDS:
        add_command(subparsers, name, summary, _resolve(arguments) if arguments else None, run)
    return parser


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def add_data_format_arguments(parser: argparse.ArgumentParser, max_length: int | None) -> None:
    """The flags that say how rows become tokens, shared by ``score`` and ``train`` (their
    values must agree for a scores file to match its training data)."""
    parser.add_argument("--format", dest="fmt", default="auto",
                        choices=("auto", "prompt_response", "messages", "text"),
                        help="row layout; auto picks messages, then prompt+response, then text")
    parser.add_argument("--prompt-field", default="prompt", help="prompt column")
    parser.add_argument("--response-field", default="response", help="response column (scored)")
    parser.add_argument("--messages-field", default="messages",
                        help="chat column (assistant turns scored)")
    parser.add_argument("--text-field", default="text", help="plain-text column (all scored)")
    parser.add_argument("--max-length", type=positive_int, default=max_length,
                        help="truncate longer samples to this many tokens"
                        + ("" if max_length else " (default: no limit)"))


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (transformers and datasets errors span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the subcommand; returns its exit status."""
    args = build_parser().parse_args(argv)
    prefix = f"fastweight {args.command_name}: error:"
    try:
        return int(_resolve(args.command_run)(args) or 0)
    except BrokenPipeError:  # the reader went away (`fastweight info | head`): not an error
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - Python flushes stderr at exit
        return 0
    except UsageError as exc:
        print(f"{prefix} {one_line(exc)}", file=sys.stderr)
        return 2
    except _RUNTIME_ERRORS as exc:
        print(f"{prefix} {one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prefix} interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
