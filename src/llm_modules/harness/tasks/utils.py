"""Documents and filters of the shipped lm-eval tasks (`!function utils.NAME` in the YAMLs next to this file).

Each document is one Stratos row as `llm-modules eval` asks it: `prompt` (`evaluation.task_prompt_and_reference`'s
prompt: the row's system prompt and turns in the training layout, then an open assistant turn) and `reference` (the
row's solution section). Settings come from lm-eval's `--metadata` JSON (e.g. `{"path": "rows.jsonl"}`).
"""

from __future__ import annotations

import random

import datasets


def _stratos_documents(rows) -> dict:
    from llm_modules.evaluation import extract_solution, has_solution, task_prompt_and_reference

    documents = []
    for row in rows:
        if not has_solution(row):
            continue  # `llm-modules eval` scores these rows only
        prompt, reference = task_prompt_and_reference(row)
        documents.append({"prompt": prompt, "reference": extract_solution(reference)})
    if not documents:
        raise ValueError("no row has a <|begin_of_solution|> section to score")
    return {"test": datasets.Dataset.from_list(documents)}


def stratos_file(path: str | None = None, limit: int | None = None, split: str = "train", **_) -> dict:
    """The rows of a Stratos file, dir or hub dataset (`llm-modules eval --dataset`), the first `limit` of them."""
    from llm_modules.data import load_rows
    from llm_modules.evaluation import first_rows

    if not path:
        raise ValueError('llm_modules_stratos needs the rows: --metadata \'{"path": "rows.jsonl"}\'')
    return _stratos_documents(first_rows(load_rows(path, split=split), limit))


def builtin(task: str, n_train: int = 64, n_eval: int = 60, seed: int = 0, **_) -> dict:
    """The held-out rows `llm-modules compare --task TASK` asks for the same --n-train, --n-eval and seed."""
    from llm_modules.compare.tasks import builtin_task

    return _stratos_documents(builtin_task(task, int(n_train), int(n_eval), int(seed)).eval_rows)


def sub3(**kwargs) -> dict:
    return builtin("sub3", **kwargs)


def add3(**kwargs) -> dict:
    return builtin("add3", **kwargs)


def mul2x1(**kwargs) -> dict:
    return builtin("mul2x1", **kwargs)


def mul2x2(**kwargs) -> dict:
    return builtin("mul2x2", **kwargs)


def gsm(n_train: int = 64, n_eval: int = 0, **kwargs) -> dict:
    """The 50 held-out real GSM8K test problems of `compare --task gsm` (their templates never trained on), and
    `n_eval` held-out generated ones (none by default)."""
    return builtin("gsm", n_train=n_train, n_eval=n_eval, **kwargs)


def stdlib(**kwargs) -> dict:
    """Which standard-library module defines a name: the held-out names of `compare --task stdlib`."""
    return builtin("stdlib", **kwargs)


def arithmetic_problems(count: int = 2000, seed: int = 0) -> list[dict]:
    """lm-eval's `arithmetic_3ds` layout, generated here: `Question: What is 512 minus 347?\\nAnswer:` and the
    completion ` 165` (3-digit minus 3-digit, negative results too, as in GPT-3's arithmetic set)."""
    rng = random.Random(f"llm-modules arithmetic_3ds {seed}")
    problems = []
    for _ in range(count):
        a, b = rng.randint(100, 999), rng.randint(100, 999)
        problems.append({"context": f"Question: What is {a} minus {b}?\nAnswer:", "completion": f" {a - b}"})
    return problems


def arithmetic_3ds(count: int = 2000, seed: int = 0, **_) -> dict:
    return {"validation": datasets.Dataset.from_list(arithmetic_problems(int(count), int(seed)))}


def solution_filter(responses, documents):
    """Strict: the answer in each reply's solution section, normalised as `llm-modules eval` compares answers
    (`evaluation.normalize_answer`); lm-eval has already cut the reply at the `<|end_of_solution|>` stop string, so
    the section is read up to the reply's end. `[invalid]` without a section."""
    from llm_modules.evaluation import END_SOLUTION, extract_solution, normalize_answer

    out = []
    for replies in responses:
        answers = []
        for reply in replies:
            answer = extract_solution(reply if END_SOLUTION in reply else reply + END_SOLUTION)
            answers.append(normalize_answer(answer) if answer is not None else "[invalid]")
        out.append(answers)
    return out


def flexible_filter(responses, documents):
    """Flexible: the last number of each reply (lm-eval's gsm8k `flexible-extract`), normalised."""
    from llm_modules.compare.gsm import last_number
    from llm_modules.evaluation import normalize_answer

    return [[normalize_answer(n) if (n := last_number(reply)) is not None else "[invalid]" for reply in replies]
            for replies in responses]


def normalized_reference(document: dict) -> str:
    from llm_modules.evaluation import normalize_answer

    return normalize_answer(document["reference"])
