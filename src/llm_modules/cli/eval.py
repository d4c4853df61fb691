"""`llm-modules eval`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import (
    UsageError, add_frozen_precision_arguments, add_large_model_argument, int_at_least, read_model_config,
)


def add_eval(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="validation loss, perplexity and answer accuracy of a combined model or any causal LM on Stratos rows",
        description="Validation loss and perplexity on the assistant tokens, and for rows with a "
        "<|begin_of_solution|> section, greedy-answer exact match (the last \\boxed{} inside when present, "
        "normalised) and the rate of well-formed answers. Works the same on plain Hugging Face causal LMs.",
    )
    parser.add_argument("--model", required=True, help="a saved combined model dir, or a causal LM hub id or dir")
    parser.add_argument("--dataset", required=True, help="hub dataset id, or a local .json/.jsonl/.parquet file or dir")
    parser.add_argument("--split", default="train", help="split of a hub dataset (slices work: 'train[-500:]')")
    parser.add_argument("--limit", type=int_at_least(1), help="evaluate the first N rows only")
    parser.add_argument("--max-new-tokens", type=int_at_least(1), default=1024)
    parser.add_argument("--batch-size", type=int_at_least(1), default=8)
    parser.add_argument("--max-length", type=int_at_least(1), default=4096, help="skip longer rows in the loss")
    parser.add_argument("--no-generate", action="store_true", help="loss and perplexity only")
    add_large_model_argument(parser)
    add_frozen_precision_arguments(parser)
    parser.add_argument("--device", help="cpu or cuda[:N] (default: cuda when available)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off by default)")
    parser.add_argument("--output", help="also write all metrics and every prediction to this JSON file")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")
    parser.set_defaults(handler=run_eval)


def run_eval(args: argparse.Namespace) -> None:
    from ..data import load_rows
    from ..evaluation import evaluate_dataset, first_rows, load_model_for_eval, write_json
    from ..sources import resolve_model_source

    # The models' paths first: a typo should not wait for the dataset to load.
    model_source, _ = read_model_config(args.model, "--model", args.trust_remote_code)
    large = [resolve_model_source(path, "--large-model") for path in args.large_model or []]
    large_source = None if not large else large[0] if len(large) == 1 else large
    rows = first_rows(load_rows(args.dataset, split=args.split), args.limit)
    if not rows:
        raise UsageError(f"--dataset {args.dataset}: no rows")
    try:
        model, tokenizer = load_model_for_eval(
            model_source, large_source, args.device, args.trust_remote_code, large_dtype=args.large_dtype,
            large_quantization=args.large_quantization,
            trained_quantization=args.trained_quantization,
        )
    except ValueError as error:
        raise UsageError(f"--model {args.model}: {error}") from error
    results = {"model": args.model, "dataset": args.dataset, **evaluate_dataset(
        model, tokenizer, rows, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
        max_length=args.max_length, generate=not args.no_generate,
    )}
    if args.output:
        write_json(Path(args.output), results)
    summary = {k: v for k, v in results.items() if k != "answers"}
    if "answers" in results:
        summary["answers"] = {k: v for k, v in results["answers"].items() if k != "predictions"}
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"{summary['rows']} rows ({summary['invalid_rows']} invalid, {summary['too_long']} too long for the loss)")
    print(f"validation loss {summary['validation_loss']:.4f}  perplexity {summary['validation_perplexity']:.2f}  "
          f"({summary['validation_tokens']:,} answer tokens)")
    if "answers" in summary:
        answers = summary["answers"]
        print(f"answer exact match {answers['exact_match']:.3f}  well-formed {answers['format_valid']:.3f}  (n={answers['n']})")
    elif not args.no_generate:
        print("no row has a <|begin_of_solution|> section: no answer accuracy")
