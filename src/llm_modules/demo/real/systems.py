"""The real-weights demo's systems, each given the same rows and budget (see `task.py` for the rows).

- `small_zero_shot` / `large_native`: a plain instruct model asked in its own chat template, untrained
  (`native_predictions`), scored on the number it answers (`native_answer`);
- `small_only`: every weight of the small model fine-tuned on the rows in the paper's layout, over its own tokenizer
  (`small_only`, `transformers.Trainer` through the synthetic demo's `train_plain`);
- `combined`: the large model frozen, its last hidden states computed once through the feature cache, the bridge,
  the small model and the new head trained by `llm_modules.training.train` (`combined`).

The frozen model runs in float32: on a CPU without AVX512 (our 2-core VMs) bf16 matrix products are ~8x slower than
float32, and the cache stores its states in float16 (half the disk, no bf16 compute anywhere).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ...data import build_dataset
from ...evaluation import evaluate_answers, generate_texts
from ...feature_cache import cached_datasets
from ...modeling import LLMModulesForCausalLM
from ...training import TrainingOptions, train
from ...training_log import log_file_callbacks
from ..systems import TaskOptions, TrainedSystem, train_plain, trainable
from .task import Problem, native_answer, native_messages, stratos_row


@dataclass
class RealTrainOptions:
    """One budget for both trained systems (epochs, batch size, seed); learning rates by what is trained."""

    # 64 rows x 8 epochs = 64 steps of 8: on seed 0 the combined model's loss reached ~0.01 by step 45 and it answered
    # 28 of 30 held-out questions (teacher-forced digit accuracy 0.994); 24 steps were too few (0.53).
    epochs: float = 8
    batch_size: int = 8
    seed: int = 0
    # Measured at 24 steps (head_init="small"): lr_small 3e-4 reached loss 1.35, 1e-4 2.37, 1e-3 (bridge 3e-3) 2.13.
    lr_bridge: float = 1e-3
    lr_small: float = 3e-4  # the combined model's small model and its new head
    lr_small_only: float = 1e-4  # every weight of the small model alone
    weight_decay: float = 0.01
    warmup: float = 0.05
    logging_steps: int = 5
    # The combined model's bridge (`LLMModulesConfig` options); SmolLM2's width 576 takes 8 heads.
    model_options: dict[str, Any] = field(default_factory=lambda: {
        "cross_attention_heads": 8, "adapter_dim": 256, "dropout": 0.1,
        # SmolLM2 is a RoPE model trained with real positions: "zero" would take order away from its attention.
        "small_position_embeddings": "keep",
        # The new head's rows of tokens SmolLM2 also has (39,237 of Qwen's 151,936, every digit among them) start as
        # SmolLM2's output embeddings: at 24 steps, teacher-forced held-out digit accuracy 0.53 against 0.15 with the
        # paper's random head (README, "The demo on real models").
        "head_init": "small",
    })
    feature_cache_dtype: str = "float16"


# ---- untrained systems: each model in its own chat template ----------------------------------------------------


def load_plain(path: str | Path, dtype: torch.dtype = torch.float32):
    """(model in eval mode, tokenizer with a pad token) of a plain causal LM dir."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # batching only: the attention mask hides padding
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval(), tokenizer


def native_predictions(model, tokenizer, problems: list[Problem], batch_size: int = 16, max_new_tokens: int = 24,
                       desc: str = "native") -> list[dict[str, Any]]:
    """Greedy replies of a plain chat model to `problems` in its own chat template (`native_messages`), each as
    `{"question", "output", "answer", "reference", "correct"}`."""
    prompts = [tokenizer.apply_chat_template(native_messages(p), add_generation_prompt=True, tokenize=False)
               for p in problems]
    replies = generate_texts(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                             stop_strings=None, desc=desc)
    predictions = []
    for problem, reply in zip(problems, replies):
        answer = native_answer(reply, problem)
        predictions.append({"question": problem.question, "output": reply, "answer": answer,
                            "reference": str(problem.answer), "correct": answer == str(problem.answer)})
    return predictions


def accuracy(predictions: list[dict[str, Any]]) -> float:
    return sum(p["correct"] for p in predictions) / len(predictions)


