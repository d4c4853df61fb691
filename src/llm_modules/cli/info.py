"""`llm-modules info` and `llm-modules smoke-test`."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from .common import UsageError, read_model_config


def add_info(subparsers) -> None:
    parser = subparsers.add_parser(
        "info",
        help="what a model is: architecture, size and parameter counts (a combined model, a plain one, or a pair)",
        description="What a model is, from its config alone: no weights are loaded (counts come from the model built "
        "on the meta device). --model: a saved combined model (its parts), or a plain causal LM (its architecture, "
        "width, layers, vocabulary and parameters). --large with --small: the combined model they would make. "
        "Neither: the paper's pair, Qwen2-1.5B + GPT-Neo-125M.",
    )
    parser.add_argument("--model", help="a saved combined model dir, or a plain causal LM (dir, .gguf file, hub id or "
                        "fetched name)")
    parser.add_argument("--large", help="the large model: dir, .gguf file, hub id or fetched name (with --small)")
    parser.add_argument("--small", help="the small model: dir, .gguf file, hub id or fetched name (with --large)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(handler=run_info)


def run_info(args: argparse.Namespace) -> None:
    import torch

    from ..configuration import LLMModulesConfig
    from ..modeling import LLMModulesForCausalLM

    if args.model:
        _, config = read_model_config(args.model, "--model")
        if not isinstance(config, LLMModulesConfig):
            show_plain_model(args.model, config, args.json)
            return
    elif args.large or args.small:
        if not (args.large and args.small):
            raise UsageError("give both --large and --small")
        _, large = read_model_config(args.large, "--large")
        _, small = read_model_config(args.small, "--small")
        config = LLMModulesConfig(large_config=large, small_config=small)
    else:
        config = LLMModulesConfig()
    with torch.device("meta"):  # counts need shapes only
        model = LLMModulesForCausalLM(config)
    summary = model.parameter_summary()
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    for index, large in enumerate(config.large_configs):
        label = "large model:" if config.num_sources == 1 else f"source {index}:"
        print(f"{label:<13} {large.model_type} (width {large.hidden_size})")
    print(f"small model:  {config.small_config.model_type} (width {config.small_hidden_size})")
    for name, value in summary.items():
        print(f"{name:<24} {value:>15,}  ({value / 1e6:,.1f}M)")


def show_plain_model(name: str, config, as_json: bool) -> None:
    """A plain Hugging Face causal LM: what it is, its size, and how to use it as one half of a combined model."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..sources import ModelSourceError

    try:
        with torch.device("meta"):  # counts need shapes only
            model = AutoModelForCausalLM.from_config(config)
    except ValueError as error:  # transformers: no causal-LM class for this config
        raise ModelSourceError(
            f"--model {name}: a {config.model_type} model, not a causal language model (nothing to compose)"
        ) from error
    text = config.get_text_config()
    facts = {
        "kind": "causal_lm",
        "architecture": type(model).__name__,
        "model_type": config.model_type,
        "hidden_size": text.hidden_size,
        "layers": text.num_hidden_layers,
        "vocab_size": text.vocab_size,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    if as_json:
        print(json.dumps(facts, indent=2))
        return
    print(f"{name}: a plain causal LM ({facts['architecture']}), not a combined llm-modules model")
    print(f"width {facts['hidden_size']:,}, layers {facts['layers']}, vocabulary {facts['vocab_size']:,}")
    print(f"parameters {facts['parameters']:,}  ({facts['parameters'] / 1e6:,.1f}M)")
    print(f"compose it: llm-modules info --large {name} --small SMALL (the pair's numbers), "
          f"then llm-modules train --large {name} --small SMALL")


def add_smoke_test(subparsers) -> None:
    parser = subparsers.add_parser(
        "smoke-test",
        help="offline end-to-end check on tiny local models: compose, train, generate, save, reload",
        description="An offline end-to-end check of this install, in seconds: builds two tiny random models (a "
        "Qwen2 and a GPT-Neo) with a tokenizer trained on the spot, composes them, trains a few steps, generates, "
        "saves and reloads, and checks the reloaded model gives the same logits. Nothing is downloaded.",
    )
    parser.add_argument("--steps", type=int, default=30, help="training steps")
    parser.add_argument("--output-dir", help="where to keep the models (default: a temporary dir)")
    parser.set_defaults(handler=run_smoke_test)


def run_smoke_test(args: argparse.Namespace) -> None:
    import torch

    from ..modeling import LLMModulesForCausalLM
    from ..tiny_models import save_tiny_causal_lm, train_tokenizer

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
