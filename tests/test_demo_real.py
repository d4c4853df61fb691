"""`llm-modules demo --real` (issue 12): the task builder, the systems' wiring on tiny models, and one smoke run on
the real weights with a handful of rows and steps (slow, skipped unless the models are fetched)."""

from __future__ import annotations

import json

import pytest
import torch

from llm_modules.data import conversation_turns, encode_conversation
from llm_modules.demo.real import RealDemoSettings, run_real_demo
from llm_modules.demo.real.systems import RealTrainOptions, answer_token_budget, native_answer
from llm_modules.demo.real.task import (
    TASKS, Problem, draw_problems, first_number, make_split, native_messages, stratos_row,
)
from llm_modules.evaluation import extract_solution, is_well_formed
from llm_modules.fetch import fetched_model

CHAT_TEMPLATE = (
    "{% for m in messages %}<|endoftext|>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


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


@pytest.fixture(scope="module")
def tiny_chat_pair(tiny_dirs, tmp_path_factory):
    """(large, small) tiny dirs (Qwen2 and Llama, as the real pair) whose tokenizers have a chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("tiny-chat")
    dirs = []
    for name in ("qwen2", "llama"):
        tokenizer = AutoTokenizer.from_pretrained(tiny_dirs[name])
        tokenizer.chat_template = CHAT_TEMPLATE
        AutoModelForCausalLM.from_pretrained(tiny_dirs[name]).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        dirs.append(str(root / name))
    return dirs


def tiny_settings(large: str, small: str) -> RealDemoSettings:
    return RealDemoSettings(
        n_train=8, n_eval=3, n_eval_train=2, large=large, small=small, eval_batch_size=4, max_new_tokens=6,
        train=RealTrainOptions(epochs=1, batch_size=4, logging_steps=1,
                               model_options={"cross_attention_heads": 4, "adapter_dim": 16, "dropout": 0.0,
                                              "small_position_embeddings": "keep"}),
    )


def test_every_system_runs_and_reports_on_tiny_models(tiny_chat_pair, tmp_path, one_thread):
    results = run_real_demo(tmp_path / "out", seed=0, settings=tiny_settings(*tiny_chat_pair))
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert list(saved["systems"]) == ["small_zero_shot", "large_native", "small_only", "combined"]
    for name, row in saved["systems"].items():
        assert row["n_b"] == 3 and row["n_a"] == 2
        assert 0 <= row["split_b_exact_match"] <= 1 and 0 <= row["format_valid"] <= 1
        assert (row["trainable_params"] > 0) == (name in ("small_only", "combined"))
        assert len((tmp_path / "out" / "predictions" / f"{name}.jsonl").read_text().splitlines()) == 3
    assert saved["feature_cache"]["feature_tokens"] > 0
    assert results["table"].count("\n| `") == 4
    for name in ("results.md", "accuracy.png", "loss_curves.png", "data/train.jsonl", "data/eval.jsonl",
                 "logs/combined.jsonl", "models/combined/config.json"):
        assert (tmp_path / "out" / name).is_file(), name
    held_out = [json.loads(line) for line in (tmp_path / "out" / "data" / "eval.jsonl").read_text().splitlines()]
    trained = [json.loads(line) for line in (tmp_path / "out" / "data" / "train.jsonl").read_text().splitlines()]
    assert not {r["conversations"][0]["value"] for r in held_out} & {r["conversations"][0]["value"] for r in trained}


def test_the_combined_model_keeps_the_frozen_model_in_float32_and_frozen(tiny_chat_pair, tmp_path, one_thread):
    from llm_modules.demo.real import systems as S
    from llm_modules.demo.real.task import make_split

    settings = tiny_settings(*tiny_chat_pair)
    model = S.compose(settings.large, settings.small, settings.train)
    before = {k: v.clone() for k, v in model.large.state_dict().items()}
    train, _ = make_split("add3", 4, 1, seed=0)
    trained, features = S.combined(model, train, settings.train, tmp_path / "m", tmp_path / "f", tmp_path / "log.jsonl")
    assert all(p.dtype == torch.float32 for p in model.large.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.large.state_dict().items())
    assert json.loads((tmp_path / "f" / "train" / "manifest.json").read_text())["dtype"] == "float16"
    assert trained.trainable_params == model.parameter_summary()["trainable"] and features["feature_tokens"] > 0


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
        assert answer_token_budget(tokenizer, train) >= longest + 1  # and the end-of-sequence token


@pytest.mark.slow
def test_real_weights_smoke(tmp_path):
    """Every system of `--real` on the real pair, 4 train rows, one step, 2 held-out questions: wiring, not accuracy."""
    found = {name: fetched_model(name) for name in ("qwen2.5-coder-1.5b-instruct", "smollm2-135m-instruct")}
    missing = [name for name, model in found.items() if model is None]
    if missing:
        pytest.skip(f"not fetched: {', '.join(missing)} (llm-modules fetch NAME)")
    settings = RealDemoSettings(n_train=4, n_eval=2, n_eval_train=1, eval_batch_size=2, max_new_tokens=8,
                                train=RealTrainOptions(epochs=1, batch_size=4, logging_steps=1))
    results = run_real_demo(tmp_path / "out", settings=settings)
    assert set(results["systems"]) == {"small_zero_shot", "large_native", "small_only", "combined"}
    assert results["systems"]["combined"]["trainable_params"] > 200_000_000
    assert results["feature_cache"]["feature_tokens"] > 4 * 40
