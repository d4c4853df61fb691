"""One rule for special tokens in prompts (`data.tokenize_prompt`), kept by training, evaluation, generation and
serving, tried with a tokenizer that adds a BOS (as Llama 3's, Gemma's and Mistral's do)."""

from __future__ import annotations

import pytest
import torch
from tokenizers import processors
from transformers import AutoModelForCausalLM, AutoTokenizer

from llm_modules.data import encode_conversation, render_prompt
from llm_modules.evaluation import evaluate_answers, generate_texts
from llm_modules.generation import chat_prompt_ids
from llm_modules.serving import ModelServer
from llm_modules.tiny_models import save_tiny_causal_lm, train_tokenizer

CORPUS = ["User: what is %d plus %d? Assistant: <|begin_of_solution|> %d <|end_of_solution|>" % (i, i, 2 * i)
          for i in range(60)]
TEMPLATE = "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
ROW = {"system": "Answer briefly.", "conversations": [{"from": "user", "value": "what is 2 plus 2?"},
                                                      {"from": "assistant", "value": "4"}]}
MESSAGES = [{"role": "user", "content": "what is 2 plus 2?"}]


@pytest.fixture(scope="module")
def bos_model_dir(tmp_path_factory):
    """A tiny Llama whose tokenizer puts `<s>` before every text it encodes with special tokens."""
    tokenizer = train_tokenizer(CORPUS, vocab_size=300, extra_tokens=["<s>"])
    bos = tokenizer.convert_tokens_to_ids("<s>")
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)]
    )
    tokenizer.bos_token = "<s>"
    return save_tiny_causal_lm(tmp_path_factory.mktemp("bos") / "llama", "llama", tokenizer, hidden_size=32,
                               layers=1, heads=4)


@pytest.fixture(scope="module")
def bos_model(bos_model_dir):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(bos_model_dir).eval(), AutoTokenizer.from_pretrained(bos_model_dir)


def fed_ids(model, monkeypatch) -> list[list[int]]:
    """The prompt ids of every row `model.generate` is called with, padding left out."""
    seen, generate = [], model.generate

    def recording(input_ids, attention_mask, **kwargs):
        seen.extend(ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask))
        return generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    monkeypatch.setattr(model, "generate", recording)
    return seen


def test_training_generation_and_evaluation_give_the_model_the_same_prompt(bos_model, monkeypatch):
    model, tokenizer = bos_model
    bos = tokenizer.bos_token_id
    trained = encode_conversation(ROW, tokenizer)
    answer_length = len(tokenizer("4", add_special_tokens=False)["input_ids"]) + 1  # and EOS
    trained_prompt = trained["input_ids"][:-answer_length]
    assert trained_prompt[0] == bos and trained_prompt.count(bos) == 1
    assert trained["labels"][0] == -100  # BOS is never a target
    # What `generate`, `chat` and the server send a model asked in the training layout (no chat template here).
    assert chat_prompt_ids(model, tokenizer, MESSAGES, system="Answer briefly.") == trained_prompt
    fed = fed_ids(model, monkeypatch)
    evaluate_answers(model, tokenizer, [ROW], max_new_tokens=2, progress=False)
    assert fed == [trained_prompt]


def test_a_chat_template_writes_the_only_bos(bos_model, monkeypatch):
    model, tokenizer = bos_model
    tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)
    tokenizer.chat_template = TEMPLATE
    bos = tokenizer.bos_token_id
    ids = chat_prompt_ids(model, tokenizer, MESSAGES)
    assert ids[0] == bos and ids.count(bos) == 1
    text = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    fed = fed_ids(model, monkeypatch)
    generate_texts(model, tokenizer, [text], max_new_tokens=2, stop_strings=None, progress=False, templated=True)
    assert fed == [ids]


def test_the_server_tokenizes_prompts_by_the_same_rule(bos_model):
    model, tokenizer = bos_model
    server = ModelServer(model, tokenizer, "tiny")
    bos = tokenizer.bos_token_id
    text = render_prompt(MESSAGES)
    assert server.completion_prompts(text) == [tokenizer(text)["input_ids"]]
    assert server.completion_prompts(text)[0][0] == bos
    assert server.completion_prompts([5, 6, 7]) == [[5, 6, 7]]  # token ids are sent as given
    assert server.completion_prompts([text, "hi"])[1][0] == bos
    # A chat in the training layout (no template): the ids a combined model was trained on.
    from llm_modules.serving.protocol import ChatMessage

    served = server.chat_prompt([ChatMessage(role="user", content=MESSAGES[0]["content"])])
    assert served == chat_prompt_ids(model, tokenizer, MESSAGES) and served.count(bos) == 1
