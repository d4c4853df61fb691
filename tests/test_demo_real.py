"""`llm-modules demo --real` (issue 12): the task builder, the systems' wiring on tiny models, and one smoke run on
the real weights with a handful of rows and steps (slow, skipped unless the models are fetched)."""

from __future__ import annotations

import json

import pytest
import torch

from llm_modules.data import conversation_turns, encode_conversation
from llm_modules.compare import answer_token_budget
from llm_modules.demo.real import REAL_LEARNING_RATES, default_real_settings, run_real_demo
from llm_modules.demo.real.task import (
    TASKS, Problem, draw_problems, first_number, make_split, native_answer, native_messages, stratos_row,
)
from llm_modules.evaluation import extract_solution, is_well_formed
from llm_modules.fetch import fetched_model



# ---- the task -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", list(TASKS))
def test_splits_share_no_question_and_answers_are_exact(task):
    train, held_out = make_split(task, 200, 100, seed=3)
    assert len(train) == 200 and len(held_out) == 100
    assert not {p.key for p in train} & {p.key for p in held_out}
    assert len({p.key for p in train}) == 200  # no question twice within a split either
    for problem in train + held_out:
        spec = TASKS[task]
        assert spec.a_range[0] <= problem.a <= spec.a_range[1] and spec.b_range[0] <= problem.b <= spec.b_range[1]
        assert problem.answer == eval(problem.expression)  # the expression is Python arithmetic: exact integers
        assert problem.answer >= 0
    assert make_split(task, 200, 100, seed=3) == (train, held_out)
    assert make_split(task, 200, 100, seed=4) != (train, held_out)


def test_commuted_questions_count_as_one():
    assert Problem("add3", 347, 589).key == Problem("add3", 589, 347).key
    assert Problem("sub3", 589, 347).key != Problem("sub3", 347, 589).key
    with pytest.raises(ValueError, match="distinct questions"):
        draw_problems("mul2x1", 721, __import__("random").Random(0))


def test_rows_are_stratos_rows_with_the_answer_as_solution(tiny_pair):
    from transformers import AutoTokenizer

    problem = Problem("add3", 347, 589)
    row = stratos_row(problem)
    system, turns = conversation_turns(row)
    assert system == row["system"] and [t["role"] for t in turns] == ["user", "assistant"]
    assert turns[0]["content"] == "What is 347 + 589?"
    assert turns[1]["content"] == ("<|begin_of_thought|> 347 + 589 = 936 <|end_of_thought|> "
                                   "<|begin_of_solution|> 936 <|end_of_solution|>")
    assert is_well_formed(turns[1]["content"]) and extract_solution(turns[1]["content"]) == "936"
    example = encode_conversation(row, AutoTokenizer.from_pretrained(tiny_pair[0]))
    assert example["labels"][-1] == example["input_ids"][-1]  # EOS learned
    assert native_messages(problem) == [{"role": "user", "content": "What is 347 + 589? Answer with just the number."}]


@pytest.mark.parametrize("reply, expected", [
    ("936", "936"), ("The answer is 1,036.", "1036"), ("347 + 589 = 1757", "1757"), ("347+589=936", "936"),
    ("347 + 589 is 22.", "22"), ("347 + 589 equals 936", "936"), ("To add 347 and 589 ...", "347"), ("no number", None),
])
def test_native_answer_skips_a_restated_question(reply, expected):
    assert native_answer(reply, Problem("add3", 347, 589)) == expected


def test_first_number():
    assert first_number("-12 apples") == "-12" and first_number("1,234,567") == "1234567" and first_number("x") is None


# ---- the systems, wired on tiny models ------------------------------------------------------------------------------


def tiny_settings(large: str, small: str):
    """The preset's settings, shrunk to tiny models: what `--real` does, in seconds."""
    settings = default_real_settings(quick=True, seed=0)
    settings.large, settings.small = large, small
    settings.n_train, settings.n_eval, settings.n_eval_train, settings.eval_batch_size = 8, 3, 2, 4
    settings.budget.max_epochs, settings.budget.logging_steps = 1, 1
    settings.options.combined_options.update(cross_attention_heads=4, adapter_dim=16)
    settings.options.native_max_new_tokens = 6
    return settings


def test_the_preset_is_compares_task_pair_and_systems_at_the_measured_settings():
    quick, full = default_real_settings(True, 3), default_real_settings(False, 3)
    for settings in (quick, full):
        assert settings.systems == ("small_zero_shot", "large_native", "small_sft", "combined")
        assert settings.task == "sub3" and settings.seeds == (3,) and settings.budget.seed == 3
        assert settings.val_fraction == 0 and not settings.measure_serving
        assert settings.learning_rates("combined") == (3e-4,) and settings.learning_rates("small_sft") == (1e-4,)
        assert settings.options.combined_options["head_init"] == "small"
    assert REAL_LEARNING_RATES == {"small_sft": (1e-4,), "combined": (3e-4,)}
    assert (quick.n_train, quick.n_eval, quick.budget.max_epochs, quick.budget.batch_size) == (32, 20, 10, 4)
    assert (full.n_train, full.n_eval, full.budget.max_epochs, full.budget.batch_size) == (64, 60, 8, 8)
    assert quick.options.combined_options["dropout"] == 0.0 and full.options.combined_options["dropout"] == 0.1
    assert quick.options.bridge_only_steps == 0.25 and full.options.bridge_only_steps == 0.0


