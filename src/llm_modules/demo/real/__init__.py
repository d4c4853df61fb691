"""`llm-modules demo --real` (issue 12): knowledge transfer on real weights, a preset of `llm-modules compare`.

Qwen2.5-Coder-1.5B-Instruct frozen, SmolLM2-135M-Instruct trained (both from `llm-modules fetch`), on generated
arithmetic chosen by measurement (`llm-modules compare --systems small_zero_shot large_native`): the large model
answers it natively, the small one does not. The preset is compare's task, pair and four systems (`small_zero_shot`, `large_native`, `small_sft`,
`combined`) with the settings the demo was measured with: no validation split, each trained system at the learning
rate measured for it (`REAL_LEARNING_RATES`), every epoch run; the serving columns of compare's bill are not measured
(`measure_serving=False`). Outputs as compare's seed dir (results.json with `systems.NAME.eval_exact_match` on held-out
questions, `train_exact_match` on train questions asked again, `format_valid`, `trainable_params`, `train_seconds`,
`n_eval`), plus results.md (the demo's table), accuracy.png and loss_curves.png.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...fetch import fetch, fetched_model
from .. import no_loading_bars
from ..report import plot_losses
from .report import write_real_report

if TYPE_CHECKING:
    from ...compare import CompareSettings

# `llm_modules.compare` is imported inside the functions below: its built-in tasks are this package's `task.py`, so
# importing it here would make each package import the other while half-initialized.

logger = logging.getLogger(__name__)

SYSTEMS = ("small_zero_shot", "large_native", "small_sft", "combined")
LARGE, SMALL = "qwen2.5-coder-1.5b-instruct", "smollm2-135m-instruct"
# Measured at 24 steps (head_init="small"): the combined model's small model and head at 3e-4 reached loss 1.35, 1e-4
# 2.37, 1e-3 (bridge 3e-3) 2.13; the bridge at 10/3 of it (1e-3). SmolLM2 alone (every weight) at 1e-4.
REAL_LEARNING_RATES = {"small_sft": (1e-4,), "combined": (3e-4,)}


def default_real_settings(quick: bool, seed: int) -> CompareSettings:
    """The full run or `--quick`: same systems, fewer rows. Sized by `estimate_seconds` for 45 and 15 minutes.

    Full: 64 train rows x 8 epochs = 64 steps of 8 (on seed 0 the combined model's loss reached ~0.01 by step 45 and
    it answered 28 of 30 held-out questions; 24 steps were too few), 60 held-out and 10 train questions.
    `--quick`: half the rows, 56 steps of 4, and no dropout in the bridge: in so few steps it only slows the fit
    (seed 1 with dropout 0.1: the loss stopped at 0.13 and 0.000 held-out, 805 s; with 0, seeds 0/1/2 reached
    0.900/0.350/0.850 held-out in 607-638 s, docs/getting-started.md). 32 steps of 8 (seed 0) left the loss at 1.1.
    The quick run is 80 steps of 4 whose first quarter trains the bridge alone (`bridge_only_steps`): at 56 steps
    with every part training from step 1, seeds 0 and 2 stalled (loss 1.76 and 0.59, 0.000 held-out); the bridge-only
    start got them to 0.600 and 0.900 but left seed 1 at loss 0.54 (0.000), too few steps for the small model; 80
    steps with it: docs/getting-started.md has the 5 seeds."""
    from ...compare import CompareSettings, FitBudget, SystemOptions

    options = SystemOptions(native_max_new_tokens=24, bridge_only_steps=0.25 if quick else 0.0)
    options.combined_options["dropout"] = 0.0 if quick else 0.1
    if quick:
        budget, rows = FitBudget(max_epochs=10, batch_size=4, seed=seed), dict(n_train=32, n_eval=20, n_eval_train=5)
    else:
        budget, rows = FitBudget(max_epochs=8, batch_size=8, seed=seed), dict(n_train=64, n_eval=60, n_eval_train=10)
    return CompareSettings(large=LARGE, small=SMALL, task="sub3", **rows, val_fraction=0.0, systems=SYSTEMS,
                           seeds=(seed,), budget=budget, options=options, measure_serving=False,
                           learning_rates_by_system=dict(REAL_LEARNING_RATES))


def model_dir(name: str) -> Path:
    """A model dir as given, or the plain dir of catalogue model `name` (fetched first if it is not there)."""
    if Path(name).expanduser().is_dir():
        return Path(name).expanduser().resolve()
    found = fetched_model(name)
    return (found or fetch(name)).plain


def run_real_demo(output_dir: str | Path = "llm-modules-demo-real", seed: int = 0, quick: bool = False,
                  settings: CompareSettings | None = None) -> dict[str, Any]:
    """Run the real-weights experiment; write results.json, results.md, the plots, predictions, data, logs and the
    trained models to `output_dir`; return the results (as written to results.json, plus "table", the Markdown
    table). Raises `NotADirectoryError` when `output_dir` is a file, `ValueError` for unknown systems or task."""
    from ...compare import run_seed
    from ...compare.tasks import builtin_task

    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise NotADirectoryError(f"--output-dir {output_dir} is a file, expected a directory (or a new path)")
    settings = settings or default_real_settings(quick, seed)
    settings.check()
    with no_loading_bars():
        large_dir, small_dir = model_dir(settings.large), model_dir(settings.small)
        task = builtin_task(settings.task, settings.n_train, settings.n_eval, seed)
        estimate = estimate_seconds(settings)
        logger.info(f"real demo: about {sum(estimate.values()) / 60:.0f} minutes on a 2-core CPU ("
                    + ", ".join(f"{name} {seconds / 60:.0f}" for name, seconds in estimate.items()) + ")")
        results = run_seed(settings, task, seed, large_dir, small_dir, output_dir)
    results["quick"] = quick
    results["table"] = write_real_report(output_dir, results)
    histories = {}
    for name in results["systems"]:
        log = output_dir / "logs" / f"{name}.jsonl"
        if log.is_file():
            histories[name] = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    plot_losses(histories, output_dir / "loss_curves.png")
    return results


# Wall-time constants measured on our 2-core AVX2 VM (sub3 rows of ~70 Qwen tokens, frozen model in float32, batch
# 8; seed 0's full run, phases timed from its progress bars): the frozen model's forward per cached token, one row
# through a training step plus the optimizer's update per step (0.2 s for the combined model's 206M trained weights
# with the fused AdamW kernel, 1.6 s with the foreach one the full run was measured with), and a generation pass over
# the questions (one batch: a fixed cost for the decode steps plus a cost per question).
SECONDS = {
    "feature_token": 0.029, "combined_row": 0.97, "combined_step": 0.2, "small_row": 0.77, "small_step": 1.0,
    "native_small_pass": 15.5, "native_small_question": 0.054, "native_large_pass": 6.4, "native_large_question": 1.46,
    "small_pass": 7.4, "small_question": 0.26, "combined_pass": 100.0, "combined_question": 2.26,
}


def estimate_seconds(settings: CompareSettings, row_tokens: int = 70) -> dict[str, float]:
    """A rough wall time per system on our 2-core VM (the constants above), to print up front."""
    questions = settings.n_eval + settings.n_eval_train
    budget = settings.budget
    passes = settings.n_train * budget.max_epochs
    steps = math.ceil(settings.n_train / budget.batch_size) * budget.max_epochs
    per_system = {
        "small_zero_shot": 5 + SECONDS["native_small_pass"] + questions * SECONDS["native_small_question"],
        "large_native": 15 + SECONDS["native_large_pass"] + questions * SECONDS["native_large_question"],
        "small_sft": 5 + passes * SECONDS["small_row"] + steps * SECONDS["small_step"] + SECONDS["small_pass"]
        + questions * SECONDS["small_question"],
        "combined": 15 + settings.n_train * row_tokens * SECONDS["feature_token"] + passes * SECONDS["combined_row"]
        + steps * SECONDS["combined_step"] + SECONDS["combined_pass"] + questions * SECONDS["combined_question"],
    }
    return {name: round(per_system[name]) for name in settings.systems if name in per_system}


__all__ = ["LARGE", "REAL_LEARNING_RATES", "SMALL", "SYSTEMS", "default_real_settings", "estimate_seconds",
           "model_dir", "run_real_demo"]
