"""The `llm-modules` command: parse, call the library, print. Each command registers itself with one function."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


def add_info(subparsers) -> None:
    parser = subparsers.add_parser(
        "info",
        help="parameter summary of a combined model",
        description="Parameter summary. With no model arguments: the paper's pair (Qwen2-1.5B + GPT-Neo-125M) built "
        "from its configs without allocating weights.",
    )
    parser.add_argument("--model", help="a saved combined model dir")
    parser.add_argument("--large", help="config id or dir of the large model (with --small)")
    parser.add_argument("--small", help="config id or dir of the small model (with --large)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(handler=run_info)


def run_info(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoConfig

    from .configuration import LLMModulesConfig
    from .modeling import LLMModulesForCausalLM

    if args.model:
        config = LLMModulesConfig.from_pretrained(args.model)
    elif args.large or args.small:
        if not (args.large and args.small):
            raise UsageError("give both --large and --small")
        config = LLMModulesConfig(
            large_config=AutoConfig.from_pretrained(args.large), small_config=AutoConfig.from_pretrained(args.small)
        )
    else:
        config = LLMModulesConfig()
    with torch.device("meta"):  # counts need shapes only
        model = LLMModulesForCausalLM(config)
    summary = model.parameter_summary()
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"large model:  {config.large_config.model_type} (width {config.large_hidden_size})")
    print(f"small model:  {config.small_config.model_type} (width {config.small_hidden_size})")
    for name, value in summary.items():
        print(f"{name:<24} {value:>15,}  ({value / 1e6:,.1f}M)")


def add_smoke_test(subparsers) -> None:
    parser = subparsers.add_parser(
        "smoke-test",
        help="offline end-to-end check on tiny local models: compose, train, generate, save, reload",
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--output-dir", help="where to keep the models (default: a temporary dir)")
    parser.set_defaults(handler=run_smoke_test)


def run_smoke_test(args: argparse.Namespace) -> None:
    import torch

    from .modeling import LLMModulesForCausalLM
    from .tiny_models import save_tiny_causal_lm, train_tokenizer

    root = Path(args.output_dir or tempfile.mkdtemp(prefix="llm-modules-smoke-"))
    text = "the cat sat on the mat. the dog sat on the log. " * 4
    tokenizer = train_tokenizer([text] * 10, vocab_size=300)
    large = save_tiny_causal_lm(root / "large", "qwen2", tokenizer, hidden_size=64)
    small = save_tiny_causal_lm(root / "small", "gpt_neo", tokenizer, hidden_size=32)
    torch.manual_seed(0)
    model = LLMModulesForCausalLM.from_large_and_small(large, small, cross_attention_heads=4)
    print(f"composed {root / 'large'} + {root / 'small'}: {model.parameter_summary()['trainable']:,} trainable")
    batch = tokenizer(text, return_tensors="pt")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for step in range(args.steps):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step in (0, args.steps - 1):
            print(f"step {step + 1:>3}: loss {loss.item():.3f}")
    model.eval()
    prompt = tokenizer("the cat", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    print("generated:", repr(tokenizer.decode(generated[0])))
    model.save_pretrained(root / "combined")
    reloaded = LLMModulesForCausalLM.from_pretrained(root / "combined")
    same = torch.equal(reloaded.generate(**prompt, max_new_tokens=12, do_sample=False), generated)
    print(f"saved to {root / 'combined'}; reloaded model generates the same tokens: {same}")
    if not same:
        raise RuntimeError("the reloaded model generates different tokens")


def int_at_least(minimum: int) -> Callable[[str], int]:
    """argparse type: an integer >= `minimum` (argparse then names the flag and exits 2 on anything else)."""
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise ValueError
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def add_bench(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="speed and memory at real size (random weights): decoding and the training step",
        description="Benchmarks measured side by side in one run, printed as tables (README, Performance). With no "
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
    common.add_argument("--threads", type=int_at_least(1), help="torch CPU threads (README's numbers: 1)")
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
    decode.set_defaults(handler=run_bench)

    train = kinds.add_parser("train", parents=[common], help="training step with and without the feature cache")
    # A label needs a token before it: sequences of at least 2.
    train.add_argument("--seq-lens", type=int_at_least(2), nargs="+", default=[256, 1024])
    train.add_argument("--batch-size", type=int_at_least(1), default=1)
    train.add_argument("--steps", type=int_at_least(1), default=1, help="measured steps per setting (fastest is kept)")
    train.set_defaults(handler=run_bench)


def run_bench(args: argparse.Namespace) -> None:
    import torch

    from . import benchmarking
    from .configuration import LLMModulesConfig

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: no CUDA GPU is available here")
    if args.clock == "cpu" and not args.device.startswith("cpu"):
        raise UsageError(f"--clock cpu measures CPU work only; time --device {args.device} with --clock wall")
    config = None
    if args.config:
        path = Path(args.config)
        if not (path / "config.json" if path.is_dir() else path).is_file():
            raise UsageError(f"--config {path}: no config.json there")
        config = LLMModulesConfig.from_pretrained(path)
    if args.threads:
        torch.set_num_threads(args.threads)
    options = dict(
        device=args.device, dtype=args.dtype, large_dtype=args.large_dtype, seed=args.seed, clock=args.clock
    )
    if args.bench == "decode":
        result = benchmarking.bench_decode(
            config, contexts=args.contexts, new_tokens=args.new_tokens, recompute_tokens=args.recompute_tokens,
            prefill_context=args.prefill_context, prefill_repeats=args.prefill_repeats, batch_sizes=args.batch_sizes,
            batch_context=args.batch_context, **options,
        )
        print(benchmarking.format_decode(result))
    else:
        result = benchmarking.bench_train(
            config, seq_lens=args.seq_lens, batch_size=args.batch_size, steps=args.steps, **options
        )
        print(benchmarking.format_train(result))
    if args.json:
        benchmarking.write_json(result, args.json)
        print(f"wrote {args.json}")


def add_train(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train the bridge and the small model on Bespoke-Stratos-17k (or local files in its schema)",
        description="Train a combined model with transformers.Trainer. Defaults are the paper's settings; a --config "
        "YAML/JSON file may hold the same keys (with underscores) and any TrainingArguments field; flags win over it. "
        "Runs unchanged under torchrun and accelerate launch.",
        argument_default=argparse.SUPPRESS,  # only what the user gives overrides the config file and the defaults
    )
    add = parser.add_argument
    add("--config", help="YAML or JSON file of training options")
    add("--large", help="hub id or dir of the frozen large model (default: Qwen/Qwen2-1.5B)")
    add("--small", help="hub id or dir of the small model (default: EleutherAI/gpt-neo-125M)")
    add("--dataset", help="hub id, or a local .json/.jsonl/.parquet file or dir (default: bespokelabs/Bespoke-Stratos-17k)")
    add("--output-dir", help="where checkpoints, the final model and its model card go")
    steps = parser.add_mutually_exclusive_group()
    steps.add_argument("--epochs", type=float, help="epochs (default 15)")
    steps.add_argument("--max-steps", type=int_at_least(1), help="optimizer steps, instead of epochs")
    add("--batch-size", type=int_at_least(1), help="examples per device and step (default 1)")
    add("--grad-accum", type=int_at_least(1), help="gradient accumulation steps (default 1)")
    add("--lr-bridge", type=float, help="learning rate of the bridge (default 1e-4)")
    add("--lr-small", type=float, help="learning rate of the small model and the head (default 5e-5)")
    add("--warmup", type=float, help="warmup steps, or a fraction of all steps if < 1 (default 0)")
    add("--max-length", type=int_at_least(2), help="drop longer examples, in large-model tokens (default 4096)")
    add("--subset", type=float, help="random fraction of the rows to use (default 0.3, as the paper)")
    add("--val-split", type=float, help="validation fraction (default 0.1)")
    add("--seed", type=int, help="seed of the subset, the split, the init and the data order (default 42)")
    add("--strict", action="store_true", help="stop at the first invalid row instead of skipping it")
    add("--loss-on", choices=["assistant", "all"], help="tokens in the loss (default assistant; all = the paper)")
    add("--small-init", choices=["pretrained", "scratch"], help="start the small model pretrained or random")
    add("--save-steps", type=int_at_least(1), help="evaluate and checkpoint every N steps (default: every epoch)")
    add("--save-total-limit", type=int_at_least(1), help="checkpoints kept besides the best (default 2)")
    add("--logging-steps", type=int_at_least(1), help="log every N steps (default 10)")
    add("--patience", type=int_at_least(0), help="early stopping patience in evaluations, 0 = off (default 5)")
    add("--min-delta", type=float, help="smallest validation loss improvement that counts (default 1e-4)")
    add("--precision", choices=["auto", "bf16", "fp16", "fp32"], help="auto: bf16/fp16 on GPU, fp32 on CPU")
    add("--gradient-checkpointing", action="store_true", help="recompute the small model's activations in backward")
    add("--feature-cache", metavar="DIR", help="compute the frozen model's hidden states once, keep them in DIR")
    add("--resume", action="store_true", help="continue from the newest complete checkpoint in --output-dir")
    add("--push-to-hub", action="store_true", help="upload checkpoints and the final model (Trainer's push_to_hub)")
    add("--hub-model-id", help="repo id for --push-to-hub")
    add("--trust-remote-code", action="store_true", help="allow custom model code from the hub")
    parser.set_defaults(handler=run_train)


def run_train(args: argparse.Namespace) -> None:
    import logging

    from .data import EmptyDatasetError, InvalidRowError
    from .feature_cache import FeatureCacheMismatch
    from .training import TrainingOptions, run_training

    values = {}
    if "config" in args:
        values = read_config_file(args.config)
    flags = {k: v for k, v in vars(args).items() if k not in ("config", "handler", "command", "debug")}
    if "epochs" in flags:  # a flag for epochs beats max_steps from the config file, and the other way round
        values.pop("max_steps", None)
    try:
        options = TrainingOptions.from_dict({**values, **flags})
    except (TypeError, ValueError) as error:
        raise UsageError(str(error)) from error
    handler = logging.StreamHandler()  # our data report and warnings, on stderr next to the Trainer's logs
    handler.setFormatter(logging.Formatter("%(message)s"))
    library_logger = logging.getLogger("llm_modules")
    library_logger.addHandler(handler)
    library_logger.setLevel(logging.INFO)
    try:
        result = run_training(options)
    except InvalidRowError as error:
        raise UsageError(f"{options.dataset}: {error} (drop --strict to skip invalid rows)") from error
    except (EmptyDatasetError, FeatureCacheMismatch, FileExistsError) as error:
        raise UsageError(f"{error}") from error
    finally:
        library_logger.removeHandler(handler)
    if result.trainer.is_world_process_zero():
        loss = f"{result.eval_loss:.4f}" if result.eval_loss is not None else "n/a"
        print(f"trained {result.trainer.state.global_step} steps; final validation loss {loss}")
        print(f"saved to {result.output_dir} (load with LLMModulesForCausalLM.from_pretrained({str(result.output_dir)!r}))")


def read_config_file(path: str) -> dict:
    """A YAML or JSON mapping of training options."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise UsageError(f"--config {path}: no such file")
    try:
        values = json.loads(file.read_text()) if file.suffix == ".json" else yaml.safe_load(file.read_text())
    except (ValueError, yaml.YAMLError) as error:
        raise UsageError(f"--config {path}: not valid {'JSON' if file.suffix == '.json' else 'YAML'}: {error}") from error
    if not isinstance(values, dict):
        raise UsageError(f"--config {path}: expected a mapping of options, got {type(values).__name__}")
    return values


