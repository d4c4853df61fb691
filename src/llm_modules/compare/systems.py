"""The systems `llm-modules compare` sets side by side, registered by name (`SYSTEMS`, `register`).

Untrained (asked in their own chat template, scored by the task's `native_answer`):
- `small_zero_shot`, `large_native`: the small and the large instruct model as they are.

Trained, each through the fairness rule of `fitting.py` (one `fit(context, lr) -> Fit` call per learning rate of the
grid; the harness keeps the run with the lowest validation loss), answering in the rows' layout:
- `small_sft`: every weight of the small model fine-tuned on the rows (transformers' `Trainer`);
- `combined`: LLM Modules, this library's model and trainer, the frozen model's states read once through the feature
  cache (its seconds count in the training cost); the grid's learning rate is the small model's and head's, the
  bridge's is `bridge_lr_ratio` times it;
- `combined_random_source`: the same with the frozen model's weights replaced by random ones of the same
  architecture (CALM's control: what the extra layers and compute give without the source's knowledge);
- `large_lora`: PEFT LoRA adapters on every linear layer of the frozen large model (Hu et al. 2021);
- `small_seqkd`: sequence-level distillation (Kim & Rush 2016): the large model answers the train questions greedily
  in its own chat template, each answer is written into the rows' layout (the reply as the thought, its final answer
  as the solution), and the small model is fine-tuned on those rows, never on the reference answers;
- `small_gold`: cross-tokenizer logit distillation with TRL's GOLD trainer (`gold.py`).

A system is a `System`: `fit` for trained ones, `which` ("small"/"large") for the untrained ones, and `shipped`, the
model dirs a user must ship to serve it besides what the run saves (the bill's disk bytes).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

from ..data import ANSWER_MARKERS, DataCollatorForLLMModules, build_dataset
from ..evaluation import generate_texts
from ..feature_cache import cached_datasets
from ..modeling import LLMModulesForCausalLM
from ..training import TrainingOptions, train
from ..training_log import keep_logs_off_terminal, log_file_callbacks
from .fitting import BestEpochCallback, Fit, FitBudget


@dataclass
class SystemOptions:
    """Settings of the systems themselves (not of the budget, which is the same for all)."""

    # The combined model's bridge and head (`LLMModulesConfig` options); the real demo's settings.
    combined_options: dict[str, Any] = field(default_factory=lambda: {
        "cross_attention_heads": 8, "adapter_dim": 256, "dropout": 0.0, "small_position_embeddings": "keep",
        "head_init": "small",
    })
    bridge_lr_ratio: float = 10 / 3  # the real demo's 1e-3 bridge / 3e-4 small model
    bridge_only_steps: float = 0.0  # steps, or a fraction of all, that train the bridge alone (`TrainingOptions`)
    feature_cache_dtype: str = "float16"
    # LoRA: rank, scaling alpha, which layers ("all-linear": every linear layer but the LM head, QLoRA's choice).
    lora_rank: int = 64
    lora_alpha: int = 128
    lora_dropout: float = 0.0
    lora_targets: str | list[str] = "all-linear"
    lora_large: str | None = None  # another large model for LoRA only (e.g. a smaller one when the large cannot fit)
    native_max_new_tokens: int = 48  # untrained systems' replies, and the seqkd teacher's
    gold_options: dict[str, Any] = field(default_factory=dict)
    dtype: torch.dtype = torch.float32  # every system trains and answers in it (the bill compares like with like)


@dataclass
class Context:
    """What a system's `fit` gets: the pair, the rows (plain Stratos rows), the budget, and where to write."""

    large_dir: Path
    small_dir: Path
    train_rows: list[dict]
    val_rows: list[dict]
    budget: FitBudget
    options: SystemOptions
    work_dir: Path
    logs_dir: Path
    native_messages: Callable[[dict], list[dict[str, str]]] | None = None
    native_answer: Callable[[str, dict], str | None] | None = None
    progress: bool = True
    # Computed once per comparison and shared by the systems that need them (the seqkd teacher's answers).
    shared: dict[str, Any] = field(default_factory=dict)


@dataclass
class System:
    name: str
    description: str
    fit: Callable[[Context, float], Fit] | None = None
    which: str | None = None  # untrained: "small" or "large"
    shipped: Callable[[Context], list[Path]] = lambda context: []
    requires: tuple[str, ...] = ()  # packages of the `compare` extra it imports

    @property
    def trained(self) -> bool:
        return self.fit is not None


SYSTEMS: dict[str, System] = {}