# ---- trained systems ----------------------------------------------------------------------------------------------


def small_only(small_dir: str | Path, train_problems: list[Problem], options: RealTrainOptions, work_dir: Path,
               log_file: Path) -> tuple[TrainedSystem, Any]:
    """(every weight of the small model fine-tuned on the rows of `train_problems`, its tokenizer)."""
    torch.manual_seed(options.seed)
    model, tokenizer = load_plain(small_dir)
    dataset, _ = build_dataset([stratos_row(p) for p in train_problems], tokenizer, max_length=None)
    task = TaskOptions(epochs=options.epochs, batch_size=options.batch_size, seed=options.seed,
                       weight_decay=options.weight_decay, logging_steps=options.logging_steps)
    trained = train_plain(model.train(), dataset, tokenizer, task, work_dir / "small_only", options.lr_small_only,
                          log_file)
    return trained, tokenizer


def compose(large_dir: str | Path, small_dir: str | Path, options: RealTrainOptions) -> LLMModulesForCausalLM:
    """The combined model: the large model frozen in float32, the small model pretrained, a fresh bridge and head."""
    torch.manual_seed(options.seed)
    return LLMModulesForCausalLM.from_large_and_small(
        large_dir, small_dir, large_dtype=torch.float32, **options.model_options
    )


def combined(model: LLMModulesForCausalLM, train_problems: list[Problem], options: RealTrainOptions, output_dir: Path,
             cache_dir: Path, log_file: Path) -> tuple[TrainedSystem, dict[str, float]]:
    """Train `model` (from `compose`) on the rows of `train_problems` through the feature cache and this library's
    trainer; returns (the trained system, `{"feature_seconds", "feature_tokens"}`)."""
    tokenizer = model.tokenizer
    dataset, _ = build_dataset([stratos_row(p) for p in train_problems], tokenizer, max_length=None)
    start = time.perf_counter()
    cached, _ = cached_datasets(cache_dir, model, dataset, None, dtype=options.feature_cache_dtype)
    features = {"feature_seconds": round(time.perf_counter() - start, 1),
                "feature_tokens": int(sum(len(ids) for ids in dataset["input_ids"]))}
    training = TrainingOptions(
        output_dir=str(output_dir), epochs=options.epochs, batch_size=options.batch_size,
        seed=options.seed, lr_bridge=options.lr_bridge, lr_small=options.lr_small, weight_decay=options.weight_decay,
        warmup=options.warmup, lr_scheduler="cosine", logging_steps=options.logging_steps, patience=0,
        report_to="none", trainer_args={"save_strategy": "no"},
    )
    start = time.perf_counter()
    trainer = train(model, tokenizer, cached, None, training, callbacks=log_file_callbacks(log_file),
                    data="the real demo's generated arithmetic rows (`data/train.jsonl` in its output dir)")
    seconds = time.perf_counter() - start
    return TrainedSystem(model.eval(), model.parameter_summary()["trainable"], seconds,
                         trainer.state.log_history), features


def answer_token_budget(tokenizer, problems: list[Problem], margin: int = 8) -> int:
    """`max_new_tokens` for a trained system: its longest assistant turn among `problems` in its own tokenizer, plus
    `margin` (SmolLM2 splits the row markers into more tokens than Qwen: 50-54 tokens against 41-45 on sub3)."""
    return margin + max(len(tokenizer(stratos_row(p)["conversations"][-1]["value"])["input_ids"]) for p in problems)


def answer_predictions(model, tokenizer, problems: list[Problem], *, max_new_tokens: int, batch_size: int = 16,
                       desc: str = "answers"):
    """`evaluation.evaluate_answers` on the Stratos rows of `problems`: exact match of the solution section.
    `max_new_tokens` has no default: size it for `tokenizer` with `answer_token_budget` (a fixed 48 cut SmolLM2's
    answers short)."""
    return evaluate_answers(model, tokenizer, [stratos_row(p) for p in problems], max_new_tokens=max_new_tokens,
                            batch_size=batch_size, desc=desc)


__all__ = ["RealTrainOptions", "accuracy", "answer_predictions", "answer_token_budget", "combined", "compose",
           "load_plain", "native_answer", "native_predictions", "small_only", "trainable"]
