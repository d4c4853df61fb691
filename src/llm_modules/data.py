"""Stratos rows -> the paper's prompt layout -> token ids and labels."""

from __future__ import annotations

from collections.abc import Sequence

# Used when a row (or a chat request) brings no system prompt: the Bespoke-Stratos instruction, shortened.
DEFAULT_SYSTEM_PROMPT = (
    "Your role as an assistant involves thoroughly exploring questions through a systematic long thinking process "
    "before providing the final precise and accurate solutions. Please structure your response into two main "
    "sections: Thought and Solution. In the Thought section, detail your reasoning process using the specified "
    "format: <|begin_of_thought|> {thought with steps separated with '\\n\\n'} <|end_of_thought|> In the Solution "
    "section, based on various attempts, explorations, and reflections from the Thought section, systematically "
    "present the final solution that you deem correct. The solution should remain a logical, accurate, concise "
    "expression style and detail necessary steps needed to reach the conclusion, formatted as follows: "
    "<|begin_of_solution|> {final formatted, precise, and clear solution} <|end_of_solution|> Now, try to solve "
    "the following question through the above guidelines:"
)
ROLE_HEADERS = {"system": "System:", "user": "User:", "assistant": "Assistant:"}
STOP_STRINGS = ["<|end_of_solution|>"]


def render_turn(role: str, content: str) -> str:
    """One block of the paper's layout: `Role:\\n\\n{content}\\n\\n`."""
    return f"{ROLE_HEADERS[role]}\n\n{content}\n\n"


def render_prompt(messages: Sequence[dict[str, str]], system: str | None = None) -> str:
    """Text the model continues: system block, the turns in order, then an open `Assistant:` block.

    `messages` are `{"role": "user"|"assistant"|"system", "content": str}`; a system message in `messages`
    overrides `system`, and without either the default system prompt is used.
    """
    turns = [m for m in messages if m["role"] != "system"]
    systems = [m["content"] for m in messages if m["role"] == "system"]
    system_text = systems[-1] if systems else (system if system is not None else DEFAULT_SYSTEM_PROMPT)
    text = render_turn("system", system_text)
    for message in turns:
        text += render_turn(message["role"], message["content"])
    return text + f"{ROLE_HEADERS['assistant']}\n\n"
