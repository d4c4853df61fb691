"""Load test of `llm-modules serve` (its batching engine) on loopback: aggregate generated tokens/s, time to first
token and request latency at several concurrencies, failed requests, and the server's memory over the whole run.

Starts the server in a subprocess on a free 127.0.0.1 port with one of these models:

    --model tiny   a tiny random Qwen2 + GPT-Neo combined model, as in the tests
    --model real   Qwen2.5-Coder-0.5B-Instruct frozen (--large-dtype, default bfloat16) + SmolLM2-135M-Instruct,
                   freshly composed, so untrained: its text is noise, which a throughput test does not mind
                   (fetch them first: `llm-modules fetch qwen2.5-coder-0.5b-instruct smollm2-135m-instruct`)
    --model DIR    a saved model dir (or plain causal LM), loaded as `llm-modules serve --model DIR` loads it

--engine vllm serves a saved model dir with vLLM's OpenAI server instead (`vllm serve DIR`, in the vLLM environment:
$LLM_MODULES_VLLM_PYTHON or .venv-vllm, docs/serving-at-scale.md; --dtype, default bfloat16, applies to the whole
model there; --max-batch-size is its --max-num-seqs). RSS is then the sum over the server's process tree (vLLM runs
its engine in a child process). Same clients, same requests: the two engines' tables compare.

At each --concurrency, that many closed-loop clients send --counts streamed chat requests in all, each asking for
exactly --max-tokens new tokens (greedy, `ignore_eos`, so every request generates the same count whatever the model
writes); then --soak more requests of --soak-max-tokens at the highest concurrency (many requests in little time,
for memory). No request starts after --time-limit seconds. The server's RSS is read after a warm-up and after the
last request. Prints a Markdown table and the targets, writes
JSON (--json), stops the server; exits 1 when a request failed or RSS grew more than --max-growth percent.

A request counts as failed when its status is not 200, its stream has an error event or no `[DONE]`, or its usage
does not show --max-tokens new tokens. Time to first token is measured to the first chunk that carries text. The
"other jobs' CPU" column is the share of the machine's CPU time that processes other than the server and the
clients used during the level: above a few percent, its numbers are not the server's alone.

    flock -x /tmp/llm-modules-cpu.lock python benchmarks/serve_load.py --model tiny --json serve-tiny.json
    flock -x /tmp/llm-modules-cpu.lock python benchmarks/serve_load.py --model real --json serve-real.json
    flock -x /tmp/llm-modules-cpu.lock python benchmarks/serve_load.py --model DIR --engine vllm --json serve-vllm.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import httpx

MODEL_NAME = "bench"
DEFAULTS = {  # per model kind: --counts at --concurrency 1 4 8 16, --soak, --max-tokens
    "tiny": ([50, 100, 150, 200], 0, 16),
    "real": ([4, 8, 16, 32], 440, 32),
}


# ---- the server (a child process) ---------------------------------------------------------------------------------


def serve_child(args: argparse.Namespace) -> None:
    """Load or compose the model and run the server until terminated (the child process)."""
    import torch

    from llm_modules import LLMModulesForCausalLM, serving

    if args.model == "tiny":
        model = tiny_model(Path(args.workdir))
        tokenizer = model.tokenizer
    elif args.model == "real":
        from llm_modules.fetch import fetched_model

        large, small = (fetched_model(name) for name in ("qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct"))
        if large is None or small is None:
            sys.exit("the real pair is not fetched: llm-modules fetch qwen2.5-coder-0.5b-instruct smollm2-135m-instruct")
        torch.manual_seed(0)
        model = LLMModulesForCausalLM.from_large_and_small(
            large.plain, small.plain, large_dtype=getattr(torch, args.large_dtype)
        ).eval()
        tokenizer = model.tokenizer
    else:
        # A combined model's frozen part in --large-dtype, as `llm-modules serve --large-dtype` loads it.
        is_combined = json.loads((Path(args.model) / "config.json").read_text()).get("model_type") == "llm_modules"
        model, tokenizer = serving.load_model(args.model, device="cpu",
                                              large_dtype=args.large_dtype if is_combined else None)
    server = serving.ModelServer(model, tokenizer, MODEL_NAME, max_batch_size=args.max_batch_size,
                                 max_new_tokens_limit=max(args.max_tokens, 16))
    serving.serve(server, port=args.port, quiet=True)


def tiny_model(root: Path):
    """A tiny random Qwen2 + GPT-Neo pair of the tests' sizes (tests/conftest.py), composed."""
    import torch

    from llm_modules import LLMModulesForCausalLM
    from llm_modules.tiny_models import save_tiny_causal_lm, train_tokenizer

    corpus = [f"The quick brown fox jumps over the lazy dog number {i}." for i in range(100)] + [
        f"User: what is {i} plus {i + 1}? Assistant: <|begin_of_solution|> {2 * i + 1} <|end_of_solution|>"
        for i in range(100)
    ]
    tokenizer = train_tokenizer(corpus, vocab_size=320)
    large = save_tiny_causal_lm(root / "large", "qwen2", tokenizer, hidden_size=64, layers=2, heads=4)
    small = save_tiny_causal_lm(root / "small", "gpt_neo", tokenizer, hidden_size=32, layers=2, heads=4)
    torch.manual_seed(0)
    return LLMModulesForCausalLM.from_large_and_small(large, small, cross_attention_heads=4).eval()


