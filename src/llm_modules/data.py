"""Stratos rows -> the paper's prompt layout -> token ids and labels."""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
from transformers import PreTrainedTokenizerBase

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


# ---- rows -> token ids and labels ------------------------------------------------------------------------------

DEFAULT_DATASET = "bespokelabs/Bespoke-Stratos-17k"
LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet")
# ShareGPT-style names some copies of the schema use for the same two roles.
ROLE_ALIASES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}
IGNORE_INDEX = -100
SHOWN_BAD_ROWS = 5

logger = logging.getLogger(__name__)


class InvalidRowError(ValueError):
    """A row that is not a usable conversation; `row` is its 1-based number in the source, `reason` says why."""

    def __init__(self, reason: str, row: int | None = None):
        self.row, self.reason = row, reason
        super().__init__(f"row {row}: {reason}" if row is not None else reason)


class EmptyDatasetError(ValueError):
    """No example is left after skipping invalid rows and filtering long ones."""


@dataclass
class DataReport:
    """What happened to the source rows: how many were read, skipped as invalid, filtered as too long, kept."""

    rows: int = 0
    invalid: list[tuple[int, str]] = field(default_factory=list)  # (row number, reason)
    too_long: int = 0
    kept: int = 0
    train: int = 0
    validation: int = 0

    def lines(self) -> list[str]:
        out = [f"{self.rows} rows read, {self.kept} kept"]
        if self.invalid:
            shown = "; ".join(f"row {row}: {reason}" for row, reason in self.invalid[:SHOWN_BAD_ROWS])
            more = f" (and {len(self.invalid) - SHOWN_BAD_ROWS} more)" if len(self.invalid) > SHOWN_BAD_ROWS else ""
            out.append(f"skipped {len(self.invalid)} invalid rows: {shown}{more}")
        if self.too_long:
            out.append(f"filtered {self.too_long} examples longer than max_length")
        if self.train or self.validation:
            out.append(f"split: {self.train} train, {self.validation} validation")
        return out


@dataclass(frozen=True)
class _UnparsableLine:
    """A JSON Lines line that is not JSON, kept as a row so it is reported with its number."""

    error: str


def conversation_turns(row: Any) -> tuple[str, list[dict[str, str]]]:
    """(system prompt, turns as `{"role", "content"}`) of a Stratos row, up to its last assistant turn.

    Raises `InvalidRowError` (without a row number) naming what is wrong. Turns after the last assistant turn are
    dropped: nothing after them is predicted.
    """
    if isinstance(row, _UnparsableLine):
        raise InvalidRowError(row.error)
    if not isinstance(row, Mapping):
        raise InvalidRowError(f"not an object (got {type(row).__name__})")
    system = row.get("system")
    if system is not None and not isinstance(system, str):
        raise InvalidRowError(f"'system' is not a string (got {type(system).__name__})")
    conversations = row.get("conversations")
    if not isinstance(conversations, Sequence) or isinstance(conversations, str) or len(conversations) == 0:
        problem = "missing" if conversations is None else "empty" if not conversations else f"a {type(conversations).__name__}"
        raise InvalidRowError(f"'conversations' is {problem} (expected a non-empty list of turns)")
    turns = []
    for number, turn in enumerate(conversations, start=1):
        if not isinstance(turn, Mapping):
            raise InvalidRowError(f"turn {number} is not an object (got {type(turn).__name__})")
        role = ROLE_ALIASES.get(turn.get("from")) if isinstance(turn.get("from"), str) else None
        if role is None:
            raise InvalidRowError(f"turn {number} has unknown role {turn.get('from')!r} (expected 'user' or 'assistant')")
        value = turn.get("value")
        if not isinstance(value, str):
            raise InvalidRowError(f"turn {number} 'value' is not a string (got {type(value).__name__})")
        if role == "system":
            system = value  # a system turn overrides the row's field, as in render_prompt
        else:
            turns.append({"role": role, "content": value})
    last_assistant = max((i for i, t in enumerate(turns) if t["role"] == "assistant"), default=None)
    if last_assistant is None:
        raise InvalidRowError("no assistant turn")
    return (system if system is not None else DEFAULT_SYSTEM_PROMPT), turns[: last_assistant + 1]


