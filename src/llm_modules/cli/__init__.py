"""The `llm-modules` command: parse, call the library, print. Each command registers itself with one function
(one module per command family below); torch and transformers are imported only when a command runs."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from .bench import add_bench
from .common import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_NOT_FOUND, EXIT_USAGE, UsageError, int_at_least
from .demo import add_demo
from .eval import add_eval
from .generate import add_chat, add_generate
from .info import add_info, add_smoke_test
from .serve import add_serve
from .train import add_train

COMMANDS: list[Callable] = [add_info, add_smoke_test, add_bench, add_train, add_generate, add_chat, add_serve, add_demo, add_eval]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-modules", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; return its exit code (see `common`: 0 ok, 1 failure, 2 bad input, 3 not found, 130 Ctrl-C)."""
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # one line for users; --debug shows the traceback
        if args.debug:
            raise
        code, message = describe_error(error)
        print(f"llm-modules {args.command}: error: {message}", file=sys.stderr)
        return code
    return 0


def describe_error(error: Exception) -> tuple[int, str]:
    """(exit code, one-line message) for an error that reached the command line."""
    from ..sources import ModelSourceError

    text = str(error).strip()
    first_line = text.splitlines()[0] if text else type(error).__name__
    if isinstance(error, UsageError):
        return EXIT_USAGE, first_line
    if isinstance(error, (ModelSourceError, FileNotFoundError, NotADirectoryError)):
        return EXIT_NOT_FOUND, first_line
    return EXIT_FAILURE, f"{type(error).__name__}: {first_line}"


__all__ = ["UsageError", "build_parser", "int_at_least", "main"]
