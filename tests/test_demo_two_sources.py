"""`llm-modules demo --task two-sources`: each source reads half of the facts; the systems' wiring on tiny settings.

The accuracy targets need the full run (minutes of pretraining); docs/composition.md's table comes from `llm-modules
demo --task two-sources --seed S`. Here: what each source reads, the per-attribute scores, and that every system
composes the sources it names (and only those) through the library's own model.
"""

from __future__ import annotations

import json

import torch

from llm_modules.cli import main
from llm_modules.demo.knowledge_source import SourceOptions, pretraining_documents
from llm_modules.demo.systems import TaskOptions
from llm_modules.demo.two_sources import COMBINED, SOURCE_ATTRIBUTES, SYSTEMS, TwoSourcesSettings, run_two_sources_demo
from llm_modules.demo.world import ATTRIBUTES, make_world
from llm_modules.evaluation import AnswerResult
from llm_modules.modeling import LLMModulesForCausalLM


def test_the_sources_split_the_attributes_and_each_reads_only_its_half():
    assert sorted(sum(SOURCE_ATTRIBUTES.values(), ())) == sorted(ATTRIBUTES)
    world = make_world(12, 4, seed=0)
    for attributes in SOURCE_ATTRIBUTES.values():
        text = " ".join(pretraining_documents(world, rounds=2, seed=0, attributes=attributes))
        words = set(text.replace(".", " ").replace("?", " ").split())
        for attribute, values in ATTRIBUTES.items():
            # Values are unique words across attributes: a source that never reads an attribute never sees its values.
            assert (set(values) <= words) if attribute in attributes else not (set(values) & words)
        for person in world.people:
            assert person.name in text and all(person.facts[a] in words for a in attributes)


def test_every_combined_system_reads_its_sources():
    assert set(COMBINED) < set(SYSTEMS)
    assert COMBINED["combined_ab"][1]["source_fusion"] == "separate"  # the measured default (docs/composition.md)
    assert {k for name in ("combined_a", "combined_b") for k in COMBINED[name][0]} == {"a", "b"}


def test_tiny_run_writes_the_default_demo_shape_with_per_attribute_scores(tmp_path, one_thread):
    settings = TwoSourcesSettings(
        people_a=12, people_b=4, eval_people_a=2, max_new_tokens=8,
        # a source this small recalls next to nothing after 2 rounds: it reads 1 more round, once
        source=SourceOptions(hidden_size=32, intermediate_size=64, vocab_size=400, rounds=2, batch_size=16,
                             extra_rounds=1, max_extra_blocks=1),
        task=TaskOptions(epochs=1, batch_size=16, small_hidden_size=32, small_only_hidden_size=32, logging_steps=1),
        systems=("small_only", "teacher_native_a", "combined_b", "combined_ab_concat", "combined_ab_depth"),
    )
    out = tmp_path / "two"
    results = run_two_sources_demo(out, settings=settings)
    saved = json.loads((out / "results.json").read_text())
    assert list(saved["systems"]) == list(settings.systems) and saved["task"] == "two-sources"
    for name, row in saved["systems"].items():
        assert {"split_b_exact_match", "split_a_exact_match", "format_valid", "trainable_params", "train_seconds",
                "n_b"} <= set(row)
    assert saved["systems"]["teacher_native_a"]["n_b"] == 4 * 2  # only the two attributes source A read
    assert saved["systems"]["small_only"]["n_b"] == 4 * 4
    for name in ("small_only", "combined_b", "combined_ab_concat", "combined_ab_depth"):
        scores = saved["systems"][name]["per_attribute_b"]
        assert list(scores) == list(ATTRIBUTES)
        assert abs(sum(scores.values()) / 4 - saved["systems"][name]["split_b_exact_match"]) < 1e-9
    sources = {k: v["dir"] for k, v in saved["sources"].items()}
    for name, expected in (("combined_b", ["b"]), ("combined_ab_concat", ["a", "b"]), ("combined_ab_depth", ["a", "b"])):
        model = LLMModulesForCausalLM.from_pretrained(out / "models" / name)
        assert model.config.large_model_name_or_path in ([sources[k] for k in expected], sources[expected[0]])
    assert LLMModulesForCausalLM.from_pretrained(out / "models" / "combined_ab_depth").config.depth_connections
    assert LLMModulesForCausalLM.from_pretrained(out / "models" / "combined_ab_concat").config.source_fusion == "concat"
    assert "Split B exact match per attribute" in results["table"]
    assert (out / "results.md").read_text() == results["table"]
    for name in ("accuracy.png", "loss_curves.png", "logs/knowledge_source_a.jsonl", "logs/knowledge_source_b.jsonl"):
        assert (out / name).stat().st_size > 0
    for key, attributes in SOURCE_ATTRIBUTES.items():
        source = saved["sources"][key]
        assert source["rounds"] == 3 and [set(r) for r in source["recall_split_a"]] == [set(attributes)] * 2
        log = [json.loads(line) for line in (out / "logs" / f"knowledge_source_{key}.jsonl").read_text().splitlines()]
        steps = [entry["step"] for entry in log]
        assert steps == sorted(steps) and log[-1]["epoch"] == 3  # both blocks, counted in rounds
        assert [entry["recall_split_a"] for entry in log if "recall_split_a" in entry] == source["recall_split_a"]


