"""`llm-modules train`, `generate` and `chat` on tiny local models: options, config files, errors, streaming, history."""

from __future__ import annotations

import io
import json

import pytest
import torch

from llm_modules import LLMModulesForCausalLM
from llm_modules.cli import generate as cli_generate
from llm_modules.cli import main

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


def test_train_skips_bad_rows_saves_a_loadable_model_and_a_card(tiny_pair, dataset_file, tmp_path, capsys):
    config = tmp_path / "train.yaml"
    config.write_text("max_steps: 5\nbatch_size: 2\nlogging_steps: 1\ndisable_tqdm: true\n")
    argv = train_argv(tiny_pair, dataset_file, tmp_path / "out", "--config", str(config), "--max-steps", "3")
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "trained 3 steps" in captured.out  # the flag beats the config file
    assert "skipped 2 invalid rows: row 18: 'conversations' is empty" in captured.err
    assert "row 19: turn 1 has unknown role 'narrator'" in captured.err
    model = LLMModulesForCausalLM.from_pretrained(tmp_path / "out")
    assert model.tokenizer is not None
    card = (tmp_path / "out" / "README.md").read_text()
    assert str(dataset_file) in card and "Final validation loss" in card and '"batch_size": 2' in card


def test_train_strict_names_the_first_bad_row_and_exits_2(tiny_pair, dataset_file, tmp_path, capsys):
    assert main(train_argv(tiny_pair, dataset_file, tmp_path / "out", "--strict", "--max-steps", "1")) == 2
    err = capsys.readouterr().err
    assert "row 18: 'conversations' is empty" in err.splitlines()[-1] and "Traceback" not in err
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize(
    "change, code, message",
    [
        (("--dataset", "/nonexistent/rows.jsonl"), 1, "dataset file or directory not found: /nonexistent/rows.jsonl"),
        (("--large", "/nonexistent/large"), 1, "--large /nonexistent/large: no such directory"),
        (("--config", "/nonexistent/train.yaml"), 2, "--config /nonexistent/train.yaml: no such file"),
    ],
)
def test_train_errors_are_one_line(tiny_pair, dataset_file, tmp_path, capsys, change, code, message):
    argv = train_argv(tiny_pair, dataset_file, tmp_path / "out", "--max-steps", "1")
    if change[0] in argv:
        argv[argv.index(change[0]) + 1] = change[1]
    else:
        argv += list(change)
    assert main(argv) == code
    err = capsys.readouterr().err
    assert message in err.splitlines()[-1] and "Traceback" not in err


def test_train_rejects_unknown_config_keys(tiny_pair, dataset_file, tmp_path, capsys):
    config = tmp_path / "bad.json"
    config.write_text(json.dumps({"learning_rate_of_everything": 1}))
    assert main(train_argv(tiny_pair, dataset_file, tmp_path / "out", "--config", str(config))) == 2
    assert "unknown training option 'learning_rate_of_everything'" in capsys.readouterr().err


def test_train_refuses_to_mix_runs_without_resume(tiny_pair, dataset_file, trained_dir, capsys):
    assert main(train_argv(tiny_pair, dataset_file, trained_dir, "--max-steps", "4")) == 2
    assert "--resume" in capsys.readouterr().err


def test_generate_streams_and_prints(trained_dir, capsys):
    argv = ["generate", "--model", str(trained_dir), "--prompt", "what is 2 plus 3?", "--max-new-tokens", "8", "--seed", "0"]
    assert main(argv) == 0
    streamed = capsys.readouterr().out
    assert main([*argv, "--no-stream"]) == 0
    printed = capsys.readouterr().out
    assert streamed.strip() and streamed == printed  # same seed, same text, streamed or not


def test_generate_errors(trained_dir, tiny_pair, tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nothing"), "--prompt", "x"]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert main(["generate", "--model", str(tiny_pair[0]), "--prompt", "x"]) == 2
    assert "not an llm-modules model (its model_type is 'qwen2')" in capsys.readouterr().err


def test_chat_keeps_history_resets_and_exits(trained_dir, monkeypatch, capsys):
    prompts = []
    generate_reply = cli_generate.generate_reply

    def recording(model, text, args, stream):
        prompts.append(text)
        return generate_reply(model, text, args, stream)

    monkeypatch.setattr(cli_generate, "generate_reply", recording)
    monkeypatch.setattr("sys.stdin", io.StringIO("first question\nsecond question\n/reset\nthird question\n/exit\nnever read\n"))
    assert main(["chat", "--model", str(trained_dir), "--max-new-tokens", "4", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert "(history cleared)" in out and out.count("assistant> ") == 3
    assert "User:\n\nfirst question" in prompts[1] and "User:\n\nsecond question" in prompts[1]
    assert "first question" not in prompts[2] and prompts[2].endswith("User:\n\nthird question\n\nAssistant:\n\n")

    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))  # then Ctrl-D (end of input)
    assert main(["chat", "--model", str(trained_dir), "--max-new-tokens", "2"]) == 0
