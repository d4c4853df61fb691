"""The demo's outputs: results.json, a Markdown table (also printed) and two PNG plots."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure  # the object API needs no display and keeps no global pyplot state

# Display order and what each system is, for the table.
SYSTEMS = {
    "small_only": "small model alone, fine-tuned",
    "teacher_native": "source, its own QA format",
    "teacher_new_format": "source, prompted in the new format",
    "combined": "LLM Modules (source frozen)",
    "distilled_small": "small model + logit distillation",
    "large_finetuned": "source, all weights fine-tuned",
    "combined_noncausal": "LLM Modules, paper's leaky attention",
}


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def markdown_table(results: dict[str, Any], systems: dict[str, str] = SYSTEMS) -> str:
    lines = [
        "| system | what | split B exact match | split A exact match | well-formed (B) | trainable params | train s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, what in systems.items():
        row = results["systems"].get(name)
        if row is None:
            continue
        lines.append(
            f"| `{name}` | {what} | {row['split_b_exact_match']:.3f} (n={row['n_b']}) | {row['split_a_exact_match']:.3f} "
            f"| {row['format_valid']:.3f} | {row['trainable_params']:,} | {row['train_seconds']:.0f} |"
        )
    lines.append("")
    lines.append(f"Majority-class baseline on split B: {results['majority_baseline_b']:.3f}.")
    return "\n".join(lines) + "\n"


def plot_accuracy(results: dict[str, Any], path: Path, systems: dict[str, str] = SYSTEMS,
                  title: str = "Knowledge transfer: answers about people the small model never saw") -> None:
    names = [name for name in systems if name in results["systems"]]
    figure = Figure(figsize=(9, 4.5), layout="constrained")
    axes = figure.subplots()
    positions = range(len(names))
    width = 0.38
    split_b = [results["systems"][n]["split_b_exact_match"] for n in names]
    split_a = [results["systems"][n]["split_a_exact_match"] for n in names]
    axes.bar([p - width / 2 for p in positions], split_b, width, label="split B (facts only the source read)")
    axes.bar([p + width / 2 for p in positions], split_a, width, label="split A (trained questions)", alpha=0.6)
    axes.axhline(results["majority_baseline_b"], color="grey", linestyle="--", label="majority class (B)")
    axes.set_xticks(list(positions), names, rotation=25, ha="right")
    axes.set_ylim(0, 1.05)
    axes.set_ylabel("exact match")
    axes.set_title(title)
    axes.legend(loc="upper left", fontsize=8)
    figure.savefig(path, dpi=120)


def plot_losses(histories: dict[str, list[dict]], path: Path) -> None:
    """Training loss per epoch: the source's pretraining on the left, the task's trained systems on the right."""
    figure = Figure(figsize=(10, 4), layout="constrained")
    source_axes, task_axes = figure.subplots(1, 2)
    for name, history in histories.items():
        points = [(entry["epoch"], entry["loss"]) for entry in history if "loss" in entry and "epoch" in entry]
        if not points:
            continue
        axes = source_axes if name.startswith("knowledge_source") else task_axes
        axes.plot(*zip(*points), label=name)
    source_axes.set_title("knowledge source pretraining")
    source_axes.set_xlabel("round (one pass over the world)")
    task_axes.set_title("task training on split A")
    task_axes.set_xlabel("epoch")
    for axes in (source_axes, task_axes):
        axes.set_ylabel("training loss")
        axes.set_yscale("log")
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize=8)
    figure.savefig(path, dpi=120)


def write_report(output_dir: Path, results: dict[str, Any], histories: dict[str, list[dict]],
                 systems: dict[str, str] = SYSTEMS, **plot_options: str) -> str:
    """Write results.json, results.md, accuracy.png and loss_curves.png; return the Markdown table. `systems`: the
    rows in display order with what each is; `plot_options`: `plot_accuracy`'s title."""
    output_dir.mkdir(parents=True, exist_ok=True)
    table = markdown_table(results, systems)
    write_atomic(output_dir / "results.json", json.dumps(results, indent=2) + "\n")
    write_atomic(output_dir / "results.md", table)
    plot_accuracy(results, output_dir / "accuracy.png", systems, **plot_options)
    plot_losses(histories, output_dir / "loss_curves.png")
    return table
