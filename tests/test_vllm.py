"""The vLLM model (llm_modules.vllm): greedy tokens and top logprobs equal our `generate` on a tiny combined model,
seeded sampling repeats, and unsupported models are refused with their reason.

vLLM 0.32 pins transformers < 5.20 and this package >= 5.24, so vLLM runs in a second environment
(`.ci/vllm-venv` builds it at .venv-vllm, and these tests run it when there is none; `LLM_MODULES_VLLM_PYTHON` names
another). When it cannot be built they FAIL rather than skip as if they passed; `LLM_MODULES_SKIP_VLLM=1` skips them
on purpose.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from llm_modules import LLMModulesConfig, LLMModulesForCausalLM
from llm_modules.tiny_models import save_tiny_causal_lm, train_tokenizer
from llm_modules.vllm.equality import logprob_gap, reference, run_vllm, vllm_python
from llm_modules.vllm.support import UnsupportedForVllm, check_supported, padded_head_size

# float32 on both sides; different kernels and summation orders leave rounding differences of this size.
ROOT = Path(__file__).resolve().parents[1]
LOGPROB_TOLERANCE = 1e-3
MAX_NEW_TOKENS = 32


def test_head_sizes_pad_to_what_the_backend_has():
    assert [padded_head_size(s) for s in (16, 32, 64, 72, 100, 600)] == [32, 32, 64, 80, 112, 600]


@pytest.mark.parametrize(
    "overrides, reason",
    [
        ({"small_config": {"model_type": "gpt_neo", "hidden_size": 32, "num_heads": 4, "num_layers": 2,
                           "attention_types": [[["global", "local"], 1]]}}, "no GPT-Neo"),
        ({"additional_large_configs": [{"model_type": "qwen2", "hidden_size": 64, "num_attention_heads": 2}],
          "large_model_name_or_path": ["a", "b"]}, "2 frozen sources"),
        ({"depth_connections": [[0, 0]]}, "depth connections"),
    ],
)
def test_unsupported_models_are_refused_with_the_reason(overrides, reason):
    base = {
        "large_config": {"model_type": "qwen2", "hidden_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2},
        "small_config": {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2},
        "cross_attention_heads": 4,
    }
    config = LLMModulesConfig(**{**base, **overrides})
    with pytest.raises(UnsupportedForVllm, match=reason):
        check_supported(config)


@pytest.fixture(scope="module")
def vllm_env():
    """The vLLM environment's Python; built once with `.ci/vllm-venv` when there is none (about 3 minutes, as
    conftest's `real_models` fetches the real weights once), so README's test command runs these on a fresh clone."""
    if vllm_python() is None:
        if os.environ.get("LLM_MODULES_SKIP_VLLM") == "1":
            pytest.skip("LLM_MODULES_SKIP_VLLM=1: the vLLM tests were skipped on purpose")
        built = subprocess.run(["bash", str(ROOT / ".ci" / "vllm-venv")], capture_output=True, text=True)
        if built.returncode != 0 or vllm_python() is None:
            pytest.fail(f"could not build the vLLM environment with .ci/vllm-venv: {built.stderr[-2000:]}")
    return vllm_python()


@pytest.fixture(scope="module")
def tiny_vllm_model(tmp_path_factory):
    """A tiny Qwen2 source + Llama small model whose head sizes vLLM's CPU backend has (32), with 4 bridge heads of
    16 (zero-padded to 32 in vLLM), saved as `llm-modules train` saves; and our model reloaded from that dir."""
    root = tmp_path_factory.mktemp("vllm")
    tokenizer = train_tokenizer([f"the quick brown fox {i} jumps over the lazy dog" for i in range(200)], vocab_size=300)
    large = save_tiny_causal_lm(root / "qwen2", "qwen2", tokenizer, hidden_size=64, layers=2, heads=2)
    small = save_tiny_causal_lm(root / "llama", "llama", tokenizer, hidden_size=64, layers=2, heads=2, seed=1)
    torch.manual_seed(0)
    model = LLMModulesForCausalLM.from_large_and_small(str(large), str(small), cross_attention_heads=4)
    with torch.no_grad():  # a sharper head than the random init's, so greedy choices are not near-ties
        model.lm_head.weight.mul_(20)
    model.save_pretrained(root / "combined")
    return root / "combined", LLMModulesForCausalLM.from_pretrained(root / "combined").eval()


PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [40, 41], [100, 7, 200, 9, 33], [17]]
SAMPLED = [PROMPTS[0], PROMPTS[0], PROMPTS[0], PROMPTS[1]]  # seeds 7, 7, 8, 7


@pytest.fixture(scope="module")
def vllm_results(vllm_env, tiny_vllm_model):
    """One vLLM engine (starting one takes most of a minute): the greedy batch, then seeded sampling."""
    directory, _ = tiny_vllm_model
    jobs = [
        {"prompts": PROMPTS, "max_tokens": MAX_NEW_TOKENS},
        {"prompts": SAMPLED, "max_tokens": 16, "temperature": 1.0, "seeds": [7, 7, 8, 7], "logprobs": 0},
    ]
    return run_vllm(vllm_env, directory, {"dtype": "float32", "jobs": jobs})["jobs"]


@pytest.mark.slow
def test_greedy_tokens_and_logprobs_equal_our_generate(tiny_vllm_model, vllm_results):
    _, model = tiny_vllm_model
    ours, theirs = reference(model, PROMPTS, MAX_NEW_TOKENS), vllm_results[0]
    assert theirs["tokens"] == ours["tokens"]
    assert logprob_gap(ours, theirs) < LOGPROB_TOLERANCE


@pytest.mark.slow
def test_seeded_sampling_repeats(vllm_results):
    tokens = vllm_results[1]["tokens"]
    assert tokens[0] == tokens[1]  # same prompt, same seed, in one batch
    assert tokens[2] != tokens[0]  # another seed
    assert len(set(map(tuple, tokens))) > 1


def test_serve_engine_vllm_refuses_a_gpt_neo_model_before_starting_anything(tiny_model, tmp_path, capsys):
    from llm_modules.cli import main

    tiny_model.save_pretrained(tmp_path / "combined")  # the tests' Qwen2 + GPT-Neo pair
    assert main(["serve", "--engine", "vllm", "--model", str(tmp_path / "combined")]) == 2
    err = capsys.readouterr().err
    assert "cannot be served on vLLM" in err and "no GPT-Neo" in err and err.count("\n") == 1


def test_serve_engine_vllm_command_line(tmp_path):
    from llm_modules.vllm.launch import vllm_serve_command

    command = vllm_serve_command(
        tmp_path, python="py", name="m", host="0.0.0.0", port=9, dtype="bfloat16", max_num_seqs=16, api_key="k",
        allowed_origins=["*"], large_model=str(tmp_path / "src"), extra=["--max-model-len=8192"],
    )
    assert command[:5] == ["py", "-m", "llm_modules.vllm.cli", "serve", str(tmp_path)]
    assert command[command.index("--max-num-seqs") + 1] == "16" and "--enforce-eager" in command
    overrides = command[command.index("--hf-overrides") + 1]
    assert str(tmp_path / "src") in overrides and command[-1] == "--max-model-len=8192"


def test_interrupting_the_launcher_stops_the_vllm_server(tmp_path):
    """A SIGINT sent to our process alone (`kill -INT`, a supervisor) reaches the server it started, which exits;
    then the launcher raises KeyboardInterrupt (exit 130), never leaving a server behind."""
    import signal
    import sys
    import threading
    import time

    from llm_modules.vllm.launch import run_forwarding_signals

    ready, marker = tmp_path / "ready", tmp_path / "stopped"
    server = (  # stands in for `vllm serve`: runs until interrupted, then records it
        "import signal, sys, time, pathlib\n"
        f"signal.signal(signal.SIGINT, lambda *_: (pathlib.Path({str(marker)!r}).write_text('int'), sys.exit(0)))\n"
        f"pathlib.Path({str(ready)!r}).touch()\n"
        "time.sleep(120)\n"
    )

    def interrupt_once_the_server_runs() -> None:  # as a supervisor would: a signal to the launcher alone
        deadline = time.monotonic() + 60
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)  # SIG_IGN, not Python's handler, when the tests run in a background job
    threading.Thread(target=interrupt_once_the_server_runs, daemon=True).start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run_forwarding_signals([sys.executable, "-c", server], env=dict(os.environ))
    assert time.monotonic() - started < 60
    assert marker.read_text() == "int"
    assert signal.getsignal(signal.SIGINT) is before  # our handler is gone again


@pytest.mark.slow
def test_a_model_saved_by_llm_modules_train_serves_on_vllm_with_our_tokens(vllm_env, tiny_vllm_model, tmp_path):
    """The dir `llm-modules train` writes (its config, trained weights, tokenizer and recorded system prompt), not
    only `save_pretrained`'s: vLLM's greedy tokens and top logprobs equal our `generate` on it, prompts in the
    training layout of different lengths batched. Trained until it continues its rows, so its greedy choices are
    clear (no near-ties for rounding to flip) and its output is not one token repeated."""
    import json
    import sys

    sources = tiny_vllm_model[0].parent
    rows = [{"system": "Continue.", "conversations": [
        {"from": "user", "value": f"the quick brown fox {i}"},
        {"from": "assistant", "value": f"jumps over the lazy dog {i} {i + 1} {i + 2}"}]} for i in range(16)]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "trained"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "llm_modules", "train", "--large", str(sources / "qwen2"), "--small", str(sources / "llama"),
         "--dataset", str(data), "--output-dir", str(out), "--max-steps", "20", "--batch-size", "4", "--val-split", "0",
         "--lr-bridge", "3e-3", "--lr-small", "3e-3", "--save-steps", "20", "--seed", "0"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    model = LLMModulesForCausalLM.from_pretrained(out).eval()
    # Prompts like its rows, of different lengths, batched: what it learned to answer, so not one token repeated.
    from llm_modules.data import render_prompt, tokenize_prompt

    prompts = [tokenize_prompt(model.tokenizer, render_prompt([{"role": "user", "content": f"the quick brown fox {i}"}],
                                                              system="Continue." * (1 + i % 3)))["input_ids"]
               for i in (2, 5, 11, 7)]
    ours = reference(model, prompts, MAX_NEW_TOKENS)
    assert len({token for tokens in ours["tokens"] for token in tokens}) >= 4  # a real check: varied output
    theirs = run_vllm(vllm_env, out, {"dtype": "float32", "jobs": [{"prompts": prompts, "max_tokens": MAX_NEW_TOKENS}]})
    assert theirs["jobs"][0]["tokens"] == ours["tokens"]
    assert logprob_gap(ours, theirs["jobs"][0]) < LOGPROB_TOLERANCE
