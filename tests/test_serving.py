"""The OpenAI-compatible server, driven by the official `openai` client against `llm-modules serve` in a subprocess."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch

from llm_modules import LLMModulesForCausalLM
from llm_modules.cli import main
from llm_modules.data import STOP_STRINGS, render_prompt
from llm_modules.generation import control_token_ids, decode_answer

pytestmark = pytest.mark.slow  # a server process

KEY = "test-key"
LIMIT = 512  # --max-new-tokens-limit; generating this many takes seconds even on a fast CPU
CONCURRENCY = 4
SYSTEM = "Answer briefly."
MODEL = "tiny-combined"  # the served model's id: its dir's name
HI = [{"role": "user", "content": "hi"}]
SERVING_PAGE = Path(__file__).resolve().parents[1] / "docs" / "serving.md"


@pytest.fixture(scope="module")
def model_dir(tiny_pair, tmp_path_factory):
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("served") / MODEL
    LLMModulesForCausalLM.from_large_and_small(*tiny_pair, cross_attention_heads=4).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def local_model(model_dir):
    """The served model loaded in this process: what the server must answer with greedy decoding."""
    return LLMModulesForCausalLM.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def server_log(tmp_path_factory) -> Path:
    """What the server process writes (stdout and stderr)."""
    return tmp_path_factory.mktemp("server") / "server.log"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_healthy(url: str, process: subprocess.Popen, output) -> None:
    """Until `url/health` answers 200; fails with the server's `output()` if it exits or takes over 120 s."""
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert process.poll() is None, f"server exited:\n{output()}"
        assert time.monotonic() < deadline, f"server did not start:\n{output()}"
        time.sleep(0.3)


@pytest.fixture(scope="module")
def server(model_dir, server_log):
    """Base URL of `llm-modules serve` on a free loopback port; the process ends with the module."""
    port = free_port()
    log = open(server_log, "w+")
    command = [
        sys.executable, "-m", "llm_modules.cli", "serve", "--model", str(model_dir), "--port", str(port),
        "--api-key", KEY, "--max-batch-size", str(CONCURRENCY), "--max-new-tokens-limit", str(LIMIT),
    ]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"

    def output() -> str:
        log.seek(0)
        return log.read()

    wait_until_healthy(url, process, output)
    yield url
    process.terminate()
    process.wait(timeout=30)
    log.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


def greedy(local_model, text: str, max_new_tokens: int) -> tuple[str, int, int]:
    """(text, prompt tokens, new tokens) of `generate` in this process, for comparison with the server."""
    tokenizer = local_model.tokenizer
    inputs = tokenizer(text, return_tensors="pt")
    output = local_model.generate(
        **inputs, max_new_tokens=max_new_tokens, do_sample=False, stop_strings=STOP_STRINGS, tokenizer=tokenizer
    )
    prompt_length = inputs["input_ids"].shape[1]
    new_tokens = output.shape[1] - prompt_length
    text = decode_answer(tokenizer, output[0, prompt_length:], control_token_ids(tokenizer, local_model))
    return text, prompt_length, new_tokens


def test_models_health_and_api_key(server, client):
    assert [m.id for m in client.models.list()] == [MODEL]
    health = httpx.get(f"{server}/health").json()  # no key needed: load balancers probe it
    assert health["status"] == "ok" and health["model"] == MODEL
    for api_key in ("wrong-key", ""):
        anonymous = openai.OpenAI(base_url=f"{server}/v1", api_key=api_key or "unused", max_retries=0)
        if not api_key:
            anonymous = anonymous.with_options(default_headers={"Authorization": ""})
        with pytest.raises(openai.AuthenticationError) as error:
            anonymous.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
        assert error.value.status_code == 401 and error.value.code == "invalid_api_key"
    assert httpx.get(f"{server}/v1/models").status_code == 401


