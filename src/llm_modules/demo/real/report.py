"""The real demo's results.md table and accuracy plot (results.json and the loss plot as in `demo/report.py`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from ..report import write_atomic

WHAT = {
    "small_zero_shot": "SmolLM2-135M-Instruct, own chat template, untrained",
    "large_native": "Qwen2.5-Coder-1.5B-Instruct, own chat template (the ceiling)",
    "small_sft": "SmolLM2 fine-tuned on the rows (all weights)",
    "combined": "LLM Modules: Qwen frozen, SmolLM2 + bridge trained",
}


def markdown_table(results: dict[str, Any]) -> str:
    lines = [
        f"Task: {results['task']['description']} (`{results['task']['name']}`), seed {results['seed']}.",
        "",
        "| system | what | held-out exact match | train questions | well-formed (held-out) | trainable params | train s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, row in results["systems"].items():
        lines.append(
            f"| `{name}` | {WHAT.get(name, name)} | {row['eval_exact_match']:.3f} (n={row['n_eval']}) "
            f"| {row['train_exact_match']:.3f} (n={row['n_eval_train']}) | {row['format_valid']:.3f} "
            f"| {row['trainable_params']:,} | {row['train_seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot_accuracy(results: dict[str, Any], path: Path) -> None:
    names = list(results["systems"])
    figure = Figure(figsize=(8, 4.5), layout="constrained")
    axes = figure.subplots()
    width = 0.38
    for offset, key, label, alpha in ((-width / 2, "eval_exact_match", "held-out questions", 1.0),
                                      (width / 2, "train_exact_match", "train questions", 0.6)):
        axes.bar([i + offset for i in range(len(names))], [results["systems"][n][key] for n in names], width,
                 label=label, alpha=alpha)
    axes.set_xticks(list(range(len(names))), names, rotation=20, ha="right")
    axes.set_ylim(0, 1.05)
    axes.set_ylabel("exact match")
    axes.set_title(f"Real weights: {results['task']['description']} (seed {results['seed']})")
    axes.legend(loc="upper left", fontsize=8)
    figure.savefig(path, dpi=120)


def write_real_report(output_dir: Path, results: dict[str, Any]) -> str:
    """Write results.json, results.md and accuracy.png; return the Markdown table."""
    table = markdown_table(results)
    write_atomic(output_dir / "results.json", json.dumps(results, indent=2, default=str) + "\n")
    write_atomic(output_dir / "results.md", table)
    plot_accuracy(results, output_dir / "accuracy.png")
    return table
