"""What every command shares: the parser class (defaults shown in --help), the one-line error for bad input, argparse
types, exit codes, where library messages go, and reading a model's config from a --model style argument.

Nothing here imports torch or transformers at module level: `--help` and flag typos must stay instant.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import difflib
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


# Exit codes, the same in every command (docs/cli.md, "Exit codes").
EXIT_FAILURE = 1  # something went wrong while running (a bug, a crash, out of memory)
EXIT_USAGE = 2  # bad input: flags, values, config files, data rows under --strict (argparse uses 2 as well)
EXIT_NOT_FOUND = 3  # a named file, directory or model is missing, or is not what it should be (not a model dir)
EXIT_INTERRUPTED = 130  # Ctrl-C


def default_text(action: argparse.Action) -> str | None:
    """An option's default as the user would type it, or None when there is nothing worth showing (no default, a
    flag's False, a default that depends on something else and is described in the help already)."""
    default = action.default
    if not action.option_strings or default is None or default is argparse.SUPPRESS or isinstance(default, bool):
        return None
    if "default" in (action.help or ""):
        return None
    if isinstance(default, (list, tuple)):
        return " ".join(map(str, default))
    return str(default)


class HelpFormatter(argparse.HelpFormatter):
    """argparse's help plus "(default: X)" after every option that has a default worth showing.

    Not `argparse.ArgumentDefaultsHelpFormatter`: it prints "(default: None)" and "(default: False)", and nothing for
    options without help text.
    """

    def _format_action(self, action: argparse.Action) -> str:
        default = default_text(action)
        if default is not None:
            action = copy.copy(action)  # the parser's own action keeps its help
            action.help = f"{action.help or ''} (default: {default.replace('%', '%%')})".strip()
        return super()._format_action(action)


class Parser(argparse.ArgumentParser):
    """The parser of `llm-modules` and of every command under it (subparsers inherit the class): defaults in --help,
    errors in one line, and a mistyped flag named with the closest one."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        """One line, as every other error of a command, instead of argparse's usage block (`--help` shows it); a
        mistyped choice (a command name, a dtype) gets the closest one."""
        if found := re.match(r"argument .*: invalid choice: '(.*)' \(choose from (.*)\)$", message):
            choices = [choice.strip(" '") for choice in found.group(2).split(",")]
            if close := difflib.get_close_matches(found.group(1), choices, n=1, cutoff=0.6):
                message += f" (did you mean {close[0]}?)"
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:
        # A command's own parser (no subcommands under it) names an unknown flag before argparse would: argparse
        # first reports a required flag as missing (`--modle X` -> "--model is required"), and leaves the unknown
        # flag to the top-level parser, whose error shows the top-level usage. Python 3.14's `suggest_on_error` only
        # covers choices.
        if self._subparsers is None:
            self.check_flags(sys.argv[1:] if args is None else list(args))
        return super().parse_known_args(args, namespace)

    def check_flags(self, args: list[str]) -> None:
        known = [name for name in self._option_string_actions if name.startswith("--")]
        for token in args:
            if token == "--":
                break
            name = token.split("=", 1)[0]
            if not name.startswith("--") or any(option.startswith(name) for option in known):  # or an abbreviation
                continue
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
            self.error(f"unrecognized argument {name}" + (f" (did you mean {close[0]}?)" if close else ""))


def add_large_model_argument(parser: argparse.ArgumentParser) -> None:
    """`--large-model`: where a combined model's frozen source is now, if it moved since training; repeated, in the
    model's order, for a model with several sources."""
    parser.add_argument(
        "--large-model", action="append", metavar="PATH",
        help="where the frozen large model is now, if it moved since training (repeat it, in order, for each source "
        "of a model with several)",
    )


def large_model_paths(args: argparse.Namespace) -> str | list[str] | None:
    """`--large-model` as `from_pretrained(large_model_name_or_path=)` takes it: None, one path, or one per source."""
    paths = args.large_model or []
    return None if not paths else paths[0] if len(paths) == 1 else paths


