"""`llm-modules info` and `llm-modules smoke-test`."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from .common import UsageError


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
