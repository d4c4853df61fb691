"""The compared systems: each is trained on the same task rows of split A with the same epochs and batch size.

`combined` and `combined_noncausal` go through this library's own model and trainer (`llm_modules.training.train`),
nothing special-cased. The baselines are plain Hugging Face models trained with `transformers.Trainer`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerBase, Trainer, TrainingArguments

from ..data import DataCollatorForLLMModules
from ..feature_cache import cached_datasets
from ..modeling import LLMModulesForCausalLM
from ..training import TrainingOptions, train
from ..training_log import keep_logs_off_terminal, log_file_callbacks
from .world import TASK_SYSTEM_PROMPT


@dataclass
class TaskOptions:
    """One budget for every trained system; learning rates differ by what is trained (set for each below)."""

    epochs: float = 30
    batch_size: int = 32
    seed: int = 0
    small_hidden_size: int = 64  # the combined model's small model
    small_layers: int = 2
    small_heads: int = 4
    # `small_only` and `distilled_small` are wider, so that with their own embeddings they train about as many
    # parameters as the combined model does.
    small_only_hidden_size: int = 96
    lr_bridge: float = 3e-3
    lr_small: float = 3e-3  # the small model and the combined model's new head
    lr_large: float = 1e-3  # fine-tuning all of the source
    weight_decay: float = 0.01
    bridge_dropout: float = 0.1
    adapter_dim: int = 64
    # The tiny source's hidden states carry little position information (RoPE puts positions into attention scores
    # only), so the small model keeps its own position embeddings; rows are far shorter than its 512 positions.
    small_position_embeddings: str = "keep"
    # Weight of the KL term to the source. The source never saw the format, so on the format's tokens its
    # distribution is noise; a larger weight drowns the task (at 0.5 the student wrote only 'Q Q Q').
    distill_alpha: float = 0.2
    distill_temperature: float = 1.0
    logging_steps: int = 10


@dataclass
class TrainedSystem:
    model: Any
    trainable_params: int
    train_seconds: float
    log_history: list[dict] = field(default_factory=list)


def small_causal_lm(tokenizer: PreTrainedTokenizerBase, hidden_size: int, options: TaskOptions):
    """A random-weight GPT-Neo, the small model's architecture, over the source's tokenizer.

    Its local-attention window covers the whole row, so `small_only` is not handicapped by the tiny-model defaults.
    """
    config = AutoConfig.for_model(
        "gpt_neo", vocab_size=len(tokenizer), hidden_size=hidden_size, num_layers=options.small_layers,
        num_heads=options.small_heads, max_position_embeddings=512, window_size=512,
        # GPT-Neo alternates global and local attention layers; an odd count ends with a global one.
        attention_types=[[["global", "local"], options.small_layers // 2]] + [[["global"], options.small_layers % 2]],
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(options.seed)
    return AutoModelForCausalLM.from_config(config)


def save_small_model(directory: str | Path, tokenizer: PreTrainedTokenizerBase, options: TaskOptions) -> Path:
    """The combined model's small model, saved like a hub checkpoint (with the tokenizer) for `from_large_and_small`."""
    small_causal_lm(tokenizer, options.small_hidden_size, options).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return Path(directory)


def trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def trainer_arguments(options: TaskOptions, output_dir: Path, lr: float, progress: bool = True) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(output_dir), num_train_epochs=options.epochs, per_device_train_batch_size=options.batch_size,
        learning_rate=lr, weight_decay=options.weight_decay, lr_scheduler_type="cosine", warmup_steps=0.05,
        max_grad_norm=1.0, logging_steps=options.logging_steps, save_strategy="no", report_to="none",
        seed=options.seed, use_cpu=not torch.cuda.is_available(), disable_tqdm=not progress,
    )


