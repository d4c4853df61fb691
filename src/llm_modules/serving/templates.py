"""Chat templates that refuse system messages (Gemma-style `raise_exception('System role not supported')`, or
templates that silently drop them).

We follow llama.cpp's server (its minja chat-template layer): at startup, render a probe conversation with a system
message; when the template raises or the system text does not show, the template has no system role, and system
messages (the client's and `serve --system`) go at the start of the next user turn, joined by a newline. vLLM has no
such fallback (the template's error reaches the client), which would make `--system` break every request.
"""

from __future__ import annotations

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

__all__ = ["TemplateError", "fold_system_turns", "template_has_system_role"]

_NEEDLE = "<System Needle>"


def template_has_system_role(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether `tokenizer`'s chat template renders a system message (probed as llama.cpp probes it)."""
    probe = [{"role": "system", "content": _NEEDLE}, {"role": "user", "content": "Hey"}]
    try:
        text = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=False)
    except Exception:  # noqa: BLE001 - a template that fails on the probe in any way has no usable system role
        return False
    return _NEEDLE in text


def fold_system_turns(turns: list[dict[str, str]], default_system: str | None) -> list[dict[str, str]]:
    """`turns` (`{"role", "content"}`) without system turns: their text (or `default_system` when there is none) starts
    the next user turn, followed by a newline; before a turn of another role (or at the end) it becomes a user turn
    of its own."""
    if default_system is not None and not any(t["role"] == "system" for t in turns):
        turns = [{"role": "system", "content": default_system}, *turns]
    folded, pending = [], []
    for turn in turns:
        if turn["role"] == "system":
            pending.append(turn["content"])
            continue
        if pending and turn["role"] == "user":
            turn = {**turn, "content": "\n".join(pending + ([turn["content"]] if turn["content"] else []))}
        elif pending:
            folded.append({"role": "user", "content": "\n".join(pending)})
        folded.append(turn)
        pending = []
    if pending:
        folded.append({"role": "user", "content": "\n".join(pending)})
    return folded