def test_chat_matches_generate_and_streams_the_same_text(client, local_model):
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "what is 2 plus 3?"}]
    expected, prompt_tokens, new_tokens = greedy(local_model, render_prompt(messages), 12)
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    assert reply.object == "chat.completion" and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt_tokens, new_tokens)
    assert reply.usage.total_tokens == prompt_tokens + new_tokens
    assert reply.choices[0].finish_reason == ("length" if new_tokens == 12 else "stop")

    chunks = list(client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reply.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == new_tokens and not chunks[-1].choices


def test_chat_without_system_message_uses_the_default_system_prompt(client, local_model):
    messages = [*HI, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}]
    expected, prompt_tokens, _ = greedy(local_model, render_prompt(messages), 4)  # render_prompt's default system
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
    assert reply.usage.prompt_tokens == prompt_tokens and reply.choices[0].message.content == expected


def test_completions_stop_sequences_and_seeds(client, local_model):
    expected, prompt_tokens, _ = greedy(local_model, "the cat sat", 16)
    reply = client.completions.create(model=MODEL, prompt="the cat sat", max_tokens=16, temperature=0)
    assert reply.object == "text_completion" and reply.choices[0].text == expected
    assert reply.usage.prompt_tokens == prompt_tokens

    # A stop sequence taken from the greedy text: the answer ends just before it, streamed or not.
    start = next(i for i in range(1, len(expected) - 1) if expected[i:i + 2].isascii() and expected[i:i + 2].isalnum())
    stop = expected[start:start + 2]
    cut = expected[:expected.index(stop)]
    greedy_16 = dict(model=MODEL, prompt="the cat sat", max_tokens=16, temperature=0)
    stopped = client.completions.create(**greedy_16, stop=[stop])
    assert (stopped.choices[0].text, stopped.choices[0].finish_reason) == (cut, "stop")
    streamed = client.completions.create(**greedy_16, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut

    def sample(seed: int) -> str:
        return client.completions.create(
            model=MODEL, prompt="the cat sat", max_tokens=8, temperature=1.0, top_p=0.9, seed=seed
        ).choices[0].text

    assert sample(1) == sample(1)
    assert len({sample(1), sample(2), sample(3)}) > 1


def too_long_prompt(local_model, tokens: int) -> str:
    text = "the " * tokens
    assert len(local_model.tokenizer(text)["input_ids"]) >= tokens
    return text


@pytest.mark.parametrize(
    "path, body, status, param",
    [
        ("chat/completions", b'{"model": MODEL, "messages": [', 400, None),  # invalid JSON
        ("chat/completions", b'["not", "an", "object"]', 400, None),
        ("chat/completions", {"model": MODEL}, 400, "messages"),
        ("chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, 400, "model"),
        ("chat/completions", {"model": MODEL, "messages": "hi"}, 400, "messages"),
        ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content"),
        ("chat/completions", {"model": MODEL, "messages": [{"role": "bot", "content": "hi"}]}, 400, "messages.0.role"),
        ("chat/completions", {"model": MODEL, "messages": HI, "max_tokens": "5"}, 400, "max_tokens"),
        ("chat/completions", {"model": MODEL, "messages": HI, "temperature": "hot"}, 400, "temperature"),
        ("chat/completions", {"model": MODEL, "messages": HI, "stream": "yes"}, 400, "stream"),
        ("chat/completions", {"model": MODEL, "messages": HI, "n": 0}, 400, "n"),
        ("chat/completions", {"model": "gpt-4o", "messages": HI}, 404, "model"),
        ("chat/completions", {"model": MODEL, "messages": HI, "max_tokens": 0}, 400, "max_tokens"),
        ("chat/completions", {"model": MODEL, "messages": HI, "max_tokens": LIMIT + 1}, 400, "max_tokens"),
        ("chat/completions", {"model": MODEL, "messages": [{"role": "tool", "content": "4", "tool_call_id": "a"}]},
         400, "messages.0.role"),
        ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": None}]}, 400, "messages.0.content"),
        ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
         400, "messages.0.content"),
        ("chat/completions", {"model": MODEL, "messages": HI, "tools": [{"type": "function"}]}, 400, "tools"),
        ("completions", {"model": MODEL, "prompt": 42}, 400, "prompt"),
        ("completions", {"model": MODEL, "prompt": []}, 400, "prompt"),
        ("completions", {"model": MODEL, "prompt": [[1, 2], ["a"]]}, 400, "prompt"),
        ("completions", {"model": MODEL, "prompt": [1, 10**6]}, 400, "prompt"),  # not in the vocabulary
        ("completions", {"model": MODEL, "prompt": [[1], [-1]]}, 400, "prompt"),
        ("completions", {"model": MODEL, "prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
        ("completions", {"model": MODEL, "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ("models/none", None, 404, "model"),
        ("no/such/route", {}, 404, None),
    ],
)
def test_malformed_requests_get_openai_errors_and_the_server_keeps_serving(server, client, path, body, status, param):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    if body is None:
        response = httpx.get(f"{server}/v1/{path}", headers=headers)
    else:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = httpx.post(f"{server}/v1/{path}", content=content, headers=headers)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["type"]
    assert error["param"] == param
    assert client.completions.create(model=MODEL, prompt="ok", max_tokens=1).usage.completion_tokens == 1


def test_prompt_longer_than_the_context(client, local_model):
    context = local_model.config.large_config.max_position_embeddings
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=MODEL, prompt=too_long_prompt(local_model, context + 10), max_tokens=1)
    assert error.value.code == "context_length_exceeded" and f"{context} tokens" in error.value.message
    # The prompt fits but the completion would not.
    prompt = too_long_prompt(local_model, context - 100)
    room = context - len(local_model.tokenizer(prompt)["input_ids"])
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=room + 1)
    assert error.value.code == "context_length_exceeded" and error.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError):  # wrong types through the client too
        client.chat.completions.create(model=MODEL, messages=HI, max_tokens=0)


def test_concurrent_requests_queue_and_match_the_same_requests_alone(server, client):
    def request(i: int) -> str:
        sampling = {"temperature": 0} if i % 2 else {"temperature": 0.8, "seed": i}
        if i % 4 < 2:
            messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"what is {i} plus 1?"}]
            reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, **sampling)
            return reply.choices[0].message.content
        reply = client.completions.create(model=MODEL, prompt=f"dog number {i}", max_tokens=8, **sampling)
        return reply.choices[0].text

    alone = [request(i) for i in range(16)]
    seen, done = [], threading.Event()

    def watch_health() -> None:
        while not done.is_set():
            seen.append(httpx.get(f"{server}/health").json())
            time.sleep(0.02)

    watcher = threading.Thread(target=watch_health)
    watcher.start()
    try:
        with ThreadPoolExecutor(16) as pool:
            together = list(pool.map(request, range(16)))
    finally:
        done.set()
        watcher.join()
    assert together == alone
    assert max(h["generating"] for h in seen) <= CONCURRENCY
    assert max(h["queued"] for h in seen) >= 1  # requests beyond --max-concurrency waited their turn


