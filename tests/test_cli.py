"""The command tree: installed entry point, --help and --version without torch, defaults in help, info, smoke-test,
one-line errors, library messages above progress bars."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from importlib.metadata import version

import pytest
from tqdm import tqdm

from llm_modules import __version__
from llm_modules.cli import main
from llm_modules.cli.common import library_messages


def test_console_script_is_installed():
    result = subprocess.run(["llm-modules", "--help"], capture_output=True, text=True, check=True)
    assert "smoke-test" in result.stdout and "info" in result.stdout
    # Written for users: what it does and where to start, not how the module is built.
    assert "llm-modules demo --quick" in result.stdout and "parse, call the library" not in result.stdout
    assert "3 missing or not a model" in result.stdout  # the exit codes


# Every command's --help, --version and flag typos, in a fresh interpreter: none may import torch or transformers
# (each costs seconds before anything is printed).
NO_HEAVY_IMPORTS = """
import argparse, contextlib, io, json, sys
from llm_modules.cli import build_parser, main

def commands(parser, prefix=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name)
                yield from commands(sub, (*prefix, name))

codes = {}
runs = [["--help"], ["--version"], *([*c, "--help"] for c in commands(build_parser()))]
for argv in runs + [["train", "--lr-brige", "1"], ["info", "--jsn"], ["bench", "decode", "--contexts", "x"]]:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            main(argv)
        except SystemExit as exit:
            codes[" ".join(argv)] = exit.code
