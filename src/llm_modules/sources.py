"""Where models come from: one rule for telling a local path from a hub id, and one error for "not a model".

Every entry point that takes a model name (`from_large_and_small`, `from_pretrained(..., large_model_name_or_path=)`,
the CLI's `--large/--small/--model/--large-model`) goes through `resolve_model_source`, so a mistyped path fails at
once with the same message instead of being sent to the hub, and local paths are recorded absolute.
"""

from __future__ import annotations

import os
from pathlib import Path

# Suffixes that only a file name has (a hub id never ends in them).
FILE_SUFFIXES = (".gguf", ".json", ".jsonl", ".parquet", ".safetensors", ".bin", ".yaml", ".yml")


class ModelSourceError(OSError):
    """A named model is missing, or what is there is not a model (no config.json, not a GGUF file)."""


def looks_like_path(name: str | os.PathLike) -> bool:
    """True when `name` can only be a local path: it exists, is absolute, starts with `.` or `~`, has a file suffix,
    or has more than one `/` (a hub id is `owner/name`, never deeper) or a backslash."""
    text = str(name)
    return (
        Path(text).expanduser().exists()
        or os.path.isabs(text)
        or text.startswith((".", "~"))
        or text.lower().endswith(FILE_SUFFIXES)
        or text.count("/") > 1
        or "\\" in text
    )


def resolve_model_source(name: str | os.PathLike, what: str = "model") -> str:
    """The absolute path of a local model (a dir with config.json, or a .gguf file), or `name` unchanged when it can
    only be a hub id. `what` names the argument in errors (e.g. `--large`).

    Raises `ModelSourceError` when `name` looks like a path (see `looks_like_path`) but is missing, or is a dir
    without config.json, or a file that is not GGUF.
    """
    text = str(name)
    if not looks_like_path(text):
        return text
    path = Path(text).expanduser()
    if not path.exists():
        raise ModelSourceError(f"{what} {text}: no such file or directory")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(
                f"{what} {text}: not a model directory (no config.json; expected a Hugging Face model dir, "
                f"a .gguf file or a hub id)"
            )
    elif path.suffix.lower() != ".gguf":
        raise ModelSourceError(f"{what} {text}: not a model (expected a model directory, a .gguf file or a hub id)")
    return str(path.resolve())