def vllm_command(args: argparse.Namespace, port: int) -> list[str]:
    """`vllm serve DIR` in the vLLM environment, as docs/serving-at-scale.md runs it."""
    from llm_modules.vllm.equality import vllm_python

    python = vllm_python()
    if python is None:
        sys.exit("no vLLM environment: run .ci/vllm-venv or set LLM_MODULES_VLLM_PYTHON")
    return [
        python, "-m", "llm_modules.vllm.cli", "serve", args.model, "--served-model-name", MODEL_NAME,
        "--port", str(port), "--host", "127.0.0.1", "--dtype", args.large_dtype, "--enforce-eager",
        "--max-num-seqs", str(args.max_batch_size), "--max-model-len", "4096", "--disable-log-stats",
        "--uvicorn-log-level", "warning",
    ]


def start_server(args: argparse.Namespace, workdir: Path, log) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        sys.executable, __file__, "--serve-child", "--model", args.model, "--large-dtype", args.large_dtype,
        "--max-batch-size", str(args.max_batch_size), "--max-tokens", str(args.max_tokens), "--port", str(port),
        "--workdir", str(workdir),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if args.engine == "vllm":
        command = vllm_command(args, port)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.5)
    process.kill()
    log.seek(0)
    raise RuntimeError(f"the server did not start:\n{log.read()[-3000:]}")


class CpuMeter:
    """CPU seconds since it was made: the server's, this process's (the clients), and every other process's (from
    /proc/stat), so a level that shared the cores with another job says so."""

    def __init__(self, server_pid: int):
        self.server_pid = server_pid
        self.start = self.read()

    def read(self) -> tuple[float, float, float]:
        ticks = os.sysconf("SC_CLK_TCK")
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        busy = sum(map(int, fields)) - int(fields[3]) - int(fields[4])  # all but idle and iowait
        server = 0
        for pid in process_tree(self.server_pid):  # vLLM's engine is a child process
            try:
                fields_of = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            server += int(fields_of[11]) + int(fields_of[12])
        own = os.times()
        return busy / ticks, server / ticks, own.user + own.system

    def others_share(self, seconds: float) -> float:
        """Share of the machine's CPU time that other processes used since `start` (0 to 1)."""
        busy, server, own = (now - then for now, then in zip(self.read(), self.start))
        return max(0.0, busy - server - own) / (seconds * os.cpu_count())


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo.extend(children.get(tree[-1], []))
    return tree


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    """Resident memory (`VmRSS`) or its peak (`VmHWM`) of a process and its descendants, summed, MiB (Linux /proc)."""
    total = 0.0
    for member in process_tree(pid):
        try:
            lines = Path(f"/proc/{member}/status").read_text().splitlines()
        except OSError:
            continue
        total += sum(int(line.split()[1]) / 1024 for line in lines if line.startswith(field + ":"))
    return total


# ---- the clients --------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    ok: bool
    tokens: int  # new tokens, from the stream's usage
    ttft: float | None  # seconds to the first chunk with text
    latency: float  # seconds to the end of the stream
    problem: str = ""


async def one_request(client: httpx.AsyncClient, url: str, index: int, max_tokens: int) -> Outcome:
    body = {
        "model": MODEL_NAME, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "system", "content": "Answer briefly."},
                     {"role": "user", "content": f"what is {index} plus {index}?"}],
    }
    started = time.perf_counter()
    ttft, tokens, done, problem = None, 0, False, ""
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                problem = f"status {response.status_code}"
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                event = json.loads(line[len("data: "):])
                if "error" in event:
                    problem = event["error"]["message"]
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                if ttft is None and any(c["delta"].get("content") for c in event.get("choices", [])):
                    ttft = time.perf_counter() - started
    except httpx.HTTPError as error:
        problem = f"{type(error).__name__}: {error}"
    latency = time.perf_counter() - started
    if not problem and not done:
        problem = "no [DONE]"
    if not problem and tokens != max_tokens:
        problem = f"{tokens} new tokens, not {max_tokens}"
    return Outcome(not problem, tokens, ttft, latency, problem)


