"""Two processes on CPU with gloo, launched by `accelerate launch` with the shipped configs (examples/accelerate/):
FSDP2 and DDP train like one process, leave every frozen tensor bit-identical, and resume a checkpoint to the result of
the run that was never interrupted; an FSDP2 checkpoint converts to the `save_pretrained` layout.

Tolerance of the loss curves: float32 throughout, and the two runs see the same examples per optimizer step (one
process with batch 2; two with batch 1 each). They differ only in the order of the additions: each process sums its
own example's gradient and the two sums are then reduced, where one process sums both in one batched kernel. That is
a few float32 ulps per gradient; after 4 AdamW steps at lr 3e-3 the logged losses agree to rtol 1e-5 (measured:
about 1e-7) and the weights within `torch.testing.assert_close`'s float32 default (rtol 1.3e-6, atol 1e-5), as the
DDP test of test_training.py. Resumed against uninterrupted runs of the same layout are compared exactly.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llm_modules import LLMModulesForCausalLM
from llm_modules.distributed import FSDP_MODEL_DIR, convert_checkpoint

from test_training import stratos_rows

ROOT = Path(__file__).parent.parent
WORKER = Path(__file__).parent / "distributed_worker.py"
CONFIGS = ROOT / "examples" / "accelerate"
STEPS, SAVE_STEPS = 4, 2

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(config: str | None, result: Path, tiny_pair, data: Path, output_dir: Path, *extra: str) -> dict:
    """The worker as one process (config None, batch 2) or as two under `accelerate launch --config_file` (batch 1)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    batch = "2" if config is None else "1"
    args = [str(WORKER), str(result), str(tiny_pair[0]), str(tiny_pair[1]), str(data), str(output_dir), str(STEPS),
            batch, str(SAVE_STEPS), *extra]
    if config is None:
        command = [sys.executable, *args]
    else:
        # --mixed_precision no: the configs say bf16 for GPUs; the comparison is in float32.
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config),
                   "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                   "--main_process_port", str(free_port()), *args]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(result.read_text())


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "stratos.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in stratos_rows()))
    return path


@pytest.fixture(scope="module")
def one_process(tiny_pair, data_file, tmp_path_factory) -> tuple[dict, Path]:
    root = tmp_path_factory.mktemp("one")
    return launch(None, root / "result.json", tiny_pair, data_file, root / "out"), root / "out"


def two_process_run(config, tiny_pair, data_file, tmp_path_factory) -> tuple[dict, Path]:
    root = tmp_path_factory.mktemp(config.split(".")[0])
    return launch(config, root / "result.json", tiny_pair, data_file, root / "out"), root / "out"


@pytest.fixture(scope="module")
def fsdp2_run(tiny_pair, data_file, tmp_path_factory):
    return two_process_run("fsdp2.yaml", tiny_pair, data_file, tmp_path_factory)


@pytest.fixture(scope="module")
def ddp_run(tiny_pair, data_file, tmp_path_factory):
    return two_process_run("ddp.yaml", tiny_pair, data_file, tmp_path_factory)


def check_like_one_process(run: tuple[dict, Path], one_process: tuple[dict, Path]) -> None:
    (two, two_dir), (one, one_dir) = run, one_process
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert two["steps"] == one["steps"] == STEPS and len(two["losses"]) == STEPS
    for step, loss in one["losses"].items():
        assert two["losses"][step] == pytest.approx(loss, rel=1e-5), step
    for result in (one, two):
        assert result["frozen_identical"] and result["frozen_tensors"] > 0  # bit-identical, every one
        assert result["frozen_without_grad"] and result["optimizer_trained_only"] is not False  # None: DeepSpeed's
    expected, got = load_file(one_dir / "model.safetensors"), load_file(two_dir / "model.safetensors")
    assert expected.keys() == got.keys() and not any(k.startswith("sources.") for k in got)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], msg=name)


def resume_from_first_checkpoint(config, run, tiny_pair, data_file, tmp_path) -> Path:
    """Copy the run's checkpoint-2 into a fresh dir and resume there to step 4; returns that dir."""
    straight, out = run
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(out / f"checkpoint-{SAVE_STEPS}", resumed / f"checkpoint-{SAVE_STEPS}")
    result = launch(config, tmp_path / "result.json", tiny_pair, data_file, resumed, "--resume")
    assert result["steps"] == STEPS
    assert result["losses"] == straight["losses"]  # steps 1-2 from the checkpoint's state, 3-4 trained again: equal
    assert result["frozen_identical"]
    return resumed


def assert_same_weights(a: Path, b: Path) -> None:
    expected, got = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_fsdp2_two_processes_train_like_one_and_leave_the_frozen_sources_bit_identical(fsdp2_run, one_process):
    result, out = fsdp2_run
    assert result["fsdp"] and result["sharded_params"] > 0  # FSDP2 ran, on CPU, and sharded the weights
    assert result["frozen_layer_units"] == result["frozen_layers"] > 0  # each frozen decoder layer a unit of its own
    check_like_one_process(fsdp2_run, one_process)
    checkpoint = out / f"checkpoint-{SAVE_STEPS}"
    assert (checkpoint / FSDP_MODEL_DIR).is_dir() and (checkpoint / "optimizer_0").is_dir()
    assert not (checkpoint / "model.safetensors").exists()  # sharded, not gathered


