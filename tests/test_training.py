"""Training on the Trainer: parameter groups, frozen model, trained-only checkpoints, accumulation, non-finite steps,
resume after a real kill -9, and 2-process DDP against one process."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from llm_modules import LLMModulesForCausalLM, presets
from llm_modules.data import prepare_datasets
from llm_modules.model_card import write_model_card
from llm_modules.training import (
    COMPLETE_MARKER,
    ConflictingOptionsError,
    NonFiniteLossError,
    TrainingOptions,
    checkpoint_to_resume,
    parameter_groups,
    train,
)
from llm_modules.run_checkpoints import complete_checkpoints
from llm_modules.training_run import check_resume_options

TESTS = Path(__file__).parent


def stratos_rows(n: int = 24) -> list[dict]:
    """Rows whose lengths differ, so that token-weighted and per-example means differ."""
    return [
        {
            "system": "Answer with the sum.",
            "conversations": [
                {"from": "user", "value": f"what is {i} plus {i + 1}?" + " please" * (i % 4)},
                {"from": "assistant", "value": f"<|begin_of_solution|> {2 * i + 1} <|end_of_solution|>" + " ok" * (i % 3)},
            ],
        }
        for i in range(n)
    ]


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def dataset_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "stratos.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in stratos_rows()))
    return path


def compose(tiny_pair, **overrides) -> LLMModulesForCausalLM:
    torch.manual_seed(0)
    return LLMModulesForCausalLM.from_large_and_small(*tiny_pair, cross_attention_heads=4, **overrides)


def options(tmp_path, **overrides) -> TrainingOptions:
    values = dict(
        output_dir=str(tmp_path / "out"), max_steps=4, batch_size=2, lr_bridge=3e-3, lr_small=3e-3, logging_steps=1,
        subset=1.0, val_split=0.0, report_to="none", trainer_args={"disable_tqdm": True},
    )
    return TrainingOptions(**{**values, **overrides})


def data(model, val_split=0.0, **kwargs):
    return prepare_datasets(stratos_rows(), model.tokenizer, val_split=val_split, subset=1.0, **kwargs)[:2]


def test_parameter_groups_hold_the_bridge_and_the_small_model_only(tiny_pair):
    model = compose(tiny_pair)
    groups = parameter_groups(model, lr_bridge=1e-4, lr_small=5e-5, weight_decay=0.01)
    grouped = [id(p) for g in groups for p in g["params"]]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == {id(p) for p in model.parameters() if p.requires_grad}
    assert not set(grouped) & {id(p) for p in model.large.parameters()}
    bridge = {id(p) for p in model.bridge.parameters()}
    for group in groups:
        in_bridge = {id(p) in bridge for p in group["params"]}
        assert in_bridge == ({True} if group["name"].startswith("bridge") else {False})
        assert group["lr"] == (1e-4 if group["name"].startswith("bridge") else 5e-5)
    assert id(model.lm_head.weight) in {id(p) for g in groups if g["name"] == "small" for p in g["params"]}


def test_training_keeps_the_large_model_frozen_and_saves_only_what_trains(tiny_pair, tmp_path):
    model = compose(tiny_pair)
    frozen = {k: v.clone() for k, v in model.large.state_dict().items()}
    train_set, val_set = data(model, val_split=0.25)
    opts = options(tmp_path, save_steps=2, val_split=0.25)
    trainer = train(model, model.tokenizer, train_set, val_set, opts)

    assert all(torch.equal(frozen[k], v) for k, v in model.large.state_dict().items())
    optimized = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not optimized & {id(p) for p in model.large.parameters()}
    assert {g["lr"] for g in trainer.optimizer.optimizer.param_groups if g["name"].startswith("bridge")} <= {3e-3}

    out = Path(opts.output_dir)
    checkpoints = complete_checkpoints(out)
    assert [c.name for c in checkpoints] == ["checkpoint-2", "checkpoint-4"]
    trained_keys = set(model.trained_state_dict())
    for directory in [*checkpoints, out]:
        keys = set(load_file(directory / "model.safetensors"))
        assert keys == trained_keys and not any(k.startswith(("large.", "sources.")) for k in keys)
    assert trainer.state.best_model_checkpoint in {str(c) for c in checkpoints}

    reloaded = LLMModulesForCausalLM.from_pretrained(out)
    batch = model.tokenizer("what is 1 plus 2?", return_tensors="pt")
    model.eval()
    torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits)

    card = (out / "README.md").read_text()
    eval_loss = trainer.model_card["eval_loss"]
    assert str(tiny_pair[0]) in card and str(tiny_pair[1]) in card
    assert f'from_pretrained("{out.resolve()}")' in card  # works as written from any folder
    # Datasets handed to train() with no description: the card says so, and never names the default dataset.
    assert "- Data: not recorded" in card and "Stratos" not in card and '"subset"' not in card
    assert "- Examples: 18 training, 6 validation." in card
    assert f"Final validation loss: **{eval_loss:.4f}**" in card

    with pytest.raises(FileExistsError, match="--resume"):
        train(model, model.tokenizer, train_set, val_set, opts)


def test_accumulation_gives_the_update_of_one_big_batch(tiny_pair, tmp_path):
    weights = []
    for batch_size, grad_accum in ((2, 1), (1, 2)):
        model = compose(tiny_pair, dropout=0.0)
        train_set, _ = data(model)
        opts = options(tmp_path / f"{batch_size}x{grad_accum}", batch_size=batch_size, grad_accum=grad_accum, max_steps=3)
        train(model, model.tokenizer, train_set, None, opts)
        weights.append(model.trained_state_dict())
    for name in weights[0]:
        torch.testing.assert_close(weights[0][name], weights[1][name], msg=name)


def test_bridge_only_steps_train_the_bridge_alone_then_everything_on_the_same_schedule(tiny_pair, tmp_path):
    model = compose(tiny_pair, dropout=0.0)
    train_set, _ = data(model)
    start = {k: v.clone() for k, v in model.trained_state_dict().items()}
    seen = []

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.append({k: v.clone() for k, v in model.trained_state_dict().items()})

    opts = options(tmp_path, max_steps=4, bridge_only_steps=2, lr_scheduler="linear")
    trainer = train(model, model.tokenizer, train_set, None, opts, callbacks=[Snapshot()])
    bridge = [k for k in start if k.startswith("bridge")]
    small = [k for k in start if not k.startswith("bridge")]
    assert bridge and small and len(seen) == 4
    for step in (0, 1):  # optimizer steps 1 and 2: the bridge moves, the small model and the head wait
        assert all(torch.equal(seen[step][k], start[k]) for k in small)
        assert not all(torch.equal(seen[step][k], start[k]) for k in bridge)
    assert not all(torch.equal(seen[2][k], seen[1][k]) for k in small)
    # After the phase, the small model's groups are where the shared schedule is (linear decay over the 4 steps).
    groups = trainer.optimizer.optimizer.param_groups
    schedule = getattr(trainer.lr_scheduler, "scheduler", trainer.lr_scheduler)
    assert schedule.lr_lambdas[[g["name"] for g in groups].index("bridge")](2) == pytest.approx(0.5)
    small_index = [g["name"] for g in groups].index("small")
    assert [schedule.lr_lambdas[small_index](step) for step in range(4)] == pytest.approx([0, 0, 0.5, 0.25])


def test_gradient_checkpointing_of_the_small_model_changes_no_weight(tiny_pair, tmp_path):
    weights = []
    for checkpointing in (False, True):
        model = compose(tiny_pair, dropout=0.0)
        train_set, _ = data(model)
        train(model, model.tokenizer, train_set, None,
              options(tmp_path / str(checkpointing), max_steps=2, gradient_checkpointing=checkpointing))
        assert model.small.is_activation_checkpointing == checkpointing
        weights.append(model.trained_state_dict())
    for name in weights[0]:
        torch.testing.assert_close(weights[1][name], weights[0][name], msg=name)


class PoisonLoss:
    """Forward hook: makes the training loss NaN on the chosen training forward calls (1-based)."""

    def __init__(self, calls):
        self.calls, self.count = set(calls), 0

    def __call__(self, module, args, output):
        if module.training:
            self.count += 1
            if self.count in self.calls:
                output["loss"] = output["loss"] * float("nan")
        return output


def test_nonfinite_steps_are_skipped_and_counted(tiny_pair, tmp_path):
    model = compose(tiny_pair)
    train_set, _ = data(model)
    model.register_forward_hook(PoisonLoss({2, 3}))
    trainer = train(model, model.tokenizer, train_set, None, options(tmp_path, max_steps=5))
    assert trainer.skipped_nonfinite_steps == 2 and trainer.state.global_step == 5
    assert all(torch.isfinite(t).all() for t in model.trained_state_dict().values())
    assert any(log.get("skipped_nonfinite_steps") == 2 for log in trainer.state.log_history)


def test_too_many_nonfinite_steps_in_a_row_stop_training_without_touching_the_weights(tiny_pair, tmp_path):
    model = compose(tiny_pair)
    before = {k: v.clone() for k, v in model.trained_state_dict().items()}
    train_set, _ = data(model)
    model.register_forward_hook(PoisonLoss(range(1, 100)))
    with pytest.raises(NonFiniteLossError, match="3 steps in a row"):
        train(model, model.tokenizer, train_set, None, options(tmp_path, max_steps=10, max_nonfinite_steps=3))
    # Skipped means skipped: no AdamW update, not even weight decay.
    assert all(torch.equal(before[k], v) for k, v in model.trained_state_dict().items())


def test_model_card_describes_the_data_it_was_given(tiny_pair, tmp_path):
    model = compose(tiny_pair)
    rows = stratos_rows(10) + [{"conversations": []}]
    _, _, report = prepare_datasets(rows, model.tokenizer, subset=0.5, val_split=0.2, seed=1)
    options = TrainingOptions(output_dir=str(tmp_path), large=str(tiny_pair[0]), small=str(tiny_pair[1]))
    card = write_model_card(tmp_path, options, data=report, train_examples=4, validation_examples=1).read_text()
    assert "- Data: rows given in memory" in card
    assert "- Rows: 11 rows read, 10 valid, 1 skipped (row 11: 'conversations' is empty" in card
    assert "subset 50%: 5; 4 train / 1 validation" in card and "seed 1" in card
    assert "datasets:" not in card and "base_model:" not in card  # local paths are no hub metadata
    card = write_model_card(tmp_path, options, data="the demo's task rows", train_examples=7).read_text()
    assert "- Data: the demo's task rows\n- Examples: 7 training, no validation." in card and "Stratos" not in card


@pytest.mark.parametrize(
    "name, value",
    [("epochs", 0), ("epochs", -1), ("max_steps", 0), ("lr_bridge", 0.0), ("lr_small", -5e-5), ("subset", 0),
     ("subset", 1.5), ("val_split", 1.0), ("warmup", -1), ("warmup", 2.5), ("min_delta", -1e-4), ("max_length", 1),
     ("batch_size", 0), ("patience", -1), ("epochs", float("nan")), ("epochs", True), ("seed", -1),
     ("loss_on", "everything"), ("bridge_only_steps", -1), ("bridge_only_steps", 1.5)],
)
def test_options_out_of_range_are_refused_by_the_rule_of_their_flag(name, value):
    with pytest.raises(ValueError, match=rf"^{name} must be .*, got {value!r}$"):
        TrainingOptions.from_dict({name: value})


def test_options_take_numbers_written_as_text_and_the_paper_preset():
    assert TrainingOptions.from_dict({"lr_bridge": "1e-4", "epochs": 2}).lr_bridge == 1e-4  # PyYAML reads 1e-4 as text
    defaults, paper = TrainingOptions(), TrainingOptions.from_dict(presets.load("paper"))
    assert (defaults.subset, defaults.epochs, defaults.loss_on) == (1.0, 3, "assistant")  # every row by default
    assert (paper.subset, paper.max_length, paper.val_split, paper.lr_bridge, paper.lr_small, paper.max_grad_norm,
            paper.batch_size, paper.epochs, paper.patience, paper.min_delta, paper.loss_on) == (
        0.3, 4096, 0.1, 1e-4, 5e-5, 1.0, 1, 15, 5, 1e-4, "all")
    assert presets.names() == ["paper"] and "30%" in presets.description("paper")


def test_only_complete_checkpoints_are_resumed_from(tmp_path, caplog):
    for step, complete in ((2, True), (4, True), (6, False)):
        directory = tmp_path / f"checkpoint-{step}"
        directory.mkdir()
        if complete:
            (directory / COMPLETE_MARKER).write_text("{}")
            (directory / "trainer_state.json").write_text(json.dumps({"global_step": step, "max_steps": 6}))
    with caplog.at_level("INFO", logger="llm_modules"):
        assert checkpoint_to_resume(tmp_path).name == "checkpoint-4"
        assert checkpoint_to_resume(tmp_path / "elsewhere") is None
    assert caplog.messages == [
        "resuming from checkpoint-4 (step 4 of 6)",  # a resumed run says so
        f"--resume: no complete checkpoint in {tmp_path / 'elsewhere'}: starting from step 0",
    ]


class CrashMidSave(Exception):
    """What a kill -9 during a checkpoint's save leaves, in process: the weights written, the optimizer state not."""


