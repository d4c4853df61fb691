"""Wall-time constants of `llm-modules demo --real` on this machine (issue 12): the frozen model's feature extraction per
token, a training step of the combined model (SmolLM2 + bridge + head over Qwen's vocabulary) and of SmolLM2 alone,
and answering held-out questions with each, on a handful of real rows.

    HF_HUB_OFFLINE=1 flock -x /tmp/llm-modules-cpu.lock python benchmarks/real_task_timing.py --rows 24 --batch-size 8
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from llm_modules.demo.real import systems as S
from llm_modules.demo.real.task import make_split
from llm_modules.fetch import fetched_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="add3")
    parser.add_argument("--rows", type=int, default=24)
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--skip-small", action="store_true")
    args = parser.parse_args()
    large = fetched_model("qwen2.5-coder-1.5b-instruct").plain
    small = fetched_model("smollm2-135m-instruct").plain
    train, held_out = make_split(args.task, args.rows, args.questions, 0)
    options = S.RealTrainOptions(epochs=1, batch_size=args.batch_size, logging_steps=1)
    steps = -(-args.rows // args.batch_size)
    out: dict = {"threads": torch.get_num_threads(), "rows": args.rows, "batch_size": args.batch_size, "steps": steps}
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        if not args.skip_small:
            trained, tokenizer = S.small_only(small, train, options, work, work / "small.jsonl")
            out["small_only_step_seconds"] = round(trained.train_seconds / steps, 2)
            start = time.perf_counter()
            S.answer_predictions(trained.model, tokenizer, held_out, batch_size=args.batch_size, desc="small answers")
            out["small_only_seconds_per_question"] = round((time.perf_counter() - start) / args.questions, 2)
            print(out, flush=True)
        start = time.perf_counter()
        model = S.compose(large, small, options)
        out["compose_seconds"] = round(time.perf_counter() - start, 1)
        trained, features = S.combined(model, train, options, work / "combined", work / "features", work / "c.jsonl")
        out.update(features)
        out["feature_seconds_per_token"] = round(features["feature_seconds"] / features["feature_tokens"], 4)
        out["combined_step_seconds"] = round(trained.train_seconds / steps, 2)
        print(out, flush=True)
        start = time.perf_counter()
        result = S.answer_predictions(model, model.tokenizer, held_out, batch_size=args.batch_size,
                                      desc="combined answers")
        out["combined_seconds_per_question"] = round((time.perf_counter() - start) / args.questions, 2)
        out["combined_outputs"] = [p["output"] for p in result.predictions[:3]]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
