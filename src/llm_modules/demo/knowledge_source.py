"""The knowledge source: a small Qwen2-architecture model pretrained from scratch on the synthetic world.

It reads biographies of everyone (fresh paraphrases and sentence orders every round) and plain QA lines about split A
only, with a tokenizer trained here, until it answers its own QA about split A (a few more rounds when it has not
learnt an attribute yet; it is never tested on split B here). It is saved as an ordinary Hugging Face model dir and
loaded with `from_pretrained`, the path `Qwen/Qwen2-1.5B` takes in real use.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
)

from ..data import DataCollatorForLLMModules
from ..evaluation import generate_texts
from ..tiny_models import train_tokenizer
from ..training_log import keep_logs_off_terminal, log_file_callbacks
from .report import write_atomic
from .world import ATTRIBUTES, World, biography, native_line, native_prompt, pronoun_statement, statement, tokenizer_corpus


@dataclass
class SourceOptions:
    """A 2-layer, width-128 Qwen2 (about 0.75M parameters with its 2048-token vocabulary); many small steps over
    fresh paraphrases is what makes it memorise the biographies."""

    hidden_size: int = 128
    layers: int = 2
    heads: int = 4
    intermediate_size: int = 512
    vocab_size: int = 2048  # large enough that every name is one token
    rounds: int = 120  # passes over the world, each with fresh biography paraphrases
    prefix_fraction: float = 0.5  # documents that follow an unrelated prefix (see `pretraining_dataset`)
    prefix_tokens: int = 16  # at most this many tokens of another document in a prefix
    noise_tokens: int = 4  # then at most this many random tokens
    batch_size: int = 16
    lr: float = 4e-3
    weight_decay: float = 0.1
    # After `rounds`, the source is asked its own QA about split A (lines it read, never split B); while an attribute
    # scores below `recall_target` it reads `extra_rounds` more under a fresh cosine schedule, `max_extra_blocks` times
    # at most. A source on half the facts sometimes had learnt one attribute and not the other after 120 rounds (jobs
    # 0.16-0.24 against cities 1.00 on two seeds); 40 more rounds took both of those sources to 1.00.
    recall_target: float = 0.95
    extra_rounds: int = 40
    max_extra_blocks: int = 2


def build_tokenizer(world: World, vocab_size: int, seed: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the world's text; it knows the Stratos markers like Qwen2's covers text."""
    return train_tokenizer(tokenizer_corpus(world, seed), vocab_size=vocab_size)


def pretraining_documents(
    world: World, rounds: int, seed: int, attributes: Sequence[str] = tuple(ATTRIBUTES)
) -> list[str]:
    """`rounds` shuffled passes, each a fresh biography of every person and the QA lines of everyone in A, both about
    `attributes` only (a source that holds part of the facts)."""
    rng = random.Random(seed)
    documents = []
    for _ in range(rounds):
        batch = [" ".join(biography(person, rng, attributes)) for person in world.people]
        for person in world.split_a:
            shuffled = list(attributes)
            rng.shuffle(shuffled)
            batch.append("\n".join(native_line(person, attribute, rng) for attribute in shuffled))
        rng.shuffle(batch)
        documents += batch
    return documents


def pretraining_dataset(
    documents: list[str], tokenizer: PreTrainedTokenizerBase, options: SourceOptions, seed: int
) -> datasets.Dataset:
    """One example per document, EOS appended; some documents follow an unrelated prefix the loss skips.

    Without a prefix every biography starts at position 0, and the source learns to look up "the person at the
    start" instead of "the person just named": it then fails on a fact asked inside any other text (a prototype
    source recalled 100% of split B from a bare `Kalomira lives in` but 36% inside the task's prompt). A prefix
    of a piece of another document (other names, other facts) and a few random tokens (unknown words) before half
    of the documents made recall in the task's prompt equal to recall in a biography.
    """
    rng = random.Random(seed)
    pool = [i for i in range(len(tokenizer)) if i not in (tokenizer.eos_token_id, tokenizer.pad_token_id)]
    columns: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "attention_mask": []}
    # A leading space: names tokenize as they do inside sentences and prompts.
    encoded = tokenizer([" " + document for document in documents], add_special_tokens=False)["input_ids"]
    for ids in encoded:
        prefix: list[int] = []
        if rng.random() < options.prefix_fraction:
            other = rng.choice(encoded)
            start = rng.randrange(len(other))
            prefix = other[start : start + rng.randint(1, options.prefix_tokens)]
            prefix += rng.choices(pool, k=rng.randint(0, options.noise_tokens))
        text = ids + [tokenizer.eos_token_id]
        columns["input_ids"].append(prefix + text)
        columns["labels"].append([-100] * len(prefix) + text)
        columns["attention_mask"].append([1] * (len(prefix) + len(text)))
    return datasets.Dataset.from_dict(columns)


