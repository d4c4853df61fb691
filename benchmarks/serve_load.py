"""Bounded load test of `llm-modules serve`: requests/s and latency at several concurrencies, and memory growth.

Starts the server on a free 127.0.0.1 port (a tiny random combined model unless --model is given), sends a fixed
number of chat requests at each concurrency (default 100 at 1, 200 at 4, 200 at 16: 500 in all), prints
requests/s and p50/p95 latency per level and the server's RSS before and after the 500 requests, then stops the
server. Exits 1 if any request fails or RSS grows more than --max-growth percent.

    python benchmarks/serve_load.py [--model DIR] [--counts 100 200 200] [--concurrency 1 4 16]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from llm_modules import LLMModulesForCausalLM
from llm_modules.tiny_models import save_tiny_causal_lm, train_tokenizer

WARMUP = 16


def tiny_model(root: Path) -> Path:
    """The tests' tiny Qwen2 + GPT-Neo pair, composed and saved."""
    corpus = [f"The quick brown fox jumps over the lazy dog number {i}." for i in range(100)]
    tokenizer = train_tokenizer(corpus, vocab_size=320)
    large = save_tiny_causal_lm(root / "large", "qwen2", tokenizer, hidden_size=64, layers=2, heads=4)
    small = save_tiny_causal_lm(root / "small", "gpt_neo", tokenizer, hidden_size=32, layers=2, heads=4)
    torch.manual_seed(0)
    LLMModulesForCausalLM.from_large_and_small(large, small, cross_attention_heads=4).save_pretrained(root / "tiny")
    return root / "tiny"


def rss_mib(pid: int) -> float:
    """Resident memory of a process (Linux /proc), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def start_server(args: argparse.Namespace, model: Path, log) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "llm_modules.cli", "serve", "--model", str(model), "--host", "127.0.0.1",
               "--port", str(port), "--max-concurrency", str(args.max_concurrency), "--model-name", "bench"]
    if args.large_model:
        command += ["--large-model", args.large_model]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.3)
    process.kill()
    log.seek(0)
    raise RuntimeError(f"the server did not start:\n{log.read()[-3000:]}")


async def run_level(url: str, count: int, concurrency: int, max_tokens: int) -> tuple[float, list[float], int]:
    """(seconds, latency of each request, failed requests) for `count` requests, `concurrency` at a time."""
    latencies: list[float] = []
    failed = 0
    next_index = iter(range(count))

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal failed
        for i in next_index:
            body = {
                "model": "bench", "max_tokens": max_tokens, "temperature": 0,
                "messages": [
                    {"role": "system", "content": "Answer briefly."},
                    {"role": "user", "content": f"what is {i} plus {i}?"},
                ],
            }
            started = time.perf_counter()
            response = await client.post(f"{url}/v1/chat/completions", json=body)
            latencies.append(time.perf_counter() - started)
            if response.status_code != 200 or "choices" not in response.json():
                failed += 1

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        return time.perf_counter() - started, latencies, failed


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a saved model dir (default: a tiny random combined model)")
    parser.add_argument("--large-model", help="where the frozen large model is, if it moved since training")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--counts", type=int, nargs="+", default=[100, 200, 200], help="requests at each concurrency")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--max-concurrency", type=int, default=4, help="the server's --max-concurrency")
    parser.add_argument("--max-growth", type=float, default=5.0, help="RSS growth allowed, percent")
    args = parser.parse_args()
    if len(args.counts) != len(args.concurrency):
        parser.error("give one --counts value per --concurrency value")

    with tempfile.TemporaryDirectory(prefix="serve-load-") as root:
        model = Path(args.model) if args.model else tiny_model(Path(root))
        with open(Path(root) / "server.log", "w+") as log:
            process, url = start_server(args, model, log)
            try:
                asyncio.run(run_level(url, WARMUP, min(16, max(args.concurrency)), args.max_tokens))
                before = rss_mib(process.pid)
                print(f"server {url} ({model.name}, --max-concurrency {args.max_concurrency}), chat requests of "
                      f"{args.max_tokens} new tokens, greedy; {os.cpu_count()} CPU cores")
                print(f"{'concurrency':>11} {'requests':>8} {'req/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'failed':>6}")
                failures = 0
                for concurrency, count in zip(args.concurrency, args.counts):
                    seconds, latencies, failed = asyncio.run(run_level(url, count, concurrency, args.max_tokens))
                    failures += failed
                    p50, p95 = (1000 * percentile(latencies, q) for q in (50, 95))
                    print(f"{concurrency:>11} {count:>8} {count / seconds:>7.1f} {p50:>8.0f} {p95:>8.0f} {failed:>6}")
                after = rss_mib(process.pid)
            finally:
                process.terminate()
                process.wait(timeout=30)
    growth = 100 * (after - before) / before
    print(f"server RSS: {before:.1f} MiB before, {after:.1f} MiB after {sum(args.counts)} requests: "
          f"{growth:+.2f}% (limit {args.max_growth}%)")
    return 1 if failures or growth > args.max_growth else 0


if __name__ == "__main__":
    sys.exit(main())