def test_health_answers_during_a_long_generation_and_a_closed_stream_stops_it(server, client):
    def health() -> dict:
        return httpx.get(f"{server}/health", timeout=10).json()

    stream = client.completions.create(model=MODEL, prompt="the lazy dog", max_tokens=LIMIT, temperature=0, stream=True)
    chunks = iter(stream)
    next(chunks)  # generation has started
    started = time.monotonic()
    assert health()["generating"] == 1
    answered_in = time.monotonic() - started
    assert next(chunks).choices[0].finish_reason is None  # still generating after /health answered
    assert answered_in < 5
    stream.close()
    closed = time.monotonic()
    while health()["generating"] and time.monotonic() < closed + 10:
        time.sleep(0.02)
    assert time.monotonic() - closed < 1.5  # stopped, rather than generating the remaining hundreds of tokens
    assert health() == {"status": "ok", "model": MODEL, "generating": 0, "queued": 0}


def test_a_plain_hugging_face_model_with_a_chat_template(tiny_dirs):
    """In process: the app serves any causal LM dir, laying chats out with the tokenizer's chat template."""
    from fastapi.testclient import TestClient

    from llm_modules.serving import ModelServer, create_app, load_model

    model, tokenizer = load_model(tiny_dirs["gpt2"], device="cpu")
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    server = ModelServer(model, tokenizer, "gpt2", max_batch_size=1, max_new_tokens_limit=8, system_prompt=SYSTEM)
    with TestClient(create_app(server)) as http:
        body = {"model": "gpt2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0}
        reply = http.post("/v1/chat/completions", json=body).json()
    inputs = tokenizer(f"<system>{SYSTEM}<user>hi<assistant>", return_tensors="pt", add_special_tokens=False)
    output = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    prompt_length = inputs["input_ids"].shape[1]
    assert reply["usage"]["prompt_tokens"] == prompt_length
    expected = tokenizer.decode(output[0, prompt_length:], skip_special_tokens=True)
    assert reply["choices"][0]["message"]["content"] == expected



def test_serving_page_examples_run(server, capsys):
    """The Serving page's openai and curl examples, pointed at the test server and its model, with short answers."""
    section = SERVING_PAGE.read_text()
    blocks = re.findall(r"```(python|bash)\n(.*?)```", section, re.S)
    blocks = {lang: code for lang, code in blocks if "llm-modules serve" not in code}

    def here(code: str) -> str:
        for old, new in (("http://127.0.0.1:8000", server), ("stratos-run", MODEL), ("your-key", KEY), ("512", "8")):
            code = code.replace(old, new)
        return code

    exec(compile(here(blocks["python"]), str(SERVING_PAGE), "exec"), {})
    assert "CompletionUsage" in capsys.readouterr().out
    result = subprocess.run(["bash", "-ec", here(blocks["bash"])], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert '"object":"chat.completion"' in result.stdout and "data: [DONE]" in result.stdout
    assert '"status":"ok"' in result.stdout


def test_completion_prompt_forms(client, local_model):
    """A string, several strings (a choice each, in order), token ids, or several lists of token ids."""
    tokenizer = local_model.tokenizer
    texts = ["the cat sat", "dog number 3"]
    expected = [greedy(local_model, text, 4)[0] for text in texts]
    ids = [tokenizer(text)["input_ids"] for text in texts]
    greedy_4 = dict(model=MODEL, max_tokens=4, temperature=0)
    for prompt in (texts, ids):
        reply = client.completions.create(prompt=prompt, **greedy_4)
        assert [(c.index, c.text) for c in reply.choices] == list(enumerate(expected))
        assert reply.usage.prompt_tokens == sum(map(len, ids))
    assert client.completions.create(prompt=ids[1], **greedy_4).choices[0].text == expected[1]
    streamed = ["", ""]
    for chunk in client.completions.create(prompt=texts, stream=True, **greedy_4):
        streamed[chunk.choices[0].index] += chunk.choices[0].text
    assert streamed == expected


def test_chat_message_forms(client, local_model):
    """Text parts, a `name`, and an assistant message without content."""
    messages = [
        {"role": "user", "content": "hi", "name": "ann"},
        {"role": "assistant", "content": None},
        {"role": "user", "content": [{"type": "text", "text": "what is "}, {"type": "text", "text": "2 plus 3?"}]},
    ]
    plain = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""},
             {"role": "user", "content": "what is 2 plus 3?"}]
    expected, prompt_tokens, _ = greedy(local_model, render_prompt(plain), 4)
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
    assert (reply.choices[0].message.content, reply.usage.prompt_tokens) == (expected, prompt_tokens)


