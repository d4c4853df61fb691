"""`llm-modules bench decode|train|memory`."""

from __future__ import annotations

import argparse

from .common import UsageError, int_at_least, read_model_config


def add_bench(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="speed and memory at real size (random weights): decoding and the training step",
        description="Benchmarks measured side by side in one run, printed as tables (docs/performance.md). With no "
        "--config: the paper's pair, Qwen2-1.5B + GPT-Neo-125M, built from its configs with random weights.",
    )
    kinds = parser.add_subparsers(dest="bench", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="an llm-modules config.json (or a dir holding one) instead of the real pair")
    common.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    dtypes = ["auto", "float32", "bfloat16", "float16"]
    common.add_argument(
        "--dtype", choices=dtypes, default="auto", help="trained parts (auto: float32 on CPU, bfloat16 on GPU)"
    )
    common.add_argument("--large-dtype", choices=dtypes, help="the frozen large model (default: --dtype)")
    common.add_argument(
        "--large-quantization", choices=["int8", "fp16"],
        help="the frozen model's linear layers on the CPU: int8 or float16 weights (fbgemm); instead of --large-dtype",
    )
    common.add_argument(
        "--threads", type=int_at_least(1), nargs="+",
        help="torch CPU threads (docs/performance.md's numbers: 1); several values only with --precisions",
    )
    common.add_argument(
        "--clock", choices=["wall", "cpu"], default="wall",
        help="wall: elapsed time; cpu: this process's CPU time, which leaves out waiting for cores other programs "
        "hold (for a shared CPU, with --threads 1)",
    )
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--json", metavar="PATH", help="also write the results as JSON")

    decode = kinds.add_parser("decode", parents=[common], help="seconds per token: caches vs recompute vs floor")
    decode.add_argument("--contexts", type=int_at_least(1), nargs="+", default=[64, 256, 512], help="prompt lengths")
    decode.add_argument("--new-tokens", type=int_at_least(2), default=16, help="tokens per cached run")
    decode.add_argument("--recompute-tokens", type=int_at_least(1), default=2, help="tokens per use_cache=False run")
    decode.add_argument("--prefill-context", type=int_at_least(1), default=512)
    decode.add_argument("--prefill-repeats", type=int_at_least(1), default=2)
    decode.add_argument("--batch-sizes", type=int_at_least(1), nargs="+", default=[1, 4, 16], help="prompts per run")
    decode.add_argument("--batch-context", type=int_at_least(1), default=16, help="prompt length of the batched runs")
    decode.add_argument(
        "--precisions", nargs="+", metavar="PRECISION",
        help="instead of the tables above: the frozen model in each of these precisions side by side (float32, "
        "bfloat16, float16: torch dtypes; fp16, int8, gguf: --large-quantization; gguf needs --large), with the floor "
        "of each, at --contexts "
        "and every --threads value (CPU only)",
    )
    decode.add_argument("--large", help="with --precisions: a real frozen model (dir or .gguf) instead of random weights")
    decode.add_argument("--small", help="with --precisions: a real small model (dir or .gguf)")
    decode.add_argument(
        "--trained-quantization", choices=["int8", "gguf", "gguf-q4_0"],
        help="with --precisions: the trained parts as generate's --trained-quantization (default float32; gguf and "
        "gguf-q4_0 need a Llama-architecture small model)",
    )
    decode.set_defaults(handler=run_bench)

    train = kinds.add_parser("train", parents=[common], help="training step with and without the feature cache")
    # A label needs a token before it: sequences of at least 2.
    train.add_argument("--seq-lens", type=int_at_least(2), nargs="+", default=[256, 1024])
    train.add_argument("--batch-size", type=int_at_least(1), default=1)
    train.add_argument("--steps", type=int_at_least(1), default=1, help="measured steps per setting (fastest is kept)")
    train.set_defaults(handler=run_bench)

    memory = kinds.add_parser(
        "memory", help="memory plan per rank under DDP, FSDP2 and ZeRO-3 (computed, no weights)",
        description="Bytes per rank for frozen weights, trained weights, gradients, AdamW states and activations, from "
        "the combined model built on the meta device (docs/training-at-scale.md). Default pairs: Qwen2.5-7B/14B "
        "frozen with SmolLM2-360M/Qwen2.5-0.5B, from their published configs.",
    )
    memory.add_argument("--ranks", type=int_at_least(1), nargs="+", default=[1, 2, 4, 8])
    memory.add_argument("--pairs", nargs="+", metavar="PAIR", help="qwen2.5-7b+smollm2-360m, qwen2.5-7b+qwen2.5-0.5b, "
                        "qwen2.5-14b+smollm2-360m, qwen2.5-14b+qwen2.5-0.5b (default: all)")
    memory.add_argument("--config", help="an llm-modules config.json (or a dir holding one) instead of the pairs")
    memory.add_argument("--strategies", nargs="+", choices=["ddp", "fsdp2", "zero3"], default=["ddp", "fsdp2", "zero3"])
    memory.add_argument("--seq-len", type=int_at_least(2), default=2048)
    memory.add_argument("--batch-size", type=int_at_least(1), default=1, help="examples per rank and step")
    memory.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                        help="bf16: mixed precision, frozen weights in bf16 (GPUs); fp32: everything float32 (CPU)")
    memory.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    memory.set_defaults(handler=run_memory)


