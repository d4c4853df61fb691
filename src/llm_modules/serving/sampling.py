"""Per-request logits processing and log-probabilities for the batching engine (`engine.py`).

A request's logit bias and presence/frequency penalties become a `LogitsProcessorList` of its own row, applied to its
logits before it picks a token (greedy rows too: argmax after the processors). Log-probabilities are of the model's
own distribution: log_softmax of the raw logits, before bias, penalties, temperature and top-p (vLLM's default,
"raw logprobs"), so a prompt's score does not depend on how it would be sampled.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, LogitsProcessorList, SequenceBiasLogitsProcessor


@dataclass(frozen=True)
class TokenLogprob:
    """One position's log-probabilities (natural log): the token's own, and the `k` most likely tokens (most likely
    first; empty when `k` is 0)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


class OpenAIPenaltyLogitsProcessor(LogitsProcessor):
    """OpenAI's presence and frequency penalties: `scores - frequency * count - presence * (count > 0)`, where `count`
    is how often each token occurs in `input_ids` (pass the generated tokens only, as OpenAI and vLLM count).

    Written here because transformers' `RepetitionPenaltyLogitsProcessor` is the multiplicative CTRL penalty (it
    divides positive logits and multiplies negative ones, once per token whatever its count), not OpenAI's additive
    one, and transformers has no processor for counts.
    """

    def __init__(self, presence: float, frequency: float):
        self.presence, self.frequency = presence, frequency

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        """`input_ids` `[batch, generated]`, `scores` `[batch, vocab]` -> penalized scores `[batch, vocab]`."""
        counts = torch.zeros_like(scores).scatter_add_(1, input_ids, torch.ones_like(input_ids, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


def request_processors(
    logit_bias: Mapping[int, float], presence_penalty: float, frequency_penalty: float
) -> LogitsProcessorList | None:
    """The processors of one request (None when it asks for none, so its row costs nothing more)."""
    processors = LogitsProcessorList()
    if logit_bias:
        processors.append(SequenceBiasLogitsProcessor([[[token], float(bias)] for token, bias in logit_bias.items()]))
    if presence_penalty or frequency_penalty:
        processors.append(OpenAIPenaltyLogitsProcessor(presence_penalty, frequency_penalty))
    return processors or None


def token_logprob(logits: torch.Tensor, token: int, k: int) -> TokenLogprob:
    """The log-probabilities of one position: `logits` `[vocab]` (raw), the chosen `token` and the top `k`."""
    logprobs = logits.float().log_softmax(-1)
    return TokenLogprob(token, float(logprobs[token]), _top(logprobs, k))


def prompt_logprobs(logits: torch.Tensor, prompt: Sequence[int], k: int) -> list[TokenLogprob | None]:
    """Each prompt token's log-probability given the tokens before it: `logits` `[len(prompt), vocab]` (the row's
    logits at the prompt's positions). The first token has none (nothing predicts it): None."""
    logprobs = logits[:-1].float().log_softmax(-1)
    targets = torch.tensor(prompt[1:], dtype=torch.long, device=logits.device)
    chosen = logprobs.gather(-1, targets[:, None])[:, 0].tolist()
    if k:
        values, indices = logprobs.topk(k, dim=-1)
        tops = [tuple(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]
    else:
        tops = [()] * len(chosen)
    return [None] + [TokenLogprob(t, lp, top) for t, lp, top in zip(prompt[1:], chosen, tops)]


def _top(logprobs: torch.Tensor, k: int) -> tuple[tuple[int, float], ...]:
    if not k:
        return ()
    values, indices = logprobs.topk(k)
    return tuple(zip(indices.tolist(), values.tolist()))
