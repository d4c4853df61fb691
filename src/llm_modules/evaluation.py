"""Evaluation shared by `llm-modules eval` and the demo: answer extraction, exact match, validation loss.

Works on a combined model and on any plain Hugging Face causal LM alike, so baselines are measured by the same code.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from .data import (
    ANSWER_MARKERS,
    IGNORE_INDEX,
    STOP_STRINGS,
    DataCollatorForLLMModules,
    conversation_turns,
    render_prompt,
    tokenize_prompt,
)
from .generation import control_token_ids, decode_answer
from .modeling import LLMModulesForCausalLM

BEGIN_THOUGHT, END_THOUGHT, BEGIN_SOLUTION, END_SOLUTION = ANSWER_MARKERS


# ---- answers -----------------------------------------------------------------------------------------------------


def last_boxed(text: str) -> str | None:
    r"""Content of the last `\boxed{...}` in `text` (braces matched, so `\boxed{\frac{1}{2}}` works), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for i in range(begin, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            if depth == 0:
                return text[begin:i]
            depth -= 1
    return None  # unbalanced: the generation stopped inside the box


def extract_solution(text: str) -> str | None:
    r"""The answer in a Stratos-format response: the text between the last `<|begin_of_solution|>` and the
    `<|end_of_solution|>` after it, narrowed to its last `\boxed{...}` when there is one. None when the solution
    section is missing or unclosed."""
    start = text.rfind(BEGIN_SOLUTION)
    if start < 0:
        return None
    start += len(BEGIN_SOLUTION)
    end = text.find(END_SOLUTION, start)
    if end < 0:
        return None
    solution = text[start:end]
    boxed = last_boxed(solution)
    return (boxed if boxed is not None else solution).strip()


def is_well_formed(text: str) -> bool:
    """A thought section and then a closed solution section, each marker once and in order."""
    markers = [BEGIN_THOUGHT, END_THOUGHT, BEGIN_SOLUTION, END_SOLUTION]
    if any(text.count(marker) != 1 for marker in markers):
        return False
    positions = [text.index(marker) for marker in markers]
    return positions == sorted(positions)


_LATEX_SPACING = re.compile(r"\\[,;:!]|\\quad|\\qquad|\\left|\\right|\\displaystyle")
_TEXT_COMMAND = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")
_NUMBER = re.compile(r"^[-+]?\d+(?:\.\d+)?$")


def normalize_answer(answer: str) -> str:
    r"""Compare answers up to form: whitespace, case, a trailing period, `$...$`, `\text{}`, LaTeX spacing,
    `\dfrac`/`\tfrac`, thousands separators and number forms (`5.0`, `05`, `+5` -> `5`)."""
    text = answer.strip()
    text = text.strip("$").strip()
    text = _TEXT_COMMAND.sub(r"\1", text)
    text = _LATEX_SPACING.sub("", text)
    text = text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    text = re.sub(r"\s+", " ", text).strip()
    text = text.rstrip(".").strip()
    text = _THOUSANDS.sub("", text)
    if _NUMBER.match(text):
        number = float(text)
        text = str(int(number)) if number.is_integer() else repr(number)
    return text.casefold()


def answers_match(prediction: str | None, reference: str | None) -> bool:
    return prediction is not None and reference is not None and normalize_answer(prediction) == normalize_answer(reference)


# ---- generation ----------------------------------------------------------------------------------------------------


@dataclass
class AnswerResult:
    """Accuracy of generated answers against reference solutions, with each row's prediction."""

    exact_match: float
    format_valid: float
    n: int
    predictions: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self, with_predictions: bool = False) -> dict[str, Any]:
        values = {"exact_match": self.exact_match, "format_valid": self.format_valid, "n": self.n}
        if with_predictions:
            values["predictions"] = self.predictions
        return values


