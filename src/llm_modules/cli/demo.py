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
        "half (--task two-sources: two sources that each know half of every person's facts). Shows a progress bar per "
        "phase and one line per result; writes results.json, results.md, PNG plots, the models, and each training "
        "run's log (logs/NAME.jsonl) to --output-dir.",
    )
    parser.add_argument("--output-dir", help="where results, models and logs go (default: llm-modules-demo, or "
                        "llm-modules-demo-two-sources with --task two-sources)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the world and of every training run")
    parser.add_argument("--quick", action="store_true",
                        help="64 people and four systems (about 5 minutes on 2 CPU cores; the full run takes "
                        "about 13, 15-17 with --task two-sources)")
    parser.add_argument(
        "--task", choices=["knowledge", "two-sources"], default="knowledge",
        help="knowledge (default): one source, the paper's setting; two-sources: two sources that each read half of "
        "every biography, composed in one model (with single-source and depth-connection baselines)",
    )
    parser.add_argument(
        "--real", action="store_true",
        help="real weights instead of the synthetic world: Qwen2.5-Coder-1.5B-Instruct frozen + SmolLM2-135M-Instruct "
        "on generated 3-digit subtraction (fetched with `llm-modules fetch` when missing; 19-28 minutes on 2 CPU "
        "cores, --quick about 11; docs/getting-started.md)",
    )
    parser.set_defaults(handler=run_demo)


def run_demo(args: argparse.Namespace) -> None:
    from .common import UsageError

    if args.real and args.task != "knowledge":
        raise UsageError("--real runs its own task: drop --task")
    if args.real:
        from ..demo.real import run_real_demo as demo
    elif args.task == "two-sources":
        from ..demo.two_sources import run_two_sources_demo as demo
    else:
        from ..demo import run_demo as demo

    default = {"two-sources": "llm-modules-demo-two-sources"}.get(args.task, "llm-modules-demo")
    output_dir = args.output_dir or ("llm-modules-demo-real" if args.real else default)
    results = demo(output_dir, seed=args.seed, quick=args.quick)
    print(results["table"])
    out = Path(output_dir)
    print(f"wall time {results['wall_seconds']:.0f} s; results in {out / 'results.json'}, training logs in {out / 'logs'}")