def register(system: System) -> System:
    """Add `system` to `SYSTEMS` under its name (a later registration of the name replaces the earlier one)."""
    SYSTEMS[system.name] = system
    return system


# ---- plain models ------------------------------------------------------------------------------------------------


def load_plain(path: str | Path, dtype: torch.dtype = torch.float32):
    """(model in eval mode, tokenizer with a pad token) of a plain causal LM dir."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # batching only: the attention mask hides padding
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval(), tokenizer


def trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def budget_arguments(budget: FitBudget, output_dir: Path, lr: float, progress: bool, **overrides: Any) -> dict:
    """`TrainingArguments` values of the fairness rule: the budget's epochs, batch, schedule; evaluate every epoch,
    save nothing (the best epoch is kept in memory)."""
    values = dict(
        output_dir=str(output_dir), num_train_epochs=budget.max_epochs, per_device_train_batch_size=budget.batch_size,
        per_device_eval_batch_size=budget.batch_size, learning_rate=lr, weight_decay=budget.weight_decay,
        lr_scheduler_type=budget.lr_scheduler, warmup_steps=budget.warmup, max_grad_norm=1.0,
        logging_steps=budget.logging_steps, logging_first_step=True, eval_strategy="epoch", save_strategy="no",
        report_to="none", seed=budget.seed, optim="adamw_torch_fused", prediction_loss_only=True,
        use_cpu=not torch.cuda.is_available(), disable_tqdm=not progress,
    )
    values.update(overrides)
    return values


def fit_trainer(model, tokenizer, train_dataset, val_dataset, budget: FitBudget, lr: float, output_dir: Path,
                log_file: Path, progress: bool, trainer_class: type[Trainer] = Trainer) -> Fit:
    """Train a plain causal LM (or a PEFT model) under the fairness rule; its best epoch's weights restored."""
    evaluates = val_dataset is not None
    best = BestEpochCallback(budget.patience, budget.min_delta, evaluates=evaluates)
    arguments = budget_arguments(budget, output_dir, lr, progress, **({} if evaluates else {"eval_strategy": "no"}))
    trainer = keep_logs_off_terminal(trainer_class(
        model=model, args=TrainingArguments(**arguments), train_dataset=train_dataset, eval_dataset=val_dataset,
        data_collator=DataCollatorForLLMModules(tokenizer.pad_token_id),
        callbacks=[*log_file_callbacks(log_file), best],
    ))
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    best.restore(model)
    return Fit(model.eval(), tokenizer, lr, trainable(model), seconds, best.best_seconds, best.best_epoch,
               best.best_step, best.best, float(trainer.state.epoch or 0), trainer.state.log_history)


def datasets_for(tokenizer, train_rows: list[dict], val_rows: list[dict]):
    """Tokenized train and validation datasets (None for an empty validation split)."""
    train_dataset, _ = build_dataset(train_rows, tokenizer, max_length=None)
    val_dataset = build_dataset(val_rows, tokenizer, max_length=None)[0] if val_rows else None
    return train_dataset, val_dataset


# ---- small_sft ---------------------------------------------------------------------------------------------------


def fit_small_sft(context: Context, lr: float, rows: tuple[list[dict], list[dict]] | None = None,
                  name: str = "small_sft") -> Fit:
    """Every weight of the small model fine-tuned on `rows` (default: the context's train and validation rows)."""
    train_rows, val_rows = rows or (context.train_rows, context.val_rows)
    torch.manual_seed(context.budget.seed)
    model, tokenizer = load_plain(context.small_dir, context.options.dtype)
    train_dataset, val_dataset = datasets_for(tokenizer, train_rows, val_rows)
    return fit_trainer(model.train(), tokenizer, train_dataset, val_dataset, context.budget, lr,
                       context.work_dir / f"{name}-lr{lr:g}", context.logs_dir / f"{name}-lr{lr:g}.jsonl",
                       context.progress)


# ---- combined ----------------------------------------------------------------------------------------------------