async def run_level(url: str, count: int, concurrency: int, max_tokens: int, deadline: float) -> tuple[float, list[Outcome]]:
    """(seconds, outcomes) of `count` requests sent by `concurrency` closed-loop clients; none starts after
    `deadline` (time.monotonic)."""
    outcomes: list[Outcome] = []
    indices = iter(range(count))

    async def client_loop(client: httpx.AsyncClient) -> None:
        for index in indices:
            if time.monotonic() > deadline:
                return
            outcomes.append(await one_request(client, url, index, max_tokens))

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(900), limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        return time.perf_counter() - started, outcomes


def percentile(values: list[float], q: int) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def summary(concurrency: int, seconds: float, outcomes: list[Outcome]) -> dict:
    ttfts = [o.ttft for o in outcomes if o.ok and o.ttft is not None]
    latencies = [o.latency for o in outcomes if o.ok]
    tokens = sum(o.tokens for o in outcomes if o.ok)
    return {
        "concurrency": concurrency, "requests": len(outcomes), "failed": sum(not o.ok for o in outcomes),
        "seconds": round(seconds, 2), "tokens": tokens, "tokens_per_s": round(tokens / seconds, 3),
        "ttft_p50_s": percentile(ttfts, 50), "ttft_p95_s": percentile(ttfts, 95),
        "latency_p50_s": percentile(latencies, 50), "latency_p95_s": percentile(latencies, 95),
        "problems": sorted({o.problem for o in outcomes if not o.ok})[:5],
    }


# ---- report ---------------------------------------------------------------------------------------------------------


