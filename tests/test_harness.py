"""lm-evaluation-harness on a saved tiny combined model, offline: both request types, and the same exact match as
`llm-modules eval` on the same rows."""

from __future__ import annotations

import json

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from llm_modules import LLMModulesForCausalLM  # noqa: E402
from llm_modules.data import encode_conversation  # noqa: E402
from llm_modules.harness import TASKS_DIR, register, with_task_path  # noqa: E402


@pytest.fixture(scope="module")
def memorised(tiny_pair, tmp_path_factory):
    """A tiny combined model trained until it answers four mul2x1 rows from memory, saved; and those rows."""
    from llm_modules.compare.tasks import builtin_task, plain_row

    rows = [plain_row(r) for r in builtin_task("mul2x1", 4, 1, 0).train_rows]
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = LLMModulesForCausalLM.from_large_and_small(*tiny_pair, cross_attention_heads=4)
        encoded = [encode_conversation(r, model.tokenizer) for r in rows]
        length = max(len(e["input_ids"]) for e in encoded)
        pad = model.tokenizer.pad_token_id
        ids = torch.tensor([e["input_ids"] + [pad] * (length - len(e["input_ids"])) for e in encoded])
        labels = torch.tensor([e["labels"] + [-100] * (length - len(e["labels"])) for e in encoded])
        mask = torch.tensor([[1] * len(e["input_ids"]) + [0] * (length - len(e["input_ids"])) for e in encoded])
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-3)
        model.train()
        for _ in range(500):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        directory = tmp_path_factory.mktemp("memorised") / "combined"
        model.save_pretrained(directory)
    finally:
        torch.set_num_threads(threads)
    return directory, rows


def lm_eval_run(tmp_path, directory, task: str, metadata: dict, batch_size: int, **kwargs):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    register()
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata=metadata)
    return simple_evaluate(model="llm-modules", model_args=f"pretrained={directory}", tasks=[task], device="cpu",
                           batch_size=batch_size, task_manager=manager, log_samples=True, **kwargs)


def test_lm_eval_exact_match_agrees_with_llm_modules_eval(memorised, tmp_path, one_thread):
    """Same rows through `llm-modules eval`'s scoring and lm-eval's generate_until (left padding, stopping criteria,
    our task YAML's filters): the same answer on every row, so the same exact match. Two references are made wrong
    so that the score is neither 0 nor 1."""
    from llm_modules.evaluation import evaluate_answers, load_model_for_eval

    directory, rows = memorised
    rows = json.loads(json.dumps(rows))
    for row in rows[:2]:
        turn = row["conversations"][-1]
        turn["value"] = turn["value"].replace("<|begin_of_solution|> ", "<|begin_of_solution|> 1")
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    model, tokenizer = load_model_for_eval(str(directory), device="cpu")
    ours = evaluate_answers(model, tokenizer, rows, max_new_tokens=32, batch_size=4, progress=False)
    theirs = lm_eval_run(tmp_path, directory, "llm_modules_stratos", {"path": str(path)}, batch_size=4,
                         gen_kwargs="max_gen_toks=32")
    strict = theirs["results"]["llm_modules_stratos"]["exact_match,strict-match"]
    assert 0 < ours.exact_match < 1, [p["output"] for p in ours.predictions]  # the model learned most rows
    assert strict == pytest.approx(ours.exact_match)
    samples = sorted((s for s in theirs["samples"]["llm_modules_stratos"] if s["filter"] == "strict-match"),
                     key=lambda s: s["doc_id"])
    assert [s["exact_match"] == 1.0 for s in samples] == [p["correct"] for p in ours.predictions]


def test_loglikelihood_right_padded_batches_equal_one_at_a_time(memorised, one_thread):
    """lm-eval's loglikelihood calls `model(inps).logits` on right-padded batches without an attention mask: each
    request's log-probability and greedy flag equal those of the request alone."""
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    register()
    directory, _ = memorised
    lm = get_model("llm-modules")(pretrained=str(directory), batch_size=4, device="cpu")
    pairs = [("Question: What is 512 minus 347?\nAnswer:", " 165"), ("a", " b c d e f g h"),
             ("The quick brown fox", " jumps"), ("System:\n\nSolve.\n\nUser:\n\nWhat is 1 + 2?", " 3")]
    batched = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)])
    alone = [lm.loglikelihood([Instance("loglikelihood", {}, pair, 0)])[0] for pair in pairs]
    for (a, greedy_a), (b, greedy_b) in zip(batched, alone):
        assert a == pytest.approx(b, abs=1e-4) and greedy_a == greedy_b


def test_arithmetic_3ds_task_runs(memorised, tmp_path, one_thread):
    directory, _ = memorised
    result = lm_eval_run(tmp_path, directory, "llm_modules_arithmetic_3ds", {"count": 8}, batch_size=4)
    assert result["results"]["llm_modules_arithmetic_3ds"]["acc,none"] is not None
    assert len(result["samples"]["llm_modules_arithmetic_3ds"]) == 8


def test_arithmetic_problems_are_lm_eval_s_layout():
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("harness_task_utils", TASKS_DIR / "utils.py")
    utils = module_from_spec(spec)
    spec.loader.exec_module(utils)
    problems = utils.arithmetic_problems(50, seed=1)
    assert problems == utils.arithmetic_problems(50, seed=1)
    for p in problems:
        a, b = map(int, p["context"].removeprefix("Question: What is ").removesuffix("?\nAnswer:").split(" minus "))
        assert p["completion"] == f" {a - b}"


def test_builtin_task_documents_are_compares_held_out_rows():
    from lm_eval.tasks import TaskManager

    from llm_modules.compare.tasks import builtin_task, reference_answer

    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False,
                          metadata={"n_train": 6, "n_eval": 3, "seed": 2})
    for name in ("sub3", "stdlib"):
        task = manager.load([f"llm_modules_{name}"])["tasks"][f"llm_modules_{name}"]
        documents = list(task.test_docs())
        held_out = builtin_task(name, 6, 3, seed=2).eval_rows
        assert [d["reference"] for d in documents] == [reference_answer(r) for r in held_out]
        assert all(r["conversations"][-2]["value"] in d["prompt"] for d, r in zip(documents, held_out))


def test_entry_point_adds_the_task_dir():
    assert with_task_path(["--model", "hf", "--tasks", "x"]) == [
        "run", "--model", "hf", "--tasks", "x", "--include_path", str(TASKS_DIR)]
    assert with_task_path(["ls", "tasks"])[-2:] == ["--include_path", str(TASKS_DIR)]
    with pytest.raises(ValueError, match="--include_path"):
        with_task_path(["run", "--include_path", "/elsewhere"])