class DistillationTrainer(Trainer):
    """Cross-entropy on the task rows plus a KL term to the frozen teacher's next-token distribution (Hinton et al.),
    on the labelled positions. Student and teacher share the tokenizer, so their vocabularies line up."""

    def __init__(self, *args: Any, teacher: torch.nn.Module, alpha: float, temperature: float, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval().requires_grad_(False)
        self.alpha, self.temperature = alpha, temperature

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        keep = inputs["labels"][:, 1:] != -100
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        t = self.temperature
        student = F.log_softmax(outputs.logits[:, :-1][keep].float() / t, dim=-1)
        target = F.log_softmax(teacher_logits[:, :-1][keep].float() / t, dim=-1)
        kl = F.kl_div(student, target, log_target=True, reduction="batchmean") * t * t
        loss = (1 - self.alpha) * outputs.loss + self.alpha * kl
        return (loss, outputs) if return_outputs else loss


def train_plain(
    model, dataset, tokenizer, options: TaskOptions, output_dir: Path, lr: float, log_file: Path, teacher=None,
    progress: bool = True,
) -> TrainedSystem:
    """Fine-tune every weight of a plain causal LM on the task rows (with distillation when a teacher is given); the
    Trainer's logs go to `log_file`, a progress bar to the terminal unless `progress=False`."""
    args = trainer_arguments(options, output_dir, lr, progress)
    kwargs = dict(
        model=model, args=args, train_dataset=dataset, data_collator=DataCollatorForLLMModules(tokenizer.pad_token_id),
        callbacks=log_file_callbacks(log_file),
    )
    if teacher is None:
        trainer = Trainer(**kwargs)
    else:
        trainer = DistillationTrainer(
            **kwargs, teacher=teacher, alpha=options.distill_alpha, temperature=options.distill_temperature
        )
    keep_logs_off_terminal(trainer)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    return TrainedSystem(model.eval(), trainable(model), seconds, trainer.state.log_history)


def small_only(
    dataset, tokenizer, options: TaskOptions, work_dir: Path, log_file: Path, progress: bool = True
) -> TrainedSystem:
    """The small model alone, with its own token embeddings, fine-tuned on the task (the paper's GPT-Neo fine-tuned)."""
    model = small_causal_lm(tokenizer, options.small_only_hidden_size, options)
    return train_plain(model, dataset, tokenizer, options, work_dir / "small_only", options.lr_small, log_file,
                       progress=progress)


def distilled_small(
    source_dir: Path, dataset, tokenizer, options: TaskOptions, work_dir: Path, log_file: Path
) -> TrainedSystem:
    """The small model trained on the task with a KL term to the source (classic logit distillation)."""
    model = small_causal_lm(tokenizer, options.small_only_hidden_size, options)
    teacher = AutoModelForCausalLM.from_pretrained(source_dir)
    return train_plain(
        model, dataset, tokenizer, options, work_dir / "distilled_small", options.lr_small, log_file, teacher=teacher
    )


def large_finetuned(
    source_dir: Path, dataset, tokenizer, options: TaskOptions, work_dir: Path, log_file: Path
) -> TrainedSystem:
    """The source itself with all its weights fine-tuned on the task (the analogue of the paper's distilled model)."""
    torch.manual_seed(options.seed)
    model = AutoModelForCausalLM.from_pretrained(source_dir)
    return train_plain(model, dataset, tokenizer, options, work_dir / "large_finetuned", options.lr_large, log_file)


def combined(
    source_dir: Path | list[Path], small_dir: Path, dataset, tokenizer, options: TaskOptions, output_dir: Path,
    log_file: Path, causal: bool = True, feature_cache: Path | None = None, progress: bool = True,
    **model_options: Any,
) -> TrainedSystem:
    """LLM Modules: the frozen source(s) -> bridge(s) -> small model, composed and trained by this library's own code.
    `model_options` are further `LLMModulesConfig` options (e.g. `source_fusion`, `num_depth_connections`).
    `feature_cache`: a directory where the sources' last hidden states are computed once (float32: the very states
    the sources give) instead of at every step; not with depth connections, which read inner layers.
    `progress=False` hides the Trainer's progress bar."""
    torch.manual_seed(options.seed)
    model = LLMModulesForCausalLM.from_large_and_small(
        source_dir, small_dir, cross_attention_heads=options.small_heads, adapter_dim=options.adapter_dim,
        dropout=options.bridge_dropout, causal_cross_attention=causal,
        small_position_embeddings=options.small_position_embeddings, **model_options,
    )
    # Every task row has this system prompt: the saved model answers in its layout by default (`generate`, `serve`).
    model.config.system_prompt = TASK_SYSTEM_PROMPT
    training = TrainingOptions(
        output_dir=str(output_dir), epochs=options.epochs, batch_size=options.batch_size, seed=options.seed,
        lr_bridge=options.lr_bridge, lr_small=options.lr_small, weight_decay=options.weight_decay, warmup=0.05,
        lr_scheduler="cosine", logging_steps=options.logging_steps, patience=0, report_to="none",
        # No checkpoints in the middle of a few-minute run; `train` still saves the final model to output_dir.
        trainer_args={"save_strategy": "no", "disable_tqdm": not progress},
    )
    start = time.perf_counter()
    if feature_cache is not None:
        dataset, _ = cached_datasets(feature_cache, model, dataset, None, dtype="float32")
    trainer = train(model, tokenizer, dataset, None, training, callbacks=log_file_callbacks(log_file),
                    data="the demo's task rows about split A's people (`data/train_a.jsonl` in the demo's output dir)")
    seconds = time.perf_counter() - start
    return TrainedSystem(model.eval(), model.parameter_summary()["trainable"], seconds, trainer.state.log_history)
