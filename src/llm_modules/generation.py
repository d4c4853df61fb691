"""What every way of generating shares (`llm-modules generate` and `chat`, the server, `eval`): which tokens the
answer text drops, streaming that text, and whether a prompt and its completion fit in the model's context.

The answer text keeps every token but the control tokens: pad, bos, eos and the other named special tokens, the
model's end-of-turn ids, and the chat template's turn markers (`<|im_start|>`). Additional tokens that are part of
answers, such as the Stratos markers `<|begin_of_thought|>` ... `<|end_of_solution|>`, stay even when the tokenizer
registers them as special tokens. `decode(skip_special_tokens=True)` would drop those too, and a tokenizer has no
way to mark which of its special tokens may be skipped, so the control ids are removed and the rest is decoded with
`skip_special_tokens=False`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TextStreamer,
)

from .configuration import LLMModulesConfig
from .data import ANSWER_MARKERS

# ---- answer text --------------------------------------------------------------------------------------------------


def control_token_ids(tokenizer: PreTrainedTokenizerBase, model: Any = None) -> frozenset[int]:
    """Ids that answer text drops: the tokenizer's named special tokens (bos, eos, pad, unk, sep, cls, mask), the
    `eos_token_id`s of `model.generation_config` (end of turn, e.g. `<|im_end|>`), and the special added tokens that
    the chat template writes (turn markers). Never an `ANSWER_MARKERS` token."""
    ids = set(tokenizer.convert_tokens_to_ids(list(tokenizer.special_tokens_map.values())))
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    template = tokenizer.chat_template or ""
    template = template if isinstance(template, str) else "\n".join(template.values())  # named templates
    added = tokenizer.added_tokens_decoder
    ids.update(i for i, token in added.items() if token.special and token.content in template)
    return frozenset(ids - {None} - {i for i, token in added.items() if token.content in ANSWER_MARKERS})


def decode_answer(tokenizer: PreTrainedTokenizerBase, ids: Iterable[int], control_ids: frozenset[int]) -> str:
    """The text of generated token `ids` (a list or a 1-d tensor) without its control tokens (`control_token_ids`)."""
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
    return tokenizer.decode([i for i in ids if i not in control_ids], skip_special_tokens=False)


class _DropsControlTokens:
    """Streams what `decode_answer` returns: drops the control ids before the streamer decodes (the new text only)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, control_ids: frozenset[int], **kwargs: Any):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=False, **kwargs)
        self.control_ids = torch.tensor(sorted(control_ids), dtype=torch.long)

    def put(self, value: torch.Tensor) -> None:
        if value.dim() > 1 and value.shape[0] == 1:
            value = value[0]
        if value.dim() == 1:  # several rows are passed on as they are, for TextStreamer to refuse
            value = value[~torch.isin(value, self.control_ids.to(value.device))]
        super().put(value)


class AnswerStreamer(_DropsControlTokens, TextStreamer):
    """`TextStreamer` (prints to stdout) of the answer text: the same text as `decode_answer`."""


class AnswerTextPieces(_DropsControlTokens, TextStreamer):
    """The answer text of new token ids fed as they come, in pieces that join to what `decode_answer` gives: `feed`
    returns the text that is final so far (as `TextStreamer`, a word is held back until it ends), `finish` the rest.
    For callers that get token ids themselves (the server's batching engine) rather than from `generate`."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, control_ids: frozenset[int]):
        super().__init__(tokenizer, control_ids)
        self.next_tokens_are_prompt = False  # fed new tokens only, never the prompt
        self._pieces: list[str] = []

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self._pieces.append(text)

    def feed(self, ids: list[int]) -> str:
        """The text that `ids` (the next new token ids) make final."""
        self.put(torch.tensor(ids, dtype=torch.long))
        return self._take()

    def finish(self) -> str:
        """The text still held back, once no more tokens come."""
        self.end()
        return self._take()

    def _take(self) -> str:
        text = "".join(self._pieces)
        self._pieces.clear()
        return text


# ---- context ------------------------------------------------------------------------------------------------------


class ContextLengthError(ValueError):
    """A prompt and its completion do not fit in the model's context.

    `prompt_too_long` is True when the prompt alone leaves no room for a completion."""

    def __init__(self, message: str, prompt_too_long: bool):
        super().__init__(message)
        self.prompt_too_long = prompt_too_long


def context_length(model: PreTrainedModel) -> int:
    """Most tokens (prompt + completion) a sequence may hold.

    Raises ValueError when the model's config has no `max_position_embeddings`."""
    config = model.config
    if isinstance(config, LLMModulesConfig):
        # With zeroed small-model positions only the frozen sources limit the length (docs/design.md).
        configs = config.large_configs + ([config.small_config] if config.small_position_embeddings == "keep" else [])
    else:
        configs = [config]
    limits = [getattr(c, "max_position_embeddings", None) for c in configs]
    if None in limits:
        raise ValueError(f"cannot tell the context length of {type(model).__name__}: no max_position_embeddings")
    return min(limits)


