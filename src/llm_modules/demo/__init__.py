"""`llm-modules demo`: knowledge held by a frozen model reaches a small one through the bridge, measured offline.

1. A synthetic world of fictional people, split into A and B (`world.py`).
2. A knowledge source pretrained from scratch on everyone's biographies and on QA lines about A (`knowledge_source.py`).
3. A task in a format the source never saw (Stratos rows), trained on A, evaluated on B by greedy generation.
4. The compared systems, same rows and budget (`systems.py`), and the report (`report.py`).

On the terminal: a progress bar per long phase and one line per result (logged to `llm_modules.demo` at INFO; the
command line shows them). Each Trainer's logs go to OUTPUT/logs/NAME.jsonl instead (`training_log`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from ..data import build_dataset
from ..evaluation import AnswerResult, evaluate_answers
from . import systems as S
from .knowledge_source import SourceOptions, build_tokenizer, native_answers, pretrain_source
from .report import SYSTEMS, write_atomic, write_report
from .world import ATTRIBUTES, World, majority_baseline, make_world, task_rows

logger = logging.getLogger(__name__)


@dataclass
class DemoSettings:
    people_a: int
    people_b: int
    source: SourceOptions
    task: S.TaskOptions
    eval_people_a: int  # people of A whose questions measure split-A accuracy (all of B is always measured)
    systems: tuple[str, ...] = tuple(SYSTEMS)
    max_new_tokens: int = 40


def default_settings(quick: bool, seed: int) -> DemoSettings:
    if quick:
        return DemoSettings(
            people_a=48, people_b=16, eval_people_a=16,
            source=SourceOptions(),
            task=S.TaskOptions(epochs=60, seed=seed),
            systems=("small_only", "teacher_native", "teacher_new_format", "combined"),
        )
    return DemoSettings(people_a=150, people_b=50, eval_people_a=30, source=SourceOptions(), task=S.TaskOptions(seed=seed))


def answer_row(result_b: AnswerResult, result_a: AnswerResult, trainable_params: int, train_seconds: float) -> dict:
    return {
        "split_b_exact_match": result_b.exact_match,
        "split_a_exact_match": result_a.exact_match,
        "format_valid": result_b.format_valid,
        "trainable_params": int(trainable_params),
        "train_seconds": round(train_seconds, 1),
        "n_b": result_b.n,
        "n_a": result_a.n,
    }


def native_row(model, tokenizer, world: World, eval_a, predictions_path: Path, attributes=tuple(ATTRIBUTES)) -> dict:
    """The source in its own QA format, on the facts of `attributes` (the ones it read): exact match of its answer
    sentence with either of its wordings (`Kalomira lives in Oslo.` or `They live in Oslo.`); well-formed: one of
    those sentences with any value."""
    scores = {}
    for split, people in (("b", world.split_b), ("a", eval_a)):
        pairs = native_answers(model, tokenizer, people, attributes=attributes)
        if split == "b":
            predictions_path.write_text("".join(json.dumps({"answer": a, "references": r}) + "\n" for a, r in pairs))
        correct = sum(answer in wordings for answer, wordings in pairs)
        well_formed = sum(
            answer.endswith(".") and any(answer.rsplit(" ", 1)[0] == w.rsplit(" ", 1)[0] for w in wordings)
            for answer, wordings in pairs
        )
        scores[split] = (correct / len(pairs), well_formed / len(pairs), len(pairs))
    return {
        "split_b_exact_match": scores["b"][0], "split_a_exact_match": scores["a"][0], "format_valid": scores["b"][1],
        "trainable_params": 0, "train_seconds": 0.0, "n_b": scores["b"][2], "n_a": scores["a"][2],
    }


def run_demo(output_dir: str | Path = "llm-modules-demo", seed: int = 0, quick: bool = False,
             settings: DemoSettings | None = None) -> dict[str, Any]:
    """Run the whole experiment and write results.json, results.md and the plots to `output_dir`; return the results."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise NotADirectoryError(f"--output-dir {output_dir} is a file, expected a directory (or a new path)")
    with tempfile.TemporaryDirectory(prefix="llm-modules-demo-") as scratch, no_loading_bars():
        return _run(output_dir, seed, quick, settings or default_settings(quick, seed), Path(scratch))


def evaluate_system(model, tokenizer, name: str, rows_b: list[dict], rows_eval_a: list[dict], predictions_dir: Path,
                    max_new_tokens: int, progress: bool = True) -> tuple[AnswerResult, AnswerResult]:
    """Greedy answers to every question of split B and of the measured people of A; split B's predictions are
    written to `predictions_dir/NAME.jsonl`. Returns (split B, split A) results. `progress=False` hides the bars."""
    kwargs = dict(max_new_tokens=max_new_tokens, batch_size=64, progress=progress)
    result_b = evaluate_answers(model, tokenizer, rows_b, desc=f"{name} on B", **kwargs)
    result_a = evaluate_answers(model, tokenizer, rows_eval_a, desc=f"{name} on A", **kwargs)
    write_atomic(predictions_dir / f"{name}.jsonl", "".join(json.dumps(p) + "\n" for p in result_b.predictions))
    return result_b, result_a