def encode_conversation(row: Any, tokenizer: PreTrainedTokenizerBase, loss_on: str = "assistant") -> dict[str, list[int]]:
    """Token ids, attention mask and labels of one Stratos row in the paper's layout, with EOS appended.

    The text is `render_prompt(turns before the last answer) + last answer`, exactly what generation sees before its
    answer, then the EOS id. `loss_on="assistant"` labels the assistant turns' tokens and the final EOS (everything
    else is -100); `loss_on="all"` labels every token (the paper's code). The whole text is tokenized at once and
    labels come from character offsets, so the prompt tokenizes as it does at generation time.
    """
    if loss_on not in ("assistant", "all"):
        raise ValueError(f"loss_on must be 'assistant' or 'all', got {loss_on!r}")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token: the model could not learn to stop")
    system, turns = conversation_turns(row)
    text = render_turn("system", system)
    spans = []
    for index, turn in enumerate(turns):
        if turn["role"] == "user":
            text += render_turn("user", turn["content"])
            continue
        text += f"{ROLE_HEADERS['assistant']}\n\n"
        spans.append((len(text), len(text) + len(turn["content"])))
        text += turn["content"]
        if index < len(turns) - 1:
            text += "\n\n"
    encoded = tokenizer(text, return_offsets_mapping=True)
    input_ids = list(encoded["input_ids"])
    if loss_on == "all":
        labels = list(input_ids)
    else:
        labels = [
            token if end > start and any(start < span_end and end > span_start for span_start, span_end in spans) else IGNORE_INDEX
            for token, (start, end) in zip(input_ids, encoded["offset_mapping"])
        ]
    if not input_ids or input_ids[-1] != tokenizer.eos_token_id:
        input_ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)  # the paper's code never learns EOS, so its model cannot stop
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def build_dataset(
    rows: Sequence[Any],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int | None = 4096,
    loss_on: str = "assistant",
    strict: bool = False,
    row_numbers: Sequence[int] | None = None,
) -> tuple[datasets.Dataset, DataReport]:
    """Tokenize rows (a list of dicts or a `datasets.Dataset`) into a `datasets.Dataset` of input_ids/attention_mask/labels.

    Invalid rows are skipped and counted (logged with the first few row numbers and reasons); with `strict` the first
    one raises `InvalidRowError`. Examples longer than `max_length` tokens are filtered and counted. `row_numbers`
    are the rows' 1-based numbers in their source (default: 1, 2, ...). Raises `EmptyDatasetError` when nothing is left.
    """
    report = DataReport()
    columns: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
    for position, row in enumerate(rows):
        number = row_numbers[position] if row_numbers is not None else position + 1
        report.rows += 1
        try:
            example = encode_conversation(row, tokenizer, loss_on)
        except InvalidRowError as error:
            if strict:
                raise InvalidRowError(error.reason, number) from None
            report.invalid.append((number, error.reason))
            continue
        if max_length is not None and len(example["input_ids"]) > max_length:
            report.too_long += 1
            continue
        for key in columns:
            columns[key].append(example[key])
    report.kept = len(columns["input_ids"])
    if report.invalid:
        logger.warning(report.lines()[1])
    if report.too_long:
        logger.warning(f"filtered {report.too_long} examples longer than max_length={max_length} tokens")
    if report.kept == 0:
        raise EmptyDatasetError(
            f"no usable examples: {report.rows} rows, {len(report.invalid)} invalid, {report.too_long} longer than "
            f"max_length={max_length}"
        )
    return datasets.Dataset.from_dict(columns), report


def load_rows(source: str | os.PathLike, split: str = "train", revision: str | None = None) -> Sequence[Any]:
    """Rows of a hub dataset id (via `datasets.load_dataset`) or of a local .json/.jsonl/.parquet file or directory.

    Local JSON is parsed with the `json` module, not `datasets`, because Arrow needs one schema and would refuse the
    whole file over one malformed row; the bad-row policy needs each row as it is. A line of JSON Lines that does not
    parse becomes a row that `build_dataset` reports as invalid.
    """
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_SUFFIXES and p.is_file())
        if not files:
            raise FileNotFoundError(f"no .json, .jsonl or .parquet files in dataset directory {path}")
        rows: list[Any] = []
        for file in files:
            rows.extend(_read_local_file(file))
        return rows
    if path.is_file():
        return _read_local_file(path)
    if path.suffix in LOCAL_SUFFIXES or path.is_absolute() or str(source).startswith("."):
        raise FileNotFoundError(f"dataset file or directory not found: {path}")
    return datasets.load_dataset(str(source), split=split, revision=revision)


