"""The OpenAI request fields of the server, in process (FastAPI's TestClient): each accepted field works as the
OpenAI API specifies (top_p 0, logit_bias, presence/frequency penalties, chat and completion logprobs, echo with
max_tokens 0 as lm-evaluation-harness sends it), every other field gets a 400 naming it; CORS; chat templates that
refuse system messages or non-alternating roles."""

from __future__ import annotations

import json

import pytest
import torch
from fastapi.testclient import TestClient

from llm_modules import LLMModulesForCausalLM
from llm_modules.cli import main
from llm_modules.serving import ModelServer, create_app, load_model
from llm_modules.serving.protocol import ChatMessage

M = "m"
HI = [{"role": "user", "content": "hi"}]
PROMPT = "the cat sat"


@pytest.fixture(scope="module")
def model(tiny_pair):
    torch.manual_seed(0)
    return LLMModulesForCausalLM.from_large_and_small(*tiny_pair, cross_attention_heads=4).eval()


@pytest.fixture(scope="module")
def server(model):
    return ModelServer(model, model.tokenizer, M, max_batch_size=4, max_new_tokens_limit=16)


@pytest.fixture(scope="module")
def http(server):
    with TestClient(create_app(server)) as client:
        yield client


def post(http, path: str, body: dict) -> dict:
    response = http.post(f"/v1/{path}", json={"model": M, **body})
    assert response.status_code == 200, response.text
    return response.json()


