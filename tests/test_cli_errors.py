"""One rule for "this is not a model" in every command: the same one-line message (sources.resolve_model_source's),
no traceback, exit code 3, whichever command and flag names the model."""

from __future__ import annotations

import json

import pytest

from llm_modules.cli import main
from llm_modules.sources import ModelSourceError, resolve_model_source


@pytest.fixture
def dataset_file(tmp_path):
    row = {"conversations": [{"from": "user", "value": "1 + 1?"}, {"from": "assistant", "value": "2"}]}
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(row) + "\n")
    return str(path)


# Each command with the flag that names a model; `{}` is the model argument.
COMMANDS = {
    "info": ["info", "--model", "{}"],
    "eval": ["eval", "--model", "{}", "--dataset", "{dataset}"],
    "train": ["train", "--large", "{}", "--small", "{small}", "--dataset", "{dataset}", "--output-dir", "{out}"],
    "generate": ["generate", "--model", "{}", "--prompt", "hello"],
    "chat": ["chat", "--model", "{}"],
    "serve": ["serve", "--model", "{}"],
    "bench": ["bench", "decode", "--config", "{}"],
    "compare": ["compare", "--large", "{}", "--small", "{small}", "--output-dir", "{out}"],
}


def make_source(kind: str, tmp_path) -> str:
    """A path that is not a model: missing, a dir without config.json, or a plain file."""
    if kind == "missing":
        return str(tmp_path / "missing")
    if kind == "not_a_model_dir":
        (tmp_path / "notamodel").mkdir()
        (tmp_path / "notamodel" / "notes.txt").write_text("not a model")
        return str(tmp_path / "notamodel")
    (tmp_path / "notes.txt").write_text("not a model")
    return str(tmp_path / "notes.txt")


def run(command: str, source: str, tmp_path, tiny_pair, dataset_file) -> list[str]:
    fill = {"dataset": dataset_file, "small": str(tiny_pair[1]), "out": str(tmp_path / "out")}
    return [source if arg == "{}" else arg.format(**fill) for arg in COMMANDS[command]]


@pytest.mark.parametrize("kind", ["missing", "not_a_model_dir", "plain_file"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_path_that_is_not_a_model_fails_alike_in_every_command(
    command, kind, tmp_path, tiny_pair, dataset_file, capsys
):
    source = make_source(kind, tmp_path)
    argv = run(command, source, tmp_path, tiny_pair, dataset_file)
    flag = argv[argv.index(source) - 1]
    with pytest.raises(ModelSourceError) as expected:
        resolve_model_source(source, flag)
    assert main(argv) == 3
    captured = capsys.readouterr()
    assert captured.err == f"llm-modules {command}: error: {expected.value}\n"
    assert not (tmp_path / "out").exists()  # nothing half-written


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_mistyped_folder_name_fails_alike_in_every_command(command, tmp_path, tiny_pair, dataset_file, capsys,
                                                            monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny-run").mkdir()
    argv = run(command, "tiny-rnu", tmp_path, tiny_pair, dataset_file)
    flag = argv[argv.index("tiny-rnu") - 1]
    assert main(argv) == 3
    assert capsys.readouterr().err.startswith(
        f"llm-modules {command}: error: {flag} tiny-rnu: no such folder here (did you mean tiny-run?)"
    )


@pytest.mark.parametrize("command", ["info", "eval", "bench"])
def test_a_config_without_a_model_type_is_not_a_model(command, tmp_path, tiny_pair, dataset_file, capsys):
    """The issue's `eval --model notamodel`: a config.json transformers cannot place is refused in the same words."""
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text('{"hidden_size": 8}')
    argv = run(command, str(tmp_path / "odd"), tmp_path, tiny_pair, dataset_file)
    assert main(argv) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{tmp_path / 'odd'}: not a model transformers knows" in err


def test_a_hub_id_that_cannot_be_fetched_is_not_found(capsys):
    """transformers wraps the hub's "not found" (here: offline and not cached) in a plain OSError: still exit 3."""
    assert main(["info", "--large", "nobody/no-such-model", "--small", "nobody/no-such-model"]) == 3
    err = capsys.readouterr().err
    assert err.startswith("llm-modules info: error: ") and err.count("\n") == 1 and "OSError" not in err


@pytest.mark.parametrize("command", ["train", "eval"])
def test_a_data_file_that_cannot_be_read_is_bad_input_in_every_command(command, tmp_path, tiny_pair, capsys):
    broken = tmp_path / "rows.json"
    broken.write_text('[{"conversations": [')
    argv = run(command, str(tiny_pair[0]), tmp_path, tiny_pair, str(broken))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"llm-modules {command}: error: {broken}: not valid JSON (line 1, column 21: Expecting value)\n"


def handlers():
    """(command words, handler function) of every command that runs something."""
    import argparse

    from llm_modules.cli import build_parser

    def walk(parser, words):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, (*words, name))
        if parser.get_default("handler") is not None:
            yield words, parser.get_default("handler")

    return list(walk(build_parser(), ()))


@pytest.mark.parametrize("words, handler", handlers(), ids=lambda x: " ".join(x) if isinstance(x, tuple) else "")
@pytest.mark.parametrize("error", [ValueError("the value broke"), ImportError("a module is missing"), RuntimeError()])
def test_an_unexpected_failure_is_one_line_without_a_class_name_in_every_command(words, handler, error, capsys,
                                                                              monkeypatch):
    import sys

    def failing(args):
        raise error

    monkeypatch.setattr(sys.modules[handler.__module__], handler.__name__, failing)
    argv = list(words)
    if COMMANDS.get(words[0], [])[: len(words)] == list(words):  # its required flags, any value: never read
        argv = [arg if "{" not in arg else "x" for arg in COMMANDS[words[0]]]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"llm-modules {words[0]}: error: ")
    assert type(error).__name__ not in err and "(--debug shows the traceback)" in err
