"""What every command shares: the one-line error for bad input and argparse types."""

from __future__ import annotations

from collections.abc import Callable


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


def int_at_least(minimum: int) -> Callable[[str], int]:
    """argparse type: an integer >= `minimum` (argparse then names the flag and exits 2 on anything else)."""
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise ValueError
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


# Exit codes, the same in every command (README, "Exit codes").
EXIT_FAILURE = 1  # something went wrong while running (a bug, a crash, out of memory)
EXIT_USAGE = 2  # bad input: flags, values, config files, data rows under --strict (argparse uses 2 as well)
EXIT_NOT_FOUND = 3  # a named file, directory or model is missing, or is not what it should be (not a model dir)
EXIT_INTERRUPTED = 130  # Ctrl-C
