"""`llm-modules generate` and `llm-modules chat`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import UsageError, int_at_least

DEFAULT_MAX_NEW_TOKENS = 512  # when --max-new-tokens is not given and the context leaves more


def add_generation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a trained combined model dir (llm-modules train --output-dir)")
    parser.add_argument("--large-model", help="where the frozen large model is now, if it moved since training")
    parser.add_argument("--system", help="system prompt (default: the Bespoke-Stratos one)")
    parser.add_argument(
        "--max-new-tokens", type=int_at_least(1),
        help=f"most tokens to answer with (default: what the context leaves, at most {DEFAULT_MAX_NEW_TOKENS}); "
        "prompt + answer must fit in the model's context",
    )
    parser.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    parser.add_argument("--top-k", type=int_at_least(0), default=50)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, help="seed for sampling")
    parser.add_argument("--device", help="cpu or cuda[:N] (default: cuda when available)")


def add_generate(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="answer one prompt with a trained model, streaming",
        description="Answer one prompt in the training layout; stops at EOS or <|end_of_solution|>, which the answer "
        "keeps (only control tokens such as EOS and padding are left out of the text).",
    )
    add_generation_options(parser)
    parser.add_argument("--prompt", required=True, help="the user's question")
    parser.add_argument("--no-stream", action="store_true", help="print the answer once it is complete")
    parser.set_defaults(handler=run_generate)


def run_generate(args: argparse.Namespace) -> None:
    from ..data import render_prompt

    model = load_trained_model(args)
    text = render_prompt([{"role": "user", "content": args.prompt}], system=args.system)
    reply = generate_reply(model, text, args, stream=not args.no_stream)
    if args.no_stream:
        print(reply)


def add_chat(subparsers) -> None:
    parser = subparsers.add_parser(
        "chat",
        help="interactive multi-turn chat with a trained model",
        description="Multi-turn chat in the training layout, streaming. /reset clears the history; /exit or Ctrl-D "
        "quits. A turn that does not fit in the model's context is refused and the history kept.",
    )
    add_generation_options(parser)
    parser.set_defaults(handler=run_chat)


def run_chat(args: argparse.Namespace) -> None:
    from ..data import render_prompt

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
        turn = {"role": "user", "content": line}
        text = render_prompt([*history, turn], system=args.system)
        try:
            new_token_budget(model, len(model.tokenizer(text)["input_ids"]), args)
        except UsageError as error:  # this turn is not taken; the session and its history go on
            print(f"llm-modules chat: error: {error} (/reset clears the history)", file=sys.stderr, flush=True)
            continue
        print("assistant> ", end="", flush=True)
        reply = generate_reply(model, text, args, stream=True)
        history += [turn, {"role": "assistant", "content": reply.strip()}]


def resolve_model(name: str) -> str:
    """`--model` as `resolve_model_source` gives it: an absolute model dir, or a hub id. Raises `ModelSourceError`
    (exit code 3) for a missing path, a dir without config.json, or a GGUF file."""
    from ..sources import ModelSourceError, resolve_model_source

    source = resolve_model_source(name, "--model")
    if Path(source).is_file():
        raise ModelSourceError(f"--model {name}: a GGUF file; this command needs a model directory or a hub id")
    return source


def load_trained_model(args: argparse.Namespace):
    import torch

    from ..modeling import LLMModulesForCausalLM

    source = resolve_model(args.model)
    config = Path(source) / "config.json"
    if config.is_file():  # a hub id is checked by from_pretrained
        try:
            model_type = json.loads(config.read_text()).get("model_type")
        except ValueError as error:
            raise UsageError(f"{config}: not valid JSON: {error}") from error
        if model_type != "llm_modules":
            raise UsageError(f"--model {args.model}: not an llm-modules model (its model_type is {model_type!r})")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = LLMModulesForCausalLM.from_pretrained(source, large_model_name_or_path=args.large_model, dtype=dtype)
    if model.tokenizer is None:
        raise UsageError(f"--model {args.model}: no tokenizer saved there")
    return model.to(device)


def new_token_budget(model, prompt_tokens: int, args: argparse.Namespace) -> int:
    """How many tokens to answer a `prompt_tokens`-long prompt with (`check_generation_length`, the rule the server
    follows too). Raises UsageError (exit code 2) when they do not fit in the model's context."""
    from ..generation import ContextLengthError, check_generation_length

    try:
        return check_generation_length(
            model, prompt_tokens, args.max_new_tokens, up_to=DEFAULT_MAX_NEW_TOKENS, option="--max-new-tokens"
        )
    except ContextLengthError as error:
        raise UsageError(str(error)) from error


def generate_reply(model, text: str, args: argparse.Namespace, stream: bool) -> str:
    """Continue `text` (a rendered prompt); stream the new text to stdout if asked; return it (the same text).
    Raises UsageError before generating when prompt and answer do not fit in the model's context."""
    from transformers import set_seed

    from ..data import STOP_STRINGS
    from ..generation import AnswerStreamer, control_token_ids, decode_answer

    tokenizer = model.tokenizer
    inputs = tokenizer(text, return_tensors="pt").to(model.device)
    prompt_tokens = inputs["input_ids"].shape[1]
    max_new_tokens = new_token_budget(model, prompt_tokens, args)
    control_ids = control_token_ids(tokenizer, model)
    if args.seed is not None:
        set_seed(args.seed)
    sampling = dict(do_sample=False)
    if args.temperature > 0:
        sampling = dict(do_sample=True, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    output = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        streamer=AnswerStreamer(tokenizer, control_ids) if stream else None,
        stop_strings=STOP_STRINGS,
        tokenizer=tokenizer,
        **sampling,
    )
    return decode_answer(tokenizer, output[0, prompt_tokens:], control_ids)
