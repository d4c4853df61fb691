"""Answer extraction, normalisation, exact match, validation loss and `llm-modules eval`, on tiny local models."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from llm_modules.cli import main
from llm_modules.data import build_dataset
from llm_modules.evaluation import (
    answers_match,
    evaluate_answers,
    extract_solution,
    generate_texts,
    is_well_formed,
    last_boxed,
    normalize_answer,
    task_prompt_and_reference,
    validation_loss,
)

RESPONSE = (
    "<|begin_of_thought|> 2 + 3 is 5, and \\boxed{4} was wrong. <|end_of_thought|> "
    "<|begin_of_solution|> The sum is \\boxed{\\frac{10}{2}} so \\boxed{5}. <|end_of_solution|>"
)


def stratos_row(question: str, answer: str) -> dict:
    return {"system": "Be brief.", "conversations": [{"from": "user", "value": question}, {"from": "assistant", "value": answer}]}


def test_extract_solution_takes_last_boxed_inside_the_solution():
    assert extract_solution(RESPONSE) == "5"
    assert extract_solution("<|begin_of_solution|> Lisbon. <|end_of_solution|>") == "Lisbon."
    assert last_boxed("x \\boxed{\\frac{1}{2}} y") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{unclosed") is None


@pytest.mark.parametrize("text", [
    "no markers at all",
    "<|begin_of_solution|> 5",  # unclosed: the generation ran out of tokens
    "<|end_of_solution|> 5 <|begin_of_solution|>",  # closed before it opens
])
def test_extract_solution_none_without_a_closed_solution(text):
    assert extract_solution(text) is None


@pytest.mark.parametrize("prediction, reference", [
    (" 42. ", "42"),
    ("$\\dfrac{1}{2}$", "\\frac{1}{2}"),
    ("1,000", "1000"),
    ("5.0", "5"),
    ("\\text{Lisbon}", "lisbon"),
    ("x =  \\, 3", "x = 3"),
])
def test_normalised_forms_match(prediction, reference):
    assert answers_match(prediction, reference)


@pytest.mark.parametrize("prediction, reference", [("41", "42"), ("0.5", "5"), ("Oslo", "Lisbon"), (None, "5")])
def test_different_answers_do_not_match(prediction, reference):
    assert not answers_match(prediction, reference)


def test_normalize_keeps_decimals():
    assert normalize_answer("0.50") == "0.5"
    assert normalize_answer("-3.25") == "-3.25"


def test_well_formed_needs_each_marker_once_in_order():
    assert is_well_formed(RESPONSE)
    assert not is_well_formed("<|begin_of_solution|> 5 <|end_of_solution|>")  # no thought
    assert not is_well_formed(RESPONSE.replace("<|end_of_solution|>", ""))
    assert not is_well_formed("<|end_of_thought|> <|begin_of_thought|> <|begin_of_solution|> 5 <|end_of_solution|>")
    assert not is_well_formed(RESPONSE + " <|begin_of_solution|> 6 <|end_of_solution|>")


class ScriptedModel(torch.nn.Module):
    """Generates a fixed continuation per prompt: tests the scoring path without a trained model."""

    def __init__(self, tokenizer, continuations: dict[str, str]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer, self.continuations = tokenizer, continuations

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            prompt = self.tokenizer.decode(ids[mask.bool()])
            rows.append(self.tokenizer(self.continuations[prompt], add_special_tokens=False)["input_ids"][:max_new_tokens])
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        new = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        return torch.cat([input_ids, new], dim=1)


def test_evaluate_answers_scores_extracted_solutions(tiny_dirs):
    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["qwen2"])
    rows = [
        stratos_row("one?", "<|begin_of_thought|> a <|end_of_thought|> <|begin_of_solution|> \\boxed{1} <|end_of_solution|>"),
        stratos_row("two?", "<|begin_of_thought|> b <|end_of_thought|> <|begin_of_solution|> 2 <|end_of_solution|>"),
        stratos_row("three?", "<|begin_of_thought|> c <|end_of_thought|> <|begin_of_solution|> 3 <|end_of_solution|>"),
    ]
    prompts = [task_prompt_and_reference(row)[0] for row in rows]
    continuations = {
        prompts[0]: "<|begin_of_thought|> x <|end_of_thought|> <|begin_of_solution|> 1.0 <|end_of_solution|> junk after",
        prompts[1]: "<|begin_of_solution|> \\boxed{2} <|end_of_solution|>",  # right answer, no thought section
        prompts[2]: "<|begin_of_thought|> y <|end_of_thought|> <|begin_of_solution|> 4 <|end_of_solution|>",
    }
    result = evaluate_answers(ScriptedModel(tokenizer, continuations), tokenizer, rows, max_new_tokens=64, batch_size=2)
    assert result.n == 3
    assert [p["correct"] for p in result.predictions] == [True, True, False]
    assert result.exact_match == pytest.approx(2 / 3)
    assert result.format_valid == pytest.approx(2 / 3)
    assert result.predictions[0]["output"].endswith("<|end_of_solution|>")  # cut after the stop string


def test_generated_texts_drop_control_tokens_only():
    """The answer text keeps the Stratos markers and other additional tokens, and drops EOS, padding and the chat
    template's turn markers (llm_modules.generation.decode_answer, as generate, chat and the server)."""
    from conftest import CORPUS

    from llm_modules.tiny_models import train_tokenizer

    tokenizer = train_tokenizer(CORPUS, vocab_size=320, extra_tokens=["<|im_start|>", "<|im_end|>", "<|tool|>"])
    tokenizer.chat_template = "{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}"
    answer = "<|begin_of_solution|> 2 <|end_of_solution|>"
    continuations = {"one": f"{answer}<|im_end|><|endoftext|>", "two": f"<|tool|>{answer}"}  # "two" gets padded
    texts = generate_texts(ScriptedModel(tokenizer, continuations), tokenizer, ["one", "two"], stop_strings=None)
    assert texts == [answer, f"<|tool|>{answer}"]


