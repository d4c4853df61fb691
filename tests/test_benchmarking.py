"""The benchmark code paths on tiny configs: result and table shapes, cached == recompute tokens; memory options.

No timing assertions: speed goals live in benchmarks/ (docs/performance.md); these tests only check that the
benchmarks measure what they say and report it in the documented shape.
"""

from __future__ import annotations

import importlib.util
import json
import math
import runpy
import sys
from pathlib import Path

import pytest
import torch

from llm_modules import LLMModulesConfig, LLMModulesForCausalLM
from llm_modules.benchmarking import bench_decode, bench_train, format_decode, format_train
from llm_modules.cli import main as cli_main

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
HAS_BITSANDBYTES = importlib.util.find_spec("bitsandbytes") is not None


def quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def tiny_config() -> LLMModulesConfig:
    """Qwen2 + GPT-Neo at toy sizes; the small model's vocabulary differs from the large one's, as at real size."""
    return LLMModulesConfig(
        large_config={
            "model_type": "qwen2", "vocab_size": 300, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "bos_token_id": 1, "eos_token_id": 2,
        },
        small_config={
            "model_type": "gpt_neo", "vocab_size": 200, "hidden_size": 32, "num_layers": 2, "num_heads": 4,
            "attention_types": [[["global", "local"], 1]], "window_size": 8, "max_position_embeddings": 64,
            "bos_token_id": 1, "eos_token_id": 2,
        },
        cross_attention_heads=4,
    )


def positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


def test_decode_bench_reports_every_path_and_cached_tokens_equal_recompute(tiny_config):
    result = bench_decode(
        tiny_config, contexts=(6, 20), new_tokens=5, recompute_tokens=5, prefill_context=12, prefill_repeats=2,
        batch_sizes=(1, 3), batch_context=4, log=quiet,
    )
    assert [row["context"] for row in result["decode"]] == [6, 20]
    for row in result["decode"]:
        # The paper's recompute scheme and the three caches pick the same greedy tokens.
        assert len(row["cached_tokens"]) == len(row["recompute_tokens"]) == 5
        assert row["cached_tokens"] == row["recompute_tokens"] and row["same_tokens"] is True
        for key in ("combined_cached_s", "combined_recompute_s", "large_alone_s", "small_alone_s",
                    "combined_prefill_s", "large_alone_prefill_s"):
            assert positive(row[key]), key
        assert row["floor_s"] == pytest.approx(row["large_alone_s"] + row["small_alone_s"])
        assert row["recompute_over_cached"] == pytest.approx(row["combined_recompute_s"] / row["combined_cached_s"])
        assert row["cached_over_floor"] == pytest.approx(row["combined_cached_s"] / row["floor_s"])
    prefill = result["prefill"]
    assert prefill["context"] == 12 and prefill["repeats"] == 2
    assert prefill["ratio"] == pytest.approx(prefill["combined_s"] / prefill["large_base_s"])
    assert [b["prompts"] for b in result["batched"]] == [1, 3]
    assert all(b["per_token_s"] == pytest.approx(b["step_s"] / b["prompts"]) for b in result["batched"])
    assert result["settings"]["dtype"] == result["settings"]["large_dtype"] == "float32"
    assert result["settings"]["clock"] == "wall"
    assert json.loads(json.dumps(result)) == result  # plain JSON all the way down

    table = format_decode(result)
    assert "qwen2 + gpt_neo" in table and "| context | combined, caches |" in table
    assert table.count("| yes |") == 2
    assert "| 12 |" in table  # the prefill row
    assert "| 3 |" in table  # the batched row


def test_train_bench_reports_both_steps_with_memory(tiny_config):
    result = bench_train(tiny_config, seq_lens=(8, 24), steps=2, clock="cpu", log=quiet)
    assert result["settings"]["clock"] == "cpu"
    assert [row["sequence"] for row in result["train"]] == [8, 24]
    for row in result["train"]:
        assert row["batch"] == 1 and positive(row["large_forward_s"])
        for name in ("no_cache", "feature_cache"):
            step = row[name]
            assert positive(step["step_s"])
            assert step["tokens_per_s"] == pytest.approx(row["sequence"] / step["step_s"])
            if sys.platform == "linux":  # the process's peak resident set, weights included
                assert 0.01 < step["peak_gib"] < 64
        assert row["cache_over_no_cache"] == pytest.approx(row["feature_cache"]["step_s"] / row["no_cache"]["step_s"])
        assert row["large_share"] == pytest.approx(row["large_forward_s"] / row["no_cache"]["step_s"])
    assert result["parameters"]["trainable"] > 0
    assert json.loads(json.dumps(result)) == result

    table = format_train(result)
    assert "| sequence | batch | feature cache | step (s) |" in table
    assert table.count("| 24 | 1 |") == 2  # with and without the feature cache


