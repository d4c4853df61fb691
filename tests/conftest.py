"""Tiny random models of real architectures, saved like hub checkpoints with a locally trained tokenizer."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from llm_modules import LLMModulesForCausalLM  # noqa: E402
from llm_modules.tiny_models import save_tiny_causal_lm, train_tokenizer  # noqa: E402

CORPUS = [
    "The quick brown fox jumps over the lazy dog number %d." % i for i in range(100)
] + [
    "User: what is %d plus %d? Assistant: <|begin_of_solution|> %d <|end_of_solution|>" % (i, i + 1, 2 * i + 1)
    for i in range(100)
] + ["Größe, café, naïve — 数学 and émoji 🙂 %d" % i for i in range(20)]


@pytest.fixture
def one_thread():
    """One torch thread for the duration of a test. The machine's cores are shared: more threads than free cores make
    tiny models many times slower (the demo test keeps its threads: it trains for minutes, not steps)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """Local dirs of tiny pretrained-like models: two large/small pairs whose tokenizers differ in size."""
    root = tmp_path_factory.mktemp("tiny")
    tok_a = train_tokenizer(CORPUS, vocab_size=320)
    tok_b = train_tokenizer(CORPUS, vocab_size=400)
    return {
        "qwen2": save_tiny_causal_lm(root / "qwen2", "qwen2", tok_a, hidden_size=64, layers=2, heads=4),
        "gpt_neo": save_tiny_causal_lm(root / "gpt_neo", "gpt_neo", tok_a, hidden_size=32, layers=2, heads=4),
        "llama": save_tiny_causal_lm(root / "llama", "llama", tok_b, hidden_size=48, layers=2, heads=4),
        "gpt2": save_tiny_causal_lm(root / "gpt2", "gpt2", tok_b, hidden_size=32, layers=2, heads=4),
    }


@pytest.fixture(scope="session")
def tiny_pair(tiny_dirs):
    """(large dir, small dir) of the paper's architectures, tiny."""
    return tiny_dirs["qwen2"], tiny_dirs["gpt_neo"]


CHAT_TEMPLATE = (
    "{% for m in messages %}<|endoftext|>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


@pytest.fixture(scope="session")
def tiny_chat_pair(tiny_dirs, tmp_path_factory):
    """(large, small) tiny dirs (Qwen2 and Llama, as the real pair: their tokenizers differ, 320 and 400 tokens)
    whose tokenizers have a chat template, for the systems asked in their own template (demo --real, compare)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("tiny-chat")
    dirs = []
    for name in ("qwen2", "llama"):
        tokenizer = AutoTokenizer.from_pretrained(tiny_dirs[name])
        tokenizer.chat_template = CHAT_TEMPLATE
        AutoModelForCausalLM.from_pretrained(tiny_dirs[name]).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        dirs.append(str(root / name))
    return dirs


@pytest.fixture()
def tiny_model(tiny_pair):
    """A freshly composed tiny Qwen2 + GPT-Neo combined model in eval mode."""
    torch.manual_seed(0)
    return LLMModulesForCausalLM.from_large_and_small(*tiny_pair, cross_attention_heads=4).eval()


@pytest.fixture
def chat_prompts(monkeypatch):
    """The prompts `llm-modules generate`/`chat` send to the model, as text, in order (the CLI's generate_reply is
    wrapped for the test)."""
    from llm_modules.cli import generate as cli_generate

    prompts, generate_reply = [], cli_generate.generate_reply

    def recording(model, tokenizer, prompt_ids, args, stream):
        prompts.append(tokenizer.decode(prompt_ids))
        return generate_reply(model, tokenizer, prompt_ids, args, stream)

    monkeypatch.setattr(cli_generate, "generate_reply", recording)
    return prompts


@pytest.fixture(scope="session")
def real_models():
    """The real pair of the real-weights tests, fetched once into the user's model cache (`llm-modules fetch`):
    {"qwen2.5-coder-0.5b-instruct": FetchedModel, "smollm2-135m-instruct": FetchedModel}. A second session finds them
    there and only re-checks their hashes."""
    from llm_modules.fetch import fetch

    return {name: fetch(name) for name in ("qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct")}