def add_frozen_precision_arguments(parser: argparse.ArgumentParser) -> None:
    """`--large-dtype`, `--large-quantization` and `--trained-quantization`: the precision of a combined model's
    frozen and trained parts at load time."""
    parser.add_argument(
        "--large-dtype", choices=["float32", "bfloat16", "float16"],
        help="the frozen model of a combined model (default: bfloat16 on a GPU, float32 on CPU)",
    )
    parser.add_argument(
        "--large-quantization", choices=["int8", "fp16", "gguf"],
        help="the frozen model on the CPU: int8 linear layers (outlier features in float32, as LLM.int8(): "
        "docs/performance.md), float16 weights (exact), or gguf: run by llama.cpp on its GGUF file's own blocks "
        "(fastest; needs the llama-cpp extra; the frozen model a .gguf file or a fetched model)",
    )
    parser.add_argument(
        "--trained-quantization", choices=["int8", "gguf", "gguf-q4_0"],
        help="the trained parts on the CPU, for inference: int8 (bridge, small model, head in int8 weights) or gguf "
        "(the small model's blocks run by llama.cpp in Q8_0, bridge and head in int8; a Llama-architecture small "
        "model; needs the llama-cpp extra) or gguf-q4_0 (the same, Q4_0 blocks: faster, less exact) "
        "(docs/performance.md)",
    )


def int_at_least(minimum: int) -> Callable[[str], int]:
    """argparse type: an integer >= `minimum` (argparse then names the flag and exits 2 on anything else)."""
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise ValueError
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


@contextlib.contextmanager
def library_messages() -> Iterator[None]:
    """While a command runs, this library's messages (INFO and up: data reports, "loading the best model", the demo's
    phase results) go to stderr as plain lines, written above any progress bar instead of glued onto it.

    When stderr is not a terminal (a log file, CI) there are no progress bars, only those lines: a bar redraws itself
    in place, which a file keeps as every redraw. tqdm, huggingface_hub (whose switch transformers follows) and
    datasets read these variables when first imported, which a command's work does after this point."""
    variables = ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS")
    saved = {variable: os.environ.get(variable) for variable in variables}
    if not sys.stderr.isatty():
        for variable in variables:
            os.environ.setdefault(variable, "1")
    from tqdm.contrib.logging import logging_redirect_tqdm

    logger = logging.getLogger("llm_modules")
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        # logging_redirect_tqdm gives the logger a handler that writes with tqdm.write, keeping our format.
        with logging_redirect_tqdm(loggers=[logger]):
            logger.handlers[-1].setFormatter(logging.Formatter("%(message)s"))
            yield
    finally:
        logger.setLevel(level)
        # A command run in-process (tests, notebooks) leaves the environment as it found it: what runs later, or
        # in a subprocess started later, gets its progress bars back.
        for variable, value in saved.items():
            if value is None:
                os.environ.pop(variable, None)
            else:
                os.environ[variable] = value


def read_model_config(
    name: str, what: str, trust_remote_code: bool = False, config_file: bool = False
) -> tuple[str, Any]:
    """(source, config) of the model `name` names: `sources.resolve_model_source` (the absolute path of a local model,
    or a hub id) and its transformers config. A missing path, or one that is not a model, fails here with the message
    every command uses (`ModelSourceError`, exit code 3); `what` names the argument (e.g. `--model`). With
    `config_file`, a config's .json file is accepted as well."""
    from pathlib import Path

    from .. import modeling  # noqa: F401  (registers model_type "llm_modules" with AutoConfig)
    from ..sources import ModelSourceError, load_config, resolve_model_source

    path = Path(name).expanduser()
    if config_file and path.suffix.lower() == ".json" and path.is_file():
        source = str(path.resolve())
    else:
        source = resolve_model_source(name, what)
    try:
        return source, load_config(source, trust_remote_code=trust_remote_code)
    except ValueError as error:  # a config without a model_type transformers knows
        raise ModelSourceError(f"{what} {name}: not a model transformers knows ({str(error).splitlines()[0]})") from error
