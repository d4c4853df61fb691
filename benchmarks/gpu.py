"""The GPU benchmark (`benchmarks/gpu.sh OUT`): the paper's pair at real size in bf16 with random weights.

On the visible CUDA device: a training step of batch 4 x sequence 2048 with and without the frozen-feature cache
(tokens/s, peak memory, model FLOPs utilisation against the card's dense bf16 peak), decode seconds per token at
context 512 (combined with its caches, recompute, large alone, small alone) and batched generation of 1/8/32 prompts.
`--device cpu --tiny` runs the same code on toy configs (tests cover that path). Writes gpu.json and gpu.md to OUT.

Model FLOPs per training step: 6 x trained parameters x tokens (forward and backward of what trains) plus, without
the feature cache, 2 x frozen parameters x tokens (the frozen forward); attention's sequence-squared terms are left
out, as in the usual MFU accounting (PaLM, appendix B), so the figure is a slight underestimate.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

# Dense bf16 tensor-core peaks from the vendors' data sheets (TFLOP/s, without sparsity), matched on
# `torch.cuda.get_device_name()`; an unlisted card gets no MFU rather than a guess.
BF16_PEAK_TFLOPS = {
    "H200": 989.4, "H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100 NVL": 835.0, "H100 PCIe": 756.0,
    "H100": 756.0, "GH200": 989.4, "A100": 312.0, "L40S": 362.1, "L40": 181.0, "L4": 121.0, "A10G": 70.0, "A10": 125.0,
    "RTX 4090": 165.2, "RTX 3090": 71.0,
}


def bf16_peak(device_name: str) -> float | None:
    """The first (most specific) table key contained in the device name, longest keys first."""
    for key in sorted(BF16_PEAK_TFLOPS, key=len, reverse=True):
        if key.lower() in device_name.lower():
            return BF16_PEAK_TFLOPS[key]
    return None


def tiny_config():
    from llm_modules import LLMModulesConfig

    return LLMModulesConfig(
        large_config={"model_type": "qwen2", "vocab_size": 300, "hidden_size": 64, "intermediate_size": 128,
                      "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                      "bos_token_id": 1, "eos_token_id": 2},
        small_config={"model_type": "gpt_neo", "vocab_size": 200, "hidden_size": 32, "num_layers": 2,
                      "num_heads": 4, "attention_types": [[["global", "local"], 1]], "window_size": 8,
                      "max_position_embeddings": 2048, "bos_token_id": 1, "eos_token_id": 2},
        cross_attention_heads=4,
    )


def run(out: Path, device: str, tiny: bool) -> dict:
    from llm_modules import LLMModulesConfig
    from llm_modules.benchmarking import bench_decode, bench_train, format_decode, format_train

    config = tiny_config() if tiny else LLMModulesConfig()
    sequence, batch, context = (32, 4, 16) if tiny else (2048, 4, 512)
    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    train = bench_train(config, seq_lens=[sequence], batch_size=batch, steps=2, device=device, dtype=dtype)
    decode = bench_decode(
        config, contexts=[context], new_tokens=16, recompute_tokens=4, prefill_context=context, prefill_repeats=2,
        batch_sizes=[1, 8, 32], batch_context=16, device=device, dtype=dtype,
    )
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else train["machine"]["cpu"]
    peak = bf16_peak(name) if device.startswith("cuda") else None
    params = train["parameters"]
    # The frozen model's token embeddings are a lookup, not a product: left out of its FLOPs.
    trained = params["trainable"]
    frozen = params["frozen_large"] - config.large_config.vocab_size * config.large_config.hidden_size
    row = train["train"][0]
    tokens = batch * sequence
    mfu = {}
    for key, flops in (("no_cache", (6 * trained + 2 * frozen) * tokens), ("feature_cache", 6 * trained * tokens)):
        achieved = flops / row[key]["step_s"] / 1e12
        mfu[key] = {"model_tflops": achieved, "mfu": achieved / peak if peak else None}
    return {
        "device": name, "bf16_peak_tflops": peak, "tiny": tiny, "train": train, "decode": decode, "mfu": mfu,
        "markdown": {"train": format_train(train), "decode": format_decode(decode)},
    }


def markdown(result: dict) -> str:
    peak = result["bf16_peak_tflops"]
    peak_text = f"{peak} TFLOP/s" if peak else "not in the table"
    lines = [f"Device: {result['device']} (dense bf16 peak: {peak_text})", "",
             result["markdown"]["train"], "| feature cache | model TFLOP/s | MFU |", "| --- | ---: | ---: |"]
    for key, label in (("no_cache", "no"), ("feature_cache", "yes")):
        m = result["mfu"][key]
        share = "n/a" if m["mfu"] is None else f"{m['mfu']:.1%}"
        lines.append(f"| {label} | {m['model_tflops']:.2f} | {share} |")
    lines += ["", result["markdown"]["decode"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="folder for gpu.json and gpu.md")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--tiny", action="store_true", help="toy configs instead of Qwen2-1.5B + GPT-Neo-125M")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu.sh: no CUDA device is visible (run with --device cpu --tiny to check the script)", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = run(out, args.device, args.tiny)
    text = markdown(result)
    result.pop("markdown")
    for name, content in (("gpu.json", json.dumps(result, indent=2) + "\n"), ("gpu.md", text)):
        tmp = out / (name + ".tmp")
        tmp.write_text(content)
        os.replace(tmp, out / name)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
