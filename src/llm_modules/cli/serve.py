"""`llm-modules serve`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .common import (
    UsageError, add_frozen_precision_arguments, add_large_model_argument, int_at_least, large_model_paths,
)


def add_serve(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server (chat, completions, streaming)",
        description="Serve a trained combined model (or a plain Hugging Face causal LM dir) over the OpenAI API: "
        "/v1/models, /v1/chat/completions, /v1/completions, and /health.",
    )
    parser.add_argument("--model", required=True, help="a trained combined model dir (or a Hugging Face causal LM)")
    add_large_model_argument(parser)
    add_frozen_precision_arguments(parser)
    parser.add_argument("--model-name", help="the model id clients ask for (default: the dir's name)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int_at_least(0), default=8000)
    parser.add_argument(
        "--api-key", default=os.environ.get("LLM_MODULES_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1 (default: $LLM_MODULES_API_KEY; none: no key)",
    )
    parser.add_argument(
        "--max-batch-size", "--max-concurrency", type=int_at_least(1), default=8, dest="max_batch_size",
        help="requests decoded together in one batch (continuous batching: a request joins at the next step and "
        "leaves when done); more queue, first come first served. Each running request holds its KV caches, so this "
        "bounds memory (--max-concurrency is the old name)",
    )
    parser.add_argument("--max-new-tokens-limit", type=int_at_least(1), default=2048, help="largest max_tokens allowed")
    parser.add_argument("--system", help="system prompt for chats that bring none (default: the one the model was "
                        "trained with when all its rows shared one, else the Bespoke-Stratos one)")
    parser.add_argument(
        "--allowed-origins", nargs="+", metavar="ORIGIN", default=None,
        help="browser origins allowed to call the API from their pages (CORS), e.g. https://app.example, or '*' "
        "for any (as vLLM's flag; default: none, no CORS headers)",
    )
    parser.add_argument("--device", help="cpu or cuda[:N] (default: cuda when available)")
    parser.add_argument("--quiet", action="store_true", help="no log line per request; warnings and errors only")
    parser.add_argument(
        "--engine", choices=["ours", "vllm"], default="ours",
        help="ours: this package's server; vllm: vLLM's OpenAI server (`vllm serve`, paged KV cache, more throughput "
        "under load; one source with the paper's bridge and a Qwen2/Llama small model; the whole model in "
        "--large-dtype, default bfloat16; docs/serving-at-scale.md)",
    )
    parser.add_argument(
        "--vllm-option", action="append", default=[], metavar="OPTION",
        help="with --engine vllm, one more `vllm serve` option, e.g. --vllm-option=--max-model-len=8192 (repeatable)",
    )
    parser.set_defaults(handler=run_serve)


def run_vllm_serve(args: argparse.Namespace) -> None:
    """`--engine vllm`: vLLM's server on a saved combined model dir (llm_modules.vllm.launch)."""
    from ..sources import resolve_model_source
    from ..vllm.launch import serve_on_vllm
    from ..vllm.support import UnsupportedForVllm

    ignored = [flag for flag, given in (("--large-quantization", args.large_quantization),
                                        ("--trained-quantization", args.trained_quantization), ("--system", args.system),
                                        ("--device", args.device)) if given]
    if ignored:
        raise UsageError(f"{', '.join(ignored)} do not apply to --engine vllm")
    if args.large_model and len(args.large_model) > 1:
        raise UsageError("--engine vllm serves models of one source: give --large-model once")
    directory = Path(resolve_model_source(args.model, "--model"))
    if not directory.is_dir():
        raise UsageError(f"--model {args.model}: --engine vllm serves a saved combined model dir")
    try:
        code = serve_on_vllm(
            directory, name=args.model_name or directory.name, host=args.host, port=args.port,
            dtype=args.large_dtype or "bfloat16", max_num_seqs=args.max_batch_size, api_key=args.api_key,
            allowed_origins=args.allowed_origins, large_model=args.large_model[0] if args.large_model else None,
            extra=args.vllm_option,
        )
    except (UnsupportedForVllm, ValueError, RuntimeError) as error:
        raise UsageError(f"--model {args.model}: {error}") from error
    if code:
        raise SystemExit(code)


def run_serve(args: argparse.Namespace) -> None:
    if args.engine == "vllm":
        run_vllm_serve(args)
        return
    from .. import serving
    from ..sources import resolve_model_source

    source = resolve_model_source(args.model, "--model")
    try:
        model, tokenizer = serving.load_model(
            source, large_model=large_model_paths(args), device=args.device, large_dtype=args.large_dtype,
            large_quantization=args.large_quantization,
            trained_quantization=args.trained_quantization,
        )
    except ValueError as error:
        raise UsageError(f"--model {args.model}: {error}") from error
    name = args.model_name or (Path(source).name if Path(source).exists() else source)  # a dir's or file's name, or the hub id
    server = serving.ModelServer(
        model, tokenizer, name, max_batch_size=args.max_batch_size,
        max_new_tokens_limit=args.max_new_tokens_limit, system_prompt=args.system,
    )
    print(f"serving {server.name!r} (context {server.context_length} tokens, batches of up to "
          f"{server.engine.max_batch_size} requests) at http://{args.host}:{args.port}/v1", flush=True)
    serving.serve(server, host=args.host, port=args.port, api_key=args.api_key, quiet=args.quiet,
                  allowed_origins=args.allowed_origins)