def new_log_lines(server_log: Path, seen: int, count: int) -> list[str]:
    """The request lines the server logged after the first `seen` characters, once there are `count` of them: a line
    is written once its response has been sent, so it may come a moment after the client has the answer."""
    deadline = time.monotonic() + 10
    while True:
        lines = [line for line in server_log.read_text()[seen:].splitlines() if "_tokens=" in line]
        if len(lines) >= count or time.monotonic() > deadline:
            return lines


def settled_length(server_log: Path, quiet: float = 0.5) -> int:
    """The log's length once nothing was added to it for `quiet` seconds: an earlier test's request line may still be
    on its way (it is written after the client had its answer), and must not count as this test's."""
    length = len(server_log.read_text())
    while True:
        time.sleep(quiet)
        now = len(server_log.read_text())
        if now == length:
            return now
        length = now


def test_one_log_line_per_request(client, server, server_log):
    seen = settled_length(server_log)
    reply = client.completions.create(model=MODEL, prompt="the cat sat", max_tokens=3, temperature=0)
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=HI, max_tokens=2, temperature=0, stream=True, stream_options={"include_usage": True}
    ))
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="the cat sat", max_tokens=0)
    httpx.get(f"{server}/health")
    lines = new_log_lines(server_log, seen, 4)
    usage = chunks[-1].usage
    patterns = [
        rf"POST /v1/completions 200 prompt_tokens={reply.usage.prompt_tokens} completion_tokens=3 \d+\.\d\ds",
        rf"POST /v1/chat/completions 200 prompt_tokens={usage.prompt_tokens} completion_tokens=2 \d+\.\d\ds",
        r"POST /v1/completions 400 prompt_tokens=\d+ completion_tokens=- \d+\.\d\ds",
        r"GET /health 200 prompt_tokens=- completion_tokens=- \d+\.\d\ds",
    ]
    assert len(lines) == 4, lines  # uvicorn's access log is off: one line each
    for line, pattern in zip(lines, patterns):
        assert re.search(pattern + "$", line), (line, pattern)