def source_config(tokenizer: PreTrainedTokenizerBase, options: SourceOptions):
    return AutoConfig.for_model(
        "qwen2", vocab_size=len(tokenizer), hidden_size=options.hidden_size, intermediate_size=options.intermediate_size,
        num_hidden_layers=options.layers, num_attention_heads=options.heads,
        num_key_value_heads=max(1, options.heads // 2), max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


@dataclass
class PretrainedSource:
    """What `pretrain_source` did: the Trainer log of every block (`epoch` counted in rounds), the rounds read, and
    the exact match per attribute in its own QA format on split A after each block."""

    log_history: list[dict]
    rounds: int
    recall_split_a: list[dict[str, float]]


def pretrain_source(
    world: World, tokenizer: PreTrainedTokenizerBase, directory: str | Path, options: SourceOptions, seed: int,
    work_dir: str | Path, log_file: Path, attributes: Sequence[str] = tuple(ATTRIBUTES), progress: bool = True,
) -> PretrainedSource:
    """Pretrain the source from random weights on the facts of `attributes` until it recalls split A (see
    `SourceOptions.recall_target`), save it with its tokenizer to `directory`. Its log goes to `log_file`;
    `progress=False` hides its progress bars."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(source_config(tokenizer, options))
    history: list[dict] = []
    recalls: list[dict[str, float]] = []
    rounds = 0
    for block in range(1 + options.max_extra_blocks):
        block_rounds = options.rounds if block == 0 else options.extra_rounds
        block_seed = seed + 1000 * block  # fresh paraphrases and prefixes in every block
        documents = pretraining_documents(world, block_rounds, block_seed, attributes)
        args = TrainingArguments(
            output_dir=str(Path(work_dir) / f"block_{block}"), num_train_epochs=1,
            per_device_train_batch_size=options.batch_size, learning_rate=options.lr,
            weight_decay=options.weight_decay, lr_scheduler_type="cosine", warmup_steps=0.05, max_grad_norm=1.0,
            logging_steps=20, save_strategy="no", report_to="none", seed=block_seed, use_cpu=True,
            disable_tqdm=not progress,
        )
        trainer = keep_logs_off_terminal(Trainer(
            model=model.train(), args=args,
            train_dataset=pretraining_dataset(documents, tokenizer, options, block_seed),
            data_collator=DataCollatorForLLMModules(tokenizer.pad_token_id), callbacks=log_file_callbacks(log_file),
        ))
        trainer.train()
        steps = history[-1]["step"] if history else 0
        history += [{**entry, "step": steps + entry["step"], "epoch": rounds + entry["epoch"] * block_rounds}
                    for entry in trainer.state.log_history if "epoch" in entry]
        rounds += block_rounds
        recalls.append(recall_per_attribute(model.eval(), tokenizer, world.split_a, attributes, progress))
        history.append({"step": history[-1]["step"], "epoch": rounds, "recall_split_a": recalls[-1]})
        if min(recalls[-1].values()) >= options.recall_target:
            break
    # Each block's Trainer started the log afresh: the whole run replaces it.
    write_atomic(log_file, "".join(json.dumps(entry) + "\n" for entry in history))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return PretrainedSource(history, rounds, recalls)


def recall_per_attribute(
    model, tokenizer: PreTrainedTokenizerBase, people, attributes: Sequence[str] = tuple(ATTRIBUTES),
    progress: bool = True,
) -> dict[str, float]:
    """Exact match of the source's answers in its own QA format about `people`, per attribute."""
    pairs = native_answers(model, tokenizer, people, attributes=attributes, desc="source recall on A",
                           progress=progress)
    correct = [answer in wordings for answer, wordings in pairs]
    return {attribute: sum(correct[i :: len(attributes)]) / len(people) for i, attribute in enumerate(attributes)}


def native_answers(
    model, tokenizer: PreTrainedTokenizerBase, people, batch_size: int = 64,
    attributes: Sequence[str] = tuple(ATTRIBUTES), desc: str = "native QA", progress: bool = True,
) -> list[tuple[str, tuple[str, str]]]:
    """(generated answer, its two correct wordings) for every fact of `people` about `attributes`, asked in the
    source's own QA format."""
    facts = [(person, attribute) for person in people for attribute in attributes]
    prompts = [" " + native_prompt(person, attribute) for person, attribute in facts]  # as in pretraining
    outputs = generate_texts(
        model, tokenizer, prompts, max_new_tokens=12, batch_size=batch_size, stop_strings=["\n"], desc=desc,
        progress=progress,
    )
    return [
        (output.split("\n")[0].strip(), (statement(person, attribute), pronoun_statement(person, attribute)))
        for output, (person, attribute) in zip(outputs, facts)
    ]