def task_prompt_and_reference(row: Any) -> tuple[str, str]:
    """(prompt the model continues, reference answer) of a Stratos row: everything before its last assistant turn."""
    system, turns = conversation_turns(row)
    return render_prompt(turns[:-1], system=system), turns[-1]["content"]


@torch.no_grad()
def generate_texts(
    model, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_new_tokens: int = 256, batch_size: int = 8,
    stop_strings: Sequence[str] | None = tuple(STOP_STRINGS), desc: str = "generating", progress: bool = True,
    templated: bool = False,
) -> list[str]:
    """Greedy continuations of `prompts` (left-padded batches) as answer text (`decode_answer`: without control
    tokens such as EOS and padding, with the Stratos markers even when they are special tokens), cut after the first
    stop string. `templated`: the prompts were rendered by the tokenizer's chat template (`data.tokenize_prompt`'s
    rule for special tokens). `progress=False` hides the progress bar named `desc`."""
    model.eval()
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    control_ids = control_token_ids(tokenizer, model)  # pad and EOS among them
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the last position of every row
    texts: list[str] = []
    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False,
                          disable=not progress or None):  # None: tqdm's "no bar on a non-terminal"
            batch = tokenize_prompt(
                tokenizer, list(prompts[start : start + batch_size]), templated=templated, return_tensors="pt",
                padding=True,
            ).to(device)
            output = model.generate(
                **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id,
                stop_strings=list(stop_strings) if stop_strings else None, tokenizer=tokenizer,
            )
            for row in output[:, batch["input_ids"].shape[1] :]:
                # A row that ended early is filled with pad_id (control tokens) after its EOS.
                texts.append(_cut_after_stop(decode_answer(tokenizer, row, control_ids), stop_strings))
    finally:
        tokenizer.padding_side = side
    return texts


def _cut_after_stop(text: str, stop_strings: Sequence[str] | None) -> str:
    # A batch runs until its last row stops; the rows that stopped earlier keep generating after their stop string.
    for stop in stop_strings or ():
        index = text.find(stop)
        if index >= 0:
            text = text[: index + len(stop)]
    return text


def evaluate_answers(
    model, tokenizer: PreTrainedTokenizerBase, rows: Sequence[Any], max_new_tokens: int = 256, batch_size: int = 8,
    desc: str = "answers", progress: bool = True,
) -> AnswerResult:
    """Greedy answers to Stratos rows: exact match of the extracted solution against the reference row's solution,
    and the rate of well-formed responses. `progress=False` hides the progress bar named `desc`."""
    pairs = [task_prompt_and_reference(row) for row in rows]
    if not pairs:
        raise ValueError("no rows to evaluate")
    outputs = generate_texts(model, tokenizer, [p for p, _ in pairs], max_new_tokens, batch_size, desc=desc,
                             progress=progress)
    predictions = []
    for (prompt, reference), output in zip(pairs, outputs):
        answer, expected = extract_solution(output), extract_solution(reference)
        if expected is None:
            expected = reference.strip()  # a reference without markers is the answer itself
        predictions.append({
            "prompt": prompt, "output": output, "answer": answer, "reference": expected,
            "correct": answers_match(answer, expected), "well_formed": is_well_formed(output),
        })
    n = len(predictions)
    return AnswerResult(
        exact_match=sum(p["correct"] for p in predictions) / n,
        format_valid=sum(p["well_formed"] for p in predictions) / n,
        n=n,
        predictions=predictions,
    )


