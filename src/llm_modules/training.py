"""Training a combined model with `transformers.Trainer`: parameter groups, checkpoints, resume, non-finite losses.

`TrainingOptions` holds every option of `llm-modules train` (the paper's settings are the `paper` preset, see
`llm_modules.presets`); `train(model, tokenizer, train_dataset, eval_dataset, options)` trains a model you already
have; `training_run.run_training(options)` is the whole run of the command (load the pair, prepare the data,
optionally cache the frozen features, train, save, model card).

What we add to the Trainer, and why:
- two AdamW learning rates (bridge 1e-4, small model and head 5e-5, as in the paper); the frozen model is in no group;
- checkpoints hold only the trained weights (the model's `save_pretrained`), load back strictly, and are written
  into a staging dir (`.partial-checkpoints/checkpoint-N`) that is renamed to `checkpoint-N` once whole and marked,
  so a crash mid-save leaves no `checkpoint-N` at all, let alone one we resume from;
- a step whose loss is not finite is skipped (its gradients are dropped) and counted; 10 in a row stop the run;
- the model's loss takes the Trainer's `num_items_in_batch` (labelled tokens of the accumulated, global batch), so
  gradient accumulation and data parallelism give the same update as one big batch; a plain `Trainer` gets the same.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import EarlyStoppingCallback, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from transformers.training_args import ParallelMode

from .checkpoints import WEIGHTS_NAME
from .run_checkpoints import (
    COMPLETE_MARKER,
    STAGING_DIR,
    checkpoint_to_resume,
    fsync_tree,
    incomplete_checkpoints,
    publish_checkpoint,
    refuse_to_mix_runs,
    write_atomic,
)
from .distributed import ShardedTrainingMixin
from .data import DEFAULT_DATASET, DataCollatorForLLMModules, DataReport
from .model_card import write_model_card
from .modeling import LLMModulesForCausalLM
from .training_log import keep_logs_off_terminal
from .presets import CHOICES, LIMITS, check_option

logger = logging.getLogger(__name__)

TRAINER_STATE_NAME = "trainer_state.json"
# Options only `prepare_datasets` reads: the model card takes them from the data's `DataReport`, not from the options.
DATA_PREPARATION = ("dataset", "dataset_split", "dataset_revision", "max_length", "subset", "val_split", "loss_on", "strict")


class ConflictingOptionsError(ValueError):
    """Options that cannot go together (several frozen sources with the feature cache, sources whose tokenizers
    differ): the command line reports it as bad input."""


class NonFiniteLossError(RuntimeError):
    """Too many optimizer steps in a row had a loss that was NaN or infinite."""


@dataclass
class TrainingOptions:
    """Everything `llm-modules train` takes. The defaults use every row of the data; the paper's run (a 30% subset,
    15 epochs, loss on every token) is the `paper` preset (`llm_modules.presets.load("paper")`).

    `model_options` are `LLMModulesConfig` options (e.g. `cross_attention_heads`, `dropout`); `trainer_args` are
    passed to `transformers.TrainingArguments` as they are and override what these options set. Numbers and choices
    are checked on construction by the rules the command line checks its flags with (`presets.LIMITS`, `CHOICES`).
    """

    output_dir: str = "llm-modules-stratos"
    large: str | list[str] = "Qwen/Qwen2-1.5B"  # or several frozen sources sharing one tokenizer
    small: str = "EleutherAI/gpt-neo-125M"
    dataset: str = DEFAULT_DATASET
    dataset_split: str = "train"
    dataset_revision: str | None = None
    small_init: str = "pretrained"  # or "scratch", as the paper's code does
    model_options: dict[str, Any] = field(default_factory=dict)
    trust_remote_code: bool = False
    # data
    max_length: int = 4096
    subset: float = 1.0  # every row; the paper used 0.3
    val_split: float = 0.1
    seed: int = 42
    loss_on: str = "assistant"  # "all" reproduces the paper
    strict: bool = False
    # optimization
    epochs: float = 3  # TrainingArguments' default; the paper trained 15 epochs on its 30% subset
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 1
    grad_accum: int = 1
    lr_bridge: float = 1e-4
    lr_small: float = 5e-5  # the small model and the new head
    weight_decay: float = 0.01  # torch AdamW's default; the paper names no other
    warmup: float = 0.0  # steps (>= 1) or a fraction of all steps (< 1)
    # The first steps (>= 1) or fraction of all steps (< 1) train the bridge alone: the small model and the head wait
    # (learning rate 0) until the bridge feeds the small model inputs it can use (a LLaVA-style stage 1).
    bridge_only_steps: float = 0.0
    lr_scheduler: str = "constant_with_warmup"  # the paper names no schedule: constant after the warmup
    max_grad_norm: float = 1.0
    precision: str = "auto"  # auto: bf16 (or fp16) on GPU, fp32 on CPU
    large_dtype: str = "auto"  # the frozen model: auto = the training precision on GPU, float32 on CPU
    gradient_checkpointing: bool = False
    max_nonfinite_steps: int = 10
    # evaluation, checkpoints, early stopping
    patience: int = 5
    min_delta: float = 1e-4
    save_steps: int | None = None  # None: evaluate and save once per epoch
    save_total_limit: int | None = 2  # the best checkpoint is always kept besides these
    logging_steps: int = 10
    resume: bool = False
    feature_cache: str | None = None
    feature_cache_dtype: str = "float16"
    push_to_hub: bool = False
    hub_model_id: str | None = None
    report_to: str | list[str] = "auto"  # auto: TensorBoard when installed
    trainer_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Raises `ValueError` ("epochs must be a number > 0, got 0") for a value that breaks its option's rule."""
        for name in (*LIMITS, *CHOICES):
            try:
                setattr(self, name, check_option(name, getattr(self, name)))
            except ValueError as error:
                raise ValueError(f"{name} {error}") from None

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainingOptions":
        """Options from a config file's mapping: unknown keys that `TrainingArguments` takes go to `trainer_args`."""
        known = {f.name for f in dataclasses.fields(cls)}
        trainer_fields = {f.name for f in dataclasses.fields(TrainingArguments)}
        options, trainer_args = {}, dict(values.get("trainer_args") or {})
        for key, value in values.items():
            name = key.replace("-", "_")
            if name == "trainer_args":
                continue
            if name in known:
                options[name] = value
            elif name in trainer_fields:
                trainer_args[name] = value
            else:
                raise ValueError(f"unknown training option {key!r} (not an llm-modules option nor a TrainingArguments field)")
        return cls(**options, trainer_args=trainer_args)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---- the Trainer ------------------------------------------------------------------------------------------------


