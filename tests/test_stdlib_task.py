"""The `stdlib` built-in task (which standard-library module defines a name): the packaged table, the rule that wrote
it, the split, native scoring, and the task through `compare`."""

from __future__ import annotations

import importlib
import json
from collections import Counter

import pytest

from llm_modules.compare import CompareSettings, FitBudget, SystemOptions, run_compare, stdlib
from llm_modules.compare.tasks import BUILTIN_TASKS, builtin_task, reference_answer
from llm_modules.evaluation import answers_match, extract_solution, is_well_formed, task_prompt_and_reference


def test_the_packaged_table_asks_each_name_once_and_every_name_is_its_modules():
    table = stdlib.load_table()
    assert len(table) >= 150 and len({q.module for q in table}) >= 50
    assert len({q.name for q in table}) == len(table)
    assert max(Counter(q.module for q in table).values()) <= stdlib.PER_MODULE
    for question in table:
        assert hasattr(importlib.import_module(question.module), question.name), question
    # Names people use, not the corners of an API (the first table asked `spawnvpe`).
    assert {"isdir", "namedtuple", "deepcopy"} <= {q.name for q in table} and "spawnvpe" not in {q.name for q in table}


def test_usage_is_counted_in_files_through_imports_aliases_and_from_imports(tmp_path):
    (tmp_path / "a.py").write_text("import os\nimport itertools as it\nos.path.isdir('x')\nos.getcwd()\n"
                                   "os.getcwd()\nit.groupby([])\n")
    (tmp_path / "b.py").write_text("from os.path import isdir, join\nimport os.path\nos.path.isdir('y')\n")
    (tmp_path / "itertools.py").write_text("import itertools\nitertools.groupby([])\n")  # the module itself
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "t.py").write_text("import os\nos.getcwd()\n")  # a test suite is not usage
    (tmp_path / "broken.py").write_text("def (:\n")
    counts = stdlib.usage_counts(["os", "os.path", "itertools"], root=tmp_path)
    assert counts == {("os.path", "isdir"): 2, ("os", "getcwd"): 1, ("itertools", "groupby"): 1,
                      ("os.path", "join"): 1, ("os", "path"): 2}


def test_the_rule_leaves_out_names_with_two_answers_and_names_nobody_uses():
    modules = ["json", "pickle", "itertools", "hmac", "secrets"]
    used = {(m, n): 5 for m in modules for n in ("dumps", "loads", "compare_digest", "JSONDecoder", "groupby",
                                                 "chain", "token_hex")}
    used["itertools", "chain"] = 9
    table = stdlib.collect_names(modules, per_module=10, min_uses=2, uses={**used, ("itertools", "islice"): 1})
    names = {q.name: q.module for q in table}
    assert "dumps" not in names and "loads" not in names  # json's and pickle's: different objects, one name
    assert "compare_digest" not in names  # hmac's and secrets': the same object under two popular modules
    assert names == {"JSONDecoder": "json", "chain": "itertools", "groupby": "itertools", "token_hex": "secrets"}
    assert [q.name for q in table if q.module == "itertools"] == ["chain", "groupby"]  # the most used first


def test_split_is_seeded_disjoint_and_refuses_more_than_the_table():
    train, held = stdlib.make_split(30, 60, seed=0)
    assert len(train) == 30 and len(held) == 60 and not {q.name for q in train} & {q.name for q in held}
    assert stdlib.make_split(30, 60, seed=0) == (train, held)
    assert stdlib.make_split(30, 60, seed=1)[1] != held
    with pytest.raises(ValueError, match="task stdlib has 2.. questions; asked for 500 train \\+ 500 held-out"):
        stdlib.make_split(500, 500, seed=0)


@pytest.mark.parametrize("reply, expected", [
    ("The `isdir` function is in the `os.path` module.", "os.path"),
    ("os.path", "os.path"),
    ("You can call os.path.isdir(p).", "os.path"),
    ("`collections.abc`", "collections.abc"),
    ("It is in itertools.", "itertools"),
    ("mypackage.tools", "mypackage.tools"),  # no module of the table: the first word, scored as it is
    ("", None),
])
def test_native_answer_is_the_first_module_the_reply_names(reply, expected):
    assert stdlib.native_answer(reply, stdlib.Question("isdir", "os.path")) == expected


def test_rows_are_stratos_rows_whose_solution_is_the_module():
    assert "stdlib" in BUILTIN_TASKS
    task = builtin_task("stdlib", 8, 4, seed=3)
    assert len(task.train_rows) == 8 and len(task.eval_rows) == 4
    for row in task.train_rows + task.eval_rows:
        prompt, reference = task_prompt_and_reference(row)
        question = row["_question"]
        assert f"`{question.name}`" in prompt and is_well_formed(reference)
        assert extract_solution(reference) == question.module == reference_answer(row)
        native = task.native_answer(f"It is `{question.module}`.", row)
        assert answers_match(native, reference_answer(row))
        assert task.native_messages(row)[0]["content"].endswith(stdlib.NATIVE_INSTRUCTION)


def test_compare_runs_the_stdlib_task(tiny_chat_pair, tmp_path, one_thread):
    settings = CompareSettings(
        large=tiny_chat_pair[0], small=tiny_chat_pair[1], task="stdlib", n_train=6, n_eval=3, n_eval_train=2,
        val_fraction=0.34, systems=("small_zero_shot", "small_sft"), eval_batch_size=4, decode_context=16,
        decode_tokens=4, budget=FitBudget(max_epochs=1, batch_size=4, learning_rates=(1e-3,), logging_steps=1),
        options=SystemOptions(native_max_new_tokens=6))
    results = run_compare(settings, tmp_path / "out", progress=False)
    assert results["task"]["name"] == "stdlib" and results["n_eval"] == 3
    eval_rows = [json.loads(line) for line in (tmp_path / "out" / "seed-0" / "data" / "eval.jsonl").open()]
    assert all("standard library" in row["conversations"][0]["value"] for row in eval_rows)
    assert results["systems"]["small_sft"]["train_seconds"]["mean"] > 0
