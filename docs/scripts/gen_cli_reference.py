"""Appends the command-line reference to cli.md at build time (mkdocs-gen-files): the `--help` text of `llm-modules`
and of every command and subcommand, straight from `llm_modules.cli.build_parser()`, so the page cannot drift from
the parsers. Run by `mkdocs build` / `mkdocs serve` (mkdocs.yml, plugins: gen-files); it writes nothing to disk."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import mkdocs_gen_files

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))  # the checkout's package, installed or not

# The same text on every machine: argparse wraps to $COLUMNS, and Python 3.14's argparse may colour its help.
os.environ["COLUMNS"] = "100"
os.environ["NO_COLOR"] = "1"
os.environ["PYTHON_COLORS"] = "0"

from llm_modules.cli import build_parser  # noqa: E402


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The parser's subcommands in the order they were added ({} for a leaf)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def sections(root: argparse.ArgumentParser):
    """(heading level, prog, help text): `llm-modules`, then each command, each followed by its subcommands."""
    yield 3, root.prog, root.format_help()
    for command in subcommands(root).values():
        yield 3, command.prog, command.format_help()
        for sub in subcommands(command).values():
            yield 4, sub.prog, sub.format_help()


with mkdocs_gen_files.open("cli.md", "a") as page:
    page.write(
        "\n## Reference\n\n"
        "Generated when the site is built, from the parsers themselves (`llm_modules.cli.build_parser()`): what "
        "follows is exactly what `--help` prints.\n"
    )
    for level, prog, text in sections(build_parser()):
        page.write(f"\n{'#' * level} `{prog}`\n\n```text\n{text.rstrip()}\n```\n")
