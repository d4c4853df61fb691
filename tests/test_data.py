"""Stratos rows -> the paper's layout -> token ids and labels; the bad-row policy; loading; subset and split; padding."""

from __future__ import annotations

import json
import logging

import datasets
import pytest
import torch
from transformers import AutoTokenizer

from llm_modules.data import (
    DEFAULT_SYSTEM_PROMPT,
    IGNORE_INDEX,
    DataCollatorForLLMModules,
    DataFileError,
    DatasetNotFoundError,
    EmptyDatasetError,
    InvalidRowError,
    build_dataset,
    encode_conversation,
    load_rows,
    prepare_datasets,
    render_prompt,
    resolve_dataset_source,
)


def row(question="what is 2 plus 3?", answer="<|begin_of_solution|> 5 <|end_of_solution|>", system="Be brief."):
    out = {"conversations": [{"from": "user", "value": question}, {"from": "assistant", "value": answer}]}
    if system is not None:
        out["system"] = system
    return out


@pytest.fixture(scope="module")
def tokenizer(tiny_dirs):
    return AutoTokenizer.from_pretrained(tiny_dirs["qwen2"])


def labelled_text(example, tokenizer) -> str:
    return tokenizer.decode([t for t in example["labels"] if t != IGNORE_INDEX])


def test_layout_matches_the_generation_prompt_and_eos_is_learned(tokenizer):
    example = encode_conversation(row(), tokenizer)
    prompt = render_prompt([{"role": "user", "content": "what is 2 plus 3?"}], system="Be brief.")
    assert prompt == "System:\n\nBe brief.\n\nUser:\n\nwhat is 2 plus 3?\n\nAssistant:\n\n"
    assert tokenizer.decode(example["input_ids"]) == prompt + "<|begin_of_solution|> 5 <|end_of_solution|><|endoftext|>"
    # The prompt tokens are exactly what generation is given.
    assert example["input_ids"][: len(tokenizer(prompt)["input_ids"])] == tokenizer(prompt)["input_ids"]
    assert example["input_ids"][-1] == example["labels"][-1] == tokenizer.eos_token_id
    assert labelled_text(example, tokenizer) == "<|begin_of_solution|> 5 <|end_of_solution|><|endoftext|>"
    assert example["attention_mask"] == [1] * len(example["input_ids"])


def test_loss_on_all_labels_every_token(tokenizer):
    example = encode_conversation(row(), tokenizer, loss_on="all")
    assert example["labels"] == example["input_ids"]
    with pytest.raises(ValueError, match="loss_on"):
        encode_conversation(row(), tokenizer, loss_on="prompt")


def test_default_system_prompt_when_the_row_has_none(tokenizer):
    text = tokenizer.decode(encode_conversation(row(system=None), tokenizer)["input_ids"])
    assert text.startswith(f"System:\n\n{DEFAULT_SYSTEM_PROMPT}\n\nUser:")


def test_multi_turn_keeps_order_and_labels_every_assistant_turn(tokenizer):
    conversation = {
        "system": "S",
        "conversations": [
            {"from": "user", "value": "first question"},
            {"from": "assistant", "value": "first answer"},
            {"from": "user", "value": "second question"},
            {"from": "assistant", "value": "second answer"},
            {"from": "user", "value": "never answered"},
        ],
    }
    example = encode_conversation(conversation, tokenizer)
    history = [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "second question"},
    ]
    # The trailing unanswered user turn is dropped: nothing after it is predicted.
    assert tokenizer.decode(example["input_ids"]) == render_prompt(history, system="S") + "second answer<|endoftext|>"
    assert labelled_text(example, tokenizer) == "first answersecond answer<|endoftext|>"


def test_unicode_survives_the_round_trip(tokenizer):
    answer = "Größe: 数学 🙂 naïve café"
    example = encode_conversation(row(question="¿qué? — 数学", answer=answer), tokenizer)
    assert labelled_text(example, tokenizer) == answer + "<|endoftext|>"
    assert "¿qué? — 数学" in tokenizer.decode(example["input_ids"])