def refused(http, path: str, body: dict, param: str) -> str:
    """The message of the 400 that `body` gets; the error names `param`."""
    response = http.post(f"/v1/{path}", json={"model": M, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    assert "Error" not in error["message"] and "pydantic" not in error["message"], error  # no class names
    return error["message"]


def stream(http, path: str, body: dict) -> list[dict]:
    events = http.post(f"/v1/{path}", json={"model": M, **body, "stream": True}).text.split("\n\n")
    return [json.loads(e[len("data: "):]) for e in events if e.startswith("data: {")]


def log_probs(model, ids: list[int]) -> torch.Tensor:
    """`[len(ids), vocab]` log-probabilities of the token after each position (the raw distribution)."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)


def reference_greedy(model, ids: list[int], steps: int, bias: dict[int, float] = {}, presence: float = 0.0,
                     frequency: float = 0.0) -> list[int]:
    """Greedy decoding with OpenAI's logit bias and penalties, written out: logits + bias - frequency * count -
    presence * (count > 0), counting the generated tokens."""
    new: list[int] = []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids + new])).logits[0, -1].float()
        for token, value in bias.items():
            logits[token] += value
        counts = torch.bincount(torch.tensor(new, dtype=torch.long), minlength=logits.shape[0]).float()
        logits -= frequency * counts + presence * (counts > 0).float()
        new.append(int(logits.argmax()))
    return new


def completion_ids(model, text: str = PROMPT) -> list[int]:
    return model.tokenizer(text)["input_ids"]


# ---- item 1: top_p 0 ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_top_p_zero_is_greedy(http, temperature, one_thread):
    greedy = post(http, "completions", {"prompt": PROMPT, "max_tokens": 6, "temperature": 0})["choices"][0]["text"]
    body = {"prompt": PROMPT, "max_tokens": 6, "temperature": temperature, "top_p": 0}
    assert post(http, "completions", body)["choices"][0]["text"] == greedy
    chats = [post(http, "chat/completions", {"messages": HI, "max_tokens": 4, **sampling})
             for sampling in ({"top_p": 0}, {"temperature": 0})]
    assert chats[0]["choices"][0]["message"] == chats[1]["choices"][0]["message"]


# ---- item 2: logit_bias and penalties ----------------------------------------------------------------------------


def test_logit_bias_applies_to_greedy_and_sampled_rows(http, model, one_thread):
    ids = completion_ids(model)
    plain = reference_greedy(model, ids, 4)
    banned = {plain[0]: -100.0}
    expected = reference_greedy(model, ids, 4, banned)
    assert expected[0] != plain[0]
    body = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "logit_bias": {str(plain[0]): -100}}
    assert post(http, "completions", body)["choices"][0]["text"] == model.tokenizer.decode(expected)
    # +100 on one token: every step makes it, sampled or greedy, chat or not.
    token = model.tokenizer(" dog")["input_ids"][0]
    forced = {str(token): 100}
    sampled = post(http, "completions", {"prompt": PROMPT, "max_tokens": 3, "temperature": 1, "seed": 3,
                                         "logit_bias": forced, "ignore_eos": True})
    assert sampled["choices"][0]["text"] == model.tokenizer.decode([token] * 3)
    chat = post(http, "chat/completions", {"messages": HI, "max_tokens": 3, "temperature": 0, "logit_bias": forced})
    assert chat["choices"][0]["message"]["content"] == model.tokenizer.decode([token] * 3)


def test_presence_and_frequency_penalties(http, model, one_thread):
    ids = completion_ids(model)
    plain = reference_greedy(model, ids, 12)
    for presence, frequency in ((2.0, 0.0), (0.0, 2.0), (1.0, -0.5)):
        expected = reference_greedy(model, ids, 12, presence=presence, frequency=frequency)
        body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": True,
                "presence_penalty": presence, "frequency_penalty": frequency}
        reply = post(http, "completions", body)["choices"][0]["text"]
        assert reply == model.tokenizer.decode(expected), (presence, frequency)
    assert reference_greedy(model, ids, 12, presence=2.0) != plain  # the penalty made a difference


@pytest.mark.parametrize("bias, word", [({"x": 1}, "not a token id"), ({"100000": 1}, "vocabulary"),
                                         ({"5": 101}, "-100"), ({"5": "1"}, "number")])
def test_bad_logit_bias_is_a_400(http, bias, word):
    message = refused(http, "completions", {"prompt": PROMPT, "logit_bias": bias}, "logit_bias")
    assert word in message


# ---- item 3: chat logprobs ---------------------------------------------------------------------------------------


def test_chat_logprobs_and_top_logprobs(http, server, model, one_thread):
    body = {"messages": HI, "max_tokens": 4, "temperature": 0, "ignore_eos": True, "logprobs": True,
            "top_logprobs": 3}
    reply = post(http, "chat/completions", body)
    content = reply["choices"][0]["logprobs"]["content"]
    assert len(content) == 4
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert entry["bytes"] == list(entry["token"].encode())
        assert len(entry["top_logprobs"]) == 3
        best = entry["top_logprobs"][0]
        assert (best["token"], best["logprob"]) == (entry["token"], pytest.approx(entry["logprob"], abs=1e-4))
        assert [t["logprob"] for t in entry["top_logprobs"]] == sorted(
            (t["logprob"] for t in entry["top_logprobs"]), reverse=True)
    # The model's own distribution: the first token's logprob is log_softmax of the prompt's last logits.
    ids = server.chat_prompt([ChatMessage(role="user", content="hi")])
    first = log_probs(model, ids)[-1]
    assert content[0]["logprob"] == pytest.approx(float(first.max()), abs=1e-4)
    # Streamed: the chunks carry the same entries.
    chunks = stream(http, "chat/completions", body)
    streamed = [e for c in chunks for e in ((c["choices"][0].get("logprobs") or {}).get("content") or [])]
    assert [e["token"] for e in streamed] == [e["token"] for e in content]
    # logprobs alone: no top_logprobs entries.
    alone = post(http, "chat/completions", {**body, "top_logprobs": None})["choices"][0]["logprobs"]["content"]
    assert [e["top_logprobs"] for e in alone] == [[]] * 4


def test_chat_logprobs_fields_are_checked(http):
    refused(http, "chat/completions", {"messages": HI, "top_logprobs": 2}, "top_logprobs")  # without logprobs
    refused(http, "chat/completions", {"messages": HI, "logprobs": True, "top_logprobs": 21}, "top_logprobs")
    refused(http, "chat/completions", {"messages": HI, "logprobs": 3}, "logprobs")  # the completions form


# ---- item 4: completions echo and logprobs -------------------------------------------------------------------------


def test_echo_with_max_tokens_0_scores_the_prompt_as_lm_eval_asks(http, model, one_thread):
    ids = completion_ids(model, "the quick brown fox jumps")
    expected = log_probs(model, ids)
    # lm-evaluation-harness's local-completions loglikelihood request: token ids, echo, logprobs 1, temperature 0.
    for prompt in ([ids], "the quick brown fox jumps"):
        reply = post(http, "completions", {"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 1,
                                           "temperature": 0})
        choice = reply["choices"][0]
        assert choice["text"] == "the quick brown fox jumps"
        logprobs = choice["logprobs"]
        assert len(logprobs["tokens"]) == len(ids) and logprobs["token_logprobs"][0] is None
        assert logprobs["top_logprobs"][0] is None
        for i in range(1, len(ids)):
            assert logprobs["token_logprobs"][i] == pytest.approx(float(expected[i - 1, ids[i]]), abs=1e-4)
            top = logprobs["top_logprobs"][i]
            assert max(top.values()) == pytest.approx(float(expected[i - 1].max()), abs=1e-4)
            assert logprobs["tokens"][i] in top  # the prompt's token, with the most likely one
        assert logprobs["text_offset"] == [sum(len(t) for t in logprobs["tokens"][:i]) for i in range(len(ids))]
        assert reply["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}


def test_echo_and_logprobs_with_a_completion(http, model, one_thread):
    ids = completion_ids(model)
    new = reference_greedy(model, ids, 3)
    expected = log_probs(model, ids + new)
    body = {"prompt": PROMPT, "max_tokens": 3, "temperature": 0, "ignore_eos": True, "echo": True, "logprobs": 2}
    choice = post(http, "completions", body)["choices"][0]
    assert choice["text"] == PROMPT + model.tokenizer.decode(new)
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == len(ids) + 3
    got = logprobs["token_logprobs"][1:]
    want = [float(expected[i - 1, t]) for i, t in enumerate(ids + new) if i > 0]
    assert got == pytest.approx(want, abs=1e-4)
    assert all(len(top) in (2, 3) for top in logprobs["top_logprobs"][1:])
    # Without echo: the completion's tokens only; streamed, the same entries.
    plain = post(http, "completions", {**body, "echo": False})["choices"][0]
    assert plain["text"] == model.tokenizer.decode(new)
    assert plain["logprobs"]["token_logprobs"] == pytest.approx(want[-3:], abs=1e-4)
    chunks = stream(http, "completions", body)
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]
    tokens = [t for c in chunks if c["choices"][0]["logprobs"] for t in c["choices"][0]["logprobs"]["tokens"]]
    assert tokens == logprobs["tokens"]


def test_max_tokens_0_needs_echo_and_logprobs_are_bounded(http):
    refused(http, "completions", {"prompt": PROMPT, "max_tokens": 0}, "max_tokens")
    refused(http, "completions", {"prompt": PROMPT, "logprobs": 6}, "logprobs")
    refused(http, "completions", {"prompt": PROMPT, "logprobs": True}, "logprobs")  # the chat form
    refused(http, "chat/completions", {"messages": HI, "max_tokens": 0}, "max_tokens")


# ---- item 5: CORS --------------------------------------------------------------------------------------------------


def test_cors_only_for_allowed_origins(server, model_dir_for_cli, monkeypatch):
    preflight = {"Origin": "http://page.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    with TestClient(create_app(server)) as http:  # the default: no CORS
        response = http.options("/v1/chat/completions", headers=preflight)
        assert response.status_code == 405 and "access-control-allow-origin" not in response.headers
        assert response.json()["error"]["message"]
        models = http.get("/v1/models", headers={"Origin": "http://page.example"})
        assert "access-control-allow-origin" not in models.headers

    import uvicorn

    seen = {}
    monkeypatch.setattr(uvicorn.Server, "run", lambda self: seen.update(app=self.config.app))
    assert main(["serve", "--model", str(model_dir_for_cli), "--api-key", "k",
                 "--allowed-origins", "http://page.example", "http://other.example"]) == 0
    with TestClient(seen["app"]) as http:
        response = http.options("/v1/chat/completions", headers=preflight)  # no key needed for a preflight
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == "http://page.example"
        assert "authorization" in response.headers["access-control-allow-headers"].lower()
        models = http.get("/v1/models", headers={"Origin": "http://page.example", "Authorization": "Bearer k"})
        assert models.status_code == 200 and models.headers["access-control-allow-origin"] == "http://page.example"
        other = http.options("/v1/chat/completions", headers={**preflight, "Origin": "http://evil.example"})
        assert other.status_code == 400 and "access-control-allow-origin" not in other.headers


@pytest.fixture(scope="module")
def model_dir_for_cli(model, tmp_path_factory):
    directory = tmp_path_factory.mktemp("cors") / "m"
    model.save_pretrained(directory)
    return directory


# ---- item 6: chat templates that refuse system messages or non-alternating roles ------------------------------------

# Gemma's rules, as its template states them.
STRICT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture(scope="module")
def strict_model(tiny_dirs):
    model, tokenizer = load_model(tiny_dirs["gpt2"], device="cpu")
    tokenizer.chat_template = STRICT_TEMPLATE
    return model, tokenizer


def prompt_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_a_template_without_a_system_role_gets_it_in_the_first_user_turn(strict_model, one_thread):
    model, tokenizer = strict_model
    body = {"model": "g", "max_tokens": 1, "temperature": 0}
    for system in (None, "Be brief."):
        server = ModelServer(model, tokenizer, "g", max_batch_size=1, max_new_tokens_limit=4, system_prompt=system)
        with TestClient(create_app(server)) as http:
            plain = http.post("/v1/chat/completions", json={**body, "messages": HI})
            assert plain.status_code == 200, plain.text
            expected = f"<user>{system}\nhi<assistant>" if system else "<user>hi<assistant>"
            assert plain.json()["usage"]["prompt_tokens"] == prompt_tokens(tokenizer, expected)
            # The client's system message too, as llama.cpp's server folds it.
            messages = [{"role": "system", "content": "Rules."}, *HI]
            folded = http.post("/v1/chat/completions", json={**body, "messages": messages})
            assert folded.status_code == 200, folded.text
            assert folded.json()["usage"]["prompt_tokens"] == prompt_tokens(tokenizer, "<user>Rules.\nhi<assistant>")


def test_a_template_error_is_the_clients_400_naming_the_rule(strict_model):
    model, tokenizer = strict_model
    server = ModelServer(model, tokenizer, "g", max_batch_size=1, max_new_tokens_limit=4)
    with TestClient(create_app(server)) as http:
        messages = [*HI, {"role": "user", "content": "again"}]
        response = http.post("/v1/chat/completions", json={"model": "g", "messages": messages, "max_tokens": 1})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == "messages" and "roles must alternate" in error["message"]
        assert "TemplateError" not in error["message"]


# ---- item 7: every field works or is refused -----------------------------------------------------------------------


@pytest.mark.parametrize("path, body, param", [
    ("chat/completions", {"messages": HI, "frobnicate": 1}, "frobnicate"),
    ("completions", {"prompt": PROMPT, "frobnicate": 1}, "frobnicate"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi", "colour": "red"}]}, "messages.0.colour"),
    ("chat/completions", {"messages": HI, "response_format": {"type": "json_object"}}, "response_format"),
    ("chat/completions", {"messages": HI, "tool_choice": "auto"}, "tool_choice"),
    ("chat/completions", {"messages": HI, "parallel_tool_calls": True}, "parallel_tool_calls"),
    ("chat/completions", {"messages": HI, "presence_penalty": 2.5}, "presence_penalty"),
    ("chat/completions", {"messages": HI, "frequency_penalty": -3}, "frequency_penalty"),
    ("chat/completions", {"messages": HI, "top_p": 1.5}, "top_p"),
    ("chat/completions", {"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "a"}]}, *HI]},
     "messages.0.tool_calls"),
    ("completions", {"prompt": PROMPT, "suffix": "end"}, "suffix"),
    ("completions", {"prompt": PROMPT, "best_of": 2}, "best_of"),
    ("completions", {"prompt": PROMPT, "top_logprobs": 2}, "top_logprobs"),
])
def test_fields_not_supported_get_a_400_naming_them(http, path, body, param):
    refused(http, path, body, param)


def test_fields_accepted_as_documented(http, one_thread):
    ok = [
        ("chat/completions", {"messages": HI, "user": "ann", "response_format": {"type": "text"}, "tool_choice": "none",
                              "tools": [], "max_tokens": 1}),
        ("completions", {"prompt": PROMPT, "user": "ann", "best_of": 2, "n": 2, "suffix": None, "echo": False,
                         "max_tokens": 1}),
    ]
    for path, body in ok:
        post(http, path, body)
