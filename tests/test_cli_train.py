"""`llm-modules train`, `generate` and `chat` on tiny local models: options, config files, errors, streaming, history."""

from __future__ import annotations

import argparse
import io
import json
import os
import types

import pytest
import torch

from llm_modules import LLMModulesForCausalLM
from llm_modules.cli import UsageError, main

from test_training import stratos_rows

UNICODE_ROW = {
    "conversations": [
        {"from": "user", "value": "¿Cuánto es 数学 + 🙂?"},
        {"from": "assistant", "value": "<|begin_of_solution|> naïve café <|end_of_solution|>"},
    ]
}
BAD_ROWS = [{"conversations": []}, {"conversations": [{"from": "narrator", "value": "once upon a time"}]}]


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def dataset_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli-data") / "rows.jsonl"
    rows = stratos_rows(16) + [UNICODE_ROW] + BAD_ROWS
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def train_argv(tiny_pair, dataset_file, output_dir, *extra: str) -> list[str]:
    return [
        "train", "--large", str(tiny_pair[0]), "--small", str(tiny_pair[1]), "--dataset", str(dataset_file),
        "--output-dir", str(output_dir), "--subset", "1", "--val-split", "0.2", "--lr-bridge", "3e-3",
        "--lr-small", "3e-3", *extra,
    ]


@pytest.fixture(scope="module")
def trained_dir(tiny_pair, dataset_file, tmp_path_factory):
    torch.set_num_threads(1)
    output = tmp_path_factory.mktemp("cli-train") / "model"
    assert main(train_argv(tiny_pair, dataset_file, output, "--max-steps", "4", "--save-steps", "2")) == 0
    return output


def test_train_skips_bad_rows_saves_a_loadable_model_and_a_card(tiny_pair, dataset_file, tmp_path, capsys, monkeypatch):
    config = tmp_path / "train.yaml"
    config.write_text("max_steps: 5\nbatch_size: 2\nlogging_steps: 1\ndisable_tqdm: true\n")
    # Relative paths, as users type them: what is recorded must be absolute, so the model loads from anywhere.
    monkeypatch.chdir(tmp_path)
    relative = [os.path.relpath(p) for p in (*tiny_pair, dataset_file)]
    argv = train_argv(relative[:2], relative[2], "out", "--config", "train.yaml", "--max-steps", "3")
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "trained 3 steps" in captured.out  # the flag beats the config file
    summary = (
        "19 rows read, 17 valid, 2 skipped (row 18: 'conversations' is empty (expected a non-empty list of turns), "
        "row 19: turn 1 has unknown role 'narrator' (expected 'user' or 'assistant')); 14 train / 3 validation"
    )
    assert captured.err.count(summary) == 1
    saved = json.loads((tmp_path / "out" / "training_options.json").read_text())
    assert [saved["large"], saved["small"], saved["dataset"]] == [str(tiny_pair[0]), str(tiny_pair[1]), str(dataset_file)]
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"- Data: `{dataset_file}`\n- Rows: {summary}" in card and f"a frozen large one (`{tiny_pair[0]}`)" in card
    assert "Final validation loss" in card and '"batch_size": 2' in card
    monkeypatch.chdir(dataset_file.parent)
    model = LLMModulesForCausalLM.from_pretrained(tmp_path / "out")
    assert model.tokenizer is not None


def test_train_strict_names_the_first_bad_row_and_exits_2(tiny_pair, dataset_file, tmp_path, capsys):
    argv = train_argv(tiny_pair, dataset_file, tmp_path / "out", "--strict", "--max-steps", "1", "--subset", "0.2")
    assert main(argv) == 2  # the subset's 3 rows hold no invalid one, or not row 18: every row is checked
    err = capsys.readouterr().err
    assert "row 18: 'conversations' is empty" in err.splitlines()[-1] and "Traceback" not in err
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.fixture
def files(tmp_path, dataset_file):
    """Bad inputs, by name: a mistyped data file, a non-UTF-8 one, a dir that is no model, a config with epochs 0."""
    (tmp_path / "latin1.jsonl").write_bytes(dataset_file.read_bytes() + '{"system": "caf\xe9"}\n'.encode("latin-1"))
    (tmp_path / "no-model").mkdir()
    (tmp_path / "zero.yaml").write_text("epochs: 0\n")
    return tmp_path


