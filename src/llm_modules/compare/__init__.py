"""`llm-modules compare`: LLM Modules beside LoRA and distillation on the user's pair and data, with the bill.

    from llm_modules.compare import CompareSettings, run_compare
    results = run_compare(CompareSettings(large="DIR_L", small="DIR_S", task="sub3", seeds=(0, 1, 2)), "out")

For each seed: the rows (a built-in task drawn from the seed, or the user's files) lose a seeded validation split;
each system of `systems.SYSTEMS` is trained under the fairness rule (`fitting.py`: same rows, same maximum epochs and
batch, its own learning rate from the same grid chosen on validation loss, early stopping), its best run saved to
`models/NAME` and reloaded, asked the held-out questions and some train questions again, and billed (`bill.py`:
training seconds, multiply-adds and peak memory, decode seconds per token at a fixed context, weights read per token,
bytes to ship). Each seed writes `seed-S/results.json` (`systems.NAME.*`, `n_eval`, `seed`, versions, CPU model),
`seed-S/results.md`, `seed-S/predictions/NAME.jsonl`, `seed-S/logs/`; the output dir gets `results.json`/`results.md`
over the seeds (mean, min, max) and `accuracy_vs_train_seconds.png`.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import logging
import platform
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..data import build_dataset
from ..demo.report import write_atomic
from ..evaluation import answers_match, evaluate_answers, generate_texts
from .fitting import Fit, FitBudget
from . import stdlib
from .systems import DEFAULT_SYSTEMS, SYSTEMS, Context, SystemOptions, load_plain
from .tasks import CompareTask, builtin_task, files_task, plain_row, reference_answer, split_validation

logger = logging.getLogger(__name__)


@dataclass
class CompareSettings:
    """One comparison. `large`/`small` are model dirs or `llm-modules fetch` catalogue names; the rows come from
    `task` (a built-in task's name) or the user's `train`/`eval` files (both, in the Stratos schema)."""

    large: str = "qwen2.5-coder-1.5b-instruct"
    small: str = "smollm2-135m-instruct"
    task: str | None = "sub3"
    train: str | None = None
    eval: str | None = None
    n_train: int = 64  # built-in tasks: rows drawn per seed (the validation split comes out of them)
    n_eval: int = 60
    n_eval_train: int = 10  # train questions asked again (how well each system learned its own rows)
    val_fraction: float = 0.125
    systems: tuple[str, ...] = DEFAULT_SYSTEMS
    seeds: tuple[int, ...] = (0,)
    budget: FitBudget = field(default_factory=FitBudget)
    options: SystemOptions = field(default_factory=SystemOptions)
    eval_batch_size: int | None = None  # None: every question in one batch (decode steps cost ~the same for 10 or 70)
    decode_context: int = 256
    decode_tokens: int = 16
    measure_serving: bool = True  # False: no decode timing (`decode_seconds_per_token` None), as the demo preset
    # Presets only (`llm-modules demo --real`): a system's own learning rates instead of the shared grid. This is not
    # the fairness rule; a preset that sets it reports it.
    learning_rates_by_system: dict[str, tuple[float, ...]] = field(default_factory=dict)

    def learning_rates(self, system: str) -> tuple[float, ...]:
        return tuple(self.learning_rates_by_system.get(system, self.budget.learning_rates))

    def check(self) -> None:
        """Raises `ValueError` for an unknown system, a task given twice or not at all, or more stdlib questions asked
        than its table has."""
        unknown = [name for name in self.systems if name not in SYSTEMS]
        if unknown:
            raise ValueError(f"unknown system {unknown[0]!r} (known: {', '.join(SYSTEMS)})")
        missing = [(name, package) for name in self.systems for package in SYSTEMS[name].requires
                   if importlib.util.find_spec(package) is None]
        if missing:
            raise ValueError(f"{missing[0][0]} needs {missing[0][1]}: pip install 'llm-modules[compare]'")
        if bool(self.train) != bool(self.eval):
            raise ValueError("--train and --eval go together: give both files, or neither and a built-in --task")
        if not self.seeds:
            raise ValueError("no seeds: give at least one")
        if self.task == "stdlib" and not self.train:  # a packaged table: asking for more names than it has is bad input
            stdlib.check_size(self.n_train, self.n_eval)
        if self.val_fraction <= 0 and any(len(self.learning_rates(name)) > 1 for name in self.systems
                                           if SYSTEMS[name].trained):
            raise ValueError("a learning-rate grid needs a validation split to choose on: set val_fraction > 0 or "
                             "give one learning rate")


def run_compare(settings: CompareSettings, output_dir: str | Path, progress: bool = True) -> dict[str, Any]:
    """Run the comparison for every seed; write the outputs (module docstring); return the summary over seeds (as
    written to `results.json`, plus "table", the Markdown table)."""
    from ..demo import no_loading_bars

    settings.check()
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise NotADirectoryError(f"--output-dir {output_dir} is a file, expected a directory (or a new path)")
    large_dir, small_dir = resolve_model(settings.large, "--large"), resolve_model(settings.small, "--small")
    check_tokenizers({"--large": large_dir, "--small": small_dir})
    if settings.options.lora_large:
        settings.options.lora_large = str(resolve_model(settings.options.lora_large, "--lora-large"))
    per_seed = []
    with no_loading_bars():
        for seed in settings.seeds:
            task = (files_task(settings.train, settings.eval) if settings.train
                    else builtin_task(settings.task, settings.n_train, settings.n_eval, seed))
            per_seed.append(run_seed(settings, task, seed, large_dir, small_dir, output_dir / f"seed-{seed}", progress))
    from .report import write_summary

    return write_summary(output_dir, per_seed)


def resolve_model(name: str, flag: str) -> Path:
    """A local model dir, or an `llm-modules fetch` catalogue name (fetched when missing). Raises `ModelSourceError`
    (exit code 3) in the words every command uses for a path that is not a model, or for a name that is neither."""
    from ..fetch import catalogue, fetch, fetched_model
    from ..sources import ModelSourceError, looks_like_path, resolve_model_source

    if name in catalogue() and not Path(name).exists():
        found = fetched_model(name)
        return (found or fetch(name)).plain
    resolved = resolve_model_source(name, flag)
    if not looks_like_path(resolved) or not Path(resolved).is_dir():
        raise ModelSourceError(f"{flag} {name}: not a model dir nor a name `llm-modules fetch --list` knows")
    return Path(resolved)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_tokenizers(models: dict[str, Path]) -> None:
    """Read each model's tokenizer before any work: raises `ModelSourceError` (a missing model, exit code 3)
    naming the flag and the dir when one cannot be read."""
    from transformers import AutoTokenizer

    from ..sources import ModelSourceError

    for flag, path in models.items():
        if path.is_dir() and not any((path / name).is_file() for name in TOKENIZER_FILES):
            raise ModelSourceError(f"{flag} {path}: cannot read its tokenizer (no tokenizer files in it)")
        try:
            AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError, TypeError) as error:
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ModelSourceError(f"{flag} {path}: cannot read its tokenizer ({first})") from None


def run_seed(settings: CompareSettings, task: CompareTask, seed: int, large_dir: Path, small_dir: Path,
             output_dir: Path, progress: bool = True) -> dict[str, Any]:
    """One seed of the comparison; writes and returns its results (see the module docstring)."""
    from .report import write_seed_report

    started = time.perf_counter()
    for sub in ("logs", "predictions", "data", "models"):
        (output_dir / sub).mkdir(parents=True, exist_ok=True)
    train_rows, val_rows = split_validation(task.train_rows, settings.val_fraction, seed)
    asked_train = train_rows[: settings.n_eval_train]
    for name, rows in (("train", train_rows), ("validation", val_rows), ("eval", task.eval_rows)):
        write_atomic(output_dir / "data" / f"{name}.jsonl", "".join(json.dumps(plain_row(r)) + "\n" for r in rows))
    budget = FitBudget(**{**asdict(settings.budget), "seed": seed})
    options = settings.options
    if task.native_max_new_tokens is not None:
        options = replace(options, native_max_new_tokens=task.native_max_new_tokens)
    results: dict[str, Any] = {
        "task": {"name": task.name, "description": task.description}, "seed": seed,
        "n_eval": len(task.eval_rows), "n_eval_train": len(asked_train), "n_train": len(train_rows),
        "n_validation": len(val_rows), "large": str(large_dir), "small": str(small_dir),
        "budget": asdict(budget), "options": {k: str(v) for k, v in asdict(options).items()},
        **environment(), "systems": {},
    }
    with tempfile.TemporaryDirectory(prefix="llm-modules-compare-") as scratch:
        context = Context(large_dir, small_dir, [plain_row(r) for r in train_rows], [plain_row(r) for r in val_rows],
                          budget, options, Path(scratch), output_dir / "logs", task.native_messages,
                          task.native_answer, progress)
        # Native scoring needs the task's own rows (built-in ones carry their problem); the plain rows are for models.
        native_rows = {id(p): r for p, r in zip(context.train_rows + context.val_rows, train_rows + val_rows)}
        context.native_answer = lambda reply, row: task.native_answer(reply, native_rows.get(id(row), row))
        context.native_messages = lambda row: task.native_messages(native_rows.get(id(row), row))
        for name in settings.systems:
            logger.info(f"seed {seed}: {name}")
            start = time.perf_counter()
            row = run_system(name, settings, context, task, asked_train, output_dir)
            row["phase_seconds"] = round(time.perf_counter() - start, 1)
            results["systems"][name] = row
            logger.info(result_line(name, row))
            results["wall_seconds"] = round(time.perf_counter() - started, 1)
            write_seed_report(output_dir, results)  # after every system: a cut-off run keeps what it measured
            gc.collect()
    return results


def environment() -> dict[str, Any]:
    """Versions, CPU model and threads: every figure is named by the machine it was measured on."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ("llm-modules", "torch", "transformers", "peft", "trl", "accelerate"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            pass
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"versions": versions, "cpu": cpu, "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def run_system(name: str, settings: CompareSettings, context: Context, task: CompareTask, asked_train: list[dict],
               output_dir: Path) -> dict[str, Any]:
    """Train (over the grid), save, reload, evaluate and bill one system; its results row."""
    from .bill import PeakRSS, decode_seconds_per_token, disk_bytes, weights_read_per_token

    system = SYSTEMS[name]
    questions = task.eval_rows + asked_train
    n_eval = len(task.eval_rows)
    batch = settings.eval_batch_size or len(questions)
    row: dict[str, Any] = {"description": system.description}
    if not system.trained:
        model, tokenizer = load_plain(context.large_dir if system.which == "large" else context.small_dir,
                                      settings.options.dtype)
        predictions = native_predictions(model, tokenizer, questions, task, context.options.native_max_new_tokens,
                                         batch, context.progress, desc=name)
        row.update(trainable_params=0, train_seconds=0.0, best_seconds=0.0, train_multiply_adds=0, peak_rss_bytes=None,
                   grid=[])
        shipped = system.shipped(context)
    else:
        grid, best_fit = [], None
        model_dir = output_dir / "models" / name
        for lr in settings.learning_rates(name):
            with PeakRSS() as peak:
                fit = system.fit(context, lr)
            entry = {"lr": lr, "val_loss": fit.val_loss, "train_seconds": round(fit.train_seconds, 1),
                     "best_seconds": round(fit.best_seconds, 1), "best_epoch": fit.best_epoch,
                     "epochs_run": fit.epochs_run, "peak_rss_bytes": peak.peak_bytes,
                     "start_rss_bytes": peak.start_bytes, "shared_seconds": fit.extra.get("shared_seconds", 0.0)}
            grid.append(entry)
            logger.info(f"{name} lr {lr:g}: validation loss {fit.val_loss:.4f} at epoch {fit.best_epoch:g} "
                        f"({fit.train_seconds:.0f} s)")
            if best_fit is None or fit.val_loss < best_fit["val_loss"]:
                save_fit(name, fit, model_dir)
                best_fit = {**entry, "fit_extra": fit.extra, "trainable_params": fit.trainable_params,
                            "log_history": fit.log_history, "tokens": train_tokens(fit, context)}
            del fit
            gc.collect()
        model, tokenizer = load_fit(name, model_dir, context)
        budget_tokens = answer_token_budget(tokenizer, best_fit["fit_extra"].get("train_rows", context.train_rows))
        answers = evaluate_answers(model, tokenizer, questions, max_new_tokens=budget_tokens, batch_size=batch,
                                   desc=f"{name} questions", progress=context.progress)
        predictions = answers.predictions
        extra = {k: v for k, v in best_fit["fit_extra"].items() if k != "train_rows"}
        row.update(trainable_params=best_fit["trainable_params"], lr=best_fit["lr"], val_loss=best_fit["val_loss"],
                   train_seconds=best_fit["train_seconds"], best_seconds=best_fit["best_seconds"],
                   best_epoch=best_fit["best_epoch"], epochs_run=best_fit["epochs_run"],
                   # A one-time cost every run of the grid counts (the feature cache, seqkd's teacher) is paid once.
                   grid_seconds=round(sum(e["train_seconds"] - e["shared_seconds"] for e in grid)
                                      + max(e["shared_seconds"] for e in grid), 1),
                   peak_rss_bytes=best_fit["peak_rss_bytes"], start_rss_bytes=best_fit["start_rss_bytes"],
                   train_multiply_adds=multiply_adds(name, model, best_fit["tokens"], best_fit["epochs_run"],
                                                     context.large_dir),
                   grid=grid, max_new_tokens=budget_tokens, **extra)
        write_atomic(output_dir / "logs" / f"{name}.jsonl",
                     "".join(json.dumps(entry) + "\n" for entry in best_fit["log_history"]))
        shipped = [model_dir, *system.shipped(context)]
        if name == "large_lora":
            model = model.merge_and_unload()  # served merged: the adapters cost nothing per token then
    b, a = predictions[:n_eval], predictions[n_eval:]
    flexible = flexible_scores(task, b)  # before the predictions are written: it adds each one's flexible answer
    write_atomic(output_dir / "predictions" / f"{name}.jsonl", "".join(json.dumps(p, default=str) + "\n" for p in b))
    row.update(
        eval_exact_match=sum(p["correct"] for p in b) / len(b),
        train_exact_match=sum(p["correct"] for p in a) / len(a) if a else None,
        format_valid=sum(p["well_formed"] for p in b) / len(b), n_eval=len(b), n_eval_train=len(a),
        **flexible,
        decode_seconds_per_token=decode_seconds_per_token(model, tokenizer, context=settings.decode_context,
                                                          new_tokens=settings.decode_tokens)
        if settings.measure_serving else None,
        weights_read_per_token_bytes=weights_read_per_token(model),
        disk_bytes=disk_bytes(*shipped),
    )
    del model
    return row


