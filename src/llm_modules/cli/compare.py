"""`llm-modules compare`."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import int_at_least
from .train import option

SYSTEM_NAMES = ("small_zero_shot", "large_native", "small_sft", "combined", "combined_random_source", "large_lora",
                "small_seqkd", "small_gold")  # checked against the registry when the command runs


def add_compare(subparsers) -> None:
    parser = subparsers.add_parser(
        "compare",
        help="should I use this? LLM Modules beside LoRA and distillation on your pair and data, with the bill",
        description="Train and evaluate each system on the same rows under one fairness rule (same rows and maximum "
        "epochs, each system's learning rate chosen from the same grid on a validation split carved from the train "
        "rows, early stopping), then bill it: held-out exact match, train seconds and multiply-adds, peak memory, "
        "decode seconds per token, weights read per token, bytes to ship. Writes results.json, results.md and "
        "accuracy_vs_train_seconds.png over the seeds, and per seed its results, predictions, logs, data and models "
        "to --output-dir. Systems: " + ", ".join(SYSTEM_NAMES) + ". On the default pair one seed of every system "
        "took 53-64 minutes on 2 CPU cores with --n-train 32 --max-epochs 7 --batch-size 4 --learning-rates 1e-4 3e-4 "
        "--lora-large qwen2.5-coder-0.5b-instruct (docs/evaluation-and-compare.md); the defaults take longer.",
    )
    parser.add_argument("--large", default="qwen2.5-coder-1.5b-instruct",
                        help="the frozen large model: a model dir or an `llm-modules fetch` name (fetched if missing)")
    parser.add_argument("--small", default="smollm2-135m-instruct", help="the small model: a model dir or a fetch name")
    parser.add_argument("--task", default=None,
                        help="a built-in task, drawn per seed (sub3, add3, mul2x1, mul2x2: generated arithmetic; gsm: "
                        "GSM8K-style word problems, real GSM8K ones held out; stdlib: which standard-library module "
                        "defines a Python name; default sub3 when no --train/--eval)")
    parser.add_argument("--train", help="your train rows: a .json/.jsonl/.parquet file in the Stratos schema")
    parser.add_argument("--eval", help="your held-out rows, same schema (never trained on)")
    parser.add_argument("--systems", nargs="+", metavar="NAME", default=list(SYSTEM_NAMES),
                        help="which systems, in order")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], metavar="S", help="one run per seed")
    parser.add_argument("--max-epochs", type=float, default=8, help="epochs at most, for every trained system")
    parser.add_argument("--batch-size", type=int_at_least(1), default=8)
    parser.add_argument("--learning-rates", nargs="+", type=float, default=[1e-4, 3e-4, 1e-3], metavar="LR",
                        help="the grid every trained system chooses its learning rate from (on validation loss)")
    parser.add_argument("--patience", type=int_at_least(1), default=2,
                        help="early stopping: epochs without a better validation loss")
    parser.add_argument("--val-fraction", type=float, default=0.125, help="validation split of the train rows")
    parser.add_argument("--n-train", type=int_at_least(2), default=64, help="built-in task: rows drawn per seed")
    parser.add_argument("--n-eval", type=int_at_least(1), default=60, help="built-in task: held-out questions")
    parser.add_argument("--bridge-only-steps", type=option("bridge_only_steps"), default=0.0, metavar="N",
                        help="combined systems: train the bridge alone for the first N steps (or that fraction of "
                        "all if < 1) before the small model and head join (default 0)")
    parser.add_argument("--lora-rank", type=int_at_least(1), default=64, help="large_lora: the adapters' rank")
    parser.add_argument("--lora-large", help="large_lora only: another large model (say so in every table)")
    parser.add_argument("--output-dir", default="llm-modules-compare", help="where results go")
    parser.add_argument("--summarize", nargs="+", metavar="DIR",
                        help="train nothing: summarize seeds that ran apart (each DIR an earlier --output-dir, or one "
                        "of its seed-S dirs; same task, models and budget) into --output-dir's results.json, "
                        "results.md and plot")
    parser.set_defaults(handler=run_compare)


def run_compare(args: argparse.Namespace) -> None:
    from .common import UsageError

    if args.summarize:
        summarize_seeds(args.summarize, Path(args.output_dir))
        return
    if args.task and (args.train or args.eval):
        raise UsageError("--task and --train/--eval are two ways to give the rows: use one")
    if bool(args.train) != bool(args.eval):
        raise UsageError("--train and --eval go together: give both files (or neither, and a built-in --task)")
    if not 0 <= args.val_fraction < 1:
        raise UsageError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if args.max_epochs <= 0 or any(lr <= 0 for lr in args.learning_rates):
        raise UsageError("--max-epochs and --learning-rates must be > 0")
    from ..compare import CompareSettings, FitBudget, SystemOptions, run_compare as run
    from ..compare.systems import SYSTEMS
    from ..compare.tasks import BUILTIN_TASKS

    unknown = [name for name in args.systems if name not in SYSTEMS]
    if unknown:
        raise UsageError(f"unknown system {unknown[0]!r} (known: {', '.join(SYSTEMS)})")
    task = args.task or (None if args.train else "sub3")
    if task is not None and task not in BUILTIN_TASKS:
        raise UsageError(f"unknown task {task!r} (built-in: {', '.join(BUILTIN_TASKS)}; or give --train and --eval)")
    settings = CompareSettings(
        large=args.large, small=args.small, task=task, train=args.train, eval=args.eval, n_train=args.n_train,
        n_eval=args.n_eval, val_fraction=args.val_fraction, systems=tuple(args.systems), seeds=tuple(args.seeds),
        budget=FitBudget(max_epochs=args.max_epochs, batch_size=args.batch_size,
                         learning_rates=tuple(args.learning_rates), patience=args.patience),
        options=SystemOptions(lora_rank=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_large=args.lora_large,
                              bridge_only_steps=args.bridge_only_steps),
    )
    try:
        settings.check()
    except ValueError as error:
        raise UsageError(str(error)) from None
    results = run(settings, args.output_dir)
    print_summary(results["table"], Path(args.output_dir))


def print_summary(table: str, output_dir: Path) -> None:
    print(table)
    print(f"results in {output_dir / 'results.json'}, plot {output_dir / 'accuracy_vs_train_seconds.png'}")


def summarize_seeds(dirs: list[str], output_dir: Path) -> None:
    """`--summarize`: the summary over seeds that ran in separate invocations (on one machine or several)."""
    from ..compare.report import load_seed_results, write_summary
    from .common import UsageError

    try:
        per_seed = load_seed_results(dirs)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if output_dir.exists() and not output_dir.is_dir():
        raise NotADirectoryError(f"--output-dir {output_dir} is a file, expected a directory (or a new path)")
    output_dir.mkdir(parents=True, exist_ok=True)
    print_summary(write_summary(output_dir, per_seed)["table"], output_dir)