def table(levels: list[dict]) -> str:
    def s(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    rows = [
        "| concurrency | requests | failed | tokens/s | TTFT p50 s | TTFT p95 s | latency p50 s | latency p95 s "
        "| other jobs' CPU |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for level in levels:
        rows.append(
            f"| {level['concurrency']} | {level['requests']} | {level['failed']} | {level['tokens_per_s']:.2f} | "
            f"{s(level['ttft_p50_s'])} | {s(level['ttft_p95_s'])} | {s(level['latency_p50_s'])} | "
            f"{s(level['latency_p95_s'])} | {100 * level['other_processes_cpu_share']:.0f}% |"
        )
    return "\n".join(rows)


def targets(levels: list[dict], memory: dict, failed: int) -> dict[str, tuple[str, bool | None]]:
    """Each target's measured value and whether it holds (None: not measured at those concurrencies)."""
    by = {level["concurrency"]: level for level in levels}
    results: dict[str, tuple[str, bool | None]] = {}
    if 1 in by and 8 in by and by[1]["tokens_per_s"]:
        ratio = by[8]["tokens_per_s"] / by[1]["tokens_per_s"]
        results["tokens/s at concurrency 8 >= 3x concurrency 1"] = (f"{ratio:.2f}x", ratio >= 3)
    else:
        results["tokens/s at concurrency 8 >= 3x concurrency 1"] = ("not measured", None)
    if 8 in by and by[8]["ttft_p50_s"]:
        ratio = by[8]["ttft_p95_s"] / by[8]["ttft_p50_s"]
        results["p95 TTFT at concurrency 8 <= 2x its p50"] = (f"{ratio:.2f}x", ratio <= 2)
    else:
        results["p95 TTFT at concurrency 8 <= 2x its p50"] = ("not measured", None)
    results[f"RSS growth over {memory['requests']} requests <= 5%"] = (
        f"{memory['growth_percent']:+.2f}%", memory["growth_percent"] <= 5
    )
    results["no failed requests"] = (str(failed), failed == 0)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny, real, or a saved model dir (default: tiny)")
    parser.add_argument("--engine", default="ours", choices=["ours", "vllm"],
                        help="our server (llm-modules serve) or vLLM's (vllm serve; --model must be a saved dir)")
    parser.add_argument("--large-dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"],
                        help="the frozen part's dtype of --model real or a combined DIR (the trained parts stay float32); with --engine "
                        "vllm the whole model's (default: bfloat16)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--counts", type=int, nargs="+", help="requests at each concurrency (default: by model)")
    parser.add_argument("--soak", type=int, help="more requests at the highest concurrency, for memory (default: by model)")
    parser.add_argument("--soak-max-tokens", type=int, default=4, help="new tokens per soak request (default: 4)")
    parser.add_argument("--max-tokens", type=int, help="new tokens per request (default: 16 tiny, 32 otherwise)")
    parser.add_argument("--max-batch-size", type=int, default=8, help="the server's --max-batch-size (default: 8)")
    parser.add_argument("--time-limit", type=float, default=1800, help="no request starts after this many seconds")
    parser.add_argument("--max-growth", type=float, default=5.0, help="RSS growth allowed, percent (default: 5)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--serve-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    counts, soak, max_tokens = DEFAULTS["tiny" if args.model == "tiny" else "real"]
    args.counts = args.counts or counts[:len(args.concurrency)]
    args.soak = soak if args.soak is None else args.soak
    args.max_tokens = args.max_tokens or max_tokens
    if args.serve_child:
        serve_child(args)
        return 0
    args.soak_max_tokens = min(args.soak_max_tokens, args.max_tokens)
    if len(args.counts) != len(args.concurrency):
        parser.error("give one --counts value per --concurrency value")
    if args.engine == "vllm" and not Path(args.model).is_dir():
        parser.error("--engine vllm serves a saved model dir: give --model DIR")

    deadline = time.monotonic() + args.time_limit
    with tempfile.TemporaryDirectory(prefix="serve-load-") as workdir:
        with open(Path(workdir) / "server.log", "w+") as log:
            loading = time.perf_counter()
            process, url = start_server(args, Path(workdir), log)
            loaded_in = time.perf_counter() - loading
            try:
                warmup = max(args.max_batch_size, 2)
                _, warm = asyncio.run(run_level(url, warmup, args.max_batch_size, args.max_tokens, deadline))
                before = rss_mib(process.pid)
                levels, failed, requests = [], sum(not o.ok for o in warm), 0
                for concurrency, count in zip(args.concurrency, args.counts):
                    meter = CpuMeter(process.pid)
                    seconds, outcomes = asyncio.run(run_level(url, count, concurrency, args.max_tokens, deadline))
                    levels.append(summary(concurrency, seconds, outcomes))
                    levels[-1]["other_processes_cpu_share"] = round(meter.others_share(seconds), 3)
                    failed, requests = failed + levels[-1]["failed"], requests + len(outcomes)
                    print(f"concurrency {concurrency}: {len(outcomes)} requests in {seconds:.1f} s, "
                          f"{levels[-1]['tokens_per_s']:.2f} tokens/s", file=sys.stderr, flush=True)
                if args.soak:
                    soaked, outcomes = asyncio.run(
                        run_level(url, args.soak, max(args.concurrency), args.soak_max_tokens, deadline)
                    )
                    failed, requests = failed + sum(not o.ok for o in outcomes), requests + len(outcomes)
                    print(f"soak: {len(outcomes)} requests in {soaked:.1f} s", file=sys.stderr, flush=True)
                after, peak = rss_mib(process.pid), rss_mib(process.pid, "VmHWM")
            finally:
                process.terminate()
                process.wait(timeout=60)

    memory = {"before_mib": round(before, 1), "after_mib": round(after, 1), "peak_mib": round(peak, 1),
              "requests": requests, "growth_percent": round(100 * (after - before) / before, 2)}
    checks = targets(levels, memory, failed)
    what = {"tiny": "tiny random Qwen2 + GPT-Neo combined model (fp32)",
            "real": f"Qwen2.5-Coder-0.5B-Instruct frozen in {args.large_dtype} + SmolLM2-135M-Instruct (fp32), "
                    "freshly composed (untrained)"}.get(args.model, f"{args.model} (frozen part in {args.large_dtype})")
    if args.engine == "vllm":
        what = f"{what} on vLLM ({args.large_dtype}, enforce_eager)"
    results = {
        "model": what, "engine": args.engine,
        "settings": {"max_batch_size": args.max_batch_size, "max_tokens": args.max_tokens, "concurrency": args.concurrency,
                     "counts": args.counts, "soak": args.soak, "soak_max_tokens": args.soak_max_tokens, "warmup": warmup,
                     "requests": "streamed chat, greedy, ignore_eos: every request generates max_tokens"},
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "torch": version("torch"),
                    "transformers": version("transformers")},
        "server_start_s": round(loaded_in, 1),
        "levels": levels,
        "server_rss": memory,
        "stopped_at_time_limit": time.monotonic() > deadline,
        "targets": {name: {"measured": value, "holds": holds} for name, (value, holds) in checks.items()},
    }
    print(f"\n{what}; server --max-batch-size {args.max_batch_size}; streamed chat requests of exactly "
          f"{args.max_tokens} new tokens (greedy, ignore_eos); {os.cpu_count()} CPU cores, torch {version('torch')}, "
          f"transformers {version('transformers')}\n")
    print(table(levels))
    print(f"\nserver RSS {before:.1f} MiB after the warm-up, {after:.1f} MiB after {requests} more requests "
          f"({memory['growth_percent']:+.2f}%), peak {peak:.1f} MiB")
    if results["stopped_at_time_limit"]:
        print(f"stopped at the time limit ({args.time_limit:.0f} s): fewer requests than asked")
    for name, (value, holds) in checks.items():
        print(f"- {name}: {value} ({'holds' if holds else 'missed' if holds is False else 'n/a'})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 1 if failed or memory["growth_percent"] > args.max_growth else 0


if __name__ == "__main__":
    sys.exit(main())
