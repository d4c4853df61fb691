"""`llm-modules compare`'s outputs: each seed's results.json/results.md, and the summary over seeds with its plot
(held-out exact match against train seconds, log scale, one marker per system, its area the decode cost per token)."""

from __future__ import annotations

import json
from pathlib import Path
from statistics import mean
from typing import Any

from matplotlib.figure import Figure

from ..demo.report import write_atomic

METRICS = ("eval_exact_match", "train_exact_match", "format_valid", "trainable_params", "train_seconds",
           "best_seconds", "grid_seconds", "train_multiply_adds", "peak_rss_bytes", "decode_seconds_per_token",
           "weights_read_per_token_bytes", "disk_bytes")


def _json(results: dict[str, Any]) -> str:
    return json.dumps(results, indent=2, default=str) + "\n"


def _spread(values: list[float], digits: str) -> str:
    if not values:
        return "-"
    if len(values) == 1 or min(values) == max(values):
        return format(values[0], digits)
    return f"{format(mean(values), digits)} ({format(min(values), digits)}-{format(max(values), digits)})"


def _scaled(values: list[float | None], scale: float) -> list[float]:
    return [v / scale for v in values if v is not None]


def markdown_table(rows: dict[str, list[dict[str, Any]]], header: str) -> str:
    """One line per system; each number the mean (min-max) over the seeds' rows."""
    lines = [header, "",
             "| system | held-out exact match | train questions | well-formed | trained params | lr | train s "
             "| s to best epoch | train multiply-adds | peak RSS GiB | decode ms/token | weights read/token MB "
             "| ship GB |",
             "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, seeds in rows.items():
        def values(key: str) -> list:
            return [row.get(key) for row in seeds]

        lrs = sorted({row["lr"] for row in seeds if row.get("lr")})
        lines.append(
            f"| `{name}` | {_spread(values('eval_exact_match'), '.3f')} "
            f"| {_spread([v for v in values('train_exact_match') if v is not None], '.3f')} "
            f"| {_spread(values('format_valid'), '.3f')} | {_spread(values('trainable_params'), ',.0f')} "
            f"| {', '.join(f'{lr:g}' for lr in lrs) or '-'} | {_spread(values('train_seconds'), '.0f')} "
            f"| {_spread(values('best_seconds'), '.0f')} | {_spread(_scaled(values('train_multiply_adds'), 1), '.2e')} "
            f"| {_spread(_scaled(values('peak_rss_bytes'), 2**30), '.1f')} "
            f"| {_spread(_scaled(values('decode_seconds_per_token'), 1e-3), '.0f')} "
            f"| {_spread(_scaled(values('weights_read_per_token_bytes'), 1e6), ',.0f')} "
            f"| {_spread(_scaled(values('disk_bytes'), 1e9), '.2f')} |")
    return "\n".join(lines) + "\n"


def _header(results: dict[str, Any], seeds: list[int]) -> str:
    lora_large = results.get("options", {}).get("lora_large")
    lora = (f" `large_lora` adapts {Path(lora_large).parent.name if Path(lora_large).name == 'hf' else lora_large}, "
            f"not the large model of the other systems." if "large_lora" in results["systems"] and lora_large
            not in (None, "None") else "")
    return (f"Task: {results['task']['description']} (`{results['task']['name']}`), seeds "
            f"{', '.join(map(str, seeds))}; {results['n_eval']} held-out questions, {results['n_train']} train rows "
            f"(+{results['n_validation']} validation); {results['cpu']}, {results['torch_threads']} threads; "
            + ", ".join(f"{k} {v}" for k, v in results["versions"].items()) + "." + lora)


def write_seed_report(output_dir: Path, results: dict[str, Any]) -> str:
    """Write one seed's results.json and results.md; return the Markdown table."""
    table = markdown_table({name: [row] for name, row in results["systems"].items()},
                           _header(results, [results["seed"]]))
    write_atomic(output_dir / "results.json", _json(results))
    write_atomic(output_dir / "results.md", table)
    return table


def summarize(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Per system and metric: {"mean", "min", "max", "per_seed"} over the seeds that ran it."""
    names = list(dict.fromkeys(name for results in per_seed for name in results["systems"]))
    summary: dict[str, Any] = {}
    for name in names:
        rows = [results["systems"][name] for results in per_seed if name in results["systems"]]
        summary[name] = {}
        for metric in METRICS:
            values = [row.get(metric) for row in rows]
            numbers = [v for v in values if v is not None]
            summary[name][metric] = ({"mean": mean(numbers), "min": min(numbers), "max": max(numbers),
                                      "per_seed": values} if numbers else None)
        summary[name]["lr"] = [row.get("lr") for row in rows]
    return summary


def plot(summary: dict[str, Any], path: Path, title: str) -> None:
    """Held-out exact match (mean over seeds, bars min-max) against train seconds of the chosen run (log scale);
    untrained systems at the left edge; marker area proportional to decode seconds per token."""
    figure = Figure(figsize=(8, 5), layout="constrained")
    axes = figure.subplots()
    trained = [s["train_seconds"]["mean"] for s in summary.values() if s["train_seconds"]["mean"] > 0]
    floor = min(trained) / 3 if trained else 1.0
    costs = [s["decode_seconds_per_token"]["mean"] for s in summary.values() if s["decode_seconds_per_token"]]
    largest = max(costs) if costs else 1.0
    for name, s in summary.items():
        x = s["train_seconds"]["mean"] or floor
        accuracy = s["eval_exact_match"]
        size = 40 + 600 * (s["decode_seconds_per_token"]["mean"] / largest if s["decode_seconds_per_token"] else 0)
        axes.errorbar([x], [accuracy["mean"]], yerr=[[accuracy["mean"] - accuracy["min"]],
                                                      [accuracy["max"] - accuracy["mean"]]], fmt="none", alpha=0.5)
        axes.scatter([x], [accuracy["mean"]], s=size, alpha=0.6)
        axes.annotate(name, (x, accuracy["mean"]), textcoords="offset points", xytext=(6, 6), fontsize=8)
    axes.set_xscale("log")
    axes.set_ylim(-0.05, 1.05)
    axes.set_xlabel("train seconds of the chosen run (log; untrained systems at the left)")
    axes.set_ylabel("held-out exact match")
    axes.set_title(title + "\nmarker area: decode seconds per token", fontsize=10)
    figure.savefig(path, dpi=120)


def write_summary(output_dir: Path, per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Write results.json, results.md and accuracy_vs_train_seconds.png over the seeds; return them with "table"."""
    # Seeds run apart (`load_seed_results`) may come from different machines: the header then names every CPU.
    cpus = list(dict.fromkeys(results["cpu"] for results in per_seed))
    first = {**per_seed[0], "cpu": cpus[0] if len(cpus) == 1 else "timings from different CPUs: " + "; ".join(cpus)}
    seeds = [results["seed"] for results in per_seed]
    names = dict.fromkeys(name for results in per_seed for name in results["systems"])  # a cut-off seed ran fewer
    rows = {name: [r["systems"][name] for r in per_seed if name in r["systems"]] for name in names}
    table = markdown_table(rows, _header(first, seeds))
    summary = {"task": first["task"], "seeds": seeds, "options": first.get("options", {}), "n_eval": first["n_eval"],
               "cpu": first["cpu"],
               "versions": first["versions"], "torch_threads": first["torch_threads"], "gpu": first["gpu"],
               "wall_seconds": [r.get("wall_seconds") for r in per_seed], "systems": summarize(per_seed)}
    write_atomic(output_dir / "results.json", _json(summary))
    write_atomic(output_dir / "results.md", table)
    plot(summary["systems"], output_dir / "accuracy_vs_train_seconds.png",
         f"{first['task']['description']}, seeds {', '.join(map(str, seeds))}")
    return {**summary, "table": table}


# What must match for seeds run apart to be one comparison (besides the budget's fields other than the seed).
SAME_COMPARISON = ("task", "n_eval", "n_eval_train", "n_train", "n_validation", "large", "small", "options")


def _model_name(path: str) -> str:
    """A fetched model's name (its dir above `hf/`), or the dir's own name: seeds run on two machines keep their
    models in different places."""
    return Path(path).parent.name if Path(path).name == "hf" else Path(path).name


def load_seed_results(paths: list[str | Path]) -> list[dict[str, Any]]:
    """The seeds' results of earlier `llm-modules compare` runs, sorted by seed, for `write_summary`: each path an
    earlier --output-dir (every `seed-S/results.json` in it) or one `seed-S` dir. A seed cut off mid-run counts with
    the systems it finished.

    Raises `FileNotFoundError` for a path that is missing or holds no seed results, `ValueError` (one line naming the
    file and field, expected vs got) for an unreadable file, a seed given twice, or seeds that did not run the same
    comparison (task, sizes, models, options, budget)."""
    files: list[Path] = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise FileNotFoundError(f"--summarize {path}: no such directory")
        found = [path / "results.json"] if (path / "results.json").is_file() and path.name.startswith("seed-") \
            else sorted(path.glob("seed-*/results.json"))
        if not found:
            raise FileNotFoundError(f"--summarize {path}: no seed results in it (seed-S/results.json)")
        files += found
    loaded: list[tuple[Path, dict[str, Any]]] = []
    for file in files:
        try:
            results = json.loads(file.read_text())
        except (OSError, ValueError) as error:
            raise ValueError(f"{file}: not a seed's results of llm-modules compare ({error})") from None
        if not isinstance(results, dict) or not {"seed", "systems"} <= results.keys():
            raise ValueError(f"{file}: not a seed's results of llm-modules compare (no seed and systems in it; the "
                             "summary over seeds is not one)")
        loaded.append((file, results))
    first_file, first = loaded[0]

    def key(results: dict[str, Any], field: str) -> Any:
        if field in ("large", "small"):
            return _model_name(results.get(field, ""))
        if field == "budget":
            return {k: v for k, v in results.get("budget", {}).items() if k != "seed"}
        return results.get(field)

    seen: dict[int, Path] = {}
    for file, results in loaded:
        if results["seed"] in seen:
            raise ValueError(f"{file}: seed {results['seed']} is also in {seen[results['seed']]}")
        seen[results["seed"]] = file
        for field in (*SAME_COMPARISON, "budget"):
            if key(results, field) != key(first, field):
                raise ValueError(f"{file}: {field} is {key(results, field)}, expected {key(first, field)} as in "
                                 f"{first_file} (seeds of one comparison share it)")
    return [results for _, results in sorted(loaded, key=lambda item: item[1]["seed"])]


__all__ = ["load_seed_results", "markdown_table", "plot", "summarize", "write_seed_report", "write_summary"]