def run_memory(args: argparse.Namespace) -> None:
    from .. import benchmarking
    from ..benchmarking import memory
    from ..configuration import LLMModulesConfig
    from ..sources import ModelSourceError

    if args.config:
        if args.pairs:
            raise UsageError("--config and --pairs: give one of them")
        _, config = read_model_config(args.config, "--config", config_file=True)
        if not isinstance(config, LLMModulesConfig):
            raise ModelSourceError(f"--config {args.config}: a {config.model_type} model, not a combined llm-modules one")
        configs = {args.config: config}
    else:
        names = args.pairs or list(memory.PAIRS)
        unknown = [name for name in names if name not in memory.PAIRS]
        if unknown:
            raise UsageError(f"--pairs: unknown {unknown[0]!r}; expected some of {', '.join(memory.PAIRS)}")
        configs = {name: memory.pair_config(*memory.PAIRS[name]()) for name in names}
    fp32 = args.precision == "fp32"
    rows = memory.memory_table(
        configs, args.ranks, args.strategies, seq_len=args.seq_len, batch_size=args.batch_size,
        frozen_dtype="float32" if fp32 else "bfloat16", mixed_precision=not fp32,
    )
    print(memory.format_memory(rows), end="")
    if args.json:
        benchmarking.write_json({"rows": rows}, args.json)
        print(f"wrote {args.json}")


def run_bench(args: argparse.Namespace) -> None:
    import torch

    from .. import benchmarking
    from ..configuration import LLMModulesConfig
    from ..sources import ModelSourceError, resolve_model_source

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: no CUDA GPU is available here")
    if args.clock == "cpu" and not args.device.startswith("cpu"):
        raise UsageError(f"--clock cpu measures CPU work only; time --device {args.device} with --clock wall")
    config = None
    if args.config:
        _, config = read_model_config(args.config, "--config", config_file=True)
        if not isinstance(config, LLMModulesConfig):
            raise ModelSourceError(
                f"--config {args.config}: a {config.model_type} model, not a combined llm-modules one (give a combined "
                "model dir or its config.json)"
            )
    precisions = getattr(args, "precisions", None)
    if precisions is None and (getattr(args, "large", None) or getattr(args, "small", None)):
        raise UsageError("--large/--small need --precisions (the other tables use random weights)")
    if precisions is None and getattr(args, "trained_quantization", None):
        raise UsageError("--trained-quantization goes with --precisions")
    if precisions is None and args.threads and len(args.threads) > 1:
        raise UsageError(f"--threads: one value, or several with --precisions; got {args.threads}")
    if precisions is not None:
        from ..benchmarking.precision import PRECISIONS, bench_precision, format_precision

        unknown = [p for p in precisions if p not in PRECISIONS]
        if unknown:
            raise UsageError(f"--precisions: unknown {unknown[0]!r}; expected some of {', '.join(PRECISIONS)}")
        if not args.device.startswith("cpu"):
            raise UsageError("--precisions measures the CPU paths; use --device cpu")
        if bool(args.large) != bool(args.small):
            raise UsageError("--large and --small go together (real checkpoints), or leave both out (random weights)")
        if "gguf" in precisions and not args.large:
            raise UsageError("--precisions gguf runs llama.cpp on a real GGUF: give --large (a .gguf file or a fetched "
                             "model) and --small")
        large = resolve_model_source(args.large, "--large") if args.large else None
        small = resolve_model_source(args.small, "--small") if args.small else None
        result = bench_precision(
            None if large else config, large=large, small=small, precisions=precisions, contexts=args.contexts,
            threads=args.threads or [1], new_tokens=args.new_tokens, seed=args.seed, clock=args.clock,
            trained_quantization=args.trained_quantization,
        )
        print(format_precision(result))
        if args.json:
            benchmarking.write_json(result, args.json)
            print(f"wrote {args.json}")
        return
    if args.threads:
        torch.set_num_threads(args.threads[0])
    options = dict(
        device=args.device, dtype=args.dtype, large_dtype=args.large_dtype, seed=args.seed, clock=args.clock
    )
    if args.large_quantization and not args.device.startswith("cpu"):
        raise UsageError(f"--large-quantization runs on the CPU, not --device {args.device}")
    if args.bench == "decode":
        options["large_quantization"] = args.large_quantization
        result = benchmarking.bench_decode(
            config, contexts=args.contexts, new_tokens=args.new_tokens, recompute_tokens=args.recompute_tokens,
            prefill_context=args.prefill_context, prefill_repeats=args.prefill_repeats, batch_sizes=args.batch_sizes,
            batch_context=args.batch_context, **options,
        )
        print(benchmarking.format_decode(result))
    else:
        if args.large_quantization:
            raise UsageError("--large-quantization is for bench decode (training steps run the frozen model as loaded)")
        result = benchmarking.bench_train(
            config, seq_lens=args.seq_lens, batch_size=args.batch_size, steps=args.steps, **options
        )
        print(benchmarking.format_train(result))
    if args.json:
        benchmarking.write_json(result, args.json)
        print(f"wrote {args.json}")
