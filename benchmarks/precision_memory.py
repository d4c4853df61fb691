"""Peak memory of composing a real pair with the frozen model in each precision (docs/performance.md).

Each precision runs in a fresh process (peak RSS is per process): `LLMModulesForCausalLM.from_large_and_small` from
the dirs (load path included: reading, casting, quantizing), then one forward over 64 tokens; the child prints its
peak resident set (`ru_maxrss`) and the load time.

    python benchmarks/precision_memory.py --large DIR --small DIR [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CHILD = """
import json, resource, sys, time, torch
from llm_modules import LLMModulesForCausalLM
large, small, precision = sys.argv[1:4]
options = {"large_quantization": precision} if precision in ("int8", "fp16") else {"large_dtype": getattr(torch, precision)}
start = time.perf_counter()
model = LLMModulesForCausalLM.from_large_and_small(large, small, **options).eval()
load_s = time.perf_counter() - start
with torch.inference_mode():
    model(torch.randint(100, 1000, (1, 64)))
print(json.dumps({"precision": precision, "load_s": load_s,
                  "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--large", required=True)
    parser.add_argument("--small", required=True)
    parser.add_argument("--precisions", nargs="+", default=["float32", "bfloat16", "fp16", "int8"])
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    rows = []
    for precision in args.precisions:
        done = subprocess.run([sys.executable, "-c", CHILD, args.large, args.small, precision],
                              capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
        if done.returncode:
            print(done.stderr[-3000:], file=sys.stderr)
            return 1
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{precision}: load {rows[-1]['load_s']:.1f} s, peak {rows[-1]['peak_gib']:.2f} GiB", flush=True)
    print("\n| frozen model | load (s) | peak RSS, load + one forward (GiB) |\n| --- | ---: | ---: |")
    for row in rows:
        print(f"| {row['precision']} | {row['load_s']:.1f} | {row['peak_gib']:.2f} |")
    if args.json:
        path = Path(args.json)
        path.with_name(path.name + ".tmp").write_text(json.dumps(rows, indent=2) + "\n")
        os.replace(path.with_name(path.name + ".tmp"), path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