def test_a_non_streaming_request_stops_when_its_client_is_gone(server, server_log):
    seen = len(server_log.read_text())
    body = {"model": MODEL, "prompt": "the lazy dog", "max_tokens": LIMIT, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up after a second and closes the connection
        httpx.post(f"{server}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=1)
    gone = time.monotonic()
    while httpx.get(f"{server}/health").json()["generating"] and time.monotonic() < gone + 10:
        time.sleep(0.02)
    assert time.monotonic() - gone < 2
    [line] = new_log_lines(server_log, seen, 1)[:1]
    made = int(re.search(r"POST /v1/completions 499 prompt_tokens=\d+ completion_tokens=(\d+) ", line).group(1))
    assert 0 < made < LIMIT  # it had started, and it stopped well before its budget


def test_answer_markers_stay_in_served_text(tiny_pair, one_thread):
    """In process, a model that answers <|end_of_solution|> (a special token of its tokenizer): the server keeps it,
    streamed or not."""
    from fastapi.testclient import TestClient
    from test_cli_generate import always_answer

    from llm_modules.serving import ModelServer, create_app

    torch.manual_seed(0)
    model = always_answer(LLMModulesForCausalLM.from_large_and_small(*tiny_pair, cross_attention_heads=4), "<|end_of_solution|>")
    server = ModelServer(model, model.tokenizer, "m", max_batch_size=1, max_new_tokens_limit=8)
    chat = {"model": "m", "messages": HI, "max_tokens": 8, "temperature": 0}
    completion = {"model": "m", "prompt": "the cat", "max_tokens": 8, "temperature": 0}
    with TestClient(create_app(server)) as http:
        reply = http.post("/v1/chat/completions", json=chat).json()["choices"][0]
        assert (reply["message"]["content"], reply["finish_reason"]) == (STOP_STRINGS[0], "stop")
        assert http.post("/v1/completions", json=completion).json()["choices"][0]["text"] == STOP_STRINGS[0]
        for path, body, key in (("chat/completions", chat, "delta"), ("completions", completion, None)):
            events = http.post(f"/v1/{path}", json={**body, "stream": True}).text.split("\n\n")
            chunks = [json.loads(e[len("data: "):]) for e in events if e.startswith("data: {")]
            pieces = [c["choices"][0][key].get("content") if key else c["choices"][0]["text"] for c in chunks]
            assert "".join(p or "" for p in pieces) == STOP_STRINGS[0]


def test_serve_quiet_turns_the_request_log_off(model_dir, monkeypatch):
    import uvicorn

    seen = {}
    monkeypatch.setattr(uvicorn.Server, "run", lambda self: seen.update(vars(self.config)))
    assert main(["serve", "--model", str(model_dir), "--quiet"]) == 0
    assert seen["log_config"]["loggers"]["llm_modules.serving"]["level"] == "WARNING"
    assert seen["access_log"] is False and seen["log_level"] == "warning"


def test_a_job_cancelled_while_queued_never_generates(local_model, one_thread):
    import asyncio

    from llm_modules.serving import Job, ModelServer, Sampling

    server = ModelServer(local_model, local_model.tokenizer, MODEL, max_batch_size=1)
    prompt = local_model.tokenizer("the cat sat")["input_ids"]
    first, second = (Job(prompt, Sampling(8, 0.0, 1.0, None, [])) for _ in range(2))

    async def run() -> list[list[int]]:
        futures = [server.submit(first), server.submit(second)]  # one worker: the second waits
        second.cancelled.set()  # its client leaves
        return await asyncio.gather(*futures)

    generated, skipped = asyncio.run(run())
    assert generated and skipped == [] and second.new_tokens == 0
    assert (server.generating, server.queued) == (0, 0)


def test_n_choices_and_ignore_eos(local_model, tiny_pair, one_thread):
    """In process: each prompt's n choices are engine requests of their own (indexed prompt by prompt; each choice of
    a seeded request has its own seed, the first the request's); ignore_eos generates max_tokens past EOS."""
    from fastapi.testclient import TestClient
    from test_cli_generate import always_answer

    from llm_modules.serving import ModelServer, create_app

    texts = ["the cat sat", "dog number 3"]
    expected = [greedy(local_model, text, 4) for text in texts]
    server = ModelServer(local_model, local_model.tokenizer, MODEL, max_batch_size=3)
    with TestClient(create_app(server)) as http:
        body = {"model": MODEL, "prompt": texts, "n": 2, "max_tokens": 4, "temperature": 0}
        reply = http.post("/v1/completions", json=body).json()
        assert [(c["index"], c["text"]) for c in reply["choices"]] == list(enumerate(
            [expected[0][0], expected[0][0], expected[1][0], expected[1][0]]
        ))
        assert reply["usage"]["prompt_tokens"] == expected[0][1] + expected[1][1]  # each prompt counted once
        assert reply["usage"]["completion_tokens"] == 2 * (expected[0][2] + expected[1][2])
        events = http.post("/v1/completions", json={**body, "stream": True}).text.split("\n\n")
        streamed = ["", "", "", ""]
        for event in (json.loads(e[len("data: "):]) for e in events if e.startswith("data: {")):
            streamed[event["choices"][0]["index"]] += event["choices"][0]["text"]
        assert streamed == [c["text"] for c in reply["choices"]]

        seeded = {"model": MODEL, "prompt": "the cat sat", "max_tokens": 8, "temperature": 1.0, "seed": 5}
        one = http.post("/v1/completions", json=seeded).json()["choices"][0]["text"]
        three = [c["text"] for c in http.post("/v1/completions", json={**seeded, "n": 3}).json()["choices"]]
        assert three[0] == one and len(set(three)) > 1

    torch.manual_seed(0)
    ends = always_answer(LLMModulesForCausalLM.from_large_and_small(*tiny_pair, cross_attention_heads=4), "<|endoftext|>")
    server = ModelServer(ends, ends.tokenizer, "m", max_new_tokens_limit=8)
    with TestClient(create_app(server)) as http:
        body = {"model": "m", "prompt": "the cat", "max_tokens": 5, "temperature": 0}
        for ignore_eos, tokens, reason in ((False, 1, "stop"), (True, 5, "length")):
            reply = http.post("/v1/completions", json={**body, "ignore_eos": ignore_eos}).json()
            assert (reply["usage"]["completion_tokens"], reply["choices"][0]["finish_reason"]) == (tokens, reason)


def test_ctrl_c_stops_the_server_with_exit_code_130(tiny_pair):
    """README's exit codes: an interrupted command exits 130, `serve` too (uvicorn itself returns normally)."""
    port = free_port()
    command = [sys.executable, "-m", "llm_modules.cli", "serve", "--model", str(tiny_pair[0]), "--port", str(port)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wait_until_healthy(f"http://127.0.0.1:{port}", process, lambda: (process.kill(), process.communicate()[1])[1])
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and err.rstrip().endswith("interrupted")
