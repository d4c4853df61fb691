"""Stratos rows -> the paper's prompt layout -> token ids and labels."""

from __future__ import annotations

import codecs
import difflib
import json
import logging
import os
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from .presets import check_option
from .sources import looks_like_path

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
# The answer format's markers (Bespoke-Stratos): answer text, never control tokens, whatever a tokenizer calls them.
ANSWER_MARKERS = ("<|begin_of_thought|>", "<|end_of_thought|>", "<|begin_of_solution|>", "<|end_of_solution|>")
STOP_STRINGS = [ANSWER_MARKERS[-1]]


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


def tokenize_prompt(
    tokenizer: PreTrainedTokenizerBase, text: str | list[str], *, templated: bool = False, **kwargs: Any
) -> Any:
    """`tokenizer(text, **kwargs)` under the one rule for special tokens in a prompt, kept by training, evaluation,
    generation and serving alike: text laid out without a chat template (the training layout of `render_prompt`, a
    completion prompt, a raw text prompt) gets the tokenizer's own special tokens (its BOS when it adds one, as
    `tokenizer(text)` and vLLM's completions do); text a chat template rendered (`templated=True`) gets none, because
    the template writes its own BOS (as `apply_chat_template(tokenize=True)` and vLLM's chat completions do).

    Returns the tokenizer's `BatchEncoding` (`input_ids` a list, or a list per text for a list of texts).
    """
    return tokenizer(text, add_special_tokens=not templated, **kwargs)


# ---- rows -> token ids and labels ------------------------------------------------------------------------------

DEFAULT_DATASET = "bespokelabs/Bespoke-Stratos-17k"
LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet")
# A name ending in a dot and letters is a file name (`rows.jsonll`, `rows.csv`, `rows.txt`): a hub id's dots are in
# version numbers (`Qwen2.5-Math`, `tulu-v2.5`), never before a final run of letters.
FILE_NAME = re.compile(r"\.[A-Za-z]+$")
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


class DataFileError(ValueError):
    """A local data file that cannot be read as rows: not UTF-8, a broken JSON array, a type we do not read."""


class DatasetNotFoundError(FileNotFoundError):
    """A dataset name that can only be a local path but does not exist, or a hub id not cached while offline."""