def test_fsdp2_checkpoint_resumes_to_the_uninterrupted_run_and_converts_for_one_process(
    fsdp2_run, tiny_pair, data_file, tmp_path
):
    _, out = fsdp2_run
    resumed = resume_from_first_checkpoint("fsdp2.yaml", fsdp2_run, tiny_pair, data_file, tmp_path)
    assert_same_weights(out, resumed)

    # The sharded checkpoint of the last step is the final model, in the save_pretrained layout, in one process.
    converted = convert_checkpoint(out / f"checkpoint-{STEPS}", tmp_path / "converted")
    assert_same_weights(out, converted)
    model = LLMModulesForCausalLM.from_pretrained(converted)
    final = LLMModulesForCausalLM.from_pretrained(out)
    batch = model.tokenizer("what is 1 plus 2?", return_tensors="pt")
    assert torch.equal(model(**batch).logits, final(**batch).logits)


def test_ddp_two_processes_train_like_one_and_resume_to_the_uninterrupted_run(
    ddp_run, one_process, tiny_pair, data_file, tmp_path
):
    result, out = ddp_run
    assert not result["fsdp"] and result["sharded_params"] == 0
    check_like_one_process(ddp_run, one_process)
    resumed = resume_from_first_checkpoint("ddp.yaml", ddp_run, tiny_pair, data_file, tmp_path)
    assert_same_weights(out, resumed)


@pytest.mark.parametrize("config", ["deepspeed_zero2.yaml", "deepspeed_zero3.yaml"])
def test_deepspeed_two_processes_train_like_one_and_resume_to_the_uninterrupted_run(
    config, one_process, tiny_pair, data_file, tmp_path_factory, tmp_path
):
    """DeepSpeed runs on CPU here: its CPU accelerator, gloo, and its shared-memory all-reduce op (built on first use
    with ninja and the system C++ compiler)."""
    import deepspeed  # noqa: F401  (the test extra brings it: a missing one fails here, it is never skipped)
    run = two_process_run(config, tiny_pair, data_file, tmp_path_factory)
    assert run[0]["deepspeed"]
    check_like_one_process(run, one_process)
    resumed = resume_from_first_checkpoint(config, run, tiny_pair, data_file, tmp_path)
    assert_same_weights(run[1], resumed)


def test_converting_what_is_no_sharded_checkpoint_says_so_in_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^\S+ is no sharded checkpoint \(it has no pytorch_model_fsdp_0/ dir\)$"):
        convert_checkpoint(tmp_path, tmp_path / "out")


def train_with_feature_cache(config: str | None, tiny_pair, data: Path, root: Path) -> tuple[dict, str]:
    """`llm-modules train --feature-cache` as one process (batch 2) or two under `accelerate launch -m llm_modules`
    (batch 1 each); returns the logged losses by step and the command's stderr (both ranks')."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    options = root / "options.json"  # no dropout: its random masks would differ between one process and two
    root.mkdir(parents=True, exist_ok=True)
    options.write_text(json.dumps({"model_options": {"dropout": 0.0, "cross_attention_heads": 4}}))
    train = ["train", "--config", str(options), "--large", str(tiny_pair[0]), "--small", str(tiny_pair[1]), "--dataset", str(data),
             "--output-dir", str(root / "out"), "--feature-cache", str(root / "features"), "--max-steps", str(STEPS),
             "--batch-size", "2" if config is None else "1", "--val-split", "0.25", "--logging-steps", "1",
             "--save-steps", str(STEPS), "--lr-bridge", "3e-3", "--lr-small", "3e-3", "--seed", "0"]
    if config is None:
        command = [sys.executable, "-m", "llm_modules", *train]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config),
                   "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                   "--main_process_port", str(free_port()), "-m", "llm_modules", *train]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    state = json.loads((root / "out" / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    return {log["step"]: log["loss"] for log in state["log_history"] if "loss" in log}, done.stderr


def test_feature_cache_is_built_once_and_read_by_every_rank(tiny_pair, data_file, tmp_path):
    """Under FSDP2 with two processes the main process computes the frozen states once (train and validation
    splits: one build line each, where two ranks building would say it four times), the other rank opens that
    cache, and the run trains as one process on its own cache does (same tolerance as above)."""
    one, _ = train_with_feature_cache(None, tiny_pair, data_file, tmp_path / "one")
    two, stderr = train_with_feature_cache("fsdp2.yaml", tiny_pair, data_file, tmp_path / "two")
    assert stderr.count("running the frozen model once over") == 2, stderr[-3000:]
    assert len(one) == len(two) == STEPS
    for step, loss in one.items():
        assert two[step] == pytest.approx(loss, rel=1e-5), step
    for split in ("train", "validation"):
        assert (tmp_path / "two" / "features" / split / "manifest.json").is_file()
