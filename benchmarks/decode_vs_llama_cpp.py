"""Decode speed side by side in one run: llama.cpp's decode of the frozen model's GGUF alone (what a CPU user would run
instead) against ours, the combined real pair, at the same thread counts and contexts (docs/performance.md).

    flock /tmp/llm-modules-cpu.lock python benchmarks/decode_vs_llama_cpp.py --json decode-vs-llama-cpp.json

llama.cpp: `llama-bench` (`--llama-bench PATH`, else `benchmarks/build_llama_cpp.sh` builds it once from the source
llama-cpp-python 0.3.36 vendors; AVX2 flags, see that script), on the fetched Q4_K_M GGUF of --large, `-p 0 -n N -d
CONTEXT`: N tokens decoded after a CONTEXT-token prompt, the mean of --repetitions runs. Ours:
`llm-modules bench decode --precisions` (`llm_modules.benchmarking.precision`) on the same fetched models (the plain
bf16 dirs `llm-modules fetch` keeps beside the GGUFs), combined model with its three caches, frozen model in each
--precisions (default gguf: llama.cpp on the same GGUF, without its LM head), trained parts in each
--trained-quantization (default int8, and gguf: the small model in llama.cpp too). --rounds repeats llama.cpp and
ours in turn and reports medians and ranges. Both models are fetched first:
`llm-modules fetch qwen2.5-coder-1.5b-instruct smollm2-135m-instruct`. Seconds per generated token; the table's last
column is ours over llama.cpp's (the issue-30 target: <= 1.3 at one thread, context 256).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def cpu_flags() -> str:
    """The vector extensions the kernels can use (llama.cpp's and torch's choices depend on them)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = line.split(":", 1)[1].split()
            return " ".join(sorted(f for f in flags if f.startswith(("avx", "amx")) or f in ("fma", "f16c")))
    return "unknown"


def llama_bench_path(given: str | None) -> str:
    if given:
        return given
    built = subprocess.run(["bash", str(REPO / "benchmarks" / "build_llama_cpp.sh")], capture_output=True, text=True)
    if built.returncode != 0:
        sys.exit(f"building llama.cpp failed:\n{built.stderr[-3000:]}")
    return built.stdout.strip().splitlines()[-1]


def run_llama_bench(bench: str, gguf: Path, threads: list[int], contexts: list[int], new_tokens: int,
                    repetitions: int) -> list[dict]:
    """Rows {threads, context, llama_cpp_s}: seconds per decoded token, the mean over repetitions."""
    command = [bench, "-m", str(gguf), "-t", ",".join(map(str, threads)), "-p", "0", "-n", str(new_tokens),
               "-d", ",".join(map(str, contexts)), "-r", str(repetitions), "-o", "json"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"llama-bench failed ({' '.join(command)}):\n{done.stderr[-3000:]}")
    return [{"threads": r["n_threads"], "context": r["n_depth"], "llama_cpp_s": r["avg_ns"] / 1e9 / r["n_gen"],
             "llama_cpp_build": r["build_commit"], "llama_cpp_model": r["model_type"]}
            for r in json.loads(done.stdout)]


def summary(values: list[float], digits: int = 3, suffix: str = "") -> str:
    """The median, and the range over rounds when there are several."""
    middle = statistics.median(values)
    if len(values) == 1:
        return f"{middle:.{digits}f}{suffix}"
    return f"{middle:.{digits}f}{suffix} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", default="qwen2.5-coder-1.5b-instruct", help="a fetched name (its GGUF and plain dir)")
    parser.add_argument("--small", default="smollm2-135m-instruct", help="a fetched name")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--contexts", type=int, nargs="+", default=[64, 256, 512])
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repetitions", type=int, default=3, help="llama-bench runs per setting")
    parser.add_argument("--rounds", type=int, default=1,
                        help="llama.cpp then ours, this many times; the table gives medians and ranges over rounds "
                        "(a shared VM's speed drifts by 10-30%% between minutes)")
    parser.add_argument("--precisions", nargs="+", default=["gguf"], help="ours: the frozen model's (bench decode's)")
    parser.add_argument("--trained-quantization", nargs="+", default=["int8", "gguf"],
                        help="ours: the trained parts' (none: float32), each measured")
    parser.add_argument("--llama-bench", help="a llama-bench binary (default: build it, see the module docstring)")
    parser.add_argument("--json", type=Path, help="write the results here (atomic, after every round)")
    args = parser.parse_args()

    from llm_modules.benchmarking import machine_info
    from llm_modules.benchmarking.precision import bench_precision
    from llm_modules.fetch import fetched_model

    large, small = fetched_model(args.large), fetched_model(args.small)
    if large is None or small is None:
        sys.exit(f"fetch them first: llm-modules fetch {args.large} {args.small}")
    bench = llama_bench_path(args.llama_bench)
    machine = {**machine_info(torch.device("cpu")), "cpu_flags": cpu_flags()}
    rows = []
    for round_ in range(1, args.rounds + 1):
        print(f"round {round_}: llama.cpp ({bench}) on {large.gguf.name} ...", file=sys.stderr, flush=True)
        reference = run_llama_bench(bench, large.gguf, args.threads, args.contexts, args.new_tokens, args.repetitions)
        for trained in args.trained_quantization:
            ours = bench_precision(large=str(large.plain), small=str(small.plain), precisions=args.precisions,
                                   contexts=args.contexts, threads=args.threads, new_tokens=args.new_tokens,
                                   trained_quantization=None if trained == "none" else trained,
                                   log=lambda line: print(line, file=sys.stderr, flush=True))
            for row in ours["rows"]:
                match = next(r for r in reference if r["threads"] == row["threads"] and r["context"] == row["context"])
                rows.append({**match, "round": round_, "precision": row["precision"],
                             "trained": "float32" if trained == "none" else trained, "combined_s": row["combined_s"],
                             "large_alone_s": row["large_alone_s"],
                             "combined_over_llama_cpp": row["combined_s"] / match["llama_cpp_s"]})
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=args.json.parent, delete=False, suffix=".tmp") as handle:
                json.dump({"benchmark": "decode_vs_llama_cpp", "machine": machine, "rounds_done": round_,
                           "settings": vars(args) | {"json": str(args.json)}, "llama_bench": bench, "rows": rows},
                          handle, indent=2)
            os.replace(handle.name, args.json)
    first = rows[0]
    print(f"{args.large} + {args.small}; {machine['cpu']} ({machine['cpu_count']} CPUs; {machine['cpu_flags']}); "
          f"torch {machine['torch']}, transformers {machine['transformers']}; llama.cpp {first['llama_cpp_build']} "
          f"({first['llama_cpp_model']}); {args.new_tokens} tokens decoded after each context; seconds per token"
          + (f"; median (min-max) over {args.rounds} rounds" if args.rounds > 1 else "") + "\n")
    print("| threads | context | llama.cpp, frozen GGUF alone | ours: frozen | trained | large alone (ours) | combined | combined / llama.cpp |")
    print("| ---: | ---: | ---: | --- | --- | ---: | ---: | ---: |")
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["threads"], r["context"], r["precision"], r["trained"]), []).append(r)
    for (threads, context, precision, trained), group in sorted(groups.items()):
        column = lambda key: [r[key] for r in group]  # noqa: E731
        print(f"| {threads} | {context} | {summary(column('llama_cpp_s'))} | {precision} | {trained} | "
              f"{summary(column('large_alone_s'))} | {summary(column('combined_s'))} | "
              f"{summary(column('combined_over_llama_cpp'), 2, 'x')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
