"""`llm-modules generate` and `llm-modules chat`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import UsageError, int_at_least


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