def parameter_groups(
    model: LLMModulesForCausalLM, lr_bridge: float, lr_small: float, weight_decay: float, no_decay: set[str] = frozenset()
) -> list[dict[str, Any]]:
    """AdamW groups: the bridge at `lr_bridge`, the small model and the new head at `lr_small`; names in `no_decay`
    (biases and norms) get no weight decay. Parameters that do not train (the frozen model) are in no group."""
    groups: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = "bridge" if name.startswith(("bridges.", "depth.")) else "small"  # depth connections are bridges too
        groups.setdefault((part, name not in no_decay), []).append(param)
    return [
        {
            "params": params,
            "lr": lr_bridge if part == "bridge" else lr_small,
            "weight_decay": weight_decay if decay else 0.0,
            "name": f"{part}{'' if decay else '_no_decay'}",
        }
        for (part, decay), params in sorted(groups.items())
    ]


def bridge_only_step_count(bridge_only_steps: float, num_training_steps: int) -> int:
    """Optimizer steps of the bridge-only phase: `bridge_only_steps` itself when >= 1, else that fraction of all."""
    if bridge_only_steps >= 1:
        return int(bridge_only_steps)
    return math.ceil(bridge_only_steps * num_training_steps)


def _after_bridge_only(steps: int, schedule, step: int) -> float:
    return 0.0 if step < steps else schedule(step)


class _StepGuard(TrainerCallback):
    """Drops the gradients of an optimizer step whose loss was not finite, just before the optimizer sees them."""

    def __init__(self, trainer: "LLMModulesTrainer"):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._guard_optimizer_step()