def test_every_system_runs_and_reports_on_tiny_models(tiny_chat_pair, tmp_path, one_thread):
    results = run_real_demo(tmp_path / "out", seed=0, settings=tiny_settings(*tiny_chat_pair))
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert list(saved["systems"]) == ["small_zero_shot", "large_native", "small_sft", "combined"]
    for name, row in saved["systems"].items():
        assert row["n_eval"] == 3 and row["n_eval_train"] == 2
        assert 0 <= row["eval_exact_match"] <= 1 and 0 <= row["format_valid"] <= 1
        assert (row["trainable_params"] > 0) == (name in ("small_sft", "combined"))
        assert row["decode_seconds_per_token"] is None  # the preset measures no serving cost
        assert len((tmp_path / "out" / "predictions" / f"{name}.jsonl").read_text().splitlines()) == 3
    assert saved["systems"]["combined"]["feature_tokens"] > 0 and saved["systems"]["combined"]["lr"] == 3e-4
    assert saved["systems"]["small_sft"]["lr"] == 1e-4 and saved["n_validation"] == 0
    assert results["table"].count("\n| `") == 4
    for name in ("results.md", "accuracy.png", "loss_curves.png", "data/train.jsonl", "data/eval.jsonl",
                 "logs/combined.jsonl", "models/combined/config.json"):
        assert (tmp_path / "out" / name).is_file(), name
    held_out = [json.loads(line) for line in (tmp_path / "out" / "data" / "eval.jsonl").read_text().splitlines()]
    trained = [json.loads(line) for line in (tmp_path / "out" / "data" / "train.jsonl").read_text().splitlines()]
    assert not {r["conversations"][0]["value"] for r in held_out} & {r["conversations"][0]["value"] for r in trained}
    # The same rows as the demo drew before it became a preset of compare.
    train_problems, held_problems = make_split("sub3", 8, 3, 0)
    assert [r["conversations"][0]["value"] for r in trained] == [p.question for p in train_problems]
    assert [r["conversations"][0]["value"] for r in held_out] == [p.question for p in held_problems]


def test_the_combined_model_keeps_the_frozen_model_in_float32_and_frozen(tiny_chat_pair, tmp_path, one_thread):
    from pathlib import Path

    from llm_modules.compare.systems import Context, fit_combined
    from llm_modules.compare.tasks import builtin_task, plain_row
    from llm_modules.modeling import LLMModulesForCausalLM

    settings = tiny_settings(*tiny_chat_pair)
    rows = [plain_row(r) for r in builtin_task("add3", 4, 1, seed=0).train_rows]
    context = Context(Path(settings.large), Path(settings.small), rows, [], settings.budget, settings.options,
                      tmp_path / "work", tmp_path / "logs", progress=False)
    loaded = LLMModulesForCausalLM.from_large_and_small(settings.large, settings.small, cross_attention_heads=4)
    before = {k: v.clone() for k, v in loaded.large.state_dict().items()}
    fit = fit_combined(context, lr=3e-4)
    assert all(p.dtype == torch.float32 for p in fit.model.large.parameters())
    assert all(torch.equal(before[k], v) for k, v in fit.model.large.state_dict().items())
    manifest = next((tmp_path / "work").glob("features-combined/train/manifest.json"))
    assert json.loads(manifest.read_text())["dtype"] == "float16"
    assert fit.trainable_params == fit.model.parameter_summary()["trainable"] and fit.extra["feature_tokens"] > 0


# ---- real weights --------------------------------------------------------------------------------------------------


def test_answer_budget_fits_every_held_out_answer_in_each_real_tokenizer():
    """The trained systems generate at most `answer_token_budget` tokens: a cut answer has no solution marker and
    scores as wrong (SmolLM2 needs 50-54 tokens where Qwen needs 41-45)."""
    from transformers import AutoTokenizer

    train, held_out = make_split("sub3", 64, 60, 0)
    for name in ("qwen2.5-coder-1.5b-instruct", "smollm2-135m-instruct"):
        model = fetched_model(name)
        if model is None:
            pytest.skip(f"not fetched: {name} (llm-modules fetch NAME)")
        tokenizer = AutoTokenizer.from_pretrained(model.plain)
        longest = max(len(tokenizer(stratos_row(p)["conversations"][-1]["value"])["input_ids"]) for p in held_out)
        assert answer_token_budget(tokenizer, [stratos_row(p) for p in train]) >= longest + 1  # and the EOS token


@pytest.mark.slow
def test_real_weights_smoke(tmp_path):
    """Every system of `--real` on the real pair, 4 train rows, one step, 2 held-out questions: wiring, not accuracy."""
    found = {name: fetched_model(name) for name in ("qwen2.5-coder-1.5b-instruct", "smollm2-135m-instruct")}
    missing = [name for name, model in found.items() if model is None]
    if missing:
        pytest.skip(f"not fetched: {', '.join(missing)} (llm-modules fetch NAME)")
    settings = default_real_settings(quick=True, seed=0)
    settings.n_train, settings.n_eval, settings.n_eval_train, settings.eval_batch_size = 4, 2, 1, 2
    settings.budget.max_epochs, settings.budget.logging_steps = 1, 1
    results = run_real_demo(tmp_path / "out", settings=settings)
    assert set(results["systems"]) == {"small_zero_shot", "large_native", "small_sft", "combined"}
    assert results["systems"]["combined"]["trainable_params"] > 200_000_000
    assert results["systems"]["combined"]["feature_tokens"] > 4 * 40