BAD_ROWS = [
    ("not an object", ["a", "list"]),
    ("'conversations' is missing", {"system": "x"}),
    ("'conversations' is empty", {"conversations": []}),
    ("unknown role 'bot'", {"conversations": [{"from": "bot", "value": "hi"}]}),
    ("'value' is not a string (got int)", {"conversations": [{"from": "user", "value": 3}]}),
    ("no assistant turn", {"conversations": [{"from": "user", "value": "hi"}]}),
    ("'system' is not a string", {**row(), "system": 7}),
]


def test_invalid_rows_are_skipped_counted_and_named(tokenizer, caplog):
    rows = [row()] + [bad for _, bad in BAD_ROWS] + [row(question="another")]
    with caplog.at_level(logging.WARNING, logger="llm_modules.data"):
        dataset, report = build_dataset(rows, tokenizer)
    assert len(dataset) == report.kept == 2
    assert report.rows == 9
    assert [number for number, _ in report.invalid] == list(range(2, 9))
    for (expected, _), (_, reason) in zip(BAD_ROWS, report.invalid):
        assert expected in reason
    warning = caplog.text
    assert "9 rows read, 2 valid, 7 skipped (row 2: not an object (got list), row 3:" in warning
    assert ", and 2 more); 2 examples" in warning


def test_strict_stops_at_the_first_invalid_row_with_its_number(tokenizer):
    rows = [row(), row(), {"conversations": [{"from": "robot", "value": "x"}]}, 5]
    with pytest.raises(InvalidRowError, match=r"row 3: turn 1 has unknown role 'robot'") as caught:
        build_dataset(rows, tokenizer, strict=True)
    assert caught.value.row == 3


def test_long_examples_are_filtered_and_an_empty_result_is_an_error(tokenizer, caplog):
    short, long = row(answer="5"), row(answer="word " * 200)
    limit = len(encode_conversation(short, tokenizer)["input_ids"])
    with caplog.at_level(logging.WARNING, logger="llm_modules.data"):
        dataset, report = build_dataset([short, long, long], tokenizer, max_length=limit)
    assert len(dataset) == 1 and report.too_long == 2
    assert f"3 rows read, 3 valid; 2 over {limit} tokens dropped; 1 example" in caplog.text
    with pytest.raises(EmptyDatasetError, match=rf"3 rows read, 2 valid, 1 skipped .*; 2 over {limit} tokens dropped"):
        build_dataset([long, long, 5], tokenizer, max_length=limit)


def test_load_rows_from_json_jsonl_parquet_and_a_directory(tmp_path):
    rows = [row(question=f"q{i}") for i in range(4)]
    (tmp_path / "a.json").write_text(json.dumps(rows[:2]))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows[2:]) + "\n\n{not json\n")
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "c.parquet"))
    assert load_rows(tmp_path / "a.json") == rows[:2]
    jsonl = load_rows(tmp_path / "b.jsonl")
    assert jsonl[:2] == rows[2:] and len(jsonl) == 3  # the blank line is no row; the broken one is a row to report
    parquet = load_rows(tmp_path / "c.parquet")
    assert [r["conversations"][0]["value"] for r in parquet] == ["q0", "q1", "q2", "q3"]
    assert len(load_rows(tmp_path)) == 2 + 3 + 4


def test_unparsable_json_line_is_an_invalid_row(tmp_path, tokenizer):
    (tmp_path / "d.jsonl").write_text(json.dumps(row()) + "\n\n{broken\n")  # line 3 is the second row
    _, report = build_dataset(load_rows(tmp_path / "d.jsonl"), tokenizer)
    assert report.invalid[0][0] == 2 and report.invalid[0][1].startswith("invalid JSON on line 3 (")


def test_load_rows_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_rows(tmp_path / "missing.jsonl")
    (tmp_path / "obj.json").write_text('{"conversations": []}')
    with pytest.raises(ValueError, match=r"obj.json: expected a JSON array"):
        load_rows(tmp_path / "obj.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .json, .jsonl or .parquet files"):
        load_rows(tmp_path / "empty")