print(json.dumps({"codes": codes, "imported": [m for m in ("torch", "transformers") if m in sys.modules]}))
"""


def test_help_version_and_typos_import_neither_torch_nor_transformers():
    result = subprocess.run([sys.executable, "-c", NO_HEAVY_IMPORTS], capture_output=True, text=True, check=True)
    report = json.loads(result.stdout)
    assert report["imported"] == []
    codes = report["codes"]
    assert {"train --help", "bench decode --help", "smoke-test --help"} <= set(codes) and len(codes) >= 14
    assert all(code == 0 for argv, code in codes.items() if argv.endswith("--help") or argv == "--version")
    assert codes["train --lr-brige 1"] == codes["info --jsn"] == codes["bench decode --contexts x"] == 2


@pytest.mark.parametrize("argv, expected", [
    (["generate", "--modle", "x"], "llm-modules generate: error: unrecognized argument --modle (did you mean --model?)"),
    (["generate", "--temprature", "0", "--model", "x", "--prompt", "hi"],
     "llm-modules generate: error: unrecognized argument --temprature (did you mean --temperature?)"),
    (["bench", "decode", "--confg=x"], "llm-modules bench decode: error: unrecognized argument --confg (did you mean "
                                       "--config?)"),
    (["genrate"], "llm-modules: error: argument COMMAND: invalid choice: 'genrate'"),
    (["train", "--output-dir"], "llm-modules train: error: argument --output-dir: expected one argument"),
])
def test_a_mistyped_flag_is_named_in_one_line_with_the_closest_one(argv, expected, capsys):
    with pytest.raises(SystemExit) as exit:
        main(argv)
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.startswith(expected) and err.count("\n") == 1
    assert "usage:" not in err and f"(see `{expected.split(':')[0]} --help`)" in err
    if argv == ["genrate"]:
        assert "(did you mean generate?)" in err


def test_every_command_describes_itself_and_info_names_gguf_files(capsys):
    for command in ("smoke-test", "info", "fetch", "compare", "serve"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        description = text.split("\n\n")[1]
        assert not description.startswith("options:"), f"{command} --help has no description"
    assert ".gguf file" in help_text(["info"], capsys)


def test_no_progress_bar_redraws_when_stderr_is_not_a_terminal(tmp_path):
    """A log file keeps every redraw of a bar (a quick demo wrote 124 KB of them): lines only."""
    result = subprocess.run(
        [sys.executable, "-m", "llm_modules.cli", "smoke-test", "--steps", "2", "--output-dir", str(tmp_path)],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr and "it/s]" not in result.stderr


def test_a_command_run_in_process_leaves_the_progress_bar_switches_as_it_found_them(monkeypatch, capsys):
    """They are set for the command (stderr is no terminal here); a later subprocess (vLLM's, in the tests) must not
    inherit them: vLLM 0.32 divides by a disabled bar's elapsed time."""
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    assert main(["fetch", "--list", "--json"]) == 0
    assert "TQDM_DISABLE" not in os.environ


def test_version_names_the_package_torch_and_transformers(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0
    expected = f"llm-modules {__version__} (torch {version('torch')}, transformers {version('transformers')})\n"
    assert capsys.readouterr().out == expected


def help_text(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    return " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("argv, shown", [
    (["generate"], ["--temperature TEMPERATURE 0 = greedy (default: 0.7)", "--top-k TOP_K (default: 50)",
                    "--top-p TOP_P (default: 0.95)"]),
    (["chat"], ["--top-k TOP_K (default: 50)"]),
    (["serve"], ["--port PORT (default: 8000)", "--max-batch-size MAX_BATCH_SIZE, --max-concurrency MAX_BATCH_SIZE "
                 "requests decoded together in one batch", "(--max-concurrency is the old name) (default: 8)"]),
    (["eval"], ["--max-new-tokens MAX_NEW_TOKENS (default: 1024)", "slices work: 'train[-500:]') (default: train)"]),
    (["bench", "decode"], ["(default: 64 256 512)", "--seed SEED (default: 0)"]),
    (["demo"], ["(default: 0)", "(default: llm-modules-demo, or llm-modules-demo-two-sources with --task two-sources)",
                "knowledge (default): one source"]),
])
def test_help_shows_defaults(argv, shown, capsys, monkeypatch):
    monkeypatch.setenv("LLM_MODULES_API_KEY", "secret-key-123")
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping inside a value (argparse breaks lines at hyphens)
    text = help_text(argv, capsys)
    for part in shown:
        assert part in text
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "secret-key-123" not in text  # serve's --api-key default comes from the environment


def test_info_on_a_saved_model_and_a_bad_dir(tiny_model, tmp_path, capsys):
    tiny_model.save_pretrained(tmp_path / "combined")
    assert main(["info", "--model", str(tmp_path / "combined")]) == 0
    assert "bridge" in capsys.readouterr().out
    assert main(["info", "--large", str(tmp_path)]) == 2
    assert "give both --large and --small" in capsys.readouterr().err
    assert main(["info", "--model", str(tmp_path / "missing")]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing" in err and "Traceback" not in err


def test_info_describes_a_plain_model_dir_not_the_paper_pair(tiny_dirs, capsys):
    from transformers import AutoModelForCausalLM

    model_dir = tiny_dirs["qwen2"]
    loaded = AutoModelForCausalLM.from_pretrained(model_dir)
    assert main(["info", "--model", str(model_dir), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts == {
        "kind": "causal_lm", "architecture": "Qwen2ForCausalLM", "model_type": "qwen2",
        "hidden_size": loaded.config.hidden_size, "layers": loaded.config.num_hidden_layers,
        "vocab_size": loaded.config.vocab_size, "parameters": sum(p.numel() for p in loaded.parameters()),
    }
    assert main(["info", "--model", str(model_dir)]) == 0
    out = capsys.readouterr().out
    assert "Qwen2ForCausalLM" in out and "1,543" not in out  # not the paper's 1.54B frozen model
    assert f"--large {model_dir} --small" in out  # how to compose it


def test_info_refuses_a_model_that_is_not_a_causal_lm(tmp_path, capsys):
    from transformers import AutoConfig

    AutoConfig.for_model("vit", hidden_size=16, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    assert main(["info", "--model", str(tmp_path)]) == 3
    assert capsys.readouterr().err == (
        f"llm-modules info: error: --model {tmp_path}: a vit model, not a causal language model (nothing to compose)\n"
    )


def test_info_on_a_pair_of_dirs(tiny_pair, capsys):
    assert main(["info", "--large", str(tiny_pair[0]), "--small", str(tiny_pair[1]), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert 0 < summary["frozen_large"] < 1_000_000 and summary["trainable"] > 0


def test_library_messages_go_above_a_progress_bar_not_onto_it(capsys):
    with library_messages():
        bar = tqdm(total=4, file=sys.stderr)
        bar.update()
        logging.getLogger("llm_modules.training").info("loading the best model from checkpoint-4")
        bar.close()
    logging.getLogger("llm_modules.training").info("after the command: not shown")
    err = capsys.readouterr().err
    assert "loading the best model from checkpoint-4" in re.split(r"[\r\n]", err)  # a line of its own
    assert "not shown" not in err


def test_smoke_test_composes_trains_generates_and_reloads(tmp_path, capsys):
    assert main(["smoke-test", "--steps", "3", "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "reloaded model generates the same tokens: True" in out
    assert (tmp_path / "combined" / "model.safetensors").is_file()
