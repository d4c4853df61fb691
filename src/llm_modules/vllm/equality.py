"""Greedy tokens and top logprobs of our `generate` next to vLLM's, for tests/test_vllm.py and
benchmarks/vllm_equality.py.

Our side runs here (the main environment, transformers >= 5.24); vLLM runs in its own environment (vLLM 0.32 pins
transformers < 5.20), called as a subprocess: `python -m llm_modules.vllm.run_prompts`. Which Python that is:
`$LLM_MODULES_VLLM_PYTHON`, else this interpreter when it imports vLLM, else `.venv-vllm/bin/python` at the
repository root (what `.ci/vllm-venv` creates).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO_VENV = Path(__file__).resolve().parents[3] / ".venv-vllm" / "bin" / "python"


def vllm_python() -> str | None:
    """The Python interpreter that runs vLLM with this package installed, or None when there is none."""
    given = os.environ.get("LLM_MODULES_VLLM_PYTHON")
    if given:
        return given
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    return str(REPO_VENV) if REPO_VENV.exists() else None


@torch.no_grad()
def reference(model, prompts: list[list[int]], max_new_tokens: int, top: int = 5) -> dict:
    """Our `generate` on all prompts as one left-padded batch, greedy, never stopping early: `{"tokens": [[ids]],
    "logprobs": [[{id: logprob} per new token]]}` with the `top` most likely tokens of each step."""
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(
        input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, min_new_tokens=0,
        do_sample=False, eos_token_id=None, pad_token_id=pad, output_logits=True, return_dict_in_generate=True,
    )
    logprobs = torch.stack(out.logits, dim=1).float().log_softmax(-1)  # [batch, new, vocab]
    values, ids = logprobs.topk(top, dim=-1)
    return {
        "tokens": out.sequences[:, width:].tolist(),
        "logprobs": [
            [{str(i): v for i, v in zip(step_ids, step_values)} for step_ids, step_values in zip(row_ids, row_values)]
            for row_ids, row_values in zip(ids.tolist(), values.tolist())
        ],
    }


def run_vllm(python: str, model_dir: str | Path, request: dict, timeout: float = 900) -> dict:
    """`run_prompts` in the vLLM environment; RuntimeError with its output's tail when it fails."""
    with tempfile.TemporaryDirectory() as tmp:
        request_path, result_path = Path(tmp) / "request.json", Path(tmp) / "result.json"
        request_path.write_text(json.dumps(request))
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
        done = subprocess.run(
            [python, "-m", "llm_modules.vllm.run_prompts", str(model_dir), str(request_path), str(result_path)],
            capture_output=True, text=True, timeout=timeout, env=env,
        )
        if done.returncode != 0 or not result_path.exists():
            raise RuntimeError(f"vLLM run failed ({done.returncode}):\n{(done.stdout + done.stderr)[-4000:]}")
        return json.loads(result_path.read_text())


def logprob_gap(ours: dict, theirs: dict) -> float:
    """Largest |difference| of the logprob of a token both sides list among their top candidates at a step where
    the tokens so far agree (after a first different token the two continuations are not comparable)."""
    gap = 0.0
    for our_tokens, their_tokens, our_steps, their_steps in zip(
        ours["tokens"], theirs["tokens"], ours["logprobs"], theirs["logprobs"]
    ):
        for step, (a, b) in enumerate(zip(our_steps, their_steps)):
            gap = max([gap, *(abs(a[t] - b[t]) for t in a.keys() & b.keys())])
            if our_tokens[step] != their_tokens[step]:
                break
    return gap