def _read_local_file(path: Path) -> Sequence[Any]:
    if path.suffix not in LOCAL_SUFFIXES:
        raise ValueError(f"{path}: unsupported dataset file type {path.suffix!r} (expected .json, .jsonl or .parquet)")
    if path.suffix == ".parquet":
        try:
            return datasets.Dataset.from_parquet(str(path))
        except Exception as error:
            raise ValueError(f"cannot read {path} as Parquet: {error}") from error
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read {path}: {error}") from error
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None  # maybe JSON Lines under a .json name, as `datasets` also accepts
        if data is not None:
            if not isinstance(data, list):
                raise ValueError(f"{path}: expected a JSON array of rows (or JSON Lines), got a {type(data).__name__}")
            return data
    rows = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            rows.append(_UnparsableLine(f"invalid JSON ({error})"))
    return rows


def prepare_datasets(
    source: str | os.PathLike | Sequence[Any],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int | None = 4096,
    subset: float = 1.0,
    val_split: float = 0.1,
    seed: int = 42,
    loss_on: str = "assistant",
    strict: bool = False,
    split: str = "train",
    revision: str | None = None,
) -> tuple[datasets.Dataset, datasets.Dataset | None, DataReport]:
    """Load, draw the subset, tokenize, filter and split once: `(train, validation or None, report)`.

    `source` is a hub id, a local file or dir (see `load_rows`) or rows already in memory. The subset (a fraction of
    the rows) and the validation split (a fraction of the kept examples) are drawn once from `seed`, so the same
    arguments always give the same split; the paper's code re-drew them and validated on trained examples.
    """
    if not 0 < subset <= 1:
        raise ValueError(f"subset must be a fraction in (0, 1], got {subset}")
    if not 0 <= val_split < 1:
        raise ValueError(f"val_split must be a fraction in [0, 1), got {val_split}")
    rows = load_rows(source, split, revision) if isinstance(source, (str, os.PathLike)) else source
    indices = list(range(len(rows)))
    if subset < 1:
        indices = sorted(random.Random(seed).sample(indices, max(1, round(len(indices) * subset))))
        rows = rows.select(indices) if isinstance(rows, datasets.Dataset) else [rows[i] for i in indices]
    dataset, report = build_dataset(
        rows, tokenizer, max_length=max_length, loss_on=loss_on, strict=strict, row_numbers=[i + 1 for i in indices]
    )
    n_val = round(len(dataset) * val_split)
    if val_split > 0 and len(dataset) >= 2:
        n_val = max(1, n_val)
    if n_val == 0:
        report.train = len(dataset)
        return dataset, None, report
    if n_val >= len(dataset):
        raise EmptyDatasetError(f"val_split={val_split} leaves no training example out of {len(dataset)}")
    parts = dataset.train_test_split(test_size=n_val, seed=seed, shuffle=True)
    report.train, report.validation = len(parts["train"]), len(parts["test"])
    return parts["train"], parts["test"], report


# ---- batches -----------------------------------------------------------------------------------------------------


@dataclass
class DataCollatorForLLMModules:
    """Right-pads a list of examples into a batch; also pads `large_hidden_states` rows from the feature cache.

    Labels are masked where the attention mask is 0, never by comparing with the pad id: the pad id may equal EOS,
    and EOS must be learned. Hand-written because `DataCollatorForSeq2Seq` cannot pad the `[seq, D]` feature rows.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        length = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {
            "input_ids": torch.full((len(features), length), self.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros(len(features), length, dtype=torch.long),
            "labels": torch.full((len(features), length), IGNORE_INDEX, dtype=torch.long),
        }
        with_features = "large_hidden_states" in features[0]
        if with_features:
            first = features[0]["large_hidden_states"]
            batch["large_hidden_states"] = torch.zeros(len(features), length, first.shape[-1], dtype=first.dtype)
        for i, feature in enumerate(features):
            n = len(feature["input_ids"])
            batch["input_ids"][i, :n] = torch.as_tensor(feature["input_ids"])
            batch["attention_mask"][i, :n] = torch.as_tensor(feature.get("attention_mask", [1] * n))
            labels = feature.get("labels", feature["input_ids"])
            batch["labels"][i, :n] = torch.as_tensor(labels)
            if with_features:
                batch["large_hidden_states"][i, :n] = feature["large_hidden_states"]
        batch["labels"][batch["attention_mask"] == 0] = IGNORE_INDEX
        return batch