def add_generation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a trained combined model dir (llm-modules train --output-dir)")
    parser.add_argument("--large-model", help="where the frozen large model is now, if it moved since training")
    parser.add_argument("--system", help="system prompt (default: the Bespoke-Stratos one)")
    parser.add_argument("--max-new-tokens", type=int_at_least(1), default=512)
    parser.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    parser.add_argument("--top-k", type=int_at_least(0), default=50)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, help="seed for sampling")
    parser.add_argument("--device", help="cpu or cuda[:N] (default: cuda when available)")


def add_generate(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="answer one prompt with a trained model, streaming",
        description="Answer one prompt in the training layout; stops at EOS or <|end_of_solution|>.",
    )
    add_generation_options(parser)
    parser.add_argument("--prompt", required=True, help="the user's question")
    parser.add_argument("--no-stream", action="store_true", help="print the answer once it is complete")
    parser.set_defaults(handler=run_generate)


def run_generate(args: argparse.Namespace) -> None:
    from .data import render_prompt

    model = load_trained_model(args)
    text = render_prompt([{"role": "user", "content": args.prompt}], system=args.system)
    reply = generate_reply(model, text, args, stream=not args.no_stream)
    if args.no_stream:
        print(reply)


def add_chat(subparsers) -> None:
    parser = subparsers.add_parser(
        "chat",
        help="interactive multi-turn chat with a trained model",
        description="Multi-turn chat in the training layout, streaming. /reset clears the history; /exit or Ctrl-D quits.",
    )
    add_generation_options(parser)
    parser.set_defaults(handler=run_chat)


