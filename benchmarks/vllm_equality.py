"""Greedy tokens and top-5 logprobs of vLLM (`llm_modules.vllm`) against our `generate` on a saved combined model,
float32 on both sides, prompts of different lengths batched. Prints the comparison; exits 1 on a token that differs.

    python benchmarks/vllm_equality.py DIR [--max-new-tokens 32] [--json out.json]

Our side runs in this environment, vLLM in its own (`LLM_MODULES_VLLM_PYTHON` or .venv-vllm; see
docs/serving-at-scale.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from llm_modules import LLMModulesForCausalLM
from llm_modules.vllm.equality import logprob_gap, reference, run_vllm, vllm_python

QUESTIONS = ["Write a Python function that reverses a string.", "What is 17 times 23?",
             "Explain recursion in one sentence to a child who likes trains.", "Hi"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="a saved combined model dir")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    python = vllm_python()
    if python is None:
        sys.exit("no vLLM environment: run .ci/vllm-venv or set LLM_MODULES_VLLM_PYTHON")
    torch.manual_seed(0)
    model = LLMModulesForCausalLM.from_pretrained(args.model, large_dtype=torch.float32).eval()
    prompts = [model.tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                   tokenize=True, return_dict=False) for q in QUESTIONS]
    started = time.perf_counter()
    ours = reference(model, prompts, args.max_new_tokens)
    ours_s = time.perf_counter() - started
    del model
    started = time.perf_counter()
    theirs = run_vllm(python, args.model, {"prompts": prompts, "max_tokens": args.max_new_tokens, "dtype": "float32",
                                           "max_model_len": 1024})
    theirs_s = time.perf_counter() - started
    same = [a == b for a, b in zip(ours["tokens"], theirs["tokens"])]
    first_diff = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
                  for a, b in zip(ours["tokens"], theirs["tokens"])]
    result = {"prompt_lengths": [len(p) for p in prompts], "max_new_tokens": args.max_new_tokens,
              "tokens_equal": same, "first_difference": first_diff, "max_logprob_gap": logprob_gap(ours, theirs),
              "ours_s": round(ours_s, 1), "vllm_s_with_startup": round(theirs_s, 1)}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps({**result, "ours": ours, "vllm": theirs}) + "\n")
    return 0 if all(same) else 1


if __name__ == "__main__":
    sys.exit(main())
