"""The fairness rule of `llm-modules compare`, shared by every trained system.

Each trained system gets the same train rows, the same maximum epochs and batch size, and a validation split carved
from those rows. It is trained once per learning rate of the same grid (`FitBudget.learning_rates`); after every
epoch the Trainer evaluates on the validation split, and `BestEpochCallback` keeps the trained weights of the best
epoch in memory and stops after `patience` epochs without improvement (early stopping). The run with the lowest
validation loss is the system's result, and its cost is what reaching its best epoch took (`Fit.best_seconds`),
besides the whole run's (`Fit.train_seconds`).

The selection metric is each system's own validation loss (the loss it trains on, over its own tokenizer): it picks
a learning rate within one system, never ranks systems against each other.

Keeping the best epoch in memory instead of the Trainer's `load_best_model_at_end` is deliberate: that one writes a
checkpoint every epoch (800 MB for the real combined model's trained weights), which on our CPU would cost more than
some of the baselines' whole runs, and it would have to be wired into each Trainer subclass (TRL's) separately.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainerCallback


@dataclass
class FitBudget:
    """What every trained system gets: epochs at most, batch size, the learning-rate grid, early stopping."""

    max_epochs: float = 8
    batch_size: int = 8
    learning_rates: tuple[float, ...] = (1e-4, 3e-4, 1e-3)
    patience: int = 2  # epochs without a better validation loss before a run stops
    min_delta: float = 0.0
    seed: int = 0
    weight_decay: float = 0.01
    warmup: float = 0.05  # a fraction of all steps
    lr_scheduler: str = "cosine"
    logging_steps: int = 5


@dataclass
class Fit:
    """One trained run of a system at one learning rate, its weights those of its best epoch.

    `train_seconds`: wall seconds of the whole run (every epoch, evaluations included); `best_seconds`: wall seconds
    from the start until the end of the best epoch's evaluation; `best_epoch`/`best_step`: where it was; `val_loss`:
    the best validation loss (each system's own loss, see the module docstring); `trainable_params`: parameters the
    optimizer updated; `extra`: system-specific facts (LoRA rank, feature cache seconds, teacher answers, ...);
    `extra["shared_seconds"]`: a one-time cost counted in `train_seconds` that the grid's other runs reuse.
    """

    model: Any
    tokenizer: Any
    lr: float
    trainable_params: int
    train_seconds: float
    best_seconds: float
    best_epoch: float
    best_step: int
    val_loss: float
    epochs_run: float
    log_history: list[dict] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


class BestEpochCallback(TrainerCallback):
    """Early stopping with the best epoch's trained weights kept in memory (see the module docstring).

    Give it to a Trainer whose `TrainingArguments` evaluate every epoch (`eval_strategy="epoch"`) and save nothing
    (`save_strategy="no"`); after `trainer.train()`, call `restore(model)` to put the best weights back. Only
    parameters with `requires_grad` are kept: frozen ones never change. `evaluates=False` (no validation split, as
    in `llm-modules demo --real`): every epoch runs, the last one is the result, `val_loss` stays NaN.
    """

    def __init__(self, patience: int, min_delta: float = 0.0, metric: str = "eval_loss", evaluates: bool = True):
        self.patience, self.min_delta, self.metric, self.evaluates = patience, min_delta, metric, evaluates
        self.best: float = math.inf if evaluates else math.nan
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_epoch, self.best_step, self.best_seconds = 0.0, 0, 0.0
        self.bad_epochs = 0
        self.started = time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        value = (metrics or {}).get(self.metric)
        if value is None or not math.isfinite(value):
            self.bad_epochs += 1
        elif value < self.best - self.min_delta:
            self.best, self.bad_epochs = float(value), 0
            self.best_epoch, self.best_step = float(state.epoch or 0.0), int(state.global_step)
            self.best_seconds = time.perf_counter() - self.started
            self.best_state = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
        else:
            self.bad_epochs += 1
        if self.bad_epochs >= self.patience:
            control.should_training_stop = True

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if not self.evaluates:  # no validation split: the last epoch is the result
            self.best_epoch, self.best_step = float(state.epoch or 0.0), int(state.global_step)
            self.best_seconds = time.perf_counter() - self.started

    def restore(self, model: torch.nn.Module) -> None:
        """Load the best epoch's trained weights into `model` (nothing to do without a validation split). Raises
        `RuntimeError` when no evaluation gave a finite loss (every epoch diverged)."""
        if not self.evaluates:
            return
        if self.best_state is None:
            raise RuntimeError("no epoch had a finite validation loss")
        parameters = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in self.best_state.items():
                parameters[name].copy_(value)


__all__ = ["BestEpochCallback", "Fit", "FitBudget"]
