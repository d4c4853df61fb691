"""What each composition option costs per token: trainable parameters, prefill and cached decode time, side by side.

Variants, each a freshly composed combined model over the same loaded frozen sources and small model (random bridge;
speed does not depend on trained weights): one source (A, then B), two sources with a bridge each (`separate`, the
default), one bridge over both (`concat`), and the default plus k depth connections per source. All parts float32,
greedy decoding with every cache, one process, one after another (so a change of load shows in the ratios).

    flock -x /tmp/llm-modules-cpu.lock python benchmarks/composition_cost.py --json composition.json
        # real: Qwen2.5-Coder-0.5B-Instruct (A) + Qwen2.5-Coder-1.5B-Instruct (B) into SmolLM2-135M-Instruct,
        # from `llm-modules fetch` (fetched when missing)
    python benchmarks/composition_cost.py --tiny    # random tiny models: checks the script, not a measurement
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def load_parts(tiny: bool):
    """(source A base, source B base, names, a function that makes a fresh small base, small config)."""
    from transformers import AutoConfig, AutoModel

    if tiny:
        a = AutoConfig.for_model("qwen2", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)
        b = AutoConfig.for_model("qwen2", vocab_size=512, hidden_size=96, intermediate_size=192, num_hidden_layers=3,
                                 num_attention_heads=4, num_key_value_heads=2)
        s = AutoConfig.for_model("llama", vocab_size=512, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=4)
        torch.manual_seed(0)
        return AutoModel.from_config(a), AutoModel.from_config(b), ("tiny-a", "tiny-b"), lambda: AutoModel.from_config(s), s
    from llm_modules.fetch import fetch
    from llm_modules.sources import load_base_model

    dirs = {name: fetch(name).plain for name in
            ("qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct", "smollm2-135m-instruct")}
    a = load_base_model(str(dirs["qwen2.5-coder-0.5b-instruct"]), dtype=torch.float32)
    b = load_base_model(str(dirs["qwen2.5-coder-1.5b-instruct"]), dtype=torch.float32)
    small_dir = str(dirs["smollm2-135m-instruct"])
    small_config = AutoConfig.from_pretrained(small_dir)
    return (a, b, ("Qwen2.5-Coder-0.5B-Instruct", "Qwen2.5-Coder-1.5B-Instruct"),
            lambda: load_base_model(small_dir, dtype=torch.float32), small_config)


VARIANTS = [  # name, sources (0 = A, 1 = B), LLMModulesConfig options
    ("A only", (0,), {}),
    ("B only", (1,), {}),
    ("A + B, a bridge each (separate)", (0, 1), {"source_fusion": "separate"}),
    ("A + B, one bridge (concat)", (0, 1), {"source_fusion": "concat"}),
    ("A + B separate + 1 depth connection each", (0, 1), {"num_depth_connections": 1}),
    ("A + B separate + 2 depth connections each", (0, 1), {"num_depth_connections": 2}),
]


@torch.no_grad()
def time_variant(model, context: int, new_tokens: int, vocab: int) -> tuple[float, float]:
    """(prefill seconds for `context` tokens, seconds per cached decode step), greedy, batch 1, wall clock."""
    from transformers.generation.streamers import BaseStreamer

    class Times(BaseStreamer):
        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    ids = torch.randint(10, vocab, (1, context), generator=torch.Generator().manual_seed(0))
    times = Times()
    start = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                   do_sample=False, pad_token_id=0, streamer=times)
    # The streamer is called with the prompt first, then once per new token; the first new token ends the prefill.
    prefill = times.times[1] - start
    return prefill, (times.times[-1] - times.times[1]) / (len(times.times) - 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="random tiny models (checks the script; not a measurement)")
    parser.add_argument("--context", type=int, default=128, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=9, help="greedy tokens per variant (the first is the prefill's)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from llm_modules import LLMModulesConfig, LLMModulesForCausalLM

    source_a, source_b, names, fresh_small, small_config = load_parts(args.tiny)
    sources = [source_a.eval(), source_b.eval()]
    rows = []
    for name, chosen, options in VARIANTS:
        configs = [sources[i].config for i in chosen]
        config = LLMModulesConfig(large_config=configs[0], additional_large_configs=configs[1:] or None,
                                  small_config=small_config, **options)
        torch.manual_seed(0)
        model = LLMModulesForCausalLM(config, large_model=[sources[i] for i in chosen], small_model=fresh_small()).eval()
        model.float()
        time_variant(model, 8, 3, config.large_config.vocab_size)  # warm-up: first-call allocations
        prefill, step = time_variant(model, args.context, args.new_tokens, config.large_config.vocab_size)
        rows.append({"variant": name, "trainable_params": model.parameter_summary()["trainable"],
                     "prefill_s": round(prefill, 4), "decode_s_per_token": round(step, 4)})
        print(f"{name}: prefill {prefill:.3f} s, decode {step:.4f} s/token", file=sys.stderr, flush=True)
        del model

    base = rows[2]["decode_s_per_token"]
    print(f"sources: A = {names[0]}, B = {names[1]}; small model {small_config.model_type}; float32, "
          f"{args.threads} threads, prompt {args.context} tokens, torch {torch.__version__}")
    print("| variant | trainable params | prefill s | decode s/token | decode vs A + B separate |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['variant']} | {row['trainable_params']:,} | {row['prefill_s']:.3f} | "
              f"{row['decode_s_per_token']:.4f} | {row['decode_s_per_token'] / base:.2f}x |")
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"sources": names, "threads": args.threads, "context": args.context, "rows": rows}, file, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