# ---- loss -------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def validation_loss(model, dataset, pad_token_id: int, batch_size: int = 8, desc: str = "validation loss") -> dict[str, float]:
    """Token-weighted mean next-token loss over the labelled tokens of a tokenized dataset, and its perplexity.

    Uses the model's own loss (the mean over a batch's labelled tokens) weighted by the batch's labelled-token count,
    so no `[batch, seq, vocab]` logits are kept and combined and plain models are measured alike.
    """
    model.eval()
    device = next(model.parameters()).device
    collate = DataCollatorForLLMModules(pad_token_id)
    total, tokens = 0.0, 0
    for start in tqdm(range(0, len(dataset), batch_size), desc=desc, leave=False):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        batch = {k: v.to(device) for k, v in batch.items()}
        count = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        if count == 0:
            continue
        if isinstance(model, LLMModulesForCausalLM):
            batch["logits_to_keep"] = 1  # its loss needs no logits; a plain model computes them all anyway
        loss = model(**batch).loss
        total += float(loss) * count
        tokens += count
    if tokens == 0:
        raise ValueError("the dataset has no labelled tokens")
    mean = total / tokens
    return {"loss": mean, "perplexity": math.exp(min(mean, 700.0)), "tokens": tokens}


# ---- `llm-modules eval` -------------------------------------------------------------------------------------------


def load_model_for_eval(
    name_or_path: str, large_model: str | list[str] | None = None, device: str | None = None, trust_remote_code: bool = False,
    large_dtype: str | None = None, large_quantization: str | None = None, trained_quantization: str | None = None,
):
    """(model, tokenizer) of a saved combined model or of any Hugging Face causal LM (hub id or dir), in eval mode.

    `large_dtype` / `large_quantization` set a combined model's frozen part, `trained_quantization` its trained parts;
    ValueError for a plain model."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .configuration import LLMModulesConfig

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if config.model_type == LLMModulesConfig.model_type:
        model = LLMModulesForCausalLM.from_pretrained(
            name_or_path, large_model_name_or_path=large_model, dtype=dtype, trust_remote_code=trust_remote_code,
            large_dtype=large_dtype, large_quantization=large_quantization, trained_quantization=trained_quantization,
        )
        tokenizer = model.tokenizer
        if tokenizer is None:
            raise ValueError(f"{name_or_path}: no tokenizer saved with the combined model")
    elif large_dtype or large_quantization or trained_quantization:
        raise ValueError("--large-dtype/--large-quantization/--trained-quantization set the parts of a combined model; "
                         "this is a plain causal LM")
    else:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # batching only: the attention mask hides padding
    return model.to(device).eval(), tokenizer


def has_solution(row: Any) -> bool:
    """Whether a row's reference answer has a Stratos solution section to compare generated answers with."""
    try:
        _, reference = task_prompt_and_reference(row)
    except ValueError:
        return False
    return extract_solution(reference) is not None


def evaluate_dataset(
    model, tokenizer: PreTrainedTokenizerBase, rows: Sequence[Any], *, max_new_tokens: int = 1024, batch_size: int = 8,
    max_length: int | None = 4096, generate: bool = True,
) -> dict[str, Any]:
    """Validation loss and perplexity on the assistant tokens of `rows`, and, for rows whose reference has a solution
    section, greedy-answer accuracy (`AnswerResult`). Invalid rows are skipped and counted, as in training."""
    from .data import build_dataset

    dataset, report = build_dataset(rows, tokenizer, max_length=max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    results: dict[str, Any] = {
        "rows": report.rows, "invalid_rows": len(report.invalid), "too_long": report.too_long,
        **{f"validation_{k}": v for k, v in validation_loss(model, dataset, pad_id, batch_size).items()},
    }
    answerable = [row for row in rows if has_solution(row)]
    if generate and answerable:
        answers = evaluate_answers(model, tokenizer, answerable, max_new_tokens=max_new_tokens, batch_size=batch_size)
        results["answers"] = answers.to_dict(with_predictions=True)
    return results


def first_rows(rows: Sequence[Any], limit: int | None) -> list[Any]:
    """The first `limit` rows (all when None) of a list or a `datasets.Dataset`, as a list."""
    count = len(rows) if limit is None else min(limit, len(rows))
    return [rows[i] for i in range(count)]


def write_json(path: Path, data: Any) -> None:
    """Write `data` as JSON so that `path` is either absent or whole (temp file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