@pytest.mark.parametrize("kind", ["plain", "combined"])
def test_batched_left_padded_generation_equals_one_by_one(kind, tiny_dirs, tiny_model):
    if kind == "plain":
        model = AutoModelForCausalLM.from_pretrained(tiny_dirs["qwen2"]).eval()
        tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["qwen2"])
    else:
        model, tokenizer = tiny_model, tiny_model.tokenizer
    prompts = ["The quick brown fox", "User: what is 3 plus 4? Assistant:", "lazy"]
    batched = generate_texts(model, tokenizer, prompts, max_new_tokens=8, batch_size=3, stop_strings=None)
    single = [generate_texts(model, tokenizer, [p], max_new_tokens=8, batch_size=1, stop_strings=None)[0] for p in prompts]
    assert batched == single
    assert tokenizer.padding_side == "right"  # restored


def manual_loss(model, dataset) -> float:
    total, count = 0.0, 0
    for example in dataset:
        ids = torch.tensor([example["input_ids"]])
        labels = torch.tensor(example["labels"])[1:]
        logits = model(input_ids=ids).logits[0, :-1]
        keep = labels != -100
        total += F.cross_entropy(logits[keep].float(), labels[keep], reduction="sum").item()
        count += int(keep.sum())
    return total / count


@pytest.mark.parametrize("kind", ["plain", "combined"])
def test_validation_loss_is_the_token_weighted_mean(kind, tiny_dirs, tiny_model):
    if kind == "plain":
        model = AutoModelForCausalLM.from_pretrained(tiny_dirs["qwen2"]).eval()
        tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["qwen2"])
    else:
        model, tokenizer = tiny_model, tiny_model.tokenizer
    rows = [stratos_row(f"what is {i} plus {i}?", "The answer " * (1 + 3 * i) + str(2 * i)) for i in range(5)]
    dataset, _ = build_dataset(rows, tokenizer)
    expected = manual_loss(model, dataset)
    for batch_size in (1, 3):  # rows of different lengths: a mean of batch means would differ
        measured = validation_loss(model, dataset, tokenizer.pad_token_id, batch_size=batch_size)
        assert measured["loss"] == pytest.approx(expected, rel=1e-4)
        assert measured["perplexity"] == pytest.approx(math.exp(expected), rel=1e-4)


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_eval_command_on_combined_and_plain_models(tiny_dirs, tiny_model, tmp_path, capsys):
    tiny_model.save_pretrained(tmp_path / "combined")
    rows = [
        stratos_row("what is 1 plus 2?", "<|begin_of_thought|> 1 + 2 <|end_of_thought|> <|begin_of_solution|> \\boxed{3} <|end_of_solution|>"),
        stratos_row("what is 2 plus 2?", "<|begin_of_thought|> 2 + 2 <|end_of_thought|> <|begin_of_solution|> \\boxed{4} <|end_of_solution|>"),
        {"system": "s", "conversations": []},  # invalid: skipped and counted
    ]
    data = write_rows(tmp_path / "rows.jsonl", rows)
    for model in (tmp_path / "combined", tiny_dirs["qwen2"]):
        out = tmp_path / f"{model.name}.json"
        code = main(["eval", "--model", str(model), "--dataset", str(data), "--max-new-tokens", "6", "--json",
                     "--output", str(out)])
        assert code == 0
        summary = json.loads(capsys.readouterr().out)
        assert summary["rows"] == 3 and summary["invalid_rows"] == 1
        assert summary["validation_loss"] > 0 and summary["validation_perplexity"] > 1
        assert summary["answers"]["n"] == 2 and 0 <= summary["answers"]["exact_match"] <= 1
        assert len(json.loads(out.read_text())["answers"]["predictions"]) == 2

    code = main(["eval", "--model", str(tmp_path / "combined"), "--dataset", str(data), "--limit", "1", "--no-generate"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "1 rows" in printed and "perplexity" in printed and "no answer accuracy" not in printed


def test_eval_command_reports_bad_input(tmp_path, tiny_dirs, capsys):
    assert main(["eval", "--model", str(tiny_dirs["qwen2"]), "--dataset", str(tmp_path / "missing.jsonl")]) == 3
    assert "missing.jsonl: no such file or directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # argparse rejects it before anything loads
        main(["eval", "--model", str(tmp_path / "nowhere"), "--dataset", "x.jsonl", "--limit", "0"])
    assert exit_info.value.code == 2 and "--limit" in capsys.readouterr().err
    data = write_rows(tmp_path / "rows.jsonl", [stratos_row("q", "a")])
    assert main(["eval", "--model", str(tmp_path / "nowhere"), "--dataset", str(data)]) == 3
    assert "nowhere: no such file or directory" in capsys.readouterr().err
