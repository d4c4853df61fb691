"""The memory plan per rank (src/llm_modules/benchmarking/memory.py) on hand-checkable counts, and
`llm-modules bench memory` on a real pair's published config (meta device, no download)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from llm_modules.benchmarking.memory import DDP_BROADCAST_IN_FLIGHT, GIB, ModelCounts, plan

M = 2**20
COUNTS = ModelCounts(frozen=1000 * M, largest_frozen_unit=100 * M, largest_frozen_layer=50 * M, trained=100 * M,
                     largest_trained_unit=20 * M, small_width=256, small_layers=4, bridge_layers=1, large_width=1024,
                     large_intermediate=4096, vocab=32000)


def test_ddp_replicates_everything_and_keeps_a_gradient_bucket_copy():
    one, two = plan(COUNTS, "ddp", 1), plan(COUNTS, "ddp", 2)
    assert one["frozen"] == two["frozen"] == 1000 * M * 2  # bf16 frozen weights, whole on every rank
    assert one["trained"] == two["trained"] == 100 * M * 4  # float32 master weights
    assert one["optimizer"] == two["optimizer"] == 100 * M * 8  # AdamW's two moments
    assert two["gradients"] == 2 * one["gradients"] == 100 * M * 8  # .grad and the reducer's buckets
    parts = ("frozen", "trained", "gradients", "optimizer", "activations")
    assert two["total"] == sum(two[p] for p in parts)


@pytest.mark.parametrize("strategy", ["fsdp2", "zero3"])
def test_sharding_divides_the_frozen_weights_and_optimizer_by_the_ranks(strategy):
    one, eight = plan(COUNTS, strategy, 1), plan(COUNTS, strategy, 8)
    assert one["frozen"] == 1000 * M * 2
    assert eight["frozen"] == 1000 * M * 2 / 8 + (100 + 50) * M * 2  # a shard, plus the running and prefetched units
    assert eight["optimizer"] == one["optimizer"] / 8
    assert eight["total"] < plan(COUNTS, "ddp", 8)["total"]


def test_load_peak_on_cpu_counts_what_preparing_adds():
    whole = 1000 * M * 4 + 100 * M * 4  # a CPU run: float32 throughout
    options = dict(frozen_dtype="float32", mixed_precision=False)
    assert plan(COUNTS, "ddp", 1, cpu=True, **options)["load_peak"] == whole
    # DDP's broadcast: two 250 MiB buckets in flight, and the reducer's float32 gradient buckets
    assert plan(COUNTS, "ddp", 2, cpu=True, **options)["load_peak"] == whole + DDP_BROADCAST_IN_FLIGHT + 100 * M * 4
    small = ModelCounts(**{**COUNTS.__dict__, "frozen": 10 * M, "trained": 10 * M})  # below one bucket pair
    assert plan(small, "ddp", 2, cpu=True, **options)["load_peak"] == 20 * M * 4 * 2 + 10 * M * 4
    assert plan(COUNTS, "fsdp2", 4, cpu=True, **options)["load_peak"] == whole * 1.25  # the shards beside the whole
    assert plan(COUNTS, "ddp", 2, **options)["load_peak"] == whole  # on GPUs the extra is device memory


def test_bench_memory_on_published_configs(tmp_path):
    out = tmp_path / "plan.json"
    done = subprocess.run([sys.executable, "-m", "llm_modules", "bench", "memory", "--ranks", "1", "8",
                           "--pairs", "qwen2.5-7b+smollm2-360m", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    by = {(r["strategy"], r["ranks"]): r for r in rows}
    assert set(by) == {(s, n) for s in ("ddp", "fsdp2", "zero3") for n in (1, 8)}
    assert by["ddp", 1]["frozen_params"] == pytest.approx(7.07e9, rel=0.01)  # Qwen2.5-7B without its LM head
    assert by["ddp", 8]["frozen"] == pytest.approx(by["ddp", 8]["frozen_params"] * 2 / GIB)
    assert by["fsdp2", 8]["total"] < by["ddp", 8]["total"] / 2
    assert "| fsdp2 | 8 |" in done.stdout
