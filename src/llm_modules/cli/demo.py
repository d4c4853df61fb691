"""`llm-modules demo`."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_demo(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="offline experiment: knowledge of a frozen model reaches a small one (with baselines), in minutes on CPU",
        description="Pretrain a small Qwen2-architecture knowledge source on a synthetic world, train the combined model "
        "and the baselines on a task in a new format about half of the people, and measure answers about the other "
        "half. Shows a progress bar per phase and one line per result; writes results.json, results.md, PNG plots, "
        "the models, and each training run's log (logs/NAME.jsonl) to --output-dir.",
    )
    parser.add_argument("--output-dir", default="llm-modules-demo", help="where results, models and logs go")
    parser.add_argument("--seed", type=int, default=0, help="seed of the world and of every training run")
    parser.add_argument("--quick", action="store_true", help="64 people and four systems (about 2 minutes on 2 CPU cores; the full run takes about 9)")
    parser.set_defaults(handler=run_demo)


def run_demo(args: argparse.Namespace) -> None:
    from ..demo import run_demo as demo

    results = demo(args.output_dir, seed=args.seed, quick=args.quick)
    print(results["table"])
    out = Path(args.output_dir)
    print(f"wall time {results['wall_seconds']:.0f} s; results in {out / 'results.json'}, training logs in {out / 'logs'}")
