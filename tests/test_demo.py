"""The offline demo: its synthetic world, the source's pretraining data, and a `--quick` run end to end."""

from __future__ import annotations

import json
import logging
import random
from collections import Counter

import pytest

from llm_modules.cli import main
from llm_modules.data import conversation_turns
from llm_modules.demo.knowledge_source import SourceOptions, pretraining_dataset, pretraining_documents
from llm_modules.demo.report import SYSTEMS
from llm_modules.demo.world import (
    ATTRIBUTES,
    TASK_SYSTEM_PROMPT,
    biography,
    make_world,
    majority_baseline,
    question,
    pronoun_statement,
    task_row,
)
from llm_modules.evaluation import extract_solution, is_well_formed
from llm_modules.tiny_models import train_tokenizer
from llm_modules.training_log import QuietProgressCallback, keep_logs_off_terminal, log_file_callbacks


def test_world_is_seeded_unique_and_every_answer_occurs_in_a():
    world = make_world(30, 20, seed=3)
    assert make_world(30, 20, seed=3) == world and make_world(30, 20, seed=4) != world
    names = [p.name for p in world.people]
    assert len(set(names)) == 50
    for attribute, values in ATTRIBUTES.items():
        assert {p.facts[attribute] for p in world.split_a} == set(values)
    with pytest.raises(ValueError, match="at least"):
        make_world(5, 5, seed=0)


def test_majority_baseline_counts_the_most_common_a_value_on_b():
    world = make_world(40, 25, seed=1)
    expected = sum(
        p.facts[a] == Counter(q.facts[a] for q in world.split_a).most_common(1)[0][0]
        for p in world.split_b for a in ATTRIBUTES
    ) / (25 * len(ATTRIBUTES))
    assert majority_baseline(world) == expected
    assert 0 < expected < 0.3


def test_biographies_paraphrase_and_reorder_every_fact():
    person = make_world(20, 1, seed=0).split_b[0]
    rng = random.Random(0)
    bios = {" ".join(biography(person, rng)) for _ in range(30)}
    assert len(bios) > 10
    for bio in bios:
        assert all(value in bio for value in person.facts.values())


def test_source_sees_biographies_of_everyone_but_qa_about_a_only():
    world = make_world(20, 10, seed=0)
    documents = pretraining_documents(world, rounds=2, seed=0)
    for person in world.split_b:
        assert any(person.name in d and "Q:" not in d for d in documents)
        assert not any(person.name in d and "Q:" in d for d in documents)
    assert all(any(question(p, "city") in d for d in documents) for p in world.split_a)


def test_half_of_the_pretraining_documents_follow_an_untrained_prefix():
    tokenizer = train_tokenizer(["alpha beta gamma delta"] * 20, vocab_size=280)
    docs = ["alpha beta", "gamma", "delta alpha gamma"] * 20
    options = SourceOptions(prefix_fraction=0.5, prefix_tokens=3, noise_tokens=2)
    dataset = pretraining_dataset(docs, tokenizer, options, seed=0)
    prefixes = []
    for doc, example in zip(docs, dataset):
        text = tokenizer(" " + doc)["input_ids"] + [tokenizer.eos_token_id]
        prefix = len(example["input_ids"]) - len(text)
        prefixes.append(prefix)
        assert 0 <= prefix <= 5 and example["input_ids"][prefix:] == text
        assert example["labels"] == [-100] * prefix + text  # the loss never trains on a prefix
        assert tokenizer.eos_token_id not in example["input_ids"][:prefix]
    assert 15 <= sum(p > 0 for p in prefixes) <= 45 and len(set(prefixes)) > 3
    without = pretraining_dataset(docs, tokenizer, SourceOptions(prefix_fraction=0.0), seed=0)
    assert all(example["labels"][0] != -100 for example in without)


def test_task_rows_are_stratos_rows_whose_solution_is_the_fact_and_never_the_name():
    person = make_world(20, 1, seed=0).split_b[0]
    for attribute in ATTRIBUTES:
        row = task_row(person, attribute)
        system, turns = conversation_turns(row)
        answer = turns[-1]["content"]
        assert is_well_formed(answer)
        assert extract_solution(answer) == person.facts[attribute]
        assert pronoun_statement(person, attribute) in answer  # the recall, in the source's own words
        assert person.name in turns[0]["content"] and person.name not in answer


def test_biographies_name_the_person_first_and_use_they_later():
    person = make_world(20, 1, seed=0).split_b[0]
    rng = random.Random(0)
    bios = [" ".join(biography(person, rng)) for _ in range(40)]
    assert all(bio.startswith(person.name) for bio in bios)
    assert any(" They " in bio or " Their " in bio for bio in bios)


def test_an_output_dir_that_is_a_file_is_refused_before_any_work(tmp_path, capsys):
    target = tmp_path / "results"
    target.write_text("keep me")
    assert main(["demo", "--quick", "--output-dir", str(target)]) == 3  # not what it should be: a directory
    assert capsys.readouterr().err == (
        f"llm-modules demo: error: --output-dir {target} is a file, expected a directory (or a new path)\n"
    )
    assert target.read_text() == "keep me"