class LLMModulesTrainer(ShardedTrainingMixin, Trainer):
    """`Trainer` for `LLMModulesForCausalLM`: two learning rates, trained-only checkpoints marked complete when whole,
    token-weighted loss across accumulation and processes, non-finite steps skipped. See the module docstring."""

    _staging = _deferred_push = False  # during a checkpoint's save: see _save_checkpoint

    def __init__(self, *args: Any, lr_bridge: float = 1e-4, lr_small: float = 5e-5, bridge_only_steps: float = 0.0,
                 max_nonfinite_steps: int = 10, save_total_limit: int | None = None,
                 model_card: dict[str, Any] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.lr_bridge, self.lr_small = lr_bridge, lr_small
        self.bridge_only_steps = bridge_only_steps
        self.max_nonfinite_steps = max_nonfinite_steps
        # Rotation runs after the completion marker is written (the Trainer's own would run before it).
        self.checkpoint_limit = save_total_limit
        self.model_card = model_card or {}
        self.skipped_nonfinite_steps = 0
        self._nonfinite_in_row = 0
        self._nonfinite_in_step = torch.zeros((), dtype=torch.bool)
        # The model's loss honours `num_items_in_batch`, so the Trainer's accumulation and DDP scaling are exact.
        self.model_accepts_loss_kwargs = True
        self.add_callback(_StepGuard(self))

    # -- optimizer and loss --

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            model = self.model if model is None else model
            no_decay = {n for n, _ in model.named_parameters()} - set(self.get_decay_parameter_names(model))
            groups = parameter_groups(model, self.lr_bridge, self.lr_small, self.args.weight_decay, no_decay)
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        """The Trainer's schedule; with `bridge_only_steps`, the small model's and head's groups held at learning rate
        0 for those first steps (their schedule is otherwise the same, so it does not restart after them)."""
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if self.bridge_only_steps:
            steps = bridge_only_step_count(self.bridge_only_steps, num_training_steps)
            if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
                raise ValueError(f"bridge_only_steps needs a LambdaLR schedule, got lr_scheduler "
                                 f"{self.args.lr_scheduler_type!r}")
            for index, group in enumerate(scheduler.optimizer.param_groups):
                if not group["name"].startswith("bridge"):
                    scheduler.lr_lambdas[index] = functools.partial(_after_bridge_only, steps,
                                                                    scheduler.lr_lambdas[index])
                    group["lr"] = scheduler.base_lrs[index] * scheduler.lr_lambdas[index](scheduler.last_epoch)
        return scheduler

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:
            # Evaluation needs the loss only: the model still computes logits in eval mode, keep them to one position.
            inputs = {**inputs, "logits_to_keep": 1}
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    # -- non-finite losses --

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._nonfinite_in_step = self._nonfinite_in_step.to(loss.device) | ~torch.isfinite(loss)
        return loss

    def _guard_optimizer_step(self) -> None:
        flag = self._nonfinite_in_step.float()
        if self.accelerator.num_processes > 1:
            flag = self.accelerator.reduce(flag, reduction="sum")  # a NaN on one process poisons every gradient
        self._nonfinite_in_step = torch.zeros((), dtype=torch.bool, device=flag.device)
        if not bool(flag > 0):
            self._nonfinite_in_row = 0
            return
        self.skipped_nonfinite_steps += 1
        self._nonfinite_in_row += 1
        logger.warning(
            f"step {self.state.global_step + 1}: loss is not finite, step skipped "
            f"({self._nonfinite_in_row} in a row, {self.skipped_nonfinite_steps} in all)"
        )
        if self._nonfinite_in_row >= self.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"{self._nonfinite_in_row} steps in a row had a NaN or infinite loss (last at step "
                f"{self.state.global_step + 1}); lower the learning rate or check the data and the precision"
            )
        if not self.args.fp16:
            # No gradients: AdamW leaves those parameters and their moments untouched. (Under fp16 the grad scaler
            # already skips a step whose gradients are not finite, and needs them to find out.)
            for param in self.model.parameters():
                param.grad = None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.skipped_nonfinite_steps:
            logs["skipped_nonfinite_steps"] = self.skipped_nonfinite_steps
        super().log(logs, start_time)

    # -- checkpoints: trained weights only, complete when marked --

    # transformers 5.24 writes checkpoint-N in place; 4.36-4.38 staged it in tmp-checkpoint-N renamed when whole
    # (transformers#28364), dropped after trouble on several nodes. We stage as they did: the Trainer saves under
    # STAGING_DIR (`_get_output_dir` points there during the save), every process waits for the others, and the main
    # one renames the whole dir to checkpoint-N once written, synced and marked (one filesystem shared by all nodes).

    def _get_output_dir(self, trial) -> str:
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, STAGING_DIR) if self._staging else run_dir

    def _save_checkpoint(self, model, trial) -> None:
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        run_dir = Path(self._get_output_dir(trial))
        staged, final = run_dir / STAGING_DIR / name, run_dir / name
        if self.args.should_save and staged.exists():
            shutil.rmtree(staged)  # a save of this step that was cut off
        self._staging, self._deferred_push = True, False
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = False
        if self.state.best_model_checkpoint and Path(self.state.best_model_checkpoint) == staged:
            self.state.best_model_checkpoint = str(final)  # the Trainer recorded where it wrote
        if self.args.parallel_mode == ParallelMode.DISTRIBUTED:
            self.accelerator.wait_for_everyone()  # every process's part written (FSDP, DeepSpeed) before the rename
        if self.args.should_save:
            self.state.save_to_json(str(staged / TRAINER_STATE_NAME))  # again, with the best checkpoint's final path
            fsync_tree(staged)
            write_atomic(staged / COMPLETE_MARKER, json.dumps({"step": self.state.global_step}) + "\n")
            publish_checkpoint(staged, final)
            rotate_checkpoints(str(run_dir), self.checkpoint_limit, self.state.best_model_checkpoint)
        if self._deferred_push:
            super()._push_from_checkpoint(str(final))

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        if self._staging:
            self._deferred_push = True  # its upload runs in the background: push the dir under its final name
            return
        super()._push_from_checkpoint(checkpoint_folder)

    def _trained_model(self) -> LLMModulesForCausalLM:
        return self.accelerator.unwrap_model(self.model)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if self._load_sharded(resume_from_checkpoint):  # FSDP2: distributed.py
            return None
        if self.is_deepspeed_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._trained_model().load_trained_weights(Path(resume_from_checkpoint) / WEIGHTS_NAME)

    def _load_best_model(self) -> None:
        if self._load_sharded(self.state.best_model_checkpoint):
            return None
        if self.is_deepspeed_enabled:
            return super()._load_best_model()
        logger.info(f"loading the best model from {self.state.best_model_checkpoint} (eval loss {self.state.best_metric})")
        self._trained_model().load_trained_weights(Path(self.state.best_model_checkpoint) / WEIGHTS_NAME)

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        # push_to_hub writes the card through here: publish ours, not the Trainer's generic one.
        if self.is_world_process_zero():
            write_model_card(self.args.output_dir, **self.model_card)


