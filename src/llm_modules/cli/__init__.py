"""The `llm-modules` command: parse, call the library, print. Each command registers itself with one function
(one module per command family below); torch and transformers are imported only when a command runs."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from .. import __version__
from .bench import add_bench
from .compare import add_compare
from .common import (
    EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_NOT_FOUND, EXIT_USAGE, HelpFormatter, Parser, UsageError, int_at_least,
    library_messages,
)
from .demo import add_demo
from .eval import add_eval
from .fetch import add_fetch
from .generate import add_chat, add_generate
from .info import add_info, add_smoke_test
from .serve import add_serve
from .train import add_train

# In the order a newcomer meets them: see it work, train, use, measure, inspect.
COMMANDS: list[Callable] = [
    add_demo, add_train, add_eval, add_generate, add_chat, add_serve, add_compare, add_info, add_bench, add_smoke_test,
    add_fetch,
]

DESCRIPTION = """\
Make a small language model smarter by wiring it to a frozen large one (LLM
Modules, arXiv 2502.08213): the large model stays frozen, and a small model learns
to read its hidden states through a trainable cross-attention bridge.

Start here:
  llm-modules demo --quick          see it work, offline on a CPU, in a few minutes
  llm-modules info                  the paper's pair (Qwen2-1.5B + GPT-Neo-125M) in numbers
  llm-modules train --large L --small S --output-dir OUT
                                    train the bridge and the small model
  llm-modules chat --model OUT      talk to what you trained (also: generate, serve, eval)
  llm-modules compare               should I use this? LLM Modules beside LoRA and
                                    distillation on your pair and rows, with the bill

`llm-modules COMMAND --help` shows a command's options and their defaults."""

EPILOG = "exit codes: 0 ok, 1 failure, 2 bad input, 3 missing or not a model, 130 interrupted (Ctrl-C)"


class RawDescriptionFormatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """The top-level help keeps the description's line breaks (its command examples); options as everywhere else."""


class VersionAction(argparse.Action):
    """--version: this package's version, and torch's and transformers' read from their metadata (importing them
    would cost seconds). argparse's own "version" action would need the text before it knows the flag was given."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        print(version_line())
        parser.exit()


def version_line() -> str:
    """"llm-modules 0.1.0 (torch 2.13.0, transformers 5.24.0)"; a dependency that is not installed is left out."""
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for package in ("torch", "transformers"):
        try:
            found.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            pass
    return f"llm-modules {__version__}" + (f" ({', '.join(found)})" if found else "")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="llm-modules", description=DESCRIPTION, epilog=EPILOG, formatter_class=RawDescriptionFormatter
    )
    parser.add_argument("--version", action=VersionAction, help="print the versions of llm-modules, torch, transformers")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; return its exit code (see `common`: 0 ok, 1 failure, 2 bad input, 3 not found, 130 Ctrl-C)."""
    args = build_parser().parse_args(argv)
    try:
        with library_messages():
            args.handler(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # stdout was closed early (`llm-modules info | head -1`): nothing left to say
        # Python's recipe (docs of `signal`, "Note on SIGPIPE"): no second error when the interpreter flushes stdout.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE
    except Exception as error:  # one line for users; --debug shows the traceback
        if args.debug:
            raise
        code, message = describe_error(error)
        print(f"llm-modules {args.command}: error: {message}", file=sys.stderr)
        return code
    return 0


def describe_error(error: Exception) -> tuple[int, str]:
    """(exit code, one-line message) for an error that reached the command line."""
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    from ..sources import ModelSourceError, NoGGUFFileError

    text = str(error).strip()
    first_line = text.splitlines()[0] if text else "an unexpected error with no message"
    # Bad data files are bad input in every command that reads rows (train, eval). The data module is looked up, not
    # imported: when it never loaded, the error cannot be one of its own (and importing it might be what failed).
    data = sys.modules.get("llm_modules.data")
    bad_data = (data.DataFileError, data.EmptyDatasetError, data.InvalidRowError) if data else ()
    # --large-quantization on a frozen model with layers it cannot quantize: bad input too.
    quantization = sys.modules.get("llm_modules.quantization")
    bad_data += (quantization.UnsupportedLayerError,) if quantization else ()
    bad_data += (NoGGUFFileError,)  # --large-quantization gguf for a frozen model without a GGUF file
    if isinstance(error, (UsageError, *bad_data)):
        return EXIT_USAGE, first_line
    missing = (ModelSourceError, FileNotFoundError, NotADirectoryError, EntryNotFoundError, RepositoryNotFoundError,
               RevisionNotFoundError)
    # transformers re-raises the hub's "no such repo/file" (and "offline, not cached") as a plain OSError from it.
    if isinstance(error, missing) or isinstance(error.__cause__, missing):
        return EXIT_NOT_FOUND, first_line
    # No class names: they mean nothing to a user, and --debug gives the traceback to whoever needs it.
    return EXIT_FAILURE, f"{first_line} (--debug shows the traceback)"


__all__ = ["UsageError", "build_parser", "describe_error", "int_at_least", "main", "version_line"]