def _context_description(model: PreTrainedModel, context: int) -> str:
    config = model.config
    if (
        isinstance(config, LLMModulesConfig) and config.small_position_embeddings == "keep"
        and getattr(config.small_config, "max_position_embeddings", None) == context
    ):
        return (f"{context} tokens (the small model's positions: it was built with "
                "small_position_embeddings='keep'; 'zero' has no such limit)")
    return f"{context} tokens"


def check_generation_length(
    model: PreTrainedModel, prompt_tokens: int, max_new_tokens: int | None, *, up_to: int | None = None,
    option: str = "max_new_tokens",
) -> int:
    """How many new tokens to generate after a `prompt_tokens`-long prompt: `max_new_tokens`, or when it is None, as
    many as the context leaves, at most `up_to`. The one rule of every entry point (CLI, server).

    Raises `ContextLengthError` naming the numbers and `option` (the setting to lower, e.g. `--max-new-tokens`) when
    the prompt leaves no room, or prompt + `max_new_tokens` exceeds `context_length(model)`.
    """
    context = context_length(model)
    room = context - prompt_tokens
    limit = f"This model's maximum context length is {_context_description(model, context)}"
    if room < 1:
        raise ContextLengthError(
            f"{limit}, but the prompt is {prompt_tokens} tokens, which leaves no room for the completion: "
            "shorten the prompt", prompt_too_long=True,
        )
    if max_new_tokens is None:
        return room if up_to is None else min(up_to, room)
    if max_new_tokens > room:
        raise ContextLengthError(
            f"{limit}, but the prompt ({prompt_tokens} tokens) plus {option} {max_new_tokens} is "
            f"{prompt_tokens + max_new_tokens} tokens: lower {option} to {room} or shorten the prompt",
            prompt_too_long=False,
        )
    return max_new_tokens


# ---- prompts ----------------------------------------------------------------------------------------------------


def chat_prompt_ids(
    model: Any, tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], system: str | None = None
) -> list[int]:
    """Token ids a model continues for a chat (`messages` are `{"role", "content"}`).

    A combined model (or a tokenizer without a chat template) gets the training layout (`data.render_prompt`, with
    `system`, else the system prompt the model was trained with (`config.system_prompt`), else the default system
    prompt, when `messages` have none), tokenized as training tokenizes it; a plain
    causal LM with a chat template gets its template, with `system` added only when given and `messages` have none.
    """
    from .data import render_prompt, tokenize_prompt
    from .modeling import LLMModulesForCausalLM

    if isinstance(model, LLMModulesForCausalLM) or not tokenizer.chat_template:
        if system is None:  # the system prompt it was trained with, else render_prompt's default
            system = getattr(model.config, "system_prompt", None)
        return tokenize_prompt(tokenizer, render_prompt(messages, system=system))["input_ids"]
    turns = list(messages)
    if system is not None and not any(t["role"] == "system" for t in turns):
        turns.insert(0, {"role": "system", "content": system})
    text = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    return tokenize_prompt(tokenizer, text, templated=True)["input_ids"]


def load_model_and_tokenizer(
    model: str, *, large_model: str | list[str] | None = None, device: str | None = None, large_dtype: str | None = None,
    large_quantization: str | None = None, trained_quantization: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A saved combined model, or a plain Hugging Face causal LM (dir, hub id or .gguf file; `sources`), with its
    tokenizer, in eval mode on `device` (default: cuda when available): bf16 on a GPU, float32 on CPU.
    `large_dtype` / `large_quantization` set a combined model's frozen part, `trained_quantization` its trained parts
    (`LLMModulesForCausalLM.from_pretrained`).

    Raises `ModelSourceError` for a missing path or a dir that is not a model, `ValueError` when no tokenizer is saved
    or when a frozen-model precision is asked of a plain model.
    """
    import torch

    from .modeling import LLMModulesForCausalLM
    from .sources import (
        is_gguf,
        load_causal_lm,
        load_config,
        load_tokenizer,
        resolve_model_source,
    )

    source = resolve_model_source(model, "--model")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    if trained_quantization and device != "cpu":
        raise ValueError(f"--trained-quantization runs on the CPU, not on {device}")
    if not is_gguf(source) and load_config(source).model_type == "llm_modules":
        loaded = LLMModulesForCausalLM.from_pretrained(
            source, large_model_name_or_path=large_model, dtype=dtype, large_dtype=large_dtype,
            large_quantization=large_quantization, trained_quantization=trained_quantization,
        )
        tokenizer = loaded.tokenizer
    elif large_dtype or large_quantization or trained_quantization:
        raise ValueError("--large-dtype/--large-quantization/--trained-quantization set the parts of a combined model; "
                         "this is a plain causal LM")
    else:
        loaded, tokenizer = load_causal_lm(source, dtype=dtype), load_tokenizer(source)
    if tokenizer is None:
        raise ValueError(f"{model}: no tokenizer saved there")
    return loaded.to(device).eval(), tokenizer