def flexible_scores(task: CompareTask, predictions: list[dict[str, Any]]) -> dict[str, float]:
    """`eval_flexible_match`: the last number of each reply against the reference (lm-eval's flexible GSM8K score),
    for tasks that have one; with `eval_exact_match` per row source (`_source`: GSM's real and generated rows)."""
    if task.flexible_answer is None:
        return {}
    for p in predictions:
        p["flexible_answer"] = task.flexible_answer(p["output"])
        p["flexible_correct"] = answers_match(p["flexible_answer"], p["reference"])
    scores = {"eval_flexible_match": sum(p["flexible_correct"] for p in predictions) / len(predictions)}
    sources = [row.get("_source") for row in task.eval_rows]
    for source in sorted({s for s in sources if s}):
        chosen = [p for p, s in zip(predictions, sources) if s == source]
        scores[f"eval_exact_match_{source}"] = sum(p["correct"] for p in chosen) / len(chosen)
        scores[f"eval_flexible_match_{source}"] = sum(p["flexible_correct"] for p in chosen) / len(chosen)
    return scores


def native_predictions(model, tokenizer, rows: list[dict], task: CompareTask, max_new_tokens: int, batch_size: int,
                       progress: bool, desc: str) -> list[dict[str, Any]]:
    """Greedy replies of an untrained chat model in its own chat template, scored by the task's `native_answer`.
    `well_formed`: the reply gave an answer at all."""
    prompts = [tokenizer.apply_chat_template(task.native_messages(r), add_generation_prompt=True, tokenize=False)
               for r in rows]
    replies = generate_texts(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                             stop_strings=None, desc=desc, progress=progress, templated=True)
    predictions = []
    for row, reply in zip(rows, replies):
        answer, reference = task.native_answer(reply, row), reference_answer(row)
        predictions.append({"question": row["conversations"][-2]["value"], "output": reply, "answer": answer,
                            "reference": reference, "correct": answers_match(answer, reference),
                            "well_formed": answer is not None})
    return predictions


