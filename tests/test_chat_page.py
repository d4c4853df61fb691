"""The chat page at `/` of `llm-modules serve`, driven end to end in headless Chromium (Selenium + Debian's chromium and
chromedriver) against the real server in a thread. The tiny random model writes gibberish, so the tests check the
page's structure and its requests; a stand-in for the chat endpoint streams a Stratos-format answer."""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from llm_modules import LLMModulesForCausalLM
from llm_modules.data import ANSWER_MARKERS
from llm_modules.serving import ModelServer, create_app

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # a server thread and a browser

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
MODEL = "tiny-chat"
KEY = "page-key"
# docs/serving.md's screenshot, remade with LLM_MODULES_SAVE_SCREENSHOT=1
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "chat-page.png"


@contextmanager
def running(app) -> Iterator[str]:
    """`app` served by uvicorn in a thread on a free loopback port; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    # log_config=None: uvicorn leaves logging alone, so caplog sees the server's request lines.
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="module")
def model(tiny_pair):
    """A tiny random combined model that writes words and never ends on its own.

    The server streams text word by word (transformers' streamer holds text back to its last space), and a random
    model's greedy gibberish has no spaces, so it would arrive in one piece: a large bias on the tokens that start
    with a space makes every token a word. Neither the end of text nor `<|end_of_solution|>` is then ever chosen."""
    torch.manual_seed(0)
    model = LLMModulesForCausalLM.from_large_and_small(*tiny_pair, cross_attention_heads=4).eval()
    words = [i for token, i in model.tokenizer.get_vocab().items() if token.startswith("\u0120")]  # BPE's space
    head = model.get_output_embeddings()
    bias = torch.zeros(head.out_features)
    bias[words] = 100.0
    head.register_forward_hook(lambda module, inputs, logits: logits + bias)
    return model


@pytest.fixture(scope="module")
def server(model) -> Iterator[str]:
    with running(create_app(ModelServer(model, model.tokenizer, MODEL))) as url:
        yield url


@pytest.fixture(scope="module")
def keyed_server(model) -> Iterator[str]:
    with running(create_app(ModelServer(model, model.tokenizer, MODEL), api_key=KEY)) as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        message = "Chromium is not installed (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(f"{message}: .ci/run installs it")
        pytest.skip(message)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1000,720", "--force-device-scale-factor=1", "--hide-scrollbars", "--lang=en-US"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console, for errors
    # With the driver's path given, Selenium does not try to download one.
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    yield driver
    driver.quit()


def wait(browser: WebDriver, script: str, timeout: float = 20):
    """The first truthy value of the JavaScript expression `script`, polled until `timeout`."""
    return WebDriverWait(browser, timeout, poll_frequency=0.05).until(lambda b: b.execute_script(f"return {script}"))


def open_page(browser: WebDriver, url: str) -> None:
    browser.get_log("browser")  # drop earlier pages' console messages
    browser.get(url)
    wait(browser, "!document.getElementById('send').disabled")  # the model's id came from /v1/models


def settings(browser: WebDriver, system: str = "", temperature: str = "0", max_tokens: str = "16") -> None:
    for field, value in (("system", system), ("temperature", temperature), ("max-tokens", max_tokens)):
        element = browser.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)


def ask(browser: WebDriver, question: str) -> None:
    """Type `question` and press Enter; returns once its answer has started (the assistant message exists)."""
    count = len(browser.find_elements(By.CSS_SELECTOR, ".message.assistant"))
    browser.find_element(By.ID, "prompt").send_keys(question, Keys.ENTER)
    wait(browser, f"document.querySelectorAll('.message.assistant').length > {count}")


def last_answer_state(browser: WebDriver, timeout: float = 20) -> str:
    """The last answer's final state (done, stopped or error) once it has one."""
    return wait(browser, "(s => s !== 'streaming' && s)"
                         "(document.querySelector('.message.assistant:last-child').dataset.state)", timeout)


def record_answer_lengths(browser: WebDriver) -> None:
    """From now on, `window.lengths` gets the length of the last answer's text at each change of the page."""
    browser.execute_script("""
        window.lengths = [];
        new MutationObserver(() => {
            const parts = document.querySelectorAll('.message.assistant:last-child :is(.text, .thought-text, .solution)');
            window.lengths.push([...parts].reduce((length, part) => length + part.textContent.length, 0));
        }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
    """)


def server_answer(url: str, messages: list[dict], max_tokens: int, key: str | None = None) -> str:
    """The server's greedy answer to `messages`, not streamed: what the page must have shown."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    reply = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=60)
    return reply.json()["choices"][0]["message"]["content"]


def severe_console_messages(browser: WebDriver) -> list[str]:
    return [entry["message"] for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]


def test_the_page_is_one_offline_file(server):
    page = httpx.get(f"{server}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]  # the browser loads nothing else
    assert not re.search(r"https?://", page.text), "the page must not name another host"
    assert all(marker in page.text for marker in ANSWER_MARKERS)  # the page splits answers at data.py's markers


def test_streams_answers_keeps_the_history_and_resets(server, browser):
    open_page(browser, server)
    assert browser.find_element(By.ID, "model").text == MODEL
    assert not browser.find_element(By.ID, "key-form").is_displayed()  # no key needed
    settings(browser, system="Answer briefly.", temperature="0", max_tokens="48")
    record_answer_lengths(browser)
    question = "<b>bold?</b> <img src=x onerror='window.injected=1'>"
    ask(browser, question)
    assert last_answer_state(browser) == "done"

    # Streamed: the page showed the answer at several lengths before the whole of it.
    lengths = browser.execute_script("return window.lengths")
    assert len({length for length in lengths if 0 < length < lengths[-1]}) >= 3, lengths
    # The page sent the system prompt and the question, and shows the user's text as text.
    system = {"role": "system", "content": "Answer briefly."}
    turns = browser.execute_script("return turns")
    assert turns[0] == {"role": "user", "content": question}
    assert turns[1] == {"role": "assistant", "content": server_answer(server, [system, *turns[:1]], 48)}
    assert browser.find_element(By.CSS_SELECTOR, ".message.user .text").text == question
    assert not browser.find_elements(By.CSS_SELECTOR, "#messages b, #messages img")
    assert browser.execute_script("return window.injected") is None

    # A second turn is answered from the whole conversation.
    ask(browser, "and then?")
    assert last_answer_state(browser) == "done"
    turns = browser.execute_script("return turns")
    assert [t["role"] for t in turns] == ["user", "assistant", "user", "assistant"]
    assert turns[3]["content"] == server_answer(server, [system, *turns[:3]], 48)
    assert len(browser.find_elements(By.CSS_SELECTOR, ".message")) == 4

    browser.find_element(By.ID, "reset").click()
    assert not browser.find_elements(By.CSS_SELECTOR, ".message")
    assert browser.execute_script("return turns.length") == 0
    assert severe_console_messages(browser) == []


def test_stop_ends_the_request_and_the_generation(server, browser, caplog):
    caplog.set_level(logging.INFO, logger="llm_modules.serving")
    open_page(browser, server)
    settings(browser, temperature="0", max_tokens="2000")  # ~15 s of tokens: only the stop button ends it early
    ask(browser, "tell me everything")
    wait(browser, "document.querySelector('.message.assistant:last-child').textContent.length > 20")
    started = time.monotonic()
    browser.find_element(By.ID, "stop").click()
    assert last_answer_state(browser) == "stopped"
    assert browser.find_element(By.CSS_SELECTOR, ".message.assistant:last-child .note").text == "stopped"
    assert browser.find_element(By.ID, "stop").get_attribute("disabled")  # ready again
    assert not browser.find_element(By.ID, "send").get_attribute("disabled")

    # The server saw the client go (499) and stopped generating long before 2000 tokens.
    def request_line() -> re.Match | None:
        lines = [r.getMessage() for r in caplog.records if r.name == "llm_modules.serving"]
        return next((m for line in lines if (m := re.search(r"POST /v1/chat/completions (\d+) .*"
                                                             r"completion_tokens=(\d+)", line))), None)

    line = WebDriverWait(None, 10, poll_frequency=0.05).until(lambda _: request_line())
    assert line[1] == "499" and int(line[2]) < 2000, line[0]
    assert httpx.get(f"{server}/health").json()["generating"] == 0
    assert time.monotonic() - started < 5

    # The stopped answer stays in the conversation, and the page answers the next question.
    settings(browser, temperature="0", max_tokens="4")
    ask(browser, "short, please")
    assert last_answer_state(browser) == "done"
    assert [t["role"] for t in browser.execute_script("return turns")] == ["user", "assistant"] * 2


# A stand-in for the chat endpoint: streams `window.cannedAnswer` as OpenAI chunks of 7 characters (markers arrive
# in pieces) and keeps the request bodies in `window.sentBodies`. The rest of the page's requests go to the server.
CANNED_STREAM = """
window.sentBodies = [];
window.fetch = (realFetch => async (url, options) => {
    if (!String(url).endsWith('chat/completions')) return realFetch(url, options);
    window.sentBodies.push(JSON.parse(options.body));
    const pieces = window.cannedAnswer.match(/[\\s\\S]{1,7}/g), encoder = new TextEncoder();
    const chunk = delta => encoder.encode(`data: ${JSON.stringify({choices: [{index: 0, delta}]})}\\n\\n`);
    const body = new ReadableStream({async pull(stream) {
        await new Promise(resolve => setTimeout(resolve, 15));
        const piece = pieces.shift();
        if (piece === undefined) {
            stream.enqueue(encoder.encode('data: [DONE]\\n\\n'));
            stream.close();
        } else {
            stream.enqueue(chunk({content: piece}));
        }
    }});
    return new Response(body, {headers: {'Content-Type': 'text/event-stream'}});
})(window.fetch);
"""
THOUGHT = "17 + 25: 17 + 20 = 37, and 37 + 5 = 42.\n\nCheck: 42 - 25 = 17."
ANSWER = f"<|begin_of_thought|> {THOUGHT} <|end_of_thought|> <|begin_of_solution|> 42 <|end_of_solution|>"


def test_thought_and_solution_are_shown_apart(server, browser, tmp_path):
    open_page(browser, server)
    browser.execute_script(CANNED_STREAM)
    browser.execute_script("""
        window.seen = [];  // the page's text and whether a shown thought was open, at every change while streaming
        new MutationObserver(() => window.seen.push({
            text: document.getElementById('messages').textContent,
            thoughtOpen: document.querySelector('.message.assistant:last-child .thought:not([hidden])')?.open,
        })).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
    """)
    # Model text is never HTML.
    browser.execute_script("window.cannedAnswer = arguments[0]",
                           "<|begin_of_solution|> <img src=x onerror='window.injected=1'> <|end_of_solution|>")
    settings(browser, system="Think, then answer.", temperature="0.5", max_tokens="300")
    ask(browser, "Quick check")
    assert last_answer_state(browser) == "done"
    solution = browser.find_element(By.CSS_SELECTOR, ".message.assistant .solution")
    assert solution.text == "<img src=x onerror='window.injected=1'>"
    assert not browser.find_elements(By.CSS_SELECTOR, "#messages img")
    assert browser.execute_script("return window.injected") is None
    browser.find_element(By.ID, "reset").click()

    browser.execute_script("window.cannedAnswer = arguments[0]; window.seen = []", ANSWER)
    ask(browser, "What is 17 + 25?")
    assert last_answer_state(browser) == "done"
    answer = browser.find_element(By.CSS_SELECTOR, ".message.assistant:last-child")
    assert answer.find_element(By.CSS_SELECTOR, ".solution").text == "42"
    thought = answer.find_element(By.CSS_SELECTOR, "details.thought")
    assert not thought.get_attribute("open")  # closed once the solution started
    assert thought.find_element(By.TAG_NAME, "summary").text == "Thought"
    thought_text = thought.find_element(By.CSS_SELECTOR, ".thought-text")
    assert thought_text.get_property("textContent") == THOUGHT and not thought_text.is_displayed()
    thought.find_element(By.TAG_NAME, "summary").click()
    assert thought_text.is_displayed()
    seen = browser.execute_script("return window.seen")
    assert not any("<|" in state["text"] for state in seen), "a marker (or its start) showed while streaming"
    assert any(state["thoughtOpen"] for state in seen)  # the thought was open while it streamed
    # The request carried the settings and the conversation; the answer joins it with its markers.
    sent = browser.execute_script("return window.sentBodies")[-1]
    assert sent["model"] == MODEL and sent["stream"] is True
    assert (sent["temperature"], sent["max_tokens"]) == (0.5, 300)
    assert sent["messages"] == [{"role": "system", "content": "Think, then answer."},
                                {"role": "user", "content": "What is 17 + 25?"}]
    assert browser.execute_script("return turns")[-1] == {"role": "assistant", "content": ANSWER}

    path = tmp_path / "chat-page.png"
    assert browser.save_screenshot(str(path)) and path.stat().st_size > 10_000
    if os.environ.get("LLM_MODULES_SAVE_SCREENSHOT") == "1":
        SCREENSHOT.write_bytes(path.read_bytes())


def test_asks_for_the_api_key_once(keyed_server, browser):
    browser.get(keyed_server)
    key_form = browser.find_element(By.ID, "key-form")
    wait(browser, "!document.getElementById('key-form').hidden")  # /v1/models answered 401
    assert browser.find_element(By.ID, "send").get_attribute("disabled")
    browser.find_element(By.ID, "api-key").send_keys("wrong-key", Keys.ENTER)
    wait(browser, "document.getElementById('key-note').textContent")  # refused: asked again
    assert key_form.is_displayed()
    browser.find_element(By.ID, "api-key").send_keys(KEY, Keys.ENTER)
    wait(browser, "!document.getElementById('send').disabled")
    assert not key_form.is_displayed() and browser.find_element(By.ID, "model").text == MODEL
    assert browser.execute_script("return sessionStorage.getItem('llm-modules-api-key')") == KEY

    settings(browser, temperature="0", max_tokens="8")
    ask(browser, "hi")
    assert last_answer_state(browser) == "done"  # the chat request carried the key
    turns = browser.execute_script("return turns")
    assert turns[1]["content"] == server_answer(keyed_server, turns[:1], 8, key=KEY)

    browser.refresh()  # the key lasts for the tab: no second prompt
    wait(browser, "!document.getElementById('send').disabled")
    assert not browser.find_element(By.ID, "key-form").is_displayed()
