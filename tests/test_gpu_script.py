"""benchmarks/gpu.sh on its CPU path (`--device cpu --tiny`): the script a GPU session runs once, checked here."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_gpu_module():
    spec = importlib.util.spec_from_file_location("gpu_benchmark", BENCHMARKS / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H200", 989.4), ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L40", 181.0), ("NVIDIA L4", 121.0), ("Some Future Card", None),
])
def test_bf16_peak_is_matched_on_the_most_specific_name(name, peak):
    assert load_gpu_module().bf16_peak(name) == peak


def test_gpu_script_runs_on_cpu_with_tiny_models_and_writes_json_and_markdown(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu.sh"), str(tmp_path / "out"), "--device", "cpu", "--tiny"],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "out" / "gpu.json").read_text())
    assert result["tiny"] is True and result["bf16_peak_tflops"] is None  # a CPU has no MFU
    row = result["train"]["train"][0]
    assert (row["sequence"], row["batch"]) == (32, 4)
    assert row["no_cache"]["tokens_per_s"] > 0 and row["feature_cache"]["tokens_per_s"] > 0
    assert result["mfu"]["no_cache"]["model_tflops"] > 0 and result["mfu"]["no_cache"]["mfu"] is None
    decode = result["decode"]["decode"][0]
    assert decode["same_tokens"] is True  # cached decoding == recompute, on the script's own models
    assert [b["prompts"] for b in result["decode"]["batched"]] == [1, 8, 32]
    markdown = (tmp_path / "out" / "gpu.md").read_text()
    assert "| feature cache | model TFLOP/s | MFU |" in markdown and "Batched generation" in markdown
    assert not list((tmp_path / "out").glob("*.tmp"))


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message shown when there is no GPU")
def test_gpu_script_without_a_gpu_says_so_and_exits_2(tmp_path):
    done = subprocess.run([sys.executable, str(BENCHMARKS / "gpu.py"), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "no CUDA device is visible" in done.stderr
    assert not (tmp_path / "out").exists()