@dataclass
class DataReport:
    """What happened to the rows, from reading to the split, and where they came from (the model card shows it)."""

    source: str | None = None  # a hub id or an absolute path; None: rows given in memory
    split: str | None = None  # hub datasets: the split read
    revision: str | None = None
    rows: int = 0
    invalid: list[tuple[int, str]] = field(default_factory=list)  # (row number, reason)
    subset: float = 1.0
    drawn: int = 0  # valid rows in the subset
    max_length: int | None = None
    too_long: int = 0
    loss_on: str = "assistant"
    seed: int | None = None  # of the subset and the split
    train: int = 0
    validation: int = 0
    system_prompt: str | None = None  # the system prompt of every example kept; None when they differ

    @property
    def valid(self) -> int:
        return self.rows - len(self.invalid)

    @property
    def kept(self) -> int:
        """Examples left after the subset and the length filter."""
        return self.drawn - self.too_long

    def summary(self) -> str:
        """One line: `47 rows read, 42 valid, 5 skipped (row 21: ..., row 22: ...); subset 30%: 13; 1 over 4096 tokens
        dropped; 11 train / 1 validation` (the subset, dropped and split parts only when they apply)."""
        read = f"{_count(self.rows, 'row')} read, {self.valid} valid"
        if self.invalid:
            shown = ", ".join(f"row {row}: {reason}" for row, reason in self.invalid[:SHOWN_BAD_ROWS])
            more = f", and {len(self.invalid) - SHOWN_BAD_ROWS} more" if len(self.invalid) > SHOWN_BAD_ROWS else ""
            read += f", {len(self.invalid)} skipped ({shown}{more})"
        parts = [read]
        if self.subset < 1:
            parts.append(f"subset {self.subset * 100:g}%: {self.drawn}")
        if self.too_long:
            parts.append(f"{self.too_long} over {self.max_length} tokens dropped")
        if self.train or self.validation:
            parts.append(f"{self.train} train / {self.validation} validation")
        else:
            parts.append(_count(self.kept, "example"))
        return "; ".join(parts)


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


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

    The ids are the prompt of the last answer (`render_prompt(turns before it)`, tokenized exactly as generation
    tokenizes it), then the last answer tokenized on its own, then the EOS id. The two are tokenized apart because a
    BPE can merge across their boundary: SmolLM2's tokenizer reads the prompt's closing "\n\n" as two tokens before
    "<|begin_of_thought|>" but as one at the end of a prompt, so a model trained on the whole text at once never saw
    the prompt it is asked with. `loss_on="assistant"` labels the assistant turns' tokens (earlier ones found by
    character offsets within the prompt) and the final EOS (everything else is -100); `loss_on="all"` labels every
    token (the paper's code).
    """
    if loss_on not in ("assistant", "all"):
        raise ValueError(f"loss_on must be 'assistant' or 'all', got {loss_on!r}")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token: the model could not learn to stop")
    system, turns = conversation_turns(row)
    text = render_turn("system", system)
    spans = []  # character spans of the earlier assistant turns, within the prompt
    for turn in turns[:-1]:
        if turn["role"] == "assistant":
            start = len(text) + len(f"{ROLE_HEADERS['assistant']}\n\n")
            spans.append((start, start + len(turn["content"])))
        text += render_turn(turn["role"], turn["content"])
    text += f"{ROLE_HEADERS['assistant']}\n\n"  # = render_prompt(turns[:-1], system), what generation continues
    prompt = tokenize_prompt(tokenizer, text, return_offsets_mapping=True)  # a special token's offsets are empty
    answer = list(tokenizer(turns[-1]["content"], add_special_tokens=False)["input_ids"])
    input_ids = list(prompt["input_ids"]) + answer
    if loss_on == "all":
        labels = list(input_ids)
    else:
        labels = [
            token if end > start and any(start < span_end and end > span_start for span_start, span_end in spans) else IGNORE_INDEX
            for token, (start, end) in zip(prompt["input_ids"], prompt["offset_mapping"])
        ] + answer
    if not input_ids or input_ids[-1] != tokenizer.eos_token_id:
        input_ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)  # the paper's code never learns EOS, so its model cannot stop
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def check_rows(rows: Sequence[Any], strict: bool = False) -> tuple[list[int], list[tuple[int, str]]]:
    """(positions of the valid rows, `(row number, reason)` of the invalid ones), every row looked at.

    With `strict` the first invalid row raises `InvalidRowError` carrying its 1-based row number.
    """
    valid, invalid = [], []
    for position, row in enumerate(rows):
        try:
            conversation_turns(row)
        except InvalidRowError as error:
            if strict:
                raise InvalidRowError(error.reason, position + 1) from None
            invalid.append((position + 1, error.reason))
        else:
            valid.append(position)
    return valid, invalid


def _examples(
    rows: Sequence[Any], report: DataReport, positions: list[int], tokenizer: PreTrainedTokenizerBase
) -> datasets.Dataset:
    """The valid rows at `positions`, encoded; examples longer than `report.max_length` are dropped and counted in
    `report`. Raises `EmptyDatasetError` when nothing is left."""
    report.drawn = len(positions)
    columns: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
    systems = set()
    for position in positions:
        example = encode_conversation(rows[position], tokenizer, report.loss_on)
        if report.max_length is not None and len(example["input_ids"]) > report.max_length:
            report.too_long += 1
            continue
        systems.add(conversation_turns(rows[position])[0])
        for key in columns:
            columns[key].append(example[key])
    if report.kept == 0:
        raise EmptyDatasetError(f"no usable examples: {report.summary()}")
    report.system_prompt = systems.pop() if len(systems) == 1 else None
    return datasets.Dataset.from_dict(columns)


def build_dataset(
    rows: Sequence[Any],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int | None = 4096,
    loss_on: str = "assistant",
    strict: bool = False,
) -> tuple[datasets.Dataset, DataReport]:
    """Tokenize rows (a list of dicts or a `datasets.Dataset`) into a `datasets.Dataset` of input_ids/attention_mask/labels.

    Every row is checked first: invalid rows are skipped and counted (a warning names the first few); with `strict`
    the first one raises `InvalidRowError`. Examples longer than `max_length` tokens are dropped and counted.
    Raises `EmptyDatasetError` when nothing is left.
    """
    report = DataReport(rows=len(rows), max_length=max_length, loss_on=loss_on)
    valid, report.invalid = check_rows(rows, strict)
    dataset = _examples(rows, report, valid, tokenizer)
    if report.invalid or report.too_long:
        logger.warning(report.summary())
    return dataset, report


def resolve_dataset_source(name: str | os.PathLike, what: str = "dataset") -> str:
    """The absolute path of a local dataset file or directory, or `name` unchanged when it can only be a hub id.

    Raises `DatasetNotFoundError` (naming the closest file name in that folder, if any) when `name` does not exist
    but can only be a path: `sources.looks_like_path` says so, or it ends in a file suffix (`.jsonll`, `.csv`; see
    `FILE_NAME`). Without this, `datasets` would ask the hub for it, retrying for half a minute.
    """
    text = str(name)
    path = Path(text).expanduser()
    if path.exists():
        return str(path.resolve())
    if not (looks_like_path(text) or FILE_NAME.search(text)):
        return text
    folder = path.parent
    close = difflib.get_close_matches(path.name, [p.name for p in folder.iterdir()], n=1, cutoff=0.8) if folder.is_dir() else []
    hint = f" (did you mean {folder / close[0]}?)" if close else ""
    raise DatasetNotFoundError(f"{what} {text}: no such file or directory{hint}")


def load_rows(source: str | os.PathLike, split: str = "train", revision: str | None = None) -> Sequence[Any]:
    """Rows of a local .json/.jsonl/.parquet file or directory of them, or of a hub dataset id (`datasets.load_dataset`).

    Local JSON reads as `datasets.load_dataset("json")` reads it: UTF-8 with or without a BOM, LF or CRLF line ends,
    blank lines ignored, a JSON array or JSON Lines whatever the suffix. It is parsed with the `json` module, not
    `datasets`, because Arrow needs one schema and would refuse the whole file over one malformed row; the bad-row
    policy needs each row as it is. A line of JSON Lines that does not parse becomes a row that is reported as invalid.

    Raises `DatasetNotFoundError` for a missing path (see `resolve_dataset_source`) or a hub id that is not cached
    while offline (`HF_HUB_OFFLINE`), `DataFileError` for a file that cannot be read as rows.
    """
    name = resolve_dataset_source(source)
    path = Path(name)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_SUFFIXES and p.is_file())
        if not files:
            raise DatasetNotFoundError(f"no .json, .jsonl or .parquet files in dataset directory {path}")
        rows: list[Any] = []
        for file in files:
            rows.extend(_read_local_file(file))
        return rows
    if path.is_file():
        return _read_local_file(path)
    try:
        return datasets.load_dataset(name, split=split, revision=revision)
    except ConnectionError as error:  # what `datasets` raises offline for a dataset it has not cached
        if not datasets.config.HF_HUB_OFFLINE:
            raise
        raise DatasetNotFoundError(
            f"dataset {name}: not in the local cache and offline mode is on (HF_HUB_OFFLINE); download it once with "
            f"network access, or give a local .json, .jsonl or .parquet file"
        ) from error


def _read_local_file(path: Path) -> Sequence[Any]:
    if path.suffix not in LOCAL_SUFFIXES:
        raise DataFileError(f"{path}: unsupported dataset file type {path.suffix!r} (expected .json, .jsonl or .parquet)")
    if path.suffix == ".parquet":
        try:
            return datasets.Dataset.from_parquet(str(path))
        except Exception as error:
            raise DataFileError(f"cannot read {path} as Parquet: {error}") from error
    text = _utf8_text(path)
    try:
        whole = json.loads(text)
    except json.JSONDecodeError as error:
        if text.lstrip().startswith("["):  # an array with a mistake: its lines are no rows of their own
            raise DataFileError(f"{path}: not valid JSON (line {error.lineno}, column {error.colno}: {error.msg})") from None
        whole = None  # JSON Lines
    if isinstance(whole, list):
        return whole
    if whole is not None and path.suffix == ".json":
        raise DataFileError(f"{path}: expected a JSON array of rows (or JSON Lines), got a {type(whole).__name__}")
    rows: list[Any] = []
    # Split on "\n" only: str.splitlines would also split at U+2028, \x0b, \x85 ..., which JSON strings may hold raw.
    # A CRLF line keeps its "\r", which JSON ignores as whitespace.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            rows.append(_UnparsableLine(f"invalid JSON on line {number} ({error.msg}, column {error.colno})"))
    return rows


def _utf8_text(path: Path) -> str:
    """The text of a UTF-8 file, a leading BOM dropped, as `datasets` reads JSON (it refuses UTF-16 too).

    Raises `DataFileError` for a file that cannot be read or is not UTF-8, naming the file, the encoding problem and
    its line.
    """
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DataFileError(f"cannot read {path}: {error.strerror}") from None
    # JSON text never holds a NUL byte; UTF-16 and UTF-32 text of ASCII characters always does.
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) or b"\x00" in raw[:4096]:
        raise DataFileError(f"{path}: UTF-16 or UTF-32 text; save it as UTF-8 (as `datasets` also needs)")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise DataFileError(
            f"{path}: not UTF-8 (byte 0x{raw[error.start]:02x} on line {line}); save it as UTF-8 (as `datasets` also needs)"
        ) from None


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
    """Read and check every row, draw the subset, tokenize, drop long examples, split once: `(train, validation or
    None, report)`; the report's summary is logged.

    `source` is a hub id, a local file or dir (see `load_rows`) or rows already in memory. Every row is checked before
    anything is drawn, so the counts cover the whole source and `strict` stops at its first invalid row. The subset
    (a fraction of the valid rows) and the validation split (a fraction of the kept examples) are drawn once from
    `seed`, so the same arguments always give the same split; the paper's code re-drew them and validated on
    trained examples.

    Raises `ValueError` for a subset or val_split out of range, `InvalidRowError` (strict), `EmptyDatasetError`, and
    the errors of `load_rows`.
    """
    for name, value in (("subset", subset), ("val_split", val_split)):
        try:
            check_option(name, value)
        except ValueError as error:
            raise ValueError(f"{name} {error}") from None
    report = DataReport(subset=subset, max_length=max_length, loss_on=loss_on, seed=seed)
    if isinstance(source, (str, os.PathLike)):
        report.source = resolve_dataset_source(source)
        if not Path(report.source).exists():
            report.split, report.revision = split, revision
        rows = load_rows(report.source, split, revision)
    else:
        rows = source
    report.rows = len(rows)
    valid, report.invalid = check_rows(rows, strict)
    if subset < 1 and valid:
        valid = sorted(random.Random(seed).sample(valid, max(1, round(len(valid) * subset))))
    dataset = _examples(rows, report, valid, tokenizer)
    n_val = round(len(dataset) * val_split)
    if val_split > 0 and len(dataset) >= 2:
        n_val = max(1, n_val)
    if n_val >= len(dataset) and n_val > 0:
        raise EmptyDatasetError(f"val_split={val_split} leaves no training example: {report.summary()}")
    if n_val == 0:
        train, validation = dataset, None
    else:
        parts = dataset.train_test_split(test_size=n_val, seed=seed, shuffle=True)
        train, validation = parts["train"], parts["test"]
    report.train, report.validation = len(train), len(validation) if validation is not None else 0
    logger.log(logging.WARNING if report.invalid or report.too_long else logging.INFO, report.summary())
    return train, validation, report


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
