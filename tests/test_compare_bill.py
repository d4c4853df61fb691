"""The bill of `llm-modules compare` (`compare/bill.py`): decode speed, weights read, disk, peak memory, training
multiply-adds, on tiny models."""

from __future__ import annotations

import math
import time

import psutil
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from llm_modules.compare import bill
from llm_modules.compare.bill import (
    PeakRSS,
    decode_seconds_per_token,
    disk_bytes,
    train_multiply_adds,
    weights_per_token,
    weights_read_per_token,
)

MB = 10**6


def lora_model(directory):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(directory).eval()
    return get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)).eval()


def test_decode_seconds_per_token_for_plain_lora_and_combined_models(tiny_dirs, tiny_model, one_thread):
    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["qwen2"])
    plain = AutoModelForCausalLM.from_pretrained(tiny_dirs["qwen2"]).eval()
    for model in (plain, lora_model(tiny_dirs["qwen2"]), tiny_model):
        seconds = decode_seconds_per_token(model, tokenizer, context=24, new_tokens=8)
        assert seconds > 0 and math.isfinite(seconds), type(model).__name__
    with pytest.raises(ValueError, match="new_tokens"):
        decode_seconds_per_token(plain, tokenizer, new_tokens=1)


def test_decoding_past_the_small_models_causal_table_leaves_the_model_trainable(tiny_dirs, tiny_model, one_thread):
    # The tiny GPT-Neo's causal table has 256 rows; generating past it grows the table during the measurement.
    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["qwen2"])
    decode_seconds_per_token(tiny_model, tokenizer, context=260, new_tokens=2, repeats=1)
    ids = torch.randint(10, 300, (1, 270))
    tiny_model.train()(input_ids=ids, labels=ids).loss.backward()


def test_weights_read_per_token_by_hand_for_plain_models(tiny_dirs):
    # Tiny Qwen2: width 64, 2 layers, 4 query heads and 2 KV heads of 16, MLP 128, input/output embeddings tied.
    qwen = AutoModelForCausalLM.from_pretrained(tiny_dirs["qwen2"])
    d, kv, mlp, vocab = 64, 32, 128, qwen.config.vocab_size
    layer = (d * d + d) + 2 * (d * kv + kv) + d * d + 3 * d * mlp + 2 * d  # q, k and v with biases, o, MLP, 2 norms
    expected = vocab * d + 2 * layer + d  # the tied table once, whole (the head reads it), and the final norm
    assert weights_per_token(qwen) == expected
    assert weights_read_per_token(qwen) == 4 * expected  # float32
    assert weights_read_per_token(qwen.to(torch.bfloat16)) == 2 * expected

    # Tiny Llama (untied): its token embeddings are a lookup of one row of 48, the head is read whole.
    llama = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"])
    table = llama.get_input_embeddings().weight
    params = sum(p.numel() for p in llama.parameters())
    assert weights_per_token(llama) == params - table.numel() + 48
    head = llama.lm_head.weight.numel()
    assert weights_per_token(llama, exclude=[llama.lm_head]) == params - table.numel() + 48 - head


def test_weights_read_per_token_of_lora_counts_base_and_adapters(tiny_dirs):
    model = lora_model(tiny_dirs["qwen2"])
    adapters = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert adapters == 2 * ((64 * 4 + 4 * 64) + (64 * 4 + 4 * 32))  # 2 layers x (q: 64->4->64, v: 64->4->32)
    base = weights_per_token(AutoModelForCausalLM.from_pretrained(tiny_dirs["qwen2"]))
    assert weights_per_token(model) == base + adapters
    assert weights_per_token(model.merge_and_unload()) == base


def test_weights_read_per_token_of_combined_model_skips_bypassed_parts(tiny_model):
    summary = tiny_model.parameter_summary()
    large_table = tiny_model.large.get_input_embeddings().weight
    positions = tiny_model.small.wpe.weight  # GPT-Neo's, read at one row like a token table
    expected = (summary["frozen_large"] - large_table.numel() + large_table.shape[1]
                + summary["trainable"] - positions.numel() + positions.shape[1])
    assert weights_per_token(tiny_model) == expected
    assert weights_read_per_token(tiny_model) == 4 * expected
    # The trained parts (what training multiply-adds are counted over) and the frozen model add up to the whole.
    trained = sum(weights_per_token(part) for part in tiny_model.trained_parts())
    assert trained + weights_per_token(tiny_model.large) == expected
    # The small model's own token table is never read, whatever it holds: a full one counts nothing either.
    tiny_model.small.set_input_embeddings(nn.Embedding(400, tiny_model.config.small_hidden_size))
    assert weights_per_token(tiny_model) == expected


def test_weights_per_token_on_meta_model(tiny_dirs):
    config = AutoModelForCausalLM.from_pretrained(tiny_dirs["qwen2"]).config
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    assert weights_per_token(meta) == weights_per_token(AutoModelForCausalLM.from_pretrained(tiny_dirs["qwen2"]))


def test_disk_bytes(tmp_path):
    (tmp_path / "model" / "sub").mkdir(parents=True)
    (tmp_path / "model" / "a.bin").write_bytes(b"x" * 1000)
    (tmp_path / "model" / "sub" / "b.json").write_bytes(b"y" * 24)
    (tmp_path / "adapter.safetensors").write_bytes(b"z" * 7)
    (tmp_path / "model" / "link").symlink_to(tmp_path / "adapter.safetensors")
    # The link's target is also passed by name: it counts once.
    assert disk_bytes(tmp_path / "model", tmp_path / "adapter.safetensors") == 1031
    assert disk_bytes(str(tmp_path / "model" / "a.bin")) == 1000
    with pytest.raises(FileNotFoundError):
        disk_bytes(tmp_path / "missing")


@pytest.mark.parametrize("method", ["vmhwm", "sampled"])
def test_peak_rss_sees_an_allocation_freed_inside_the_block(method, monkeypatch, tmp_path):
    if method == "sampled":
        monkeypatch.setattr(bill, "_CLEAR_REFS", str(tmp_path / "no" / "clear_refs"))
    held = torch.ones(50_000_000)  # freed before the block: trimmed at its start, not counted as its memory
    del held
    with PeakRSS() as peak:
        block = torch.ones(50_000_000)  # 200 MB, every page touched
        time.sleep(0.2)  # several of the fallback's samples
        del block
    assert peak.method == method
    assert peak.peak_bytes - peak.start_bytes >= 190 * MB
    # It was freed: a peak, not the end (once the allocator hands the pages back, which a long test process's glibc
    # does only when asked).
    bill._release_free_heap()
    assert psutil.Process().memory_info().rss < peak.peak_bytes - 150 * MB


def test_train_multiply_adds_on_hand_numbers():
    # 1000 tokens x 2 epochs: 10 trained (3 each), 100 frozen with backprop (2 each), 7 frozen forward (1 each),
    # plus 1000 frozen read once.
    assert train_multiply_adds(1000, 2, trained=10) == 60_000
    assert train_multiply_adds(1000, 2, trained=10, frozen_backprop=100, frozen_forward=7) == 1000 * 2 * (30 + 200 + 7)
    assert train_multiply_adds(1000, 2, trained=10, frozen_forward_once=1000) == 60_000 + 1_000_000
    assert train_multiply_adds(1000, 1.5, trained=10) == 45_000
    big = train_multiply_adds(10**6, 8, trained=2 * 10**8, frozen_forward_once=1_500_000_001)
    assert big == 10**6 * (8 * 6 * 10**8 + 1_500_000_001)  # exact, past float precision
    with pytest.raises(ValueError):
        train_multiply_adds(1000, -1, trained=10)