def test_per_attribute_scores_follow_the_row_order():
    from llm_modules.demo.two_sources import per_attribute
    from llm_modules.demo.world import task_rows

    people = make_world(10, 2, seed=0).split_b
    rows = task_rows(people)
    correct = [i % 4 == 1 or (i % 4 == 3 and i < 4) for i in range(len(rows))]  # all of attribute 1, half of 3
    result = AnswerResult(0.0, 1.0, len(rows), [{"correct": c} for c in correct])
    scores = per_attribute(result, rows)
    names = list(ATTRIBUTES)
    assert scores == {names[0]: 0.0, names[1]: 1.0, names[2]: 0.0, names[3]: 0.5}


def test_cli_two_sources_refuses_a_file_as_output_dir(tmp_path, capsys):
    target = tmp_path / "results"
    target.write_text("keep me")
    assert main(["demo", "--task", "two-sources", "--output-dir", str(target)]) == 3
    assert "is a file, expected a directory" in capsys.readouterr().err and target.read_text() == "keep me"


def test_sources_pretrained_side_by_side_equal_those_pretrained_one_after_the_other(tmp_path, one_thread):
    from safetensors.torch import load_file

    from llm_modules.demo.knowledge_source import build_tokenizer
    from llm_modules.demo.two_sources import pretrain_sources

    world = make_world(12, 4, seed=0)
    source = SourceOptions(hidden_size=32, intermediate_size=64, vocab_size=400, rounds=2, batch_size=16,
                           max_extra_blocks=0)
    settings = TwoSourcesSettings(people_a=12, people_b=4, eval_people_a=2, source=source, task=TaskOptions())
    tokenizer = build_tokenizer(world, source.vocab_size, seed=0)
    runs = {}
    for workers in (1, 2):  # in this process; in two worker processes of one thread each
        root = tmp_path / f"workers_{workers}"
        dirs = {key: root / f"source_{key}" for key in SOURCE_ATTRIBUTES}
        runs[workers] = pretrain_sources(world, tokenizer, settings, 0, dirs, root / "work", root / "logs", workers)
        assert set(runs[workers]) == set(SOURCE_ATTRIBUTES)
    for key in SOURCE_ATTRIBUTES:
        (one, _), (two, seconds) = runs[1][key], runs[2][key]
        assert seconds > 0 and one.rounds == two.rounds == 2 and one.recall_split_a == two.recall_split_a
        losses = [[entry["train_loss"] for entry in run.log_history if "train_loss" in entry] for run in (one, two)]
        assert losses[0] and losses[0] == losses[1]
        weights = [load_file(tmp_path / f"workers_{w}" / f"source_{key}" / "model.safetensors") for w in (1, 2)]
        assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
        assert (tmp_path / "workers_2" / "logs" / f"knowledge_source_{key}.jsonl").stat().st_size > 0


def test_systems_trained_side_by_side_equal_those_trained_one_after_the_other(tmp_path, one_thread):
    from safetensors.torch import load_file

    from llm_modules.data import build_dataset
    from llm_modules.demo import systems as S
    from llm_modules.demo.knowledge_source import build_tokenizer
    from llm_modules.demo.two_sources import SystemInputs, pretrain_sources, train_systems
    from llm_modules.demo.world import task_rows

    world = make_world(12, 4, seed=0)
    source = SourceOptions(hidden_size=32, intermediate_size=64, vocab_size=400, rounds=1, batch_size=16,
                           max_extra_blocks=0)
    task = TaskOptions(epochs=1, batch_size=16, small_hidden_size=32, small_only_hidden_size=32, logging_steps=1)
    settings = TwoSourcesSettings(people_a=12, people_b=4, eval_people_a=2, source=source, task=task)
    tokenizer = build_tokenizer(world, source.vocab_size, seed=0)
    dirs = {key: tmp_path / f"source_{key}" for key in SOURCE_ATTRIBUTES}
    pretrain_sources(world, tokenizer, settings, 0, dirs, tmp_path / "work", tmp_path / "logs", workers=1)
    small_dir = S.save_small_model(tmp_path / "small_init", tokenizer, task)
    dataset, _ = build_dataset(task_rows(world.split_a), tokenizer, max_length=None)
    names = ["small_only", "combined_a", "combined_ab", "combined_ab_concat"]  # the last two share a feature cache
    runs = {}
    for workers in (1, 2):  # here, in `names`' order; in two worker processes of one thread each
        out = tmp_path / f"workers_{workers}"
        inputs = SystemInputs(dataset, tokenizer, task, dirs, small_dir, task_rows(world.split_b),
                              task_rows(world.split_a[:2]), 8, out, out / "work")
        runs[workers] = {name: (row, history) for name, row, history in train_systems(names, inputs, workers)}
        assert set(runs[workers]) == set(names)
    for name in names:
        (one, one_log), (two, two_log) = runs[1][name], runs[2][name]
        assert {k: v for k, v in one.items() if k != "train_seconds"} == {k: v for k, v in two.items()
                                                                         if k != "train_seconds"}
        losses = [[entry["loss"] for entry in log if "loss" in entry] for log in (one_log, two_log)]
        assert losses[0] and losses[0] == losses[1]
        assert (tmp_path / "workers_2" / "logs" / f"{name}.jsonl").stat().st_size > 0
        assert (tmp_path / "workers_2" / "predictions" / f"{name}.jsonl").read_text() == (
            tmp_path / "workers_1" / "predictions" / f"{name}.jsonl").read_text()
        if name != "small_only":
            weights = [load_file(tmp_path / f"workers_{w}" / "models" / name / "model.safetensors") for w in (1, 2)]
            assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])