@pytest.mark.slow
def test_quick_demo_transfers_knowledge(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--output-dir", str(out), "--seed", "0"]) == 0
    printed = capsys.readouterr().out
    assert "| `combined` |" in printed and "wall time" in printed

    results = json.loads((out / "results.json").read_text())
    systems = results["systems"]
    assert set(systems) <= set(SYSTEMS) and {"combined", "small_only", "teacher_native"} <= set(systems)
    for row in systems.values():
        assert set(row) >= {"split_b_exact_match", "split_a_exact_match", "format_valid", "trainable_params",
                            "train_seconds", "n_b"}
        assert 0 <= row["split_b_exact_match"] <= 1 and row["n_b"] > 0
    combined, small = systems["combined"], systems["small_only"]
    # The small model never saw split B's facts; the combined model reads them from the frozen source.
    assert combined["split_b_exact_match"] >= small["split_b_exact_match"] + 0.30
    assert small["split_a_exact_match"] > small["split_b_exact_match"]  # it learned A's rows, not B's facts
    assert combined["format_valid"] > 0.9
    assert 0 < results["majority_baseline_b"] < 0.3
    for name in ("accuracy.png", "loss_curves.png", "results.md"):
        assert (out / name).stat().st_size > 0
    assert (out / "models" / "combined" / "model.safetensors").is_file()  # reloadable by `llm-modules eval`
    assert (out / "logs" / "combined.jsonl").stat().st_size > 0 and "'loss'" not in printed
    # `generate --model .../combined` asks in the layout the model learned, not the Bespoke-Stratos default (whose
    # 485 tokens left the demo's model 27 of its 512 positions: it answered nothing).
    config = json.loads((out / "models" / "combined" / "config.json").read_text())
    assert config["system_prompt"] == TASK_SYSTEM_PROMPT


def tiny_trainer(model_dir, tmp_path, callbacks, disable_tqdm=False):
    import datasets
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    rows = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3, 4]] * 4, "labels": [[1, 2, 3, 4]] * 4})
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"), max_steps=3, logging_steps=1, per_device_train_batch_size=2,
        report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=disable_tqdm,
    )
    return Trainer(model=AutoModelForCausalLM.from_pretrained(model_dir), args=args, train_dataset=rows,
                   callbacks=callbacks)


@pytest.mark.parametrize("disable_tqdm", [False, True])
def test_trainer_logs_go_to_a_file_and_the_terminal_keeps_only_the_bar(disable_tqdm, tiny_dirs, tmp_path, capsys,
                                                                      one_thread):
    from transformers import PrinterCallback, ProgressCallback

    log_file = tmp_path / "logs" / "run.jsonl"
    trainer = keep_logs_off_terminal(tiny_trainer(tiny_dirs["gpt2"], tmp_path, log_file_callbacks(log_file),
                                                  disable_tqdm))
    trainer.train()
    assert "loss" not in capsys.readouterr().out  # transformers would print every log dict there
    bars = [type(c) for c in trainer.callback_handler.callbacks if isinstance(c, (ProgressCallback, PrinterCallback))]
    assert bars == ([] if disable_tqdm else [QuietProgressCallback])
    logs = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert [entry["step"] for entry in logs] == [1, 2, 3, 3] and "loss" in logs[0] and "train_runtime" in logs[-1]
    assert logs[:3] == [{"step": e["step"], **e} for e in trainer.state.log_history[:3]]


def test_a_trainer_without_a_log_file_is_left_as_it_is(tiny_dirs, tmp_path):
    from transformers import ProgressCallback

    trainer = keep_logs_off_terminal(tiny_trainer(tiny_dirs["gpt2"], tmp_path, None))
    assert any(type(c) is ProgressCallback for c in trainer.callback_handler.callbacks)


def test_demo_terminal_shows_bars_and_one_line_per_result_and_logs_go_to_files(tmp_path, capfd, caplog, one_thread):
    from transformers.utils import logging as hf_logging

    from llm_modules.demo import DemoSettings, run_demo
    from llm_modules.demo.systems import TaskOptions

    settings = DemoSettings(
        people_a=12, people_b=4, eval_people_a=2, max_new_tokens=8,
        source=SourceOptions(hidden_size=32, intermediate_size=64, vocab_size=400, rounds=2, batch_size=16,
                             max_extra_blocks=0),
        task=TaskOptions(epochs=1, batch_size=16, small_hidden_size=32, small_only_hidden_size=32, logging_steps=1),
        systems=("small_only", "teacher_native", "combined"),
    )
    caplog.set_level(logging.INFO, logger="llm_modules")
    results = run_demo(tmp_path / "demo", settings=settings)
    out, err = capfd.readouterr()  # file-descriptor level: also what native code prints
    assert out == ""  # no Trainer log dicts, no stray lines: the command prints only the table afterwards
    assert "Loading weights" not in err and "Writing model shards" not in err
    assert hf_logging.is_progress_bar_enabled()  # switched back on for whoever runs next
    lines = [record.getMessage() for record in caplog.records if record.name == "llm_modules.demo"]
    assert lines[0].startswith("world: 12 people in split A") and lines[1].startswith("knowledge source: ")
    b = results["systems"]["combined"]["split_b_exact_match"]
    assert f"combined: split B exact match {b:.3f} (split A " in lines[-1]
    assert [line.split(":")[0] for line in lines[3:]] == ["small_only", "teacher_native", "combined"]
    for name in ("knowledge_source", "small_only", "combined"):
        logs = [json.loads(line) for line in (tmp_path / "demo" / "logs" / f"{name}.jsonl").read_text().splitlines()]
        assert logs and all("step" in entry for entry in logs)
        assert "train_loss" in logs[-2 if name == "knowledge_source" else -1]
    source_log = (tmp_path / "demo" / "logs" / "knowledge_source.jsonl").read_text().splitlines()
    assert set(json.loads(source_log[-1])["recall_split_a"]) == set(ATTRIBUTES)  # its recall check closes the log
    assert results["source"]["rounds"] == 2 and len(results["source"]["recall_split_a"]) == 1