# ---- building and running ---------------------------------------------------------------------------------------


def resolve_precision(precision: str) -> str:
    """"bf16", "fp16" or "fp32": auto picks bf16 on GPUs that have it, fp16 on other GPUs, fp32 on CPU."""
    if precision not in ("auto", "bf16", "fp16", "fp32"):
        raise ValueError(f"precision must be auto, bf16, fp16 or fp32, got {precision!r}")
    if precision != "auto":
        return precision
    if not torch.cuda.is_available():
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def training_arguments(options: TrainingOptions, has_eval: bool) -> TrainingArguments:
    """`TrainingArguments` for these options; `options.trainer_args` override anything set here."""
    from transformers.integrations import is_tensorboard_available

    precision = resolve_precision(options.precision)
    strategy = "steps" if options.save_steps else "epoch"
    report_to = options.report_to
    if report_to == "auto":
        report_to = ["tensorboard"] if is_tensorboard_available() else "none"
    values: dict[str, Any] = dict(
        output_dir=options.output_dir,
        num_train_epochs=options.epochs,
        max_steps=options.max_steps,
        per_device_train_batch_size=options.batch_size,
        per_device_eval_batch_size=options.batch_size,
        gradient_accumulation_steps=options.grad_accum,
        learning_rate=options.lr_small,  # the default; each parameter group sets its own
        weight_decay=options.weight_decay,
        warmup_steps=options.warmup,
        lr_scheduler_type=options.lr_scheduler,
        max_grad_norm=options.max_grad_norm,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        # The fused kernel: on our 2-core CPU one AdamW step over the real demo's 206M trained weights took 0.2 s
        # against 1.6 s for the default foreach one (transformers picks it itself from torch 2.8; we support 2.6).
        optim="adamw_torch_fused",
        seed=options.seed,
        logging_steps=options.logging_steps,
        logging_first_step=True,
        save_strategy=strategy,
        save_steps=options.save_steps or 500,
        eval_strategy=strategy if has_eval else "no",
        eval_steps=options.save_steps,
        load_best_model_at_end=has_eval,
        metric_for_best_model="eval_loss" if has_eval else None,
        greater_is_better=False,
        prediction_loss_only=True,
        restore_callback_states_from_checkpoint=True,  # early stopping's patience survives a resume
        ddp_find_unused_parameters=False,  # every trained parameter is used; the frozen ones have no gradient
        push_to_hub=options.push_to_hub,
        hub_model_id=options.hub_model_id,
        report_to=report_to,
        dataloader_pin_memory=torch.cuda.is_available(),
        # Without a GPU, torchrun's processes must be told they are CPU workers, or each trains alone (no DDP).
        use_cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()),
    )
    values.update(options.trainer_args)
    return TrainingArguments(**values)