@pytest.mark.parametrize(
    "change, code, message",
    [
        (("--dataset", "/nonexistent/rows.jsonl"), 3, "--dataset /nonexistent/rows.jsonl: no such file or directory"),
        (("--dataset", "{dataset_file}l"), 3, "--dataset {dataset_file}l: no such file or directory (did you mean {dataset_file}?)"),
        (("--dataset", "rows.csv"), 3, "--dataset rows.csv: no such file or directory"),
        (("--dataset", "{files}/latin1.jsonl"), 2, "{files}/latin1.jsonl: not UTF-8 (byte 0xe9 on line 20)"),
        (("--large", "/nonexistent/large"), 3, "--large /nonexistent/large: no such file or directory"),
        (("--small", "{files}/no-model"), 3, "--small {files}/no-model: not a model directory"),
        (("--config", "/nonexistent/train.yaml"), 2, "--config /nonexistent/train.yaml: no such file"),
        (("--config", "{files}/zero.yaml"), 2, "--config {files}/zero.yaml: epochs must be a number > 0, got 0"),
    ],
)
def test_train_errors_are_one_line(tiny_pair, dataset_file, files, tmp_path, capsys, change, code, message):
    flag, value = change[0], change[1].format(dataset_file=dataset_file, files=files)
    argv = train_argv(tiny_pair, dataset_file, tmp_path / "out", "--max-steps", "1")
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    assert main(argv) == code
    err = capsys.readouterr().err
    assert message.format(dataset_file=dataset_file, files=files) in err.splitlines()[-1] and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "flag, value, rule",
    [("--epochs", "0", "a number > 0"), ("--epochs", "-1", "a number > 0"), ("--max-steps", "0", "an integer >= 1"),
     ("--lr-bridge", "0", "a number > 0"), ("--lr-small", "nan", "a number > 0"), ("--subset", "0", "a fraction in (0, 1]"),
     ("--subset", "1.5", "a fraction in (0, 1]"), ("--val-split", "1", "a fraction in [0, 1)"),
     ("--warmup", "-0.5", "a fraction in [0, 1) or a whole number"), ("--min-delta", "-1", "a number >= 0"),
     ("--max-length", "1", "an integer >= 2"), ("--batch-size", "2.5", "an integer >= 1")],
)
def test_train_refuses_out_of_range_numbers_when_parsing(flag, value, rule, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["train", flag, value])
    assert exit.value.code == 2
    assert f"argument {flag}: must be {rule}" in capsys.readouterr().err.splitlines()[-1]


def test_train_preset_then_config_then_flags(dataset_file, tmp_path, monkeypatch, capsys):
    seen = []

    def run_training(options):
        seen.append(options)
        return types.SimpleNamespace(trainer=types.SimpleNamespace(is_world_process_zero=lambda: False,
                                                             accelerator=types.SimpleNamespace(end_training=lambda: None)))

    monkeypatch.setattr("llm_modules.training_run.run_training", run_training)
    config = tmp_path / "mine.yaml"
    config.write_text("subset: 0.5\nmax_steps: 7\n")
    assert main(["train", "--dataset", str(dataset_file), "--preset", "paper", "--config", str(config), "--epochs", "2"]) == 0
    assert main(["train", "--dataset", str(dataset_file)]) == 0
    paper, plain = seen
    assert (paper.subset, paper.max_steps, paper.epochs) == (0.5, -1, 2)  # config beats preset, flags beat both
    assert (paper.lr_bridge, paper.loss_on, paper.patience, paper.large) == (1e-4, "all", 5, "Qwen/Qwen2-1.5B")
    assert (plain.subset, plain.epochs, plain.loss_on) == (1.0, 3, "assistant")
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--preset {paper}" in help_text and "30% of Bespoke-Stratos-17k" in help_text
    assert "(default 1: every row; the paper: 0.3)" in help_text


def test_train_rejects_unknown_config_keys(tiny_pair, dataset_file, tmp_path, capsys):
    config = tmp_path / "bad.json"
    config.write_text(json.dumps({"learning_rate_of_everything": 1}))
    assert main(train_argv(tiny_pair, dataset_file, tmp_path / "out", "--config", str(config))) == 2
    assert "unknown training option 'learning_rate_of_everything'" in capsys.readouterr().err


