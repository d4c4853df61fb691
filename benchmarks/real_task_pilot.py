"""A pilot of `llm-modules demo --real`'s trained systems in pieces that each fit a short CPU-lock window (issue 12):
the combined model's feature cache + training (saved), its evaluation (reloaded), and `small_only`, on the same rows.

    L="flock -x /tmp/llm-modules-cpu.lock"; P=benchmarks/real_task_pilot.py; D=/tmp/real-pilot
    $L python $P combined --dir $D; $L python $P small-only --dir $D
    (or combined-train, then combined-eval, when one window cannot hold both)

Each phase appends one JSON line of numbers and wall times to DIR/pilot.jsonl.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from llm_modules import LLMModulesForCausalLM
from llm_modules.demo.real import systems as S
from llm_modules.demo.real.task import make_split
from llm_modules.fetch import fetched_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", choices=["combined", "combined-train", "combined-eval", "small-only"])
    parser.add_argument("--dir", required=True)
    parser.add_argument("--task", default="sub3")
    parser.add_argument("--n-train", type=int, default=112)
    parser.add_argument("--n-eval", type=int, default=30)
    parser.add_argument("--n-eval-train", type=int, default=10)
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-batch-size", type=int, default=20)
    parser.add_argument("--lr-bridge", type=float, default=1e-3)
    parser.add_argument("--lr-small", type=float, default=3e-4)
    parser.add_argument("--lr-small-only", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    large = fetched_model("qwen2.5-coder-1.5b-instruct").plain
    small = fetched_model("smollm2-135m-instruct").plain
    train, held_out = make_split(args.task, args.n_train, args.n_eval, args.seed)
    asked_train = train[: args.n_eval_train]
    options = S.RealTrainOptions(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
                                 lr_bridge=args.lr_bridge, lr_small=args.lr_small, lr_small_only=args.lr_small_only)
    record: dict = {"phase": args.phase, "args": vars(args), "threads": torch.get_num_threads()}
    start = time.perf_counter()
    if args.phase in ("combined", "combined-train"):
        model = S.compose(large, small, options)
        trained, features = S.combined(model, train, options, root / "combined", root / "features",
                                       root / "combined.jsonl")
        record.update(features, train_seconds=round(trained.train_seconds, 1), options=asdict(options),
                      losses=[round(e["loss"], 3) for e in trained.log_history if "loss" in e])
        if args.phase == "combined":  # evaluate in the same process: no reload, one lock window
            record.update(evaluate(model, model.tokenizer, held_out, asked_train, args.eval_batch_size,
                                   root / "combined"))
    elif args.phase == "combined-eval":
        model = LLMModulesForCausalLM.from_pretrained(root / "combined", large_dtype=torch.float32).eval()
        record["load_seconds"] = round(time.perf_counter() - start, 1)
        record.update(evaluate(model, model.tokenizer, held_out, asked_train, args.eval_batch_size, root / "combined"))
    else:
        trained, tokenizer = S.small_only(small, train, options, root, root / "small_only.jsonl")
        record.update(train_seconds=round(trained.train_seconds, 1),
                      losses=[round(e["loss"], 3) for e in trained.log_history if "loss" in e])
        record.update(evaluate(trained.model, tokenizer, held_out, asked_train, args.eval_batch_size, root / "small_only"))
    record["wall_seconds"] = round(time.perf_counter() - start, 1)
    with open(root / "pilot.jsonl", "a") as handle:
        handle.write(json.dumps(record) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k != "outputs"}, indent=1))


def evaluate(model, tokenizer, held_out, asked_train, batch_size: int, name: Path) -> dict:
    start = time.perf_counter()
    b = S.answer_predictions(model, tokenizer, held_out, batch_size=batch_size, desc="held-out")
    seconds = time.perf_counter() - start
    a = S.answer_predictions(model, tokenizer, asked_train, batch_size=batch_size, desc="train questions")
    name.with_suffix(".predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in b.predictions))
    return {"held_out_exact_match": b.exact_match, "train_exact_match": a.exact_match, "format_valid": b.format_valid,
            "n_b": b.n, "n_a": a.n, "eval_seconds_per_question": round(seconds / b.n, 2),
            "outputs": [p["output"] for p in b.predictions[:5]]}


if __name__ == "__main__":
    main()
