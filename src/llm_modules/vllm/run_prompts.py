"""Run token-id prompts through vLLM and write what it generated, for the equality checks against our `generate`.

    python -m llm_modules.vllm.run_prompts MODEL_DIR REQUEST.json RESULT.json

REQUEST: `{"prompts": [[ids], ...], "max_tokens": 32, "dtype": "float32", "logprobs": 5, "temperature": 0,
"seed": null, "seeds": [one per prompt] (optional), "max_model_len": 512}`, or the engine options with `"jobs"`, a
list of such requests run on one engine. RESULT: `{"tokens": [[ids], ...], "logprobs": [[{id: logprob}, ...], ...]}`:
per prompt, the new tokens and, per new token, the top `logprobs` candidates. Runs in the vLLM venv (vLLM spawns its
engine process, hence the `__main__` guard).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def run(model_dir: str, request: dict) -> dict:
    """Start vLLM once on `model_dir` and run the request (or each of its `jobs`, a list of requests sharing the
    engine); returns the result, or `{"jobs": [result, ...]}`."""
    from vllm import LLM

    llm = LLM(
        model=model_dir, dtype=request.get("dtype", "float32"), enforce_eager=True,
        max_model_len=request.get("max_model_len", 512), max_num_seqs=request.get("max_num_seqs", 16),
    )
    if "jobs" in request:
        return {"jobs": [run_job(llm, job) for job in request["jobs"]]}
    return run_job(llm, request)


def run_job(llm, job: dict) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    seeds = job.get("seeds") or [job.get("seed")] * len(job["prompts"])  # one per prompt
    params = [
        SamplingParams(
            max_tokens=job.get("max_tokens", 32), temperature=job.get("temperature", 0.0),
            logprobs=job.get("logprobs", 5) or None, ignore_eos=True, seed=seed,
        )
        for seed in seeds
    ]
    # No progress bar: vLLM 0.32 divides by the bar's elapsed time, which is 0 when tqdm is disabled (TQDM_DISABLE=1).
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in job["prompts"]], params, use_tqdm=False)
    result = {"tokens": [], "logprobs": []}
    for output in outputs:
        completion = output.outputs[0]
        result["tokens"].append(list(completion.token_ids))
        result["logprobs"].append(
            [{str(token): entry.logprob for token, entry in step.items()} for step in (completion.logprobs or [])]
        )
    return result


def main() -> None:
    model_dir, request_path, result_path = sys.argv[1:4]
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default (4) is more than tests need
    result = run(model_dir, json.loads(Path(request_path).read_text()))
    Path(result_path).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
