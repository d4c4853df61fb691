"""Choose the real demo's task by measurement (issue 12): held-out accuracy of the untrained models in their own chat
templates on each candidate task, with wall times.

    HF_HUB_OFFLINE=1 flock -x /tmp/llm-modules-cpu.lock python benchmarks/real_task_measure.py \
        --tasks add3 sub3 --n 60 --models qwen2.5-coder-1.5b-instruct smollm2-135m-instruct --out results.json

The held-out questions are those the demo would draw (`builtin_task(task, n_train, n, seed)`); greedy, float32.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from llm_modules.compare import native_predictions
from llm_modules.compare.systems import load_plain
from llm_modules.compare.tasks import builtin_task
from llm_modules.demo.real.task import TASKS
from llm_modules.fetch import fetched_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--models", nargs="+", default=["qwen2.5-coder-1.5b-instruct", "smollm2-135m-instruct"])
    parser.add_argument("--n", type=int, default=60)
    parser.add_argument("--n-train", type=int, default=400, help="train questions drawn first (excluded)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    results = {"threads": torch.get_num_threads(), "n": args.n, "seed": args.seed, "models": {}}
    for name in args.models:
        start = time.perf_counter()
        model, tokenizer = load_plain(fetched_model(name).plain, torch.float32)
        entry = {"load_seconds": round(time.perf_counter() - start, 1), "tasks": {}}
        for task in args.tasks:
            rows = builtin_task(task, args.n_train, args.n, args.seed)
            start = time.perf_counter()
            predictions = native_predictions(model, tokenizer, rows.eval_rows, rows, max_new_tokens=24,
                                             batch_size=args.batch_size, progress=True, desc=f"{name} {task}")
            accuracy = sum(p["correct"] for p in predictions) / len(predictions)
            entry["tasks"][task] = {"accuracy": accuracy, "seconds": round(time.perf_counter() - start, 1),
                                    "wrong": [(p["question"], p["output"]) for p in predictions if not p["correct"]][:8]}
            print(name, task, entry["tasks"][task]["accuracy"], entry["tasks"][task]["seconds"], "s", flush=True)
        results["models"][name] = entry
        del model
    text = json.dumps(results, indent=2)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
