"""`llm-modules generate` and `chat`: the answer keeps its markers, prompt + answer must fit in the context, and a
model that is missing or not a model fails with one line."""

from __future__ import annotations

import io

import pytest
import torch

from llm_modules import LLMModulesForCausalLM
from llm_modules.cli import main

MARKER = "<|end_of_solution|>"


def always_answer(model: LLMModulesForCausalLM, token: str) -> LLMModulesForCausalLM:
    """Make `model` answer `token` at every step: the small model's final norm outputs a constant vector, and only
    `token`'s row of the head reads it."""
    norm = model.small.ln_f  # GPT-Neo's final layer norm
    norm.weight.data.zero_()
    norm.bias.data.fill_(1.0)
    model.lm_head.weight.data.zero_()
    model.lm_head.weight.data[model.tokenizer.convert_tokens_to_ids(token)] = 1.0
    return model


@pytest.fixture(scope="module")
def model_dir(tiny_pair, tmp_path_factory):
    """A combined model that answers <|end_of_solution|> (a special token of its tokenizer), with small positions
    kept: its context is the tiny GPT-Neo's 256 positions."""
    torch.manual_seed(0)
    model = LLMModulesForCausalLM.from_large_and_small(
        *tiny_pair, cross_attention_heads=4, small_position_embeddings="keep"
    )
    directory = tmp_path_factory.mktemp("generate") / "model"
    always_answer(model, MARKER).save_pretrained(directory)
    return directory


def generate_argv(model_dir, *extra: str) -> list[str]:
    # A short system prompt: the default one alone is longer than this model's context.
    return ["generate", "--model", str(model_dir), "--system", "Be brief.", "--prompt", "what is 2 plus 3?", *extra]


def test_generate_keeps_the_answer_markers_streamed_or_not(model_dir, capsys, one_thread):
    assert main(generate_argv(model_dir, "--temperature", "0")) == 0
    streamed = capsys.readouterr().out
    assert main(generate_argv(model_dir, "--temperature", "0", "--no-stream")) == 0
    assert streamed == capsys.readouterr().out == MARKER + "\n"  # the stop string ends it and stays


def test_generate_refuses_a_prompt_and_answer_longer_than_the_context(model_dir, capsys):
    assert main(generate_argv(model_dir, "--max-new-tokens", "300")) == 2
    captured = capsys.readouterr()
    line = captured.err.splitlines()[-1]  # after transformers' "Loading weights" bars
    assert "Traceback" not in captured.err and line.startswith("llm-modules generate: error: This model's maximum context length is 256 tokens")
    assert "plus --max-new-tokens 300" in line and "lower --max-new-tokens to" in line
    assert not captured.out  # refused before generating anything


def test_chat_refuses_an_overlong_turn_and_keeps_the_session(model_dir, monkeypatch, capsys, one_thread, chat_prompts):
    prompts = chat_prompts
    turns = ["first", "many words " * 200, "second", "/exit"]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(turns) + "\n"))
    assert main(["chat", "--model", str(model_dir), "--system", "Be brief.", "--temperature", "0"]) == 0
    captured = capsys.readouterr()
    [error] = [line for line in captured.err.splitlines() if "error" in line]
    assert error.startswith("llm-modules chat: error: This model's maximum context length is 256 tokens")
    assert "(/reset clears the history)" in error
    assert captured.out.count("assistant> " + MARKER) == 2
    assert len(prompts) == 2 and "many words" not in prompts[1]  # the refused turn is not in the history
    assert prompts[1].count(MARKER) == 1  # the first answer, with its marker, is


@pytest.mark.parametrize("command", [["generate", "--prompt", "x"], ["chat"], ["serve"]])
def test_model_that_is_missing_or_not_a_model_dir(command, tmp_path, capsys):
    assert main([command[0], "--model", str(tmp_path / "nothing"), *command[1:]]) == 3
    assert "--model " + str(tmp_path / "nothing") + ": no such file or directory" in capsys.readouterr().err
    assert main([command[0], "--model", str(tmp_path), *command[1:]]) == 3
    assert "not a model directory (no config.json" in capsys.readouterr().err




@pytest.mark.parametrize("quantization", ["int8", "fp16"])
def test_generate_with_a_quantized_frozen_model(model_dir, capsys, one_thread, quantization):
    # This model's answer comes from its head alone, so it must not change when the frozen part is quantized.
    assert main(generate_argv(model_dir, "--temperature", "0", "--large-quantization", quantization)) == 0
    assert capsys.readouterr().out == MARKER + "\n"


def test_generate_with_int8_trained_parts(model_dir, capsys, one_thread):
    # The head that writes this model's answer is int8 now; its clear argmax survives the rounding.
    assert main(generate_argv(model_dir, "--temperature", "0", "--trained-quantization", "int8",
                              "--large-quantization", "int8")) == 0
    assert capsys.readouterr().out == MARKER + "\n"


@pytest.mark.parametrize("flag", ["--large-quantization", "--trained-quantization"])
def test_combined_model_precision_on_a_plain_model_is_a_usage_error(tiny_pair, capsys, flag):
    assert main(["generate", "--model", str(tiny_pair[1]), "--prompt", "hi", flag, "int8"]) == 2
    assert "set the parts of a combined model; this is a plain causal LM" in capsys.readouterr().err