def test_a_save_cut_off_leaves_no_checkpoint_dir_and_resume_then_starts_from_step_0(tiny_pair, tmp_path, monkeypatch, caplog):
    from transformers import Trainer

    save_optimizer = Trainer._save_optimizer_and_scheduler

    def crash_at_step_2(self, output_dir):
        if self.state.global_step == 2:
            raise CrashMidSave
        save_optimizer(self, output_dir)

    model = compose(tiny_pair)
    train_set, _ = data(model)
    opts = options(tmp_path, save_steps=2, max_steps=4)
    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", crash_at_step_2)
    with pytest.raises(CrashMidSave):
        train(model, model.tokenizer, train_set, None, opts)
    out = Path(opts.output_dir)
    # Staged, then renamed when whole: the half-written save is under no checkpoint-N name.
    assert not list(out.glob("checkpoint-*")) and list(out.glob("*/checkpoint-2/model.safetensors"))

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", save_optimizer)
    model = compose(tiny_pair)
    with caplog.at_level("WARNING", logger="llm_modules"):
        trainer = train(model, model.tokenizer, train_set, None, dataclasses.replace(opts, resume=True))
    assert trainer.state.global_step == 4
    assert f"--resume: no complete checkpoint in {out}: starting from step 0" in caplog.messages
    assert [c.name for c in complete_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # the staging dir is gone


def test_resume_refuses_other_data_options(tmp_path):
    saved = options(tmp_path)
    Path(saved.output_dir).mkdir(parents=True)
    (Path(saved.output_dir) / "training_options.json").write_text(json.dumps(saved.to_dict()))
    check_resume_options(options(tmp_path, resume=True, epochs=3))  # with max_steps set, epochs change nothing
    check_resume_options(options(tmp_path, resume=True, logging_steps=5, trainer_args={"disable_tqdm": False}))
    with pytest.raises(ConflictingOptionsError, match=r"seed \(--seed\): saved 42, now 7"):
        check_resume_options(options(tmp_path, resume=True, seed=7))


@pytest.mark.parametrize(
    "change, named",
    [
        # One setting, whichever way it is given: an option (a flag) or a TrainingArguments field (transformers#21271).
        ({"batch_size": 1}, "per_device_train_batch_size (--batch-size): saved 2, now 1"),
        ({"trainer_args": {"per_device_train_batch_size": 1}}, "per_device_train_batch_size (--batch-size): saved 2, now 1"),
        ({"trainer_args": {"gradient_accumulation_steps": 4}}, "gradient_accumulation_steps (--grad-accum): saved 1, now 4"),
        ({"lr_scheduler": "linear"}, "lr_scheduler_type (lr_scheduler): saved 'constant_with_warmup', now 'linear'"),
        ({"max_steps": 8}, "max_steps (--max-steps): saved 4, now 8"),
        ({"lr_bridge": 1e-3}, "lr_bridge (--lr-bridge): saved 0.003, now 0.001"),
        ({"trainer_args": {"adam_beta2": 0.95}}, "adam_beta2: saved 0.999, now 0.95"),
        ({"subset": 0.5}, "subset (--subset): saved 1.0, now 0.5"),
    ],
)
def test_resume_refuses_any_setting_that_changes_the_run_however_it_is_given(tmp_path, change, named):
    saved = options(tmp_path)
    Path(saved.output_dir).mkdir(parents=True)
    (Path(saved.output_dir) / "training_options.json").write_text(json.dumps(saved.to_dict(), default=str))
    with pytest.raises(ConflictingOptionsError) as refused:
        check_resume_options(options(tmp_path, resume=True, **change))
    message = str(refused.value)
    assert named in message and "\n" not in message and message.startswith(f"--resume: the run in {saved.output_dir}")


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, **kwargs)