def build_trainer(
    model: LLMModulesForCausalLM,
    tokenizer,
    train_dataset,
    eval_dataset,
    options: TrainingOptions,
    callbacks: list[TrainerCallback] | None = None,
    model_card: dict[str, Any] | None = None,
) -> LLMModulesTrainer:
    """An `LLMModulesTrainer` over tokenized datasets (from `prepare_datasets`, or feature-cache datasets)."""
    args = training_arguments(options, has_eval=eval_dataset is not None)
    if options.gradient_checkpointing:
        # The small model only: the frozen one keeps no activations for backward anyway.
        model.small.activation_checkpointing_enable({"use_reentrant": False})
    callbacks = list(callbacks or [])
    if eval_dataset is not None and options.patience > 0:
        callbacks.append(EarlyStoppingCallback(options.patience, options.min_delta))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # Given a log-file callback (the demo's runs), Trainer logs go to the file and the terminal keeps only the bar.
    return keep_logs_off_terminal(LLMModulesTrainer(
        model=model,
        args=args,
        data_collator=DataCollatorForLLMModules(pad_id),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
        lr_bridge=options.lr_bridge,
        lr_small=options.lr_small,
        bridge_only_steps=options.bridge_only_steps,
        max_nonfinite_steps=options.max_nonfinite_steps,
        save_total_limit=options.save_total_limit,
        model_card=model_card,
    ))


def train(
    model: LLMModulesForCausalLM,
    tokenizer,
    train_dataset,
    eval_dataset,
    options: TrainingOptions,
    callbacks: list[TrainerCallback] | None = None,
    data: DataReport | str | None = None,
) -> LLMModulesTrainer:
    """Train (resuming from the newest complete checkpoint if `options.resume`), save the final model (the best one
    when there is a validation set) to `options.output_dir` with a model card, and return the trainer.

    `data` tells the model card what the datasets hold: the `DataReport` of `prepare_datasets` (as `run_training`
    passes it) or a one-line description. Without it the card says the data was not recorded: the data options of
    `options` (`dataset`, `subset`, ...) describe nothing here, `prepare_datasets` alone reads them. The saved dir
    loads with `LLMModulesForCausalLM.from_pretrained(options.output_dir)`. Raises `FileExistsError` when a fresh
    run would write into another run's checkpoints.
    """
    output_dir = Path(options.output_dir)
    if isinstance(data, DataReport) and data.system_prompt is not None:
        model.config.system_prompt = data.system_prompt  # saved with the model: its default when asked
    checkpoint = None
    if options.resume:
        checkpoint = checkpoint_to_resume(output_dir)
    else:
        refuse_to_mix_runs(output_dir)
    card = {
        "options": options, "data": data, "train_examples": len(train_dataset),
        "validation_examples": len(eval_dataset) if eval_dataset is not None else 0,
    }
    trainer = build_trainer(model, tokenizer, train_dataset, eval_dataset, options, callbacks, card)
    if trainer.args.should_save:
        for leftover in incomplete_checkpoints(output_dir):
            logger.warning(f"removing {leftover}: its save never finished")
            shutil.rmtree(leftover)
        shutil.rmtree(output_dir / STAGING_DIR, ignore_errors=True)  # what is left there is no save of ours
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    trainer.save_model(str(output_dir))
    metrics = trainer.evaluate() if eval_dataset is not None else {}
    trained = trainer._trained_model()
    trainer.model_card = {
        **trainer.model_card,
        "large": trained.config.large_model_name_or_path,
        "small": trained.config.small_model_name_or_path,
        "eval_loss": metrics.get("eval_loss"),
        "steps": trainer.state.global_step,
        "skipped_nonfinite_steps": trainer.skipped_nonfinite_steps,
    }
    trainer.create_model_card()
    if options.push_to_hub:
        trainer.push_to_hub(commit_message="llm-modules: end of training")
    return trainer
