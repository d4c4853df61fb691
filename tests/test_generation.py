"""The rules every way of generating shares (llm_modules.generation): which tokens answer text drops, streaming the
same text, and whether prompt + completion fit in the model's context."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import CORPUS

from llm_modules import LLMModulesForCausalLM
from llm_modules.generation import (
    AnswerStreamer,
    AnswerTextPieces,
    ContextLengthError,
    check_generation_length,
    context_length,
    control_token_ids,
    decode_answer,
)
from llm_modules.tiny_models import train_tokenizer

ANSWER = "<|begin_of_thought|> 3 <|end_of_thought|> <|begin_of_solution|> The answer is 5 <|end_of_solution|>"


@pytest.fixture(scope="module")
def chat_tokenizer():
    """A tokenizer whose special tokens are EOS, pad, the Stratos markers, ChatML turn markers and a tool token; its
    chat template writes the turn markers."""
    tokenizer = train_tokenizer(CORPUS, vocab_size=320, extra_tokens=["<|im_start|>", "<|im_end|>", "<|tool|>"])
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}<|im_start|>assistant\n"
    )
    return tokenizer


def answer_ids(tokenizer) -> list[int]:
    """ANSWER, then end of turn, EOS and padding: what a finished row of `generate` holds."""
    ids = tokenizer(ANSWER + "<|tool|>", add_special_tokens=False)["input_ids"]
    specials = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>", "<|pad|>", "<|pad|>"])
    return ids + specials


def test_control_tokens_are_named_specials_end_of_turn_and_template_markers_never_answer_markers(chat_tokenizer):
    def tokens(tokenizer, model=None) -> list[str]:
        return sorted(tokenizer.convert_ids_to_tokens(sorted(control_token_ids(tokenizer, model))))

    assert tokens(chat_tokenizer) == ["<|endoftext|>", "<|im_end|>", "<|im_start|>", "<|pad|>"]
    # The model's end-of-turn ids count even when the template does not write them.
    tool = chat_tokenizer.convert_tokens_to_ids("<|tool|>")
    assert "<|tool|>" in tokens(chat_tokenizer, SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[tool])))
    # An answer marker stays answer text even when a template writes it or the model ends its turns with it.
    plain = train_tokenizer(CORPUS, vocab_size=320)
    plain.chat_template = "{{ messages[0].content }}<|end_of_solution|>"
    end = plain.convert_tokens_to_ids("<|end_of_solution|>")
    assert tokens(plain, SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=end))) == [
        "<|endoftext|>", "<|pad|>"
    ]


def test_decode_answer_keeps_markers_and_additional_tokens_and_drops_control_tokens(chat_tokenizer):
    ids = answer_ids(chat_tokenizer)
    text = decode_answer(chat_tokenizer, torch.tensor(ids), control_token_ids(chat_tokenizer))
    assert text == ANSWER + "<|tool|>"
    assert chat_tokenizer.decode(ids, skip_special_tokens=True) != text  # what the entry points did before


def test_streamed_answer_is_the_decoded_answer(chat_tokenizer, capsys):
    control = control_token_ids(chat_tokenizer)
    ids = answer_ids(chat_tokenizer)
    prompt = torch.tensor([chat_tokenizer("<|im_start|>user\nhi<|im_end|>\n")["input_ids"]])
    expected = decode_answer(chat_tokenizer, ids, control)

    streamer = AnswerStreamer(chat_tokenizer, control)
    streamer.put(prompt)  # generate() puts the prompt first, [1, prompt length]; it is skipped
    for token in ids:
        streamer.put(torch.tensor([token]))
    streamer.end()
    assert capsys.readouterr().out == expected + "\n"

    pieces = AnswerTextPieces(chat_tokenizer, control)  # the server's: new ids only, as its engine makes them
    streamed = [pieces.feed([token]) for token in ids] + [pieces.finish()]
    assert "".join(streamed) == expected
    assert streamed[:2] == ["", "<|begin_of_thought|> "]  # text comes as it is final, not all at the end


@pytest.fixture(scope="module")
def keep_model(tiny_pair):
    """Small positions kept: the context is the tiny GPT-Neo's 256 positions, not the tiny Qwen2's 4096."""
    torch.manual_seed(0)
    return LLMModulesForCausalLM.from_large_and_small(
        *tiny_pair, cross_attention_heads=4, small_position_embeddings="keep"
    ).eval()


def test_context_length_of_combined_models(keep_model, tiny_model):
    assert context_length(keep_model) == 256
    assert context_length(tiny_model) == 4096  # zeroed small positions: only the large model limits


def test_check_generation_length_one_rule(keep_model):
    assert check_generation_length(keep_model, 200, 56) == 56
    assert check_generation_length(keep_model, 200, None) == 56  # as many as fit
    assert check_generation_length(keep_model, 200, None, up_to=10) == 10
    with pytest.raises(ContextLengthError) as error:
        check_generation_length(keep_model, 200, 57, option="--max-new-tokens")
    message = str(error.value)
    assert not error.value.prompt_too_long
    assert "256 tokens" in message and "small_position_embeddings='keep'" in message
    assert "(200 tokens) plus --max-new-tokens 57 is 257 tokens: lower --max-new-tokens to 56" in message
    with pytest.raises(ContextLengthError) as error:
        check_generation_length(keep_model, 256, None)
    assert error.value.prompt_too_long and "the prompt is 256 tokens" in str(error.value)


def test_generation_at_the_context_limit_works(keep_model, one_thread):
    """What the rule allows runs: a prompt and completion filling the context exactly (the length the model's own
    position check would refuse one token later)."""
    prompt = torch.randint(10, 300, (1, 250))
    new = check_generation_length(keep_model, prompt.shape[1], None)
    output = keep_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, do_sample=False,
                                 min_new_tokens=new)
    assert output.shape[1] == 256