def test_train_refuses_to_mix_runs_without_resume(tiny_pair, dataset_file, trained_dir, capsys):
    assert main(train_argv(tiny_pair, dataset_file, trained_dir, "--max-steps", "4")) == 2
    assert "--resume" in capsys.readouterr().err


@pytest.mark.parametrize("how", ["flag", "config"])
def test_resume_refuses_another_batch_size_given_as_a_flag_or_in_the_config_with_exit_2(
    tiny_pair, dataset_file, trained_dir, tmp_path, capsys, how
):
    config = tmp_path / "batch.yaml"
    config.write_text("per_device_train_batch_size: 2\n")
    change = ("--batch-size", "2") if how == "flag" else ("--config", str(config))
    argv = train_argv(tiny_pair, dataset_file, trained_dir, "--max-steps", "4", "--save-steps", "2", "--resume", *change)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "per_device_train_batch_size (--batch-size): saved 1, now 2" in err[-1] and "Error:" not in err[-1]


def test_generate_streams_and_prints(trained_dir, capsys):
    argv = ["generate", "--model", str(trained_dir), "--prompt", "what is 2 plus 3?", "--max-new-tokens", "8", "--seed", "0"]
    assert main(argv) == 0
    streamed = capsys.readouterr().out
    assert main([*argv, "--no-stream"]) == 0
    printed = capsys.readouterr().out
    assert streamed.strip() and streamed == printed  # same seed, same text, streamed or not


