"""Measured peak memory per rank of a few training steps on CPU, next to `llm-modules bench memory`'s plan.

Run alone (it measures memory) and under the exclusive lock, one process or several:

    flock /tmp/llm-modules-cpu.lock python benchmarks/memory_check.py --size small
    flock /tmp/llm-modules-cpu.lock accelerate launch --config_file examples/accelerate/fsdp2.yaml \
        --num_processes 2 --mixed_precision no benchmarks/memory_check.py --size small
    (ddp.yaml likewise)

Random weights from configs (a Qwen2 source and a Llama small model, float32 throughout, as on CPU), random tokens.
The process's resident memory is sampled every 2 ms, in two phases, each figure its peak minus the resident memory
before the model was built (Python, torch, transformers, accelerate loaded): loading (building the pair, then the
Trainer preparing it: sharding, under FSDP2) up to the first training step, against the plan's load peak; and
training, from the first step to the last, against the plan's total. glibc is told to hand every allocation over
64 KiB back to the system when freed (MALLOC_MMAP_THRESHOLD_, set before torch starts), so the full-size weights that
sharding frees do not stay resident into the training phase (measured: resident memory at the first step is the live
tensors' bytes within 0.02 GiB). Rank 0 prints plan and measure side by side.
"""

from __future__ import annotations

import os
import sys

if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":  # must be set before the allocator starts: re-exec once
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import psutil  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

SIZES = {  # (source: hidden, layers, heads, kv heads, intermediate, vocab), (small: hidden, layers, heads, intermediate)
    "tiny": ((64, 2, 4, 2, 128, 320), (32, 2, 4, 64)),
    "small": ((1024, 8, 16, 4, 2816, 32000), (256, 4, 4, 704)),
}


def configs(size: str):
    from transformers import AutoConfig

    from llm_modules.configuration import LLMModulesConfig

    (h, layers, heads, kv, inter, vocab), (sh, sl, sheads, sinter) = SIZES[size]
    large = AutoConfig.for_model("qwen2", hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
                                 num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab,
                                 tie_word_embeddings=False)
    small = AutoConfig.for_model("llama", hidden_size=sh, num_hidden_layers=sl, num_attention_heads=sheads,
                                 num_key_value_heads=sheads, intermediate_size=sinter, vocab_size=vocab)
    return LLMModulesConfig(large_config=large, small_config=small, cross_attention_heads=4, dropout=0.0,
                            large_model_name_or_path="random")


class PeakSampler(threading.Thread):
    """Peak resident memory per phase ("load", then "train" once `phase` is switched)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.process, self.running, self.phase = psutil.Process(), True, "load"
        self.peaks = {"load": 0, "train": 0}

    def run(self):
        while self.running:
            phase, rss = self.phase, self.process.memory_info().rss
            self.peaks[phase] = max(self.peaks[phase], rss)
            time.sleep(0.002)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=list(SIZES), default="small")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    from transformers import TrainerCallback

    from llm_modules.benchmarking.memory import GIB, count, plan
    from llm_modules.modeling import LLMModulesForCausalLM
    from llm_modules.training import TrainingOptions, build_trainer

    baseline = psutil.Process().memory_info().rss  # the libraries loaded, no model yet

    sampler = PeakSampler()
    sampler.start()
    config = configs(args.size)
    torch.manual_seed(0)
    model = LLMModulesForCausalLM(config)
    vocab = config.vocab_size
    rows = [{"input_ids": ids, "attention_mask": [1] * args.seq_len, "labels": ids}
            for ids in torch.randint(0, vocab, (64, args.seq_len)).tolist()]

    class Measure(TrainerCallback):
        def on_step_begin(self, a, state, control, **kwargs):
            if state.global_step == 0:
                sampler.phase = "train"  # the model is prepared (sharded, under FSDP2)

        def on_train_end(self, a, state, control, **kwargs):
            sampler.running = False

    options = TrainingOptions(output_dir="/tmp/llm-modules-memory-check", max_steps=args.steps, batch_size=1,
                              val_split=0.0, report_to="none", save_steps=10**6, logging_steps=10**6,
                              trainer_args={"disable_tqdm": True, "save_strategy": "no"})

    class Tokens:
        pad_token_id = 0

    trainer = build_trainer(model, Tokens(), rows, None, options, callbacks=[Measure()])
    trainer.train()
    sampler.join()
    measured = [(sampler.peaks[phase] - baseline) / GIB for phase in ("train", "load")]
    world = trainer.args.world_size
    strategy = "fsdp2" if trainer.is_fsdp_enabled else "ddp"
    planned = plan(count(config), strategy, world, seq_len=args.seq_len, frozen_dtype="float32", mixed_precision=False,
                   cpu=True)
    peaks = trainer.accelerator.gather(torch.tensor([measured])).tolist()  # [[train, load] per rank]
    if trainer.is_world_process_zero():
        result = {
            "size": args.size, "strategy": strategy, "ranks": world, "seq_len": args.seq_len,
            "planned_gib": planned["total"] / GIB, "measured_gib_per_rank": [p[0] for p in peaks],
            "planned_load_peak_gib": planned["load_peak"] / GIB, "measured_load_peak_gib_per_rank": [p[1] for p in peaks],
            "planned_parts_gib": {k: v / GIB for k, v in planned.items()},
            "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
        }
        print(json.dumps(result))
        if args.json:
            with open(args.json, "w") as handle:
                json.dump(result, handle)


if __name__ == "__main__":
    main()
