"""The demo over several seeds, as the docs report it: mean (min-max) of each system's scores.

    for s in 0 1 2; do llm-modules demo --seed $s --output-dir demo-$s; done   # or --task two-sources, or --real
    python benchmarks/demo_seeds.py demo-0 demo-1 demo-2 [--no-times]

`--no-times` leaves out training and wall times (for runs that shared the cores with other work).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLUMNS = [("split_b_exact_match", "split B exact match"), ("split_a_exact_match", "split A exact match"),
           ("format_valid", "well-formed (B)"), ("train_seconds", "train s")]
# `--real` runs are compare's seed dirs: held-out and train questions under compare's names.
REAL_COLUMNS = [("eval_exact_match", "held-out exact match"), ("train_exact_match", "train questions"),
                ("format_valid", "well-formed (held-out)"), ("train_seconds", "train s")]


def spread(values: list[float], digits: int) -> str:
    mean = sum(values) / len(values)
    return f"{mean:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def main(dirs: list[str], times: bool = True) -> None:
    runs = [json.loads((Path(d) / "results.json").read_text()) for d in dirs]
    names = list(runs[0]["systems"])
    real = "eval_exact_match" in runs[0]["systems"][names[0]]
    held_out, count = ("eval_exact_match", "n_eval") if real else ("split_b_exact_match", "n_b")
    columns = [(key, title) for key, title in (REAL_COLUMNS if real else COLUMNS) if times or key != "train_seconds"]
    print(f"seeds {', '.join(str(r['seed']) for r in runs)}; mean (min-max) over {len(runs)} runs\n")
    print("| system | " + " | ".join(title for _, title in columns) + " | trainable params |")
    print("| --- |" + " ---: |" * (len(columns) + 1))
    for name in names:
        cells = [spread([r["systems"][name][key] for r in runs], 0 if key == "train_seconds" else 3) for key, _ in columns]
        print(f"| `{name}` | " + " | ".join(cells) + f" | {runs[0]['systems'][name]['trainable_params']:,} |")
    wall = f"wall time: {spread([r['wall_seconds'] for r in runs], 0)} s; " if times else ""
    majority = ""
    if "majority_baseline_b" in runs[0]:  # the synthetic demos; the real one's answers are numbers
        majority = f"majority baseline on split B: {spread([r['majority_baseline_b'] for r in runs], 3)}; "
    print(f"\n{majority}{wall}{count} = {runs[0]['systems'][names[0]][count]}")
    if {"combined", "small_sft", "large_native"} <= set(names):  # `--real`: issue 12's targets, seed by seed
        print()
        for r in runs:
            b = {name: r["systems"][name][held_out] for name in names}
            print(f"seed {r['seed']}: " + ", ".join(f"{name} {score:.3f}" for name, score in b.items())
                  + f"; combined - small_sft = {b['combined'] - b['small_sft']:+.3f}, combined / large_native = "
                  f"{b['combined'] / b['large_native']:.3f}" + (f"; wall {r['wall_seconds']:.0f} s" if times else ""))
    with_attributes = [n for n in names if "per_attribute_b" in runs[0]["systems"][n]]
    if with_attributes:  # `--task two-sources`: split B exact match per attribute
        attributes = list(runs[0]["systems"][with_attributes[0]]["per_attribute_b"])
        print("\n| system | " + " | ".join(attributes) + " |")
        print("| --- |" + " ---: |" * len(attributes))
        for name in with_attributes:
            cells = [spread([r["systems"][name]["per_attribute_b"][a] for r in runs], 3) for a in attributes]
            print(f"| `{name}` | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main([a for a in sys.argv[1:] if a != "--no-times"], times="--no-times" not in sys.argv)