def randomize_frozen_model(model: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    """Replace every weight of `model` in place by a random one of the same shape: matrices ~ N(0, std) (transformers'
    `initializer_range` default), normalization weights 1, biases 0."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim >= 2:
                values = torch.randn(parameter.shape, generator=generator, dtype=torch.float32) * std
                parameter.copy_(values.to(parameter.dtype))
            elif "norm" in name.lower():
                parameter.fill_(1.0)
            else:
                parameter.zero_()


def fit_combined(context: Context, lr: float, random_source: bool = False) -> Fit:
    """LLM Modules: compose (frozen large model, pretrained small model, new bridge and head), read the frozen model's
    last hidden states once through the feature cache, train with this library's trainer."""
    name = "combined_random_source" if random_source else "combined"
    options = context.options
    torch.manual_seed(context.budget.seed)
    model = LLMModulesForCausalLM.from_large_and_small(context.large_dir, context.small_dir, large_dtype=options.dtype,
                                                       dtype=options.dtype, **options.combined_options)
    if random_source:
        randomize_frozen_model(model.large, context.budget.seed)
    tokenizer = model.tokenizer
    val_rows = context.val_rows
    train_dataset, val_dataset = datasets_for(tokenizer, context.train_rows, val_rows)
    start = time.perf_counter()
    # One cache per source: every learning rate of the grid reads the same states (the manifest checks the weights).
    cached_train, cached_val = cached_datasets(context.work_dir / f"features-{name}", model, train_dataset, val_dataset,
                                               dtype=options.feature_cache_dtype)
    # The cache is built by the grid's first run and read by the others; its cost counts in every run's seconds, as
    # the seqkd teacher's answers do in small_seqkd's: a user training once pays it once.
    feature_seconds = context.shared.setdefault(f"feature_seconds-{name}", time.perf_counter() - start)
    budget = context.budget
    best = BestEpochCallback(budget.patience, budget.min_delta, evaluates=cached_val is not None)
    output_dir = context.work_dir / f"{name}-lr{lr:g}"
    training = TrainingOptions(
        output_dir=str(output_dir), epochs=budget.max_epochs, batch_size=budget.batch_size, seed=budget.seed,
        lr_bridge=lr * options.bridge_lr_ratio, lr_small=lr, bridge_only_steps=options.bridge_only_steps,
        weight_decay=budget.weight_decay, warmup=budget.warmup,
        lr_scheduler=budget.lr_scheduler, logging_steps=budget.logging_steps, patience=0, report_to="none",
        trainer_args={"save_strategy": "no", "eval_strategy": "epoch" if cached_val is not None else "no",
                      "load_best_model_at_end": False,
                      "metric_for_best_model": None, "disable_tqdm": not context.progress},
    )
    start = time.perf_counter()
    trainer = train(model, tokenizer, cached_train, cached_val, training,
                    callbacks=[*log_file_callbacks(context.logs_dir / f"{name}-lr{lr:g}.jsonl"), best],
                    data="llm-modules compare's train rows (`data/train.jsonl` in its output dir)")
    seconds = time.perf_counter() - start
    best.restore(model)
    model.save_pretrained(output_dir)  # `train` saved the last epoch; the best one replaces it
    summary = model.parameter_summary()
    return Fit(model.eval(), tokenizer, lr, summary["trainable"], seconds + feature_seconds,
               best.best_seconds + feature_seconds, best.best_epoch,
               best.best_step, best.best, float(trainer.state.epoch or 0), trainer.state.log_history,
               extra={"feature_seconds": round(feature_seconds, 1), "shared_seconds": feature_seconds,
                      "lr_bridge": lr * options.bridge_lr_ratio,
                      "feature_tokens": int(sum(len(ids) for ids in train_dataset["input_ids"])
                                            + (sum(len(ids) for ids in val_dataset["input_ids"]) if val_rows else 0)),
                      "random_source": random_source, "saved": str(output_dir)})


# ---- large_lora --------------------------------------------------------------------------------------------------


def fit_large_lora(context: Context, lr: float) -> Fit:
    """PEFT LoRA on the frozen large model, trained on the rows in the large model's tokenizer; the base weights are
    never updated (PEFT freezes them)."""
    from peft import LoraConfig, get_peft_model

    options = context.options
    large_dir = Path(options.lora_large) if options.lora_large else context.large_dir
    torch.manual_seed(context.budget.seed)
    base, tokenizer = load_plain(large_dir, options.dtype)
    config = LoraConfig(r=options.lora_rank, lora_alpha=options.lora_alpha, lora_dropout=options.lora_dropout,
                        target_modules=options.lora_targets, task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    train_dataset, val_dataset = datasets_for(tokenizer, context.train_rows, context.val_rows)
    fit = fit_trainer(model.train(), tokenizer, train_dataset, val_dataset, context.budget, lr,
                      context.work_dir / f"large_lora-lr{lr:g}", context.logs_dir / f"large_lora-lr{lr:g}.jsonl",
                      context.progress)
    fit.extra.update({"lora_rank": options.lora_rank, "lora_alpha": options.lora_alpha,
                      "lora_targets": options.lora_targets, "lora_dropout": options.lora_dropout,
                      "base": str(large_dir),
                      "target_modules": sorted(model.peft_config["default"].target_modules)})
    return fit


# ---- small_seqkd -------------------------------------------------------------------------------------------------


def teacher_rows(context: Context) -> tuple[list[dict], list[dict], dict]:
    """(train rows, validation rows, facts) whose answers are the large model's own: each question asked greedily in
    its chat template (`context.native_messages`), the reply written as the thought and its final answer
    (`context.native_answer`; the reply itself when it has none) as the solution. Computed once per comparison."""
    if "teacher_rows" in context.shared:
        return context.shared["teacher_rows"]
    begin_thought, end_thought, begin_solution, end_solution = ANSWER_MARKERS
    model, tokenizer = load_plain(context.large_dir, context.options.dtype)
    rows = context.train_rows + context.val_rows
    prompts = [tokenizer.apply_chat_template(context.native_messages(row), add_generation_prompt=True, tokenize=False)
               for row in rows]
    start = time.perf_counter()
    replies = generate_texts(model, tokenizer, prompts, max_new_tokens=context.options.native_max_new_tokens,
                             batch_size=len(prompts), stop_strings=None, desc="seqkd teacher answers",
                             progress=context.progress, templated=True)
    seconds = time.perf_counter() - start
    del model
    rewritten = []
    for row, reply in zip(rows, replies):
        reply = " ".join(reply.split())
        answer = context.native_answer(reply, row) or reply
        text = f"{begin_thought} {reply} {end_thought} {begin_solution} {answer} {end_solution}"
        conversations = [*row["conversations"][:-1], {"from": "assistant", "value": text}]
        rewritten.append({**row, "conversations": conversations})
    n = len(context.train_rows)
    facts = {"teacher_seconds": seconds, "teacher_rows": len(rows)}
    context.shared["teacher_rows"] = (rewritten[:n], rewritten[n:], facts)
    return context.shared["teacher_rows"]


def fit_small_seqkd(context: Context, lr: float) -> Fit:
    """The small model fine-tuned on the large model's answers (`teacher_rows`); the teacher's generation time is
    part of its training cost (added to `train_seconds` and `best_seconds`)."""
    train_rows, val_rows, facts = teacher_rows(context)
    fit = fit_small_sft(context, lr, rows=(train_rows, val_rows), name="small_seqkd")
    fit.train_seconds += facts["teacher_seconds"]
    fit.best_seconds += facts["teacher_seconds"]
    fit.extra.update(facts, shared_seconds=facts["teacher_seconds"], train_rows=train_rows)
    return fit


def fit_small_gold(context: Context, lr: float) -> Fit:
    from .gold import fit_small_gold as gold

    return gold(context.small_dir, context.large_dir, context.train_rows, context.val_rows, context.budget, lr,
                context.work_dir / f"small_gold-lr{lr:g}", context.logs_dir / f"small_gold-lr{lr:g}.jsonl",
                progress=context.progress, **context.options.gold_options)


def _large(context: Context) -> list[Path]:
    return [Path(context.options.lora_large) if context.options.lora_large else context.large_dir]


register(System("small_zero_shot", "the small instruct model as it is, in its own chat template", which="small",
                shipped=lambda c: [c.small_dir]))
register(System("large_native", "the large instruct model as it is, in its own chat template", which="large",
                shipped=lambda c: [c.large_dir]))
register(System("small_sft", "every weight of the small model fine-tuned on the rows", fit_small_sft))
register(System("combined", "LLM Modules: frozen large model -> bridge -> small model (this library)", fit_combined,
                shipped=lambda c: [c.large_dir]))
register(System("combined_random_source", "LLM Modules with a random frozen model of the same architecture",
                lambda context, lr: fit_combined(context, lr, random_source=True), shipped=lambda c: [c.large_dir]))
register(System("large_lora", "LoRA adapters on the frozen large model (PEFT)", fit_large_lora, shipped=_large,
                requires=("peft",)))
register(System("small_seqkd", "the small model fine-tuned on the large model's own answers (sequence-level KD)",
                fit_small_seqkd))
register(System("small_gold", "cross-tokenizer logit distillation into the small model (TRL GOLD, ULD loss)",
                fit_small_gold, requires=("trl",)))

DEFAULT_SYSTEMS = tuple(SYSTEMS)

__all__ = ["Context", "DEFAULT_SYSTEMS", "SYSTEMS", "System", "SystemOptions", "fit_combined", "fit_large_lora",
           "fit_small_seqkd", "fit_small_sft", "fit_trainer", "load_plain", "randomize_frozen_model", "register",
           "teacher_rows"]
