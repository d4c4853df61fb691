"""The whole run of `llm-modules train`, from options to a saved model: compose the pair, prepare the data, cache the
frozen features if asked, train (`training.train`), save. And what a resumed run must keep: the settings it started
with, compared as the run takes them however they were given (`check_resume_options`).

Split from `training.py` (the Trainer and `train`, for a model you already have) when it passed 600 lines: this is the
command's run, that is the library's training loop.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, TrainerCallback

from .data import DataReport, prepare_datasets, resolve_dataset_source
from .modeling import LLMModulesForCausalLM
from .run_checkpoints import complete_checkpoints, refuse_to_mix_runs, write_atomic
from .sources import ModelSourceError, check_same_vocabulary, load_config, resolve_model_source
from .training import (
    ConflictingOptionsError,
    LLMModulesTrainer,
    TrainingOptions,
    resolve_precision,
    train,
    training_arguments,
)

logger = logging.getLogger(__name__)

OPTIONS_NAME = "training_options.json"
# What a resumed run must not change, compared as the run takes it (so a batch size is one setting whether it came
# from --batch-size, a config file's batch_size or trainer_args' per_device_train_batch_size): the TrainingArguments
# fields that change the updates, the schedule, the data order or the numerics, with the flag or option that sets
# them; then our options that no TrainingArguments field carries.
RUN_ARGUMENTS = {
    "per_device_train_batch_size": "--batch-size", "gradient_accumulation_steps": "--grad-accum",
    "num_train_epochs": "--epochs", "max_steps": "--max-steps", "lr_scheduler_type": "lr_scheduler",
    "lr_scheduler_kwargs": None, "warmup_steps": "--warmup", "weight_decay": "weight_decay",
    "max_grad_norm": "max_grad_norm", "optim": None, "optim_args": None, "adam_beta1": None, "adam_beta2": None,
    "adam_epsilon": None, "seed": "--seed", "data_seed": None, "full_determinism": None, "bf16": "--precision",
    "fp16": "--precision", "train_sampling_strategy": None, "dataloader_drop_last": None,
    "label_smoothing_factor": None, "neftune_noise_alpha": None, "average_tokens_across_devices": None,
}
RUN_OPTIONS = {
    "large": "--large", "small": "--small", "small_init": "--small-init", "model_options": None,
    "large_dtype": None, "dataset": "--dataset", "dataset_split": None, "dataset_revision": None,
    "max_length": "--max-length", "subset": "--subset", "val_split": "--val-split", "loss_on": "--loss-on",
    "lr_bridge": "--lr-bridge", "lr_small": "--lr-small", "bridge_only_steps": "--bridge-only-steps",
}


@dataclass
class TrainingResult:
    trainer: LLMModulesTrainer
    report: DataReport
    eval_loss: float | None
    output_dir: Path


def load_model_for_training(options: TrainingOptions) -> LLMModulesForCausalLM:
    """Compose the pair named in `options`: the frozen model in the training precision on GPU, fp32 on CPU."""
    large_dtype = options.large_dtype
    if large_dtype == "auto":
        large_dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[resolve_precision(options.precision)]
    try:
        return LLMModulesForCausalLM.from_large_and_small(
            options.large, options.small, large_dtype=large_dtype, small_init=options.small_init,
            trust_remote_code=options.trust_remote_code, **options.model_options,
        )
    except ModelSourceError:
        raise  # already one line naming the argument
    except OSError as error:
        raise OSError(f"cannot load --large {options.large} / --small {options.small}: {error}") from error


def run_settings(options: TrainingOptions) -> dict[str, tuple[Any, str | None]]:
    """{setting: (value, the flag or option that sets it)} of every setting in `RUN_ARGUMENTS` and `RUN_OPTIONS`, as
    the run takes them (`trainer_args` applied). Epochs are left out when max_steps is set: they change nothing."""
    args = training_arguments(options, has_eval=options.val_split > 0)
    settings: dict[str, tuple[Any, str | None]] = {}
    for name, flag in RUN_ARGUMENTS.items():
        if hasattr(args, name) and not (name == "num_train_epochs" and args.max_steps > 0):
            value = getattr(args, name)
            settings[name] = (getattr(value, "value", value), flag)  # enums (scheduler, optimizer) as their text
    settings.update({name: (getattr(options, name), flag) for name, flag in RUN_OPTIONS.items()})
    return settings


def check_resume_options(options: TrainingOptions) -> None:
    """A resumed run must use the settings it started with (`RUN_ARGUMENTS`, `RUN_OPTIONS`), however they are given:
    other ones would train on other examples, or with another update, than its checkpoint's optimizer and schedule.
    transformers only warns about a few (`compare_trainer_and_checkpoint_args`: batch size, logging, eval and save
    steps) and resumes with the checkpoint's batch size in its state (transformers#21271); we refuse, with
    `ConflictingOptionsError` (bad input, exit code 2) naming each setting, saved and now, on one line."""
    saved_path = Path(options.output_dir) / OPTIONS_NAME
    if not saved_path.is_file():
        return
    values = json.loads(saved_path.read_text())
    known = {f.name for f in dataclasses.fields(TrainingOptions)}
    # Compared from where the run is now: a different output dir or resume flag is no other run.
    saved = TrainingOptions(**{**{k: v for k, v in values.items() if k in known},
                               "output_dir": options.output_dir, "resume": options.resume})
    before, now = run_settings(saved), run_settings(options)
    changed = [
        f"{name}{f' ({flag})' if flag else ''}: saved {before[name][0]!r}, now {value!r}"
        for name, (value, flag) in now.items()
        if name in before and before[name][0] != value
    ]
    if changed:
        raise ConflictingOptionsError(
            f"--resume: the run in {options.output_dir} was started with other settings: " + "; ".join(changed)
            + " (resume with the run's settings, or train into another --output-dir)"
        )


def fit_max_length_to_positions(options: TrainingOptions) -> TrainingOptions:
    """`max_length` lowered to the fewest positions a frozen source (or the small model, when it keeps its
    positions) has, with a warning: a longer row would index past a learned position table (GPT-2, GPT-Neo) in the
    middle of training. Sources without `max_position_embeddings` limit nothing."""
    names = [options.large] if isinstance(options.large, str) else options.large
    parts = [(name, "--large") for name in names]
    if options.model_options.get("small_position_embeddings") == "keep":
        parts.append((options.small, "--small"))
    limits = []
    for name, flag in parts:
        positions = getattr(load_config(name, trust_remote_code=options.trust_remote_code), "max_position_embeddings", None)
        if positions is not None and positions < options.max_length:
            limits.append((positions, f"{flag} {name}"))
    if not limits:
        return options
    positions, part = min(limits)
    logger.warning(f"max_length {options.max_length} lowered to {positions}: {part} has {positions} positions")
    return dataclasses.replace(options, max_length=positions)


def run_training(options: TrainingOptions, callbacks: list[TrainerCallback] | None = None) -> TrainingResult:
    """The whole run of `llm-modules train`: compose the pair, prepare the data, cache features if asked, train, save.

    Local paths in `large`, `small` and `dataset` are made absolute first, so training_options.json and the model
    card name them wherever the model is used from. Raises `sources.ModelSourceError` or `data.DatasetNotFoundError`
    at once for a path that is missing (or not a model), then the errors of `prepare_datasets` and `train`.
    """
    from transformers import set_seed

    names = [options.large] if isinstance(options.large, str) else list(options.large)
    if not names:
        raise ConflictingOptionsError("large is an empty list: name at least one frozen source")
    sources = [resolve_model_source(name, "--large") for name in names]
    depth = options.model_options.get("depth_connections") or options.model_options.get("num_depth_connections")
    if options.feature_cache and depth:
        raise ConflictingOptionsError(
            "--feature-cache holds the sources' last hidden states only, and depth connections read inner layers: "
            "drop --feature-cache"
        )
    options = dataclasses.replace(
        options,
        large=sources[0] if len(sources) == 1 else sources,
        small=resolve_model_source(options.small, "--small"),
        dataset=resolve_dataset_source(options.dataset, "--dataset"),
    )
    options = fit_max_length_to_positions(options)
    if options.resume and complete_checkpoints(options.output_dir):  # with none, the run starts again from step 0
        check_resume_options(options)
    else:
        refuse_to_mix_runs(options.output_dir)
    # The data first: a bad row or a missing file should not wait for minutes of model loading.
    tokenizer = AutoTokenizer.from_pretrained(sources[0], trust_remote_code=options.trust_remote_code)
    for source in sources[1:]:  # before minutes of data preparation and model loading
        other = AutoTokenizer.from_pretrained(source, trust_remote_code=options.trust_remote_code)
        try:
            check_same_vocabulary(sources[0], tokenizer, source, other)
        except ValueError as error:
            raise ConflictingOptionsError(f"--large: {error}") from None
    train_dataset, eval_dataset, report = prepare_datasets(
        options.dataset, tokenizer, max_length=options.max_length, subset=options.subset, val_split=options.val_split,
        seed=options.seed, loss_on=options.loss_on, strict=options.strict, split=options.dataset_split,
        revision=options.dataset_revision,
    )
    set_seed(options.seed)  # the bridge and head are initialized from it
    model = load_model_for_training(options)
    args_for_ranks = training_arguments(options, has_eval=eval_dataset is not None)
    if options.feature_cache:
        from .feature_cache import cached_datasets

        with args_for_ranks.main_process_first(desc="feature cache"):
            train_dataset, eval_dataset = cached_datasets(
                options.feature_cache, model, train_dataset, eval_dataset, max_length=options.max_length,
                dtype=options.feature_cache_dtype, device=args_for_ranks.device,
            )
    if args_for_ranks.should_save:
        Path(options.output_dir).mkdir(parents=True, exist_ok=True)
        write_atomic(Path(options.output_dir) / OPTIONS_NAME, json.dumps(options.to_dict(), indent=2, default=str) + "\n")
    trainer = train(model, tokenizer, train_dataset, eval_dataset, options, callbacks, report)
    return TrainingResult(trainer, report, trainer.model_card.get("eval_loss"), Path(options.output_dir))
