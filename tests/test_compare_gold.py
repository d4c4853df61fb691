"""`small_gold`: TRL's GOLD distils a tiny Qwen2 teacher into a tiny GPT-2 student whose tokenizer differs."""

from __future__ import annotations

import math

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llm_modules.compare import gold
from llm_modules.compare.fitting import FitBudget
from llm_modules.data import encode_conversation


def stratos_row(a: int, b: int) -> dict:
    return {"system": "Answer.", "conversations": [
        {"from": "user", "value": f"What is {a} + {b}?"},
        {"from": "assistant", "value": f"<|begin_of_thought|> {a} + {b} = {a + b} <|end_of_thought|> "
                                       f"<|begin_of_solution|> {a + b} <|end_of_solution|>"},
    ]}


def test_gold_example_is_the_layout_of_the_other_systems(tiny_dirs):
    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["gpt2"])
    row = stratos_row(3, 4)
    example = gold.gold_example(row, tokenizer, byte_offsets=True)
    assert example["input_ids"] == encode_conversation(row, tokenizer)["input_ids"]
    answer = example["original_completion_text"].encode()
    start = example["completion_mask"].index(1)
    spans = example["byte_offsets"][start:]
    pieces = [tokenizer.decode([i]) for i in example["input_ids"][start:-1]]
    assert [answer[s:e].decode() for s, e in spans[:-1]] == pieces  # each answer token's own bytes
    assert spans[-1] == (len(answer), len(answer))  # EOS: the empty span at the answer's end


def test_fit_small_gold_across_tokenizers(tiny_dirs, tmp_path, one_thread, monkeypatch):
    small_dir, large_dir = tiny_dirs["gpt2"], tiny_dirs["qwen2"]  # tokenizers of 400 and 320 tokens
    loaded, load_plain = {}, gold.load_plain

    def recording_load_plain(path, *args, **kwargs):  # keeps the teacher the fit trained with
        loaded[path] = load_plain(path, *args, **kwargs)
        return loaded[path]

    monkeypatch.setattr(gold, "load_plain", recording_load_plain)
    pairs = [(3, 4), (12, 30), (7, 8), (100, 15), (9, 9), (21, 5), (64, 36), (5, 0), (11, 22), (8, 13), (40, 2),
             (6, 7), (15, 15), (2, 90), (33, 4), (70, 1)]
    rows = [stratos_row(a, b) for a, b in pairs]
    fit = gold.fit_small_gold(small_dir, large_dir, rows[:12], rows[12:], FitBudget(max_epochs=2, batch_size=4),
                              1e-3, tmp_path / "run", tmp_path / "logs" / "gold.jsonl", progress=False)

    assert fit.train_seconds > 0 and math.isfinite(fit.val_loss)
    assert 0 < fit.best_epoch <= fit.epochs_run <= 2 and fit.best_step > 0
    assert not fit.model.training and fit.trainable_params == sum(p.numel() for p in fit.model.parameters())
    assert any(entry.get("eval_loss") == fit.val_loss for entry in fit.log_history)
    assert (tmp_path / "logs" / "gold.jsonl").read_text().strip()
    original = AutoModelForCausalLM.from_pretrained(small_dir).state_dict()
    assert any(not torch.equal(value, original[name]) for name, value in fit.model.state_dict().items())
    teacher, _ = loaded[large_dir]
    on_disk = AutoModelForCausalLM.from_pretrained(large_dir).state_dict()
    assert all(torch.equal(value, on_disk[name]) for name, value in teacher.state_dict().items())

    assert fit.extra["lmbda"] == 0.0 and fit.extra["uld_use_hybrid_loss"]
    splits = fit.extra["digit_splits"]
    assert list(splits) == ["7", "42", "815", "1234", "-771"]
    for number, (student_pieces, teacher_pieces) in splits.items():
        assert "".join(student_pieces) == "".join(teacher_pieces) == f" {number}"