def run_chat(args: argparse.Namespace) -> None:
    from .data import render_prompt

    model = load_trained_model(args)
    print(f"chatting with {args.model}: /reset clears the history, /exit or Ctrl-D quits")
    history: list[dict[str, str]] = []
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print()
            return
        command = line.strip()
        if not command:
            continue
        if command == "/exit":
            return
        if command == "/reset":
            history.clear()
            print("(history cleared)")
            continue
        history.append({"role": "user", "content": line})
        print("assistant> ", end="", flush=True)
        reply = generate_reply(model, render_prompt(history, system=args.system), args, stream=True)
        history.append({"role": "assistant", "content": reply.strip()})


def load_trained_model(args: argparse.Namespace):
    import torch

    from .modeling import LLMModulesForCausalLM

    directory = Path(args.model)
    if not directory.is_dir():
        raise UsageError(f"--model {args.model}: no such directory")
    config = directory / "config.json"
    if not config.is_file():
        raise UsageError(f"--model {args.model}: no config.json there (is it a trained llm-modules model dir?)")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except ValueError as error:
        raise UsageError(f"{config}: not valid JSON: {error}") from error
    if model_type != "llm_modules":
        raise UsageError(f"--model {args.model}: not an llm-modules model (its model_type is {model_type!r})")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = LLMModulesForCausalLM.from_pretrained(directory, large_model_name_or_path=args.large_model, dtype=dtype)
    if model.tokenizer is None:
        raise UsageError(f"--model {args.model}: no tokenizer saved there")
    return model.to(device)