def test_subset_and_split_are_drawn_once_from_the_seed(tokenizer):
    rows = [row(question=f"question number {i}") for i in range(40)]
    train, val, report = prepare_datasets(rows, tokenizer, subset=0.5, val_split=0.25, seed=3)
    assert (len(train), len(val)) == (15, 5) and (report.train, report.validation) == (15, 5)
    again_train, again_val, _ = prepare_datasets(rows, tokenizer, subset=0.5, val_split=0.25, seed=3)
    assert again_train["input_ids"] == train["input_ids"] and again_val["input_ids"] == val["input_ids"]
    assert not {tuple(x) for x in train["input_ids"]} & {tuple(x) for x in val["input_ids"]}
    other_train, _, _ = prepare_datasets(rows, tokenizer, subset=0.5, val_split=0.25, seed=4)
    assert other_train["input_ids"] != train["input_ids"]
    only_train, none, _ = prepare_datasets(rows, tokenizer, subset=1.0, val_split=0.0)
    assert len(only_train) == 40 and none is None
    with pytest.raises(ValueError, match="subset"):
        prepare_datasets(rows, tokenizer, subset=1.5)


def test_every_row_is_checked_before_the_subset_is_drawn_from_the_valid_ones(tokenizer, caplog):
    rows = [row(question=f"question {i}") for i in range(47)]
    rows[20:25] = [{"conversations": []}] * 5  # rows 21-25
    with caplog.at_level(logging.INFO, logger="llm_modules.data"):
        train, val, report = prepare_datasets(rows, tokenizer, subset=0.3, val_split=0.1, seed=0)
    assert [number for number, _ in report.invalid] == [21, 22, 23, 24, 25]  # all of them, drawn or not
    assert (report.valid, report.drawn, len(train), len(val)) == (42, 13, 12, 1)  # 30% of the 42 valid rows
    assert report.summary() == (
        "47 rows read, 42 valid, 5 skipped (row 21: 'conversations' is empty (expected a non-empty list of turns), "
        "row 22: 'conversations' is empty (expected a non-empty list of turns), row 23: 'conversations' is empty "
        "(expected a non-empty list of turns), row 24: 'conversations' is empty (expected a non-empty list of turns), "
        "row 25: 'conversations' is empty (expected a non-empty list of turns)); subset 30%: 13; 12 train / 1 validation"
    )
    assert report.summary() in caplog.text
    for seed in range(5):  # whichever rows the subset draws, --strict names the file's first invalid row
        with pytest.raises(InvalidRowError, match=r"^row 21: 'conversations' is empty"):
            prepare_datasets(rows, tokenizer, subset=0.3, seed=seed, strict=True)


ROWS = [row(question="q1"), row(question="q2 \u2028 with a raw line separator, valid inside a JSON string")]
JSONL = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS)
EDITOR_FILES = {
    "bom.jsonl": b"\xef\xbb\xbf" + JSONL.encode(),
    "bom.json": b"\xef\xbb\xbf" + json.dumps(ROWS).encode(),
    "crlf.jsonl": JSONL.replace("\n", "\r\n").encode(),
    "bom-crlf-pretty.json": b"\xef\xbb\xbf" + json.dumps(ROWS, indent=2).replace("\n", "\r\n").encode(),
    "blank-lines.jsonl": ("\n" + JSONL.replace("\n", "\n  \n", 1) + "\n\t\n").encode(),
    "lines-in.json": JSONL.encode(),
}


@pytest.mark.parametrize("name", EDITOR_FILES)
def test_local_files_read_as_datasets_reads_them(name, tmp_path):
    path = tmp_path / name
    path.write_bytes(EDITOR_FILES[name])
    assert load_rows(path) == ROWS
    expected = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(tmp_path / "cache"))
    assert expected.to_list() == ROWS


@pytest.mark.parametrize(
    "content, message",
    [
        (JSONL.encode("utf-16"), r"bad.jsonl: UTF-16 or UTF-32 text; save it as UTF-8"),
        (JSONL.encode("utf-16-le"), r"bad.jsonl: UTF-16 or UTF-32 text"),
        (JSONL.encode() + '{"system": "café"}\n'.encode("latin-1"), r"bad.jsonl: not UTF-8 \(byte 0xe9 on line 3\)"),
        (b'[{"conversations": []},\n {"conversations": [}]', r"bad.jsonl: not valid JSON \(line 2, column 21: Expecting value\)$"),
    ],
    ids=["utf-16", "utf-16-no-bom", "latin-1", "broken-array"],
)
def test_unreadable_files_fail_with_one_line_naming_the_file(tmp_path, content, message):
    (tmp_path / "bad.jsonl").write_bytes(content)
    with pytest.raises(DataFileError, match=message):
        load_rows(tmp_path / "bad.jsonl")


