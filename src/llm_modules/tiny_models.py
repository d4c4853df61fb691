"""Tiny random models of real architectures with a locally trained tokenizer, saved like hub checkpoints.

Nothing can be downloaded on our machines, so tests, the offline demo and the quickstart build these and load them
through the same `from_pretrained` paths users take with hub ids.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from .data import ANSWER_MARKERS

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
MARKERS = list(ANSWER_MARKERS)

# Architecture kwargs that make a model of each family tiny; widths and heads are filled in by `tiny_config`.
TINY_ARCHITECTURES = {
    "qwen2": lambda d, layers, heads: dict(
        hidden_size=d, intermediate_size=2 * d, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2), max_position_embeddings=4096, tie_word_embeddings=True,
    ),
    "llama": lambda d, layers, heads: dict(
        hidden_size=d, intermediate_size=2 * d, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=heads, max_position_embeddings=4096,
    ),
    "gpt_neo": lambda d, layers, heads: dict(
        hidden_size=d, num_layers=layers, num_heads=heads, max_position_embeddings=256, window_size=16,
        attention_types=[[["global", "local"], max(1, layers // 2)]],
    ),
    "gpt2": lambda d, layers, heads: dict(n_embd=d, n_layer=layers, n_head=heads, n_positions=256),
}


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512, extra_tokens: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts`, with EOS, a pad token distinct from EOS and the Stratos markers."""
    specials = [EOS_TOKEN, PAD_TOKEN, *MARKERS, *extra_tokens]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,  # it writes straight to stdout, above the demo's output
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
        additional_special_tokens=list(MARKERS) + list(extra_tokens),
    )


def tiny_config(model_type: str, tokenizer: PreTrainedTokenizerBase, hidden_size: int = 64, layers: int = 2, heads: int = 4):
    """Config of a tiny `model_type` model whose vocabulary and special ids match `tokenizer`."""
    kwargs = TINY_ARCHITECTURES[model_type](hidden_size, layers, heads)
    return AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **kwargs,
    )


def save_tiny_causal_lm(
    directory: str | os.PathLike, model_type: str, tokenizer: PreTrainedTokenizerBase, seed: int = 0, **sizes: int
) -> Path:
    """Save a random tiny `model_type` causal LM and its tokenizer to `directory`, as a hub checkpoint would be."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, tokenizer, **sizes))
    directory = Path(directory)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