def generate_reply(model, text: str, args: argparse.Namespace, stream: bool) -> str:
    """Continue `text` (a rendered prompt); stream the new text to stdout if asked; return it."""
    from transformers import TextStreamer, set_seed

    from .data import STOP_STRINGS

    tokenizer = model.tokenizer
    if args.seed is not None:
        set_seed(args.seed)
    inputs = tokenizer(text, return_tensors="pt").to(model.device)
    sampling = dict(do_sample=False)
    if args.temperature > 0:
        sampling = dict(do_sample=True, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    output = model.generate(
        **inputs,
        max_new_tokens=args.max_new_tokens,
        streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None,
        stop_strings=STOP_STRINGS,
        tokenizer=tokenizer,
        **sampling,
    )
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def add_serve(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server (chat, completions, streaming)",
        description="Serve a trained combined model (or a plain Hugging Face causal LM dir) over the OpenAI API: "
        "/v1/models, /v1/chat/completions, /v1/completions, and /health.",
    )
    parser.add_argument("--model", required=True, help="a trained combined model dir (or a Hugging Face causal LM dir)")
    parser.add_argument("--large-model", help="where the frozen large model is now, if it moved since training")
    parser.add_argument("--model-name", help="the model id clients ask for (default: the dir's name)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int_at_least(0), default=8000)
    parser.add_argument(
        "--api-key", default=os.environ.get("LLM_MODULES_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1 (default: $LLM_MODULES_API_KEY; none: no key)",
    )
    parser.add_argument("--max-concurrency", type=int_at_least(1), default=4, help="generations at once; more queue")
    parser.add_argument("--max-new-tokens-limit", type=int_at_least(1), default=2048, help="largest max_tokens allowed")
    parser.add_argument("--system", help="system prompt for chats that bring none (default: the Bespoke-Stratos one)")
    parser.add_argument("--device", help="cpu or cuda[:N] (default: cuda when available)")
    parser.set_defaults(handler=run_serve)


def run_serve(args: argparse.Namespace) -> None:
    from . import serving

    directory = Path(args.model)
    if not (directory / "config.json").is_file():
        raise UsageError(f"--model {args.model}: no config.json there (is it a model dir?)")
    model, tokenizer = serving.load_model(directory, large_model=args.large_model, device=args.device)
    server = serving.ModelServer(
        model, tokenizer, args.model_name or directory.resolve().name, max_concurrency=args.max_concurrency,
        max_new_tokens_limit=args.max_new_tokens_limit, system_prompt=args.system,
    )
    print(f"serving {server.name!r} (context {server.context_length} tokens) at http://{args.host}:{args.port}/v1", flush=True)
    serving.serve(server, host=args.host, port=args.port, api_key=args.api_key)


def add_demo(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="offline experiment: knowledge of a frozen model reaches a small one (with baselines), in minutes on CPU",
        description="Pretrain a small Qwen2-architecture knowledge source on a synthetic world, train the combined model "
        "and the baselines on a task in a new format about half of the people, and measure answers about the other "
        "half. Writes results.json, results.md and PNG plots.",
    )
    parser.add_argument("--output-dir", default="llm-modules-demo", help="where results and models go (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the world and of every training run")
    parser.add_argument("--quick", action="store_true", help="64 people and four systems (about 2 minutes on 2 CPU cores; the full run takes about 9)")
    parser.set_defaults(handler=run_demo)


def run_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo as demo

    results = demo(args.output_dir, seed=args.seed, quick=args.quick)
    print(results["table"])
    print(f"wall time {results['wall_seconds']:.0f} s; results in {Path(args.output_dir) / 'results.json'}")


def add_eval(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="validation loss, perplexity and answer accuracy of a combined model or any causal LM on Stratos rows",
        description="Validation loss and perplexity on the assistant tokens, and for rows with a "
        "<|begin_of_solution|> section, greedy-answer exact match (the last \\boxed{} inside when present, "
        "normalised) and the rate of well-formed answers. Works the same on plain Hugging Face causal LMs.",
    )
    parser.add_argument("--model", required=True, help="a saved combined model dir, or a causal LM hub id or dir")
    parser.add_argument("--dataset", required=True, help="hub dataset id, or a local .json/.jsonl/.parquet file or dir")
    parser.add_argument("--split", default="train", help="split of a hub dataset (slices work: 'train[-500:]')")
    parser.add_argument("--limit", type=int_at_least(1), help="evaluate the first N rows only")
    parser.add_argument("--max-new-tokens", type=int_at_least(1), default=1024)
    parser.add_argument("--batch-size", type=int_at_least(1), default=8)
    parser.add_argument("--max-length", type=int_at_least(1), default=4096, help="skip longer rows in the loss")
    parser.add_argument("--no-generate", action="store_true", help="loss and perplexity only")
    parser.add_argument("--large-model", help="where the frozen large model is now, if it moved since training")
    parser.add_argument("--device", help="cpu or cuda[:N] (default: cuda when available)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off by default)")
    parser.add_argument("--output", help="also write all metrics and every prediction to this JSON file")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")
    parser.set_defaults(handler=run_eval)


def run_eval(args: argparse.Namespace) -> None:
    from .data import load_rows
    from .evaluation import evaluate_dataset, first_rows, load_model_for_eval, write_json

    rows = first_rows(load_rows(args.dataset, split=args.split), args.limit)
    if not rows:
        raise UsageError(f"--dataset {args.dataset}: no rows")
    model, tokenizer = load_model_for_eval(args.model, args.large_model, args.device, args.trust_remote_code)
    results = {"model": args.model, "dataset": args.dataset, **evaluate_dataset(
        model, tokenizer, rows, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
        max_length=args.max_length, generate=not args.no_generate,
    )}
    if args.output:
        write_json(Path(args.output), results)
    summary = {k: v for k, v in results.items() if k != "answers"}
    if "answers" in results:
        summary["answers"] = {k: v for k, v in results["answers"].items() if k != "predictions"}
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"{summary['rows']} rows ({summary['invalid_rows']} invalid, {summary['too_long']} too long for the loss)")
    print(f"validation loss {summary['validation_loss']:.4f}  perplexity {summary['validation_perplexity']:.2f}  "
          f"({summary['validation_tokens']:,} answer tokens)")
    if "answers" in summary:
        answers = summary["answers"]
        print(f"answer exact match {answers['exact_match']:.3f}  well-formed {answers['format_valid']:.3f}  (n={answers['n']})")
    elif not args.no_generate:
        print("no row has a <|begin_of_solution|> section: no answer accuracy")


COMMANDS: list[Callable] = [add_info, add_smoke_test, add_bench, add_train, add_generate, add_chat, add_serve, add_demo, add_eval]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-modules", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except UsageError as error:
        if args.debug:
            raise
        print(f"llm-modules {args.command}: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # one line for users; --debug shows the traceback
        if args.debug:
            raise
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"llm-modules {args.command}: error: {type(error).__name__}: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