def test_a_name_that_can_only_be_a_file_is_never_sent_to_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "stratos.jsonl").write_text(JSONL)
    assert resolve_dataset_source("stratos.jsonl") == str(tmp_path / "stratos.jsonl")
    typo = r"^dataset stratos.jsonll: no such file or directory \(did you mean stratos.jsonl\?\)$"
    with pytest.raises(DatasetNotFoundError, match=typo):
        load_rows("stratos.jsonll")
    for name in ("rows.csv", "notes.txt", "data/rows.jsonl", "a/b/c", "./rows", "~/nowhere-at-all"):
        with pytest.raises(DatasetNotFoundError, match="no such file or directory"):
            resolve_dataset_source(name, "--dataset")
    for hub_id in ("bespokelabs/Bespoke-Stratos-17k", "squad", "owner/Qwen2.5-Math-v1.5"):
        assert resolve_dataset_source(hub_id) == hub_id


def test_an_uncached_hub_dataset_fails_at_once_offline():
    assert datasets.config.HF_HUB_OFFLINE  # conftest sets HF_HUB_OFFLINE
    with pytest.raises(DatasetNotFoundError, match=r"^dataset nobody/no-such-dataset: not in the local cache and offline"):
        load_rows("nobody/no-such-dataset")


def test_collator_masks_labels_by_attention_not_by_pad_id(tokenizer):
    eos = tokenizer.eos_token_id
    collate = DataCollatorForLLMModules(pad_token_id=eos)  # pad == EOS, as many real tokenizers have it
    a = {"input_ids": [5, 6, eos], "attention_mask": [1, 1, 1], "labels": [IGNORE_INDEX, 6, eos]}
    b = {"input_ids": [7, eos], "attention_mask": [1, 1], "labels": [7, eos],
         "large_hidden_states": torch.ones(2, 3, dtype=torch.float16)}
    a["large_hidden_states"] = torch.full((3, 3), 2.0, dtype=torch.float16)
    batch = collate([a, b])
    assert batch["input_ids"].tolist() == [[5, 6, eos], [7, eos, eos]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, eos], [7, eos, IGNORE_INDEX]]  # real EOS kept, padding not
    assert batch["large_hidden_states"].shape == (2, 3, 3) and batch["large_hidden_states"][1, 2].abs().sum() == 0
    assert DataCollatorForLLMModules(0, pad_to_multiple_of=8)([a])["input_ids"].shape == (1, 8)


def test_the_answer_follows_the_prompt_tokenized_as_generation_tokenizes_it():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from llm_modules.evaluation import task_prompt_and_reference

    # A byte-level BPE with GPT-2's pre-tokenizer (as SmolLM2's) and a merge for "\n\n": before "<" it reads the two
    # newlines as two tokens, at the end of a text as one.
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(
        ["Assistant:\n\n"] * 50 + ["<|begin_of_thought|> 1 + 2 = 3 <|end_of_thought|>"] * 5,
        trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")
    row = {"system": "Add.", "conversations": [{"from": "user", "value": "What is 1 + 2?"},
                                               {"from": "assistant", "value": "<|begin_of_thought|> 1 + 2 = 3"}]}
    prompt, answer = task_prompt_and_reference(row)
    prompt_ids = tokenizer(prompt)["input_ids"]
    assert tokenizer(prompt + answer)["input_ids"][: len(prompt_ids)] != prompt_ids  # the boundary merges
    example = encode_conversation(row, tokenizer)
    n = len(prompt_ids)
    assert example["input_ids"][:n] == prompt_ids and example["labels"][:n] == [-100] * n
    assert tokenizer.decode(example["input_ids"][n:-1]) == answer and example["labels"][n:] == example["input_ids"][n:]
    assert example["input_ids"][-1] == tokenizer.eos_token_id
