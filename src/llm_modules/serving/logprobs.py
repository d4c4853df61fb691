"""Log-probabilities in the OpenAI response formats (the engine's `TokenLogprob`s, see `sampling.py`).

A token's text is `tokenizer.decode([id])`, as vLLM writes it: a token that holds part of a multi-byte character
reads as U+FFFD, and its `bytes` are those of that text.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from .sampling import TokenLogprob


class LogprobFormat:
    """Formats log-probabilities for one tokenizer (token texts are cached: the same ids come back every step)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer, self._texts = tokenizer, {}

    def text(self, token: int) -> str:
        if (text := self._texts.get(token)) is None:
            text = self._texts[token] = self.tokenizer.decode([token], skip_special_tokens=False)
        return text

    # -- chat: {"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]} --

    def chat(self, entries: list[TokenLogprob]) -> dict[str, Any]:
        """`choice.logprobs` of a chat completion (or of one stream chunk)."""
        return {"content": [self._chat_entry(e) for e in entries]}

    def _chat_entry(self, entry: TokenLogprob) -> dict[str, Any]:
        top = [self._chat_token(token, logprob) for token, logprob in entry.top]
        return {**self._chat_token(entry.token, entry.logprob), "top_logprobs": top}

    def _chat_token(self, token: int, logprob: float) -> dict[str, Any]:
        text = self.text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    # -- completions: {"tokens", "token_logprobs", "top_logprobs", "text_offset"} --

    def completion(self, entries: list[TokenLogprob | None], tokens: list[int], offset: int) -> dict[str, Any]:
        """`choice.logprobs` of a completion (or of one stream chunk): one entry per token of `tokens` (None for a
        prompt's first token, which nothing predicts), text offsets counted from `offset` characters (the length
        of the text before these tokens, as the token texts add up). `top_logprobs` maps the most likely tokens'
        texts, and the chosen token's, to their logprobs (as vLLM, so a request for 1 shows whether the chosen
        token was the most likely)."""
        texts = [self.text(t) for t in tokens]
        offsets = []
        for text in texts:
            offsets.append(offset)
            offset += len(text)
        return {
            "tokens": texts,
            "token_logprobs": [None if e is None else e.logprob for e in entries],
            "top_logprobs": [None if e is None else self._top_map(e) for e in entries],
            "text_offset": offsets,
        }

    def _top_map(self, entry: TokenLogprob) -> dict[str, float]:
        top = {self.text(token): logprob for token, logprob in entry.top}
        top.setdefault(self.text(entry.token), entry.logprob)
        return top

    def length(self, tokens: list[int]) -> int:
        """How many characters `tokens`' texts add up to (the next `offset`)."""
        return sum(len(self.text(t)) for t in tokens)
