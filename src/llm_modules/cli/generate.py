"""`llm-modules generate` and `llm-modules chat`."""

from __future__ import annotations

import argparse
import sys

from .common import (
    UsageError, add_frozen_precision_arguments, add_large_model_argument, int_at_least, large_model_paths,
)

DEFAULT_MAX_NEW_TOKENS = 512  # when --max-new-tokens is not given and the context leaves more


def add_generation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a trained combined model dir (llm-modules train --output-dir), or a plain causal LM: a dir, a hub id or "
                        "a .gguf file (its chats use its chat template)")
    add_large_model_argument(parser)
    add_frozen_precision_arguments(parser)
    parser.add_argument("--system", help="system prompt (default: the one the model was trained with when all its "
                        "rows shared one, else the Bespoke-Stratos one)")
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
    from ..generation import chat_prompt_ids

    model, tokenizer = load_model(args)
    prompt_ids = chat_prompt_ids(model, tokenizer, [{"role": "user", "content": args.prompt}], args.system)
    reply = generate_reply(model, tokenizer, prompt_ids, args, stream=not args.no_stream)
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
    from ..generation import chat_prompt_ids

    model, tokenizer = load_model(args)
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
        prompt_ids = chat_prompt_ids(model, tokenizer, [*history, turn], args.system)
        try:
            new_token_budget(model, len(prompt_ids), args)
        except UsageError as error:  # this turn is not taken; the session and its history go on
            print(f"llm-modules chat: error: {error} (/reset clears the history)", file=sys.stderr, flush=True)
            continue
        print("assistant> ", end="", flush=True)
        reply = generate_reply(model, tokenizer, prompt_ids, args, stream=True)
        history += [turn, {"role": "assistant", "content": reply.strip()}]


def load_model(args: argparse.Namespace):
    """(model, tokenizer) of `--model`: a trained combined model, or a plain causal LM (dir, hub id or .gguf file),
    whose chats then use its tokenizer's chat template. A missing path or a dir that is not a model: exit code 3."""
    from ..generation import load_model_and_tokenizer

    try:
        return load_model_and_tokenizer(
            args.model, large_model=large_model_paths(args), device=args.device, large_dtype=args.large_dtype,
            large_quantization=args.large_quantization,
            trained_quantization=args.trained_quantization,
        )
    except ValueError as error:  # no tokenizer saved with the model
        raise UsageError(f"--model {args.model}: {error}") from error


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


def generate_reply(model, tokenizer, prompt_ids: list[int], args: argparse.Namespace, stream: bool) -> str:
    """Continue a rendered prompt; stream the new text to stdout if asked; return it (the same text). A combined
    model also stops at `<|end_of_solution|>`. Raises UsageError before generating when prompt and answer do not fit
    in the model's context."""
    import torch

    from transformers import set_seed

    from ..data import STOP_STRINGS
    from ..generation import AnswerStreamer, control_token_ids, decode_answer

    from ..modeling import LLMModulesForCausalLM

    input_ids = torch.tensor([prompt_ids], device=model.device)
    prompt_tokens = len(prompt_ids)
    max_new_tokens = new_token_budget(model, prompt_tokens, args)
    control_ids = control_token_ids(tokenizer, model)
    if args.seed is not None:
        set_seed(args.seed)
    sampling = dict(do_sample=False)
    if args.temperature > 0:
        sampling = dict(do_sample=True, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    output = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        streamer=AnswerStreamer(tokenizer, control_ids) if stream else None,
        stop_strings=STOP_STRINGS if isinstance(model, LLMModulesForCausalLM) else None,
        tokenizer=tokenizer,
        **sampling,
    )
    answer = decode_answer(tokenizer, output[0, prompt_tokens:], control_ids)
    if not answer.strip():
        check_empty_answer(model, prompt_tokens, output.shape[1] - prompt_tokens, max_new_tokens, args)
    return answer


def check_empty_answer(model, prompt_tokens: int, new_tokens: int, max_new_tokens: int,
                       args: argparse.Namespace) -> None:
    """Say why an answer is empty instead of printing a blank line: raise UsageError (exit code 2) when the prompt
    left the answer too few of the model's positions and they ran out before any text; else note on stderr that the
    model ended its answer at once."""
    from ..generation import context_length

    if new_tokens >= max_new_tokens and args.max_new_tokens is None and max_new_tokens < DEFAULT_MAX_NEW_TOKENS:
        raise UsageError(
            f"the prompt is {prompt_tokens} tokens and left {max_new_tokens} of the model's {context_length(model)} "
            "positions for the answer, which ran out before any text: shorten the prompt or the system prompt "
            "(--system)"
        )
    print("(the model's answer is empty: it ended it at once)", file=sys.stderr)