def answer_token_budget(tokenizer, rows: list[dict], margin: int = 8) -> int:
    """`max_new_tokens` for a trained system: its longest train answer in its own tokenizer, plus `margin`."""
    return margin + max(len(tokenizer(reference_text(r), add_special_tokens=False)["input_ids"]) for r in rows)


def reference_text(row: dict) -> str:
    return row["conversations"][-1]["value"]


def train_tokens(fit: Fit, context: Context) -> int:
    """Tokens per epoch of the rows a system trained on, in its own tokenizer."""
    rows = fit.extra.get("train_rows", context.train_rows)
    dataset, _ = build_dataset(rows, fit.tokenizer, max_length=None)
    return int(sum(len(ids) for ids in dataset["input_ids"]))


def save_fit(name: str, fit: Fit, directory: Path) -> None:
    """Save a system's best run to `directory` (replacing an earlier run's), atomically: written beside it, renamed."""
    staging = directory.with_name(directory.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    fit.model.save_pretrained(staging)
    if not name.startswith("combined"):  # the combined model saves its tokenizer itself
        fit.tokenizer.save_pretrained(staging)
    shutil.rmtree(directory, ignore_errors=True)
    staging.rename(directory)


def load_fit(name: str, directory: Path, context: Context):
    """(model in eval mode, tokenizer) of a system saved by `save_fit`."""
    from ..modeling import LLMModulesForCausalLM
    from .systems import randomize_frozen_model

    dtype = context.options.dtype
    if name.startswith("combined"):
        model = LLMModulesForCausalLM.from_pretrained(directory, large_model_name_or_path=str(context.large_dir),
                                                      dtype=dtype, large_dtype=dtype)
        if name == "combined_random_source":
            randomize_frozen_model(model.large, context.budget.seed)  # the same random weights it trained with
        return model.eval(), model.tokenizer
    if name == "large_lora":
        from peft import PeftModel

        base, tokenizer = load_plain(context.options.lora_large or context.large_dir, dtype)
        return PeftModel.from_pretrained(base, directory).eval(), tokenizer
    return load_plain(directory, dtype)


def multiply_adds(name: str, model, tokens: int, epochs: float, teacher_dir: Path) -> int:
    """Training multiply-adds of a system's chosen run (`bill.train_multiply_adds`)."""
    from .bill import train_multiply_adds, weights_per_token

    own = tokens
    if name.startswith("combined"):
        trained = sum(weights_per_token(part) for part in model.trained_parts())
        # The frozen model is read once per token through the feature cache.
        return train_multiply_adds(own, epochs, trained=trained, frozen_forward_once=weights_per_token(model.large))
    if name == "large_lora":
        lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        base = weights_per_token(model) - lora
        return train_multiply_adds(own, epochs, trained=lora, frozen_backprop=base)
    if name == "small_gold":
        # The teacher reads every row each epoch; its tokens are counted in the student's tokenizer (an
        # approximation: the two tokenizers' row lengths differ by a few tokens on these rows).
        return train_multiply_adds(own, epochs, trained=weights_per_token(model),
                                   frozen_forward=weights_per_token(meta_model(teacher_dir)))
    return train_multiply_adds(own, epochs, trained=weights_per_token(model))


def meta_model(path: Path):
    """The model of `path` with no weights loaded (shapes only), to count what it reads per token."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))


def result_line(name: str, row: dict) -> str:
    trained = f"trained {row['train_seconds']:.0f} s at lr {row['lr']:g}" if row.get("lr") else "not trained"
    decode = row["decode_seconds_per_token"]
    return (f"{name}: held-out exact match {row['eval_exact_match']:.3f} (train questions "
            f"{row['train_exact_match'] if row['train_exact_match'] is not None else float('nan'):.3f}), {trained}"
            + (f", decode {decode * 1000:.0f} ms/token" if decode is not None else ""))


__all__ = ["CompareSettings", "FitBudget", "SYSTEMS", "SystemOptions", "native_predictions", "run_compare", "run_seed"]