@contextlib.contextmanager
def no_loading_bars() -> Iterator[None]:
    """transformers' own progress bars ("Loading weights", "Writing model shards") off: the demo's models load and
    save in a blink, and each bar would leave a line behind. The Trainers' and the evaluation's bars stay."""
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _run(output_dir: Path, seed: int, quick: bool, settings: DemoSettings, work_dir: Path) -> dict[str, Any]:
    started = time.perf_counter()
    models_dir, data_dir, logs_dir = output_dir / "models", output_dir / "data", output_dir / "logs"
    phases = tqdm(total=3 + len(settings.systems), desc="demo", unit="phase")

    phases.set_postfix_str("world and tokenizer")
    world = make_world(settings.people_a, settings.people_b, seed)
    tokenizer = build_tokenizer(world, settings.source.vocab_size, seed)
    rows_a, rows_b = task_rows(world.split_a), task_rows(world.split_b)
    eval_a = world.split_a[: settings.eval_people_a]
    rows_eval_a = task_rows(eval_a)
    data_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train_a", rows_a), ("eval_b", rows_b)):  # for `llm-modules eval` afterwards
        write_atomic(data_dir / f"{name}.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    logger.info(
        f"world: {len(world.split_a)} people in split A (trained on), {len(world.split_b)} in split B (asked about); "
        f"tokenizer of {len(tokenizer):,} tokens"
    )
    phases.update()

    phases.set_postfix_str("pretraining the knowledge source")
    source_dir = (models_dir / "source").resolve()
    source_start = time.perf_counter()
    pretrained = pretrain_source(
        world, tokenizer, source_dir, settings.source, seed, work_dir / "source", logs_dir / "knowledge_source.jsonl"
    )
    histories = {"knowledge_source": pretrained.log_history}
    source_seconds = time.perf_counter() - source_start
    source = AutoModelForCausalLM.from_pretrained(source_dir).eval()
    final_loss = [entry["loss"] for entry in histories["knowledge_source"] if "loss" in entry][-1:]
    logger.info(
        f"knowledge source: {sum(p.numel() for p in source.parameters()):,} parameters, pretrained in "
        f"{source_seconds:.0f} s" + (f", final loss {final_loss[0]:.3f}" if final_loss else "")
    )
    phases.update()

    phases.set_postfix_str("task data")
    small_dir = S.save_small_model((models_dir / "small_init").resolve(), tokenizer, settings.task)
    train_dataset, _ = build_dataset(rows_a, tokenizer, max_length=None)
    logger.info(f"task: {len(rows_a)} training rows about split A; {len(rows_b)} questions about split B to answer")
    phases.update()

    predictions_dir = output_dir / "predictions"
    predictions_dir.mkdir(parents=True, exist_ok=True)

    def evaluate(model, name: str) -> tuple[AnswerResult, AnswerResult]:
        return evaluate_system(model, tokenizer, name, rows_b, rows_eval_a, predictions_dir, settings.max_new_tokens)

    results: dict[str, Any] = {"systems": {}}
    task = settings.task
    for name in settings.systems:
        phases.set_postfix_str(name)
        if name == "teacher_native":
            results["systems"][name] = native_row(source, tokenizer, world, eval_a, predictions_dir / f"{name}.jsonl")
        elif name == "teacher_new_format":
            results["systems"][name] = answer_row(*evaluate(source, name), 0, 0.0)
        else:
            log_file = logs_dir / f"{name}.jsonl"
            if name == "small_only":
                trained = S.small_only(train_dataset, tokenizer, task, work_dir, log_file)
            elif name == "distilled_small":
                trained = S.distilled_small(source_dir, train_dataset, tokenizer, task, work_dir, log_file)
            elif name == "large_finetuned":
                trained = S.large_finetuned(source_dir, train_dataset, tokenizer, task, work_dir, log_file)
            elif name in ("combined", "combined_noncausal"):
                trained = S.combined(source_dir, small_dir, train_dataset, tokenizer, task, models_dir / name,
                                     log_file, causal=name == "combined")
            else:
                raise ValueError(f"unknown system {name!r} (known: {', '.join(SYSTEMS)})")
            histories[name] = trained.log_history
            results["systems"][name] = answer_row(*evaluate(trained.model, name), trained.trainable_params,
                                                  trained.train_seconds)
        logger.info(result_line(name, results["systems"][name]))
        phases.update()
    phases.close()

    results.update({
        "majority_baseline_b": majority_baseline(world),
        "seed": seed,
        "quick": quick,
        "world": {"people_a": len(world.split_a), "people_b": len(world.split_b), "attributes": list(ATTRIBUTES)},
        "source": {
            "params": sum(p.numel() for p in source.parameters()),
            "pretrain_seconds": round(source_seconds, 1),
            "rounds": pretrained.rounds,
            "recall_split_a": pretrained.recall_split_a,
            "dir": str(source_dir),
        },
        "settings": {"source": asdict(settings.source), "task": asdict(settings.task)},
        "torch_threads": torch.get_num_threads(),
        "wall_seconds": round(time.perf_counter() - started, 1),
    })
    results["table"] = write_report(output_dir, results, histories)
    return results


def result_line(name: str, row: dict) -> str:
    """"combined: split B exact match 0.960 (split A 0.990), trained in 63 s"."""
    trained = f"trained in {row['train_seconds']:.0f} s" if row["trainable_params"] else "not trained"
    return (f"{name}: split B exact match {row['split_b_exact_match']:.3f} (split A {row['split_a_exact_match']:.3f}), "
            f"{trained}")


__all__ = ["DemoSettings", "default_settings", "run_demo"]