def train_args(tiny_pair, dataset_file, output_dir, *extra: str) -> list[str]:
    return [
        "train", "--large", str(tiny_pair[0]), "--small", str(tiny_pair[1]), "--dataset", str(dataset_file),
        "--output-dir", str(output_dir), "--subset", "1", "--lr-bridge", "3e-3", "--lr-small", "3e-3",
        "--logging-steps", "1", *extra,
    ]


@pytest.mark.slow
def test_resume_after_kill_minus_9_mid_save_ends_with_the_same_weights(tiny_pair, dataset_file, tmp_path):
    extra = ("--max-steps", "8", "--batch-size", "2", "--save-steps", "2", "--val-split", "0.25")
    straight = run([sys.executable, "-m", "llm_modules.cli", *train_args(tiny_pair, dataset_file, tmp_path / "a", *extra)])
    assert straight.returncode == 0, straight.stderr[-2000:]

    # SIGKILL while checkpoint-6 is half written: its weights are on disk, its optimizer state is not.
    killed_dir = tmp_path / "b"
    killed = run([sys.executable, str(TESTS / "train_until_killed.py"), "6",
                  *train_args(tiny_pair, dataset_file, killed_dir, *extra)])
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (killed_dir / ".partial-checkpoints" / "checkpoint-6" / "model.safetensors").is_file()
    assert not (killed_dir / "checkpoint-6").exists()  # staged: renamed only once whole
    assert [c.name for c in complete_checkpoints(killed_dir)] == ["checkpoint-2", "checkpoint-4"]

    resumed = run([sys.executable, "-m", "llm_modules.cli", *train_args(tiny_pair, dataset_file, killed_dir, *extra), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "checkpoint-6: its save never finished" in resumed.stderr
    expected, got = load_file(tmp_path / "a" / "model.safetensors"), load_file(killed_dir / "model.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


@pytest.mark.slow
def test_resume_after_kill_minus_9_during_the_first_save_starts_from_step_0(tiny_pair, dataset_file, tmp_path):
    extra = ("--max-steps", "4", "--batch-size", "2", "--save-steps", "2", "--val-split", "0")
    out = tmp_path / "run"
    killed = run([sys.executable, str(TESTS / "train_until_killed.py"), "2", *train_args(tiny_pair, dataset_file, out, *extra)])
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not list(out.glob("checkpoint-*"))
    resumed = run([sys.executable, "-m", "llm_modules.cli", *train_args(tiny_pair, dataset_file, out, *extra), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"--resume: no complete checkpoint in {out}: starting from step 0" in resumed.stderr.splitlines()
    assert "trained 4 steps" in resumed.stdout


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(tiny_pair, dataset_file, tmp_path):
    config = tmp_path / "no_dropout.yaml"
    config.write_text("model_options:\n  dropout: 0.0\nval_split: 0.0\nmax_steps: 3\n")
    single = run([sys.executable, "-m", "llm_modules.cli",
                  *train_args(tiny_pair, dataset_file, tmp_path / "one", "--config", str(config), "--batch-size", "2")])
    assert single.returncode == 0, single.stderr[-2000:]
    double = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                  "-m", "llm_modules.cli",
                  *train_args(tiny_pair, dataset_file, tmp_path / "two", "--config", str(config), "--batch-size", "1")])
    assert double.returncode == 0, double.stderr[-3000:]
    one, two = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert "trained 3 steps" in single.stdout and "trained 3 steps" in double.stdout
    for name in one:
        torch.testing.assert_close(two[name], one[name], msg=name)


def test_a_plain_transformers_trainer_accumulates_like_one_big_batch(tiny_pair, tmp_path):
    """Users who bring their own `transformers.Trainer` get exact accumulation from the model's own loss."""
    from transformers import Trainer, TrainingArguments

    from llm_modules.data import DataCollatorForLLMModules

    weights = []
    for batch_size, grad_accum in ((2, 1), (1, 2)):
        model = compose(tiny_pair, dropout=0.0)
        train_set, _ = data(model)
        args = TrainingArguments(
            output_dir=str(tmp_path / f"{batch_size}x{grad_accum}"), per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=grad_accum, max_steps=3, learning_rate=3e-3, save_strategy="no",
            report_to="none", disable_tqdm=True, use_cpu=True, seed=0,
        )
        collator = DataCollatorForLLMModules(model.tokenizer.pad_token_id)
        Trainer(model=model, args=args, train_dataset=train_set, data_collator=collator).train()
        weights.append(model.trained_state_dict())
    for name in weights[0]:
        torch.testing.assert_close(weights[0][name], weights[1][name], msg=name)
