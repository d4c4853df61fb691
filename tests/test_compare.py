"""`llm-modules compare` (issue 25): the systems' wiring through the harness on tiny models, the fairness rule (grid,
early stopping, best epoch), the controls (LoRA leaves the base bit-identical, the random source is random), the bill's
fields, and the command line's errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from llm_modules.cli import main
from llm_modules.compare import CompareSettings, FitBudget, SystemOptions, run_compare
from llm_modules.compare.fitting import BestEpochCallback
from llm_modules.compare.report import METRICS
from llm_modules.compare.systems import Context, fit_combined, fit_large_lora
from llm_modules.compare.tasks import builtin_task, file_native_answer, plain_row, split_validation

TINY_OPTIONS = {"cross_attention_heads": 4, "adapter_dim": 16, "dropout": 0.0, "small_position_embeddings": "keep"}


def tiny_settings(large: str, small: str, systems: tuple[str, ...], seeds=(0,)) -> CompareSettings:
    return CompareSettings(
        large=large, small=small, task="add3", n_train=10, n_eval=3, n_eval_train=2, val_fraction=0.2,
        systems=systems, seeds=seeds, eval_batch_size=4, decode_context=16, decode_tokens=16,
        budget=FitBudget(max_epochs=2, batch_size=4, learning_rates=(1e-3, 3e-3), patience=2, logging_steps=1),
        options=SystemOptions(combined_options=TINY_OPTIONS, lora_rank=4, lora_alpha=8, native_max_new_tokens=6),
    )


def context_for(large: str, small: str, tmp_path) -> Context:
    task = builtin_task("add3", 6, 1, seed=0)
    train, val = split_validation(task.train_rows, 0.34, 0)
    return Context(Path(large), Path(small),
                   [plain_row(r) for r in train], [plain_row(r) for r in val],
                   FitBudget(max_epochs=2, batch_size=2, patience=2, logging_steps=1),
                   SystemOptions(combined_options=TINY_OPTIONS, lora_rank=4, lora_alpha=8), tmp_path / "work",
                   tmp_path / "logs", progress=False)


# ---- the harness, every system -------------------------------------------------------------------------------------


def test_every_system_trains_evaluates_and_is_billed(tiny_chat_pair, tmp_path, one_thread):
    systems = ("small_zero_shot", "large_native", "small_sft", "combined", "combined_random_source", "large_lora",
               "small_seqkd", "small_gold")
    settings = tiny_settings(*tiny_chat_pair, systems)
    settings.options.lora_large = tiny_chat_pair[0]  # named: the tables must say LoRA's base is another model
    results = run_compare(settings, tmp_path / "out", progress=False)
    seed = json.loads((tmp_path / "out" / "seed-0" / "results.json").read_text())
    assert list(seed["systems"]) == list(systems)
    assert seed["n_eval"] == 3 and seed["n_train"] == 8 and seed["n_validation"] == 2 and seed["seed"] == 0
    assert seed["cpu"] and seed["versions"]["torch"] and seed["versions"]["peft"]
    for name, row in seed["systems"].items():
        trained = name not in ("small_zero_shot", "large_native")
        assert 0 <= row["eval_exact_match"] <= 1 and 0 <= row["format_valid"] <= 1 and row["n_eval"] == 3
        # Decode time is test_compare_bill's to check: on models this tiny the prefill's noise can exceed 16 steps.
        assert math.isfinite(row["decode_seconds_per_token"])
        assert row["weights_read_per_token_bytes"] > 0 and row["disk_bytes"] > 0
        assert len((tmp_path / "out" / "seed-0" / "predictions" / f"{name}.jsonl").read_text().splitlines()) == 3
        assert (row["trainable_params"] > 0) == trained
        if trained:
            assert row["train_seconds"] > 0 and 0 < row["best_seconds"] <= row["train_seconds"] + 1e-6
            assert row["train_multiply_adds"] > 0 and row["peak_rss_bytes"] > 0
            # The fairness rule: one run per learning rate of the grid, the lowest validation loss chosen.
            assert [entry["lr"] for entry in row["grid"]] == [1e-3, 3e-3]
            assert row["val_loss"] == min(entry["val_loss"] for entry in row["grid"]) and math.isfinite(row["val_loss"])
            assert row["lr"] == min(row["grid"], key=lambda entry: entry["val_loss"])["lr"]
            # One-time costs (the feature cache, seqkd's teacher answers) count once in the grid's seconds.
            shared = [e["shared_seconds"] for e in row["grid"]]
            expected = sum(e["train_seconds"] for e in row["grid"]) - sum(shared) + max(shared)
            assert row["train_seconds"] <= row["grid_seconds"] and abs(row["grid_seconds"] - expected) < 0.1
            assert (tmp_path / "out" / "seed-0" / "models" / name).is_dir()
    rows = seed["systems"]
    # The feature cache and the teacher's answers are one-time costs of their systems, counted in their seconds.
    assert rows["combined"]["grid"][0]["shared_seconds"] > 0 and rows["small_seqkd"]["grid"][0]["shared_seconds"] > 0
    assert rows["small_sft"]["grid"][0]["shared_seconds"] == 0
    # The combined model reads the large model per token besides its own weights; LoRA trains a fraction of the base.
    assert rows["combined"]["weights_read_per_token_bytes"] > rows["small_sft"]["weights_read_per_token_bytes"]
    assert rows["large_lora"]["trainable_params"] < sum(
        p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_chat_pair[0]).parameters())
    assert rows["large_lora"]["lora_rank"] == 4
    for name in ("results.json", "results.md", "accuracy_vs_train_seconds.png", "seed-0/results.md",
                 "seed-0/data/train.jsonl", "seed-0/data/validation.jsonl", "seed-0/data/eval.jsonl"):
        assert (tmp_path / "out" / name).is_file(), name
    assert results["table"].count("\n| `") == len(systems) and "`large_lora` adapts" in results["table"]
    assert results["systems"]["combined"]["eval_exact_match"]["per_seed"] == [rows["combined"]["eval_exact_match"]]


def test_seeds_are_summarized_as_mean_min_max(tiny_chat_pair, tmp_path, one_thread):
    settings = tiny_settings(*tiny_chat_pair, ("small_zero_shot", "small_sft"), seeds=(0, 1))
    results = run_compare(settings, tmp_path / "out", progress=False)
    summary = results["systems"]["small_sft"]["eval_exact_match"]
    per_seed = [json.loads((tmp_path / "out" / f"seed-{s}" / "results.json").read_text())["systems"]["small_sft"]
                ["eval_exact_match"] for s in (0, 1)]
    assert summary["per_seed"] == per_seed and summary["min"] == min(per_seed) and summary["max"] == max(per_seed)
    assert results["seeds"] == [0, 1]
    # Each seed draws its own questions.
    eval_0, eval_1 = ((tmp_path / "out" / f"seed-{s}" / "data" / "eval.jsonl").read_text() for s in (0, 1))
    assert eval_0 != eval_1

    # Seeds run apart are summarized as if they had run together: the same summary, in another dir.
    assert main(["compare", "--summarize", str(tmp_path / "out" / "seed-1"), str(tmp_path / "out" / "seed-0"),
                 "--output-dir", str(tmp_path / "apart")]) == 0
    apart = json.loads((tmp_path / "apart" / "results.json").read_text())
    assert apart["seeds"] == [0, 1] and apart["systems"] == json.loads(json.dumps(results["systems"]))
    assert (tmp_path / "apart" / "accuracy_vs_train_seconds.png").stat().st_size > 0


def test_a_tasks_own_reply_budget_reaches_native_answers_and_the_seqkd_teacher(tiny_chat_pair, tmp_path,
                                                                              one_thread, monkeypatch):
    """GSM's step-by-step replies need more tokens than the default: an untrained model's replies and the seqkd
    teacher's get the task's budget, and the results say which budget ran."""
    import llm_modules.compare as compare
    import llm_modules.compare.systems as systems

    budgets = []

    def recording(generate):
        def wrapped(*args, **kwargs):
            budgets.append((kwargs["desc"], kwargs["max_new_tokens"]))
            return generate(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(compare, "generate_texts", recording(compare.generate_texts))
    monkeypatch.setattr(systems, "generate_texts", recording(systems.generate_texts))
    settings = tiny_settings(*tiny_chat_pair, ("large_native", "small_seqkd"))
    settings.budget.learning_rates = (1e-3,)
    task = builtin_task("add3", 10, 3, seed=0)
    task.native_max_new_tokens = 9
    seed = compare.run_seed(settings, task, 0, Path(tiny_chat_pair[0]), Path(tiny_chat_pair[1]), tmp_path / "out",
                            progress=False)
    assert ("large_native", 9) in budgets and ("seqkd teacher answers", 9) in budgets
    assert seed["options"]["native_max_new_tokens"] == "9"
    assert settings.options.native_max_new_tokens == 6  # the settings themselves are left as given


def test_summarize_refuses_seeds_of_different_comparisons_in_one_line(tmp_path, capsys):
    def seed_dir(name: str, seed: int, **changes) -> str:
        results = {"task": {"name": "sub3", "description": "3-digit subtraction"}, "seed": seed, "n_eval": 60,
                   "n_eval_train": 10, "n_train": 28, "n_validation": 4, "large": "/m/qwen/hf", "small": "/m/smol/hf",
                   "options": {"lora_rank": "64"}, "budget": {"max_epochs": 7, "seed": seed}, "cpu": "AMD EPYC",
                   "versions": {}, "torch_threads": 2, "gpu": None,
                   "systems": {"small_sft": {**dict.fromkeys(METRICS, 1.0), "lr": 1e-4}}, **changes}
        (tmp_path / name / f"seed-{seed}").mkdir(parents=True)
        (tmp_path / name / f"seed-{seed}" / "results.json").write_text(json.dumps(results))
        return str(tmp_path / name)

    first, again = seed_dir("a", 0), seed_dir("b", 0)
    fewer_rows = seed_dir("c", 1, n_eval=50)
    other_budget = seed_dir("d", 2, budget={"max_epochs": 3, "seed": 2})
    (tmp_path / "e" / "seed-3").mkdir(parents=True)
    (tmp_path / "e" / "seed-3" / "results.json").write_text("{not json")
    for dirs, code, message in [
        ([first, again], 2, f"{again}/seed-0/results.json: seed 0 is also in {first}/seed-0/results.json"),
        ([first, fewer_rows], 2, f"{fewer_rows}/seed-1/results.json: n_eval is 50, expected 60 as in"),
        ([first, other_budget], 2, "budget is {'max_epochs': 3}, expected {'max_epochs': 7}"),
        ([first, str(tmp_path / "e")], 2, "seed-3/results.json: not a seed's results of llm-modules compare"),
        ([first, str(tmp_path / "nowhere")], 3, "--summarize " + str(tmp_path / "nowhere") + ": no such directory"),
        ([str(tmp_path)], 3, "no seed results in it (seed-S/results.json)"),
    ]:
        assert main(["compare", "--summarize", *dirs, "--output-dir", str(tmp_path / "out")]) == code
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing written for a refused summary
    # The same models fetched to another place on another machine are the same comparison; its CPU is named.
    moved = seed_dir("f", 1, large="/elsewhere/qwen/hf", small="/elsewhere/smol/hf", cpu="Intel Xeon")
    assert main(["compare", "--summarize", first, moved, "--output-dir", str(tmp_path / "out")]) == 0
    table = (tmp_path / "out" / "results.md").read_text()
    assert "timings from different CPUs: AMD EPYC; Intel Xeon" in table and "seeds 0, 1" in table


# ---- the controls --------------------------------------------------------------------------------------------------


def test_lora_leaves_the_base_weights_bit_identical(tiny_chat_pair, tmp_path, one_thread):
    large, small = tiny_chat_pair
    fit = fit_large_lora(context_for(large, small, tmp_path), lr=1e-2)
    original = AutoModelForCausalLM.from_pretrained(large).state_dict()
    base = fit.model.get_base_model().state_dict()
    checked = 0
    for name, value in original.items():
        key = next((k for k in base if k.replace(".base_layer", "") == name), None)
        if key is not None:
            assert torch.equal(base[key], value), name
            checked += 1
    assert checked >= len(original) - 1  # every tensor (a tied LM head may be stored once)
    lora = {n: p for n, p in fit.model.named_parameters() if "lora_B" in n}
    assert lora and any(p.abs().sum() > 0 for p in lora.values())  # the adapters did train (B starts at zero)
    assert fit.trainable_params == sum(p.numel() for n, p in fit.model.named_parameters() if "lora_" in n)


def test_the_random_source_control_has_random_frozen_weights(tiny_chat_pair, tmp_path, one_thread):
    large, small = tiny_chat_pair
    fit = fit_combined(context_for(large, small, tmp_path), lr=1e-3, random_source=True)
    pretrained = AutoModelForCausalLM.from_pretrained(large).model.state_dict()
    frozen = fit.model.large.state_dict()
    matrices = [name for name, value in frozen.items() if value.ndim >= 2]
    assert matrices
    for name in matrices:
        assert not torch.equal(frozen[name], pretrained[name]), name
        assert abs(float(frozen[name].std()) - 0.02) < 0.01, name
    assert fit.extra["random_source"] is True
    assert all(not p.requires_grad for p in fit.model.large.parameters())


# ---- the fairness rule ---------------------------------------------------------------------------------------------


class _State:
    def __init__(self):
        self.epoch, self.global_step = 0.0, 0


class _Control:
    should_training_stop = False


def test_best_epoch_callback_keeps_the_best_weights_and_stops_after_patience():
    model = torch.nn.Linear(2, 2)
    frozen = torch.nn.Parameter(torch.zeros(2), requires_grad=False)
    model.register_parameter("frozen", frozen)
    callback, state, control = BestEpochCallback(patience=2), _State(), _Control()
    callback.on_train_begin(None, state, control)
    for epoch, loss in enumerate([3.0, 1.0, 2.0, float("nan"), 0.5], start=1):
        state.epoch, state.global_step = float(epoch), epoch * 10
        with torch.no_grad():
            model.weight.fill_(epoch)
        callback.on_evaluate(None, state, control, metrics={"eval_loss": loss}, model=model)
        if control.should_training_stop:
            break
    assert control.should_training_stop and state.epoch == 4  # epochs 3 and 4 were no better than epoch 2
    assert callback.best == 1.0 and callback.best_epoch == 2 and callback.best_step == 20
    assert "frozen" not in callback.best_state
    callback.restore(model)
    assert torch.all(model.weight == 2)


def test_best_epoch_callback_refuses_to_restore_when_every_epoch_diverged():
    callback = BestEpochCallback(patience=1)
    callback.on_evaluate(None, _State(), _Control(), metrics={"eval_loss": float("inf")}, model=torch.nn.Linear(1, 1))
    with pytest.raises(RuntimeError, match="finite validation loss"):
        callback.restore(torch.nn.Linear(1, 1))


def test_validation_split_is_seeded_disjoint_and_leaves_rows_to_train():
    rows = list(range(20))
    train, val = split_validation(rows, 0.125, seed=3)
    assert len(val) == 2 and not set(train) & set(val) and sorted(train + val) == rows
    assert split_validation(rows, 0.125, seed=3) == (train, val)
    assert split_validation(rows, 0.125, seed=4) != (train, val)
    assert split_validation(rows[:2], 0.9, seed=0)[0]  # one row is always left to train on
    assert split_validation(rows, 0, seed=0) == (rows, [])


@pytest.mark.parametrize("reply, expected", [
    ("<|begin_of_solution|> 42 <|end_of_solution|>", "42"), ("so \\boxed{17}", "17"),
    ("3 apples and 4 pears make 7.", "7"), ("it costs $1,250.", "1250"), ("no idea", None),
])
def test_native_answers_to_the_users_rows(reply, expected):
    row = {"conversations": [{"from": "user", "value": "q"},
                             {"from": "assistant", "value": "<|begin_of_solution|> 7 <|end_of_solution|>"}]}
    assert file_native_answer(reply, row) == expected


# ---- the command line ----------------------------------------------------------------------------------------------


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_compare_runs_on_the_users_files(tiny_chat_pair, tmp_path, capsys, one_thread):
    task = builtin_task("add3", 8, 2, seed=5)
    train = write_rows(tmp_path / "train.jsonl", [plain_row(r) for r in task.train_rows])
    held = write_rows(tmp_path / "eval.jsonl", [plain_row(r) for r in task.eval_rows])
    large, small = tiny_chat_pair
    code = main(["compare", "--large", large, "--small", small, "--train", train, "--eval", held,
                 "--systems", "small_zero_shot", "small_sft", "--max-epochs", "1", "--batch-size", "4",
                 "--learning-rates", "1e-3", "--output-dir", str(tmp_path / "out")])
    assert code == 0
    assert "| `small_sft` |" in capsys.readouterr().out
    saved = json.loads((tmp_path / "out" / "seed-0" / "results.json").read_text())
    assert saved["task"]["name"] == "files" and saved["n_eval"] == 2 and saved["n_train"] == 7


@pytest.mark.parametrize("extra, code, message", [
    (["--systems", "small_sft", "bogus"], 2, "unknown system 'bogus'"),
    (["--task", "nope"], 2, "unknown task 'nope'"),
    (["--task", "stdlib", "--n-train", "300"], 2, "task stdlib has 205 questions; asked for 300 train + 60 held-out"),
    (["--train", "x.jsonl"], 2, "--train and --eval go together"),
    (["--train", "missing.jsonl", "--eval", "missing.jsonl"], 3, "--train missing.jsonl: no such file"),
])
def test_compare_errors_are_one_line_with_an_exit_code(tiny_chat_pair, tmp_path, capsys, extra, code, message):
    large, small = tiny_chat_pair
    assert main(["compare", "--large", large, "--small", small, "--output-dir", str(tmp_path / "o"), *extra]) == code
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_compare_refuses_a_bad_bridge_only_steps_by_the_training_options_rule(tmp_path, capsys):
    with pytest.raises(SystemExit) as refused:
        main(["compare", "--bridge-only-steps", "2.5", "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert refused.value.code == 2 and len(err.splitlines()) == 1
    assert "argument --bridge-only-steps: must be a fraction in [0, 1) or a whole number of steps, got '2.5'" in err


def test_compare_names_the_bad_row_and_an_unreadable_tokenizer(tiny_chat_pair, tmp_path, capsys):
    good = {"conversations": [{"from": "user", "value": "q"}, {"from": "assistant", "value": "a"}]}
    bad = write_rows(tmp_path / "bad.jsonl", [good, {"conversations": [{"from": "user", "value": "q"}]}])
    assert main(["compare", "--large", tiny_chat_pair[0], "--small", tiny_chat_pair[1], "--train", bad, "--eval", bad,
                 "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "row 2" in err and "no assistant turn" in err and len(err.splitlines()) == 1
    no_tokenizer = tmp_path / "no-tokenizer"
    AutoModelForCausalLM.from_pretrained(tiny_chat_pair[1]).config.save_pretrained(no_tokenizer)
    capsys.readouterr()
    assert main(["compare", "--large", tiny_chat_pair[0], "--small", str(no_tokenizer), "--output-dir",
                 str(tmp_path / "o")]) == 3
    err = capsys.readouterr().err.strip()
    assert f"--small {no_tokenizer}: cannot read its tokenizer (no tokenizer files in it)" in err
    assert len(err.splitlines()) == 1


def test_a_system_whose_package_is_missing_is_named_with_the_install_line(tiny_chat_pair, tmp_path, capsys,
                                                                         monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "trl" else find_spec(name,
                                                                                                              *args))
    large, small = tiny_chat_pair
    assert main(["compare", "--large", large, "--small", small, "--systems", "small_sft", "small_gold",
                 "--output-dir", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip() == (
        "llm-modules compare: error: small_gold needs trl: pip install 'llm-modules[compare]'")
    assert not (tmp_path / "o").exists()