def test_generate_on_a_missing_dir_and_on_a_plain_model(trained_dir, tiny_pair, tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nothing"), "--prompt", "x"]) == 3
    assert "no such file or directory" in capsys.readouterr().err
    # A plain causal LM answers too (its tokenizer has no chat template here, so in the training layout).
    argv = ["generate", "--model", str(tiny_pair[0]), "--prompt", "x", "--max-new-tokens", "3", "--no-stream"]
    assert main(argv) == 0
    assert "error" not in capsys.readouterr().err


def test_a_trained_model_keeps_its_system_prompt_and_answers_in_it_by_default(tiny_pair, tmp_path, capsys,
                                                                                chat_prompts):
    """The demo's model answered nothing: generate used the Bespoke-Stratos system prompt, not the one it learned."""
    rows = [{**row, "system": "Answer briefly."} for row in stratos_rows(8)]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(train_argv(tiny_pair, data, tmp_path / "out", "--max-steps", "2", "--val-split", "0")) == 0
    assert LLMModulesForCausalLM.from_pretrained(tmp_path / "out").config.system_prompt == "Answer briefly."
    assert "system=model.config.system_prompt" in (tmp_path / "out" / "README.md").read_text()
    for extra in ([], ["--system", "Be long."]):
        assert main(["generate", "--model", str(tmp_path / "out"), "--prompt", "1 + 1?", "--max-new-tokens", "2",
                     "--temperature", "0", *extra]) == 0
    assert chat_prompts[0].startswith("System:\n\nAnswer briefly.") and "Be long." in chat_prompts[1]
    assert "Bespoke" not in "".join(chat_prompts)


def test_an_answer_left_no_room_by_its_prompt_is_an_error_not_a_blank_line(capsys):
    from llm_modules.cli.generate import DEFAULT_MAX_NEW_TOKENS, check_empty_answer

    class Model:
        config = type("Config", (), {"max_position_embeddings": 512})()

    args = argparse.Namespace(max_new_tokens=None)
    with pytest.raises(UsageError, match="the prompt is 485 tokens and left 27 of the model's 512 positions"):
        check_empty_answer(Model(), 485, 27, 27, args)
    check_empty_answer(Model(), 20, 1, DEFAULT_MAX_NEW_TOKENS, args)  # ended at once: said, not an error
    assert "the model's answer is empty" in capsys.readouterr().err


def test_chat_keeps_history_resets_and_exits(trained_dir, monkeypatch, capsys, chat_prompts):
    prompts = chat_prompts
    monkeypatch.setattr("sys.stdin", io.StringIO("first question\nsecond question\n/reset\nthird question\n/exit\nnever read\n"))
    assert main(["chat", "--model", str(trained_dir), "--max-new-tokens", "4", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert "(history cleared)" in out and out.count("assistant> ") == 3
    assert "User:\n\nfirst question" in prompts[1] and "User:\n\nsecond question" in prompts[1]
    assert "first question" not in prompts[2] and prompts[2].endswith("User:\n\nthird question\n\nAssistant:\n\n")

    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))  # then Ctrl-D (end of input)
    assert main(["chat", "--model", str(trained_dir), "--max-new-tokens", "2"]) == 0


def test_train_composes_several_sources_and_generate_and_eval_find_them_moved(tiny_dirs, dataset_file, tmp_path, capsys):
    import shutil

    # Two sources of different architectures and widths over one tokenizer (the tiny Qwen2 and GPT-Neo share it).
    large_a, large_b, small = tiny_dirs["qwen2"], tiny_dirs["gpt_neo"], tiny_dirs["gpt_neo"]
    out = tmp_path / "two"
    argv = train_argv((large_a, small), dataset_file, out, "--large", str(large_b), "--source-fusion", "concat",
                      "--num-depth-connections", "1", "--head-init", "small", "--max-steps", "2")
    assert main(argv) == 0, capsys.readouterr().err
    # The GPT-Neo source's learned positions end at 256: longer rows are dropped, not an IndexError mid-training.
    assert f"max_length 4096 lowered to 256: --large {large_b} has 256 positions" in capsys.readouterr().err
    model = LLMModulesForCausalLM.from_pretrained(out)
    assert model.config.large_model_name_or_path == [str(large_a), str(large_b)]
    assert model.config.source_fusion == "concat" and len(model.config.depth_connection_list) == 2
    assert model.config.head_init == "small"
    assert json.loads((out / "training_options.json").read_text())["large"] == [str(large_a), str(large_b)]
    card = (out / "README.md").read_text()
    assert f"`{large_a}` and `{large_b}`" in card and "2 frozen large ones" in card

    # The sources moved: one --large-model per source, in order.
    moved = [shutil.copytree(d, tmp_path / "moved" / name) for d, name in ((large_a, "a"), (large_b, "b"))]
    config = json.loads((out / "config.json").read_text())
    config["large_model_name_or_path"] = [str(tmp_path / "gone-a"), str(tmp_path / "gone-b")]
    (out / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    # A short system prompt: the tiny GPT-Neo source has 256 positions, the Stratos one is longer in its tokens.
    base = ["generate", "--model", str(out), "--prompt", "x", "--max-new-tokens", "3", "--no-stream", "--system", "Be brief."]
    assert main(base) == 3 and "gone-a" in capsys.readouterr().err
    assert main([*base, "--large-model", str(moved[0]), "--large-model", str(moved[1])]) == 0
    eval_argv = ["eval", "--model", str(out), "--dataset", str(dataset_file), "--limit", "2", "--max-new-tokens", "2"]
    assert main([*eval_argv, "--large-model", str(moved[0]), "--large-model", str(moved[1])]) == 0


def test_train_caches_several_sources_but_refuses_depth_connections_and_sources_of_other_tokenizers(
    tiny_dirs, dataset_file, tmp_path, capsys
):
    pair = (tiny_dirs["qwen2"], tiny_dirs["gpt_neo"])
    several = train_argv(pair, dataset_file, tmp_path / "two", "--large", str(tiny_dirs["gpt_neo"]), "--max-steps", "1",
                         "--feature-cache", str(tmp_path / "two-features"))
    assert main(several) == 0
    manifest = json.loads((tmp_path / "two-features" / "train" / "manifest.json").read_text())
    widths = [json.loads((tiny_dirs[name] / "config.json").read_text())["hidden_size"] for name in ("qwen2", "gpt_neo")]
    assert manifest["hidden_size"] == sum(widths) and len(manifest["large_weights"]) == 2  # side by side, in order
    capsys.readouterr()
    argv = train_argv(pair, dataset_file, tmp_path / "out", "--num-depth-connections", "1", "--max-steps", "1",
                      "--feature-cache", str(tmp_path / "features"))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--feature-cache holds the sources' last hidden states only" in err and "depth connections" in err
    argv = train_argv(pair, dataset_file, tmp_path / "out", "--large", str(tiny_dirs["llama"]), "--max-steps", "1")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "--large: frozen sources must share one tokenizer" in err and "320 tokens" in err and "400" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "out").exists() and not (tmp_path / "features").exists()