def test_cli_bench_prints_tables_and_writes_json(tiny_config, tmp_path, capsys):
    tiny_config.save_pretrained(tmp_path / "config")
    out = tmp_path / "results" / "decode.json"
    code = cli_main([
        "bench", "decode", "--config", str(tmp_path / "config"), "--contexts", "5", "--new-tokens", "3",
        "--recompute-tokens", "2", "--prefill-context", "5", "--prefill-repeats", "1", "--batch-sizes", "2",
        "--batch-context", "3", "--json", str(out),
    ])
    assert code == 0
    assert "Decode, seconds per generated token" in capsys.readouterr().out
    decoded = json.loads(out.read_text())
    assert decoded["benchmark"] == "decode" and decoded["decode"][0]["same_tokens"] is True
    assert not list(out.parent.glob("*.tmp"))


def test_benchmark_script_is_the_cli_command(tiny_config, tmp_path, capsys, monkeypatch):
    tiny_config.save_pretrained(tmp_path / "config")
    out = tmp_path / "train.json"
    monkeypatch.setattr(
        sys, "argv",
        ["train_step.py", "--config", str(tmp_path / "config"), "--seq-lens", "6", "--large-dtype", "bfloat16",
         "--json", str(out)],
    )
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(BENCHMARKS / "train_step.py"), run_name="__main__")
    assert exit_info.value.code == 0
    assert "Training step" in capsys.readouterr().out
    settings = json.loads(out.read_text())["settings"]
    assert settings["large_dtype"] == "bfloat16" and settings["dtype"] == "float32"


@pytest.mark.parametrize(
    "args, message",
    [
        (["decode", "--new-tokens", "1"], "--new-tokens: invalid integer >= 2 value: '1'"),
        (["train", "--seq-lens", "256", "0"], "--seq-lens: invalid integer >= 2 value: '0'"),
        (["decode", "--threads", "zero"], "--threads: invalid integer >= 1 value: 'zero'"),
    ],
)
def test_cli_bench_rejects_bad_numbers(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["bench", *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_bench_names_a_missing_config(tmp_path, capsys):
    assert cli_main(["bench", "train", "--config", str(tmp_path / "nowhere")]) == 3  # missing: exit code 3
    assert f"--config {tmp_path / 'nowhere'}: no such file or directory" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without a GPU")
def test_cli_bench_on_a_missing_gpu_says_so(capsys):
    assert cli_main(["bench", "decode", "--device", "cuda"]) == 2
    assert "no CUDA GPU is available here" in capsys.readouterr().err


# ---- memory options: the frozen model quantized through bitsandbytes -----------------------------------------


@pytest.mark.skipif(HAS_BITSANDBYTES, reason="checks the message shown when bitsandbytes is missing")
def test_quantized_large_model_without_bitsandbytes_says_what_to_install(tiny_pair):
    from transformers import BitsAndBytesConfig

    with pytest.raises(ImportError, match="bitsandbytes"):
        LLMModulesForCausalLM.from_large_and_small(
            *tiny_pair, cross_attention_heads=4, quantization_config=BitsAndBytesConfig(load_in_8bit=True)
        )


@pytest.mark.skipif(not (HAS_BITSANDBYTES and torch.cuda.is_available()), reason="needs bitsandbytes and a GPU")
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_large_model_generates_and_trains(tiny_pair, bits):
    from transformers import BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_8bit=True) if bits == 8 else BitsAndBytesConfig(load_in_4bit=True)
    torch.manual_seed(0)
    model = LLMModulesForCausalLM.from_large_and_small(
        *tiny_pair, cross_attention_heads=4, quantization_config=quantization, device_map="cuda"
    )
    weight = model.large.layers[0].mlp.up_proj.weight
    assert weight.dtype == (torch.int8 if bits == 8 else torch.uint8)  # stored quantized
    assert model.lm_head.weight.dtype == torch.float32 and model.lm_head.weight.is_cuda
    ids = torch.randint(10, 300, (1, 12), device="cuda")
    model.train()
    model(ids, labels=ids).loss.backward()
    assert model.bridge.pre_proj.weight.grad is not None
    model.eval()
    assert model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False).shape == (1, 16)
